//! `root = disk` with a real Debian, BIOS (SeaBIOS) and UEFI (OVMF): two VMs with blank qcow2
//! disks PXE-boot from a luna cluster whose osimage has `root = disk`; the agent partitions
//! each disk with the default part-script (GPT: BIOS boot, ESP, ext4 root), streams the image
//! onto it, writes fstab and installs grub from the image (both targets), reports `installed`
//! (the server sets `localboot`) and switches root into the disk: systemd reaches
//! `multi-user.target`. Then the image is taken away (its files moved out of the server's data
//! directory, the server restarted without seeding) and both VMs are started again on their
//! disks: iPXE gets the local-boot script, the firmware boots grub from the disk, and Debian
//! reaches `multi-user.target` without a network image (no token on its command line: the
//! boot-time hook reports nothing). Last, `luna node reinstall` clears `localboot` (its power
//! steps fail: the group has no BMC setup) and the node's boot script is the install again.
//!
//! The image is `scripts/build-debian-image.sh` with `LUNA_DEBIAN_DISK=1` (grub-pc-bin,
//! grub-efi-amd64-bin, grub2-common, its initramfs kept). Slow (a debootstrap the first time,
//! a pack of a 600 MB tree, two installs and two boots in TCG) and needs the Debian mirror, so
//! it is `#[ignore]`d like `debootstrap_vm`: run it with `--ignored` and
//! `LUNA_TEST_PRIVILEGED=1`. It prints the time from power-on to `installed` per firmware.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use luna_tests::{
    debian_tree, privileged, reached_multi_user, work_dir, Cluster, ClusterOptions, DebianFlavour, Firmware, Vm,
    BOOTED_MARKER, DEBIAN_KERNEL_OPTS as KERNEL_OPTS,
};
use serde_json::Value;

const SUBNET: &str = "10.77.21";
const IMAGE: &str = "debdisk";
const INSTALL_TIMEOUT: Duration = Duration::from_secs(2700);
const DISK_BOOT_TIMEOUT: Duration = Duration::from_secs(900);

struct Node {
    name: &'static str,
    mac: &'static str,
    firmware: Firmware,
    disk: PathBuf,
}

/// A VM on `n`'s disk; the NIC boots first, the disk is next (UEFI's `exit` goes there).
fn vm(c: &Cluster, n: &Node, run: &str) -> Vm {
    let builder = Vm::builder(&format!("{}-{run}", n.name))
        .firmware(n.firmware)
        .arg("-drive")
        .arg(format!("if=none,id=disk0,format=qcow2,file={}", n.disk.display()))
        .arg("-device")
        .arg("virtio-blk-pci,drive=disk0,bootindex=2");
    c.boot_vm(builder, n.mac).expect("start the vm")
}

