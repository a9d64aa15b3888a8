//! Benchmark (not a test): requests per second of luna's boot script,
//! `GET /boot/ipxe?mac=<known node MAC>`, measured with `wrk` at 512 connections, and as a
//! same-run baseline nginx serving a static file of the script's size.
//!
//!     cargo run --release -p luna-tests --bin bench-http -- [--nodes 1024] [--connections 512]
//!         [--seconds 10]
//!
//! wrk runs in one network namespace, the server in another (veth between). Requests cycle
//! through the `n` nodes' MACs; every answer must be a node script (wrk counts non-2xx). After
//! the run every node's status must say its script was served. Needs root and `wrk`; nginx
//! (nginx-light) is optional. Target: 20 000 requests/s.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use luna_tests::bench::{self, BenchNode, CommonArgs, Link, SERVER_IP};
use luna_tests::ChildGuard;

const TARGET: f64 = 20_000.0;

/// Boot-script requests per second: luna-server against nginx serving a static file.
#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
    /// wrk's open connections.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u16).range(1..))]
    connections: u16,
}

/// A wrk script that walks through `paths` round-robin.
fn wrk_script(paths: &[String]) -> String {
    let mut s = String::from("local paths = {\n");
    for p in paths {
        let _ = writeln!(s, "  \"{p}\",");
    }
    s.push_str("}\nlocal i = 0\nrequest = function()\n  i = i % #paths + 1\n  return wrk.format(nil, paths[i])\nend\n");
    s
}

struct WrkResult {
    rate: f64,
    requests: u64,
    non_2xx: u64,
    errors: String,
}

