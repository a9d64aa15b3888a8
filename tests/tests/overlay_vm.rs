//! Root modes in a VM: the busybox test image, packed once, booted by one node in `tmpfs` mode
//! and one in `overlay` mode (same image, same VM size), both through the swarm. In overlay mode
//! the root must be an overlayfs whose lower layer is the squashfs on a loop device backed by the
//! downloaded file, and a file written after boot must land in the upper layer, visible at
//! `/run/luna/upper`. Prints the RAM the root takes after boot (tmpfs pages) and the time to
//! `installed` in both modes (the README's root-mode table). Needs root, dracut, qemu and
//! squashfs-tools (`LUNA_TEST_PRIVILEGED=1`).
//!
//! The group's post-script (run chrooted into the node's root before switch_root, so in overlay
//! mode it writes into the upper layer) replaces the image's `/sbin/init` with a probe that
//! writes a file, prints what it sees on the console and then does what the image's init does.

use std::time::{Duration, Instant};

use luna_tests::{privileged, Cluster, ClusterOptions, Vm, BOOTED_MARKER};
use serde_json::{json, Value};

const SUBNET: &str = "10.88.0";
const KERNEL_OPTS: &str = "console=ttyS0 panic=-1 rd.retry=300 luna.stall=20";
const BOOT_TIMEOUT: Duration = Duration::from_secs(420);
const IMAGE: &str = "tiny";
const PROBE: &str = "LUNA-ROOT-PROBE";

