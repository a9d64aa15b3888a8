//! Images as torrents: packing an osimage's chroot into a published revision (a `tar.zst`, its
//! `.torrent`, the kernel and an initramfs), rolling back, the HTTP downloads, and the seeder.
//!
//! Layout under `data_dir` (see [`publish::Layout`]):
//! `images/<osimage>/<rev>/{<osimage>.tar.zst, <osimage>.torrent, vmlinuz-<kver>,
//! initramfs-<kver>.img, .verified}` plus, for overlay root mode, `<osimage>.squashfs`,
//! `<osimage>.squashfs.torrent` and `.verified-squashfs`; files are served at
//! `/images/<osimage>/<rev>/<file>`.
//! The `ImageRevision` fields `archive`, `torrent`, `kernel`, `initrd` hold those file names.

pub mod archive;
pub mod http;
pub mod jobs;
pub mod kernel;
pub mod metainfo;
pub mod pack;
pub mod piece;
pub mod publish;
pub mod replicate;
pub mod seeder;
pub mod squashfs;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use luna_core::model::{AnyObject, ImageRevision, Kind, Osimage};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::service::{Service, ServiceError};
pub use jobs::{JobId, JobState, JobStatus, Jobs};
pub use pack::{PackMode, PackStep};
use publish::Layout;

/// Default `[image] seeder_peer_slots`, with super-seeding on (the slot holders get different
/// pieces). bench-swarm, 10 Mbit/s links, 8 MiB image: 64 nodes took 3.4–3.9 S/B with 2 slots,
/// 2.8–3.2 with 8 (2.86–2.96 once half of them were kept for incoming peers, librqbit patch
/// 12; server egress 1.8–2.2 S), 3.9 and 7.5 with 16 (README, Performance). Without
/// super-seeding slot holders fetch pieces in order and each costs the server a copy (8 hosts,
/// 16 MiB, `tests/tests/image_swarm.rs`: 1 slot 1.0×, 2 slots 2.0×, 4 slots 3.9×, no limit 7.4×).
pub const DEFAULT_SEEDER_PEER_SLOTS: u32 = 8;

/// `[image]` in luna.toml.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// The dracut command that builds initramfs files (on the server, see `kernel`).
    pub dracut: String,
    /// Revisions kept per osimage (at least 1); older ones are deleted after a pack.
    pub keep_revisions: u32,
    /// zstd level of the archive.
    pub zstd_level: i32,
    /// zstd worker threads; 0 = one per core.
    pub zstd_threads: u32,
    /// Whether the server seeds its images over BitTorrent.
    pub seed: bool,
    /// Address the seeder listens on for peers (the provisioning interface's address; with
    /// 0.0.0.0 the cluster's frontend_address is what the tracker hands out).
    pub seed_listen: SocketAddr,
    /// Seeder upload limit in bytes per second; 0 = unlimited.
    pub upload_limit_bytes_per_s: u64,
    /// Upload slots: how many peers the seeder serves at once per revision (0 = librqbit's
    /// default of 128). Peers beyond it are refused and fetch from the peers that got a slot; a
    /// peer that completes disconnects and frees its slot. See ARCHITECTURE.md (seeder).
    pub seeder_peer_slots: u32,
    /// Super-seeding (BEP 16): the seeder tells each peer of one piece at a time, one no
    /// connected peer got from it yet if there is one near the peer's first missing piece, else
    /// the first; so the slot holders get different pieces. See ARCHITECTURE.md (seeder).
    pub seeder_super_seed: bool,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            dracut: "dracut".into(),
            keep_revisions: 3,
            zstd_level: 3,
            zstd_threads: 0,
            seed: true,
            seed_listen: "0.0.0.0:6881".parse().expect("valid literal"),
            upload_limit_bytes_per_s: 0,
            seeder_peer_slots: DEFAULT_SEEDER_PEER_SLOTS,
            seeder_super_seed: true,
        }
    }
}

