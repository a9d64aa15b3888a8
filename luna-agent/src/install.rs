//! The install flow: command line → plan → prescript → partscript → image (swarm, HTTP
//! fallback) → personality → postscript, each step reported to the server.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use luna_core::api::{InstallPlan, PlanImage};
use luna_core::model::{RootMode, DEFAULT_PARTSCRIPT};

use crate::backoff::Backoff;
use crate::bmc;
use crate::cloudinit::{self, CloudInitError};
use crate::cmdline::{self, BootArgs, CmdlineError};
use crate::disk::{self, DiskError};
use crate::download::{self, FetchError, Fetched, Job, Sink};
use crate::http::{retry, Client, HttpError};
use crate::os::{Os, Script};
use crate::overlay::{self, OverlayError};
use crate::personality::{self, PersonalityError};
use crate::report::Reporter;
use crate::torrent::{Swarm, SwarmOptions, DEFAULT_WINDOW};

/// Plan requests before giving up (with the 30 s cap, about a quarter of an hour).
const PLAN_ATTEMPTS: u32 = 30;

/// One variant per step; the message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    #[error("no network interface has mac {mac} (looked in {dir})")]
    Nic { mac: String, dir: String },
    #[error("fetch install plan: {0}")]
    Plan(HttpError),
    #[error("install plan of node {node} has no image: osimage not packed yet")]
    NoImage { node: String },
    #[error("prescript failed: {0}")]
    Prescript(String),
    #[error("partscript failed: {0}")]
    Partscript(String),
    #[error(transparent)]
    Image(#[from] FetchError),
    #[error(transparent)]
    Personality(#[from] PersonalityError),
    #[error("overlay root: {0}")]
    Overlay(#[from] OverlayError),
    #[error(transparent)]
    CloudInit(#[from] CloudInitError),
    #[error("postscript failed: {0}")]
    Postscript(String),
    /// `root = disk` before the image: the disk, the part-script, the mounted root.
    #[error(transparent)]
    DiskPrepare(DiskError),
    /// `root = disk` after the image: fstab, grub's options, the boot loader.
    #[error(transparent)]
    DiskFinish(DiskError),
    #[error("status report: {0}")]
    Report(HttpError),
}

impl AgentError {
    /// The step it belongs to (as reported).
    pub fn step(&self) -> &'static str {
        match self {
            AgentError::Cmdline(_) | AgentError::Nic { .. } => "cmdline",
            AgentError::Plan(_) | AgentError::NoImage { .. } => "plan",
            AgentError::Prescript(_) => "prescript",
            AgentError::Partscript(_) => "partscript",
            AgentError::Image(FetchError::Verify { .. }) => "verify",
            AgentError::Image(FetchError::Unpack(_)) => "unpack",
            AgentError::Image(_) => "download",
            AgentError::Personality(_) | AgentError::CloudInit(_) => "personality",
            AgentError::Overlay(_) => "overlay",
            AgentError::Postscript(_) => "postscript",
            AgentError::DiskPrepare(_) => "partscript",
            AgentError::DiskFinish(_) => "bootloader",
            AgentError::Report(_) => "report",
        }
    }
}

/// Paths and switches; the defaults are the real node's, tests point them at temp dirs.
#[derive(Clone, Debug)]
pub struct Config {
    pub cmdline: PathBuf,
    pub sys_class_net: PathBuf,
    pub meminfo: PathBuf,
    pub sysroot: PathBuf,
    /// Scratch directory for the torrent session (holds nothing big).
    pub scratch: PathBuf,
    /// Use the swarm (else HTTP only).
    pub swarm: bool,
    /// Extra peers (tests without a tracker).
    pub initial_peers: Vec<SocketAddr>,
    pub window: u64,
    /// What the `disk` root mode reads (`/sys`, `/proc/self/mountinfo`).
    pub disk: disk::Paths,
    /// Unpack the image (else download and verify only: `install --no-unpack`, measuring).
    pub unpack: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cmdline: "/proc/cmdline".into(),
            sys_class_net: "/sys/class/net".into(),
            meminfo: "/proc/meminfo".into(),
            sysroot: "/sysroot".into(),
            scratch: "/run/luna".into(),
            swarm: true,
            initial_peers: Vec::new(),
            window: DEFAULT_WINDOW,
            disk: disk::Paths::default(),
            unpack: true,
        }
    }
}