/// The post-script: the probe becomes the image's init.
const POSTSCRIPT: &str = r#"cat > /sbin/init <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /root && echo written-after-boot > /root/after-boot && sync
fs=$(awk '$2 == "/" { t = $3 } END { print t }' /proc/mounts)
opts=$(awk '$2 == "/" { o = $4 } END { print o }' /proc/mounts)
lower=$(echo "$opts" | tr ',' '\n' | sed -n 's/^lowerdir=//p')
lowerfs=$(awk '$2 == "/run/luna/lower" { print $3 }' /proc/mounts)
lowerdev=$(awk '$2 == "/run/luna/lower" { print $1 }' /proc/mounts)
backing=none
[ -n "$lowerdev" ] && backing=$(cat /sys/block/${lowerdev#/dev/}/loop/backing_file 2>/dev/null)
upper_file=no; [ "$(cat /run/luna/upper/root/after-boot 2>/dev/null)" = written-after-boot ] && upper_file=yes
upper_init=no; [ -f /run/luna/upper/sbin/init ] && upper_init=yes
upper_image=no; [ -e /run/luna/upper/etc/os-release ] && upper_image=yes
used() { df -k "$1" 2>/dev/null | awk 'NR == 2 { print $3 }'; }
if [ "$fs" = overlay ]; then root_kib=$(( $(used /run/luna/image) + $(used /run/luna/rw) )); else root_kib=$(used /); fi
shmem=$(awk '/^Shmem:/ { print $2 }' /proc/meminfo)
echo "LUNA-ROOT-PROBE fs=$fs lower=${lower:-none} lowerfs=${lowerfs:-none} lowerdev=${lowerdev:-none} backing=${backing:-none} upper_file=$upper_file upper_init=$upper_init upper_image=$upper_image root_kib=$root_kib shmem_kib=$shmem" > /dev/console
[ -s /etc/hostname ] && hostname "$(cat /etc/hostname)"
/usr/sbin/luna-report-booted
sync
poweroff -f
EOF
chmod 755 /sbin/init
"#;

fn mac(i: u32) -> String {
    format!("52:54:00:88:00:{i:02x}")
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

fn fail(c: &Cluster, vm: &Vm, what: &str) -> ! {
    let log = c.server_log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{what}\n--- console of {} (last 60 lines)\n{}\n--- luna-server (last 40 lines)\n{}",
        vm.name(),
        vm.serial().tail(60),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

fn step(c: &Cluster, node: &str) -> String {
    c.api("GET", &format!("/api/v1/node/{node}"), None)
        .map(|n| n["status"]["step"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// The server-logged status reports of `node` (`node status` lines), in order.
fn reports(c: &Cluster, node: &str) -> Vec<String> {
    let needle = format!("node={node} ");
    c.server_log().lines().filter(|l| l.contains("node status") && l.contains(&needle)).map(String::from).collect()
}

/// Boots `node`, returns (time to `installed`, the probe's line).
fn boot(c: &Cluster, node: &str, i: u32) -> (Duration, String) {
    let started = Instant::now();
    let vm = c.boot(&format!("ovl-{node}"), &mac(i)).unwrap();
    let deadline = started + BOOT_TIMEOUT;
    let installed = loop {
        let s = step(c, node);
        if s == "installed" || s == "booted" {
            break started.elapsed();
        }
        if s == "error" || Instant::now() > deadline {
            fail(c, &vm, &format!("{node} never reached installed (status {s})"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let line = match vm.wait_for(PROBE, BOOT_TIMEOUT.saturating_sub(started.elapsed())) {
        Ok(l) => l,
        Err(e) => fail(c, &vm, &format!("{node}: no probe line: {e}")),
    };
    if let Err(e) = vm.wait_for(BOOTED_MARKER, Duration::from_secs(60)) {
        fail(c, &vm, &format!("{node} did not report booted: {e}"));
    }
    (installed, line)
}

fn wait_seeded(c: &Cluster, rev: u32) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = c.current_revision(IMAGE).unwrap();
        assert_eq!(listed["id"], rev, "{listed}");
        if listed["seeder"]["healthy"] == true && listed["squashfs_seeder"]["healthy"] == true {
            return listed;
        }
        assert!(Instant::now() < deadline, "the seeder never served both torrents of revision {rev}: {listed}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn overlay_root_is_a_squashfs_under_a_tmpfs_upper_layer() {
    if !privileged() {
        return;
    }
    let c = Cluster::start(ClusterOptions { subnet: SUBNET.into(), seed: true, ..ClusterOptions::default() })
        .expect("start luna-server in a namespace");
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.add_test_osimage(IMAGE, KERNEL_OPTS).unwrap();
    c.cli(&["group", "add", "ram", "--osimage", IMAGE, "--network", "prov"]).unwrap();
    c.cli(&["group", "add", "ovl", "--osimage", IMAGE, "--network", "prov", "--root", "overlay"]).unwrap();
    for g in ["ram", "ovl"] {
        c.api("PATCH", &format!("/api/v1/group/{g}"), Some(&json!({ "postscript": POSTSCRIPT }))).unwrap();
    }
    c.cli(&["node", "add", "node001", "--group", "ram"]).unwrap();
    c.cli(&["node", "add", "node002", "--group", "ovl"]).unwrap();
    for i in 1..=2 {
        c.cli(&["node", "change", &format!("node{i:03}"), "--mac", &mac(i)]).unwrap();
    }
    let rev = c.pack(IMAGE, Duration::from_secs(600)).expect("pack the test image");
    let listed = wait_seeded(&c, rev);
    let sq = &listed["squashfs"];
    assert!(sq["size"].as_u64().unwrap_or(0) > 0 && sq["info_hash"] != listed["info_hash"], "{listed}");
    println!(
        "overlay_vm: archive {} bytes, squashfs {} bytes",
        listed["archive_size"],
        sq["size"].as_u64().unwrap_or(0)
    );

    let (t_tmpfs, tmpfs) = boot(&c, "node001", 1);
    assert_eq!(value(&tmpfs, "fs"), "tmpfs", "{tmpfs}");
    assert_eq!(value(&tmpfs, "lower"), "none", "{tmpfs}");

    let (t_overlay, ovl) = boot(&c, "node002", 2);
    assert_eq!(value(&ovl, "fs"), "overlay", "{ovl}");
    assert_eq!(value(&ovl, "lower"), "/run/luna/lower", "{ovl}");
    assert_eq!(value(&ovl, "lowerfs"), "squashfs", "{ovl}");
    assert!(value(&ovl, "lowerdev").starts_with("/dev/loop"), "{ovl}");
    assert_eq!(value(&ovl, "backing"), "/run/luna/image/root.squashfs", "{ovl}");
    assert_eq!(value(&ovl, "upper_file"), "yes", "a file written after boot is in the upper layer: {ovl}");
    assert_eq!(value(&ovl, "upper_init"), "yes", "the post-script wrote into the upper layer: {ovl}");
    assert_eq!(value(&ovl, "upper_image"), "no", "unchanged image files stay in the lower layer: {ovl}");

    for node in ["node001", "node002"] {
        let steps = reports(&c, node);
        assert!(!steps.iter().any(|l| l.contains("step=error")), "{node}: {steps:?}");
        let unpack = steps.iter().find(|l| l.contains("step=unpack")).cloned().unwrap_or_default();
        assert!(!unpack.contains("(0 from peers"), "{node} got its image from the swarm: {unpack}");
    }
    assert!(reports(&c, "node002").iter().any(|l| l.contains("step=overlay")), "{:?}", reports(&c, "node002"));

    let kib = |l: &str, k: &str| value(l, k).parse::<u64>().unwrap_or(0);
    let (ram_tmpfs, ram_overlay) = (kib(&tmpfs, "root_kib"), kib(&ovl, "root_kib"));
    assert!(ram_tmpfs > 0 && ram_overlay > 0, "{tmpfs}\n{ovl}");
    println!(
        "overlay_vm: root RAM after boot: tmpfs {ram_tmpfs} KiB, overlay {ram_overlay} KiB ({:.0} %); \
         Shmem tmpfs {} KiB, overlay {} KiB; time to installed: tmpfs {:.1} s, overlay {:.1} s",
        ram_overlay as f64 * 100.0 / ram_tmpfs as f64,
        kib(&tmpfs, "shmem_kib"),
        kib(&ovl, "shmem_kib"),
        t_tmpfs.as_secs_f64(),
        t_overlay.as_secs_f64()
    );
    assert!(ram_overlay < ram_tmpfs, "the compressed image takes less RAM than the unpacked one");
}
