//! The whole install flow without root: a local HTTP server (std TcpListener) serves the plan,
//! a real tar.zst image made here and its torrent, and records status reports; the OS is the
//! recording fake; a librqbit seeder on 127.0.0.1 stands for the swarm.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use luna_agent::install::{self, AgentError, Config};
use luna_agent::os::{OsCall, RecordingOs};
use luna_core::api::{InstallPlan, PlanImage, PlanInterface, StatusReport};
use sha2::{Digest, Sha256};

const TOKEN: &str = "s3cret/+";
const MAC: &str = "52:54:00:12:34:56";

#[derive(Default)]
struct Behaviour {
    /// Plan requests answered 503 before the real answer.
    plan_failures: usize,
    /// Image responses (from offset 0) cut off after this many bytes, this many times.
    cut_after: Option<(u64, usize)>,
    /// Serve a corrupted archive this many times.
    corrupt: usize,
}

struct Server {
    addr: SocketAddr,
    reports: Arc<Mutex<Vec<StatusReport>>>,
    image_requests: Arc<Mutex<Vec<Option<u64>>>>,
    plan_requests: Arc<AtomicUsize>,
}

struct Content {
    plan: Vec<u8>,
    archive: Vec<u8>,
    torrent: Vec<u8>,
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn query(path: &str) -> HashMap<String, String> {
    let q = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let mut out = Vec::new();
            let b = v.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' && i + 2 < b.len() + 1 {
                    out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    out.push(b[i]);
                    i += 1;
                }
            }
            (k.to_string(), String::from_utf8(out).unwrap())
        })
        .collect()
}

impl Server {
    fn start(content: Arc<Mutex<Content>>, behaviour: Behaviour) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let reports = Arc::new(Mutex::new(Vec::new()));
        let image_requests = Arc::new(Mutex::new(Vec::new()));
        let plan_requests = Arc::new(AtomicUsize::new(0));
        let behaviour = Arc::new(Mutex::new(behaviour));
        let (r, ir, pr) = (reports.clone(), image_requests.clone(), plan_requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (content, behaviour, r, ir, pr) =
                    (content.clone(), behaviour.clone(), r.clone(), ir.clone(), pr.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &content, &behaviour, &r, &ir, &pr);
                });
            }
        });
        Server { addr, reports, image_requests, plan_requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn steps(&self) -> Vec<String> {
        self.reports.lock().unwrap().iter().filter(|r| r.progress.is_none()).map(|r| r.step.clone()).collect()
    }
}

