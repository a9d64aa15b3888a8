//! `lchroot` against a real luna-server on 127.0.0.1: the image's kernel from `uname -r` for a
//! dynamic (coreutils) and a static (busybox) binary and in /proc/sys/kernel/osrelease, the
//! mounts inside, exit status passed through, `luna osimage kernels` and `change
//! --kernel-version`, pack refused while a session is open, and no mount anywhere on the host
//! after the lchroot process is SIGKILLed. Privileged (root: namespaces, mounts, chroot);
//! needs busybox (static).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use luna_tests::{cargo_bin, free_port, privileged, test_assets, work_dir, ChildGuard, Cluster, ClusterOptions, Netns};

const KVER: &str = "6.1.0-99-lchroot";
const OLD_KVER: &str = "5.10.0-1-lchroot";

struct Server {
    _guard: ChildGuard,
    dir: tempfile::TempDir,
    url: String,
    /// The namespace the server and the commands run in (host's when `None`); dropped last.
    ns: Option<Netns>,
}

impl Server {
    fn start() -> Server {
        Server::start_in(None)
    }

    fn command(&self, program: &Path) -> Command {
        match &self.ns {
            Some(ns) => ns.command(program),
            None => Command::new(program),
        }
    }

    fn start_in(ns: Option<Netns>) -> Server {
        std::fs::create_dir_all(work_dir()).unwrap();
        let dir = tempfile::Builder::new().prefix("lchroot-").tempdir_in(work_dir()).unwrap();
        let d = dir.path();
        let port = free_port().unwrap();
        let api_port = loop {
            let p = free_port().unwrap();
            if p != port {
                break p;
            }
        };
        let config = format!(
            "store = \"sqlite://{d}/luna.db\"\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{d}/token\"\n\
             data_dir = \"{d}/data\"\n[http]\napi_listen = \"127.0.0.1:{api_port}\"\n[tftp]\nenabled = false\n[image]\nseed = false\ndracut = \"/bin/false\"\n",
            d = d.display()
        );
        std::fs::write(d.join("luna.toml"), config).unwrap();
        let server = cargo_bin("luna-server").unwrap();
        let init = Command::new(&server).arg("--config").arg(d.join("luna.toml")).arg("init").output().unwrap();
        assert!(init.status.success(), "init: {}", String::from_utf8_lossy(&init.stderr));
        let mut cmd = match &ns {
            Some(ns) => ns.command(&server),
            None => Command::new(&server),
        };
        cmd.arg("--config").arg(d.join("luna.toml")).arg("serve");
        let guard = ChildGuard::spawn(&mut cmd, "lchroot-luna-server").unwrap();
        guard.wait_for("http listening", Duration::from_secs(60)).unwrap();
        let s = Server { _guard: guard, url: format!("https://127.0.0.1:{api_port}"), dir, ns };
        s.luna_ok(&["cluster", "change", "--frontend-address", "127.0.0.1"]);
        s
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("LUNA_SERVER", &self.url)
            .env("LUNA_CA", self.dir.path().join("data/tls/ca.pem"))
            .env("LUNA_TOKEN_FILE", self.dir.path().join("token"))
            .env("LUNA_DATA_DIR", self.data_dir())
            .env_remove("LUNA_TOKEN");
    }

    fn luna(&self, args: &[&str]) -> Output {
        let mut cmd = self.command(&cargo_bin("luna").unwrap());
        self.env(&mut cmd);
        cmd.args(args).output().unwrap()
    }

