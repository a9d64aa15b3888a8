//! Root modes with a real Debian: the Debian minbase tree of `debootstrap_vm`, packed once (the
//! archive and, as a group boots it in overlay mode, the squashfs), booted by one node in `tmpfs`
//! mode and then by one in `overlay` mode, same image and same VM size, both through the swarm,
//! each to `multi-user.target`. Prints the RAM the root holds after boot (the tmpfs pages of the
//! unpacked tree; in overlay mode those of the compressed squashfs plus the upper layer) and the
//! time from power-on to `installed` in both modes: the README's root-mode table. The target is
//! overlay ≤ 50 % of tmpfs.
//!
//! The groups' post-script (chrooted into the node's root before switch_root; in overlay mode
//! it writes into the upper layer) adds a unit that, once `luna-booted.service` ran, prints a
//! `LUNA-ROOT-PROBE` line with what the root is and takes on the console.
//!
//! Slow (a debootstrap the first time, a pack of a 500 MB tree with its squashfs, two Debian
//! boots in TCG) and needs the Debian mirror, so it is `#[ignore]`d like `debootstrap_vm`: run
//! it with `--ignored` and `LUNA_TEST_PRIVILEGED=1`.

use std::time::{Duration, Instant};

use luna_tests::{
    debian_tree, privileged, reached_multi_user, Cluster, ClusterOptions, DebianFlavour, Vm, BOOTED_MARKER,
    DEBIAN_KERNEL_OPTS,
};
use serde_json::{json, Value};

const SUBNET: &str = "10.77.23";
const IMAGE: &str = "debmodes";
const PROBE: &str = "LUNA-ROOT-PROBE";
const BOOT_TIMEOUT: Duration = Duration::from_secs(2700);

/// The post-script: a probe unit run after `luna-booted.service`.
const POSTSCRIPT: &str = r#"cat > /usr/local/sbin/luna-root-probe <<'EOF'
#!/bin/sh
used() { df -k "$1" 2> /dev/null | awk 'NR == 2 { print $3 }'; }
fs=$(awk '$2 == "/" { t = $3 } END { print t }' /proc/mounts)
lowerfs=$(awk '$2 == "/run/luna/lower" { print $3 }' /proc/mounts)
if [ "$fs" = overlay ]; then
    image=$(used /run/luna/image) upper=$(used /run/luna/rw)
    root_kib=$((image + upper))
else
    image=0 upper=0
    root_kib=$(used /)
fi
mem() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
echo "LUNA-ROOT-PROBE fs=$fs lowerfs=${lowerfs:-none} root_kib=$root_kib image_kib=$image upper_kib=$upper shmem_kib=$(mem Shmem) used_kib=$(($(mem MemTotal) - $(mem MemAvailable)))" > /dev/console
EOF
chmod 755 /usr/local/sbin/luna-root-probe
cat > /etc/systemd/system/luna-root-probe.service <<'EOF'
[Unit]
Description=Print what the root takes (luna test)
After=luna-booted.service

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/luna-root-probe

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/luna-root-probe.service /etc/systemd/system/multi-user.target.wants/luna-root-probe.service
"#;

fn mac(i: u32) -> String {
    format!("52:54:00:4c:d3:{i:02x}")
}

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

fn kib(line: &str, key: &str) -> u64 {
    value(line, key).parse().unwrap_or(0)
}

