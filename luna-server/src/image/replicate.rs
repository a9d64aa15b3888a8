//! Revisions packed on another luna-server of the cluster reach this one through the swarm.
//!
//! Every `[server] replicate_interval_s` (polling: nx-27017, the MongoDB-wire test store, has no
//! change streams, and a poll of one collection every few seconds is cheap), and whenever the
//! revisions change, the replicator compares the osimage objects in the store with what this
//! server holds. For a kept revision it lacks, it takes the holders from the servers' heartbeat
//! records and:
//! 1. fetches the `.torrent` over HTTP from a holder and checks that its info dict hashes to the
//!    revision's `info_hash` (so a wrong or tampered file is refused before anything else);
//! 2. fetches the kernel and initramfs over HTTP into `images/<osimage>/.<rev>.tmp/`;
//! 3. downloads the archive with this server's own seeder session from the holders' seeders and
//!    the torrent's trackers (every piece checked against the torrent's SHA-1s);
//! 4. checks the archive's SHA-256 against the revision's `sha256`;
//! 5. writes the `.verified` marker, renames the directory into place (under the image's pack
//!    lock) and bumps the image state: the seeder seeds it without re-hashing and the next
//!    heartbeat lists it as held.
//!
//! Invariants: the revision number, archive and info hash are the packing server's (nothing in
//! the store is written); a revision directory appears only whole and verified; a failure
//! removes the temporary directory and is retried at the next round; revisions the object no
//! longer keeps are deleted here as on the packing server.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use luna_core::model::{AnyObject, ImageRevision, Kind};

use super::pack::Verified;
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

/// What a round should fetch: kept revisions without a verified directory here.
pub fn missing(state: &ImageState, images: &[luna_core::model::Osimage]) -> Vec<(String, ImageRevision)> {
    let mut out = Vec::new();
    for img in images {
        for r in &img.revisions {
            let dir = state.layout.revision_dir(&img.name, r.id);
            if Verified::read(&dir).is_none_or(|v| v.info_hash != r.info_hash) {
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
        let torrent = self.get_any(&bases, image, rev.id, &rev.torrent).await?;
        let summary = super::metainfo::parse(&torrent).map_err(|e| e.to_string())?;
        if hex::encode(summary.info_hash) != rev.info_hash {
            return Err(format!(
                "the torrent served by the holders hashes to {}, not the revision's {}",
                hex::encode(summary.info_hash),
                rev.info_hash
            ));
        }
        if summary.name != rev.archive {
            return Err(format!("the torrent names '{}', not the revision's archive '{}'", summary.name, rev.archive));
        }
        write(tmp, &rev.torrent, &torrent)?;
        for file in [&rev.kernel, &rev.initrd] {
            if file.is_empty() || file == &rev.archive {
                continue;
            }
            let bytes = self.get_any(&bases, image, rev.id, file).await?;
            write(tmp, file, &bytes)?;
        }
        let peers: Vec<SocketAddr> = holders.iter().filter_map(|h| h.2.map(SocketAddr::V4)).collect();
        self.seeder.fetch(torrent, tmp, peers, STALL).await?;
        let archive = tmp.join(&rev.archive);
        let path = archive.clone();
        let sha = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .map_err(|e| format!("hash task died: {e}"))?
            .map_err(|e| format!("cannot read {}: {e}", archive.display()))?;
        if sha != rev.sha256 {
            return Err(format!("archive sha256 is {sha}, the revision says {}", rev.sha256));
        }
        Verified::of(&archive, &rev.sha256, &rev.info_hash)
            .and_then(|v| v.write(tmp))
            .map_err(|e| format!("cannot write the verified marker: {e}"))?;
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

fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
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
            torrent: "c.torrent".into(),
            info_hash: hash.into(),
            piece_length: 0,
            tree_bytes: 0,
            squashfs: None,
        }
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
        let m: Vec<u32> = missing(&state, &[img]).into_iter().map(|(_, r)| r.id).collect();
        assert_eq!(m, [2, 3]);
    }
}