    fn luna_ok(&self, args: &[&str]) -> String {
        let out = self.luna(args);
        assert!(out.status.success(), "luna {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn lchroot(&self, image: &str, command: &[&str]) -> Command {
        let mut cmd = self.command(&cargo_bin("lchroot").unwrap());
        self.env(&mut cmd);
        cmd.arg(image).args(command);
        cmd
    }

    fn lchroot_out(&self, image: &str, command: &[&str]) -> (i32, String, String) {
        let out = self.lchroot(image, command).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// Copies `program` and the libraries `ldd` names into `root` at the same paths.
fn copy_with_libs(root: &Path, program: &str, to: &str) {
    let dst = root.join(to.trim_start_matches('/'));
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(program, &dst).unwrap();
    let ldd = Command::new("ldd").arg(program).output().unwrap();
    for word in String::from_utf8_lossy(&ldd.stdout).split_whitespace() {
        if word.starts_with('/') {
            let lib = root.join(word.trim_start_matches('/'));
            std::fs::create_dir_all(lib.parent().unwrap()).unwrap();
            std::fs::copy(word, &lib).unwrap();
        }
    }
}

/// A tiny image: busybox (static) as /bin/sh and friends, coreutils' dynamic `uname` as
/// /usr/bin/uname-dyn with its libraries, and two kernels.
fn build_image(root: &Path) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"].into_iter().find(|p| Path::new(p).is_file());
    let busybox = busybox.expect("busybox is needed (apt-get install busybox)");
    let file = Command::new("file").arg(busybox).output().map(|o| o.stdout).unwrap_or_default();
    assert!(String::from_utf8_lossy(&file).contains("statically linked"), "{busybox} must be static");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for tool in ["sh", "cat", "sleep", "echo", "hostname", "touch", "ls", "uname"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(tool)).unwrap();
    }
    copy_with_libs(root, "/usr/bin/uname", "/usr/bin/uname-dyn");
    for v in [KVER, OLD_KVER] {
        std::fs::create_dir_all(root.join("boot")).unwrap();
        std::fs::write(root.join(format!("boot/vmlinuz-{v}")), b"not a kernel").unwrap();
        std::fs::create_dir_all(root.join(format!("lib/modules/{v}/kernel"))).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/resolv.conf"), b"nameserver 192.0.2.1\n").unwrap();
}

fn host_mounts_under(root: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = root.to_string_lossy().into_owned();
    text.lines().filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&root))).map(String::from).collect()
}

#[test]
fn lchroot_reports_the_image_kernel_mounts_and_exit_status() {
    if !privileged() {
        return;
    }
    let s = Server::start();
    let root = s.dir.path().join("img-a");
    build_image(&root);
    s.luna_ok(&["osimage", "add", "lt-lchroot-a", "--path", root.to_str().unwrap()]);

    // kernels: both listed, in version order; a version the tree lacks is refused
    let k = s.luna_ok(&["osimage", "kernels", "lt-lchroot-a"]);
    assert!(k.starts_with(&format!("{OLD_KVER}\n{KVER}\n")), "{k}");
    let bad = s.luna(&["osimage", "change", "lt-lchroot-a", "--kernel-version", "7.7.7"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("no kernel 7.7.7") && err.contains(KVER), "{err}");
    let shown = s.luna_ok(&["osimage", "show", "lt-lchroot-a", "--json"]);
    assert!(!shown.contains("7.7.7"), "a refused change changes nothing: {shown}");
    s.luna_ok(&["osimage", "change", "lt-lchroot-a", "--kernel-version", KVER]);
    assert!(s.luna_ok(&["osimage", "kernels", "lt-lchroot-a"]).contains(&format!("{KVER}  (boots)")));

    let host_release = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    assert_ne!(host_release.trim(), KVER);
    for (what, cmd) in [
        ("dynamic coreutils uname", &["/usr/bin/uname-dyn", "-r"][..]),
        ("static busybox uname", &["/bin/busybox", "uname", "-r"][..]),
        ("osrelease", &["/bin/cat", "/proc/sys/kernel/osrelease"][..]),
    ] {
        let (code, out, err) = s.lchroot_out("lt-lchroot-a", cmd);
        assert_eq!((code, out.trim()), (0, KVER), "{what}: {err}");
    }
    let (code, out, err) = s.lchroot_out("lt-lchroot-a", &["/usr/bin/uname-dyn", "-a"]);
    assert!(code == 0 && out.contains(KVER) && out.contains("lt-lchroot-a"), "uname -a: {out} {err}");

    // the mounts inside, the image name as hostname, the host's resolver
    let (code, out, err) = s.lchroot_out("lt-lchroot-a", &["/bin/cat", "/proc/self/mountinfo"]);
    assert_eq!(code, 0, "{err}");
    let points: Vec<&str> = out.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    for p in ["/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp", "/etc/resolv.conf"] {
        assert!(points.contains(&p), "{p} not mounted inside: {points:?}");
    }
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let (_, out, _) = s.lchroot_out("lt-lchroot-a", &["/bin/cat", "/etc/resolv.conf"]);
    assert_eq!(out, host_resolv);
    assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(), "nameserver 192.0.2.1\n");
    let (_, out, _) = s.lchroot_out("lt-lchroot-a", &["/bin/hostname"]);
    assert_eq!(out.trim(), "lt-lchroot-a");

    // exit status, a signal, a command that does not exist
    let (code, _, _) = s.lchroot_out("lt-lchroot-a", &["/bin/sh", "-c", "exit 7"]);
    assert_eq!(code, 7);
    let (code, _, _) = s.lchroot_out("lt-lchroot-a", &["/bin/sh", "-c", "kill -TERM $$"]);
    assert_eq!(code, 128 + 15);
    let (code, _, err) = s.lchroot_out("lt-lchroot-a", &["/no/such/program"]);
    assert!(code == 125 && err.contains("/no/such/program") && err.contains("lt-lchroot-a"), "{code} {err}");
    let (code, _, err) = s.lchroot_out("lt-lchroot-nope", &["/bin/sh"]);
    assert!(code == 125 && err.contains("lt-lchroot-nope"), "{code} {err}");
    assert!(host_mounts_under(&root).is_empty(), "{:?}", host_mounts_under(&root));
}

