//! The test bed of `bench-swarm`: one switch (a bridge in its own namespace), luna-server in a
//! server namespace and N node namespaces on it, every link shaped with `tc tbf` to the same
//! rate both ways; a real image packed by the real server (random, so incompressible, data and a
//! stand-in dracut); and per node the real static `luna-agent install` with the kernel command
//! line the server's iPXE script gives that node (token bound to the node's MAC and address).
//! The server's and every node's namespace use the TCP congestion control the bench names
//! (`BedOptions::tcp_cc`), not whatever the machine's default is.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use luna_core::model::Kind;
use luna_server::config::Config;
use luna_server::service::Service;
use serde_json::Value;

use crate::bench::bench_mac;
use crate::{agent_bin, cargo_bin, ChildGuard, HarnessError, Netns, Result};

/// The server's address on the bed's network (nodes get addresses from luna, `.2` up).
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
/// The bed's network: room for 4094 nodes.
pub const CIDR: &str = "10.98.0.0/20";
const HTTP_PORT: u16 = 7050;
/// The admin API (HTTPS, the certificate `luna-server init` made for `SERVER_IP`).
const API_PORT: u16 = 7051;
const KVER: &str = "6.1.0-99-amd64";

/// How the bed is built.
#[derive(Clone, Debug)]
pub struct BedOptions {
    /// Node namespaces made (runs use the first N of them).
    pub nodes: usize,
    /// Rate of every link, both ways, in Mbit/s.
    pub rate_mbit: u32,
    /// Incompressible data in the image, MiB (the archive is about as big).
    pub image_mib: usize,
    /// `[image] seeder_peer_slots` of the server.
    pub seeder_slots: u32,
    /// `[image] seeder_super_seed` of the server.
    pub super_seed: bool,
    /// How the hosts' (server's and nodes') uplinks queue; the switch's ports are FIFOs.
    pub host_queue: HostQueue,
    /// TCP congestion control of the server and every node (`net.ipv4.tcp_congestion_control`
    /// in each namespace), so that a run does not depend on the machine's own default.
    pub tcp_cc: String,
}

/// How a host's network interface queues what it sends faster than its link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostQueue {
    /// One FIFO, 100 ms deep (`tc tbf`): a node's acknowledgements and piece requests to the
    /// peer it downloads from wait behind everything it uploads to others.
    Fifo,
    /// Short packets first: a model of fq_codel, the qdisc Debian's hosts put on every interface
    /// (systemd's `net.core.default_qdisc = fq_codel`), which this kernel lacks. fq_codel gives
    /// a flow that sends little (acknowledgements and requests going back to the peer a node
    /// downloads from) its turn before the bulk flows; the model (`tc htb`, two classes, `u32` on
    /// the IP length) sends every packet under 128 bytes first and the rest from the same
    /// 100 ms FIFO as `Fifo`.
    SparseFirst,
}

/// One node of the bed.
pub struct BedNode {
    pub name: String,
    pub ip: Ipv4Addr,
    pub ns: Netns,
}

/// The running bed; dropping it stops the server and removes every namespace.
pub struct SwarmBed {
    pub nodes: Vec<BedNode>,
    server_proc: Option<ChildGuard>,
    pub server: Netns,
    pub switch: Netns,
    pub dir: tempfile::TempDir,
    /// Size of the packed archive in bytes (S).
    pub archive_size: u64,
    token: String,
}

impl Drop for SwarmBed {
    fn drop(&mut self) {
        if let Some(mut p) = self.server_proc.take() {
            let _ = p.terminate(Duration::from_secs(5));
        }
    }
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(format!("{what}: {e}"))
}

/// xorshift64*: incompressible filler, so the archive is as big as the tree.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        out.extend_from_slice(&s.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn write(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
}

fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| HarnessError::io(format!("create {}", path.display()), e))
}

