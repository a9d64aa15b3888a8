//! Times the bulk paths admins hit on a big cluster, against a real luna-server:
//! `luna node add node[0001-4096] --group compute` and `luna node list --json`.
//!
//!     cargo run --release -p luna-cli --example bench_nodes [-- NODES]
//!
//! Runs on a fresh sqlite store, and on the MongoDB backend too when the wire-compatible test
//! server `nx-27017` is installed (`/opt/luna-venv/bin/nx-27017`, or `$NX_27017`). The target is
//! under 2 s for each step on sqlite (release build). `$LUNA_SERVER_BIN` picks the server binary.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

const TARGET: Duration = Duration::from_secs(2);

struct Timing {
    store: String,
    add: Duration,
    list: Duration,
    table: Duration,
}

fn bench(luna: &Path, store_name: &str, store: Option<&str>, count: usize) -> Result<Timing, String> {
    let s = Server::try_start(luna, store)?;
    for args in [
        &["network", "add", "cluster", "--cidr", "10.141.0.0/16"][..],
        &["network", "add", "ipmi", "--cidr", "10.148.0.0/16"],
        &["osimage", "add", "rocky9", "--path", "/images/rocky9"],
        &["group", "add", "compute", "--osimage", "rocky9", "--network", "cluster", "--bmc-network", "ipmi"],
    ] {
        let r = s.run(args);
        if r.code != 0 {
            return Err(format!("luna {args:?}: {}", r.stderr.trim()));
        }
    }
    let expr = format!("node[{:04}-{count:04}]", 1);
    let timed = |args: &[&str]| -> Result<(Duration, String), String> {
        let t = Instant::now();
        let r = s.run(args);
        let d = t.elapsed();
        if r.code != 0 {
            return Err(format!("luna {args:?}: {}\nserver log:\n{}", r.stderr.trim(), s.log()));
        }
        Ok((d, r.stdout))
    };
    let (add, _) = timed(&["node", "add", &expr, "--group", "compute"])?;
    let (list, out) = timed(&["node", "list", "--json"])?;
    let nodes: serde_json::Value = serde_json::from_str(&out).map_err(|e| format!("node list --json: {e}"))?;
    let listed = nodes.as_array().map_or(0, Vec::len);
    if listed != count {
        return Err(format!("node list --json printed {listed} nodes, {count} were added"));
    }
    let (table, out) = timed(&["node", "list"])?;
    if out.lines().count() != count + 1 {
        return Err(format!("node list printed {} lines for {count} nodes", out.lines().count()));
    }
    Ok(Timing { store: store_name.to_string(), add, list, table })
}

/// nx-27017 on a free port, killed on drop.
struct Mongo(Child);

impl Drop for Mongo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nx-27017 as a one-member replica set (the MongoDB store needs transactions), through the
/// launcher in `tests/assets/nx-replset.py` run by nx-27017's own interpreter.
fn start_mongo(bin: &Path) -> Result<(Mongo, String), String> {
    let port = common::free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/assets/nx-replset.py");
    let child = Command::new(bin.with_file_name("python3"))
        .arg(script)
        .args(["--set-name", "rs0", "--db", "memory", "--host", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mongo = Mongo(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{} did not listen on port {port} within 20 s", bin.display()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((mongo, format!("mongodb://127.0.0.1:{port}/luna?replicaSet=rs0&maxPoolSize=100")))
}

fn mark(d: Duration) -> &'static str {
    if d < TARGET {
        "ok"
    } else {
        "SLOW"
    }
}

fn main() {
    let count: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 4096,
        Some(Ok(n)) if (1..=9999).contains(&n) => n,
        Some(_) => {
            eprintln!("error: the node count must be a number from 1 to 9999");
            std::process::exit(1);
        }
    };
    // target/<profile>/examples/bench_nodes → target/<profile>/luna
    let exe = std::env::current_exe().expect("own path");
    let bin_dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
    let luna = common::cargo_build(&bin_dir, "luna-cli", "luna");
    println!("luna: {}\nluna-server: {}", luna.display(), common::server_bin(&luna).display());

    let mut failed = false;
    let mut report = |r: Result<Timing, String>| match r {
        Ok(t) => println!(
            "{:<20} node add {count}: {:>7.3} s {}   node list --json: {:>7.3} s {}   node list: {:>7.3} s {}",
            t.store,
            t.add.as_secs_f64(),
            mark(t.add),
            t.list.as_secs_f64(),
            mark(t.list),
            t.table.as_secs_f64(),
            mark(t.table),
        ),
        Err(e) => {
            failed = true;
            println!("error: {e}");
        }
    };
    report(bench(&luna, "sqlite", None, count));
    let nx = std::env::var_os("NX_27017").map(PathBuf::from).unwrap_or_else(|| "/opt/luna-venv/bin/nx-27017".into());
    if nx.exists() {
        report(start_mongo(&nx).and_then(|(_mongo, url)| bench(&luna, "mongodb (nx-27017)", Some(&url), count)));
    } else {
        println!("mongodb: skipped, {} not found", nx.display());
    }
    if failed {
        std::process::exit(1);
    }
}
