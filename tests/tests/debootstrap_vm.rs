//! A real Debian through the whole node path: `debootstrap --variant=minbase` bookworm with
//! systemd and a kernel (from the machine's own apt mirror), packed by luna-server's packer
//! (archive, torrent, the image kernel's initramfs built on the host with 95luna), then a VM
//! boots that kernel and initramfs, the agent installs the archive from a stand-in plan server
//! and systemd in the switched root reaches `multi-user.target` on the serial console.
//!
//! Slow (a debootstrap download, minutes of TCG boot) and needs the network to the Debian
//! mirror, so it runs only with `LUNA_TEST_DEBOOTSTRAP=1` as well as `LUNA_TEST_PRIVILEGED=1`;
//! CI sets neither for it. The debootstrapped tree is cached under `<work>/debootstrap/root`.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_core::api::{InstallPlan, PlanImage, PlanInterface, StatusReport};
use luna_core::model::Osimage;
use luna_server::image::archive::ArchiveOptions;
use luna_server::image::pack::{pack, PackMode, PackOptions};
use luna_tests::{agent_bin, privileged, work_dir, Netns, Vm};

const MAC: &str = "52:54:00:4c:55:d1";
const TOKEN: &str = "deb-token";
const SUITE: &str = "bookworm";

fn enabled() -> bool {
    std::env::var("LUNA_TEST_DEBOOTSTRAP").is_ok_and(|v| v == "1")
}

/// The first Debian mirror apt is configured with (deb822 `URIs:` or a one-line `deb` entry).
fn apt_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for f in files {
        let name = f.display().to_string();
        if !(name.ends_with(".list") || name.ends_with(".sources")) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|w| w.starts_with("http"))
            } else {
                None
            };
            if let Some(uri) = uri.filter(|u| u.trim_end_matches('/').ends_with("/debian")) {
                return uri.to_string();
            }
        }
    }
    panic!("no Debian mirror in /etc/apt/sources.list*")
}

/// `debootstrap --variant=minbase` with systemd and a kernel, once (cached by a marker file).
fn debootstrap(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let done = dir.join("root.done");
    if done.is_file() {
        return root;
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(dir).unwrap();
    let mirror = apt_mirror();
    let out = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=systemd,systemd-sysv,udev,kmod,iproute2,linux-image-amd64", SUITE])
        .arg(&root)
        .arg(&mirror)
        .output()
        .expect("run debootstrap (apt-get install debootstrap)");
    assert!(
        out.status.success(),
        "debootstrap {SUITE} from {mirror} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A console login is not needed; the boot target is.
    std::fs::write(root.join("etc/hostname"), "debian\n").unwrap();
    std::fs::write(&done, "").unwrap();
    root
}

/// A dracut that uses this tree's 95luna and the agent just built (the system's dracut
/// directory stays untouched; other tests may use it at the same time).
fn dracut_wrapper(dir: &Path, agent: &Path) -> PathBuf {
    let base = luna_tests::private_dracut_base(dir).expect("private dracut base");
    let wrapper = dir.join("dracut");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport dracutbasedir='{}' LUNA_AGENT_BIN='{}'\nexec dracut \"$@\"\n",
            base.display(),
            agent.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    wrapper
}

/// Plan, image and status over HTTP/1.1 until `stop`; records the reports.
fn serve(
    listener: TcpListener,
    plan: Vec<u8>,
    archive: PathBuf,
    reports: Arc<Mutex<Vec<StatusReport>>>,
    stop: Arc<AtomicBool>,
) {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false).unwrap();
                let (plan, archive, reports) = (plan.clone(), archive.clone(), reports.clone());
                std::thread::spawn(move || handle(conn, &plan, &archive, &reports));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => {}
        }
    }
}