/// The `[image]` section for `--print-config`.
pub fn documented_defaults() -> String {
    let d = ImageConfig::default();
    format!(
        r#"[image]
# dracut command that builds each image's initramfs on this server.
dracut = "{dracut}"
# Revisions kept per osimage; older ones are deleted after a pack.
keep_revisions = {keep}
# zstd level and worker threads (0 = one per core) of image archives.
zstd_level = {level}
zstd_threads = {threads}
# Seed images over BitTorrent from this server.
seed = {seed}
# Address the seeder listens on (the provisioning address; 0.0.0.0 = all, announced
# as the cluster's frontend_address).
seed_listen = "{listen}"
# Seeder upload limit in bytes per second; 0 = unlimited.
upload_limit_bytes_per_s = {limit}
# Upload slots: peers the seeder serves at once per revision (0 = no limit). Others are
# refused and fetch from the peers holding a slot; a node that completes frees its slot.
seeder_peer_slots = {slots}
# Super-seeding: tell each peer of one piece at a time, pieces no connected peer got
# from the server yet first, so that the slot holders get different pieces.
seeder_super_seed = {super_seed}
"#,
        dracut = d.dracut,
        keep = d.keep_revisions,
        level = d.zstd_level,
        threads = d.zstd_threads,
        seed = d.seed,
        listen = d.seed_listen,
        limit = d.upload_limit_bytes_per_s,
        slots = d.seeder_peer_slots,
        super_seed = d.seeder_super_seed,
    )
}

fn pid_list(pids: &[i32]) -> String {
    if pids.is_empty() {
        return "pid unknown".into();
    }
    let list: Vec<String> = pids.iter().map(i32::to_string).collect();
    format!("pid {}", list.join(", "))
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("osimage '{image}' is open in lchroot ({}); close it or use --force", pid_list(pids))]
    InLchroot { image: String, pids: Vec<i32> },
    #[error("osimage '{image}' is already being packed{}", job.map(|j| format!(" (job {j})")).unwrap_or_default())]
    AlreadyPacking { image: String, job: Option<JobId> },
    #[error("{0}")]
    BadRequest(String),
    #[error("job {0} does not exist")]
    NoJob(JobId),
    #[error("the cluster has no frontend_address; set it (luna cluster change --frontend-address IP) so nodes can reach the tracker and downloads")]
    NoFrontend,
    #[error(transparent)]
    Pack(#[from] pack::PackError),
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
}

/// Counters the tracker keeps per torrent (implemented by the tracker).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorrentCounters {
    pub seeders: u32,
    pub leechers: u32,
    pub completed: u32,
}

/// Where revision listings get swarm counters from; the tracker implements it.
pub trait TorrentStatsSource: Send + Sync {
    /// Counters for a torrent by its hex info hash, if the tracker knows it.
    fn torrent_stats(&self, info_hash: &str) -> Option<TorrentCounters>;
}

/// How the seeder is doing with one torrent (filled in by [`seeder::Seeder`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedStatus {
    /// initializing | live | paused | error
    pub state: String,
    /// All pieces verified present: the revision is served in full.
    pub healthy: bool,
    pub have_bytes: u64,
    pub total_bytes: u64,
    pub uploaded_bytes: u64,
    pub peers: u32,
    pub error: Option<String>,
}

/// What the image routes and jobs share.
pub struct ImageState {
    pub service: Service,
    pub layout: Layout,
    pub config: ImageConfig,
    pub jobs: Jobs,
    pub stats: Option<Arc<dyn TorrentStatsSource>>,
    /// Seeder status per hex info hash.
    pub seeding: RwLock<HashMap<String, SeedStatus>>,
    /// Bumped whenever revisions change, so the seeder reconciles at once.
    pub changed: tokio::sync::watch::Sender<u64>,
    /// The cluster's servers (several luna-servers on one store): torrents are served with
    /// every live server's tracker, and revisions packed elsewhere are replicated.
    pub view: Option<Arc<crate::servers::View>>,
}

impl ImageState {
    pub fn new(service: Service, data_dir: impl Into<PathBuf>, config: ImageConfig) -> Self {
        ImageState {
            service,
            layout: Layout::new(data_dir),
            config,
            jobs: Jobs::default(),
            stats: None,
            seeding: RwLock::new(HashMap::new()),
            changed: tokio::sync::watch::channel(0).0,
            view: None,
        }
    }

