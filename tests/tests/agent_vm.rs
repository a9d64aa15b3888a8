//! The node side in an initramfs: dracut builds one with the 95luna module for the test kernel;
//! `lsinitrd` shows the agent, the hooks and the network pieces they rely on; and a VM boots it
//! against a plan server in a network namespace, installs the test image and switches root
//! into it. The VM has a BMC (qemu's `ipmi-bmc-extern` on a KCS interface, backed by OpenIPMI's
//! `ipmi_sim`), which the agent sets up in-band (`setupbmc`); the test then logs in to that BMC
//! over its LAN interface with the new user and password and reads the settings back. Needs
//! root, dracut, qemu, ipmi_sim and ipmitool (`LUNA_TEST_PRIVILEGED=1`).

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_core::api::{InstallPlan, PlanBmc, PlanImage, PlanInterface, StatusReport};
use luna_core::model::{BmcProtocol, Secret};
use luna_tests::{agent_bin, privileged, test_assets, work_dir, ChildGuard, Netns, Vm, BOOTED_MARKER};

/// Which init the initramfs runs: dracut's shell script, or systemd with dracut's units.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Init {
    Dracut,
    Systemd,
}

/// Builds an initramfs with 95luna and the test agent for the test kernel in the work directory
/// `work`; returns that directory and the image.
fn initramfs(work: &str, init: Init) -> (PathBuf, PathBuf) {
    let dir = work_dir().join(work);
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("luna-initrd.img");
    build_initramfs(&agent_bin().expect("luna-agent binary"), &img, init);
    (dir, img)
}

fn build_initramfs(agent: &Path, out: &Path, init: Init) {
    let assets = test_assets().expect("boot assets (tests/assets/build-test-image.sh)");
    let base = luna_tests::private_dracut_base(out.parent().expect("initramfs path has a directory"))
        .expect("private dracut base");
    let modules = assets.modules_dir();
    let status = Command::new("depmod").arg("-b").arg(&assets.kroot).arg(&assets.kver).status().expect("run depmod");
    assert!(status.success(), "depmod -b {} {}", assets.kroot.display(), assets.kver);
    let output = Command::new("dracut")
        .env("dracutbasedir", &base)
        .env("LUNA_AGENT_BIN", agent)
        .args(["--force", "--no-hostonly", "--kver", &assets.kver, "--kmoddir"])
        .arg(&modules)
        // Without the generic module sets the image builds in a fraction of the time.
        .args(["--omit", "plymouth i18n kernel-modules kernel-modules-extra qemu qemu-net systemd-networkd"])
        .args(match init {
            Init::Dracut => ["--omit", "systemd systemd-initrd dracut-systemd"],
            Init::Systemd => ["--add", "systemd systemd-initrd dracut-systemd"],
        })
        .args(["--add", "luna network-legacy base", "--add-drivers", "virtio_net virtio_pci e1000 af_packet"])
        // Unstripped, so the agent in the image is byte for byte the one built.
        .args(["--compress", "gzip -1", "--nostrip"])
        .arg(out)
        .output()
        .expect("run dracut (apt-get install dracut-core dracut-network isc-dhcp-client)");
    assert!(
        output.status.success(),
        "dracut failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn dracut_initramfs_has_the_agent_and_hooks() {
    if !privileged() {
        return;
    }
    let (_, img) = initramfs("agent-initramfs", Init::Dracut);
    let agent = agent_bin().expect("luna-agent binary");

    let out = Command::new("lsinitrd").arg(&img).output().expect("run lsinitrd");
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    for path in [
        "usr/bin/luna-agent",
        "sbin/lunaroot",
        "lib/luna-lib.sh",
        "hooks/cmdline/90-parse-luna.sh",
        "hooks/mount/90-luna-mount.sh",
        "sbin/netroot",
        "sbin/ifup",
        "sbin/dhclient",
        "chroot",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(listing.lines().any(|l| l.contains(path)), "{path} missing from the initramfs:\n{listing}");
    }
    // The agent in the image is the one we built.
    let agent_in = Command::new("lsinitrd").arg("-f").arg("usr/bin/luna-agent").arg(&img).output().unwrap();
    assert_eq!(agent_in.stdout.len() as u64, std::fs::metadata(&agent).unwrap().len());
    // And the hook that claims root=luna is the module's.
    let hook = Command::new("lsinitrd")
        .arg("-f")
        .arg("usr/lib/dracut/hooks/cmdline/90-parse-luna.sh")
        .arg(&img)
        .output()
        .unwrap();
    let hook = String::from_utf8_lossy(&hook.stdout);
    assert!(hook.contains("rootok=1") && hook.contains("netroot=luna"), "{hook}");
}

const MAC: &str = "52:54:00:4c:55:01";
const TOKEN: &str = "vm-token";
const BMC_PASSWORD: &str = "bmc-Pa55word";

/// Plan, image and status over HTTP/1.1 on `addr` until `stop`; records the reports.
fn serve(
    listener: TcpListener,
    plan: Vec<u8>,
    archive: Vec<u8>,
    reports: Arc<Mutex<Vec<StatusReport>>>,
    stop: Arc<AtomicBool>,
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                let _ = handle(conn, &plan, &archive, &reports);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => {}
        }
    }
}

