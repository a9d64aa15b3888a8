//! Benchmark (not a test): N nodes installing one image at once through luna's swarm, against
//! the HTTP-only way (every node pulls the whole image from the server, as Warewulf, Grendel
//! and OpenCHAMI do), in the same invocation.
//!
//!     cargo build -p luna-server && cargo build -p luna-agent --profile agent \
//!         --target x86_64-unknown-linux-musl
//!     cargo run -p luna-tests --bin bench-swarm -- [--nodes 1,8,32,64] [--rate-mbit 20]
//!         [--image-mib 12] [--no-unpack] [--methods swarm,http] [--out docs]
//!         [--agent-args 'luna.linger=0'] [--agent-log info,luna_agent::torrent=debug]
//!         [--seeder-slots 8] [--super-seed true|false] [--tcp-cc cubic]
//!
//! `BENCH_SERVER_LOG` is luna-server's `RUST_LOG` (default `warn`; e.g. `warn,librqbit=debug`
//! for the seeder's peer connections).
//!
//! The bed (`luna_tests::swarm_bed`): a switch (bridge) with luna-server's namespace and one
//! namespace per node on it, every link shaped with `tc tbf` to the same rate B both ways, so the
//! network and not the CPUs binds. Each node runs the real static `luna-agent install` with the
//! kernel command line the server's iPXE script gave it: plan, swarm download (or HTTP with
//! `--no-swarm`), streaming unpack into its own tmpfs (skipped with `--no-unpack`), digest check,
//! status reports; everything an install does but the switch root.
//!
//! For each N and method: T(N), the wall time from starting the N agents until the last one
//! had reported `installed` (its log line once the server took the report; checked again in the
//! server's node status); E(N), the bytes the server's interface sent until every agent exited
//! (installed nodes seed on for the others, `luna.linger`), and the seeder's own counter; how
//! many agents fell back to HTTP, and when the last one exited. Printed as a table with
//! T(N)/(S/B) and E(N)/S (S = archive size); written to `<out>/bench-swarm.csv` and as a chart
//! (time against N, log N axis, both methods) to `<out>/bench-swarm.png` (gnuplot). Needs root,
//! `tc`, `curl` and `gnuplot`. Targets at N = 64: swarm T/(S/B) <= 1.5 and E/S <= 2.5.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use luna_tests::bench::CpuTimes;
use luna_tests::swarm_bed::{gnuplot, BedOptions, HostQueue, SwarmBed};

const TARGET_TIME: f64 = 1.5;
const TARGET_EGRESS: f64 = 2.5;
const TARGET_N: usize = 64;

/// `--host-queue`: how the hosts' uplinks queue (`luna_tests::swarm_bed::HostQueue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Queue {
    /// One 100 ms FIFO (`tc tbf`).
    Fifo,
    /// Packets under 128 bytes first, then the same FIFO: a model of fq_codel.
    SparseFirst,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// luna's way: the server seeds, nodes share pieces (HTTP only as fallback).
    Swarm,
    /// Every node pulls the image from the server over HTTP (`luna-agent install --no-swarm`).
    Http,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Swarm => "swarm",
            Method::Http => "http",
        }
    }
}