    pub fn with_view(mut self, view: Arc<crate::servers::View>) -> Self {
        self.view = Some(view);
        self
    }

    pub fn with_stats(mut self, stats: Arc<dyn TorrentStatsSource>) -> Self {
        self.stats = Some(stats);
        self
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// `POST /api/v1/osimage/{name}/pack` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PackRequest {
    pub boot_only: bool,
    pub image_only: bool,
    pub force: bool,
}

impl PackRequest {
    pub fn mode(&self) -> Result<PackMode, ImageError> {
        match (self.boot_only, self.image_only) {
            (true, true) => Err(ImageError::BadRequest("boot_only and image_only exclude each other".into())),
            (true, false) => Ok(PackMode::BootOnly),
            (false, true) => Ok(PackMode::ImageOnly),
            (false, false) => Ok(PackMode::Full),
        }
    }
}

/// `POST /api/v1/osimage/{name}/rollback` body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RollbackRequest {
    pub revision: Option<u32>,
}

/// One line of `GET /api/v1/osimage/{name}/revisions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionInfo {
    #[serde(flatten)]
    pub revision: ImageRevision,
    pub current: bool,
    /// Download paths of the revision's files (relative to the server's HTTP root).
    pub urls: RevisionUrls,
    pub tracker: Option<TorrentCounters>,
    pub seeder: Option<SeedStatus>,
    /// The live servers of the cluster that hold the revision (published and verified), and
    /// those whose seeder serves it, as of their last heartbeats.
    #[serde(default)]
    pub held_by: Vec<String>,
    #[serde(default)]
    pub seeded_by: Vec<String>,
    /// The squashfs torrent's counters (revisions that have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squashfs_tracker: Option<TorrentCounters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squashfs_seeder: Option<SeedStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionUrls {
    pub archive: String,
    pub torrent: String,
    pub kernel: String,
    pub initrd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squashfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub squashfs_torrent: Option<String>,
}

/// `GET /api/v1/osimage/{name}/kernels`: the kernels of the image's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelList {
    /// Versions with both `/boot/vmlinuz-<v>` and `/lib/modules/<v>/`, oldest first.
    pub kernels: Vec<String>,
    /// The one a pack boots: `kernel_version` if the tree holds it, else the only one.
    pub selected: Option<String>,
    pub kernel_version: Option<String>,
}

pub async fn kernels(state: &Arc<ImageState>, name: &str) -> Result<KernelList, ImageError> {
    let image = osimage(&state.service, name).await?;
    tokio::task::spawn_blocking(move || {
        let kernels = kernel::list(&image);
        let selected = kernel::detect(&image).ok().map(|k| k.version);
        KernelList { kernels, selected, kernel_version: image.kernel_version }
    })
    .await
    .map_err(|e| ImageError::BadRequest(format!("kernel listing task died: {e}")))
}

/// The HTTP path of a revision's file.
pub fn file_path(image: &str, rev: u32, file: &str) -> String {
    format!("/images/{image}/{rev}/{file}")
}

pub async fn osimage(service: &Service, name: &str) -> Result<Osimage, ImageError> {
    match service.get(Kind::Osimage, name).await? {
        AnyObject::Osimage(o) => Ok(o),
        _ => unreachable!("kind checked by get"),
    }
}

/// The tracker URL, from the cluster object.
async fn announce_url(service: &Service) -> Result<String, ImageError> {
    let c = service.cluster().await?;
    let fe = c.frontend_address.ok_or(ImageError::NoFrontend)?;
    Ok(format!("http://{fe}:{}/announce", c.http_port))
}

/// Whether a pack of `image` builds the squashfs too: when the image or a group booting it is
/// in `overlay` root mode. Not always: it costs a second pass over the tree and as much disk
/// again, and a server whose nodes never use overlay need not have squashfs-tools. A group
/// switched to overlay later needs a pack (its nodes' plans say so until then).
pub async fn needs_squashfs(service: &Service, image: &Osimage) -> Result<bool, ImageError> {
    if image.root == luna_core::model::RootMode::Overlay {
        return Ok(true);
    }
    Ok(service.list(Kind::Group).await?.into_iter().any(|g| {
        matches!(g, AnyObject::Group(g) if g.osimage == image.name && g.root == Some(luna_core::model::RootMode::Overlay))
    }))
}

