//! cloud-init for real: the Debian minbase tree with the `cloud-init` package and
//! systemd-networkd enabled (`scripts/build-debian-image.sh` with `LUNA_DEBIAN_CLOUDINIT=1`),
//! made an osimage whose group has a second interface `eth1` on a second network. The node
//! PXE-boots, its agent finds cloud-init in the image and writes luna's NoCloud data (fetched
//! with its boot token) as the seed instead of its own personality files; after the switch of
//! root cloud-init renders the network configuration for systemd-networkd and sets the host
//! name. Proof: the host name is the node's (the image says `debian` and the agent wrote none),
//! `eth1` has the node's static address on the second network (known only from luna's
//! `network-config`; nothing else configures that NIC), which answers a ping from the server's
//! side, and `cloud-init status` is `done`, all printed by a probe unit the group's post-script
//! adds. That another node cannot read this node's NoCloud data is tested without a VM
//! (`luna-server/tests/netboot.rs::nocloud_data_goes_only_to_the_node_itself`).
//!
//! Slow (a debootstrap with Python the first time, a pack, a Debian boot with cloud-init in
//! TCG) and needs the Debian mirror: `#[ignore]`d like `debootstrap_vm`; run it with
//! `--ignored` and `LUNA_TEST_PRIVILEGED=1`.

use std::time::{Duration, Instant};

use luna_tests::{
    debian_tree, privileged, reached_multi_user, Cluster, ClusterOptions, DebianFlavour, Vm, BOOTED_MARKER,
    DEBIAN_KERNEL_OPTS,
};

const SUBNET: &str = "10.77.25";
/// The second network: only cloud-init configures the node's interface on it.
const DATA_SUBNET: &str = "10.77.26";
const NODE_DATA_IP: &str = "10.77.26.12";
const IMAGE: &str = "debci";
const NODE: &str = "node001";
const MAC: &str = "52:54:00:4c:d5:01";
const DATA_MAC: &str = "52:54:00:4c:d5:11";
const PROBE: &str = "LUNA-CLOUDINIT-PROBE";
const BOOT_TIMEOUT: Duration = Duration::from_secs(2700);

/// The post-script: a unit that waits for cloud-init to finish (`status --wait`: cloud-final
/// runs after multi-user.target on Debian, so the unit must not be a oneshot multi-user.target
/// waits for) and prints what cloud-init did.
const POSTSCRIPT: &str = r#"cat > /usr/local/sbin/luna-cloudinit-probe <<'EOF'
#!/bin/sh
cloud-init status --wait > /dev/null 2>&1
status=$(cloud-init status 2> /dev/null | awk '/^status:/ { print $2 }')
eth1=$(ip -4 -o addr show dev eth1 2> /dev/null | awk '{ print $4 }' | head -n 1)
rendered=$(ls /etc/systemd/network 2> /dev/null | tr '\n' ',')
{
    cloud-init status --long 2> /dev/null | sed 's/^/LUNA-CLOUDINIT-LOG status: /'
    grep -E 'WARNING|ERROR|Traceback|[Ff]ailed' /var/log/cloud-init.log 2> /dev/null | tail -n 30 | sed 's/^/LUNA-CLOUDINIT-LOG /'
    echo "LUNA-CLOUDINIT-PROBE host=$(hostname) etc_hostname=$(cat /etc/hostname) status=${status:-none} eth1=${eth1:-none} networkd=${rendered:-none}"
} > /dev/console
EOF
chmod 755 /usr/local/sbin/luna-cloudinit-probe
cat > /etc/systemd/system/luna-cloudinit-probe.service <<'EOF'
[Unit]
Description=Print what cloud-init did (luna test)

[Service]
Type=simple
ExecStart=/usr/local/sbin/luna-cloudinit-probe

[Install]
WantedBy=multi-user.target
EOF
ln -sf /etc/systemd/system/luna-cloudinit-probe.service /etc/systemd/system/multi-user.target.wants/luna-cloudinit-probe.service
"#;

fn value<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('='))).unwrap_or("")
}

