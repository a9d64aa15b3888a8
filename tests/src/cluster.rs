//! A whole luna cluster for end-to-end tests: a network namespace with a bridge, luna-server on
//! the embedded store answering DHCP, TFTP, HTTP, the tracker and the seeder on that bridge, and
//! its objects made with the real `luna` CLI and REST API. Nodes are qemu VMs on the bridge that
//! network-boot from it.
//!
//! [`Cluster::start_pair`] makes it two luna-servers on one MongoDB-wire store (nx-27017 as a
//! one-member replica set, in the bridge's namespace): server A on the bridge as above, server B
//! in a namespace of its own plugged into the bridge, both answering DHCP and boot.
//!
//! Packing runs dracut on the host as a real server does, but through a wrapper that points it
//! at a private copy of dracut's base directory holding this tree's `95luna` module and the
//! `luna-agent` built with the test, so what is tested is this tree, not what is installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{agent_bin, cargo_bin, test_assets, work_dir, workspace_root, ChildGuard, HarnessError, Netns, Result, Vm};

/// How the cluster is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The first three octets of the provisioning /24 (inside the namespace only); the server
    /// is `.1`, nodes get addresses from `.2` up.
    pub subnet: String,
    /// Whether luna-server seeds images (`[image] seed`).
    pub seed: bool,
    /// The seeder's upload limit (`[image] upload_limit_bytes_per_s`; 0 = none). A limit makes
    /// nodes fetch from each other and makes a download last long enough to interrupt.
    pub upload_limit: u64,
    /// RAM of each node VM: the image is unpacked into a tmpfs, so a real distribution needs
    /// more than the busybox test image.
    pub vm_memory_mb: u32,
    /// TOML appended to the generated `luna.toml` after its `[image]` section (e.g. a
    /// `[tracker]` section); empty for none.
    pub extra_config: String,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            subnet: "10.79.0".into(),
            seed: true,
            upload_limit: 0,
            vm_memory_mb: 1024,
            extra_config: String::new(),
        }
    }
}

/// The second server of a [`Cluster::start_pair`] cluster.
struct Second {
    server: Option<ChildGuard>,
    /// B's namespace, plugged into the bridge (dropped after its server).
    ns: Netns,
}

/// The store of a [`Cluster::start_pair`] cluster.
struct MongoStore {
    url: String,
    /// nx-27017 in the bridge's namespace (stopped after the servers).
    _nx: ChildGuard,
}

/// A running luna cluster; everything is torn down on drop (VMs first: drop them before).
pub struct Cluster {
    server: Option<ChildGuard>,
    second: Option<Second>,
    mongo: Option<MongoStore>,
    /// The API calls go to server B (after [`Cluster::kill_server_a`]).
    api_on_b: AtomicBool,
    /// Logs of servers stopped by [`Cluster::restart`].
    old_logs: Vec<String>,
    opts: ClusterOptions,
    taps: AtomicU32,
    dir: tempfile::TempDir,
    /// Dropped last (fields drop in order): the server and VMs live in it.
    pub ns: Netns,
}

impl Cluster {
    /// Creates the namespace and bridge, runs `luna-server init` and starts the server, then
    /// points the cluster object at the bridge (frontend address, DHCP interface).
    pub fn start(opts: ClusterOptions) -> Result<Cluster> {
        let mut cluster = Self::prepare(opts)?;
        cluster.init_and_spawn()?;
        let ip = cluster.server_ip();
        cluster.cli(&["cluster", "change", "--frontend-address", &ip, "--dhcp-interfaces", "br0"])?;
        Ok(cluster)
    }

