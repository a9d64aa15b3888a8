//! Shared by the boot benchmarks (`bench-dhcp`, `bench-http`): a two-namespace test bed (server
//! and load generator joined by a veth pair) and a luna-server with `n` known nodes.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use luna_core::api::{NodeCreate, NodePatch};
use luna_core::model::Kind;
use luna_core::MacAddr;
use luna_server::config::Config;
use luna_server::service::Service;

use crate::{cargo_bin, ChildGuard, HarnessError, Netns, Result};

/// The server's address on the bench link; the generator is `.2`.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The bench network (room for 4094 hosts).
pub const CIDR: &str = "10.99.0.0/20";
pub const SERVER_DEV: &str = "veth-s";
pub const CLIENT_DEV: &str = "veth-g";

/// The flags every boot-path bench takes (flattened into each bench's own).
#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Nodes in the cluster, each with its own MAC and reserved address (at most 4000).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(1..=4000))]
    pub nodes: u16,
    /// How long each server is measured, in seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub seconds: u64,
}

/// Server namespace and generator namespace, one veth pair between them.
pub struct Link {
    pub server: Netns,
    pub client: Netns,
}

impl Link {
    pub fn new() -> Result<Link> {
        let server = Netns::new()?;
        let client = Netns::new()?;
        server.add_veth(SERVER_DEV, &client, CLIENT_DEV)?;
        server.add_addr(SERVER_DEV, &format!("{SERVER_IP}/20"))?;
        client.add_addr(CLIENT_DEV, &format!("{CLIENT_IP}/20"))?;
        // broadcasts (DHCP) leave through the veth
        client.ip(&["route", "add", "default", "dev", CLIENT_DEV])?;
        Ok(Link { server, client })
    }
}

/// A known node of the bench cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchNode {
    pub name: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
}

/// The MAC of bench node `i` (locally administered, unique for `i < 65536`).
pub fn bench_mac(i: usize) -> MacAddr {
    MacAddr([0x52, 0x54, 0x00, 0xbe, (i >> 8) as u8, i as u8])
}

fn setup_err(what: &str, e: impl std::fmt::Display) -> HarnessError {
    HarnessError::Setup(format!("{what}: {e}"))
}

/// luna-server's configuration for the bench: sqlite store in `dir`, HTTP on the server's
/// bench address, DHCP on the server's veth, TFTP and seeding off, and no per-address
/// connection cap (wrk's 512 connections all come from one address).
pub fn luna_config(dir: &Path) -> Result<PathBuf> {
    let d = dir.display();
    let text = format!(
        "store = \"sqlite://{d}/luna.db\"\nlisten = \"{SERVER_IP}:7050\"\ntoken_file = \"{d}/token\"\n\
         data_dir = \"{d}/data\"\n[dhcp]\ninterfaces = [\"{SERVER_DEV}\"]\nmax_in_flight = 1024\n\
         [tftp]\nenabled = false\n[image]\nseed = false\n\
         [http]\nmax_connections_per_address = 4096\napi_listen = \"{SERVER_IP}:7051\"\n\
         tls_names = [\"{SERVER_IP}\"]\n"
    );
    let path = dir.join("luna.toml");
    std::fs::write(&path, text).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))?;
    Ok(path)
}