fn fail(c: &Cluster, vm: &Vm, what: &str) -> ! {
    let status = c.api("GET", &format!("/api/v1/node/{NODE}"), None).map(|n| n["status"].clone());
    let log = c.server_log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{what}\nstatus: {status:?}\n--- console (last 80 lines)\n{}\n--- luna-server (last 40 lines)\n{}",
        vm.serial().tail(80),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

#[test]
#[ignore = "downloads from the Debian mirror and boots for many minutes: run with --ignored and LUNA_TEST_PRIVILEGED=1"]
fn cloud_init_sets_hostname_and_static_address_from_luna_nocloud() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let root = debian_tree(DebianFlavour::CloudInit).expect("the Debian tree with cloud-init");
    assert!(root.join("usr/bin/cloud-init").exists(), "{} has no cloud-init", root.display());
    let opts = ClusterOptions { subnet: SUBNET.into(), vm_memory_mb: 2560, ..ClusterOptions::default() };
    let c = Cluster::start(opts).expect("start luna-server in a namespace");
    // The data network's bridge on the server's side, to ping the node's address on it.
    c.ns.add_bridge("br1").unwrap();
    c.ns.add_addr("br1", &format!("{DATA_SUBNET}.1/24")).unwrap();
    c.ns.add_tap("tapdata", Some("br1")).unwrap();
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.cli(&["network", "add", "data", "--cidr", &format!("{DATA_SUBNET}.0/24")]).unwrap();
    // net.ifnames=0: the second NIC is eth1, the name the group's interface has.
    c.add_osimage(IMAGE, &root, &format!("{DEBIAN_KERNEL_OPTS} net.ifnames=0")).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov", "--interface", "eth1=data"]).unwrap();
    c.api("PATCH", "/api/v1/group/compute", Some(&serde_json::json!({ "postscript": POSTSCRIPT }))).unwrap();
    c.cli(&["node", "add", NODE, "--group", "compute", "--ip", &format!("eth1={NODE_DATA_IP}")]).unwrap();
    c.cli(&["node", "change", NODE, "--mac", MAC]).unwrap();
    let config = c.cli(&["node", "show", NODE, "--json"]).unwrap();
    assert!(config.contains(NODE_DATA_IP), "{config}");

    let packing = Instant::now();
    let rev = c.pack(IMAGE, Duration::from_secs(2400)).expect("pack the Debian image");
    println!("cloudinit_vm: packed revision {rev} in {:?}", packing.elapsed());
    let deadline = Instant::now() + Duration::from_secs(900);
    while c.current_revision(IMAGE).unwrap()["seeder"]["healthy"] != true {
        assert!(Instant::now() < deadline, "the seeder never served revision {rev}");
        std::thread::sleep(Duration::from_secs(1));
    }

    let power_on = Instant::now();
    // The boot NIC first (Cluster::boot_vm adds it), the data NIC after it: eth0 and eth1.
    let builder = Vm::builder("ci-node001")
        .arg("-netdev")
        .arg("tap,id=data,ifname=tapdata,script=no,downscript=no")
        .arg("-device")
        .arg(format!("virtio-net-pci,netdev=data,mac={DATA_MAC},romfile="));
    let vm = c.boot_vm(builder, MAC).unwrap();
    let mut last = String::new();
    loop {
        let n = c.api("GET", &format!("/api/v1/node/{NODE}"), None).unwrap();
        let s = n["status"]["step"].as_str().unwrap_or("").to_string();
        if s == "error" {
            fail(&c, &vm, &format!("the agent failed: {}", n["status"]));
        }
        if s != last {
            println!("cloudinit_vm: {NODE} {s} after {:?}", power_on.elapsed());
            last = s;
        }
        // The probe waits for cloud-init's last stage, which Debian orders after
        // multi-user.target; systemd's status line for that target may come later or (once a
        // getty owns the console) not at all.
        if reached_multi_user(&vm) || vm.serial().lines().iter().any(|l| l.contains(PROBE)) {
            break;
        }
        if power_on.elapsed() > BOOT_TIMEOUT {
            fail(&c, &vm, "no multi-user.target");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("cloudinit_vm: multi-user.target or the probe {:?} after power-on", power_on.elapsed());
    let line = vm
        .wait_for(PROBE, Duration::from_secs(900))
        .unwrap_or_else(|e| fail(&c, &vm, &format!("no {PROBE} line: {e}")));
    println!("cloudinit_vm: {line} ({:?} after power-on)", power_on.elapsed());

    let reports: Vec<String> = c
        .server_log()
        .lines()
        .filter(|l| l.contains("node status") && l.contains(&format!("node={NODE} ")))
        .map(String::from)
        .collect();
    let check = |ok: bool, what: &str| {
        if !ok {
            fail(&c, &vm, &format!("{what}: {line}"));
        }
    };
    check(
        reports.iter().any(|l| l.contains("step=personality") && l.contains("cloud-init seed in")),
        &format!("the agent wrote no NoCloud seed (its personality files instead?): {reports:?}"),
    );
    check(value(&line, "host") == NODE && value(&line, "etc_hostname") == NODE, "cloud-init set no host name");
    check(value(&line, "eth1") == format!("{NODE_DATA_IP}/24"), "cloud-init set no static address on eth1");
    check(value(&line, "networkd").contains("cloud-init"), "cloud-init rendered nothing for systemd-networkd");
    check(value(&line, "status") == "done", "cloud-init did not finish cleanly");
    let ping = c.ns.command("ping").args(["-c", "3", "-W", "2", NODE_DATA_IP]).output().unwrap();
    check(
        ping.status.success(),
        &format!("{NODE_DATA_IP} on the data network does not answer: {}", String::from_utf8_lossy(&ping.stdout)),
    );
    let booted = vm
        .wait_for(BOOTED_MARKER, Duration::from_secs(60))
        .unwrap_or_else(|e| fail(&c, &vm, &format!("no {BOOTED_MARKER}: {e}")));
    assert!(booted.contains("report=ok"), "{booted}");
    println!("cloudinit_vm: total {:?}", t0.elapsed());
}