    /// Two luna-servers, one cluster: nx-27017 (`nx_bin`, as a one-member replica set) and
    /// server A (`.1`) in the bridge's namespace, server B (`.250`) in a namespace of its own
    /// on the bridge; both answer DHCP (known nodes), TFTP, boot, tracker and seeder, share the
    /// token and the certificate (its names cover both) and heartbeat every 2 s. The frontend
    /// address is A's, but each server's `[dhcp] boot_url` names itself (`{server}`), so its
    /// DHCP answer points a node at that server. The API calls go to A until
    /// [`Cluster::kill_server_a`].
    pub fn start_pair(opts: ClusterOptions, nx_bin: &Path) -> Result<Cluster> {
        let mut cluster = Self::prepare(opts)?;
        let ip = cluster.server_ip();
        let nx_dir = cluster.dir().join("nx");
        std::fs::create_dir_all(&nx_dir).map_err(|e| HarnessError::io(format!("create {}", nx_dir.display()), e))?;
        let (python, args) = luna_server::store::conformance::nx_replset_command(nx_bin, &ip, 27017, &nx_dir);
        let nx = cluster.ns.spawn("nx-27017", &python.to_string_lossy(), &args)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let probe = "import socket, sys; socket.create_connection((sys.argv[1], 27017), 1)";
        while !cluster.ns.command(&python).args(["-c", probe, &ip]).status().is_ok_and(|s| s.success()) {
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!(
                    "nx-27017 did not listen on {ip}:27017: {}",
                    nx.output().tail(20)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let db = luna_server::store::conformance::unique_db_name("cluster");
        let url = format!(
            "mongodb://{ip}:27017/{db}?replicaSet={}&maxPoolSize=100",
            luna_server::store::conformance::NX_SET_NAME
        );
        cluster.mongo = Some(MongoStore { url, _nx: nx });
        let ns_b = Netns::new()?;
        cluster.ns.add_veth("vb0", &ns_b, "eth0")?;
        cluster.ns.set_master("vb0", "br0")?;
        ns_b.add_addr("eth0", &format!("{}/24", cluster.server_b_ip()))?;
        cluster.second = Some(Second { server: None, ns: ns_b });
        cluster.init_and_spawn()?;
        cluster.write_config_b()?;
        cluster.spawn_server_b()?;
        // Packing names the frontend's tracker; the servers' DHCP ignores it (PAIR_BOOT_URL).
        cluster.cli(&["cluster", "change", "--frontend-address", &ip])?;
        Ok(cluster)
    }

    /// The namespace, bridge, scratch directory and dracut wrapper; nothing runs yet.
    fn prepare(opts: ClusterOptions) -> Result<Cluster> {
        let base = work_dir();
        std::fs::create_dir_all(&base).map_err(|e| HarnessError::io(format!("create {}", base.display()), e))?;
        let dir = tempfile::Builder::new()
            .prefix("cluster-")
            .tempdir_in(&base)
            .map_err(|e| HarnessError::io(format!("temp dir in {}", base.display()), e))?;
        let ns = Netns::new()?;
        ns.add_bridge("br0")?;
        let cluster = Cluster {
            server: None,
            second: None,
            mongo: None,
            api_on_b: AtomicBool::new(false),
            old_logs: Vec::new(),
            opts,
            taps: AtomicU32::new(0),
            dir,
            ns,
        };
        cluster.ns.add_addr("br0", &format!("{}/24", cluster.server_ip()))?;
        cluster.write_dracut_wrapper()?;
        Ok(cluster)
    }

    /// `luna-server init` with A's configuration, then A.
    fn init_and_spawn(&mut self) -> Result<()> {
        let cluster = self;
        cluster.write_config()?;
        let server_bin = cargo_bin("luna-server")?;
        // With the store in the namespace (a pair), init must run there too.
        let mut init = match cluster.mongo {
            Some(_) => cluster.ns.command(&server_bin),
            None => Command::new(&server_bin),
        };
        let out = init
            .arg("--config")
            .arg(cluster.config_path())
            .arg("init")
            .output()
            .map_err(|e| HarnessError::io("run luna-server init", e))?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: "luna-server init".into(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        cluster.spawn_server()
    }

    /// The server's address on the bridge.
    pub fn server_ip(&self) -> String {
        format!("{}.1", self.opts.subnet)
    }

    /// Server B's address on the bridge ([`Cluster::start_pair`]).
    pub fn server_b_ip(&self) -> String {
        format!("{}.250", self.opts.subnet)
    }

    /// `http://<server>:7050`: the boot port (scripts, images, tracker).
    pub fn url(&self) -> String {
        format!("http://{}:7050", self.server_ip())
    }

    /// `https://<server>:7051`: the admin API (server B's after [`Cluster::kill_server_a`]).
    pub fn api_url(&self) -> String {
        match self.api_on_b.load(Ordering::SeqCst) {
            true => format!("https://{}:7051", self.server_b_ip()),
            false => format!("https://{}:7051", self.server_ip()),
        }
    }

    /// `https://<B>:7051`: server B's admin API ([`Cluster::start_pair`]).
    pub fn api_url_b(&self) -> String {
        format!("https://{}:7051", self.server_b_ip())
    }

    /// The CA `luna-server init` generated, which the API's certificate verifies against.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("data/tls/ca.pem")
    }

    /// The cluster's scratch directory (config, store, data_dir under `data/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("luna.toml")
    }

    fn write_config(&self) -> Result<()> {
        let d = self.dir();
        let ip = self.server_ip();
        let (store, tls_names, server, boot_url) = match &self.mongo {
            None => (format!("sqlite://{}", d.join("luna.db").display()), format!("\"{ip}\""), String::new(), ""),
            Some(m) => {
                (m.url.clone(), format!("\"{ip}\", \"{}\"", self.server_b_ip()), pair_section("a", &ip), PAIR_BOOT_URL)
            }
        };
        let config = format!(
            "store = \"{store}\"\nlisten = \"{ip}:7050\"\ntoken_file = \"{token}\"\ndata_dir = \"{data}\"\n\
             [http]\napi_listen = \"{ip}:7051\"\ntls_names = [{tls_names}]\n\
             [dhcp]\ninterfaces = [\"br0\"]\n{boot_url}[tftp]\nroot = \"{tftp}\"\nbind = \"{ip}:69\"\n\
             [image]\ndracut = \"{dracut}\"\nseed = {seed}\nseed_listen = \"{ip}:6881\"\nupload_limit_bytes_per_s = {limit}\n{extra}\n{server}",
            token = d.join("token").display(),
            data = d.join("data").display(),
            tftp = d.join("tftpboot").display(),
            dracut = d.join("dracut").display(),
            seed = self.opts.seed,
            limit = self.opts.upload_limit,
            extra = self.opts.extra_config,
        );
        let path = self.config_path();
        std::fs::write(&path, config).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
    }

    /// Server B's `luna-b.toml`: A's store, token and certificate; its own address, data
    /// directory and DHCP interface.
    fn write_config_b(&self) -> Result<()> {
        let d = self.dir();
        let ip = self.server_b_ip();
        let store = self.mongo.as_ref().map(|m| m.url.clone()).unwrap_or_default();
        let data = d.join("data-b");
        std::fs::create_dir_all(&data).map_err(|e| HarnessError::io(format!("create {}", data.display()), e))?;
        let config = format!(
            "store = \"{store}\"\nlisten = \"{ip}:7050\"\ntoken_file = \"{token}\"\ndata_dir = \"{data}\"\n\
             [http]\napi_listen = \"{ip}:7051\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
             [dhcp]\ninterfaces = [\"eth0\"]\n{PAIR_BOOT_URL}[tftp]\nroot = \"{tftp}\"\nbind = \"{ip}:69\"\n\
             [image]\ndracut = \"{dracut}\"\nseed = {seed}\nseed_listen = \"{ip}:6881\"\nupload_limit_bytes_per_s = {limit}\n{extra}\n{server}",
            token = d.join("token").display(),
            data = data.display(),
            cert = d.join("data/tls/server.pem").display(),
            key = d.join("data/tls/server.key").display(),
            tftp = d.join("tftpboot").display(),
            dracut = d.join("dracut").display(),
            seed = self.opts.seed,
            limit = self.opts.upload_limit,
            extra = self.opts.extra_config,
            server = pair_section("b", &ip),
        );
        let path = d.join("luna-b.toml");
        std::fs::write(&path, config).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
    }

    fn spawn_server_b(&mut self) -> Result<()> {
        let bin = cargo_bin("luna-server")?;
        let config = self.dir().join("luna-b.toml");
        let second = self.second.as_mut().ok_or_else(|| HarnessError::Setup("not a two-server cluster".into()))?;
        let server = second.ns.spawn(
            "luna-server-b",
            &bin.to_string_lossy(),
            &["--config".to_string(), config.to_string_lossy().into_owned()],
        )?;
        server.wait_for("http listening", Duration::from_secs(60))?;
        second.server = Some(server);
        Ok(())
    }

    /// Kills server A at once (SIGKILL: no clean stop, its heartbeat record stays until
    /// stale); the API calls go to B from now on.
    pub fn kill_server_a(&mut self) {
        if let Some(mut a) = self.server.take() {
            a.kill();
            self.old_logs.push(a.output().lines().join("\n"));
        }
        self.api_on_b.store(true, Ordering::SeqCst);
    }

    /// Server B's namespace ([`Cluster::start_pair`]).
    pub fn server_b_ns(&self) -> Option<&Netns> {
        self.second.as_ref().map(|s| &s.ns)
    }

    /// Everything server B logged so far ([`Cluster::start_pair`]).
    pub fn server_b_log(&self) -> String {
        match self.second.as_ref().and_then(|s| s.server.as_ref()) {
            Some(s) => s.output().lines().join("\n"),
            None => String::new(),
        }
    }

    /// `dracut` as the server runs it (`[image] dracut`): this tree's 95luna module and agent.
    fn write_dracut_wrapper(&self) -> Result<()> {
        let base = private_dracut_base(self.dir())?;
        let agent = agent_bin()?;
        let wrapper = self.dir().join("dracut");
        let script = format!(
            "#!/bin/sh\n# dracut with this source tree's luna module and agent; fast compression (the test\n\
             # agent may be a debug build)\nexport dracutbasedir='{}'\nexport LUNA_AGENT_BIN='{}'\n\
             exec dracut --compress 'gzip -1' \"$@\"\n",
            base.display(),
            agent.display()
        );
        std::fs::write(&wrapper, script).map_err(|e| HarnessError::io(format!("write {}", wrapper.display()), e))?;
        let chmod = Command::new("chmod").arg("755").arg(&wrapper).status();
        match chmod {
            Ok(s) if s.success() => Ok(()),
            _ => Err(HarnessError::Setup(format!("cannot make {} executable", wrapper.display()))),
        }
    }

    fn spawn_server(&mut self) -> Result<()> {
        let bin = cargo_bin("luna-server")?;
        let config = self.config_path();
        let server = self.ns.spawn(
            "luna-server",
            &bin.to_string_lossy(),
            &["--config".to_string(), config.to_string_lossy().into_owned()],
        )?;
        server.wait_for("http listening", Duration::from_secs(60))?;
        self.server = Some(server);
        Ok(())
    }

    /// Stops luna-server (SIGTERM, as `systemctl restart` does) and starts it again with
    /// seeding on or off: the admin's way to stop serving images over BitTorrent.
    pub fn restart(&mut self, seed: bool) -> Result<()> {
        if let Some(mut old) = self.server.take() {
            old.terminate(Duration::from_secs(15))?;
            self.old_logs.push(old.output().lines().join("\n"));
        }
        self.opts.seed = seed;
        self.write_config()?;
        self.spawn_server()
    }

    /// Everything every luna-server of this cluster logged so far.
    pub fn server_log(&self) -> String {
        let mut all = self.old_logs.join("\n");
        if let Some(s) = &self.server {
            all.push('\n');
            all.push_str(&s.output().lines().join("\n"));
        }
        all
    }

    /// Runs the real `luna` CLI against the server; returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self
            .ns
            .command(cargo_bin("luna")?)
            .args(args)
            .env("LUNA_SERVER", self.api_url())
            .env("LUNA_CA", self.ca())
            .env("LUNA_TOKEN_FILE", self.dir().join("token"))
            .env_remove("LUNA_TOKEN")
            .output()
            .map_err(|e| HarnessError::io(format!("run luna {args:?}"), e))?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("luna {}", args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `luna ... --json`, parsed.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.cli(&all)?;
        serde_json::from_str(&text)
            .map_err(|e| HarnessError::Setup(format!("luna {args:?} printed no json: {e}: {text}")))
    }

    /// A REST call with the admin token (curl in the namespace, over HTTPS verified against the
    /// cluster's CA); returns the JSON body (Null
    /// when empty). Fails on an HTTP error status, with the body in the message.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let token_path = self.dir().join("token");
        let token = std::fs::read_to_string(&token_path)
            .map_err(|e| HarnessError::io(format!("read {}", token_path.display()), e))?;
        let mut cmd = self.ns.command("curl");
        cmd.args(["-sS", "--fail-with-body", "--max-time", "30", "-X", method])
            .arg("--cacert")
            .arg(self.ca())
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", token.trim()));
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data"]).arg(b.to_string());
        }
        let out = cmd.arg(format!("{}{path}", self.api_url())).output().map_err(|e| HarnessError::io("run curl", e))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(HarnessError::Command {
                command: format!("{method} {path}"),
                status: out.status.to_string(),
                stderr: format!("{text} {}", String::from_utf8_lossy(&out.stderr)),
            });
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| HarnessError::Setup(format!("{method} {path}: bad json {e}: {text}")))
    }

    /// Creates osimage `name` from the test image tree (busybox; its init reports `booted`),
    /// with dracut trimmed to what a virtio VM needs, and `kernel_opts` for its nodes.
    pub fn add_test_osimage(&self, name: &str, kernel_opts: &str) -> Result<()> {
        self.add_osimage(name, &test_assets()?.rootfs, kernel_opts)
    }

    /// Creates osimage `name` from the OS tree at `path` (which brings its own kernel under
    /// `/boot`), with dracut trimmed to what a virtio VM needs, and `kernel_opts` for its nodes.
    pub fn add_osimage(&self, name: &str, path: &Path, kernel_opts: &str) -> Result<()> {
        let path = path.to_string_lossy().into_owned();
        self.cli(&["osimage", "add", name, "--path", &path, "--kernel-opts", kernel_opts])?;
        // Without the generic module sets dracut builds the initramfs in a fraction of the time.
        let trim = serde_json::json!({
            "dracut_modules_omit": ["systemd", "systemd-initrd", "systemd-networkd", "dracut-systemd", "plymouth",
                "i18n", "kernel-modules", "kernel-modules-extra", "qemu", "qemu-net"],
            "dracut_drivers_add": ["virtio_net", "virtio_pci", "af_packet"],
        });
        self.api("PATCH", &format!("/api/v1/osimage/{name}"), Some(&trim))?;
        Ok(())
    }

    /// Packs osimage `name` (`POST .../pack`, then the job until it ends); returns the revision.
    pub fn pack(&self, name: &str, timeout: Duration) -> Result<u32> {
        let started = self.api("POST", &format!("/api/v1/osimage/{name}/pack"), Some(&serde_json::json!({})))?;
        let job = started["job"]
            .as_u64()
            .ok_or_else(|| HarnessError::Setup(format!("pack of {name} returned no job: {started}")))?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.api("GET", &format!("/api/v1/jobs/{job}"), None)?;
            match st["state"].as_str() {
                Some("done") => {
                    return st["revision"]
                        .as_u64()
                        .map(|r| r as u32)
                        .ok_or_else(|| HarnessError::Setup(format!("pack job {job} done without a revision: {st}")))
                }
                Some("failed") => return Err(HarnessError::Setup(format!("pack of {name} failed: {st}"))),
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("pack job {job} of {name}"),
                    timeout,
                    log: self.dir().display().to_string(),
                    tail: st.to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// `GET /api/v1/osimage/<name>/revisions`: revisions with tracker and seeder counters.
    pub fn revisions(&self, name: &str) -> Result<Vec<Value>> {
        match self.api("GET", &format!("/api/v1/osimage/{name}/revisions"), None)? {
            Value::Array(v) => Ok(v),
            other => Err(HarnessError::Setup(format!("revisions of {name}: not a list: {other}"))),
        }
    }

    /// The current revision's listing.
    pub fn current_revision(&self, name: &str) -> Result<Value> {
        self.revisions(name)?
            .into_iter()
            .find(|r| r["current"] == Value::Bool(true))
            .ok_or_else(|| HarnessError::Setup(format!("osimage {name} has no current revision")))
    }

    /// `luna node show NAME --json`.
    pub fn node(&self, name: &str) -> Result<Value> {
        self.cli_json(&["node", "show", name])
    }

    /// Starts a VM on the bridge that network-boots (BIOS, virtio NIC with `mac`,
    /// [`ClusterOptions::vm_memory_mb`] of RAM: the image is unpacked into a tmpfs).
    pub fn boot(&self, vm_name: &str, mac: &str) -> Result<Vm> {
        self.boot_vm(Vm::builder(vm_name), mac)
    }

    /// [`Cluster::boot`] with a VM the caller set up (firmware, disks): a NIC on the bridge
    /// with `mac` and [`ClusterOptions::vm_memory_mb`] are added.
    pub fn boot_vm(&self, vm: crate::VmBuilder, mac: &str) -> Result<Vm> {
        let tap = format!("tap{}", self.taps.fetch_add(1, Ordering::Relaxed));
        self.ns.add_tap(&tap, Some("br0"))?;
        vm.memory_mb(self.opts.vm_memory_mb).nic(&tap, mac).spawn_in(&self.ns)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.terminate(Duration::from_secs(5));
        }
        if let Some(mut s) = self.second.as_mut().and_then(|s| s.server.take()) {
            let _ = s.terminate(Duration::from_secs(5));
        }
    }
}