/// tmpfs size for the root: the larger of twice the archive (rounded up to MiB) and 80 % of RAM.
pub fn tmpfs_size(archive: u64, mem_total: Option<u64>) -> String {
    let twice = archive.saturating_mul(2).div_ceil(1 << 20);
    let ram = mem_total.map(|b| b / 100 * 80 / (1 << 20)).unwrap_or(0);
    format!("{}m", twice.max(ram).max(1))
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What the install did, for logs and tests.
#[derive(Debug)]
pub struct Outcome {
    pub plan: InstallPlan,
    pub nic: String,
    pub fetched: Fetched,
}

struct Ctx<'a> {
    cfg: &'a Config,
    os: Arc<dyn Os>,
    args: BootArgs,
    client: Client,
    reporter: Arc<Reporter>,
}

pub fn boot_args(cfg: &Config) -> Result<BootArgs, AgentError> {
    Ok(cmdline::read(&cfg.cmdline)?)
}

fn client(args: &BootArgs) -> Result<Client, AgentError> {
    Ok(Client::new(&args.url, &args.node, &args.token).map_err(AgentError::Plan)?.with_fallbacks(&args.fallbacks))
}

/// `luna-agent install`. On failure the error has been reported as step `error`.
pub async fn install(cfg: &Config, os: Arc<dyn Os>) -> Result<Outcome, AgentError> {
    let args = boot_args(cfg)?;
    let client = client(&args)?;
    let reporter = Reporter::new(client.clone());
    let ctx = Ctx { cfg, os, args, client, reporter: reporter.clone() };
    match run(&ctx).await {
        Ok(o) => Ok(o),
        Err(e) => {
            tracing::error!("{} step failed: {e}", e.step());
            reporter.step("error", Some(format!("{}: {e}", e.step()))).await;
            Err(e)
        }
    }
}

/// `luna-agent service`: report service mode, install nothing.
pub async fn service(cfg: &Config) -> Result<(), AgentError> {
    let args = boot_args(cfg)?;
    let reporter = Reporter::new(client(&args)?);
    reporter.step("service", Some("service mode: shell on the console".into())).await;
    Ok(())
}

/// `luna-agent status STEP [MESSAGE]`, for shell hooks; fails if the report does not get through.
pub async fn status(cfg: &Config, step: &str, message: Option<String>) -> Result<(), AgentError> {
    let args = boot_args(cfg)?;
    let client = client(&args)?;
    let report = luna_core::api::StatusReport { step: step.to_string(), message, ..Default::default() };
    retry(4, &mut Backoff::standard(), || client.status_once(&report)).await.map_err(AgentError::Report)
}

