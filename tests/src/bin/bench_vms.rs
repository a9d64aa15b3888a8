//! Benchmark (not a test): real VMs. Time from power-on to `installed` of one VM alone, then of
//! four VMs powered on at once, on the end-to-end fixture (`luna_tests::Cluster`: luna-server on
//! the embedded store in a namespace, the busybox test image packed with this tree's dracut
//! module and agent, VMs PXE-booting from the bridge); prints the ratio (goal <= 1.3 under TCG).
//!
//!     cargo run -p luna-tests --bin bench-vms -- [--vms 4] [--timeout-s 900]
//!
//! A node counts as installed when the server's status for it says `installed` (or `booted`,
//! which comes after). Needs root, qemu, dracut and the test assets (`tests/assets`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use luna_tests::{Cluster, ClusterOptions, Vm};

const IMAGE: &str = "bench";

/// One VM alone against N at once: time from power-on to installed.
#[derive(Parser, Debug)]
struct Args {
    /// VMs powered on at once in the second round.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(2..=16))]
    vms: u8,
    /// Longest wait for a round, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_s: u64,
}

fn mac(i: usize) -> String {
    format!("52:54:00:be:77:{i:02x}")
}

/// Powers on nodes `first..first+count` at once; returns when all are installed.
fn round(c: &Cluster, first: usize, count: usize, timeout: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    let vms: Vec<Vm> = (first..first + count)
        .map(|i| c.boot(&format!("bench-vm{i:03}"), &mac(i)))
        .collect::<std::result::Result<_, _>>()
        .context("start the VMs")?;
    let mut pending: Vec<usize> = (first..first + count).collect();
    while !pending.is_empty() {
        if t0.elapsed() > timeout {
            let tails: Vec<String> = vms.iter().map(|v| v.serial().tail(10)).collect();
            bail!("nodes {pending:?} not installed after {timeout:?}; serial tails:\n{}", tails.join("\n---\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
        pending.retain(|i| {
            let step = c
                .node(&format!("node{i:03}"))
                .ok()
                .and_then(|n| n["status"]["step"].as_str().map(str::to_string))
                .unwrap_or_default();
            step != "installed" && step != "booted"
        });
    }
    let took = t0.elapsed();
    drop(vms);
    Ok(took)
}

fn main() -> Result<()> {
    let a = Args::parse();
    let n = usize::from(a.vms);
    let timeout = Duration::from_secs(a.timeout_s);
    let c = Cluster::start(ClusterOptions { subnet: "10.97.0".into(), ..ClusterOptions::default() })?;
    c.cli(&["network", "add", "prov", "--cidr", "10.97.0.0/24", "--gateway", &c.server_ip()])?;
    c.add_test_osimage(IMAGE, "console=ttyS0")?;
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov"])?;
    c.cli(&["node", "add", &format!("node[001-{:03}]", n + 1), "--group", "compute"])?;
    for i in 1..=n + 1 {
        c.cli(&["node", "change", &format!("node{i:03}"), "--mac", &mac(i)])?;
    }
    c.pack(IMAGE, Duration::from_secs(600))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.current_revision(IMAGE)?["seeder"]["healthy"] != true {
        if Instant::now() > deadline {
            bail!("the seeder never served the image");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("bench-vms: load before {}", load().trim());
    let one = round(&c, 1, 1, timeout).context("one VM")?;
    println!("1 VM: power-on to installed {:.1} s (load {})", one.as_secs_f64(), load().trim());
    let many = round(&c, 2, n, timeout).with_context(|| format!("{n} VMs"))?;
    println!("{n} VMs at once: power-on to all installed {:.1} s (load {})", many.as_secs_f64(), load().trim());
    println!("ratio {n} VMs / 1 VM: {:.2} (goal <= 1.3 under TCG)", many.as_secs_f64() / one.as_secs_f64());
    Ok(())
}