/// Starts packing `name` in the background; fails at once (no job) when the image cannot be
/// packed now: unknown, open in lchroot (without `force`), or already being packed.
pub async fn start_pack(state: &Arc<ImageState>, name: &str, req: PackRequest) -> Result<JobId, ImageError> {
    let prepared = prepare(state, name, req).await?;
    let job = state.jobs.create(name, prepared.warning.clone());
    let st = state.clone();
    tokio::spawn(async move {
        let result = run(&st, prepared, job).await;
        match result {
            Ok(rev) => st.jobs.finish(job, Ok(rev.id)),
            Err(e) => {
                tracing::warn!(job, error = %e, "pack failed");
                st.jobs.finish(job, Err(e.to_string()))
            }
        }
    });
    Ok(job)
}

/// Packs and publishes `name` now, returning the new revision (what a job does; for tests and
/// callers that want to wait).
pub async fn pack_now(state: &Arc<ImageState>, name: &str, req: PackRequest) -> Result<ImageRevision, ImageError> {
    let prepared = prepare(state, name, req).await?;
    let job = state.jobs.create(name, prepared.warning.clone());
    let r = run(state, prepared, job).await;
    state.jobs.finish(job, r.as_ref().map(|r| r.id).map_err(|e| e.to_string()));
    r
}

struct Prepared {
    image: Osimage,
    lock: publish::PackLock,
    /// Keeps lchroot sessions out while the pack runs (none when packing with --force).
    _lchroot: Option<publish::LchrootExclusion>,
    opts: pack::PackOptions,
    warning: Option<String>,
}

async fn prepare(state: &Arc<ImageState>, name: &str, req: PackRequest) -> Result<Prepared, ImageError> {
    let mode = req.mode()?;
    let image = osimage(&state.service, name).await?;
    let announce = announce_url(&state.service).await?;
    let squashfs = needs_squashfs(&state.service, &image).await?.then(|| squashfs::SquashfsOptions {
        program: "mksquashfs".into(),
        zstd_level: state.config.zstd_level,
        threads: state.config.zstd_threads,
    });
    let layout = &state.layout;
    let lock = publish::try_pack_lock(layout, name)
        .map_err(|source| ImageError::Io { what: "cannot lock", path: layout.pack_lock(name), source })?
        .ok_or_else(|| ImageError::AlreadyPacking { image: name.into(), job: state.jobs.running_for(name) })?;
    let mut warning = None;
    let lchroot_path = layout.lchroot_lock(name);
    let lchroot = match publish::lchroot_state(layout, name).map_err(|source| ImageError::Io {
        what: "cannot check the lchroot lock",
        path: lchroot_path,
        source,
    })? {
        publish::LchrootState::Closed(x) => Some(x),
        publish::LchrootState::Open { pids } => {
            if !req.force {
                return Err(ImageError::InLchroot { image: name.into(), pids });
            }
            let w = format!(
                "osimage '{name}' is open in lchroot ({}); packing anyway (--force): files changing now may be inconsistent",
                pid_list(&pids)
            );
            tracing::warn!("{w}");
            warning = Some(w);
            None
        }
    };
    publish::remove_stale_tmp(layout, name);
    let revision = publish::next_revision(layout, &image);
    let previous = image
        .current()
        .or(image.revisions.last())
        .map(|r| pack::Previous { dir: layout.revision_dir(name, r.id), revision: r.clone() });
    let opts = pack::PackOptions {
        mode,
        out_dir: layout.tmp_dir(name, revision),
        revision,
        previous,
        announce,
        // No `url-list`: a standard client told of the HTTP URL pulls the whole image from the
        // server at LAN speed, past the seeder's upload slots. Only luna agents get the URL
        // (in their plan, as the fallback); see ARCHITECTURE.md (seeder).
        web_seed: None,
        dracut: state.config.dracut.clone(),
        archive: archive::ArchiveOptions {
            zstd_level: state.config.zstd_level,
            zstd_threads: state.config.zstd_threads,
            piece_candidates: Vec::new(),
        },
        squashfs,
        now: crate::service::unix_now(),
    };
    Ok(Prepared { image, lock, _lchroot: lchroot, opts, warning })
}

