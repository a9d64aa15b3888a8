//! Owner-only permissions for what holds secrets: the data directory (0700) and the sqlite
//! database with its WAL and shared-memory files (0600). The database keeps BMC passwords in
//! clear, so a group- or world-readable file or directory is tightened at start-up, with a
//! warning naming it; one that cannot be tightened stops the server with an error naming it.

use std::path::{Path, PathBuf};

/// A directory that holds secrets: owner only.
pub const DIR_MODE: u32 = 0o700;
/// A file that holds secrets: owner read/write only.
pub const FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum PermError {
    #[error("cannot create {path} with mode {mode:04o}: {source}")]
    Create { path: PathBuf, mode: u32, source: std::io::Error },
    #[error("{path} has mode {found:04o} (group or others may read it) and cannot be changed to {want:04o}: {source}")]
    Tighten { path: PathBuf, found: u32, want: u32, source: std::io::Error },
    #[error("cannot read the permissions of {path}: {source}")]
    Stat { path: PathBuf, source: std::io::Error },
}

/// The mode `found` must be changed to so group and others have no access, or `None` if it
/// already denies them (sans-IO).
pub fn tightened(found: u32, want: u32) -> Option<u32> {
    let perm = found & 0o7777;
    (perm & 0o077 != 0).then_some(perm & !0o077 & 0o7777 | (want & 0o700))
}

/// Creates `dir` (and missing parents) owner-only, or tightens it if it exists.
pub fn secure_dir(dir: &Path) -> Result<(), PermError> {
    if !dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(|source| PermError::Create {
            path: dir.into(),
            mode: DIR_MODE,
            source,
        })?;
    }
    secure(dir, DIR_MODE)
}

/// Tightens `path` to owner-only if it exists and group or others may access it.
pub fn secure(path: &Path, want: u32) -> Result<(), PermError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(PermError::Stat { path: path.into(), source }),
    };
    let found = meta.permissions().mode() & 0o7777;
    if let Some(mode) = tightened(found, want) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| PermError::Tighten {
            path: path.into(),
            found,
            want: mode,
            source,
        })?;
        tracing::warn!(path = %path.display(), from = %format!("{found:04o}"), to = %format!("{mode:04o}"),
            "permissions were too open for a file holding secrets; tightened");
    }
    Ok(())
}

/// Creates the sqlite database file 0600 if it does not exist (SQLite gives its `-wal` and `-shm`
/// files the database's permissions), and tightens the database, its WAL and shm files and its
/// directory if they exist.
pub fn secure_sqlite(db: &Path) -> Result<(), PermError> {
    if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
        secure_dir(dir)?;
    }
    if !db.exists() {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(db)
            .map_err(|source| PermError::Create { path: db.into(), mode: FILE_MODE, source })?;
    }
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        secure(Path::new(&p), FILE_MODE)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn only_group_and_other_bits_go() {
        assert_eq!(tightened(0o644, FILE_MODE), Some(0o600));
        assert_eq!(tightened(0o755, DIR_MODE), Some(0o700));
        assert_eq!(tightened(0o640, FILE_MODE), Some(0o600));
        assert_eq!(tightened(0o600, FILE_MODE), None);
        assert_eq!(tightened(0o400, FILE_MODE), None);
        assert_eq!(tightened(0o700, DIR_MODE), None);
    }

    #[test]
    fn a_new_database_is_owner_only_and_loose_files_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let db = dir.join("luna.db");
        secure_sqlite(&db).unwrap();
        assert_eq!((mode(&dir), mode(&db)), (0o700, 0o600));

        let wal = dir.join("luna.db-wal");
        std::fs::write(&wal, b"").unwrap();
        for (p, m) in [(&dir, 0o755), (&db, 0o644), (&wal, 0o666)] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        secure_sqlite(&db).unwrap();
        assert_eq!((mode(&dir), mode(&db), mode(&wal)), (0o700, 0o600, 0o600));
    }
}
