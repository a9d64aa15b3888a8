//! Revisions packed on another luna-server of the cluster reach this one through the swarm.
//!
//! Every `[server] replicate_interval_s` (polling: nx-27017, the MongoDB-wire test store, has no
//! change streams, and a poll of one collection every few seconds is cheap), and whenever the
//! revisions change, the replicator compares the osimage objects in the store with what this
//! server holds. For a kept revision it lacks, it takes the holders from the servers' heartbeat
//! records and:
//! 1. fetches the `.torrent` over HTTP from a holder and checks that its info dict hashes to the
//!    revision's `info_hash` (so a wrong or tampered file is refused before anything else);
//! 2. fetches the kernel and initramfs over HTTP into `images/<osimage>/.<rev>.tmp/` and checks
//!    each against the SHA-256 the revision records (`kernel_sha256`, `initrd_sha256`; a
//!    revision packed before they were recorded is taken with a warning);
//! 3. downloads the archive with this server's own seeder session from the holders' seeders and
//!    the torrent's trackers (every piece checked against the torrent's SHA-1s);
//! 4. checks the archive's SHA-256 against the revision's `sha256`;
//! 5. when the revision has a squashfs (overlay root mode), does 1, 3 and 4 for it too (its
//!    torrent, info hash, file and SHA-256) and writes its `.verified-squashfs` marker;
//! 6. writes the `.verified` marker, renames the directory into place (under the image's pack
//!    lock) and bumps the image state: the seeder seeds it without re-hashing and the next
//!    heartbeat lists it as held.
//!
//! Invariants: the revision number, archive and info hashes are the packing server's (nothing in
//! the store is written); a revision directory appears only whole and verified (every file the
//! revision names, hash-checked); a failure removes the temporary directory and is retried at
//! the next round; revisions the object no longer keeps are deleted here as on the packing
//! server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use luna_core::model::{AnyObject, ImageRevision, Kind};

use super::pack::{sha256_file, Verified, SQUASHFS_VERIFIED_MARKER};
use super::publish;
use super::seeder::Seeder;
use super::ImageState;

/// How long a download may go without a byte before the round gives it up.
const STALL: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ReplicateError {
    #[error("osimage '{image}' revision {rev}: no live server holds it")]
    NoHolder { image: String, rev: u32 },
    #[error("osimage '{image}' revision {rev}: {what}")]
    Failed { image: String, rev: u32, what: String },
}

pub struct Replicator {
    state: Arc<ImageState>,
    seeder: Arc<Seeder>,
    http: reqwest::Client,
    interval: Duration,
}

/// What a round should fetch: kept revisions without a verified directory here (the archive's
/// marker, and the squashfs's when the revision has one).
pub fn missing(state: &ImageState, images: &[luna_core::model::Osimage]) -> Vec<(String, ImageRevision)> {
    let mut out = Vec::new();
    for img in images {
        for r in &img.revisions {
            let dir = state.layout.revision_dir(&img.name, r.id);
            let archive = Verified::read(&dir).is_some_and(|v| v.info_hash == r.info_hash);
            let squashfs = r.squashfs.as_ref().is_none_or(|sq| {
                Verified::read_named(&dir, SQUASHFS_VERIFIED_MARKER).is_some_and(|v| v.info_hash == sq.info_hash)
            });
            if !(archive && squashfs) {
                out.push((img.name.clone(), r.clone()));
            }
        }
    }
    out
}

