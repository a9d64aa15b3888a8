//! luna's TFTP server against real clients on 127.0.0.1: tftp-hpa's `tftp` and `atftp`
//! (`apt-get install -y tftp-hpa atftp`).

mod image_support;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use luna_server::tftp::{TftpConfig, TftpServer};
use tokio::process::Command;
use tokio::sync::watch;

struct Env {
    dir: tempfile::TempDir,
    port: u16,
    secret: Vec<u8>,
    _stop: watch::Sender<bool>,
}

fn require(bin: &str) {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file())).unwrap_or(false);
    assert!(found, "'{bin}' not found: apt-get install -y tftp-hpa atftp");
}

impl Env {
    async fn start() -> Env {
        require("tftp");
        require("atftp");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        let secret = b"root:x:0:0:this must never leave the server\n".to_vec();
        std::fs::write(dir.path().join("secret"), &secret).unwrap();
        std::fs::write(root.join("small.bin"), image_support::pattern(100_000, 1)).unwrap();
        std::fs::write(root.join("sub/nested.bin"), image_support::pattern(3_000, 2)).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("text.cfg"), b"#!ipxe\nchain http://x/\r\nlast line\n").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link-out")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("dir-out")).unwrap();
        let virt = dir.path().join("pkg");
        std::fs::create_dir_all(&virt).unwrap();
        std::fs::write(virt.join("undionly.kpxe"), image_support::pattern(74_213, 3)).unwrap();
        std::fs::write(virt.join("neighbour"), &secret).unwrap();

        let cfg = TftpConfig {
            root,
            bind: "127.0.0.1:0".parse().unwrap(),
            ipxe_files: [("undionly.kpxe".to_string(), virt.join("undionly.kpxe"))].into_iter().collect(),
            timeout_ms: 300,
            // All clients here talk from 127.0.0.1, standing in for many nodes at once.
            max_transfers_per_client: 512,
            ..TftpConfig::default()
        };
        let server = TftpServer::bind(cfg).await.unwrap();
        let port = server.local_addr().unwrap().port();
        let (stop, rx) = watch::channel(false);
        tokio::spawn(server.run(rx));
        Env { dir, port, secret, _stop: stop }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    async fn tftp_hpa(&self, args: &[&str], command: &str) -> Output {
        let mut cmd = Command::new("tftp");
        cmd.arg("127.0.0.1").arg(self.port.to_string()).args(args).arg("-c");
        cmd.args(command.split(' '));
        run(cmd).await
    }

    async fn atftp(&self, options: &[&str], remote: &str, local: &Path) -> Output {
        let mut cmd = Command::new("atftp");
        for o in options {
            cmd.arg("--option").arg(o);
        }
        cmd.args(["-g", "-r", remote, "-l"]).arg(local).arg("127.0.0.1").arg(self.port.to_string());
        run(cmd).await
    }
}