fn handle(mut conn: TcpStream, plan: &[u8], archive: &Path, reports: &Mutex<Vec<StatusReport>>) -> std::io::Result<()> {
    let luna_tests::StandInRequest { method, path, body } = luna_tests::read_request(&conn)?;
    let authorised = path.contains("node=node001") && path.contains(&format!("token={TOKEN}"));
    let route = path.split('?').next().unwrap_or("").to_string();
    match (method.as_str(), route.as_str()) {
        ("GET", "/boot/plan") if authorised => {
            write!(conn, "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", plan.len())?;
            conn.write_all(plan)
        }
        ("POST", "/boot/status") if authorised => {
            if let Ok(r) = serde_json::from_slice::<StatusReport>(&body) {
                reports.lock().unwrap().push(r);
            }
            write!(conn, "HTTP/1.1 204 No Content\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
        }
        ("GET", "/image.tar.zst") => {
            let mut f = std::fs::File::open(archive)?;
            let size = f.metadata()?.len();
            write!(conn, "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {size}\r\n\r\n")?;
            std::io::copy(&mut f, &mut conn).map(|_| ())
        }
        _ => write!(conn, "HTTP/1.1 404 Not Found\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"),
    }
}

#[test]
fn debian_minbase_boots_through_the_agent_to_multi_user() {
    if !privileged() || !enabled() {
        println!("skipped: needs LUNA_TEST_PRIVILEGED=1 and LUNA_TEST_DEBOOTSTRAP=1");
        return;
    }
    let dir = work_dir().join("debootstrap");
    let root = debootstrap(&dir);
    let agent = agent_bin().expect("luna-agent binary");
    let dracut = dracut_wrapper(&dir, &agent);

    // Packed as `luna osimage pack` packs: archive + torrent + kernel + initramfs.
    let mut image = Osimage::new("debian", &root.display().to_string());
    image.dracut_drivers_add = vec!["virtio_net".into(), "virtio_pci".into()];
    image.dracut_modules_omit = ["systemd", "systemd-initrd", "systemd-networkd", "dracut-systemd", "plymouth", "i18n"]
        .map(String::from)
        .to_vec();
    let out = dir.join("rev");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let base = "http://10.77.9.1:7050";
    let opts = PackOptions {
        mode: PackMode::Full,
        out_dir: out.clone(),
        revision: 1,
        previous: None,
        announce: format!("{base}/announce"),
        web_seed: None,
        dracut: dracut.display().to_string(),
        archive: ArchiveOptions::default(),
        now: 1,
    };
    let rev = pack(&image, &opts, &mut |_| true).expect("pack the debootstrapped image");
    println!(
        "packed: kernel {} archive {} bytes ({} bytes of files)",
        rev.kernel_version, rev.archive_size, rev.tree_bytes
    );

    let plan = InstallPlan {
        node: "node001".into(),
        hostname: "node001".into(),
        domain: "cluster".into(),
        interfaces: vec![PlanInterface {
            name: "BOOTIF".into(),
            mac: Some(MAC.parse().unwrap()),
            ip: Some("10.77.9.10".parse().unwrap()),
            prefix: 24,
            gateway: None,
            dns: None,
            mtu: 0,
            params: String::new(),
        }],
        image: Some(PlanImage {
            osimage: "debian".into(),
            revision: rev.id,
            // No torrent: HTTP only (the swarm has its own tests).
            torrent_url: format!("{base}/image.torrent"),
            http_url: format!("{base}/image.tar.zst"),
            sha256: rev.sha256.clone(),
            size: rev.archive_size,
            info_hash: rev.info_hash.clone(),
        }),
        prescript: String::new(),
        partscript: String::new(),
        postscript: String::new(),
        torrent_interface: "BOOTIF".into(),
        service: false,
        setupbmc: false,
        bmc: None,
        server_url: base.into(),
    };

    let ns = Netns::new().unwrap();
    ns.add_tap("tap0", None).unwrap();
    ns.add_addr("tap0", "10.77.9.1/24").unwrap();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (r, s, p, a) = (reports.clone(), stop.clone(), serde_json::to_vec(&plan).unwrap(), out.join(&rev.archive));
    let server = ns
        .spawn_thread("deb-plan-server", move || {
            let listener = TcpListener::bind("10.77.9.1:7050").expect("bind the plan server");
            serve(listener, p, a, r, s)
        })
        .unwrap();
    struct Stop(Arc<AtomicBool>);
    impl Drop for Stop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop = Stop(stop);

    // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check can fail and
    // panic ("IO-APIC + timer doesn't work").
    let append = format!(
        "console=ttyS0 panic=-1 root=luna luna.url={base} luna.node=node001 luna.token={TOKEN} luna.mac={MAC} \
         ifname=boot0:{MAC} ip=10.77.9.10::10.77.9.1:255.255.255.0:node001:boot0:off BOOTIF=01-{} rd.retry=60 \
         systemd.show_status=1 no_timer_check",
        MAC.replace(':', "-")
    );
    let vm = Vm::builder("deb-vm")
        .memory_mb(2560)
        .nic("tap0", MAC)
        .direct_kernel(out.join(&rev.kernel), out.join(&rev.initrd), &append)
        .spawn_in(&ns)
        .unwrap();
    let reached = vm.wait_for("Multi-User System", Duration::from_secs(1500));
    let steps: Vec<String> =
        reports.lock().unwrap().iter().filter(|r| r.progress.is_none()).map(|r| r.step.clone()).collect();
    let line =
        reached.unwrap_or_else(|e| panic!("no multi-user.target: {e}\nreports: {steps:?}\n{}", vm.serial().tail(80)));
    assert!(line.contains("Reached target"), "{line}");
    for step in ["plan", "download", "verify", "unpack", "personality", "booted"] {
        assert!(steps.iter().any(|s| s == step), "step {step} not reported: {steps:?}");
    }
    drop(_stop);
    server.join();
}