impl Replicator {
    pub fn new(state: Arc<ImageState>, seeder: Arc<Seeder>, interval: Duration) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| format!("cannot build the replicator's http client: {e}"))?;
        Ok(Replicator { state, seeder, http, interval })
    }

    /// Rounds until `stop` is cancelled.
    pub async fn run(self, stop: tokio_util::sync::CancellationToken) {
        let mut changed = self.state.changed.subscribe();
        loop {
            self.round().await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
                _ = changed.changed() => {}
            }
        }
    }

    /// One look at the store: fetches what is missing, removes what is no longer kept.
    pub async fn round(&self) {
        let images: Vec<luna_core::model::Osimage> = match self.state.service.list(Kind::Osimage).await {
            Ok(l) => l
                .into_iter()
                .filter_map(|o| match o {
                    AnyObject::Osimage(i) => Some(i),
                    _ => None,
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "replicator cannot list osimages");
                return;
            }
        };
        for img in &images {
            // A pack running here holds the lock; it cleans up after itself.
            if let Ok(Some(_lock)) = publish::try_pack_lock(&self.state.layout, &img.name) {
                let kept: Vec<u32> = img.revisions.iter().map(|r| r.id).collect();
                publish::remove_unlisted(&self.state.layout, &img.name, &kept);
            }
        }
        let mut fetched = false;
        for (image, rev) in missing(&self.state, &images) {
            match self.fetch(&image, &rev).await {
                Ok(()) => {
                    fetched = true;
                    tracing::info!(image, rev = rev.id, info_hash = %rev.info_hash, "revision replicated from the swarm");
                }
                Err(e @ ReplicateError::NoHolder { .. }) => tracing::debug!(error = %e, "not replicated yet"),
                Err(e) => tracing::warn!(error = %e, "replication failed; retrying next round"),
            }
        }
        if fetched {
            self.state.bump();
        }
    }

    async fn fetch(&self, image: &str, rev: &ImageRevision) -> Result<(), ReplicateError> {
        let fail = |what: String| ReplicateError::Failed { image: image.into(), rev: rev.id, what };
        let view = self.state.view.as_ref().ok_or_else(|| fail("this server has no cluster view".into()))?;
        let holders = crate::servers::holders_of(&view.servers(), &rev.info_hash, view.id());
        if holders.is_empty() {
            return Err(ReplicateError::NoHolder { image: image.into(), rev: rev.id });
        }
        let Some(_lock) = publish::try_pack_lock(&self.state.layout, image)
            .map_err(|e| fail(format!("cannot take the pack lock: {e}")))?
        else {
            return Err(fail("the image is being packed here".into()));
        };
        let tmp = self.state.layout.tmp_dir(image, rev.id);
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| fail(format!("cannot create {}: {e}", tmp.display())))?;
        let result = self.fetch_into(image, rev, &holders, &tmp).await.map_err(fail);
        match result {
            Ok(()) => {
                let dst = self.state.layout.revision_dir(image, rev.id);
                let _ = std::fs::remove_dir_all(&dst);
                publish::install(&tmp, &dst).map_err(|e| {
                    let _ = std::fs::remove_dir_all(&tmp);
                    ReplicateError::Failed { image: image.into(), rev: rev.id, what: format!("cannot publish: {e}") }
                })
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    async fn fetch_into(
        &self,
        image: &str,
        rev: &ImageRevision,
        holders: &[(String, Vec<String>, Option<std::net::SocketAddrV4>)],
        tmp: &Path,
    ) -> Result<(), String> {
        let bases: Vec<&String> = holders.iter().flat_map(|h| h.1.iter()).collect();
        let peers: Vec<SocketAddr> = holders.iter().filter_map(|h| h.2.map(SocketAddr::V4)).collect();
        for (file, want) in [(&rev.kernel, &rev.kernel_sha256), (&rev.initrd, &rev.initrd_sha256)] {
            if file.is_empty() || file == &rev.archive {
                continue;
            }
            let bytes = self.get_any(&bases, image, rev.id, file).await?;
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            match check_sha256(file, &sha, want)? {
                true => {}
                false => tracing::warn!(
                    image,
                    rev = rev.id,
                    file = %file,
                    "the revision records no sha256 for this file (packed by an older luna): published unchecked"
                ),
            }
            write(tmp, file, &bytes)?;
        }
        let archive = Payload {
            file: &rev.archive,
            torrent: &rev.torrent,
            info_hash: &rev.info_hash,
            sha256: &rev.sha256,
            marker: super::pack::VERIFIED_MARKER,
        };
        self.swarm_fetch(image, rev.id, &archive, &bases, &peers, tmp).await?;
        if let Some(sq) = &rev.squashfs {
            let squashfs = Payload {
                file: &sq.file,
                torrent: &sq.torrent,
                info_hash: &sq.info_hash,
                sha256: &sq.sha256,
                marker: SQUASHFS_VERIFIED_MARKER,
            };
            self.swarm_fetch(image, rev.id, &squashfs, &bases, &peers, tmp).await?;
        }
        Ok(())
    }

    /// Fetches a payload's torrent over HTTP (its info hash and file name checked), the file
    /// itself through the swarm, checks its SHA-256 and writes its marker.
    async fn swarm_fetch(
        &self,
        image: &str,
        rev: u32,
        p: &Payload<'_>,
        bases: &[&String],
        peers: &[SocketAddr],
        tmp: &Path,
    ) -> Result<(), String> {
        let torrent = self.get_any(bases, image, rev, p.torrent).await?;
        let summary = super::metainfo::parse(&torrent).map_err(|e| e.to_string())?;
        if hex::encode(summary.info_hash) != p.info_hash {
            return Err(format!(
                "the torrent {} served by the holders hashes to {}, not the revision's {}",
                p.torrent,
                hex::encode(summary.info_hash),
                p.info_hash
            ));
        }
        if summary.name != p.file {
            return Err(format!("the torrent {} names '{}', not the revision's '{}'", p.torrent, summary.name, p.file));
        }
        write(tmp, p.torrent, &torrent)?;
        self.seeder.fetch(torrent, tmp, peers.to_vec(), STALL).await?;
        let file = tmp.join(p.file);
        let path = file.clone();
        let sha = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| format!("hash task died: {e}"))?
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        check_sha256(p.file, &sha, p.sha256)?;
        Verified::of(&file, p.sha256, p.info_hash)
            .and_then(|v| v.write_named(tmp, p.marker))
            .map_err(|e| format!("cannot write the verified marker {}: {e}", p.marker))?;
        Ok(())
    }

    /// `GET <base>/images/<image>/<rev>/<file>` from the first holder that answers.
    async fn get_any(&self, bases: &[&String], image: &str, rev: u32, file: &str) -> Result<Vec<u8>, String> {
        let mut errors = Vec::new();
        for base in bases {
            let url = format!("{base}{}", super::file_path(image, rev, file));
            match self.http.get(&url).send().await.and_then(|r| r.error_for_status()) {
                Ok(r) => match r.bytes().await {
                    Ok(b) => return Ok(b.to_vec()),
                    Err(e) => errors.push(format!("{url}: {e}")),
                },
                Err(e) => errors.push(format!("{url}: {e}")),
            }
        }
        Err(format!("cannot fetch {file}: {}", errors.join("; ")))
    }
}