#[test]
fn lchroot_blocks_pack_and_leaves_no_mount_when_killed() {
    if !privileged() {
        return;
    }
    let s = Server::start();
    let root = s.dir.path().join("img-b");
    build_image(&root);
    s.luna_ok(&["osimage", "add", "lt-lchroot-b", "--path", root.to_str().unwrap(), "--kernel-version", KVER]);

    let mut cmd = s.lchroot("lt-lchroot-b", &["/bin/sh", "-c", "echo ready $$; exec /bin/sleep 120"]);
    let mut session = ChildGuard::spawn(&mut cmd, "lt-lchroot-session").unwrap();
    let line = session.wait_for("ready", Duration::from_secs(30)).unwrap();
    let inner: i32 = line.split_whitespace().last().unwrap().parse().unwrap();
    let lchroot_pid = session.pid() as i32;

    // the session's mounts exist in its own mount namespace only (paths there are seen from
    // inside the chroot)
    let inside = std::fs::read_to_string(format!("/proc/{inner}/mountinfo")).unwrap();
    assert!(inside.contains(" /proc/sys/kernel/osrelease "), "{inside}");
    let ns = std::fs::read_link(format!("/proc/{inner}/ns/mnt")).unwrap();
    assert_ne!(ns, std::fs::read_link("/proc/self/ns/mnt").unwrap());
    assert!(host_mounts_under(&root).is_empty(), "{:?}", host_mounts_under(&root));

    // pack is refused, naming the holder
    let out = s.luna(&["osimage", "pack", "lt-lchroot-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!("osimage 'lt-lchroot-b' is open in lchroot (pid {lchroot_pid})")),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");
    // a second session shares the lock
    let (code, out2, e2) = s.lchroot_out("lt-lchroot-b", &["/bin/echo", "second"]);
    assert_eq!((code, out2.trim()), (0, "second"), "{e2}");

    // the processes in the session's mount namespace, taken before the kill: afterwards the
    // namespace's inode number can be reused by a new namespace (another test's session), so
    // "who is in it now" would count strangers
    let in_ns = || -> Vec<String> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path().join("ns/mnt")).is_ok_and(|o| o == ns))
            .map(|e| e.path().display().to_string())
            .collect()
    };
    let members = in_ns();
    assert!(members.contains(&format!("/proc/{inner}")), "{members:?}");

    // SIGKILL to lchroot alone: the command dies with it, and nothing is left mounted
    // SAFETY: kill(2) on the pid of a child we spawned.
    assert_eq!(unsafe { libc::kill(lchroot_pid, libc::SIGKILL) }, 0);
    session.wait_timeout(Duration::from_secs(10)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{inner}")).exists() {
        assert!(Instant::now() < deadline, "the session's command outlived lchroot");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(host_mounts_under(&root).is_empty(), "{:?}", host_mounts_under(&root));
    // no process is left in the session's mount namespace, so the kernel dropped its mounts
    // (helpers killed with lchroot, e.g. by their parent-death signal, may take a moment to go)
    let left = || in_ns().into_iter().filter(|p| members.contains(p)).collect::<Vec<_>>();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !left().is_empty() {
        assert!(Instant::now() < deadline, "{:?} still in the session's mount namespace", left());
        std::thread::sleep(Duration::from_millis(50));
    }
    // the lock went with the process: pack is no longer refused for lchroot (it fails later,
    // on the stand-in image's kernel)
    let out = s.luna(&["osimage", "pack", "lt-lchroot-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("open in lchroot"), "{err}");
    assert!(!root.join("proc/self").exists(), "nothing mounted in the tree");
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer with its length.
    let r = unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {}: {}", path.display(), std::io::Error::last_os_error());
}

fn get_xattr(path: &Path, name: &str) -> Vec<u8> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 256];
    // SAFETY: valid C strings and a buffer with its length.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(r >= 0, "getxattr {}: {}", path.display(), std::io::Error::last_os_error());
    buf[..r as usize].to_vec()
}

