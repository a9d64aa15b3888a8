//! The tracker's swarms across a server restart: [`TrackerHandle::save`](super::TrackerHandle::save)
//! at a clean stop, [`TrackerHandle::restore`](super::TrackerHandle::restore) at the next start.
//!
//! Without it a restart forgets every peer and every completion: a seeding libtorrent client
//! (qBittorrent announces only every 300 s) is not handed out until its next announce, and
//! `completed` starts again from zero. The file is JSON (`<data_dir>/tracker-swarm.json`, mode
//! 0600 like the rest of the data directory), written to a temporary name and renamed, so a
//! crash mid-write leaves the previous one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::swarm::SavedTorrent;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "tracker-swarm.json";

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedSwarm {
    /// Unix seconds when it was written: peers age by the time the server was down.
    pub saved_at_unix: u64,
    pub torrents: Vec<SavedTorrent>,
}

impl SavedSwarm {
    /// How long ago it was saved, by the wall clock at `now_unix` (zero if the clock went back).
    pub fn age(&self, now_unix: u64) -> Duration {
        Duration::from_secs(now_unix.saturating_sub(self.saved_at_unix))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read tracker state {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("tracker state {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("cannot write tracker state {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Reads the saved swarms; `None` when there is no file.
pub fn load(path: &Path) -> Result<Option<SavedSwarm>, PersistError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Read { path: path.to_path_buf(), source }),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| PersistError::Parse { path: path.to_path_buf(), source })
}

/// Writes `swarm` to `path` (mode 0600) through a temporary file and a rename.
pub fn store(path: &Path, swarm: &SavedSwarm) -> Result<(), PersistError> {
    let err = |source| PersistError::Write { path: path.to_path_buf(), source };
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(swarm).map_err(|e| err(std::io::Error::other(e)))?;
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(err)?;
    f.write_all(&body).and_then(|()| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracker::swarm::SavedPeer;

    #[test]
    fn stores_and_loads_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        assert_eq!(load(&path).unwrap(), None);
        let swarm = SavedSwarm {
            saved_at_unix: 1_000,
            torrents: vec![SavedTorrent {
                info_hash: "11".repeat(20),
                completed: 3,
                uploaded: 5,
                downloaded: 7,
                peers: vec![SavedPeer {
                    peer_id: "22".repeat(20),
                    addr: "10.1.0.5:6881".parse().unwrap(),
                    source: "10.1.0.5".parse().unwrap(),
                    left: 0,
                    uploaded: 1,
                    downloaded: 2,
                    idle_s: 40,
                    counted_complete: true,
                }],
            }],
        };
        store(&path, &swarm).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&path).unwrap(), Some(swarm.clone()));
        assert_eq!(swarm.age(1_030), Duration::from_secs(30));
        assert_eq!(swarm.age(900), Duration::ZERO);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"{\"saved_at_unix\": 1, \"torrents\": [{\"info_hash\": 5}]}").unwrap();
        let e = load(&path).unwrap_err();
        assert!(matches!(e, PersistError::Parse { .. }), "{e}");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }
}