/// Creates the store behind `config` with a network, an osimage, a group and `n` nodes with
/// MACs ([`bench_mac`]); returns the nodes with the addresses luna allocated.
pub fn populate_luna(config: &Path, n: usize) -> Result<Vec<BenchNode>> {
    let cfg = Config::load(config).map_err(|e| setup_err("luna config", e))?;
    let rt = tokio::runtime::Runtime::new().map_err(|e| HarnessError::io("tokio runtime", e))?;
    rt.block_on(async {
        luna_server::server::init(&cfg).await.map_err(|e| setup_err("luna init", e))?;
        let store = luna_server::store::open(&cfg.store).await.map_err(|e| setup_err("open store", e))?;
        let svc = Service::new(store);
        let err = |e: luna_server::service::ServiceError| setup_err("populate", e);
        let patch = serde_json::json!({"frontend_address": SERVER_IP.to_string()});
        svc.update(Kind::Cluster, "luna", patch).await.map_err(err)?;
        let gw = SERVER_IP.to_string();
        svc.create(Kind::Network, serde_json::json!({"name": "bench", "cidr": CIDR, "gateway": gw}))
            .await
            .map_err(err)?;
        svc.create(Kind::Osimage, serde_json::json!({"name": "img", "path": "/srv/img"})).await.map_err(err)?;
        // A packed revision's record, so nodes get their boot script (the files need not exist).
        let rev = serde_json::json!({"revisions": [{"id": 1, "created": 1, "kernel_version": "6.1.0",
            "archive": "img.tar.zst", "archive_size": 0, "sha256": "", "kernel": "vmlinuz", "initrd": "initrd.img",
            "torrent": "img.torrent", "info_hash": ""}], "current_revision": 1});
        svc.update(Kind::Osimage, "img", rev).await.map_err(err)?;
        let group = serde_json::json!({"name": "g", "osimage": "img",
            "interfaces": [{"name": "BOOTIF", "network": "bench"}]});
        svc.create(Kind::Group, group).await.map_err(err)?;
        add_nodes(&svc, "b", "g", n).await
    })
}

/// Adds nodes `<prefix>0001`… to `group` with the MACs [`bench_mac`] gives (0, 1, …); returns
/// them with the addresses luna allocated.
pub async fn add_nodes(svc: &Service, prefix: &str, group: &str, n: usize) -> Result<Vec<BenchNode>> {
    let err = |e: luna_server::service::ServiceError| setup_err("add the bench nodes", e);
    let req = NodeCreate {
        name: format!("{prefix}[0001-{n:04}]"),
        group: group.into(),
        mac: None,
        ips: Default::default(),
        switch: None,
        port: None,
        localboot: false,
        service: false,
        setupbmc: false,
        comment: String::new(),
    };
    let nodes = svc.add_nodes(req).await.map_err(err)?;
    let mut out = Vec::with_capacity(n);
    for (i, node) in nodes.iter().enumerate() {
        let mac = bench_mac(i);
        let patch = NodePatch { mac: Some(Some(mac)), ..Default::default() };
        svc.change_nodes(&node.name, patch).await.map_err(err)?;
        let ip = node
            .interfaces
            .iter()
            .find_map(|i| i.ip)
            .ok_or_else(|| HarnessError::Setup(format!("node {} got no address", node.name)))?;
        out.push(BenchNode { name: node.name.clone(), mac, ip });
    }
    Ok(out)
}

/// Starts the workspace's `luna-server` binary (of the bench's own profile: run the benches
/// with `--release`) with `config` inside the server namespace, logging warnings only; the
/// returned guard stops it. The real binary, so what is measured is what ships (its allocator,
/// its runtime), not a copy of its `main`.
pub fn start_luna(link: &Link, config: &Path) -> Result<ChildGuard> {
    let mut cmd = link.server.command(cargo_bin("luna-server")?);
    cmd.arg("--config").arg(config).arg("serve").env("RUST_LOG", "warn");
    ChildGuard::spawn(&mut cmd, "bench-luna")
}

/// Waits until `addr` accepts TCP connections from inside `ns`.
pub fn wait_tcp(ns: &Netns, addr: &str, timeout: Duration) -> Result<()> {
    let addr: std::net::SocketAddr = addr.parse().map_err(|e| setup_err(addr, e))?;
    let deadline = std::time::Instant::now() + timeout;
    let ok = ns.enter(move || {
        while std::time::Instant::now() < deadline {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    })?;
    if ok {
        Ok(())
    } else {
        Err(HarnessError::Setup(format!("nothing listens on {addr} after {timeout:?}")))
    }
}

/// Raises this process's open-files limit to its hard limit (children inherit it).
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    lim.rlim_cur
}

/// The machine's CPU time so far, from the first line of `/proc/stat`: what a bench prints as
/// "cpu busy" to show whether its run was bound by the CPUs rather than by what it measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// Every state, in clock ticks.
    pub total: u64,
    /// idle and iowait.
    pub idle: u64,
}