async fn run(state: &Arc<ImageState>, p: Prepared, job: JobId) -> Result<ImageRevision, ImageError> {
    let Prepared { image, lock, opts, _lchroot, .. } = p;
    let tmp = opts.out_dir.clone();
    std::fs::create_dir_all(&tmp).map_err(|source| ImageError::Io {
        what: "cannot create",
        path: tmp.clone(),
        source,
    })?;
    let st = state.clone();
    let img = image.clone();
    let o = opts.clone();
    let built = tokio::task::spawn_blocking(move || {
        pack::pack(&img, &o, &mut |p| {
            st.jobs.progress(job, p);
            true
        })
    })
    .await
    .map_err(|e| ImageError::BadRequest(format!("pack task died: {e}")));
    let revision = match built {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            discard(&tmp);
            return Err(e.into());
        }
        Err(e) => {
            discard(&tmp);
            return Err(e);
        }
    };
    state.jobs.step(job, PackStep::Publishing);
    let dst = state.layout.revision_dir(&image.name, revision.id);
    if let Err(source) = publish::install(&tmp, &dst) {
        discard(&tmp);
        return Err(ImageError::Io { what: "cannot publish", path: dst, source });
    }
    match commit(state, &image.name, revision.clone()).await {
        Ok(kept) => {
            publish::remove_unlisted(&state.layout, &image.name, &kept);
            drop(lock);
            state.bump();
            tracing::info!(image = %image.name, rev = revision.id, size = revision.archive_size, "revision published");
            Ok(revision)
        }
        Err(e) => {
            discard(&dst);
            Err(e)
        }
    }
}

fn discard(dir: &std::path::Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove failed revision");
        }
    }
}