fn handle(
    mut conn: TcpStream,
    content: &Mutex<Content>,
    behaviour: &Mutex<Behaviour>,
    reports: &Mutex<Vec<StatusReport>>,
    image_requests: &Mutex<Vec<Option<u64>>>,
    plan_requests: &AtomicUsize,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let q = query(&path);
    let route = path.split('?').next().unwrap_or("");
    let authorised =
        q.get("node").map(String::as_str) == Some("node001") && q.get("token").map(String::as_str) == Some(TOKEN);
    match (method.as_str(), route) {
        ("GET", "/boot/plan") => {
            if !authorised {
                respond(&mut conn, "401 Unauthorized", &[], b"{\"error\":\"bad token\"}");
                return Ok(());
            }
            let n = plan_requests.fetch_add(1, Ordering::SeqCst);
            if n < behaviour.lock().unwrap().plan_failures {
                respond(&mut conn, "503 Service Unavailable", &[], b"busy");
                return Ok(());
            }
            let plan = content.lock().unwrap().plan.clone();
            respond(&mut conn, "200 OK", &[("content-type", "application/json".into())], &plan);
        }
        ("POST", "/boot/status") => {
            assert!(authorised, "status report without the token");
            let report: StatusReport = serde_json::from_slice(&body).expect("status body is a StatusReport");
            reports.lock().unwrap().push(report);
            respond(&mut conn, "204 No Content", &[], b"");
        }
        ("GET", r) if r.starts_with("/boot/nocloud/") => {
            if !authorised {
                respond(&mut conn, "403 Forbidden", &[], b"{\"error\":\"bad token\"}");
                return Ok(());
            }
            let file = r.trim_start_matches("/boot/nocloud/");
            respond(&mut conn, "200 OK", &[], format!("{file} of node001\n").as_bytes());
        }
        ("GET", "/image.torrent") => {
            let t = content.lock().unwrap().torrent.clone();
            respond(&mut conn, "200 OK", &[], &t);
        }
        ("GET", "/image.tar.zst") => {
            let mut archive = content.lock().unwrap().archive.clone();
            let start: Option<u64> = headers
                .get("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok());
            image_requests.lock().unwrap().push(start);
            let mut b = behaviour.lock().unwrap();
            if b.corrupt > 0 {
                b.corrupt -= 1;
                let at = archive.len() / 3;
                archive[at] ^= 0x55;
            }
            let total = archive.len() as u64;
            let from = start.unwrap_or(0);
            let slice = &archive[from as usize..];
            if let Some((cut, times)) = b.cut_after {
                if times > 0 && start.is_none() {
                    b.cut_after = Some((cut, times - 1));
                    drop(b);
                    // Promise the whole body, deliver part of it, hang up.
                    let head =
                        format!("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", slice.len());
                    conn.write_all(head.as_bytes())?;
                    conn.write_all(&slice[..cut as usize])?;
                    return Ok(());
                }
            }
            drop(b);
            if let Some(from) = start {
                let range = format!("bytes {from}-{}/{total}", total - 1);
                respond(&mut conn, "206 Partial Content", &[("content-range", range)], slice);
            } else {
                respond(&mut conn, "200 OK", &[], slice);
            }
        }
        _ => respond(&mut conn, "404 Not Found", &[], b"no such route"),
    }
    Ok(())
}

/// A small OS tree with a large-ish incompressible file so the torrent has many pieces.
fn hdr(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

fn make_archive() -> Vec<u8> {
    make_archive_with(false)
}

/// The test tree; with `cloud_init`, an image that has cloud-init (`/usr/bin/cloud-init`).
fn make_archive_with(cloud_init: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for d in [
        "./",
        "./etc",
        "./etc/systemd",
        "./etc/systemd/network",
        "./usr",
        "./usr/lib",
        "./usr/lib/systemd",
        "./usr/bin",
        "./dev",
    ] {
        b.append_data(&mut hdr(tar::EntryType::Directory, 0o755, 0), d, std::io::empty()).unwrap();
    }
    let mut file = |p: &str, data: &[u8], mode: u32| {
        b.append_data(&mut hdr(tar::EntryType::Regular, mode, data.len() as u64), p, data).unwrap();
    };
    file("./usr/lib/systemd/systemd-networkd", b"#!/bin/sh\n", 0o755);
    file("./etc/hosts", b"127.0.0.1 localhost\n", 0o644);
    file("./etc/hostname", b"image\n", 0o644);
    if cloud_init {
        file("./usr/bin/cloud-init", b"#!/usr/bin/python3\n", 0o755);
    }
    // xorshift noise: does not compress, so the archive is ~1.5 MiB.
    let mut x = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..1_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    file("./usr/bin/big", &noise, 0o4755);
    let mut h = hdr(tar::EntryType::Char, 0o666, 0);
    h.set_device_major(1).unwrap();
    h.set_device_minor(3).unwrap();
    b.append_data(&mut h, "./dev/null", std::io::empty()).unwrap();
    zstd::encode_all(&b.into_inner().unwrap()[..], 3).unwrap()
}

fn iface(name: &str, ip: &str) -> PlanInterface {
    PlanInterface {
        name: name.into(),
        mac: None,
        ip: Some(ip.parse().unwrap()),
        prefix: 16,
        gateway: None,
        dns: None,
        mtu: 1500,
        params: String::new(),
    }
}

fn plan(base: &str, archive: &[u8]) -> InstallPlan {
    InstallPlan {
        node: "node001".into(),
        hostname: "node001".into(),
        domain: "cluster".into(),
        interfaces: vec![iface("BOOTIF", "10.141.0.1")],
        image: Some(PlanImage {
            osimage: "compute".into(),
            revision: 3,
            torrent_url: format!("{base}/image.torrent"),
            http_url: format!("{base}/image.tar.zst"),
            sha256: hex::encode(Sha256::digest(archive)),
            size: archive.len() as u64,
            info_hash: String::new(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        }),
        root: luna_core::model::RootMode::Tmpfs,
        prescript: "echo \"$LUNA_NODE $LUNA_IMAGE_SIZE $LUNA_TMPFS_SIZE $LUNA_BOOTIF $LUNA_IP\" > \"$(dirname \"$LUNA_SYSROOT\")/pre.out\"".into(),
        partscript: "mkdir -p \"$LUNA_SYSROOT\" && echo part > \"$LUNA_SYSROOT/../part.out\"".into(),
        // The fake runs it in the root directory instead of chrooting there.
        postscript: "test -x usr/bin/big && echo \"$LUNA_HOSTNAME\" > post.out".into(),
        torrent_interface: "BOOTIF".into(),
        service: false,
        setupbmc: false,
        bmc: None,
        server_url: base.into(),
    }
}

struct Env {
    _dir: tempfile::TempDir,
    cfg: Config,
    content: Arc<Mutex<Content>>,
    archive: Vec<u8>,
    sysroot: PathBuf,
    base: PathBuf,
}

fn setup(extra_cmdline: &str) -> (Env, impl FnOnce(&str, Behaviour) -> Server) {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_path_buf();
    let net = base.join("net/ens3");
    std::fs::create_dir_all(&net).unwrap();
    std::fs::write(net.join("address"), format!("{MAC}\n")).unwrap();
    std::fs::write(base.join("meminfo"), "MemTotal:  1048576 kB\n").unwrap();
    let archive = make_archive();
    let content = Arc::new(Mutex::new(Content { plan: Vec::new(), archive: archive.clone(), torrent: Vec::new() }));
    let sysroot = base.join("sysroot");
    let cfg = Config {
        cmdline: base.join("cmdline"),
        sys_class_net: base.join("net"),
        meminfo: base.join("meminfo"),
        sysroot: sysroot.clone(),
        scratch: base.join("scratch"),
        swarm: false,
        initial_peers: Vec::new(),
        window: 4 << 20,
        disk: Default::default(),
        unpack: true,
    };
    let c2 = content.clone();
    let cmdline_path = cfg.cmdline.clone();
    let extra = extra_cmdline.to_string();
    let a2 = archive.clone();
    let start = move |_: &str, behaviour: Behaviour| {
        let server = Server::start(c2.clone(), behaviour);
        c2.lock().unwrap().plan = serde_json::to_vec(&plan(&server.url(), &a2)).unwrap();
        std::fs::write(
            &cmdline_path,
            format!(
                "root=luna luna.url={}/ luna.node=node001 luna.token={TOKEN} BOOTIF=01-{} ip=dhcp {extra}\n",
                server.url(),
                MAC.replace(':', "-")
            ),
        )
        .unwrap();
        server
    };
    (Env { _dir: dir, cfg, content, archive, sysroot, base }, start)
}

fn fake() -> Arc<RecordingOs> {
    Arc::new(RecordingOs::new(true, Some(("127.0.0.1".parse().unwrap(), 8))))
}

fn set_plan(env: &Env, server: &Server, f: impl FnOnce(&mut InstallPlan)) {
    let mut p = plan(&server.url(), &env.archive);
    f(&mut p);
    env.content.lock().unwrap().plan = serde_json::to_vec(&p).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_over_http_and_reports_every_step() {
    let (env, start) = setup("");
    let server = start("", Behaviour { plan_failures: 2, ..Default::default() });
    let os = fake();
    let outcome = install::install(&env.cfg, os.clone()).await.expect("install");
    assert_eq!(outcome.nic, "ens3");
    assert_eq!(server.plan_requests.load(Ordering::SeqCst), 3, "plan retried through two 503s");
    assert_eq!(outcome.fetched.bytes_from_http, env.archive.len() as u64);

    // Image unpacked, setuid kept, device node through the Os.
    let big = std::fs::metadata(env.sysroot.join("usr/bin/big")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(big.mode() & 0o7777, 0o4755);
    assert_eq!(big.len(), 1_500_000);
    let root = env.sysroot.canonicalize().unwrap();
    assert!(os
        .calls()
        .iter()
        .any(|c| matches!(c, OsCall::Mknod { path, major: 1, minor: 3, .. } if *path == root.join("dev/null"))));

    // Scripts saw their environment; the postscript ran "in" the root.
    let pre = std::fs::read_to_string(env.base.join("pre.out")).unwrap();
    assert_eq!(pre.trim(), format!("node001 {} 819m ens3 127.0.0.1", env.archive.len()));
    assert!(env.base.join("part.out").exists());
    assert_eq!(std::fs::read_to_string(env.sysroot.join("post.out")).unwrap(), "node001\n");

    // Personality: hostname replaced, networkd unit matched by MAC, hosts line.
    assert_eq!(std::fs::read_to_string(env.sysroot.join("etc/hostname")).unwrap(), "node001\n");
    let unit = std::fs::read_to_string(env.sysroot.join("etc/systemd/network/10-luna-ens3.network")).unwrap();
    assert!(unit.contains(&format!("MACAddress={MAC}")) && unit.contains("Address=10.141.0.1/16"), "{unit}");
    assert!(std::fs::read_to_string(env.sysroot.join("etc/hosts"))
        .unwrap()
        .contains("10.141.0.1\tnode001.cluster node001"));

    // Postscript with /proc, /sys, /dev bound and unbound in reverse order.
    let calls = os.calls();
    let mounts: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            OsCall::Mount { source, bind: true, .. } => Some(source.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(mounts, ["/proc", "/sys", "/dev"]);
    let umounts: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            OsCall::Umount(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(umounts, [env.sysroot.join("dev"), env.sysroot.join("sys"), env.sysroot.join("proc")]);
    let scripts: Vec<_> = calls
        .iter()
        .filter_map(|c| match c {
            OsCall::Script { name, chroot, .. } => Some((name.clone(), chroot.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        scripts,
        [("prescript".into(), None), ("partscript".into(), None), ("postscript".into(), Some(env.sysroot.clone()))]
    );

    let steps = server.steps();
    assert_eq!(
        steps,
        ["plan", "prescript", "partscript", "download", "verify", "unpack", "personality", "postscript", "installed"]
    );
    let progress: Vec<u8> = server.reports.lock().unwrap().iter().filter_map(|r| r.progress).collect();
    assert!(!progress.is_empty() && progress.len() <= 3, "progress at most ~1/s: {progress:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_partscript_mounts_a_sized_tmpfs() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| {
        p.partscript = String::new();
        p.prescript = String::new();
        p.postscript = String::new();
    });
    std::fs::create_dir_all(&env.sysroot).unwrap();
    let os = fake();
    install::install(&env.cfg, os.clone()).await.expect("install");
    assert_eq!(
        os.calls()[0],
        OsCall::Mount {
            source: "tmpfs".into(),
            target: env.sysroot.clone(),
            fstype: Some("tmpfs".into()),
            bind: false,
            data: Some("size=819m,mode=0755".into()),
        }
    );
    assert!(!server.steps().contains(&"postscript".to_string()));
}

/// A node's /sys with disk `vda` (partitions 2 and 3) and a CD drive, and a mountinfo where the
/// part-script mounted vda3 on the sysroot and vda2 on its /boot/efi (unless `mounted` is false).
fn fake_disk_node(env: &mut Env, mounted: bool) {
    let sys = env.base.join("sys");
    let vda = sys.join("devices/pci0000:00/virtio2/block/vda");
    for part in ["vda2", "vda3"] {
        std::fs::create_dir_all(vda.join(part)).unwrap();
        std::fs::write(vda.join(part).join("partition"), "1\n").unwrap();
    }
    std::fs::create_dir_all(sys.join("block")).unwrap();
    std::fs::create_dir_all(sys.join("dev/block")).unwrap();
    for (name, removable, size) in [("vda", "0", "20971520"), ("sr0", "1", "2048")] {
        let d = sys.join("block").join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("removable"), removable).unwrap();
        std::fs::write(d.join("size"), size).unwrap();
    }
    std::os::unix::fs::symlink(vda.join("vda3"), sys.join("dev/block/253:3")).unwrap();
    std::os::unix::fs::symlink(vda.join("vda2"), sys.join("dev/block/253:2")).unwrap();
    let root = env.sysroot.display().to_string();
    let mut info = String::from("22 1 0:21 / / rw - rootfs rootfs rw\n");
    if mounted {
        info.push_str(&format!("40 22 253:3 / {root} rw - ext4 /dev/vda3 rw\n"));
        info.push_str(&format!("41 40 253:2 / {root}/boot/efi rw - vfat /dev/vda2 rw\n"));
    }
    std::fs::write(env.base.join("mountinfo"), info).unwrap();
    env.cfg.disk = luna_agent::disk::Paths { sys, mountinfo: env.base.join("mountinfo") };
}

fn script_env(calls: &[OsCall], script: &str, key: &str) -> Option<String> {
    calls.iter().find_map(|c| match c {
        OsCall::Script { name, env, .. } if name == script => {
            env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        }
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_root_partitions_writes_fstab_and_installs_grub() {
    let (mut env, start) = setup("");
    let server = start("", Behaviour::default());
    // The group kept the tmpfs default: the disk default runs instead.
    set_plan(&env, &server, |p| {
        p.root = luna_core::model::RootMode::Disk;
        p.partscript = luna_core::model::DEFAULT_PARTSCRIPT.into();
        p.postscript = String::new();
    });
    let cmdline = std::fs::read_to_string(&env.cfg.cmdline).unwrap();
    std::fs::write(&env.cfg.cmdline, format!("{} console=ttyS0 quiet\n", cmdline.trim())).unwrap();
    fake_disk_node(&mut env, true);
    std::fs::create_dir_all(env.sysroot.join("etc")).unwrap();
    // The scripts are recorded, not run (the fake's disk is not real).
    let os = Arc::new(RecordingOs::new(false, Some(("127.0.0.1".parse().unwrap(), 8))));
    install::install(&env.cfg, os.clone()).await.expect("install");
    let calls = os.calls();
    assert_eq!(script_env(&calls, "partscript", "LUNA_DISK").as_deref(), Some("/dev/vda"));
    assert_eq!(script_env(&calls, "bootloader", "LUNA_BOOT_DISKS").as_deref(), Some("/dev/vda"));
    let chrooted = calls.iter().any(
        |c| matches!(c, OsCall::Script { name, chroot: Some(r), .. } if name == "bootloader" && *r == env.sysroot),
    );
    assert!(chrooted, "{calls:?}");
    let uuids: Vec<_> =
        calls.iter().filter_map(|c| if let OsCall::FsUuid(d) = c { Some(d.as_str()) } else { None }).collect();
    assert_eq!(uuids, ["/dev/vda3", "/dev/vda2"]);
    let fstab = std::fs::read_to_string(env.sysroot.join("etc/fstab")).unwrap();
    assert!(fstab.contains("UUID=uuid-of-vda3\t/\text4\terrors=remount-ro\t0\t1\n"), "{fstab}");
    assert!(fstab.contains("UUID=uuid-of-vda2\t/boot/efi\tvfat\tumask=0077\t0\t2\n"), "{fstab}");
    let grub = std::fs::read_to_string(env.sysroot.join("etc/default/grub.d/luna.cfg")).unwrap();
    assert!(grub.contains("GRUB_CMDLINE_LINUX='console=ttyS0 quiet'\n"), "{grub}");
    assert!(!grub.contains(TOKEN), "{grub}");
    let steps = server.steps();
    assert_eq!(
        steps,
        [
            "plan",
            "prescript",
            "partscript",
            "partscript",
            "download",
            "verify",
            "unpack",
            "personality",
            "bootloader",
            "installed"
        ]
    );
    let reports = server.reports.lock().unwrap();
    let installed = reports.last().unwrap().message.clone().unwrap_or_default();
    assert!(installed.contains("installed on disk (boot loader on /dev/vda)"), "{installed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_root_errors_name_the_disk_and_the_missing_mount() {
    // A part-script that mounted nothing on the sysroot.
    let (mut env, start) = setup("luna.disk=sdz");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| p.root = luna_core::model::RootMode::Disk);
    fake_disk_node(&mut env, false);
    let os = Arc::new(RecordingOs::new(false, Some(("127.0.0.1".parse().unwrap(), 8))));
    let err = install::install(&env.cfg, os.clone()).await.unwrap_err();
    assert_eq!(err.step(), "partscript");
    assert!(err.to_string().contains("no block device is mounted on") && err.to_string().contains("sysroot"), "{err}");
    // The group's own part-script ran, on the disk luna.disk named; nothing was downloaded.
    assert_eq!(script_env(&os.calls(), "partscript", "LUNA_DISK").as_deref(), Some("/dev/sdz"));
    assert!(!server.steps().contains(&"download".to_string()));
    assert_eq!(server.steps().last().map(String::as_str), Some("error"));

    // No disk at all: the error names where it looked.
    let (mut env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| p.root = luna_core::model::RootMode::Disk);
    fake_disk_node(&mut env, true);
    std::fs::remove_dir_all(env.base.join("sys/block/vda")).unwrap();
    let err = install::install(&env.cfg, fake()).await.unwrap_err();
    assert_eq!(err.step(), "partscript");
    assert!(err.to_string().contains("no disk to install on") && err.to_string().contains("sys/block"), "{err}");
    // A bad luna.disk= is refused before anything runs.
    let (mut env, start) = setup("luna.disk=../etc/passwd");
    let server2 = start("", Behaviour::default());
    set_plan(&env, &server2, |p| p.root = luna_core::model::RootMode::Disk);
    fake_disk_node(&mut env, true);
    let os = fake();
    let err = install::install(&env.cfg, os.clone()).await.unwrap_err();
    assert!(err.to_string().contains("bad luna.disk: '../etc/passwd'"), "{err}");
    assert!(!os.calls().iter().any(|c| matches!(c, OsCall::Script { name, .. } if name == "partscript")));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_postscript_reports_error_and_still_unmounts() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| p.postscript = "exit 7".into());
    let os = fake();
    let err = install::install(&env.cfg, os.clone()).await.unwrap_err();
    assert!(matches!(err, AgentError::Postscript(_)), "{err}");
    assert_eq!(err.to_string(), "postscript failed: postscript exited with status 7");
    let umounts = os.calls().iter().filter(|c| matches!(c, OsCall::Umount(_))).count();
    assert_eq!(umounts, 3);
    let reports = server.reports.lock().unwrap();
    let last = reports.last().unwrap();
    assert_eq!(last.step, "error");
    assert_eq!(last.message.as_deref(), Some("postscript: postscript failed: postscript exited with status 7"));
}

fn bmc_plan() -> luna_core::api::PlanBmc {
    luna_core::api::PlanBmc {
        protocol: luna_core::model::BmcProtocol::Ipmi,
        userid: 2,
        user: "root".into(),
        password: luna_core::model::Secret("calvin-pw".into()),
        netchannel: 1,
        mgmtchannel: 1,
        ip: Some("10.148.0.1".parse().unwrap()),
        prefix: 16,
        gateway: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setupbmc_configures_the_bmc_and_reports_it() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| {
        p.setupbmc = true;
        p.bmc = Some(bmc_plan());
    });
    let os = Arc::new(RecordingOs::with_bmc(luna_agent::bmc::FakeBmc::default()));
    install::install(&env.cfg, os.clone()).await.expect("install");
    let bmc = os.bmc().unwrap();
    assert_eq!(bmc.lan[&(1, 3)], [10, 148, 0, 1]);
    assert_eq!(bmc.lan[&(1, 4)], [1]);
    assert_eq!(bmc.users[&2].name, "root");
    assert!(bmc.users[&2].enabled);
    // Before the prescript, so a partscript failure still leaves a reachable BMC.
    assert_eq!(&server.steps()[..3], ["plan", "bmc", "bmc"]);
    let reports = server.reports.lock().unwrap();
    let bmc_msg = reports.iter().rfind(|r| r.step == "bmc").and_then(|r| r.message.clone()).unwrap();
    assert!(
        bmc_msg.starts_with("bmc set up: channel 1 ip source static ip 10.148.0.1 netmask 255.255.0.0"),
        "{bmc_msg}"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.step, "installed");
    let msg = last.message.as_deref().unwrap_or_default();
    assert!(msg.ends_with(" installed, switching root; bmc set up"), "{msg}");
    assert!(!reports.iter().any(|r| r.message.as_deref().unwrap_or("").contains("calvin")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bmc_that_fails_does_not_stop_the_install() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| {
        p.setupbmc = true;
        p.bmc = Some(bmc_plan());
    });
    // No IPMI device on this node.
    let os = fake();
    install::install(&env.cfg, os.clone()).await.expect("install");
    let last = server.reports.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.step, "installed");
    let msg = last.message.clone().unwrap();
    assert!(
        msg.contains(" installed, switching root; bmc setup failed: ipmi device: lock the lan parameters"),
        "{msg}"
    );
    // setupbmc off: the BMC is left alone even with a bmcsetup in the plan.
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| p.bmc = Some(bmc_plan()));
    let os = Arc::new(RecordingOs::with_bmc(luna_agent::bmc::FakeBmc::default()));
    install::install(&env.cfg, os.clone()).await.expect("install");
    assert!(!os.calls().iter().any(|c| matches!(c, OsCall::Ipmi { .. })));
    assert!(!server.steps().contains(&"bmc".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_prescript_stops_before_partitioning() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| p.prescript = "echo nope >&2; exit 3".into());
    let os = fake();
    let err = install::install(&env.cfg, os.clone()).await.unwrap_err();
    assert_eq!(err.step(), "prescript");
    assert_eq!(server.steps(), ["plan", "prescript", "error"]);
    assert_eq!(os.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_a_cut_download_with_range() {
    let (env, start) = setup("");
    let server = start("", Behaviour { cut_after: Some((300_000, 1)), ..Default::default() });
    let os = fake();
    let outcome = install::install(&env.cfg, os).await.expect("install");
    assert_eq!(outcome.fetched.attempts, 1);
    let requests = server.image_requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0], None);
    let resumed = requests[1].expect("second request has a range");
    assert!(resumed > 0 && resumed <= 300_000, "resumed at {resumed}");
    assert_eq!(std::fs::metadata(env.sysroot.join("usr/bin/big")).unwrap().len(), 1_500_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_mismatch_clears_and_retries_then_gives_up() {
    let (env, start) = setup("");
    let server = start("", Behaviour { corrupt: 1, ..Default::default() });
    let outcome = install::install(&env.cfg, fake()).await.expect("second attempt succeeds");
    assert_eq!(outcome.fetched.attempts, 2);
    assert!(server.steps().iter().filter(|s| *s == "download").count() == 2);

    let (env, start) = setup("");
    let server = start("", Behaviour { corrupt: 99, ..Default::default() });
    let err = install::install(&env.cfg, fake()).await.unwrap_err();
    assert!(err.step() == "verify" || err.step() == "unpack", "{err}");
    assert_eq!(server.image_requests.lock().unwrap().len(), 3, "bounded retries");
    assert_eq!(server.steps().last().map(String::as_str), Some("error"));
}

/// `install --no-unpack` (bench-swarm's network-only curve): the image is downloaded and its
/// SHA-256 checked, nothing is unpacked, the node still reports `installed`; a corrupt archive
/// still fails verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_unpack_downloads_and_verifies_only() {
    let (mut env, start) = setup("");
    env.cfg.unpack = false;
    let server = start("", Behaviour::default());
    // The test plan's postscript runs a program from the image: there is no image here.
    set_plan(&env, &server, |p| p.postscript.clear());
    let outcome = install::install(&env.cfg, fake()).await.expect("install");
    assert_eq!(outcome.fetched.bytes_from_http, env.archive.len() as u64);
    assert_eq!(outcome.fetched.stats.files, 0);
    assert!(!env.sysroot.join("usr/bin/big").exists(), "nothing unpacked");
    assert!(server.steps().iter().any(|s| s == "verify"));
    assert_eq!(server.steps().last().map(String::as_str), Some("installed"));

    let (mut env, start) = setup("");
    env.cfg.unpack = false;
    let server = start("", Behaviour { corrupt: 99, ..Default::default() });
    let err = install::install(&env.cfg, fake()).await.unwrap_err();
    assert_eq!(err.step(), "verify", "{err}");
    assert_eq!(server.image_requests.lock().unwrap().len(), 3, "bounded retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_not_retried_forever() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    let text = std::fs::read_to_string(&env.cfg.cmdline).unwrap().replace(TOKEN, "wrong");
    std::fs::write(&env.cfg.cmdline, text).unwrap();
    let err = install::install(&env.cfg, fake()).await.unwrap_err();
    assert!(matches!(err, AgentError::Plan(_)), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
    assert_eq!(server.plan_requests.load(Ordering::SeqCst), 0, "the server refused before counting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_mac_is_a_nic_error() {
    let (mut env, start) = setup("");
    let _server = start("", Behaviour::default());
    env.cfg.sys_class_net = env.base.join("nothing");
    let err = install::install(&env.cfg, fake()).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("no network interface has mac {MAC} (looked in {})", env.base.join("nothing").display())
    );
}

// ---- the swarm ----

async fn make_torrent(archive_path: &Path) -> Vec<u8> {
    let spawner = librqbit::spawn_utils::BlockingSpawner::new(1);
    let opts = librqbit::CreateTorrentOptions { name: None, trackers: vec![], piece_length: Some(64 * 1024) };
    let t = librqbit::create_torrent(archive_path, opts, &spawner).await.unwrap();
    t.as_bytes().unwrap().to_vec()
}

async fn seeder(dir: &Path, torrent: &[u8]) -> (Arc<librqbit::Session>, SocketAddr) {
    let session = librqbit::Session::new_with_opts(
        dir.to_path_buf(),
        librqbit::SessionOptions {
            dht: None,
            disable_local_service_discovery: true,
            listen: Some(librqbit::ListenerOptions {
                listen_addr: "127.0.0.1:0".parse().unwrap(),
                ipv4_only: true,
                ..Default::default()
            }),
            ipv4_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let handle = session
        .add_torrent(
            librqbit::AddTorrent::from_bytes(torrent.to_vec()),
            Some(librqbit::AddTorrentOptions {
                output_folder: Some(dir.display().to_string()),
                overwrite: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_handle()
        .unwrap();
    handle.wait_until_initialized().await.unwrap();
    assert!(handle.stats().finished, "seeder has the whole archive");
    let addr = session.listen_addr().expect("seeder listens");
    (session, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_from_a_librqbit_seeder() {
    let (mut env, start) = setup("");
    let seed_dir = env.base.join("seed");
    std::fs::create_dir_all(&seed_dir).unwrap();
    let archive_path = seed_dir.join("image.tar.zst");
    std::fs::write(&archive_path, &env.archive).unwrap();
    let torrent = make_torrent(&archive_path).await;
    env.content.lock().unwrap().torrent = torrent.clone();
    let (seed, addr) = seeder(&seed_dir, &torrent).await;
    let server = start("", Behaviour::default());
    env.cfg.swarm = true;
    env.cfg.initial_peers = vec![addr];
    let outcome = install::install(&env.cfg, fake()).await.expect("install");
    assert_eq!(outcome.fetched.bytes_from_swarm, env.archive.len() as u64, "all from the peer");
    assert_eq!(outcome.fetched.bytes_from_http, 0);
    assert!(server.image_requests.lock().unwrap().is_empty());
    assert_eq!(std::fs::metadata(env.sysroot.join("usr/bin/big")).unwrap().len(), 1_500_000);
    assert!(!server.steps().contains(&"http-fallback".to_string()));
    seed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_swarm_falls_back_to_http() {
    let (mut env, start) = setup("luna.stall=1");
    let archive_path = env.base.join("image.tar.zst");
    std::fs::write(&archive_path, &env.archive).unwrap();
    env.content.lock().unwrap().torrent = make_torrent(&archive_path).await;
    let server = start("", Behaviour::default());
    env.cfg.swarm = true; // no peers at all: nothing ever arrives
    let outcome = install::install(&env.cfg, fake()).await.expect("install");
    assert_eq!(outcome.fetched.bytes_from_http, env.archive.len() as u64);
    assert!(server.steps().contains(&"http-fallback".to_string()), "{:?}", server.steps());
    assert_eq!(*server.image_requests.lock().unwrap(), vec![None]);
}

/// A ~100 MB tar.zst of incompressible files, written to `path`; returns its sha256 and size.
fn write_big_archive(path: &Path, mib: usize) -> (String, u64) {
    let mut b = tar::Builder::new(Vec::new());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for f in 0..mib / 4 {
        let noise: Vec<u8> = (0..(4 << 20) / 8)
            .flat_map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()
            })
            .collect();
        b.append_data(&mut hdr(tar::EntryType::Regular, 0o644, noise.len() as u64), format!("./f{f}"), &noise[..])
            .unwrap();
    }
    let archive = zstd::encode_all(&b.into_inner().unwrap()[..], 1).unwrap();
    std::fs::write(path, &archive).unwrap();
    (hex::encode(Sha256::digest(&archive)), archive.len() as u64)
}

/// Nodes booting together: three agents fetch a 100 MB image (256 KiB pieces) at once from one
/// seeder and from each other through a small piece window, their readers starting late, and
/// all of it must come from the swarm. Before librqbit was kept to the window ahead of the
/// reader, it fetched on, the window dropped unread pieces librqbit still counted as present,
/// and the agents fell back to HTTP ("piece N is not in the window").
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_booting_together_get_a_big_image_from_the_swarm() {
    use luna_agent::download::{self, Job};
    use luna_agent::http::Client;
    use luna_agent::report::Reporter;
    use luna_agent::torrent::{Swarm, SwarmOptions};
    // A third of the default: the same rules, overflowing sooner (a 100 MB image fills it 12×).
    const WINDOW: u64 = 8 << 20;

    if let Ok(level) = std::env::var("LUNA_LOG") {
        let level = level.parse().unwrap_or(tracing::Level::INFO);
        let _ = tracing_subscriber::fmt().with_max_level(level).with_test_writer().try_init();
    }
    let dir = tempfile::tempdir().unwrap();
    let seed_dir = dir.path().join("seed");
    std::fs::create_dir_all(&seed_dir).unwrap();
    let archive_path = seed_dir.join("image.tar.zst");
    let (sha256, size) = write_big_archive(&archive_path, 100);
    let spawner = librqbit::spawn_utils::BlockingSpawner::new(1);
    let opts = librqbit::CreateTorrentOptions { name: None, trackers: vec![], piece_length: Some(256 * 1024) };
    let torrent = librqbit::create_torrent(&archive_path, opts, &spawner).await.unwrap().as_bytes().unwrap().to_vec();
    let (seed, seed_addr) = seeder(&seed_dir, &torrent).await;
    // The HTTP fallback, counted: it must not be used.
    let content = Arc::new(Mutex::new(Content {
        plan: Vec::new(),
        archive: std::fs::read(&archive_path).unwrap(),
        torrent: torrent.clone(),
    }));
    let server = Server::start(content, Behaviour::default());
    let image = PlanImage {
        osimage: "big".into(),
        revision: 1,
        torrent_url: String::new(),
        http_url: format!("{}/image.tar.zst", server.url()),
        sha256,
        size,
        info_hash: String::new(),
        http_mirrors: Vec::new(),
        torrent_mirrors: Vec::new(),
    };

    // Each agent knows the seeder and the agents started before it: all of them meet.
    let mut swarms = Vec::new();
    for i in 0..3 {
        let mut peers = vec![seed_addr];
        for s in &swarms {
            let s: &Swarm = s;
            peers.push(SocketAddr::from(([127, 0, 0, 1], s.listen_port().expect("agent listens"))));
        }
        let opts = SwarmOptions {
            listen_ip: Some("127.0.0.1".parse().unwrap()),
            initial_peers: peers,
            window: WINDOW,
            ..Default::default()
        };
        swarms.push(Swarm::start(torrent.clone().into(), &dir.path().join(format!("scratch{i}")), opts).await.unwrap());
    }
    let client = Client::new(&server.url(), "node001", TOKEN).unwrap();
    let reporter = Reporter::new(client.clone());
    let roots: Vec<PathBuf> = (0..3).map(|i| dir.path().join(format!("root{i}"))).collect();
    let jobs: Vec<Job> = roots
        .iter()
        .map(|root| {
            std::fs::create_dir_all(root).unwrap();
            Job {
                image: &image,
                root,
                sink: download::Sink::Unpack,
                os: Arc::new(luna_agent::os::RealOs),
                client: &client,
                reporter: &reporter,
                stall: std::time::Duration::from_secs(30),
                unpack: true,
            }
        })
        .collect();
    // The agents prepare (partscript, mounts) while their swarms already run: the readers start
    // late, with the swarms long able to fill the window.
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    let started = std::time::Instant::now();
    let results = futures::future::join_all(jobs.iter().zip(&swarms).map(|(j, s)| download::fetch(j, Some(s)))).await;
    eprintln!("3 fetches took {:?}", started.elapsed());
    for (i, (r, s)) in results.into_iter().zip(&swarms).enumerate() {
        let f = r.expect("fetch");
        eprintln!(
            "agent {i}: {} from peers, {} over http, window peak {}",
            f.bytes_from_swarm,
            f.bytes_from_http,
            s.window.peak_bytes()
        );
        assert_eq!(f.bytes_from_http, 0, "agent {i} fell back to http");
        assert_eq!(f.bytes_from_swarm, size);
        assert_eq!(f.attempts, 1);
        assert!(s.window.peak_bytes() <= WINDOW + (1 << 20), "agent {i} window peak {}", s.window.peak_bytes());
        assert!(!s.window.evicted_unread(), "agent {i} dropped an unread piece");
    }
    assert!(server.image_requests.lock().unwrap().is_empty());
    for s in swarms {
        s.stop(true).await;
    }
    seed.stop().await;
}

/// `luna-agent bench-fetch`: one process seeds, a second fetches through the swarm and unpacks,
/// and its peak RSS is reported; the whole image must come from the peer.
#[test]
fn bench_fetch_reports_the_peak_rss_of_a_swarm_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("image.tar.zst");
    let (_, size) = write_big_archive(&archive, 24);
    let scratch = dir.path().join("scratch");
    let run = |archive: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_luna-agent"))
            .arg("bench-fetch")
            .arg(archive)
            .arg(&scratch)
            .output()
            .unwrap()
    };
    let out = run(&archive);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{size} bytes from peers, 0 over http")), "{stdout}");
    let rss: f64 = stdout
        .split("peak RSS ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|mib| mib.parse().ok())
        .unwrap_or_else(|| panic!("no peak RSS in {stdout}"));
    assert!(rss > 1.0 && rss < 64.0, "peak RSS {rss} MiB");
    assert!(!scratch.join("fetch").exists(), "the bench cleans up after itself");

    let missing = dir.path().join("no-such.tar.zst");
    let out = run(&missing);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such.tar.zst"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_cloud_init_get_a_nocloud_seed_instead_of_luna_files() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    let archive = make_archive_with(true);
    {
        let mut c = env.content.lock().unwrap();
        c.archive = archive.clone();
        c.plan = serde_json::to_vec(&plan(&server.url(), &archive)).unwrap();
    }
    install::install(&env.cfg, fake()).await.expect("install");
    let seed = env.sysroot.join(luna_agent::cloudinit::SEED_DIR);
    for f in ["meta-data", "user-data", "network-config"] {
        assert_eq!(std::fs::read_to_string(seed.join(f)).unwrap(), format!("{f} of node001\n"), "{f}");
    }
    let cfg = std::fs::read_to_string(env.sysroot.join(luna_agent::cloudinit::DATASOURCE_CFG)).unwrap();
    assert!(cfg.contains("NoCloud"), "{cfg}");
    // cloud-init configures the node: luna's own personality files are not written.
    assert_eq!(std::fs::read_to_string(env.sysroot.join("etc/hostname")).unwrap(), "image\n");
    assert!(!env.sysroot.join("etc/systemd/network/10-luna-ens3.network").exists());
    let reports = server.reports.lock().unwrap().clone();
    let personality = reports.iter().find(|r| r.step == "personality").expect("personality reported");
    assert!(personality.message.as_deref().unwrap_or("").contains("cloud-init seed"), "{personality:?}");
    assert_eq!(reports.last().unwrap().step, "installed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_without_cloud_init_keep_lunas_personality() {
    let (env, start) = setup("");
    let _server = start("", Behaviour::default());
    install::install(&env.cfg, fake()).await.expect("install");
    assert!(!env.sysroot.join(luna_agent::cloudinit::SEED_DIR).exists());
    assert_eq!(std::fs::read_to_string(env.sysroot.join("etc/hostname")).unwrap(), "node001\n");
}

/// Root mode overlay through the fake OS: the image is kept as a file in its own tmpfs
/// (verified), loop-mounted, and /sysroot becomes the overlay; personality and post-script
/// then write into /sysroot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_mode_keeps_the_image_as_a_file_and_mounts_the_overlay() {
    let (env, start) = setup("");
    let server = start("", Behaviour::default());
    set_plan(&env, &server, |p| {
        p.root = luna_core::model::RootMode::Overlay;
        p.partscript = luna_core::model::DEFAULT_PARTSCRIPT.into();
        p.postscript = "echo \"$LUNA_HOSTNAME\" > post.out".into();
    });
    let os = fake();
    install::install(&env.cfg, os.clone()).await.expect("install");
    let layout = luna_agent::overlay::Layout::new(&env.cfg.scratch);
    assert_eq!(std::fs::read(layout.image_file()).unwrap(), env.archive, "the verified bytes, as a file");
    assert!(!env.sysroot.join("usr/bin/big").exists(), "nothing unpacked");
    let calls = os.calls();
    assert!(calls.contains(&OsCall::LoopAttach { file: layout.image_file(), read_only: true }), "{calls:?}");
    let mounts: Vec<(String, PathBuf)> = calls
        .iter()
        .filter_map(|c| match c {
            OsCall::Mount { source, target, bind: false, .. } => Some((source.clone(), target.clone())),
            OsCall::MountReadOnly { source, target, .. } => Some((source.clone(), target.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        mounts,
        [
            ("tmpfs".to_string(), layout.image_dir()),
            ("/dev/loop7".to_string(), layout.lower()),
            ("tmpfs".to_string(), layout.rw()),
            ("overlay".to_string(), env.sysroot.clone()),
        ],
        "no tmpfs on /sysroot: the default partscript is not run under the overlay"
    );
    assert!(!calls.iter().any(|c| matches!(c, OsCall::Script { name, .. } if name == "partscript")));
    assert_eq!(std::fs::read_to_string(env.sysroot.join("etc/hostname")).unwrap(), "node001\n");
    assert_eq!(std::fs::read_to_string(env.sysroot.join("post.out")).unwrap(), "node001\n");
    let steps = server.steps();
    assert_eq!(
        steps,
        [
            "plan",
            "prescript",
            "partscript",
            "download",
            "verify",
            "unpack",
            "overlay",
            "personality",
            "postscript",
            "installed"
        ]
    );
}
