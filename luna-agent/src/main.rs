//! `luna-agent`: see the library docs. Arguments are parsed by hand to keep the static binary
//! small.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use luna_agent::os::RealOs;
use luna_agent::{install, Config};

const USAGE: &str = "usage:
  luna-agent install [--no-swarm] [--sysroot DIR] [--scratch DIR] [--cmdline FILE]
      fill the root from the install plan (reads luna.* from the kernel command line);
      --scratch: the torrent session's directory (default /run/luna)
  luna-agent service [--cmdline FILE]
      report service mode to the server
  luna-agent status STEP [MESSAGE] [--cmdline FILE]
      report a step (for shell hooks)
  luna-agent fetch --url URL --sha256 HEX --size BYTES --dir DIR [--torrent FILE] [--peer ADDR] [--stall SECS]
      stream an image into DIR without a plan (testing, measuring)
  luna-agent seed ARCHIVE --torrent OUT [--listen ADDR] [--tracker URL]
      write a .torrent for ARCHIVE and seed it until killed (testing, measuring)
environment: LUNA_LOG=error|warn|info|debug|trace (default info), or per target:
  LUNA_LOG=info,luna_agent::torrent=debug (a swarm census every 2 s)";

/// The measuring commands, in an agent built with `--features bench` only.
#[cfg(feature = "bench")]
const BENCH_USAGE: &str = "
measuring (built with --features bench):
  luna-agent install --no-unpack ...
      download and verify the image but unpack nothing (the network alone, bench-swarm)
  luna-agent bench-unpack ARCHIVE [SCRATCH] [--rounds N]
      streaming unpack against `zstd -dc | tar -x` (N rounds, default 3; median ratio)
  luna-agent bench-fetch ARCHIVE [SCRATCH]
      seed ARCHIVE, fetch it through the swarm in a second process, report its peak RSS";
#[cfg(not(feature = "bench"))]
const BENCH_USAGE: &str = "";

struct Args {
    rest: Vec<String>,
}

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        let before = self.rest.len();
        self.rest.retain(|a| a != name);
        before != self.rest.len()
    }

    fn opt(&mut self, name: &str) -> anyhow::Result<Option<String>> {
        let Some(i) = self.rest.iter().position(|a| a == name) else { return Ok(None) };
        if i + 1 >= self.rest.len() {
            bail!("option {name} needs a value");
        }
        let v = self.rest.remove(i + 1);
        self.rest.remove(i);
        Ok(Some(v))
    }

    fn done(&self) -> anyhow::Result<()> {
        if let Some(extra) = self.rest.first() {
            bail!("unexpected argument '{extra}'\n{USAGE}");
        }
        Ok(())
    }
}

fn init_logs() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let spec = std::env::var("LUNA_LOG").unwrap_or_default();
    // A level, or per-target levels: `info,luna_agent::torrent=debug`.
    let filter = match spec.parse::<tracing_subscriber::filter::Targets>() {
        Ok(t) if !spec.is_empty() => t,
        Ok(_) => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
        Err(e) => {
            eprintln!("LUNA_LOG={spec:?} is not a level nor a list of target=level ({e}); logging at info");
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        }
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    tracing_subscriber::registry().with(fmt).with(filter).init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn main() -> ExitCode {
    init_logs();
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("luna-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let mut all: Vec<String> = std::env::args().skip(1).collect();
    if all.is_empty() || all.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}{BENCH_USAGE}");
        return Ok(());
    }
    let cmd = all.remove(0);
    let mut args = Args { rest: all };
    let mut cfg = Config::default();
    if let Some(c) = args.opt("--cmdline")? {
        cfg.cmdline = c.into();
    }
    match cmd.as_str() {
        "install" => {
            if args.flag("--no-swarm") {
                cfg.swarm = false;
            }
            if let Some(s) = args.opt("--sysroot")? {
                cfg.sysroot = s.into();
            }
            if let Some(s) = args.opt("--scratch")? {
                cfg.scratch = s.into();
            }
            #[cfg(feature = "bench")]
            if args.flag("--no-unpack") {
                cfg.unpack = false;
            }
            args.done()?;
            let outcome = runtime()?.block_on(install::install(&cfg, Arc::new(RealOs)))?;
            tracing::info!(
                "installed {} on {}: {} files, {} bytes from peers, {} over http",
                outcome.plan.hostname,
                cfg.sysroot.display(),
                outcome.fetched.stats.files,
                outcome.fetched.bytes_from_swarm,
                outcome.fetched.bytes_from_http
            );
            Ok(())
        }
        "service" => {
            args.done()?;
            Ok(runtime()?.block_on(install::service(&cfg))?)
        }
        "status" => {
            if args.rest.is_empty() {
                bail!("status needs a STEP\n{USAGE}");
            }
            let step = args.rest.remove(0);
            let message = (!args.rest.is_empty()).then(|| args.rest.join(" "));
            Ok(runtime()?.block_on(install::status(&cfg, &step, message))?)
        }
        "fetch" => fetch(args),
        "seed" => seed(args),
        #[cfg(feature = "bench")]
        "bench-unpack" => {
            let rounds = match args.opt("--rounds")? {
                Some(r) => r.parse().with_context(|| format!("--rounds '{r}' is not a number"))?,
                None => 3,
            };
            let archive = PathBuf::from(args.rest.first().context("bench-unpack needs an ARCHIVE")?);
            let scratch =
                args.rest.get(1).map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("luna-bench"));
            luna_agent::bench::bench_unpack(&archive, &scratch, rounds, &RealOs)?;
            Ok(())
        }
        #[cfg(feature = "bench")]
        "bench-fetch" => {
            let archive = PathBuf::from(args.rest.first().context("bench-fetch needs an ARCHIVE")?);
            let scratch =
                args.rest.get(1).map(PathBuf::from).unwrap_or_else(|| std::env::temp_dir().join("luna-bench-fetch"));
            let run = luna_agent::bench::bench_fetch(&archive, &scratch)?;
            println!("{}", run.summary);
            println!(
                "swarm fetch + unpack of {}: {:.2} s, peak RSS {:.1} MiB (target <= 64 MiB)",
                archive.display(),
                run.wall.as_secs_f64(),
                run.peak_rss as f64 / (1 << 20) as f64
            );
            Ok(())
        }
        other => bail!("unknown command '{other}'\n{USAGE}{BENCH_USAGE}"),
    }
}