fn handle(mut conn: TcpStream, plan: &[u8], archive: &[u8], reports: &Mutex<Vec<StatusReport>>) -> std::io::Result<()> {
    let luna_tests::StandInRequest { method, path, body } = luna_tests::read_request(&conn)?;
    let authorised = path.contains("node=node001") && path.contains(&format!("token={TOKEN}"));
    let route = path.split('?').next().unwrap_or("").to_string();
    let (status, payload): (&str, &[u8]) = match (method.as_str(), route.as_str()) {
        ("GET", "/boot/plan") if authorised => ("200 OK", plan),
        ("POST", "/boot/status") if authorised => {
            if let Ok(r) = serde_json::from_slice::<StatusReport>(&body) {
                reports.lock().unwrap().push(r);
            }
            ("204 No Content", b"")
        }
        ("GET", "/image.tar.zst") => ("200 OK", archive),
        _ => ("404 Not Found", b"not here"),
    };
    write!(conn, "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", payload.len())?;
    conn.write_all(payload)
}

/// `ipmi_sim`'s `lan_config_program`: keeps the LAN settings the BMC is given in `lan.state`
/// beside it (the simulator applies them through this program on commit).
const LANCONTROL: &str = r#"#!/bin/sh
state="$(dirname "$0")/lan.state"
op=$2
shift 2
touch "$state"
case $op in
get)
    for p in "$@"; do
        v=$(grep "^$p:" "$state" | tail -n 1 | cut -d: -f2-)
        case $p in
            *mac_addr) def=00:00:00:00:00:00 ;;
            ip_addr_src) def=dhcp ;;
            *) def=0.0.0.0 ;;
        esac
        echo "$p:${v:-$def}"
    done ;;