/// Install time and server egress of N nodes booting at once, swarm against HTTP only.
#[derive(Parser, Debug)]
struct Args {
    /// Node counts, measured in this order.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    nodes: Vec<usize>,
    /// Rate of every link (the server's included), both ways, in Mbit/s.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    rate_mbit: u32,
    /// Incompressible data in the image, in MiB (S/B should be several seconds).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=4096))]
    image_mib: u64,
    /// Download and verify only, unpack nothing (the network-only curve).
    #[arg(long)]
    no_unpack: bool,
    /// Methods, measured in this order for every N.
    #[arg(long, value_delimiter = ',', default_value = "swarm,http")]
    methods: Vec<Method>,
    /// `[image] seeder_peer_slots` of the server.
    #[arg(long, default_value_t = luna_server::image::DEFAULT_SEEDER_PEER_SLOTS)]
    seeder_slots: u32,
    /// `[image] seeder_super_seed` of the server: `true` or `false`.
    #[arg(long, default_value_t = luna_server::image::ImageConfig::default().seeder_super_seed, action = clap::ArgAction::Set)]
    super_seed: bool,
    /// How the server's and the nodes' interfaces queue (the switch's ports are FIFOs).
    #[arg(long, value_enum, default_value_t = Queue::SparseFirst)]
    host_queue: Queue,
    /// TCP congestion control of the server and the nodes (`net.ipv4.tcp_congestion_control`,
    /// set in every namespace). cubic is the default of Debian's and RHEL's kernels, so what a
    /// node's initramfs and a luna-server run; a namespace would otherwise take the machine's
    /// own default: bbr on session 16's machine, where 64 nodes (32 MiB at 5 Mbit/s) took
    /// 1.51-1.61 S/B against 1.38-1.43 with cubic (README, Performance).
    #[arg(long, default_value = "cubic")]
    tcp_cc: String,
    /// Words appended to every node's kernel command line (e.g. `luna.linger=0 luna.stall=60`).
    #[arg(long, default_value = "")]
    agent_args: String,
    /// `LUNA_LOG` of the agents (`info,luna_agent::torrent=debug`: a swarm census every 2 s).
    #[arg(long, default_value = "info")]
    agent_log: String,
    /// Directory for bench-swarm.csv and bench-swarm.png (default: the workspace's docs/).
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Row {
    method: Method,
    n: usize,
    secs: f64,
    iface: u64,
    seeder: u64,
    from_peers: u64,
    /// Until every agent exited (the swarm's seed on after `installed`: `luna.linger`).
    exit_secs: f64,
    /// Agents whose swarm stalled and that went on over HTTP.
    fallbacks: usize,
    /// The fraction of the machine's CPU time busy from the start until the last `installed`:
    /// near 1, the run measured the CPUs as much as the network.
    cpu_busy: f64,
}

/// The line the agent logs once the server has its `installed` report (it may seed on after).
const INSTALLED: &str = "reported installed to the server";

/// A number of bytes in the agents' census line (`<n> bytes from the server`).
fn census_bytes(line: &str, what: &str) -> Option<u64> {
    line.split_once(what).and_then(|(s, _)| s.rsplit(' ').next()?.parse().ok())
}

fn run(bed: &SwarmBed, a: &Args, method: Method, n: usize, sb: f64) -> Result<Row> {
    let base = bed.dir.path().join(format!("run-{}-{n}", method.name()));
    let dirs: Vec<PathBuf> = (0..n).map(|i| base.join(format!("{i}"))).collect();
    for (i, d) in dirs.iter().enumerate() {
        bed.boot_cmdline(i, d, &a.agent_args).with_context(|| format!("boot script of {}", bed.nodes[i].name))?;
    }
    let (tx0, seed0) = (bed.server_tx()?, bed.seeder_uploaded()?);
    let limit = Duration::from_secs_f64(120.0 + 3.0 * sb * n as f64);
    let cpu0 = CpuTimes::now()?;
    let t0 = Instant::now();
    let mut cpu_done = None;
    let mut agents = Vec::with_capacity(n);
    for (i, d) in dirs.iter().enumerate() {
        agents.push(bed.start_agent(i, d, method == Method::Swarm, !a.no_unpack, &a.agent_log)?);
    }
    let spawned = t0.elapsed();
    // When each agent reported `installed`, and when it exited (after seeding on).
    let mut installed: Vec<Option<f64>> = vec![None; n];
    let mut exited = 0;
    while exited < n {
        if t0.elapsed() > limit {
            let slow: Vec<&str> =
                (0..n).filter(|i| installed[*i].is_none()).map(|i| bed.nodes[i].name.as_str()).collect();
            bail!("{} of {n} agents not installed after {} s: {slow:?}", slow.len(), limit.as_secs());
        }
        if cpu_done.is_none() && installed.iter().all(Option::is_some) {
            cpu_done = Some(CpuTimes::now()?);
        }
        exited = 0;
        for (i, agent) in agents.iter_mut().enumerate() {
            let status = agent.try_wait().with_context(|| format!("agent of {}", bed.nodes[i].name))?;
            if installed[i].is_none() && agent.output().contains(INSTALLED) {
                installed[i] = Some(t0.elapsed().as_secs_f64());
            }
            if let Some(status) = status {
                if !status.success() {
                    bail!("agent of {} failed ({status}):\n{}", bed.nodes[i].name, agent.output().tail(30));
                }
                exited += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let exit_secs = t0.elapsed().as_secs_f64();
    let cpu_busy = cpu_done.map_or(CpuTimes::now(), Ok)?.busy_since(&cpu0);
    let (tx1, seed1) = (bed.server_tx()?, bed.seeder_uploaded()?);
    let mut secs = 0f64;
    let (mut from_peers, mut from_server, mut fallbacks) = (0, 0, 0);
    for (i, agent) in agents.iter().enumerate() {
        let step = bed.last_step(i)?;
        if step != "installed" {
            bail!("{} last reported '{step}', not 'installed'", bed.nodes[i].name);
        }
        secs = secs.max(installed[i].with_context(|| format!("{} never logged '{INSTALLED}'", bed.nodes[i].name))?);
        let lines = agent.output().lines();
        from_peers += lines.iter().find_map(|l| census_bytes(l, " bytes from peers")).unwrap_or(0);
        // The census right after the download (a stalled one comes first; not the debug timeline).
        from_server += lines
            .iter()
            .filter(|l| l.contains("swarm census") && !l.contains("DEBUG"))
            .find_map(|l| census_bytes(l, " bytes from the server"))
            .unwrap_or(0);
        fallbacks += usize::from(lines.iter().any(|l| l.contains("continuing over http")));
    }
    eprintln!(
        "  {} N={n}: agents started in {:.2} s, all exited after {exit_secs:.2} s, {fallbacks} fell back to http, \
         {:.2} S from the seeder by the agents' count; logs: {}",
        method.name(),
        spawned.as_secs_f64(),
        from_server as f64 / bed.archive_size as f64,
        agents.first().map(|a| a.output().log_path().display().to_string()).unwrap_or_default()
    );
    drop(agents);
    let _ = std::fs::remove_dir_all(&base);
    // Let the tracker see the finished nodes leave before the next run.
    std::thread::sleep(Duration::from_secs(2));
    Ok(Row {
        method,
        n,
        secs,
        exit_secs,
        iface: tx1.saturating_sub(tx0),
        seeder: seed1.saturating_sub(seed0),
        from_peers,
        fallbacks,
        cpu_busy,
    })
}

fn chart(out: &std::path::Path, csv: &std::path::Path, a: &Args, s: u64) -> Result<()> {
    let png = out.join("bench-swarm.png");
    let sb = s as f64 * 8.0 / (f64::from(a.rate_mbit) * 1e6);
    let script = format!(
        "set terminal pngcairo size 900,560 noenhanced\nset output '{png}'\nset datafile separator ','\n\
         set title 'luna: N nodes installing a {mib:.0} MiB image at once, every link {rate} Mbit/s (S/B = {sb:.1} s)'\n\
         set logscale x 2\nset logscale y 2\nset xlabel 'nodes (N)'\nset ylabel 'time until all installed, s'\n\
         set key top left\nset grid\n\
         plot '{csv}' using ($1==1 ? $2 : 1/0):4 with linespoints lw 2 pt 7 title 'luna swarm', \
         '{csv}' using ($1==2 ? $2 : 1/0):4 with linespoints lw 2 pt 5 title 'HTTP only (every node from the server)', \
         {sb} with lines dt 2 title 'S/B (one node alone)'\n",
        png = png.display(),
        csv = csv.display(),
        mib = s as f64 / f64::from(1 << 20),
        rate = a.rate_mbit,
    );
    gnuplot(&script).context("draw the chart (apt-get install gnuplot-nox)")?;
    println!("chart: {}", png.display());
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.nodes.is_empty() || a.nodes.contains(&0) {
        bail!("--nodes needs counts of at least 1, got {:?}", a.nodes);
    }
    if a.methods.is_empty() {
        bail!("--methods needs swarm, http or both");
    }
    luna_tests::bench::raise_nofile();
    let max = *a.nodes.iter().max().unwrap_or(&1);
    let opts = BedOptions {
        nodes: max,
        rate_mbit: a.rate_mbit,
        image_mib: a.image_mib as usize,
        seeder_slots: a.seeder_slots,
        super_seed: a.super_seed,
        host_queue: match a.host_queue {
            Queue::Fifo => HostQueue::Fifo,
            Queue::SparseFirst => HostQueue::SparseFirst,
        },
        tcp_cc: a.tcp_cc.clone(),
    };
    // Every node may talk to every other and to the server: (N + 1)² neighbours in the one
    // kernel's ARP table.
    let _neigh = luna_tests::bench::NeighTable::raise(((max + 1) * (max + 1)) as u64)
        .context("raise the kernel's ARP table for the bed")?;
    let t = Instant::now();
    let bed = SwarmBed::start(&opts).context("build the bench bed")?;
    let s = bed.archive_size;
    let sb = s as f64 * 8.0 / (f64::from(a.rate_mbit) * 1e6);
    println!(
        "bench-swarm: {max} node namespaces, links {} Mbit/s, archive S = {s} bytes, S/B = {sb:.2} s, \
         unpack {}, seeder slots {}, super-seeding {}, host queue {:?}, tcp {} (bed up in {:.0} s; load average {})",
        a.rate_mbit,
        if a.no_unpack { "off" } else { "on" },
        a.seeder_slots,
        a.super_seed,
        a.host_queue,
        a.tcp_cc,
        t.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split(' ').take(3).collect::<Vec<_>>().join(" ")
    );
    let mut rows = Vec::new();
    for &n in &a.nodes {
        for &m in &a.methods {
            let row = run(&bed, &a, m, n, sb).with_context(|| format!("{} with {n} nodes", m.name()))?;
            println!(
                "  {:<5} N={:<4} T={:7.2} s  T/(S/B)={:6.2}  E/S={:6.2} (seeder {:.2}, from peers {:.2}, \
                 {} fell back to http; last exit {:.2} s; cpu busy {:.0} %)",
                m.name(),
                n,
                row.secs,
                row.secs / sb,
                row.iface as f64 / s as f64,
                row.seeder as f64 / s as f64,
                row.from_peers as f64 / s as f64,
                row.fallbacks,
                row.exit_secs,
                row.cpu_busy * 100.0
            );
            rows.push(row);
        }
    }

    println!(
        "\n| N | method | T(N) s | T(N)/(S/B) | E(N)/S (interface) | E(N)/S (seeder) | fell back | last exit s | cpu busy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut csv = String::from(
        "method_id,nodes,method,t_s,t_over_sb,e_iface_bytes,e_over_s,e_seeder_bytes,archive_bytes,rate_mbit,unpack,\
         fallbacks,exit_s,cpu_busy,tcp_cc\n",
    );
    // One method after the other, so that gnuplot draws each as one line (a row of the other
    // method is a gap for it).
    rows.sort_by_key(|r| (r.method == Method::Http, r.n));
    for r in &rows {
        let (tr, er) = (r.secs / sb, r.iface as f64 / s as f64);
        println!(
            "| {} | {} | {:.2} | {tr:.2} | {er:.2} | {:.2} | {} | {:.2} | {:.0} % |",
            r.n,
            r.method.name(),
            r.secs,
            r.seeder as f64 / s as f64,
            r.fallbacks,
            r.exit_secs,
            r.cpu_busy * 100.0
        );
        let _ = writeln!(
            csv,
            "{},{},{},{:.3},{tr:.3},{},{er:.3},{},{s},{},{},{},{:.3},{:.3},{}",
            if r.method == Method::Swarm { 1 } else { 2 },
            r.n,
            r.method.name(),
            r.secs,
            r.iface,
            r.seeder,
            a.rate_mbit,
            !a.no_unpack,
            r.fallbacks,
            r.exit_secs,
            r.cpu_busy,
            a.tcp_cc
        );
    }
    let out = a.out.clone().unwrap_or_else(|| luna_tests::workspace_root().join("docs"));
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    let csv_path = out.join("bench-swarm.csv");
    std::fs::write(&csv_path, &csv).with_context(|| format!("write {}", csv_path.display()))?;
    println!("csv: {}", csv_path.display());
    chart(&out, &csv_path, &a, s)?;

    if let Some(r) = rows.iter().find(|r| r.method == Method::Swarm && r.n == TARGET_N) {
        let (tr, er) = (r.secs / sb, r.iface as f64 / s as f64);
        let ok = tr <= TARGET_TIME && er <= TARGET_EGRESS;
        println!(
            "target at N={TARGET_N}: swarm T/(S/B) {tr:.2} (<= {TARGET_TIME}), E/S {er:.2} (<= {TARGET_EGRESS}): {}",
            if ok { "met" } else { "MISSED" }
        );
    }
    Ok(())
}