fn wrk(link: &Link, url: &str, script: &Path, a: &Args) -> Result<WrkResult> {
    let out = link
        .client
        .command("wrk")
        .args(["-t2", &format!("-c{}", a.connections), &format!("-d{}s", a.common.seconds), "--timeout", "5s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("run wrk (apt-get install -y wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |key: &str| text.lines().find_map(|l| l.trim().strip_prefix(key).map(|r| r.trim().to_string()));
    let rate = field("Requests/sec:").ok_or_else(|| anyhow!("no rate in wrk output: {text}"))?.parse()?;
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
        .ok_or_else(|| anyhow!("no request count in wrk output: {text}"))?;
    let non_2xx = field("Non-2xx or 3xx responses:").map_or(Ok(0), |v| v.parse())?;
    let errors = field("Socket errors:").unwrap_or_default();
    Ok(WrkResult { rate, requests, non_2xx, errors })
}

fn start_nginx(link: &Link, dir: &Path, body_len: usize) -> Result<ChildGuard> {
    let root = dir.join("www");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("script.ipxe"), "#".repeat(body_len))?;
    let d = dir.display();
    let conf = format!(
        "user root;\nworker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;\n\
         fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
         server {{ listen {SERVER_IP}:8080; root {root}; }} }}\n",
        root = root.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = link.server.command("nginx");
    cmd.arg("-c").arg(dir.join("nginx.conf")).args(["-g", "daemon off;"]);
    Ok(ChildGuard::spawn(&mut cmd, "bench-nginx")?)
}

/// Every node asked for (all of them once `requests` went round) has its status saying its
/// script was served: the per-request status is recorded. The server records it without the
/// answer waiting (group commit, `luna-server/src/status.rs`), so this asks again for a while.
fn check_status(link: &Link, dir: &Path, nodes: &[BenchNode], requests: u64) -> Result<()> {
    let token = std::fs::read_to_string(dir.join("token"))?;
    // wrk's round-robin is per thread (2 threads): fewer requests than nodes reach fewer nodes
    let expected = nodes.len().min(requests as usize / 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let out = link
            .client
            .command("curl")
            .args(["-sf", "-H", &format!("Authorization: Bearer {}", token.trim())])
            .arg("--cacert")
            .arg(dir.join("data/tls/ca.pem"))
            .arg(format!("https://{SERVER_IP}:7051/api/v1/node"))
            .output()
            .context("run curl")?;
        if !out.status.success() {
            bail!("listing nodes failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let list: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let items = list.as_array().or_else(|| list["items"].as_array()).ok_or_else(|| anyhow!("node list: {list}"))?;
        let served = items.iter().filter(|n| n["status"]["step"] == "ipxe").count();
        if served >= expected || std::time::Instant::now() > deadline {
            println!("node status: {served} of {} nodes say step=ipxe", nodes.len());
            if served < expected {
                bail!("only {served} of {expected} requested nodes have their script recorded as served");
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    let nofile = bench::raise_nofile();
    if nofile < u64::from(a.connections) * 2 + 64 {
        bail!("open-files limit {nofile} is too low for {} connections", a.connections);
    }
    let dir = tempfile::Builder::new().prefix("bench-http-").tempdir()?;
    let link = Link::new()?;
    let luna_dir = dir.path().join("luna");
    std::fs::create_dir_all(&luna_dir)?;
    let config = bench::luna_config(&luna_dir)?;
    let nodes = bench::populate_luna(&config, a.common.nodes.into())?;
    let _luna = bench::start_luna(&link, &config)?;
    bench::wait_tcp(&link.client, &format!("{SERVER_IP}:7050"), Duration::from_secs(30))?;

    let paths: Vec<String> = nodes.iter().map(|n| format!("/boot/ipxe?mac={}", n.mac)).collect();
    let script = dir.path().join("paths.lua");
    std::fs::write(&script, wrk_script(&paths))?;
    let sample = link
        .client
        .command("curl")
        .args(["-sf", &format!("http://{SERVER_IP}:7050{}", paths[0])])
        .output()
        .context("run curl")?;
    let body = String::from_utf8_lossy(&sample.stdout).into_owned();
    if !sample.status.success() || !body.contains(&nodes[0].name) {
        bail!("the boot script for {} is not a node script: {body}", nodes[0].mac);
    }
    println!(
        "GET /boot/ipxe?mac=<one of {} known MACs> ({} bytes), wrk -t2 -c{} -d{}s, wrk and server in two netns",
        a.common.nodes,
        body.len(),
        a.connections,
        a.common.seconds
    );
    let luna = wrk(&link, &format!("http://{SERVER_IP}:7050"), &script, &a)?;
    println!(
        "luna     {:10.1} requests/s  (non-2xx {}, socket errors: {})",
        luna.rate,
        luna.non_2xx,
        if luna.errors.is_empty() { "none" } else { &luna.errors }
    );
    if luna.non_2xx > 0 {
        bail!("luna answered {} requests with an error status", luna.non_2xx);
    }
    // status writes may still be draining
    std::thread::sleep(Duration::from_secs(2));
    check_status(&link, &luna_dir, &nodes, luna.requests)?;

    if bench::have("nginx") {
        let ndir = dir.path().join("nginx");
        std::fs::create_dir_all(ndir.join("tmp"))?;
        let _nginx = start_nginx(&link, &ndir, body.len())?;
        bench::wait_tcp(&link.client, &format!("{SERVER_IP}:8080"), Duration::from_secs(10))?;
        let static_paths = vec!["/script.ipxe".to_string()];
        let static_script = dir.path().join("static.lua");
        std::fs::write(&static_script, wrk_script(&static_paths))?;
        let n = wrk(&link, &format!("http://{SERVER_IP}:8080"), &static_script, &a)?;
        println!("nginx    {:10.1} requests/s  (static file of the same size; non-2xx {})", n.rate, n.non_2xx);
        println!("ratio luna/nginx-static: {:.2}", luna.rate / n.rate);
    } else {
        println!("nginx    skipped: not installed (apt-get install -y nginx-light)");
    }
    println!("luna vs target: {:.1} / {TARGET:.0} requests/s = {:.2}", luna.rate, luna.rate / TARGET);
    Ok(())
}
