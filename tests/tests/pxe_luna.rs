//! A VM network-boots from luna-server alone: its DHCP, TFTP and HTTP/iPXE answer every step.
//! Objects are made with the real `luna` CLI; the node's kernel and initrd are a published
//! osimage revision. Needs root and qemu (`LUNA_TEST_PRIVILEGED=1`).

use std::process::Command;
use std::time::{Duration, Instant};

use luna_tests::{
    cargo_bin, next_mac, privileged, test_assets, ChildGuard, Firmware, Netns, RouterAdverts, Vm, DHCP_MARKER, MARKER,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const SERVER_IP: &str = "10.77.0.1";

struct Luna {
    ns: Netns,
    server: ChildGuard,
    dir: tempfile::TempDir,
}

impl Luna {
    fn start(discovery: bool) -> Luna {
        // a fresh checkout has no work dir yet
        std::fs::create_dir_all(luna_tests::work_dir()).unwrap();
        let dir = tempfile::Builder::new().prefix("pxe-luna-").tempdir_in(luna_tests::work_dir()).unwrap();
        let ns = Netns::new().unwrap();
        ns.add_bridge("br0").unwrap();
        ns.add_addr("br0", &format!("{SERVER_IP}/24")).unwrap();
        let d = dir.path();
        let config = format!(
            "store = \"sqlite://{db}\"\nlisten = \"{SERVER_IP}:7050\"\ntoken_file = \"{token}\"\ndata_dir = \"{data}\"\n\
             [http]\napi_listen = \"{SERVER_IP}:7051\"\ntls_names = [\"{SERVER_IP}\"]\n\
             [dhcp]\ninterfaces = [\"br0\"]\n[tftp]\nroot = \"{tftp}\"\nbind = \"{SERVER_IP}:69\"\n",
            db = d.join("luna.db").display(),
            token = d.join("token").display(),
            data = d.join("data").display(),
            tftp = d.join("tftpboot").display(),
        );
        std::fs::write(d.join("luna.toml"), config).unwrap();
        let server_bin = cargo_bin("luna-server").unwrap();
        let status = Command::new(&server_bin).arg("--config").arg(d.join("luna.toml")).arg("init").status().unwrap();
        assert!(status.success(), "luna-server init");
        let server = ns
            .spawn("luna-server", server_bin.to_str().unwrap(), &["--config", d.join("luna.toml").to_str().unwrap()])
            .unwrap();
        server.wait_for("http listening", Duration::from_secs(60)).unwrap();
        let luna = Luna { ns, server, dir };
        luna.cli(&["cluster", "change", "--frontend-address", SERVER_IP, "--dhcp-interfaces", "br0"]);
        if discovery {
            luna.cli(&["cluster", "change", "--dhcp-range", "10.77.0.200-10.77.0.220"]);
        }
        luna.cli(&["network", "add", "prov", "--cidr", "10.77.0.0/24", "--gateway", SERVER_IP]);
        luna.cli(&[
            "osimage",
            "add",
            "tiny",
            "--path",
            "/srv/tiny",
            "--kernel-opts",
            "console=ttyS0 panic=-1 luna.dhcp=1",
        ]);
        luna.cli(&["group", "add", "compute", "--osimage", "tiny", "--network", "prov"]);
        luna.publish_test_revision();
        luna
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self
            .ns
            .command(cargo_bin("luna").unwrap())
            .args(args)
            .env("LUNA_SERVER", format!("https://{SERVER_IP}:7051"))
            .env("LUNA_CA", self.dir.path().join("data/tls/ca.pem"))
            .env("LUNA_TOKEN_FILE", self.dir.path().join("token"))
            .env_remove("LUNA_TOKEN")
            .output()
            .unwrap();
        assert!(out.status.success(), "luna {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What `luna osimage pack` leaves behind: the revision's files and its record.
    fn publish_test_revision(&self) {
        let assets = test_assets().unwrap();
        let rev = self.dir.path().join("data/images/tiny/1");
        std::fs::create_dir_all(&rev).unwrap();
        std::fs::copy(&assets.kernel, rev.join("vmlinuz")).unwrap();
        std::fs::copy(&assets.initrd, rev.join("initrd.img")).unwrap();
        let patch = serde_json::json!({"revisions": [{"id": 1, "created": 1, "kernel_version": assets.kver,
            "archive": "tiny.tar.zst", "archive_size": 0, "sha256": "", "kernel": "vmlinuz", "initrd": "initrd.img",
            "torrent": "tiny.torrent", "info_hash": ""}], "current_revision": 1});
        let token = std::fs::read_to_string(self.dir.path().join("token")).unwrap();
        let out = self
            .ns
            .command("curl")
            .args(["-sf", "-X", "PATCH", "-H", &format!("Authorization: Bearer {}", token.trim())])
            .arg("--cacert")
            .arg(self.dir.path().join("data/tls/ca.pem"))
            .args(["-H", "Content-Type: application/json", "--data", &patch.to_string()])
            .arg(format!("https://{SERVER_IP}:7051/api/v1/osimage/tiny"))
            .output()
            .unwrap();
        assert!(out.status.success(), "publish revision: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn node(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli(&["node", "show", name, "--json"])).unwrap()
    }
}

fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn boot_vm(luna: &Luna, name: &str, mac: &str) -> Vm {
    boot_vm_with(luna, name, mac, Firmware::Bios)
}

/// A VM on the bridge; UEFI ones get no iPXE option ROM, so OVMF's own PXE client starts the
/// chain (architecture 7 → ipxe.efi over luna's TFTP → iPXE → HTTP script).
fn boot_vm_with(luna: &Luna, name: &str, mac: &str, firmware: Firmware) -> Vm {
    let tap = format!("tap{}", &mac[mac.len() - 2..]);
    luna.ns.add_tap(&tap, Some("br0")).unwrap();
    let builder = Vm::builder(name).nic(&tap, mac);
    let builder = match firmware {
        Firmware::Bios => builder,
        Firmware::Uefi => builder.uefi().without_nic_rom(),
    };
    builder.spawn_in(&luna.ns).unwrap()
}

fn assert_boots_as(vm: &Vm, node: &str, ip: &str) {
    // The kernel prints its command line: the one the node's iPXE script gave it.
    vm.wait_for(&format!("luna.node={node}"), BOOT_TIMEOUT).unwrap();
    // The initramfs' own DHCP client gets the node's one address again.
    let lease = vm.wait_for(DHCP_MARKER, BOOT_TIMEOUT).unwrap();
    assert_eq!(value(&lease, "ip"), Some(ip), "{lease}");
    vm.wait_for(MARKER, BOOT_TIMEOUT).unwrap();
}

#[test]
fn known_node_pxe_boots_from_luna_server_alone() {
    if !privileged() {
        return;
    }
    let luna = Luna::start(false);
    let _ra = RouterAdverts::start(&luna.ns, "br0", "fd77::").unwrap();
    let mac = next_mac();
    luna.cli(&["node", "add", "node001", "--group", "compute", "--mac", &mac]);
    let started = Instant::now();
    let mut vm = boot_vm(&luna, "pxe-known", &mac);
    assert_boots_as(&vm, "node001", "10.77.0.2");
    println!("known node: marker after {:?}", started.elapsed());
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "qemu: {status}");

    let node = luna.node("node001");
    // The last thing the node did: the initramfs' DHCP, acked with its one address.
    assert_eq!(node["status"]["message"], "dhcp acked 10.77.0.2", "{node}");
    let log = luna.server.output();
    assert!(log.contains("http listening"));
    drop(luna);
}

#[test]
fn known_node_uefi_pxe_boots_from_luna_server_alone() {
    if !privileged() {
        return;
    }
    let luna = Luna::start(false);
    let _ra = RouterAdverts::start(&luna.ns, "br0", "fd77::").unwrap();
    let mac = next_mac();
    luna.cli(&["node", "add", "node002", "--group", "compute", "--mac", &mac]);
    let started = Instant::now();
    let mut vm = boot_vm_with(&luna, "pxe-uefi-known", &mac, Firmware::Uefi);
    assert_boots_as(&vm, "node002", "10.77.0.2");
    println!("uefi known node: marker after {:?}", started.elapsed());
    let status = vm.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(status.success(), "qemu: {status}");

    // The firmware's PXE client got iPXE for EFI over luna's TFTP, not from an option ROM.
    let log = luna.server.output();
    let sent = log.lines().iter().any(|l| l.contains("tftp: sent") && l.contains("ipxe.efi"));
    assert!(sent, "ipxe.efi was not sent over tftp:\n{}", log.tail(40));
    assert!(vm.serial().contains("iPXE"), "ipxe.efi did not run");
    let node = luna.node("node002");
    assert_eq!(node["status"]["message"], "dhcp acked 10.77.0.2", "{node}");
}

#[test]
fn unknown_mac_gets_the_menu_then_boots_once_bound() {
    if !privileged() {
        return;
    }
    let luna = Luna::start(true);
    let _ra = RouterAdverts::start(&luna.ns, "br0", "fd77::").unwrap();
    luna.cli(&["node", "add", "node007", "--group", "compute"]);
    let mac = next_mac();
    let vm = boot_vm(&luna, "pxe-unknown", &mac);
    // The discovery menu lists the node that has no MAC yet.
    vm.wait_for("node007", BOOT_TIMEOUT).unwrap();
    vm.wait_for("Ask luna again", BOOT_TIMEOUT).unwrap();
    // An admin binds the MAC; "ask again" (the menu's timeout default) then boots it as node007.
    luna.cli(&["node", "change", "node007", "--mac", &mac]);
    assert_boots_as(&vm, "node007", "10.77.0.2");
    assert_eq!(luna.node("node007")["mac"], mac.as_str());
}