set)
    while [ $# -ge 2 ]; do echo "$1:$2" >> "$state"; shift 2; done ;;
esac
exit 0
"#;

/// The BMC behind the VM: OpenIPMI's simulator with a LAN channel 1 on 127.0.0.1:9001 (inside
/// the test's namespace) and the VM's system interface on 127.0.0.1:9002. Its factory user is
/// 2 "ipmiusr"/"test"; the plan asks for user 3.
struct SimBmc {
    _sim: ChildGuard,
    dir: PathBuf,
}

impl SimBmc {
    fn start(ns: &Netns, dir: &Path) -> SimBmc {
        let dir = dir.join("bmc");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let lancontrol = dir.join("lancontrol");
        std::fs::write(&lancontrol, LANCONTROL).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&lancontrol, std::fs::Permissions::from_mode(0o755)).unwrap();
        let conf = format!(
            "name \"lunabmc\"\nset_working_mc 0x20\n  startlan 1\n    addr 127.0.0.1 9001\n    priv_limit admin\n\
             \x20   allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
             \x20   allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
             \x20   guid a123456789abcdefa123456789abcdef\n    lan_config_program \"{} eth0\"\n  endlan\n\
             \x20 serial 15 127.0.0.1 9002 codec VM\n  startnow false\n\
             \x20 user 1 true \"\" \"test\" user 10 none md2 md5 straight\n\
             \x20 user 2 true \"ipmiusr\" \"test\" admin 10 none md2 md5 straight\n",
            lancontrol.display()
        );
        std::fs::write(dir.join("lan.conf"), conf).unwrap();
        std::fs::write(
            dir.join("bmc.emu"),
            "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
        )
        .unwrap();
        let args = [
            "-c".to_string(),
            dir.join("lan.conf").display().to_string(),
            "-f".into(),
            dir.join("bmc.emu").display().to_string(),
            "-s".into(),
            dir.join("state").display().to_string(),
            "-n".into(),
            "-p".into(),
        ];
        let sim = ns.spawn("ipmi_sim", "ipmi_sim", &args).expect("start ipmi_sim (apt-get install openipmi)");
        let bmc = SimBmc { _sim: sim, dir };
        // Up when its LAN side answers with the factory user.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while bmc.ipmitool(ns, "ipmiusr", "test", &["mc", "info"]).is_err() {
            assert!(std::time::Instant::now() < deadline, "ipmi_sim did not come up");
            std::thread::sleep(Duration::from_millis(300));
        }
        bmc
    }

    /// `ipmitool` over the BMC's LAN (RMCP+), as an administrator.
    fn ipmitool(&self, ns: &Netns, user: &str, password: &str, args: &[&str]) -> Result<String, String> {
        let out = ns
            .command("ipmitool")
            .args(["-I", "lanplus", "-H", "127.0.0.1", "-p", "9001", "-L", "ADMINISTRATOR", "-U", user, "-P"])
            .arg(password)
            .args(args)
            .output()
            .expect("run ipmitool (apt-get install ipmitool)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }
}

/// The test image (the harness's busybox root, whose /sbin/init prints BOOTED_MARKER with the
/// hostname), packed as the server packs images; returns the archive and its sha256.
fn pack_test_image(dir: &Path) -> (Vec<u8>, String) {
    let assets = test_assets().expect("boot assets");
    let archive_path = dir.join("image.tar.zst");
    let packed = Command::new("sh")
        .arg("-c")
        .arg("tar --numeric-owner --xattrs -C \"$1\" -cf - . | zstd -q -3 -f -o \"$2\"")
        .arg("pack")
        .arg(&assets.rootfs)
        .arg(&archive_path)
        .status()
        .expect("run tar | zstd");
    assert!(packed.success(), "pack the test image");
    let archive = std::fs::read(&archive_path).unwrap();
    let sum = Command::new("sha256sum").arg(&archive_path).output().expect("run sha256sum");
    let sha256 = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or("").to_string();
    assert_eq!(sha256.len(), 64, "sha256sum output");
    (archive, sha256)
}

const BASE: &str = "http://10.77.0.1:7050";

/// node001's plan: the image over HTTP only (its torrent is missing), a post-script, and the
/// BMC setup when `bmc` is given.
fn plan(archive: &[u8], sha256: String, bmc: Option<PlanBmc>) -> InstallPlan {
    InstallPlan {
        node: "node001".into(),
        hostname: "node001".into(),
        domain: "cluster".into(),
        interfaces: vec![PlanInterface {
            name: "BOOTIF".into(),
            mac: Some(MAC.parse().unwrap()),
            ip: Some("10.77.0.10".parse().unwrap()),
            prefix: 24,
            gateway: None,
            dns: None,
            mtu: 0,
            params: String::new(),
        }],
        image: Some(PlanImage {
            osimage: "busybox".into(),
            revision: 1,
            // No torrent here: the agent must notice and carry on over HTTP.
            torrent_url: format!("{BASE}/image.torrent"),
            http_url: format!("{BASE}/image.tar.zst"),
            sha256,
            size: archive.len() as u64,
            info_hash: String::new(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        }),
        root: luna_core::model::RootMode::Tmpfs,
        prescript: String::new(),
        partscript: String::new(),
        postscript: "echo \"post $LUNA_NODE\" > /etc/luna-post".into(),
        torrent_interface: "BOOTIF".into(),
        service: false,
        setupbmc: bmc.is_some(),
        bmc,
        server_url: BASE.into(),
    }
}

/// The stand-in luna-server (plan, image, status) on 10.77.0.1 inside `ns`, on a tap for the
/// VM; stops when dropped.
struct PlanServer {
    reports: Arc<Mutex<Vec<StatusReport>>>,
    stop: Arc<AtomicBool>,
    thread: Option<luna_tests::NetnsThread<()>>,
}

impl PlanServer {
    fn start(ns: &Netns, plan: &InstallPlan, archive: Vec<u8>) -> PlanServer {
        ns.add_tap("tap0", None).unwrap();
        ns.add_addr("tap0", "10.77.0.1/24").unwrap();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, p) = (reports.clone(), stop.clone(), serde_json::to_vec(plan).unwrap());
        let thread = ns
            .spawn_thread("plan-server", move || {
                let listener = TcpListener::bind("10.77.0.1:7050").expect("bind the plan server");
                serve(listener, p, archive, r, s)
            })
            .unwrap();
        PlanServer { reports, stop, thread: Some(thread) }
    }

    /// The steps reported so far (not the progress reports).
    fn steps(&self) -> Vec<String> {
        self.reports.lock().unwrap().iter().filter(|r| r.progress.is_none()).map(|r| r.step.clone()).collect()
    }
}

impl Drop for PlanServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if !std::thread::panicking() {
                t.join();
            }
        }
    }
}