fn fail(c: &Cluster, vm: &Vm, node: &str, what: &str) -> ! {
    let status = c.api("GET", &format!("/api/v1/node/{node}"), None).map(|n| n["status"].clone());
    let log = c.server_log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{node}: {what}\nstatus: {status:?}\n--- console (last 60 lines)\n{}\n--- luna-server (last 40 lines)\n{}",
        vm.serial().tail(60),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

fn reports(c: &Cluster, node: &str) -> Vec<String> {
    let needle = format!("node={node} ");
    c.server_log().lines().filter(|l| l.contains("node status") && l.contains(&needle)).map(String::from).collect()
}

/// Boots `node` to `multi-user.target`; returns (power-on to `installed`, the probe's line).
fn boot(c: &Cluster, node: &str, i: u32) -> (Duration, String) {
    let power_on = Instant::now();
    let vm = c.boot(&format!("modes-{node}"), &mac(i)).unwrap();
    let mut installed = None;
    let mut last = String::new();
    loop {
        let n = c.api("GET", &format!("/api/v1/node/{node}"), None).unwrap();
        let s = n["status"]["step"].as_str().unwrap_or("").to_string();
        if s == "error" {
            fail(c, &vm, node, &format!("the agent failed: {}", n["status"]));
        }
        if s != last {
            println!("debian_modes: {node} {s} after {:?}", power_on.elapsed());
            last = s.clone();
        }
        if installed.is_none() && (s == "installed" || s == "booted") {
            installed = Some(power_on.elapsed());
        }
        if installed.is_some() && reached_multi_user(&vm) {
            break;
        }
        if power_on.elapsed() > BOOT_TIMEOUT {
            fail(c, &vm, node, "no multi-user.target");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let line = vm
        .wait_for(PROBE, Duration::from_secs(300))
        .unwrap_or_else(|e| fail(c, &vm, node, &format!("no {PROBE} line: {e}")));
    let booted = vm
        .wait_for(BOOTED_MARKER, Duration::from_secs(60))
        .unwrap_or_else(|e| fail(c, &vm, node, &format!("no {BOOTED_MARKER}: {e}")));
    assert!(booted.contains(&format!("host={node}")) && booted.contains("report=ok"), "{booted}");
    println!("debian_modes: {node}: {line}");
    (installed.unwrap_or_default(), line)
}

#[test]
#[ignore = "downloads from the Debian mirror and boots two VMs for many minutes: run with --ignored and LUNA_TEST_PRIVILEGED=1"]
fn debian_root_in_ram_tmpfs_vs_overlay() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let root = debian_tree(DebianFlavour::Minbase).expect("the Debian tree");
    // The unpacked tree (about 500 MB) lives in the tmpfs node's RAM; the overlay node gets the
    // same VM.
    let opts = ClusterOptions { subnet: SUBNET.into(), vm_memory_mb: 2560, ..ClusterOptions::default() };
    let c = Cluster::start(opts).expect("start luna-server in a namespace");
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.add_osimage(IMAGE, &root, DEBIAN_KERNEL_OPTS).unwrap();
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
    let packing = Instant::now();
    let rev = c.pack(IMAGE, Duration::from_secs(2400)).expect("pack the Debian image");
    println!("debian_modes: packed revision {rev} in {:?}", packing.elapsed());
    let deadline = Instant::now() + Duration::from_secs(900);
    let listed: Value = loop {
        let listed = c.current_revision(IMAGE).unwrap();
        if listed["seeder"]["healthy"] == true && listed["squashfs_seeder"]["healthy"] == true {
            break listed;
        }
        assert!(Instant::now() < deadline, "the seeder never served both torrents of revision {rev}: {listed}");
        std::thread::sleep(Duration::from_secs(1));
    };
    println!(
        "debian_modes: archive {} bytes, squashfs {} bytes",
        listed["archive_size"],
        listed["squashfs"]["size"].as_u64().unwrap_or(0)
    );

    let (t_tmpfs, tmpfs) = boot(&c, "node001", 1);
    assert_eq!(value(&tmpfs, "fs"), "tmpfs", "{tmpfs}");
    let (t_overlay, ovl) = boot(&c, "node002", 2);
    assert_eq!(value(&ovl, "fs"), "overlay", "{ovl}");
    assert_eq!(value(&ovl, "lowerfs"), "squashfs", "{ovl}");
    for node in ["node001", "node002"] {
        let steps = reports(&c, node);
        assert!(!steps.iter().any(|l| l.contains("step=error")), "{node}: {steps:?}");
        let unpack = steps.iter().find(|l| l.contains("step=unpack")).cloned().unwrap_or_default();
        println!("debian_modes: {node}: {unpack}");
    }

    let (ram_tmpfs, ram_overlay) = (kib(&tmpfs, "root_kib"), kib(&ovl, "root_kib"));
    assert!(ram_tmpfs > 0 && ram_overlay > 0, "{tmpfs}\n{ovl}");
    let pct = ram_overlay as f64 * 100.0 / ram_tmpfs as f64;
    println!(
        "debian_modes: root RAM after boot: tmpfs {ram_tmpfs} KiB, overlay {ram_overlay} KiB ({pct:.0} % of tmpfs; \
         squashfs {} KiB + upper {} KiB); RAM in use (MemTotal - MemAvailable): tmpfs {} KiB, overlay {} KiB; \
         power-on to installed: tmpfs {:.0} s, overlay {:.0} s; total {:?}",
        kib(&ovl, "image_kib"),
        kib(&ovl, "upper_kib"),
        kib(&tmpfs, "used_kib"),
        kib(&ovl, "used_kib"),
        t_tmpfs.as_secs_f64(),
        t_overlay.as_secs_f64(),
        t0.elapsed()
    );
    assert!(pct <= 50.0, "overlay takes {pct:.0} % of the tmpfs root's RAM (target ≤ 50 %)");
}