fn fetch(mut args: Args) -> anyhow::Result<()> {
    use luna_agent::download::{self, Job};
    use luna_agent::http::Client;
    use luna_agent::report::Reporter;
    use luna_agent::torrent::{Swarm, SwarmOptions, DEFAULT_WINDOW};

    let url = args.opt("--url")?.context("fetch needs --url")?;
    let sha256 = args.opt("--sha256")?.context("fetch needs --sha256")?;
    let size: u64 = args.opt("--size")?.context("fetch needs --size")?.parse().context("bad --size")?;
    let dir = PathBuf::from(args.opt("--dir")?.context("fetch needs --dir")?);
    let torrent = args.opt("--torrent")?.map(PathBuf::from);
    let mut peers = Vec::new();
    while let Some(p) = args.opt("--peer")? {
        peers.push(p.parse().with_context(|| format!("bad --peer '{p}'"))?);
    }
    let stall = args.opt("--stall")?.map(|s| s.parse::<u64>()).transpose().context("bad --stall")?.unwrap_or(30);
    args.done()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

    runtime()?.block_on(async move {
        // Reports go nowhere useful here: a closed local port, and they are best effort.
        let client = Client::new(&url, "fetch", "")?;
        let reporter = Reporter::new(Client::new("http://127.0.0.1:9", "fetch", "")?);
        let image = luna_core::api::PlanImage {
            osimage: "fetch".into(),
            revision: 0,
            torrent_url: String::new(),
            http_url: url.clone(),
            sha256,
            size,
            info_hash: String::new(),
            http_mirrors: Vec::new(),
            torrent_mirrors: Vec::new(),
        };
        let swarm = match torrent {
            Some(t) => {
                let bytes = std::fs::read(&t).with_context(|| format!("read {}", t.display()))?;
                let scratch = std::env::temp_dir().join("luna-fetch");
                let opts = SwarmOptions { initial_peers: peers, window: DEFAULT_WINDOW, ..Default::default() };
                Some(Swarm::start(bytes.into(), &scratch, opts).await?)
            }
            None => None,
        };
        let job = Job {
            image: &image,
            root: &dir,
            sink: luna_agent::download::Sink::Unpack,
            os: Arc::new(RealOs),
            client: &client,
            reporter: &reporter,
            stall: std::time::Duration::from_secs(stall),
            unpack: true,
        };
        let fetched = download::fetch(&job, swarm.as_ref()).await;
        let peak = swarm.as_ref().map(|s| s.window.peak_bytes());
        if let Some(s) = swarm {
            s.stop(fetched.is_ok()).await;
        }
        let f = fetched?;
        println!(
            "fetched: {} files, {} bytes unpacked; {} bytes from peers, {} over http; window peak {:?} bytes",
            f.stats.files, f.stats.bytes, f.bytes_from_swarm, f.bytes_from_http, peak
        );
        Ok(())
    })
}

fn seed(mut args: Args) -> anyhow::Result<()> {
    let out = PathBuf::from(args.opt("--torrent")?.context("seed needs --torrent OUT")?);
    let listen: std::net::SocketAddr =
        args.opt("--listen")?.unwrap_or_else(|| "127.0.0.1:0".into()).parse().context("bad --listen")?;
    let trackers: Vec<String> = args.opt("--tracker")?.into_iter().collect();
    let archive = PathBuf::from(args.rest.first().context("seed needs an ARCHIVE")?);
    args.rest.remove(0);
    args.done()?;
    let dir = archive.parent().context("archive has no directory")?.to_path_buf();
    runtime()?.block_on(async move {
        let spawner = librqbit::spawn_utils::BlockingSpawner::new(2);
        let opts = librqbit::CreateTorrentOptions { name: None, trackers, piece_length: None };
        let torrent = librqbit::create_torrent(&archive, opts, &spawner).await?.as_bytes()?;
        std::fs::write(&out, &torrent).with_context(|| format!("write {}", out.display()))?;
        let session = librqbit::Session::new_with_opts(
            dir.clone(),
            librqbit::SessionOptions {
                dht: None,
                disable_local_service_discovery: true,
                listen: Some(librqbit::ListenerOptions { listen_addr: listen, ipv4_only: true, ..Default::default() }),
                ipv4_only: true,
                ..Default::default()
            },
        )
        .await?;
        session
            .add_torrent(
                librqbit::AddTorrent::from_bytes(torrent),
                Some(librqbit::AddTorrentOptions {
                    output_folder: Some(dir.display().to_string()),
                    overwrite: true,
                    ..Default::default()
                }),
            )
            .await?
            .into_handle()
            .context("torrent not added")?
            .wait_until_initialized()
            .await?;
        println!("seeding {} on {:?}; torrent {}", archive.display(), session.listen_addr(), out.display());
        std::future::pending::<()>().await;
        Ok(())
    })
}