/// The kernel command line iPXE would give node001 (static address, BOOTIF).
fn append() -> String {
    format!(
        "console=ttyS0 panic=-1 root=luna luna.url={BASE} luna.node=node001 luna.token={TOKEN} luna.mac={MAC} \
         ifname=boot0:{MAC} ip=10.77.0.10::10.77.0.1:255.255.255.0:node001:boot0:off BOOTIF=01-{} rd.retry=60",
        MAC.replace(':', "-")
    )
}

/// The install steps every boot from the plan reports, the booted image's own last.
const INSTALL_STEPS: [&str; 10] = [
    "plan",
    "partscript",
    "download",
    "http-fallback",
    "verify",
    "unpack",
    "personality",
    "postscript",
    "installed",
    "booted",
];

/// With systemd as the initramfs's init (dracut-systemd: the hooks run from dracut's units,
/// network-legacy from udev), the same install and switch root, and service mode.
#[test]
fn vm_with_systemd_in_the_initramfs_installs_and_switches_root() {
    if !privileged() {
        return;
    }
    let assets = test_assets().expect("boot assets");
    let (dir, img) = initramfs("agent-vm-systemd", Init::Systemd);
    let listing = Command::new("lsinitrd").arg(&img).output().expect("run lsinitrd");
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("dracut-initqueue.service"), "not a systemd initramfs:\n{listing}");
    assert!(listing.contains("sysroot.mount.d/luna.conf"), "no sysroot.mount drop-in:\n{listing}");

    let (archive, sha256) = pack_test_image(&dir);
    let ns = Netns::new().unwrap();
    ns.link_up("lo").unwrap();
    let server = PlanServer::start(&ns, &plan(&archive, sha256, None), archive);
    let vm = Vm::builder("agent-vm-systemd")
        .memory_mb(1024)
        .nic("tap0", MAC)
        .direct_kernel(&assets.kernel, &img, &append())
        .spawn_in(&ns)
        .unwrap();
    // systemd's emergency mode waits for a login forever: stop at it.
    let booted = vm
        .serial()
        .wait_match(0, BOOTED_MARKER, Duration::from_secs(600), |l| {
            l.contains(BOOTED_MARKER) || l.contains("Reached target emergency.target")
        })
        .map(|(_, line)| line);
    let steps = server.steps();
    let line = booted
        .ok()
        .filter(|l| l.contains(BOOTED_MARKER))
        .unwrap_or_else(|| panic!("no {BOOTED_MARKER}\nreports: {steps:?}\n{}", vm.serial().tail(150)));
    assert!(line.contains("host=node001"), "personality: {line}");
    for step in INSTALL_STEPS {
        assert!(steps.iter().any(|s| s == step), "step {step} not reported: {steps:?}");
    }
    assert!(!steps.iter().any(|s| s == "error" || s == "bmc"), "{steps:?}");
    let serial = vm.serial().lines().join("\n");
    assert!(
        serial.contains("dracut-initqueue.service"),
        "systemd did not run the initramfs:\n{}",
        vm.serial().tail(80)
    );
    drop(vm);

    // Service mode under systemd: no install, the service shell (through dracut's emergency
    // unit), the status `service`.
    let before = server.steps().len();
    let vm = Vm::builder("agent-vm-systemd-service")
        .memory_mb(1024)
        .nic("tap0", MAC)
        .direct_kernel(&assets.kernel, &img, &format!("{} luna.service=1", append()))
        .spawn_in(&ns)
        .unwrap();
    if let Err(e) = vm.wait_for("luna: service mode: no install", Duration::from_secs(600)) {
        panic!("no service shell: {e}\n{}", vm.serial().tail(80));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !server.steps()[before..].iter().any(|s| s == "service") {
        assert!(std::time::Instant::now() < deadline, "no service report: {:?}", server.steps());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!server.steps()[before..].iter().any(|s| s == "plan" || s == "download"), "{:?}", server.steps());
    assert!(!vm.serial().contains(BOOTED_MARKER), "service mode installed nothing");
}