/// A [`Cluster::start_pair`] server's DHCP points nodes at itself (`{server}`), not at the
/// cluster's frontend address (A's), so nodes that reach only B boot.
const PAIR_BOOT_URL: &str = "boot_url = \"http://{server}:{http_port}/boot/ipxe?mac={mac}\"\n";

/// The `[server]` section of a [`Cluster::start_pair`] server: identity, address, 2 s
/// heartbeats and replication rounds.
fn pair_section(id: &str, ip: &str) -> String {
    format!("[server]\nid = \"{id}\"\nadvertise = [\"{ip}\"]\nheartbeat_interval_s = 2\nreplicate_interval_s = 2\n")
}

/// A private copy of dracut's base directory (`/usr/lib/dracut`) under `dir` whose
/// `modules.d/95luna` is this tree's module: the system's dracut stays untouched while other
/// tests use it.
pub fn private_dracut_base(dir: &Path) -> Result<PathBuf> {
    let base = dir.join("dracutbase");
    let _ = std::fs::remove_dir_all(&base);
    let copied = Command::new("cp").arg("-a").arg("/usr/lib/dracut").arg(&base).status();
    if !copied.is_ok_and(|s| s.success()) {
        return Err(HarnessError::Setup(
            "cannot copy /usr/lib/dracut (apt-get install dracut-core dracut-network)".into(),
        ));
    }
    let module = base.join("modules.d/95luna");
    let _ = std::fs::remove_file(&module);
    let _ = std::fs::remove_dir_all(&module);
    std::os::unix::fs::symlink(workspace_root().join("dracut-module/95luna"), &module)
        .map_err(|e| HarnessError::io(format!("link {}", module.display()), e))?;
    Ok(base)
}