fn fail(c: &Cluster, vm: &Vm, node: &str, what: &str) -> ! {
    let status = c.api("GET", &format!("/api/v1/node/{node}"), None).map(|n| n["status"].clone());
    let log = c.server_log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{node}: {what}\nstatus: {status:?}\n--- console (last 80 lines)\n{}\n--- luna-server (last 40 lines)\n{}",
        vm.serial().tail(80),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

fn step(c: &Cluster, node: &str) -> (String, Value) {
    let n = c.api("GET", &format!("/api/v1/node/{node}"), None).unwrap();
    (n["status"]["step"].as_str().unwrap_or("").to_string(), n)
}

fn qemu_img(disk: &Path) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg("6G")
        .output()
        .expect("run qemu-img (qemu-utils)");
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
#[ignore = "downloads from the Debian mirror and boots for many minutes: run with --ignored and LUNA_TEST_PRIVILEGED=1"]
fn debian_installs_to_disk_and_boots_from_it_bios_and_uefi() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let root = debian_tree(DebianFlavour::Disk).expect("the Debian tree with grub");
    println!("disk_vm: tree {} ready after {:?}", root.display(), t0.elapsed());

    // RAM: the image is not unpacked into RAM in disk mode; the initramfs and the download
    // window are all the install needs.
    let opts = ClusterOptions { subnet: SUBNET.into(), vm_memory_mb: 1024, ..ClusterOptions::default() };
    let mut c = Cluster::start(opts).expect("start luna-server in a namespace");
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.add_osimage(IMAGE, &root, KERNEL_OPTS).unwrap();
    c.cli(&["osimage", "change", IMAGE, "--root", "disk"]).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov"]).unwrap();
    let disks = tempfile::Builder::new().prefix("disks-").tempdir_in(work_dir()).unwrap();
    let nodes = [
        Node {
            name: "node001",
            mac: "52:54:00:4c:d1:01",
            firmware: Firmware::Bios,
            disk: disks.path().join("node001.qcow2"),
        },
        Node {
            name: "node002",
            mac: "52:54:00:4c:d1:02",
            firmware: Firmware::Uefi,
            disk: disks.path().join("node002.qcow2"),
        },
    ];
    for n in &nodes {
        c.cli(&["node", "add", n.name, "--group", "compute"]).unwrap();
        c.cli(&["node", "change", n.name, "--mac", n.mac]).unwrap();
        qemu_img(&n.disk);
    }
    let packing = Instant::now();
    let rev = c.pack(IMAGE, Duration::from_secs(2400)).expect("pack the Debian image");
    println!("disk_vm: packed revision {rev} in {:?}", packing.elapsed());
    let deadline = Instant::now() + Duration::from_secs(900);
    while c.current_revision(IMAGE).unwrap()["seeder"]["healthy"] != true {
        assert!(Instant::now() < deadline, "the seeder never served revision {rev}");
        std::thread::sleep(Duration::from_secs(1));
    }

    // 1. Install: both at once (one swarm), each to multi-user.target after the switch-root.
    let power_on = Instant::now();
    let vms: Vec<Vm> = nodes.iter().map(|n| vm(&c, n, "install")).collect();
    let mut installed_after: Vec<Option<Duration>> = vec![None; nodes.len()];
    let mut last: Vec<String> = vec![String::new(); nodes.len()];
    loop {
        let mut all = true;
        for (i, (n, vm)) in nodes.iter().zip(&vms).enumerate() {
            let (s, node) = step(&c, n.name);
            if s == "error" {
                fail(&c, vm, n.name, &format!("the agent failed: {}", node["status"]));
            }
            if s != last[i] {
                println!("disk_vm: {} ({:?}) {s} after {:?}", n.name, n.firmware, power_on.elapsed());
                last[i] = s.clone();
            }
            if installed_after[i].is_none() && (s == "installed" || s == "booted") {
                installed_after[i] = Some(power_on.elapsed());
            }
            all &= reached_multi_user(vm) && vm.serial().lines().iter().any(|l| l.contains(BOOTED_MARKER));
        }
        if all {
            break;
        }
        if power_on.elapsed() > INSTALL_TIMEOUT {
            let i = (0..nodes.len()).find(|&i| !reached_multi_user(&vms[i])).unwrap_or(0);
            fail(&c, &vms[i], nodes[i].name, "no multi-user.target after the install");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    for (i, (n, vm)) in nodes.iter().zip(&vms).enumerate() {
        let node = c.node(n.name).unwrap();
        assert_eq!(node["localboot"], true, "installed on disk sets localboot: {node}");
        let line = vm.wait_for(BOOTED_MARKER, Duration::from_secs(1)).unwrap();
        assert!(line.contains("report=ok"), "the first boot (switch-root) reports booted: {line}");
        let reports: Vec<String> = c
            .server_log()
            .lines()
            .filter(|l| l.contains("node status") && l.contains(&format!("node={} ", n.name)))
            .map(String::from)
            .collect();
        let installed = reports.iter().find(|l| l.contains("step=installed")).cloned().unwrap_or_default();
        assert!(installed.contains("installed on disk (boot loader on /dev/vda)"), "{reports:?}");
        assert!(
            reports.iter().any(|l| l.contains("step=partscript") && l.contains("root on disk /dev/vda")),
            "{reports:?}"
        );
        println!("disk_vm: {} ({:?}): power-on to installed {:?}; {installed}", n.name, n.firmware, installed_after[i]);
    }
    drop(vms);

    // 2. No network image any more: the files are moved away and the seeder is off.
    let images = c.dir().join("data/images");
    std::fs::rename(images.join(IMAGE), images.join(format!("{IMAGE}.away"))).expect("move the image away");
    c.restart(false).unwrap();
    let power_on = Instant::now();
    let vms: Vec<Vm> = nodes.iter().map(|n| vm(&c, n, "disk")).collect();
    loop {
        if vms.iter().all(reached_multi_user) {
            break;
        }
        if power_on.elapsed() > DISK_BOOT_TIMEOUT {
            let i = (0..nodes.len()).find(|&i| !reached_multi_user(&vms[i])).unwrap_or(0);
            fail(&c, &vms[i], nodes[i].name, "no multi-user.target when booting from the disk");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    println!("disk_vm: both booted from their disks to multi-user.target in {:?}", power_on.elapsed());
    for (n, vm) in nodes.iter().zip(&vms) {
        let console = vm.serial().lines().join("\n");
        assert!(
            console.contains(&format!("luna: {}: booting from the local disk", n.name)),
            "{}",
            vm.serial().tail(80)
        );
        assert!(!console.contains("loading kernel and initramfs"), "{}", vm.serial().tail(80));
        let line = vm
            .wait_for(BOOTED_MARKER, Duration::from_secs(120))
            .unwrap_or_else(|e| fail(&c, vm, n.name, &format!("no {BOOTED_MARKER} on the disk boot: {e}")));
        // The disk's command line is grub's: no luna token, nothing to report with.
        assert!(line.contains(&format!("host={}", n.name)) && line.contains("report=none"), "{line}");
    }
    drop(vms);

    // 3. luna node reinstall: localboot off first (the power steps then fail: no BMC setup).
    let out =
        c.ns.command(luna_tests::cargo_bin("luna").unwrap())
            .args(["node", "reinstall", "node[001-002]"])
            .env("LUNA_SERVER", c.api_url())
            .env("LUNA_CA", c.ca())
            .env("LUNA_TOKEN_FILE", c.dir().join("token"))
            .env_remove("LUNA_TOKEN")
            .output()
            .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("bmc"), "reinstall without a BMC: {text}");
    for n in &nodes {
        let node = c.node(n.name).unwrap();
        // `localboot: false` is left out of the node's JSON
        assert!(!node["localboot"].as_bool().unwrap_or(false), "reinstall cleared localboot: {node}");
        let script = c.cli(&["node", "show", n.name, "--script", "boot"]).unwrap();
        assert!(script.contains("root=luna") && !script.contains("sanboot"), "{script}");
    }
    println!("disk_vm: total {:?}", t0.elapsed());
}