#[test]
fn clone_with_path_copies_the_tree_exactly() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    if !privileged() {
        return;
    }
    let s = Server::start();
    let src = s.dir.path().join("img-c");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/a"), b"hard linked").unwrap();
    std::fs::hard_link(src.join("etc/a"), src.join("etc/b")).unwrap();
    set_xattr(&src.join("etc/a"), "user.luna", b"kept");
    set_xattr(&src.join("etc"), "trusted.luna", b"dir too");
    // a POSIX ACL (an xattr of its own kind, system.posix_acl_access)
    let acl = std::process::Command::new(luna_tests::require_tool("setfacl").unwrap())
        .args(["-m", "u:4242:rw"])
        .arg(src.join("etc/a"))
        .status()
        .unwrap();
    assert!(acl.success(), "setfacl");
    std::fs::create_dir_all(src.join("dev")).unwrap();
    let null = std::ffi::CString::new(src.join("dev/null").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path; makes a character device 1:3 like /dev/null.
    assert_eq!(unsafe { libc::mknod(null.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) }, 0);
    let sparse = std::fs::File::create(src.join("sparse")).unwrap();
    sparse.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"end", (64 << 20) - 3).unwrap();
    drop(sparse);
    std::os::unix::fs::symlink("etc/a", src.join("link")).unwrap();
    s.luna_ok(&["osimage", "add", "lt-lchroot-c", "--path", src.to_str().unwrap(), "--kernel-opts", "quiet"]);

    let dst = s.dir.path().join("img-c2");
    let out = s.luna_ok(&["osimage", "clone", "lt-lchroot-c", "lt-lchroot-c2", "--path", dst.to_str().unwrap()]);
    assert!(out.contains("lt-lchroot-c2"), "{out}");
    let a = std::fs::metadata(dst.join("etc/a")).unwrap();
    assert_eq!(a.ino(), std::fs::metadata(dst.join("etc/b")).unwrap().ino(), "hard link kept");
    assert_eq!(a.nlink(), 2);
    assert_eq!(get_xattr(&dst.join("etc/a"), "user.luna"), b"kept");
    assert_eq!(get_xattr(&dst.join("etc"), "trusted.luna"), b"dir too");
    let acl = std::process::Command::new(luna_tests::require_tool("getfacl").unwrap())
        .args(["-n", "-c"])
        .arg(dst.join("etc/a"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&acl.stdout).contains("user:4242:rw-"), "ACL kept: {acl:?}");
    let dev = std::fs::symlink_metadata(dst.join("dev/null")).unwrap();
    assert!(dev.file_type().is_char_device() && dev.rdev() == libc::makedev(1, 3), "device node kept");
    let sp = std::fs::metadata(dst.join("sparse")).unwrap();
    assert_eq!(sp.len(), 64 << 20);
    assert!(sp.blocks() * 512 < 1 << 20, "sparse file stays sparse: {} blocks", sp.blocks());
    assert_eq!(std::fs::read_link(dst.join("link")).unwrap(), Path::new("etc/a"));
    let obj = s.luna_ok(&["osimage", "show", "lt-lchroot-c2", "--json"]);
    let obj: serde_json::Value = serde_json::from_str(&obj).unwrap();
    assert_eq!(obj["path"], dst.to_str().unwrap());
    assert_eq!(obj["kernel_opts"], "quiet", "settings copied");
    // no staging directory left
    let left: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("luna-tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // an existing destination is refused and nothing is recorded
    let out = s.luna(&["osimage", "clone", "lt-lchroot-c", "lt-lchroot-c3", "--path", dst.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already exists") && err.contains("img-c2"), "{err}");
    assert!(!s.luna(&["osimage", "show", "lt-lchroot-c3"]).status.success());
}

/// Writes `bytes` as a blob of the OCI layout; returns its descriptor fields.
fn put_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    use sha2::Digest as _;
    let hex = hex::encode(sha2::Sha256::digest(bytes));
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

fn tar_of(dir: &Path, out: &Path) -> Vec<u8> {
    let st =
        Command::new("tar").arg("-C").arg(dir).arg("--numeric-owner").arg("-cf").arg(out).arg(".").status().unwrap();
    assert!(st.success());
    std::fs::read(out).unwrap()
}

/// An OCI image layout with two layers: the first (gzip) a base with busybox, the second
/// (plain tar) removes etc/gone with a whiteout and empties opq/ with an opaque marker.
fn build_oci_layout(work: &Path) -> PathBuf {
    let l1 = work.join("l1");
    for d in ["etc", "opq/sub", "bin"] {
        std::fs::create_dir_all(l1.join(d)).unwrap();
    }
    std::fs::write(l1.join("etc/keep"), b"keep\n").unwrap();
    std::fs::write(l1.join("etc/gone"), b"gone\n").unwrap();
    std::fs::write(l1.join("opq/old1"), b"old\n").unwrap();
    std::fs::write(l1.join("opq/sub/old2"), b"old\n").unwrap();
    std::fs::copy("/bin/busybox", l1.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", l1.join("bin/sh")).unwrap();
    let l2 = work.join("l2");
    std::fs::create_dir_all(l2.join("etc")).unwrap();
    std::fs::create_dir_all(l2.join("opq")).unwrap();
    std::fs::write(l2.join("etc/.wh.gone"), b"").unwrap();
    std::fs::write(l2.join("opq/.wh..wh..opq"), b"").unwrap();
    std::fs::write(l2.join("opq/new"), b"new\n").unwrap();
    std::fs::write(l2.join("etc/added"), b"added\n").unwrap();

    let layer1_tar = tar_of(&l1, &work.join("l1.tar"));
    let st = Command::new("gzip").arg("-n").arg("-f").arg(work.join("l1.tar")).status().unwrap();
    assert!(st.success());
    let layer1 = std::fs::read(work.join("l1.tar.gz")).unwrap();
    let layer2 = tar_of(&l2, &work.join("l2.tar"));

    oci_layout_of(&work.join("layout"), &layer1, &layer1_tar, &layer2)
}

/// An OCI layout of two layers (`layer1` stored as given, `layer1_tar` its uncompressed tar;
/// `layer2` an uncompressed tar).
fn oci_layout_of(layout: &Path, layer1: &[u8], layer1_tar: &[u8], layer2: &[u8]) -> PathBuf {
    use sha2::Digest as _;
    let layout = layout.to_path_buf();
    let (d1, s1) = put_blob(&layout, layer1);
    let (d2, s2) = put_blob(&layout, layer2);
    let diff1 = format!("sha256:{}", hex::encode(sha2::Sha256::digest(layer1_tar)));
    let diff2 = format!("sha256:{}", hex::encode(sha2::Sha256::digest(layer2)));
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff1, diff2]}});
    let (dc, sc) = put_blob(&layout, config.to_string().as_bytes());
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dc, "size": sc},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d1, "size": s1},
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d2, "size": s2}]});
    let (dm, sm) = put_blob(&layout, manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": dm, "size": sm}]});
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    layout
}