/// A chroot with a kernel, `mib` MiB of random data in 1 MiB files, and a stand-in dracut that
/// writes a small initramfs (the bed measures the image, not the initramfs).
fn make_image_tree(dir: &Path, mib: usize) -> Result<(PathBuf, PathBuf)> {
    let root = dir.join("chroot");
    for d in ["usr/lib/modules", "boot", "etc", "usr/share/data"] {
        mkdir(&root.join(d))?;
    }
    std::os::unix::fs::symlink("usr/lib", root.join("lib")).map_err(|e| HarnessError::io("symlink lib", e))?;
    mkdir(&root.join("usr/lib/modules").join(KVER))?;
    write(&root.join("usr/lib/modules").join(KVER).join("modules.dep"), b"")?;
    write(&root.join("boot").join(format!("vmlinuz-{KVER}")), b"not really a kernel")?;
    write(&root.join("etc/hostname"), b"bench\n")?;
    for i in 0..mib {
        write(&root.join(format!("usr/share/data/blob{i}")), &random_bytes(2 * i as u64 + 11, 1 << 20))?;
    }
    let dracut = dir.join("fake-dracut");
    write(
        &dracut,
        b"#!/bin/sh\nif [ \"$1\" = --list-modules ]; then printf 'base\\nluna\\n'; exit 0; fi\n\
          for a; do out=\"$a\"; done\necho \"fake initramfs\" > \"$out\"\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dracut, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| HarnessError::io("chmod fake dracut", e))?;
    Ok((root, dracut))
}

/// Sets the TCP congestion control of `ns` (`net.ipv4.tcp_congestion_control`; each network
/// namespace has its own, and a new one starts from the machine's default).
fn set_tcp_cc(ns: &Netns, cc: &str) -> Result<()> {
    ns.run("sysctl", &["-qw", &format!("net.ipv4.tcp_congestion_control={cc}")]).map(drop)
}

/// Checks that the kernel offers TCP congestion control `cc`, before the bed is built (else a
/// clear error naming what it has, not a failed `sysctl` in the first namespace).
fn check_tcp_cc(cc: &str) -> Result<()> {
    let key = "/proc/sys/net/ipv4/tcp_available_congestion_control";
    let avail = std::fs::read_to_string(key).map_err(|e| HarnessError::io(format!("read {key}"), e))?;
    if !avail.split_ascii_whitespace().any(|a| a == cc) {
        return Err(HarnessError::Setup(format!(
            "tcp congestion control {cc:?} is not available here (this kernel has: {}; `modprobe tcp_{cc}` may add it)",
            avail.trim()
        )));
    }
    Ok(())
}

/// `tc qdisc ... tbf`: a token bucket on `dev`'s egress, the shape of that side of the link.
pub fn shape(ns: &Netns, dev: &str, rate_mbit: u32) -> Result<()> {
    let rate = format!("{rate_mbit}mbit");
    ns.run("tc", &["qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "32kb", "latency", "100ms"])
        .map(drop)
}

/// Shapes the egress of a host's interface `dev` to `rate_mbit`, queueing as `queue` says.
pub fn shape_host(ns: &Netns, dev: &str, rate_mbit: u32, queue: HostQueue) -> Result<()> {
    match queue {
        HostQueue::Fifo => shape(ns, dev, rate_mbit),
        HostQueue::SparseFirst => {
            let rate = format!("{rate_mbit}mbit");
            // The bulk FIFO holds what tbf's `latency 100ms` lets it hold: 100 ms of the rate
            // plus the 32 KiB burst (tbf's own limit). htb, unlike tbf, does not split the
            // hosts' GSO packets (up to 64 KiB), so a FIFO shorter than one of them drops every
            // one: at 5 Mbit/s (62 500 bytes without the burst) one node took 4-6 S/B alone.
            let limit = (u64::from(rate_mbit) * 1_000_000 / 8 / 10 + 32 * 1024).to_string();
            let tc = |args: &[&str]| ns.run("tc", args).map(drop);
            tc(&["qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "20"])?;
            let class = |id: &str, parent: &str, guaranteed: &str, prio: &str| {
                tc(&[
                    "class", "add", "dev", dev, "parent", parent, "classid", id, "htb", "rate", guaranteed, "ceil",
                    &rate, "burst", "32kb", "cburst", "32kb", "quantum", "1514", "prio", prio,
                ])
            };
            class("1:1", "1:", &rate, "0")?;
            class("1:10", "1:1", &format!("{}kbit", (rate_mbit * 100).max(8)), "0")?;
            class("1:20", "1:1", &rate, "1")?;
            tc(&["qdisc", "add", "dev", dev, "parent", "1:20", "bfifo", "limit", &limit])?;
            // IPv4 total length (bytes 2-3) below 128.
            tc(&[
                "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32", "match", "u16",
                "0x0000", "0xff80", "at", "2", "flowid", "1:10",
            ])
        }
    }
}

/// Bytes sent by `dev` in `ns` so far (`ip -s -j link`).
pub fn tx_bytes(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", dev])?;
    let v: Value = serde_json::from_str(&out).map_err(|e| setup_err("ip -s -j link", e))?;
    v[0]["stats64"]["tx"]["bytes"].as_u64().ok_or_else(|| HarnessError::Setup(format!("no tx bytes in {out}")))
}

impl SwarmBed {
    /// Builds the namespaces and links, starts luna-server, packs the image and waits until
    /// the server seeds it.
    pub fn start(opts: &BedOptions) -> Result<SwarmBed> {
        crate::require_tool("tc")?;
        crate::require_tool("curl")?;
        check_tcp_cc(&opts.tcp_cc)?;
        let dir = tempfile::Builder::new()
            .prefix("bench-swarm-")
            .tempdir()
            .map_err(|e| HarnessError::io("temp dir for bench-swarm", e))?;
        let (chroot, dracut) = make_image_tree(dir.path(), opts.image_mib)?;
        let d = dir.path().display();
        let config = dir.path().join("luna.toml");
        write(
            &config,
            format!(
                "store = \"sqlite://{d}/luna.db\"\nlisten = \"{SERVER_IP}:{HTTP_PORT}\"\ntoken_file = \"{d}/token\"\n\
                 data_dir = \"{d}/data\"\n[tftp]\nenabled = false\n[image]\nseed = true\n\
                 seed_listen = \"{SERVER_IP}:6881\"\ndracut = \"{}\"\nkeep_revisions = 1\nseeder_peer_slots = {}\n\
                 seeder_super_seed = {}\n[http]\napi_listen = \"{SERVER_IP}:{API_PORT}\"\ntls_names = [\"{SERVER_IP}\"]\n",
                dracut.display(),
                opts.seeder_slots,
                opts.super_seed
            )
            .as_bytes(),
        )?;
        let names = populate(&config, &chroot, opts.nodes)?;
        let token = std::fs::read_to_string(dir.path().join("token"))
            .map_err(|e| HarnessError::io("read the admin token", e))?
            .trim()
            .to_string();

        // One switch, the server and every node on it; every link shaped both ways.
        let switch = Netns::new()?;
        switch.add_bridge("br0")?;
        let server = Netns::new()?;
        server.add_veth("s0", &switch, "ps")?;
        switch.set_master("ps", "br0")?;
        server.add_addr("s0", &format!("{SERVER_IP}/20"))?;
        set_tcp_cc(&server, &opts.tcp_cc)?;
        shape_host(&server, "s0", opts.rate_mbit, opts.host_queue)?;
        shape(&switch, "ps", opts.rate_mbit)?;
        let mut nodes = Vec::with_capacity(opts.nodes);
        for (i, (name, ip)) in names.into_iter().enumerate() {
            let ns = Netns::new()?;
            let port = format!("p{i}");
            ns.add_veth("h0", &switch, &port)?;
            switch.set_master(&port, "br0")?;
            ns.ip(&["link", "set", "h0", "address", &bench_mac(i).to_string()])?;
            ns.add_addr("h0", &format!("{ip}/20"))?;
            set_tcp_cc(&ns, &opts.tcp_cc)?;
            shape_host(&ns, "h0", opts.rate_mbit, opts.host_queue)?;
            shape(&switch, &port, opts.rate_mbit)?;
            nodes.push(BedNode { name, ip, ns });
        }

        let mut cmd = server.command(cargo_bin("luna-server")?);
        cmd.arg("--config")
            .arg(&config)
            .arg("serve")
            .env("RUST_LOG", std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()));
        let proc = ChildGuard::spawn(&mut cmd, "bench-swarm-luna")?;
        let mut bed = SwarmBed { nodes, server_proc: Some(proc), server, switch, dir, archive_size: 0, token };
        crate::bench::wait_tcp(&bed.server, &format!("{SERVER_IP}:{HTTP_PORT}"), Duration::from_secs(60))?;
        bed.archive_size = bed.pack()?;
        Ok(bed)
    }

    /// `curl` inside the server namespace against the admin API.
    pub fn api(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let mut cmd = self.server.command("curl");
        cmd.args(["-sS", "--fail-with-body", "--max-time", "30", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", self.token))
            .arg("--cacert")
            .arg(self.dir.path().join("data/tls/ca.pem"));
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data"]).arg(b.to_string());
        }
        let out = cmd
            .arg(format!("https://{SERVER_IP}:{API_PORT}{path}"))
            .output()
            .map_err(|e| HarnessError::io("run curl", e))?;
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
        serde_json::from_str(&text).map_err(|e| setup_err(&format!("{method} {path}: bad json: {text}"), e))
    }

    /// Packs osimage `img` and waits until the seeder serves it in full; returns the archive size.
    fn pack(&self) -> Result<u64> {
        let started = self.api("POST", "/api/v1/osimage/img/pack", Some(&serde_json::json!({})))?;
        let job = started["job"].as_u64().ok_or_else(|| HarnessError::Setup(format!("pack: no job in {started}")))?;
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let st = self.api("GET", &format!("/api/v1/jobs/{job}"), None)?;
            match st["state"].as_str() {
                Some("done") => break,
                Some("failed") => return Err(HarnessError::Setup(format!("pack failed: {st}"))),
                _ if Instant::now() > deadline => return Err(HarnessError::Setup(format!("pack too slow: {st}"))),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
        loop {
            let rev = self.revision()?;
            if rev["seeder"]["healthy"].as_bool() == Some(true) {
                return rev["archive_size"].as_u64().ok_or_else(|| HarnessError::Setup(format!("no size in {rev}")));
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Setup(format!("the seeder never served the image: {rev}")));
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The current revision of `img`, with its tracker and seeder counters.
    pub fn revision(&self) -> Result<Value> {
        let revs = self.api("GET", "/api/v1/osimage/img/revisions", None)?;
        revs.as_array()
            .and_then(|v| v.last().cloned())
            .ok_or_else(|| HarnessError::Setup(format!("no revision of img: {revs}")))
    }

    /// Bytes the seeder has uploaded so far (all runs).
    pub fn seeder_uploaded(&self) -> Result<u64> {
        Ok(self.revision()?["seeder"]["uploaded_bytes"].as_u64().unwrap_or(0))
    }

    /// Bytes the server's interface has sent so far.
    pub fn server_tx(&self) -> Result<u64> {
        tx_bytes(&self.server, "s0")
    }

    /// Writes node `i`'s kernel command line as its iPXE script from the server gives it (asked
    /// from the node's own address, so the token is bound to it), with `extra` appended, to
    /// `dir/cmdline`.
    pub fn boot_cmdline(&self, i: usize, dir: &Path, extra: &str) -> Result<PathBuf> {
        let node = &self.nodes[i];
        let url = format!("http://{SERVER_IP}:{HTTP_PORT}/boot/ipxe?mac={}", bench_mac(i));
        let script = node.ns.run("curl", &["-sS", "--fail", "--max-time", "30", &url])?;
        let line = script.lines().find_map(|l| l.trim().strip_prefix("kernel ")).ok_or_else(|| {
            HarnessError::Setup(format!("{}: no kernel line in its iPXE script:\n{script}", node.name))
        })?;
        let line = line.split(" || ").next().unwrap_or(line);
        // The first word is the kernel's URL; the rest is the command line.
        let cmdline = line.split_once(' ').map(|(_, rest)| rest).unwrap_or("");
        if !cmdline.contains("luna.token=") {
            return Err(HarnessError::Setup(format!("{}: no token in its iPXE script:\n{script}", node.name)));
        }
        mkdir(dir)?;
        let path = dir.join("cmdline");
        write(&path, format!("{cmdline} {extra}").trim_end().as_bytes())?;
        Ok(path)
    }

    /// Starts the real agent's install for node `i` (into `dir/sysroot`, a tmpfs the agent
    /// mounts in the private mount namespace `ip netns exec` gives it): the whole install but
    /// the switch root.
    pub fn start_agent(&self, i: usize, dir: &Path, swarm: bool, unpack: bool, log: &str) -> Result<ChildGuard> {
        let node = &self.nodes[i];
        let mut cmd = node.ns.command(agent_bin()?);
        cmd.arg("install")
            .arg("--cmdline")
            .arg(dir.join("cmdline"))
            .arg("--sysroot")
            .arg(dir.join("sysroot"))
            .arg("--scratch")
            .arg(dir.join("scratch"));
        if !swarm {
            cmd.arg("--no-swarm");
        }
        if !unpack {
            cmd.arg("--no-unpack");
        }
        cmd.env("LUNA_LOG", log);
        ChildGuard::spawn(&mut cmd, &format!("agent-{}", node.name))
    }

    /// The node's last status step as the server has it.
    pub fn last_step(&self, i: usize) -> Result<String> {
        let node = self.api("GET", &format!("/api/v1/node/{}", self.nodes[i].name), None)?;
        Ok(node["status"]["step"].as_str().unwrap_or_default().to_string())
    }
}

/// Creates the store: cluster (frontend address), network, osimage `img` at `chroot`, group `g`
/// and `n` nodes with the bench MACs; returns the nodes' names and addresses.
fn populate(config: &Path, chroot: &Path, n: usize) -> Result<Vec<(String, Ipv4Addr)>> {
    let cfg = Config::load(config).map_err(|e| setup_err("luna config", e))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| HarnessError::io("tokio runtime", e))?;
    rt.block_on(async {
        luna_server::server::init(&cfg).await.map_err(|e| setup_err("luna init", e))?;
        let store = luna_server::store::open(&cfg.store).await.map_err(|e| setup_err("open store", e))?;
        let svc = Service::new(store);
        let err = |e: luna_server::service::ServiceError| setup_err("populate", e);
        let patch = serde_json::json!({"frontend_address": SERVER_IP.to_string(), "http_port": HTTP_PORT});
        svc.update(Kind::Cluster, "luna", patch).await.map_err(err)?;
        let gw = SERVER_IP.to_string();
        svc.create(Kind::Network, serde_json::json!({"name": "bed", "cidr": CIDR, "gateway": gw}))
            .await
            .map_err(err)?;
        svc.create(Kind::Osimage, serde_json::json!({"name": "img", "path": chroot.display().to_string()}))
            .await
            .map_err(err)?;
        let group = serde_json::json!({"name": "g", "osimage": "img", "partscript": "",
            "interfaces": [{"name": "BOOTIF", "network": "bed"}]});
        svc.create(Kind::Group, group).await.map_err(err)?;
        let nodes = crate::bench::add_nodes(&svc, "n", "g", n).await?;
        Ok(nodes.into_iter().map(|b| (b.name, b.ip)).collect())
    })
}

/// Runs `gnuplot` on `script` (it writes the PNG the script names).
pub fn gnuplot(script: &str) -> Result<()> {
    crate::require_tool("gnuplot")?;
    use std::io::Write;
    let mut child = Command::new("gnuplot")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| HarnessError::io("run gnuplot", e))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(|e| HarnessError::io("write to gnuplot", e))?;
    }
    let out = child.wait_with_output().map_err(|e| HarnessError::io("wait for gnuplot", e))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HarnessError::Command {
            command: "gnuplot".into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