/// Compare-and-swap on the osimage object, re-reading it when someone changed it meanwhile.
async fn cas_osimage<F>(service: &Service, name: &str, mut change: F) -> Result<Osimage, ImageError>
where
    F: FnMut(&Osimage) -> Result<serde_json::Value, ImageError>,
{
    for _ in 0..32 {
        let image = osimage(service, name).await?;
        let mut patch = change(&image)?;
        patch["rev"] = json!(image.rev);
        match service.update(Kind::Osimage, name, patch).await {
            Ok(AnyObject::Osimage(o)) => return Ok(o),
            Ok(_) => unreachable!("kind checked by update"),
            Err(ServiceError::Stale { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ServiceError::Busy(32).into())
}

/// Adds `rev` to the object as current, dropping the oldest beyond keep-N; returns the ids kept.
async fn commit(state: &ImageState, name: &str, rev: ImageRevision) -> Result<Vec<u32>, ImageError> {
    let keep = state.config.keep_revisions;
    let id = rev.id;
    let o = cas_osimage(&state.service, name, |image| {
        // Another server of the cluster published the same number meanwhile: never replace it.
        if image.revisions.iter().any(|r| r.id == id) {
            return Err(ImageError::BadRequest(format!(
                "osimage '{name}' revision {id} was published meanwhile (by another server); pack again"
            )));
        }
        let (kept, _dropped) = publish::with_revision(&image.revisions, rev.clone(), keep);
        Ok(json!({ "revisions": kept, "current_revision": id }))
    })
    .await?;
    Ok(o.revisions.iter().map(|r| r.id).collect())
}

/// Switches `name` to revision `rev`, or to the one before the current.
pub async fn rollback(state: &ImageState, name: &str, rev: Option<u32>) -> Result<Osimage, ImageError> {
    let o = cas_osimage(&state.service, name, |image| {
        let target = publish::rollback_target(image, rev).map_err(ImageError::BadRequest)?;
        Ok(json!({ "current_revision": target }))
    })
    .await?;
    tracing::info!(image = name, rev = ?o.current_revision, "rolled back");
    state.bump();
    Ok(o)
}

/// The kept revisions of `name`, newest last, with swarm and seeder counters.
pub async fn revisions(state: &ImageState, name: &str) -> Result<Vec<RevisionInfo>, ImageError> {
    let image = osimage(&state.service, name).await?;
    let seeding = state.seeding.read().map(|m| m.clone()).unwrap_or_default();
    let servers = state.view.as_ref().map(|v| v.servers()).unwrap_or_default();
    let by = |rev: u32, seeding: bool| -> Vec<String> {
        servers
            .iter()
            .filter(|s| {
                !s.stale && s.holds.iter().any(|h| h.osimage == name && h.revision == rev && (h.seeding || !seeding))
            })
            .map(|s| s.id.clone())
            .collect()
    };
    Ok(image
        .revisions
        .iter()
        .map(|r| RevisionInfo {
            held_by: by(r.id, false),
            seeded_by: by(r.id, true),
            current: image.current_revision == Some(r.id),
            urls: RevisionUrls {
                archive: file_path(name, r.id, &r.archive),
                torrent: file_path(name, r.id, &r.torrent),
                kernel: file_path(name, r.id, &r.kernel),
                initrd: file_path(name, r.id, &r.initrd),
                squashfs: r.squashfs.as_ref().map(|s| file_path(name, r.id, &s.file)),
                squashfs_torrent: r.squashfs.as_ref().map(|s| file_path(name, r.id, &s.torrent)),
            },
            tracker: state.stats.as_ref().and_then(|s| s.torrent_stats(&r.info_hash)),
            seeder: seeding.get(&r.info_hash).cloned(),
            squashfs_tracker: r
                .squashfs
                .as_ref()
                .and_then(|q| state.stats.as_ref().and_then(|s| s.torrent_stats(&q.info_hash))),
            squashfs_seeder: r.squashfs.as_ref().and_then(|q| seeding.get(&q.info_hash).cloned()),
            revision: r.clone(),
        })
        .collect())
}

/// The revisions this server has published whole (their directory with a `.verified` marker of
/// the revision's info hash) and whether its seeder serves each: what its heartbeat reports.
pub async fn held(state: &ImageState) -> Vec<luna_core::api::HeldRevision> {
    let Ok(images) = state.service.list(Kind::Osimage).await else { return Vec::new() };
    let seeding = state.seeding.read().map(|m| m.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for o in images {
        let AnyObject::Osimage(img) = o else { continue };
        for r in &img.revisions {
            let dir = state.layout.revision_dir(&img.name, r.id);
            if pack::Verified::read(&dir).is_some_and(|v| v.info_hash == r.info_hash) {
                out.push(luna_core::api::HeldRevision {
                    osimage: img.name.clone(),
                    revision: r.id,
                    info_hash: r.info_hash.clone(),
                    seeding: seeding.get(&r.info_hash).is_some_and(|s| s.healthy),
                });
            }
        }
    }
    out
}

/// The status of a pack job.
pub fn job(state: &ImageState, id: JobId) -> Result<JobStatus, ImageError> {
    state.jobs.get(id).ok_or(ImageError::NoJob(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_parse_back() {
        #[derive(Deserialize)]
        struct Wrap {
            image: ImageConfig,
        }
        let w: Wrap = toml::from_str(&documented_defaults()).unwrap();
        assert_eq!(w.image, ImageConfig::default());
        let e = toml::from_str::<Wrap>("[image]\nkeep = 3\n").err().unwrap().to_string();
        assert!(e.contains("keep"), "{e}");
    }

    #[test]
    fn pack_request_modes() {
        assert_eq!(PackRequest::default().mode().unwrap(), PackMode::Full);
        assert_eq!(PackRequest { boot_only: true, ..Default::default() }.mode().unwrap(), PackMode::BootOnly);
        assert!(PackRequest { boot_only: true, image_only: true, force: false }.mode().is_err());
        assert!(serde_json::from_str::<PackRequest>(r#"{"bootonly":true}"#).is_err());
    }
}