fn tree_listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".luna-"))
        .collect()
}

#[test]
fn import_applies_oci_layers_with_whiteouts_and_refuses_a_corrupt_digest() {
    if !privileged() {
        return;
    }
    let s = Server::start();
    let work = s.dir.path().join("oci");
    std::fs::create_dir_all(&work).unwrap();
    let layout = build_oci_layout(&work);
    let expected = ["bin", "bin/busybox", "bin/sh", "etc", "etc/added", "etc/keep", "opq", "opq/new"];

    // from the layout directory
    let dst = s.dir.path().join("img-oci");
    let out = s.luna(&[
        "osimage",
        "import",
        "lt-lchroot-oci",
        "--from",
        layout.to_str().unwrap(),
        "--path",
        dst.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("layer 1/2") && err.contains("layer 2/2"), "progress: {err}");
    assert_eq!(tree_listing(&dst), expected);
    assert_eq!(std::fs::read_to_string(dst.join("etc/keep")).unwrap(), "keep\n");
    let obj: serde_json::Value =
        serde_json::from_str(&s.luna_ok(&["osimage", "show", "lt-lchroot-oci", "--json"])).unwrap();
    assert_eq!(obj["path"], dst.to_str().unwrap());

    // from an archive of it (what docker save and skopeo oci-archive write)
    let archive = work.join("image.tar");
    tar_of(&layout, &archive);
    let dst2 = s.dir.path().join("img-oci-tar");
    s.luna_ok(&[
        "osimage",
        "import",
        "lt-lchroot-oci2",
        "--from",
        archive.to_str().unwrap(),
        "--path",
        dst2.to_str().unwrap(),
    ]);
    assert_eq!(tree_listing(&dst2), expected);

    // the imported image works in lchroot: install a file
    let (code, _, e) = s.lchroot_out("lt-lchroot-oci", &["/bin/sh", "-c", "echo from-lchroot > /etc/installed"]);
    assert_eq!(code, 0, "{e}");
    assert_eq!(std::fs::read_to_string(dst.join("etc/installed")).unwrap(), "from-lchroot\n");

    // a layer whose bytes do not match its digest: a named error, nothing left
    let manifest_layers: Vec<PathBuf> =
        std::fs::read_dir(layout.join("blobs/sha256")).unwrap().flatten().map(|e| e.path()).collect();
    let l2 = manifest_layers
        .iter()
        .find(|p| std::fs::read(p).unwrap().windows(6).any(|w| w == b"opq/ne"))
        .expect("the second layer's blob")
        .clone();
    let mut bytes = std::fs::read(&l2).unwrap();
    let at = bytes.windows(6).position(|w| w == b"added\n").unwrap();
    bytes[at] = b'X';
    std::fs::write(&l2, bytes).unwrap();
    let dst3 = s.dir.path().join("img-bad");
    let out = s.luna(&[
        "osimage",
        "import",
        "lt-lchroot-bad",
        "--from",
        layout.to_str().unwrap(),
        "--path",
        dst3.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    let name = l2.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!out.status.success() && err.contains("digest mismatch") && err.contains(&name), "{err}");
    assert!(!dst3.exists(), "no tree");
    assert!(leftovers(s.dir.path()).is_empty(), "{:?}", leftovers(s.dir.path()));
    assert!(!s.luna(&["osimage", "show", "lt-lchroot-bad"]).status.success(), "no object");
}

/// A node for `grab`: sshd (Debian's openssh-server) in its own namespace, chrooted into a
/// small tree that has bash and rsync (what `rsync --server` over ssh needs) and some files.
#[test]
fn grab_copies_a_running_node_except_the_excludes() {
    if !privileged() {
        return;
    }
    for tool in ["/usr/sbin/sshd", "/usr/bin/ssh", "/usr/bin/rsync", "/usr/bin/ssh-keygen"] {
        assert!(Path::new(tool).is_file(), "{tool} is needed (scripts/install-deps.sh installs it)");
    }
    let client_ns = Netns::new().unwrap();
    let node_ns = Netns::new().unwrap();
    client_ns.add_veth("lt-grab0", &node_ns, "lt-grab1").unwrap();
    client_ns.add_addr("lt-grab0", "10.77.16.1/24").unwrap();
    node_ns.add_addr("lt-grab1", "10.77.16.2/24").unwrap();
    let s = Server::start_in(Some(client_ns));
    let d = s.dir.path();

    // the node's tree
    let node = d.join("node");
    copy_with_libs(&node, "/bin/bash", "/bin/bash");
    copy_with_libs(&node, "/usr/bin/rsync", "/usr/bin/rsync");
    for (f, text) in [
        ("etc/app.conf", "node-app\n"),
        ("etc/hostname", "node-host\n"),
        ("etc/machine-id", "node-machine-id\n"),
        ("etc/ssh/ssh_host_ed25519_key", "node-key\n"),
        ("var/log/messages", "node-log\n"),
        ("proc/cpuinfo", "node-proc\n"),
        ("opt/data/big", "data\n"),
    ] {
        std::fs::create_dir_all(node.join(f).parent().unwrap()).unwrap();
        std::fs::write(node.join(f), text).unwrap();
    }
    // the image before
    let img = d.join("img-grab");
    for (f, text) in [("etc/hostname", "image-host\n"), ("etc/old", "old\n"), ("var/log/image.log", "image-log\n")] {
        std::fs::create_dir_all(img.join(f).parent().unwrap()).unwrap();
        std::fs::write(img.join(f), text).unwrap();
    }

    // sshd for root with a key, chrooted into the node's tree
    let keygen = |path: &Path| {
        let st = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(path).status().unwrap();
        assert!(st.success());
    };
    keygen(&d.join("host_key"));
    keygen(&d.join("client_key"));
    std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let config = format!(
        "ListenAddress 10.77.16.2\nPort 22\nHostKey {d}/host_key\nPidFile none\nUsePAM no\nStrictModes no\n\
         PermitRootLogin prohibit-password\nAuthorizedKeysFile {d}/authorized_keys\nChrootDirectory {node}\n",
        d = d.display(),
        node = node.display()
    );
    std::fs::write(d.join("sshd_config"), config).unwrap();
    let mut sshd_cmd = node_ns.command("/usr/sbin/sshd");
    sshd_cmd.arg("-D").arg("-e").arg("-f").arg(d.join("sshd_config"));
    let sshd = ChildGuard::spawn(&mut sshd_cmd, "lt-lchroot-sshd").unwrap();
    sshd.wait_for("Server listening on 10.77.16.2", Duration::from_secs(20)).unwrap();

    s.luna_ok(&["network", "add", "lt-grab", "--cidr", "10.77.16.0/24"]);
    s.luna_ok(&["osimage", "add", "lt-lchroot-grab", "--path", img.to_str().unwrap()]);
    s.luna_ok(&["group", "add", "lt-grab", "--osimage", "lt-lchroot-grab", "--network", "lt-grab"]);
    s.luna_ok(&["node", "add", "lt-grab-node", "--group", "lt-grab", "--ip", "BOOTIF=10.77.16.2"]);
    let rsh = format!(
        "ssh -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
        d.join("client_key").display()
    );
    let grab = |dry: bool| {
        let mut cmd = s.command(&cargo_bin("luna").unwrap());
        s.env(&mut cmd);
        cmd.env("RSYNC_RSH", &rsh).args(["osimage", "grab", "lt-lchroot-grab", "--from", "lt-grab-node"]);
        if dry {
            cmd.arg("--dry-run");
        }
        cmd.output().unwrap()
    };

    // --dry-run lists the changes and makes none
    let before = tree_listing(&img);
    let out = grab(true);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("etc/app.conf") && text.lines().any(|l| l.contains("deleting") && l.ends_with(" etc/old")),
        "{text}"
    );
    assert!(!text.contains("etc/hostname") && !text.contains("machine-id") && !text.contains("ssh_host"), "{text}");
    assert_eq!(tree_listing(&img), before);

    let out = grab(false);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(img.join(f)).ok();
    assert_eq!(read("etc/app.conf").as_deref(), Some("node-app\n"));
    assert_eq!(read("opt/data/big").as_deref(), Some("data\n"));
    assert_eq!(read("etc/old"), None, "gone from the node, gone from the image");
    assert_eq!(read("etc/hostname").as_deref(), Some("image-host\n"), "excluded: the image keeps its own");
    assert_eq!(read("var/log/image.log").as_deref(), Some("image-log\n"));
    for excluded in ["etc/machine-id", "etc/ssh/ssh_host_ed25519_key", "var/log/messages", "proc/cpuinfo"] {
        assert_eq!(read(excluded), None, "{excluded} must not be grabbed");
    }
    assert!(img.join("proc").is_dir(), "the directory itself is kept");
    assert!(leftovers(d).is_empty(), "{:?}", leftovers(d));
    drop(sshd);
}

/// The whole image life once, as an admin does it: import a container image (the busybox test
/// tree as a base layer plus a second layer), install a file with lchroot (and a line in the
/// image's init that prints it), pack, and PXE-boot a VM that installs the image through the
/// agent and prints the file from the booted image. One VM (about two minutes under TCG).
#[test]
fn imported_image_changed_in_lchroot_boots_with_the_change() {
    if !privileged() {
        return;
    }
    const SUBNET: &str = "10.83.0";
    let assets = test_assets().expect("test assets");
    let c = Cluster::start(ClusterOptions { subnet: SUBNET.into(), ..ClusterOptions::default() }).unwrap();
    let work = c.dir().join("oci");
    std::fs::create_dir_all(work.join("l2/etc")).unwrap();
    std::fs::write(work.join("l2/etc/lt-layer2"), b"from layer 2\n").unwrap();
    let base = tar_of(&assets.rootfs, &work.join("base.tar"));
    let layer2 = tar_of(&work.join("l2"), &work.join("l2.tar"));
    let layout = oci_layout_of(&work.join("layout"), &base, &base, &layer2);
    let tree = c.dir().join("img-e2e");
    c.cli(&["osimage", "import", "lt-e2e", "--from", layout.to_str().unwrap(), "--path", tree.to_str().unwrap()])
        .unwrap();
    // dracut trimmed to what a virtio VM needs, as Cluster::add_osimage does
    let trim = serde_json::json!({
        "kernel_opts": "console=ttyS0 panic=-1 rd.retry=300 luna.stall=10",
        "dracut_modules_omit": ["systemd", "systemd-initrd", "systemd-networkd", "dracut-systemd", "plymouth",
            "i18n", "kernel-modules", "kernel-modules-extra", "qemu", "qemu-net"],
        "dracut_drivers_add": ["virtio_net", "virtio_pci", "af_packet"],
    });
    c.api("PATCH", "/api/v1/osimage/lt-e2e", Some(&trim)).unwrap();

    let script = "echo installed-by-lchroot > /etc/lt-lchroot-installed && \
        sed -i 's|^/usr/sbin/luna-report-booted|echo \"LT-LCHROOT-FILE $(cat /etc/lt-lchroot-installed) $(cat /etc/lt-layer2)\" >/dev/console; &|' /sbin/init && \
        uname -r";
    let out =
        c.ns.command(cargo_bin("lchroot").unwrap())
            .env("LUNA_SERVER", c.api_url())
            .env("LUNA_CA", c.ca())
            .env("LUNA_TOKEN_FILE", c.dir().join("token"))
            .env("LUNA_DATA_DIR", c.dir().join("data"))
            .env_remove("LUNA_TOKEN")
            .args(["lt-e2e", "/bin/sh", "-c", script])
            .output()
            .unwrap();
    assert!(out.status.success(), "lchroot: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), assets.kver, "uname -r inside is the image's kernel");

    c.pack("lt-e2e", Duration::from_secs(600)).unwrap();
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", "lt-e2e", "--network", "prov"]).unwrap();
    let mac = "52:54:00:83:00:02";
    c.cli(&["node", "add", "lt-e2e-node", "--group", "compute", "--mac", mac]).unwrap();
    let vm = c.boot("lt-e2e-vm", mac).unwrap();
    let line = vm.wait_for("LT-LCHROOT-FILE", Duration::from_secs(420)).unwrap_or_else(|e| {
        panic!("the booted image did not print the file: {e}\n{}\n--- server\n{}", vm.serial().tail(40), c.server_log())
    });
    assert!(line.contains("installed-by-lchroot from layer 2"), "{line}");
}