impl CpuTimes {
    /// Parses the aggregate `cpu  user nice system idle iowait irq softirq steal ...` line.
    pub fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().next()?;
        let mut words = line.split_ascii_whitespace();
        if words.next()? != "cpu" {
            return None;
        }
        let ticks: Vec<u64> = words.map(str::parse).collect::<std::result::Result<_, _>>().ok()?;
        if ticks.len() < 5 {
            return None;
        }
        // guest and guest_nice (9th and 10th) are already counted in user and nice.
        let total = ticks.iter().take(8).sum();
        Some(CpuTimes { total, idle: ticks[3] + ticks[4] })
    }

    /// This machine's, now.
    pub fn now() -> Result<CpuTimes> {
        let stat = std::fs::read_to_string("/proc/stat").map_err(|e| HarnessError::io("read /proc/stat", e))?;
        CpuTimes::parse(&stat).ok_or_else(|| HarnessError::Setup(format!("no cpu line in /proc/stat: {stat:.80}")))
    }

    /// The fraction of CPU time spent busy (not idle, not waiting for IO) since `earlier`.
    pub fn busy_since(&self, earlier: &CpuTimes) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        let idle = self.idle.saturating_sub(earlier.idle);
        if total == 0 {
            return 0.0;
        }
        1.0 - idle.min(total) as f64 / total as f64
    }
}

/// `program --version`-style probe: whether `program` can be run.
pub fn have(program: &str) -> bool {
    Command::new(program).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// The kernel's ARP table (`net.ipv4.neigh.default.gc_thresh1..3`) raised for a bench, put back
/// when dropped. The table is one for the whole kernel, shared by every network namespace, and
/// its default hard limit is 1024 entries: N simulated nodes that all talk to each other need
/// about N² (64 swarm nodes: 4096), so past about 32 nodes new neighbours were refused
/// ("neighbor table overflow!" in dmesg), connections between nodes never came up and their
/// agents fell back to HTTP. On real hardware every node has its own table.
pub struct NeighTable {
    saved: Vec<(&'static str, String)>,
}

const NEIGH_KEYS: [&str; 3] = [
    "/proc/sys/net/ipv4/neigh/default/gc_thresh1",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh2",
    "/proc/sys/net/ipv4/neigh/default/gc_thresh3",
];

impl NeighTable {
    /// Room for at least `entries` neighbours before the kernel collects any (never lowers).
    pub fn raise(entries: u64) -> Result<NeighTable> {
        let mut saved = Vec::new();
        // gc_thresh1: below it nothing is collected; 2: collected after 5 s; 3: the hard limit.
        for (key, want) in NEIGH_KEYS.iter().zip([entries, entries * 2, entries * 4]) {
            let now = std::fs::read_to_string(key)
                .map_err(|e| HarnessError::io(format!("read {key}"), e))?
                .trim()
                .to_string();
            if now.parse::<u64>().unwrap_or(0) < want {
                std::fs::write(key, want.to_string()).map_err(|e| HarnessError::io(format!("write {key}"), e))?;
                saved.push((*key, now));
            }
        }
        Ok(NeighTable { saved })
    }
}

impl Drop for NeighTable {
    fn drop(&mut self) {
        // Highest first: the kernel does not check their order, but keep them sane throughout.
        for (key, old) in self.saved.iter().rev() {
            let _ = std::fs::write(key, old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_from_proc_stat() {
        let a = CpuTimes::parse("cpu  100 5 50 800 40 1 4 0 7 0\ncpu0 50 2 25 400 20 0 2 0 0 0\n").unwrap();
        assert_eq!(a, CpuTimes { total: 1000, idle: 840 });
        let b = CpuTimes::parse("cpu  300 5 150 900 40 1 104 0 7 0\n").unwrap();
        // 500 ticks later, 100 of them idle.
        assert!((b.busy_since(&a) - 0.8).abs() < 1e-9);
        assert_eq!(a.busy_since(&a), 0.0);
        assert_eq!(CpuTimes::parse("cpu0 1 2 3 4 5\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 x 4 5\n"), None);
        assert_eq!(CpuTimes::parse("cpu  1 2 3\n"), None);
    }
}
