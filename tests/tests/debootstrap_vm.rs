//! A real Debian through the whole product path: `debootstrap --variant=minbase` bookworm with
//! systemd and the distribution kernel (built by `scripts/build-debian-image.sh` from the
//! machine's apt mirror, as the demo does), made an osimage of a luna cluster (luna-server on
//! the embedded store in a namespace, objects made with the `luna` CLI), packed by luna-server
//! (archive, torrent, the image kernel's initramfs by dracut with 95luna), seeded; then a VM
//! PXE-boots from luna-server (DHCP, TFTP, iPXE), its agent downloads the image from the swarm
//! (HTTP if the swarm stalls) and switches root, systemd reaches `multi-user.target` on the
//! serial console, and the image's `luna-booted.service` reports `booted` to luna-server.
//!
//! Slow (a debootstrap download the first time, then a pack of a 500 MB tree and many minutes
//! of TCG boot) and needs the network to the Debian mirror, so it is `#[ignore]`d (shown as
//! ignored, not run in CI): run it with `--ignored` and `LUNA_TEST_PRIVILEGED=1`. The
//! tree is cached under `<work>/debootstrap/root`. `LUNA_TEST_AGENT` names the agent to put in
//! the initramfs; by default the static `--profile agent` build when there is one (the debug
//! agent decompresses and hashes a real image slowly under TCG).

use std::time::{Duration, Instant};

use luna_tests::{
    debian_tree, privileged, reached_multi_user, Cluster, ClusterOptions, DebianFlavour, Vm, BOOTED_MARKER,
    DEBIAN_KERNEL_OPTS as KERNEL_OPTS, MULTI_USER,
};
use serde_json::Value;

const SUBNET: &str = "10.77.9";
const MAC: &str = "52:54:00:4c:55:d1";
const IMAGE: &str = "debian";
const NODE: &str = "node001";
/// From power-on to multi-user.target: iPXE, the image download and unpack and a systemd boot,
/// all in TCG on a machine others load too.
const BOOT_TIMEOUT: Duration = Duration::from_secs(2700);

/// Fails the test naming `what`, with the node's status, the console tail and the server's.
fn fail(c: &Cluster, vm: &Vm, what: &str) -> ! {
    let status = c.api("GET", &format!("/api/v1/node/{NODE}"), None).map(|n| n["status"].clone());
    let log = c.server_log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{what}\nstatus of {NODE}: {status:?}\n--- console (last 60 lines)\n{}\n--- luna-server (last 40 lines)\n{}",
        vm.serial().tail(60),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

fn step(node: &Value) -> &str {
    node["status"]["step"].as_str().unwrap_or("")
}

/// The server-logged status reports of [`NODE`] (`node status` lines), in order.
fn reports(c: &Cluster) -> Vec<String> {
    let needle = format!("node={NODE} ");
    c.server_log().lines().filter(|l| l.contains("node status") && l.contains(&needle)).map(String::from).collect()
}

#[test]
#[ignore = "downloads from the Debian mirror and boots for minutes: run with --ignored and LUNA_TEST_PRIVILEGED=1"]
fn debian_minbase_pxe_boots_from_luna_to_multi_user() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let root = debian_tree(DebianFlavour::Minbase).expect("the Debian tree");
    println!("debootstrap: tree {} ready after {:?}", root.display(), t0.elapsed());

    let opts = ClusterOptions {
        subnet: SUBNET.into(),
        // the unpacked tree (about 500 MB) lives in the node's RAM
        vm_memory_mb: 2560,
        ..ClusterOptions::default()
    };
    let c = Cluster::start(opts).expect("start luna-server in a namespace");
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.add_osimage(IMAGE, &root, KERNEL_OPTS).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov"]).unwrap();
    c.cli(&["node", "add", NODE, "--group", "compute"]).unwrap();
    c.cli(&["node", "change", NODE, "--mac", MAC]).unwrap();

    let packing = Instant::now();
    let rev = c.pack(IMAGE, Duration::from_secs(2400)).expect("pack the Debian image");
    let listed = c.current_revision(IMAGE).unwrap();
    println!(
        "debootstrap: packed revision {rev} in {:?}: {} bytes of archive",
        packing.elapsed(),
        listed["archive_size"]
    );
    // The server seeds the new revision once librqbit has checked it.
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let listed = c.current_revision(IMAGE).unwrap();
        if listed["seeder"]["healthy"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "the seeder never served revision {rev}: {listed}");
        std::thread::sleep(Duration::from_secs(1));
    }

    let booting = Instant::now();
    let vm = c.boot("deb-node001", MAC).unwrap();
    let deadline = booting + BOOT_TIMEOUT;
    let mut last = String::new();
    loop {
        if reached_multi_user(&vm) {
            break;
        }
        let n = c.api("GET", &format!("/api/v1/node/{NODE}"), None).unwrap();
        if step(&n) == "error" {
            fail(&c, &vm, &format!("the agent failed: {}", n["status"]));
        }
        if step(&n) != last {
            last = step(&n).to_string();
            println!("debootstrap: {NODE} {last} after {:?}", booting.elapsed());
        }
        if Instant::now() > deadline {
            fail(
                &c,
                &vm,
                &format!("no \"Reached target ... {MULTI_USER}\" on the console within {BOOT_TIMEOUT:?} of power-on"),
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("debootstrap: multi-user.target {:?} after power-on", booting.elapsed());

    // luna-booted.service in the image reported to luna-server from the booted system.
    let line = vm
        .wait_for(BOOTED_MARKER, Duration::from_secs(300))
        .unwrap_or_else(|e| fail(&c, &vm, &format!("luna-booted.service printed no {BOOTED_MARKER}: {e}")));
    assert!(line.contains(&format!("host={NODE}")), "the agent set the hostname: {line}");
    assert!(line.contains("report=ok"), "the booted image reached luna-server: {line}");
    let node = c.node(NODE).unwrap();
    assert_eq!(step(&node), "booted", "{node}");
    assert_eq!(node["status"]["message"], format!("{NODE} is up at {SUBNET}.2").as_str(), "{node}");
    let steps = reports(&c);
    for s in ["plan", "download", "verify", "unpack", "personality", "installed", "booted"] {
        assert!(steps.iter().any(|l| l.contains(&format!("step={s} "))), "no {s} report: {steps:?}");
    }
    assert!(!steps.iter().any(|l| l.contains("step=error")), "{steps:?}");
    if let Some(unpack) = steps.iter().find(|l| l.contains("step=unpack")) {
        println!("debootstrap: {unpack}");
    }
    println!("{}", c.cli(&["node", "list"]).unwrap());
    println!("debootstrap: total {:?} (boot {:?})", t0.elapsed(), booting.elapsed());
    drop(vm);
}