#[test]
fn vm_installs_from_a_plan_and_switches_root() {
    if !privileged() {
        return;
    }
    let assets = test_assets().expect("boot assets");
    let (dir, img) = initramfs("agent-vm", Init::Dracut);

    let (archive, sha256) = pack_test_image(&dir);
    let bmc_plan = PlanBmc {
        protocol: BmcProtocol::Ipmi,
        userid: 3,
        user: "lunaadmin".into(),
        password: Secret(BMC_PASSWORD.into()),
        netchannel: 1,
        mgmtchannel: 1,
        ip: Some("10.148.0.10".parse().unwrap()),
        prefix: 16,
        gateway: Some("10.148.255.254".parse().unwrap()),
    };
    let ns = Netns::new().unwrap();
    ns.link_up("lo").unwrap();
    let bmc = SimBmc::start(&ns, &dir);
    let server = PlanServer::start(&ns, &plan(&archive, sha256, Some(bmc_plan)), archive);
    let vm = Vm::builder("agent-vm")
        .memory_mb(1024)
        .nic("tap0", MAC)
        .direct_kernel(&assets.kernel, &img, &append())
        .arg("-chardev")
        .arg("socket,id=ipmi0,host=127.0.0.1,port=9002,reconnect=10")
        .arg("-device")
        .arg("ipmi-bmc-extern,id=bmc0,chardev=ipmi0")
        .arg("-device")
        .arg("isa-ipmi-kcs,bmc=bmc0")
        .spawn_in(&ns)
        .unwrap();
    let booted = vm.wait_for(BOOTED_MARKER, Duration::from_secs(600));
    let steps = server.steps();
    let line =
        booted.unwrap_or_else(|e| panic!("no {BOOTED_MARKER}: {e}\nreports: {steps:?}\n{}", vm.serial().tail(60)));
    assert!(line.contains("host=node001"), "personality: {line}");
    for step in INSTALL_STEPS.iter().chain(&["bmc"]) {
        assert!(steps.iter().any(|s| s == step), "step {step} not reported: {steps:?}");
    }
    assert!(!steps.iter().any(|s| s == "error"), "{steps:?}");

    // The agent's read-back of the BMC, on the console and in the reports.
    let serial = vm.serial().lines().join("\n");
    let readback = "bmc set up: channel 1 ip source static ip 10.148.0.10 netmask 255.255.0.0 gateway 10.148.255.254; \
                    user 3 'lunaadmin' privilege admin ipmi messaging on; lan access always";
    assert!(serial.contains(readback), "no bmc read-back on the console:\n{}", vm.serial().tail(80));
    assert!(!serial.contains(BMC_PASSWORD), "the bmc password reached the console");
    // The agent's last report (the image's init reports `booted` after it) keeps the BMC result.
    let installed = server.reports.lock().unwrap().iter().rev().find(|r| r.step == "installed").cloned();
    let done = installed.and_then(|r| r.message).unwrap_or_default();
    assert!(done.ends_with(" installed, switching root; bmc set up"), "{done}");

    // The BMC itself: the new user logs in over the LAN with the new password as an
    // administrator and sees the static address the node gave it.
    let lan = bmc.ipmitool(&ns, "lunaadmin", BMC_PASSWORD, &["lan", "print", "1"]).expect("log in as the new bmc user");
    for line in [
        "IP Address Source       : Static Address",
        "IP Address              : 10.148.0.10",
        "Subnet Mask             : 255.255.0.0",
        "Default Gateway IP      : 10.148.255.254",
    ] {
        assert!(lan.contains(line), "{line} missing from the bmc's lan settings:\n{lan}");
    }
    let users = bmc.ipmitool(&ns, "lunaadmin", BMC_PASSWORD, &["user", "list", "1"]).unwrap();
    let user3 = users.lines().find(|l| l.starts_with("3 ")).unwrap_or_default();
    let fields: Vec<&str> = user3.split_whitespace().collect();
    assert_eq!(fields, ["3", "lunaadmin", "true", "true", "true", "ADMINISTRATOR"], "{users}");
    assert!(bmc.ipmitool(&ns, "lunaadmin", "not-the-password", &["mc", "info"]).is_err(), "a wrong password logs in");
    let state = std::fs::read_to_string(bmc.dir.join("lan.state")).unwrap_or_default();
    assert!(state.contains("ip_addr_src:static") && state.contains("ip_addr:10.148.0.10"), "{state}");
}
