//! `scripts/image/luna-report-booted`, the hook an installed image runs at the end of its boot
//! (the busybox test image's init and the Debian image's `luna-booted.service` both do): it
//! posts step `booted` to the `luna.url` on the kernel command line with whichever tool the image
//! has (busybox wget, bash's /dev/tcp) and prints its verdict on the console. Run here with a
//! PATH holding only the tools of each kind of image, against a stand-in server. Needs busybox.

use std::net::TcpListener;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;

use luna_tests::{read_request, workspace_root, StandInRequest};

/// A directory of links to `tools`, each `(name, program)`: an image's PATH.
fn image_path(dir: &Path, name: &str, tools: &[(&str, &str)]) -> PathBuf {
    let bin = dir.join(name);
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, program) in tools {
        let found = which(program).unwrap_or_else(|| panic!("{program} not found (apt-get install busybox)"));
        symlink(found, bin.join(tool)).unwrap();
    }
    bin
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(program)).find(|p| p.is_file()))
        .unwrap_or(None)
}

/// A stand-in luna-server answering `status` to one request, which it passes on.
fn server(status: &'static str) -> (String, mpsc::Receiver<StandInRequest>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            if let Ok(req) = read_request(&conn) {
                use std::io::Write;
                let _ = write!(conn, "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = tx.send(req);
            }
        }
    });
    (url, rx)
}

/// Runs the hook with `cmdline` and `path`; returns its exit success, its console line and its
/// stderr.
fn run_hook(dir: &Path, cmdline: &str, path: &Path) -> (bool, String, String) {
    let cmdline_file = dir.join("cmdline");
    std::fs::write(&cmdline_file, cmdline).unwrap();
    let console = dir.join("console");
    let _ = std::fs::remove_file(&console);
    let out = Command::new(path.join("sh"))
        .arg(workspace_root().join("scripts/image/luna-report-booted"))
        .env_clear()
        .env("PATH", path)
        .env("LUNA_CMDLINE", &cmdline_file)
        .env("LUNA_CONSOLE", &console)
        .output()
        .unwrap();
    let console = std::fs::read_to_string(&console).unwrap_or_default();
    (out.status.success(), console.trim().to_string(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const BASICS: [(&str, &str); 4] = [("cat", "cat"), ("ip", "ip"), ("awk", "awk"), ("hostname", "hostname")];

#[test]
fn reports_booted_with_busybox_wget_or_bash_alone() {
    let dir = tempfile::tempdir().unwrap();
    let busybox: Vec<(&str, &str)> =
        ["sh", "wget", "timeout", "cat", "ip", "awk", "hostname"].iter().map(|t| (*t, "busybox")).collect();
    let bash_only: Vec<(&str, &str)> = BASICS.iter().copied().chain([("sh", "dash"), ("bash", "bash")]).collect();
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap().trim().to_string();
    for (name, tools) in [("busybox", busybox), ("bash", bash_only)] {
        let path = image_path(dir.path(), name, &tools);
        let (url, requests) = server("204 No Content");
        let (ok, console, stderr) =
            run_hook(dir.path(), &format!("root=luna luna.url={url} luna.node=node007 luna.token=t0k"), &path);
        assert!(ok, "{name}: {stderr}");
        assert_eq!(console, format!("LUNA-BOOTED host={host} report=ok"), "{name}: {stderr}");
        let req = requests.recv_timeout(std::time::Duration::from_secs(5)).expect("a report");
        assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/boot/status?node=node007&token=t0k"), "{name}");
        let body: serde_json::Value = serde_json::from_slice(&req.body).expect("a json body");
        assert_eq!(body["step"], "booted", "{name}");
        assert!(body["message"].as_str().unwrap_or("").starts_with(&format!("{host} is up at ")), "{name}: {body}");

        // A server that refuses the report: the console says so.
        let (url, _requests) = server("403 Forbidden");
        let (_, console, _) = run_hook(dir.path(), &format!("luna.url={url} luna.node=node007 luna.token=bad"), &path);
        assert_eq!(console, format!("LUNA-BOOTED host={host} report=failed"), "{name}");
    }
}

#[test]
fn without_luna_on_the_command_line_or_a_tool_to_post_with() {
    let dir = tempfile::tempdir().unwrap();
    let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout).unwrap().trim().to_string();
    let bash_only: Vec<(&str, &str)> = BASICS.iter().copied().chain([("sh", "dash"), ("bash", "bash")]).collect();
    let path = image_path(dir.path(), "bash", &bash_only);
    // Not installed by luna: nothing to report to.
    let (ok, console, _) = run_hook(dir.path(), "root=/dev/sda1 quiet", &path);
    assert!(ok);
    assert_eq!(console, format!("LUNA-BOOTED host={host} report=none"));

    let bare: Vec<(&str, &str)> = BASICS.iter().copied().chain([("sh", "dash")]).collect();
    let path = image_path(dir.path(), "bare", &bare);
    let (_, console, stderr) = run_hook(dir.path(), "luna.url=http://127.0.0.1:9 luna.node=node007", &path);
    assert_eq!(console, format!("LUNA-BOOTED host={host} report=failed"));
    assert!(stderr.contains("no wget, curl or bash"), "{stderr}");
}