fn env(ctx: &Ctx<'_>, plan: &InstallPlan, image: &PlanImage, nic: &str, ip: Option<Ipv4Addr>) -> Vec<(String, String)> {
    let mem = std::fs::read_to_string(&ctx.cfg.meminfo).ok().and_then(|m| mem_total(&m));
    let mut env = vec![
        ("LUNA_NODE", plan.node.clone()),
        ("LUNA_HOSTNAME", plan.hostname.clone()),
        ("LUNA_DOMAIN", plan.domain.clone()),
        ("LUNA_URL", ctx.args.url.clone()),
        ("LUNA_SYSROOT", ctx.cfg.sysroot.display().to_string()),
        ("LUNA_OSIMAGE", image.osimage.clone()),
        ("LUNA_IMAGE_SIZE", image.size.to_string()),
        ("LUNA_TMPFS_SIZE", tmpfs_size(image.size, mem)),
        ("LUNA_BOOTIF", nic.to_string()),
        ("LUNA_MAC", ctx.args.mac.map(|m| m.to_string()).unwrap_or_default()),
        ("LUNA_IP", ip.map(|i| i.to_string()).unwrap_or_default()),
    ];
    env.retain(|(_, v)| !v.is_empty());
    env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

pub(crate) fn run_script(
    os: &dyn Os,
    name: &str,
    body: &str,
    env: &[(String, String)],
    chroot: Option<&Path>,
) -> Result<(), String> {
    let code = os.run_script(&Script { name, body, env, chroot }).map_err(|e| format!("cannot start {name}: {e}"))?;
    if code == 0 {
        Ok(())
    } else {
        Err(format!("{name} exited with status {code}"))
    }
}

/// A script (the postscript, the boot loader's) chrooted into the root with /proc, /sys and /dev
/// bound, unbound afterwards whatever happened.
pub(crate) fn chrooted(
    os: &dyn Os,
    root: &Path,
    name: &str,
    body: &str,
    env: &[(String, String)],
) -> Result<(), String> {
    let mut mounted = Vec::new();
    let mut result = Ok(());
    for fs in ["proc", "sys", "dev"] {
        let target = root.join(fs);
        if let Err(e) = std::fs::create_dir_all(&target) {
            result = Err(format!("create {}: {e}", target.display()));
            break;
        }
        match os.mount(&format!("/{fs}"), &target, None, true, None) {
            Ok(()) => mounted.push(target),
            Err(e) => {
                result = Err(format!("bind /{fs} on {}: {e}", target.display()));
                break;
            }
        }
    }
    if result.is_ok() {
        result = run_script(os, name, body, env, Some(root));
    }
    for target in mounted.iter().rev() {
        if let Err(e) = os.umount(target) {
            tracing::warn!("umount {}: {e}", target.display());
            if result.is_ok() {
                result = Err(format!("umount {}: {e}", target.display()));
            }
        }
    }
    result
}

async fn run(ctx: &Ctx<'_>) -> Result<Outcome, AgentError> {
    let cfg = ctx.cfg;
    let mac = ctx.args.mac.ok_or(AgentError::Cmdline(CmdlineError::Missing("luna.mac or BOOTIF")))?;
    let nic = cmdline::find_nic(&cfg.sys_class_net, mac)
        .ok_or_else(|| AgentError::Nic { mac: mac.to_string(), dir: cfg.sys_class_net.display().to_string() })?;
    let ip = ctx.os.interface_ipv4(&nic).map(|(ip, _)| ip);
    tracing::info!("boot interface {nic} ({mac}) address {ip:?}");

    let plan =
        retry(PLAN_ATTEMPTS, &mut Backoff::standard(), || ctx.client.plan_once()).await.map_err(AgentError::Plan)?;
    ctx.reporter.step("plan", Some(format!("boot interface {nic}"))).await;
    let image = plan.image.clone().ok_or_else(|| AgentError::NoImage { node: plan.node.clone() })?;
    let env = env(ctx, &plan, &image, &nic, ip);
    let bmc = if plan.setupbmc { Some(setup_bmc(ctx, &plan).await) } else { None };

    if !plan.prescript.trim().is_empty() {
        ctx.reporter.step("prescript", None).await;
        run_script(&*ctx.os, "prescript", &plan.prescript, &env, None).map_err(AgentError::Prescript)?;
    }

    ctx.reporter.step("partscript", None).await;
    std::fs::create_dir_all(&cfg.sysroot)
        .map_err(|e| AgentError::Partscript(format!("create {}: {e}", cfg.sysroot.display())))?;
    // Only the disk mode's kernel command line matters past the boot arguments: luna.disk= and
    // the kernel options its boot loader gets.
    let cmdline_text = match plan.root {
        RootMode::Disk => std::fs::read_to_string(&cfg.cmdline).unwrap_or_default(),
        _ => String::new(),
    };
    // overlay: the squashfs goes into a tmpfs of its own; /sysroot is mounted after the download.
    let overlay = (plan.root == RootMode::Overlay).then(|| overlay::Layout::new(&cfg.scratch));
    if plan.root == RootMode::Disk {
        let on = disk::prepare(&*ctx.os, &cfg.disk, &cmdline_text, &plan.partscript, &cfg.sysroot, &env)
            .map_err(AgentError::DiskPrepare)?;
        ctx.reporter.step("partscript", Some(format!("root on disk {on}"))).await;
    } else if let Some(layout) = &overlay {
        overlay::prepare(&*ctx.os, layout, image.size)?;
        // The default partscript mounts a tmpfs on /sysroot: not wanted under the overlay.
        // An admin's own (scratch disks...) still runs.
        let own = plan.partscript.trim();
        if !own.is_empty() && own != DEFAULT_PARTSCRIPT.trim() {
            run_script(&*ctx.os, "partscript", &plan.partscript, &env, None).map_err(AgentError::Partscript)?;
        }
    } else if plan.partscript.trim().is_empty() {
        let size = env.iter().find(|(k, _)| k == "LUNA_TMPFS_SIZE").map(|(_, v)| v.as_str()).unwrap_or("80%");
        ctx.os
            .mount("tmpfs", &cfg.sysroot, Some("tmpfs"), false, Some(&format!("size={size},mode=0755")))
            .map_err(|e| AgentError::Partscript(format!("mount tmpfs on {}: {e}", cfg.sysroot.display())))?;
    } else {
        run_script(&*ctx.os, "partscript", &plan.partscript, &env, None).map_err(AgentError::Partscript)?;
    }

    ctx.reporter
        .step("download", Some(format!("{} revision {}, {} bytes", image.osimage, image.revision, image.size)))
        .await;
    let swarm = if cfg.swarm { start_swarm(ctx, &image, &nic, ip).await } else { None };
    let image_dir = overlay.as_ref().map(overlay::Layout::image_dir);
    let job = Job {
        image: &image,
        root: image_dir.as_deref().unwrap_or(&cfg.sysroot),
        sink: if overlay.is_some() { Sink::File(overlay::FILE) } else { Sink::Unpack },
        os: ctx.os.clone(),
        client: &ctx.client,
        reporter: &ctx.reporter,
        stall: ctx.args.stall,
        unpack: cfg.unpack,
    };
    let fetched = download::fetch(&job, swarm.as_ref()).await;
    if let Some(s) = &swarm {
        tracing::info!("{}", s.census());
    }
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            if let Some(s) = swarm {
                s.stop(false).await;
            }
            return Err(e.into());
        }
    };
    ctx.reporter.step("verify", Some(format!("sha256 {} ok", image.sha256))).await;
    ctx.reporter
        .step_with_bytes(
            "unpack",
            Some(format!(
                "{} files, {} bytes ({} from peers, {} over http)",
                fetched.stats.files, fetched.stats.bytes, fetched.bytes_from_swarm, fetched.bytes_from_http
            )),
            crate::report::FetchedBytes { from_peers: fetched.bytes_from_swarm, over_http: fetched.bytes_from_http },
        )
        .await;

    // Seeding goes on during the overlay mount, personality and postscript (the squashfs stays
    // in RAM, so an overlay node seeds it until it exits); it stops just before the agent exits.
    let rest = async {
        if let Some(layout) = &overlay {
            let upper = env.iter().find(|(k, _)| k == "LUNA_TMPFS_SIZE").map(|(_, v)| v.as_str()).unwrap_or("50%");
            let dev = overlay::mount(&*ctx.os, layout, &cfg.sysroot, upper)?;
            let msg = format!(
                "{} on {} (squashfs), upper layer {}",
                layout.image_file().display(),
                dev.display(),
                layout.upper_link().display()
            );
            ctx.reporter.step("overlay", Some(msg)).await;
        }
        if cloudinit::present(&cfg.sysroot) {
            let files = cloudinit::fetch(&ctx.client).await?;
            let dir = cloudinit::write_seed(&cfg.sysroot, &files)?;
            ctx.reporter.step("personality", Some(format!("cloud-init seed in {}", dir.display()))).await;
        } else {
            ctx.reporter.step("personality", None).await;
            personality::write(&cfg.sysroot, &plan, &nic, Some(mac))?;
        }
        if !plan.postscript.trim().is_empty() {
            ctx.reporter.step("postscript", None).await;
            chrooted(&*ctx.os, &cfg.sysroot, "postscript", &plan.postscript, &env).map_err(AgentError::Postscript)?;
        }
        if plan.root == RootMode::Disk {
            ctx.reporter.step("bootloader", None).await;
            let disks =
                disk::finish(&*ctx.os, &cfg.disk, &cmdline_text, &cfg.sysroot, &env).map_err(AgentError::DiskFinish)?;
            return Ok::<_, AgentError>(Some(disks.join(" ")));
        }
        Ok::<_, AgentError>(None)
    }
    .await;
    let on_disk = match rest {
        Ok(d) => d,
        Err(e) => {
            if let Some(s) = swarm {
                s.stop(true).await;
            }
            return Err(e);
        }
    };
    // "booted" is the booted OS's to say (the image's boot-time hook); until then the node is
    // installed and switching root. A BMC that could not be set up is told here too, so it
    // stays visible in the node's last agent status.
    let installed = match on_disk {
        Some(disks) => format!(
            "{} revision {} installed on disk (boot loader on {disks}), switching root",
            image.osimage, image.revision
        ),
        None => format!("{} revision {} installed, switching root", image.osimage, image.revision),
    };
    let done = match bmc {
        Some(Err(e)) => format!("{installed}; {e}"),
        Some(Ok(())) => format!("{installed}; bmc set up"),
        None => installed,
    };
    ctx.reporter.step("installed", Some(done)).await;
    tracing::info!("reported installed to the server");
    // The node is installed; before it switches root it seeds on for the nodes still
    // downloading (they were fetching from it: see `torrent::Linger`).
    if let Some(s) = swarm {
        s.linger(ctx.args.linger).await;
        s.stop(true).await;
    }
    Ok(Outcome { plan, nic, fetched })
}

