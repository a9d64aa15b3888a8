//! The per-image session lock lchroot shares with `luna osimage pack`.
//!
//! The file is `<data_dir>/lchroot/<image>.lock` (luna-server's `Layout::lchroot_lock`). Every
//! lchroot session holds a shared `flock` on it for as long as it runs and appends its pid; a
//! pack takes the lock exclusively (without waiting) for the whole pack. So sessions run side
//! by side, a pack is refused while one is open (the server names the live pids written in the
//! file), and a session is refused while a pack runs. `flock` locks go with the process: a
//! session killed with SIGKILL holds nothing, whatever the file still says.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("osimage '{image}' is being packed; open it with lchroot when the pack is done")]
    BeingPacked { image: String },
    #[error("cannot {what} lock file {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
}

/// Held for the whole session.
#[derive(Debug)]
pub struct SessionLock {
    _file: File,
}

pub fn lock_path(data_dir: &Path, image: &str) -> PathBuf {
    data_dir.join("lchroot").join(format!("{image}.lock"))
}

/// Takes the shared lock of `image` and records our pid in it.
pub fn acquire(data_dir: &Path, image: &str) -> Result<SessionLock, LockError> {
    let path = lock_path(data_dir, image);
    let io_err = |what: &'static str| {
        let path = path.clone();
        move |source| LockError::Io { what, path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err("create the directory of the"))?;
    }
    let mut f = File::options().create(true).append(true).open(&path).map_err(io_err("open"))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LockError::BeingPacked { image: image.into() });
        }
        return Err(io_err("lock")(e));
    }
    writeln!(f, "{}", std::process::id()).map_err(io_err("write"))?;
    Ok(SessionLock { _file: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_share_and_an_exclusive_holder_refuses_them() {
        let d = tempfile::tempdir().unwrap();
        let a = acquire(d.path(), "compute").unwrap();
        let b = acquire(d.path(), "compute").unwrap();
        let text = std::fs::read_to_string(lock_path(d.path(), "compute")).unwrap();
        let me = std::process::id().to_string();
        assert_eq!(text.lines().filter(|l| *l == me).count(), 2, "{text}");
        // what a pack does: exclusive, not waiting
        let f = File::open(lock_path(d.path(), "compute")).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_ne!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0, "sessions hold it");
        drop((a, b));
        // SAFETY: as above.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let e = acquire(d.path(), "compute").unwrap_err().to_string();
        assert_eq!(e, "osimage 'compute' is being packed; open it with lchroot when the pack is done");
        acquire(d.path(), "other").unwrap();
    }
}
