//! Benchmark (not a test): `lpower HOSTLIST status` of N simulated BMCs (OpenIPMI `ipmi_sim`,
//! IPMI 2.0 lanplus) against the way it is done without luna, one `ipmitool -I lanplus -C 3
//! ... chassis power status` process per node run by `xargs -P 32`; both in the same run.
//!
//!     cargo run --release -p luna-tests --bin bench-power -- [--nodes 128] [--rounds 3]
//!
//! Everything runs in one network namespace: N BMCs on their own addresses, luna-server, the
//! CLI and ipmitool. Every answer must be a power state. ipmitool is given cipher suite 3 (what
//! luna uses) with `-C 3`: without it ipmitool first asks for the channel's cipher suites,
//! which ipmi_sim does not answer, and waits 10 s per node, which would flatter luna.
//! Needs root, ipmi_sim and ipmitool. Target: lpower at least 3x faster.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use luna_tests::{cargo_bin, ipmi_sim, require_tool, work_dir, ChildGuard, Netns};

const TARGET: f64 = 3.0;
const PASSWORD: &str = "bench-pw";
const LISTEN: &str = "127.0.0.1:7151";
/// The admin API (HTTPS), in the namespace too.
const API_LISTEN: &str = "127.0.0.1:7152";

/// lpower status of N simulated BMCs against ipmitool per node with xargs -P 32.
#[derive(Parser)]
struct Args {
    /// Simulated BMCs (one node each).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..=250))]
    nodes: u16,
    /// Timed rounds of each; the best round counts.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=20))]
    rounds: u16,
}

fn addr(i: u16) -> String {
    format!("10.83.0.{}", 1 + i)
}

fn main() -> Result<()> {
    let a = Args::parse();
    require_tool("ipmi_sim")?;
    require_tool("ipmitool")?;
    std::fs::create_dir_all(work_dir())?;
    let dir = tempfile::Builder::new().prefix("bench-power-").tempdir_in(work_dir())?;
    let d = dir.path();
    let ns = Netns::new()?;
    ns.add_bridge("bmc0")?;
    ns.add_addr("bmc0", "10.83.0.1/24")?;
    let addrs: Vec<String> = (1..=a.nodes).map(addr).collect();
    for x in &addrs {
        ns.add_addr("bmc0", &format!("{x}/32"))?;
    }
    let mut sims = Vec::new();
    for (i, x) in addrs.iter().enumerate() {
        sims.push(ipmi_sim(&ns, &d.join(format!("bmc{i}")), x, PASSWORD)?);
    }

    let config = format!(
        "store = \"sqlite://{d}/luna.db\"\nlisten = \"{LISTEN}\"\ntoken_file = \"{d}/token\"\ndata_dir = \"{d}/data\"\n\
         [http]\napi_listen = \"{API_LISTEN}\"\n[tftp]\nenabled = false\n[image]\nseed = false\n",
        d = d.display()
    );
    std::fs::write(d.join("luna.toml"), config)?;
    let server_bin = cargo_bin("luna-server")?;
    let st = Command::new(&server_bin).arg("--config").arg(d.join("luna.toml")).arg("init").output()?;
    if !st.status.success() {
        bail!("luna-server init: {}", String::from_utf8_lossy(&st.stderr));
    }
    let mut cmd = ns.command(&server_bin);
    cmd.arg("--config").arg(d.join("luna.toml"));
    let server: ChildGuard = ChildGuard::spawn(&mut cmd, "luna-server")?;
    server.wait_for("http listening", Duration::from_secs(60))?;

    let run = |bin: &str, args: &[&str]| -> Result<std::process::Output> {
        Ok(ns
            .command(cargo_bin(bin)?)
            .args(args)
            .env("LUNA_SERVER", format!("https://{API_LISTEN}"))
            .env("LUNA_CA", d.join("data/tls/ca.pem"))
            .env("LUNA_TOKEN_FILE", d.join("token"))
            .env_remove("LUNA_TOKEN")
            // read by `bmcsetup add --password-from-env` only
            .env("LUNA_BMC_PASSWORD", PASSWORD)
            .output()?)
    };
    let luna = |args: &[&str]| -> Result<()> {
        let out = run("luna", args)?;
        if !out.status.success() {
            bail!("luna {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    luna(&["network", "add", "prov", "--cidr", "10.84.0.0/16"])?;
    luna(&["network", "add", "ipmi", "--cidr", "10.83.0.0/24"])?;
    luna(&["osimage", "add", "tiny", "--path", "/srv/tiny"])?;
    luna(&["bmcsetup", "add", "b", "--user", "admin", "--password-from-env"])?;
    luna(&[
        "group",
        "add",
        "compute",
        "--osimage",
        "tiny",
        "--network",
        "prov",
        "--bmc-network",
        "ipmi",
        "--bmcsetup",
        "b",
    ])?;
    for i in 1..=a.nodes {
        luna(&["node", "add", &format!("node{i:03}"), "--group", "compute", "--ip", &format!("BMC={}", addr(i))])?;
    }
    let hostlist = format!("node[001-{:03}]", a.nodes);

    let lpower = || -> Result<Duration> {
        let t = Instant::now();
        let out = run("lpower", &[&hostlist, "status"])?;
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        let good = text.lines().filter(|l| l.ends_with(": off") || l.ends_with(": on")).count();
        if !out.status.success() || good != a.nodes as usize {
            bail!("lpower: {good} of {} nodes answered:\n{text}{}", a.nodes, String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    };
    let ipmitool = || -> Result<Duration> {
        let t = Instant::now();
        let mut child = ns
            .command("xargs")
            .args(["-P", "32", "-I", "{}", "ipmitool", "-I", "lanplus", "-C", "3", "-H", "{}", "-U", "admin"])
            .args(["-P", PASSWORD, "chassis", "power", "status"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("run xargs ipmitool")?;
        child.stdin.take().context("xargs stdin")?.write_all(addrs.join("\n").as_bytes())?;
        let out = child.wait_with_output()?;
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&out.stdout);
        let good = text.lines().filter(|l| l.starts_with("Chassis Power is")).count();
        if !out.status.success() || good != a.nodes as usize {
            bail!("ipmitool: {good} of {} nodes answered: {}", a.nodes, String::from_utf8_lossy(&out.stderr));
        }
        Ok(took)
    };

    // Warm-up: every simulator answers (and the binaries are in the page cache).
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = lpower() {
        if Instant::now() > deadline {
            return Err(e.context("the simulated BMCs did not all answer within 60 s"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    ipmitool()?;

    let (mut best_l, mut best_i) = (Duration::MAX, Duration::MAX);
    for round in 1..=a.rounds {
        let l = lpower()?;
        let i = ipmitool()?;
        println!("round {round}: lpower {:.3} s, ipmitool+xargs -P 32 {:.3} s", l.as_secs_f64(), i.as_secs_f64());
        best_l = best_l.min(l);
        best_i = best_i.min(i);
    }
    let ratio = best_i.as_secs_f64() / best_l.as_secs_f64();
    println!(
        "bench-power: {} BMCs, best of {}: lpower {:.3} s, ipmitool per node (xargs -P 32) {:.3} s: {ratio:.1}x (target >= {TARGET}x)",
        a.nodes,
        a.rounds,
        best_l.as_secs_f64(),
        best_i.as_secs_f64()
    );
    drop(server);
    drop(sims);
    if ratio < TARGET {
        bail!("lpower is {ratio:.1}x ipmitool, below the {TARGET}x target");
    }
    Ok(())
}