/// The `bmc` step. A BMC that cannot be set up does not stop the install (the node is still
/// useful); the error is reported now and again with `booted`.
async fn setup_bmc(ctx: &Ctx<'_>, plan: &InstallPlan) -> Result<(), String> {
    ctx.reporter.step("bmc", Some("setting up the bmc".into())).await;
    let result = match plan.bmc.clone() {
        None => Err("bmc setup failed: setupbmc is set but the group has no bmcsetup".to_string()),
        Some(bmc) => {
            let os = ctx.os.clone();
            match tokio::task::spawn_blocking(move || bmc::configure(&*os, &bmc)).await {
                Ok(Ok(readback)) => Ok(readback),
                Ok(Err(e)) => Err(format!("bmc setup failed: {e}")),
                Err(e) => Err(format!("bmc setup failed: {e}")),
            }
        }
    };
    match result {
        Ok(readback) => {
            // The read-back goes to the console (and the server): what the BMC now has.
            tracing::info!("bmc set up: {readback}");
            ctx.reporter.step("bmc", Some(format!("bmc set up: {readback}"))).await;
            Ok(())
        }
        Err(e) => {
            tracing::warn!("{e}");
            ctx.reporter.step("bmc", Some(e.clone())).await;
            Err(e)
        }
    }
}

