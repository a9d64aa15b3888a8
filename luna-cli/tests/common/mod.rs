//! A real luna-server for tests and the benchmark: temp dir, config, `init`, serve, kill on drop.
//!
//! The server binary is `$LUNA_SERVER_BIN` when set, otherwise `luna-server` next to `luna`,
//! built once per process with `cargo build -p luna-server` (a no-op when it is up to date).

#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// A port nothing listens on right now (the server binds it a moment later).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// Two distinct ports nothing listens on right now (boot port, admin API port).
pub fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    (a.local_addr().expect("local address").port(), b.local_addr().expect("local address").port())
}

/// Builds `bin` of `package` into the target directory `bin_dir` belongs to (same profile) and
/// returns its path. A failed build is fatal: an older binary could test code that is gone.
pub fn cargo_build(bin_dir: &Path, package: &str, bin: &str) -> PathBuf {
    let path = bin_dir.join(bin);
    let profile = bin_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    let target_dir = bin_dir.parent().expect("profile directory has a parent");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .env("CARGO_TARGET_DIR", target_dir)
        .args(["build", "--quiet", "-p", package, "--bin", bin]);
    if profile != "debug" {
        // Directory names are profile names, except `debug`, which is the `dev` profile.
        cmd.args(["--profile", &profile]);
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run cargo build -p {package}: {e}"));
    assert!(
        out.status.success(),
        "cargo build -p {package} failed (set LUNA_SERVER_BIN to test another luna-server):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `$LUNA_SERVER_BIN`, or luna-server built next to `luna` (once per process).
pub fn server_bin(luna: &Path) -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| match std::env::var_os("LUNA_SERVER_BIN") {
        Some(p) => PathBuf::from(p),
        None => cargo_build(luna.parent().expect("luna lives in a directory"), "luna-server", "luna-server"),
    })
    .clone()
}

pub struct Server {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The admin API: `https://127.0.0.1:<api port>`.
    pub url: String,
    /// The plain-HTTP boot port: `http://127.0.0.1:<port>`.
    pub boot_url: String,
    /// The CA `luna-server init` generated (what `luna --ca` trusts).
    pub ca: PathBuf,
    pub token_file: PathBuf,
    pub luna: PathBuf,
}

/// What one `luna` run did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Server {
    /// A server on the embedded sqlite store.
    pub fn start(luna: &Path) -> Server {
        Server::start_with_store(luna, None)
    }

    /// `store`: a store URL, or `None` for a fresh sqlite file in the temp dir.
    pub fn start_with_store(luna: &Path, store: Option<&str>) -> Server {
        Server::try_start(luna, store).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(luna: &Path, store: Option<&str>) -> Result<Server, String> {
        Server::try_start_with(luna, store, "")
    }

    /// `image_config`: extra lines for the `[image]` section (e.g. a `dracut` command).
    pub fn try_start_with(luna: &Path, store: Option<&str>, image_config: &str) -> Result<Server, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let (port, api_port) = free_ports();
        let token_file = dir.path().join("token");
        let store = match store {
            Some(s) => s.to_string(),
            None => format!("sqlite://{}", dir.path().join("luna.db").display()),
        };
        let config = dir.path().join("luna.toml");
        std::fs::write(
            &config,
            format!(
                // Only the API: many servers run side by side, so no TFTP port or seeder to share.
                "store = \"{store}\"\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"{}\"\ndata_dir = \"{}\"\n\
                 [http]\napi_listen = \"127.0.0.1:{api_port}\"\n\
                 [tftp]\nenabled = false\n[image]\nseed = false\n{image_config}\n",
                token_file.display(),
                dir.path().join("data").display()
            ),
        )
        .map_err(|e| format!("write config: {e}"))?;
        let bin = server_bin(luna);
        let init = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .arg("init")
            .output()
            .map_err(|e| format!("cannot run {} init: {e}", bin.display()))?;
        if !init.status.success() {
            return Err(format!("luna-server init failed: {}", String::from_utf8_lossy(&init.stderr).trim()));
        }
        let log = std::fs::File::create(dir.path().join("server.log")).map_err(|e| format!("server log: {e}"))?;
        let log2 = log.try_clone().map_err(|e| format!("server log: {e}"))?;
        let child = Command::new(&bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot spawn {}: {e}", bin.display()))?;
        let mut server = Server {
            child: Some(child),
            url: format!("https://127.0.0.1:{api_port}"),
            boot_url: format!("http://127.0.0.1:{port}"),
            ca: dir.path().join("data/tls/ca.pem"),
            token_file,
            luna: luna.to_path_buf(),
            dir,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let token =
            std::fs::read_to_string(&self.token_file).map_err(|e| format!("token file written by init: {e}"))?;
        let url = format!("{}/api/v1/cluster", self.url);
        let tls = luna_cli::client::tls_config(&self.ca).map_err(|e| e.to_string())?;
        let agent = ureq::AgentBuilder::new().tls_config(tls).timeout(Duration::from_secs(2)).build();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(format!("luna-server exited with {status}:\n{}", self.log()));
                }
            }
            let answer = agent.get(&url).set("Authorization", &format!("Bearer {}", token.trim())).call();
            if answer.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("luna-server did not answer {url} within 30 s:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// `luna` pointed at this server with the admin token file (and no LUNA_TOKEN).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(&self.luna);
        c.env("LUNA_SERVER", &self.url)
            .env("LUNA_TOKEN_FILE", &self.token_file)
            .env("LUNA_CA", &self.ca)
            .env_remove("LUNA_TOKEN");
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.cmd().args(args).stdin(Stdio::null()).output().expect("run luna").into()
    }

    /// Runs `luna` with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut c = self.cmd();
        c.args(args).stdin(Stdio::null());
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().expect("run luna").into()
    }

    /// Runs `luna` with `input` on stdin.
    pub fn run_stdin(&self, args: &[&str], input: &str) -> Run {
        use std::io::Write;
        let mut child = self
            .cmd()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn luna");
        child.stdin.take().expect("piped stdin").write_all(input.as_bytes()).expect("write stdin");
        child.wait_with_output().expect("wait for luna").into()
    }

    /// Runs `luna` and insists it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.code == 0, "luna {args:?} failed with {}: {}\nserver log:\n{}", r.code, r.stderr, self.log());
        r.stdout
    }

    /// Runs `luna ... --json` and parses the output.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("luna {a:?} printed no json ({e}): {out}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