async fn run(mut cmd: Command) -> Output {
    cmd.kill_on_drop(true);
    let what = format!("{cmd:?}");
    match tokio::time::timeout(Duration::from_secs(120), cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: timed out"),
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_gets_files_in_binary_and_ascii() {
    let env = Env::start().await;
    for (remote, local) in
        [("small.bin", "root/small.bin"), ("sub/nested.bin", "root/sub/nested.bin"), ("empty", "root/empty")]
    {
        let out = env.out(&remote.replace('/', "_"));
        let o = env.tftp_hpa(&["-m", "binary"], &format!("get {remote} {}", out.display())).await;
        assert_eq!(read(&out), read(&env.dir.path().join(local)), "{remote}: {}", text(&o));
    }
    // A virtual file: served by name from its source path, not present in the root.
    let out = env.out("undionly.kpxe");
    let o = env.tftp_hpa(&["-v", "-m", "octet"], &format!("get undionly.kpxe {}", out.display())).await;
    assert_eq!(read(&out), read(&env.dir.path().join("pkg/undionly.kpxe")), "{}", text(&o));
    // netascii: the client turns CR LF back into LF and CR NUL into CR: same bytes as on disk.
    let out = env.out("text.cfg");
    let o = env.tftp_hpa(&["-m", "ascii"], &format!("get text.cfg {}", out.display())).await;
    assert_eq!(read(&out), read(&env.root().join("text.cfg")), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tftp_hpa_block_numbers_roll_over() {
    let env = Env::start().await;
    // 512-byte blocks: past 65535 blocks the number wraps to 0.
    let data = image_support::pattern(65_600 * 512 + 17, 4);
    std::fs::write(env.root().join("big.bin"), &data).unwrap();
    let out = env.out("big.bin");
    let o = env.tftp_hpa(&["-m", "binary"], &format!("get big.bin {}", out.display())).await;
    assert!(read(&out) == data, "rolled-over file differs: {}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atftp_negotiates_blksize_windowsize_tsize() {
    let env = Env::start().await;
    let data = image_support::pattern(3_000_000, 5);
    std::fs::write(env.root().join("mid.bin"), &data).unwrap();
    let cases: [&[&str]; 4] = [
        &["blksize 1428", "windowsize 8", "tsize 0"],
        &["blksize 65464", "windowsize 4"],
        &["blksize 512", "timeout 2"],
        &[],
    ];
    for (i, opts) in cases.iter().enumerate() {
        let out = env.out(&format!("mid{i}.bin"));
        let o = env.atftp(opts, "mid.bin", &out).await;
        assert!(o.status.success(), "{opts:?}: {}", text(&o));
        assert!(read(&out) == data, "{opts:?}: content differs: {}", text(&o));
    }
    // blksize 8 with a window: 70000 blocks, so the window also straddles the rollover.
    let data = image_support::pattern(8 * 70_000 + 5, 6);
    std::fs::write(env.root().join("tiny-blocks.bin"), &data).unwrap();
    let out = env.out("tiny-blocks.bin");
    let o = env.atftp(&["blksize 8", "windowsize 16"], "tiny-blocks.bin", &out).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(read(&out) == data, "blksize 8 content differs: {}", text(&o));
    // The virtual iPXE file through atftp too.
    let out = env.out("undi-atftp");
    let o = env.atftp(&["blksize 1428", "windowsize 8", "tsize 0"], "undionly.kpxe", &out).await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read(&out), read(&env.dir.path().join("pkg/undionly.kpxe")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_attempts_fail_with_both_clients() {
    let env = Env::start().await;
    let secret_abs = env.dir.path().join("secret").display().to_string();
    let attempts = [
        "../secret".to_string(),
        "sub/../../secret".to_string(),
        "..\\secret".to_string(),
        "sub\\..\\..\\secret".to_string(),
        "/../secret".to_string(),
        secret_abs.clone(),
        format!("{}/../secret", env.root().display()),
        "link-out".to_string(),
        "dir-out/secret".to_string(),
        "neighbour".to_string(),
        "/etc/passwd".to_string(),
        "../../../../../../etc/passwd".to_string(),
    ];
    for (i, name) in attempts.iter().enumerate() {
        let out = env.out(&format!("hpa{i}"));
        // -l: literal mode, so a ':' is not read as host:file.
        let o = env.tftp_hpa(&["-l", "-m", "binary"], &format!("get {name} {}", out.display())).await;
        let got = read(&out);
        assert!(got.is_empty(), "tftp-hpa got {} bytes for {name}: {}", got.len(), text(&o));
        let t = text(&o);
        assert!(
            t.contains("Error code 2: access violation") || t.contains("Error code 1: file not found"),
            "{name}: {t}"
        );

        let out = env.out(&format!("atftp{i}"));
        let o = env.atftp(&["blksize 1428", "tsize 0"], name, &out).await;
        assert!(!o.status.success(), "atftp succeeded for {name}: {}", text(&o));
        let got = read(&out);
        assert!(!got.windows(env.secret.len()).any(|w| w == env.secret), "atftp leaked for {name}");
        assert!(got.is_empty(), "atftp got {} bytes for {name}", got.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_refused() {
    let env = Env::start().await;
    let local = env.out("upload");
    std::fs::write(&local, b"data").unwrap();
    let o = env.tftp_hpa(&["-m", "binary"], &format!("put {} uploaded", local.display())).await;
    assert!(text(&o).contains("Error code 2: read-only"), "{}", text(&o));
    assert!(!env.root().join("uploaded").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_atftp_clients_at_once() {
    let env = Env::start().await;
    let data = image_support::pattern(1_000_000, 7);
    std::fs::write(env.root().join("shared.bin"), &data).unwrap();
    let mut runs = Vec::new();
    for i in 0..60 {
        let out = env.out(&format!("c{i}"));
        let mut cmd = Command::new("atftp");
        cmd.args(["--option", "blksize 1468", "--option", "windowsize 4", "-g", "-r", "shared.bin", "-l"])
            .arg(&out)
            .arg("127.0.0.1")
            .arg(env.port.to_string());
        runs.push(async move { (run(cmd).await, out) });
    }
    for (o, out) in futures::future::join_all(runs).await {
        assert!(o.status.success(), "{}", text(&o));
        assert!(read(&out) == data, "{} differs", out.display());
    }
}