/// The address in a URL's host, when it is one (luna's URLs name servers by address).
fn url_ip(url: &str) -> Option<std::net::IpAddr> {
    let host = reqwest::Url::parse(url).ok()?.host_str()?.to_string();
    host.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

async fn start_swarm(ctx: &Ctx<'_>, image: &PlanImage, nic: &str, ip: Option<Ipv4Addr>) -> Option<Swarm> {
    // The plan's server first, then every other server holding the image.
    let mut torrent = None;
    let mut errors = Vec::new();
    for url in std::iter::once(&image.torrent_url).chain(&image.torrent_mirrors) {
        match retry(4, &mut Backoff::standard(), || ctx.client.bytes_once(url)).await {
            Ok(t) => {
                torrent = Some(t);
                break;
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    let Some(torrent) = torrent else {
        ctx.reporter.step("http-fallback", Some(format!("no torrent: {}", errors.join("; ")))).await;
        return None;
    };
    if let Err(e) = std::fs::create_dir_all(&ctx.cfg.scratch) {
        tracing::warn!("create {}: {e}", ctx.cfg.scratch.display());
    }
    let opts = SwarmOptions {
        listen_ip: ip,
        // Binding to a device needs the interface to exist: only on a real node.
        device: ip.filter(|ip| !ip.is_loopback()).map(|_| nic.to_string()),
        initial_peers: ctx.cfg.initial_peers.clone(),
        window: ctx.cfg.window,
        servers: std::iter::once(&image.torrent_url)
            .chain(&image.torrent_mirrors)
            .chain(std::iter::once(&image.http_url))
            .chain(&image.http_mirrors)
            .filter_map(|u| url_ip(u))
            .collect(),
        piece_spread: ctx.args.piece_spread,
        upload_slots: ctx.args.upload_slots,
        peer_limit: ctx.args.peer_limit,
    };
    match Swarm::start(torrent, &ctx.cfg.scratch, opts).await {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.reporter.step("http-fallback", Some(format!("torrent session failed: {e:#}"))).await;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tmpfs_sizes() {
        let gib = 1u64 << 30;
        assert_eq!(tmpfs_size(gib, Some(16 * gib)), "13107m");
        assert_eq!(tmpfs_size(10 * gib, Some(16 * gib)), "20480m");
        assert_eq!(tmpfs_size(1, None), "1m");
        assert_eq!(mem_total("MemTotal:       16384 kB\nMemFree: 1 kB\n"), Some(16384 * 1024));
        assert_eq!(mem_total("nothing"), None);
    }
}