fn write(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), String> {
    if file.contains('/') || file.starts_with('.') {
        return Err(format!("refusing file name '{file}'"));
    }
    std::fs::write(dir.join(file), bytes).map_err(|e| format!("cannot write {}: {e}", dir.join(file).display()))
}

/// A file of a revision that travels through the swarm (the archive, the squashfs).
struct Payload<'a> {
    file: &'a str,
    torrent: &'a str,
    info_hash: &'a str,
    sha256: &'a str,
    marker: &'static str,
}

/// Whether `file`'s digest `got` is the `want`ed one: `Ok(true)` if so, `Ok(false)` when the
/// revision records none (packed before it was recorded), an error naming the file otherwise.
fn check_sha256(file: &str, got: &str, want: &str) -> Result<bool, String> {
    if want.is_empty() {
        return Ok(false);
    }
    if got != want {
        return Err(format!("{file}: sha256 is {got}, the revision says {want}"));
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: u32, hash: &str) -> ImageRevision {
        ImageRevision {
            id,
            created: 0,
            kernel_version: "k".into(),
            archive: "c.tar.zst".into(),
            archive_size: 1,
            sha256: "s".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd".into(),
            kernel_sha256: String::new(),
            initrd_sha256: String::new(),
            torrent: "c.torrent".into(),
            info_hash: hash.into(),
            piece_length: 0,
            tree_bytes: 0,
            squashfs: None,
        }
    }

    #[test]
    fn digests_are_checked_when_recorded() {
        assert_eq!(check_sha256("vmlinuz", "ab", "ab"), Ok(true));
        assert_eq!(check_sha256("vmlinuz", "ab", ""), Ok(false));
        let e = check_sha256("vmlinuz", "ab", "cd").unwrap_err();
        assert!(e.contains("vmlinuz") && e.contains("ab") && e.contains("cd"), "{e}");
    }

    #[tokio::test]
    async fn missing_is_every_kept_revision_without_a_matching_marker() {
        let d = tempfile::tempdir().unwrap();
        let store = crate::store::open("sqlite://:memory:").await.unwrap();
        let state = ImageState::new(crate::service::Service::new(store), d.path(), Default::default());
        let mut img = luna_core::model::Osimage::new("c", "/x");
        img.revisions = vec![rev(1, "aa"), rev(2, "bb"), rev(3, "cc")];
        // 1: held; 2: a directory without marker (a crash mid-rename is impossible, but a hand
        // copy is not); 3: a marker of another torrent
        for (id, hash) in [(1, Some("aa")), (2, None), (3, Some("zz"))] {
            let dir = state.layout.revision_dir("c", id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("c.tar.zst"), b"x").unwrap();
            if let Some(h) = hash {
                Verified::of(&dir.join("c.tar.zst"), "s", h).unwrap().write(&dir).unwrap();
            }
        }
        // 4 and 5 have a squashfs: 4 lacks its marker, 5 has it.
        for id in [4, 5] {
            let mut r = rev(id, "dd");
            r.squashfs = Some(luna_core::model::SquashfsImage {
                file: "c.squashfs".into(),
                size: 1,
                sha256: "q".into(),
                torrent: "c.squashfs.torrent".into(),
                info_hash: "ee".into(),
                piece_length: 0,
            });
            img.revisions.push(r);
            let dir = state.layout.revision_dir("c", id);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("c.tar.zst"), b"x").unwrap();
            std::fs::write(dir.join("c.squashfs"), b"q").unwrap();
            Verified::of(&dir.join("c.tar.zst"), "s", "dd").unwrap().write(&dir).unwrap();
            if id == 5 {
                let v = Verified::of(&dir.join("c.squashfs"), "q", "ee").unwrap();
                v.write_named(&dir, SQUASHFS_VERIFIED_MARKER).unwrap();
            }
        }
        let m: Vec<u32> = missing(&state, &[img]).into_iter().map(|(_, r)| r.id).collect();
        assert_eq!(m, [2, 3, 4]);
    }
}
