//! Proves the test bed itself: namespaces, taps, bridges, qemu under TCG, the boot assets and
//! serial console capture. dnsmasq stands in for the server here; luna-server's own boot
//! tests use the same plumbing.

use std::path::Path;
use std::time::{Duration, Instant};

use luna_tests::{
    next_mac, privileged, test_assets, ChildGuard, Firmware, Netns, RouterAdverts, Vm, DHCP_MARKER, MARKER,
};

/// Generous: TCG on a loaded 2-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn direct_kernel_boot_prints_marker() {
    if !privileged() {
        return;
    }
    let assets = test_assets().unwrap();
    let ns = Netns::new().unwrap();
    ns.add_tap("tap0", None).unwrap();
    let started = Instant::now();
    let mut vm = Vm::builder("direct")
        .nic("tap0", &next_mac())
        .direct_kernel(&assets.kernel, &assets.initrd, "console=ttyS0 quiet panic=-1 luna.hostname=smoke-direct")
        .spawn_in(&ns)
        .unwrap();
    let line = vm.wait_for(MARKER, BOOT_TIMEOUT).unwrap();
    assert_eq!(value(&line, "hostname"), Some("smoke-direct"), "{line}");
    // /init powers off and -no-reboot turns that into qemu exiting
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "qemu: {status}");
    println!("direct kernel boot: marker after {:?}", started.elapsed());
}

/// A dnsmasq serving DHCP and TFTP on `dev` in `ns`, handing out `boot.ipxe` from `root`.
fn dnsmasq(ns: &Netns, dev: &str, root: &Path, range: &str) -> ChildGuard {
    let args = [
        "--keep-in-foreground".to_string(),
        "--conf-file=/dev/null".to_string(),
        "--no-resolv".to_string(),
        "--no-hosts".to_string(),
        "--port=0".to_string(),
        format!("--interface={dev}"),
        "--bind-interfaces".to_string(),
        format!("--dhcp-range={range}"),
        "--dhcp-boot=boot.ipxe".to_string(),
        // iPXE option 175.176 "no-pxedhcp": skip the ~11 s wait for ProxyDHCP offers
        "--dhcp-option=encap:175,176,1".to_string(),
        // dnsmasq pings an address before offering it: 3 s per boot
        "--no-ping".to_string(),
        "--enable-tftp".to_string(),
        format!("--tftp-root={}", root.display()),
        format!("--dhcp-leasefile={}", root.join("leases").display()),
        format!("--pid-file={}", root.join("dnsmasq.pid").display()),
        // the tftp root is a private temp dir; nobody could not read it
        "--user=root".to_string(),
        "--log-dhcp".to_string(),
        "--log-facility=-".to_string(),
    ];
    let server = ns.spawn("dnsmasq", "dnsmasq", &args).unwrap();
    server.wait_for("started", Duration::from_secs(20)).unwrap();
    server
}

fn pxe_boot(firmware: Firmware, host: &str) {
    let assets = test_assets().unwrap();
    let ns = Netns::new().unwrap();
    ns.add_bridge("br0").unwrap();
    ns.add_addr("br0", "10.77.0.1/24").unwrap();
    // iPXE waits ~16 s for IPv6 autoconfiguration unless a router answers
    let _ra = RouterAdverts::start(&ns, "br0", "fd77::").unwrap();
    ns.add_tap("tap0", Some("br0")).unwrap();

    let root = tempfile::Builder::new().prefix("tftp-").tempdir_in(luna_tests::work_dir()).unwrap();
    std::fs::copy(&assets.kernel, root.path().join("vmlinuz")).unwrap();
    std::fs::copy(&assets.initrd, root.path().join("initrd.img")).unwrap();
    // initrd= on the command line is what the EFI stub reads; BIOS iPXE ignores it
    let script = format!(
        "#!ipxe\necho luna-test: ipxe got ${{net0/ip}}\n\
         kernel vmlinuz initrd=initrd.img console=ttyS0 quiet panic=-1 luna.hostname={host} luna.dhcp=1\n\
         initrd initrd.img\nboot\n"
    );
    std::fs::write(root.path().join("boot.ipxe"), script).unwrap();
    let server = dnsmasq(&ns, "br0", root.path(), "10.77.0.50,10.77.0.99,255.255.255.0,1h");

    let mac = next_mac();
    let started = Instant::now();
    let mut vm = Vm::builder(host).firmware(firmware).nic("tap0", &mac).spawn_in(&ns).unwrap();
    vm.wait_for("luna-test: ipxe got 10.77.0.", BOOT_TIMEOUT).unwrap();
    let lease = vm.wait_for(DHCP_MARKER, BOOT_TIMEOUT).unwrap();
    let line = vm.wait_for(MARKER, BOOT_TIMEOUT).unwrap();
    let elapsed = started.elapsed();

    assert_eq!(value(&line, "hostname"), Some(host), "{line}");
    // the kernel's own DHCP client got a lease from the same server for the VM's MAC
    assert_eq!(value(&lease, "mac"), Some(mac.as_str()), "{lease}");
    let ip = value(&lease, "ip").unwrap_or_default();
    let last: u8 = ip.strip_prefix("10.77.0.").and_then(|o| o.parse().ok()).unwrap_or(0);
    assert!((50..=99).contains(&last), "lease {lease} outside the range");
    let out = server.output();
    assert!(out.contains("vmlinuz") && out.contains("initrd.img"), "dnsmasq did not serve the files");
    assert!(out.contains(&format!("DHCPACK(br0) {ip} {mac}")), "dnsmasq did not ack {ip} for {mac}");
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "qemu: {status}");
    println!("{firmware:?} PXE boot: marker after {elapsed:?}");
}

#[test]
fn pxe_boot_bios_from_dnsmasq() {
    if !privileged() {
        return;
    }
    pxe_boot(Firmware::Bios, "pxe-bios");
}

#[test]
fn pxe_boot_uefi_from_dnsmasq() {
    if !privileged() {
        return;
    }
    pxe_boot(Firmware::Uefi, "pxe-uefi");
}
