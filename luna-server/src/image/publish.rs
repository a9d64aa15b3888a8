//! Publishing revisions: where they live, who may pack, and the atomic switch.
//!
//! Invariants:
//! - a revision is built in `images/<osimage>/.<rev>.tmp/`, fsynced, renamed to
//!   `images/<osimage>/<rev>/`, and only then added to the osimage object (compare-and-swap on
//!   the object's `rev`); nodes see `current_revision`, so until the object changes they keep
//!   booting the previous revision, and a revision in the object always has its whole directory;
//! - a failed pack removes its directory, so it leaves no trace;
//! - keep-N: revisions beyond the newest N are dropped from the object first, then their
//!   directories are deleted (a reader never finds a listed revision without files);
//! - one pack per osimage at a time (an `flock` on `images/<osimage>/.pack.lock`, which also holds
//!   across server processes), and none while `lchroot` has the image open.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use luna_core::model::{ImageRevision, Osimage};

/// Where things are under the server's `data_dir`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub data_dir: PathBuf,
}

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Layout { data_dir: data_dir.into() }
    }
    pub fn images(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    pub fn image_dir(&self, image: &str) -> PathBuf {
        self.images().join(image)
    }
    pub fn revision_dir(&self, image: &str, rev: u32) -> PathBuf {
        self.image_dir(image).join(rev.to_string())
    }
    pub fn tmp_dir(&self, image: &str, rev: u32) -> PathBuf {
        self.image_dir(image).join(format!(".{rev}.tmp"))
    }
    pub fn pack_lock(&self, image: &str) -> PathBuf {
        self.image_dir(image).join(".pack.lock")
    }
    /// The lock file `lchroot` holds (containing its pid) while an image is open.
    pub fn lchroot_lock(&self, image: &str) -> PathBuf {
        self.data_dir.join("lchroot").join(format!("{image}.lock"))
    }
    /// librqbit's session state (fast-resume bitfields).
    pub fn seeder_dir(&self) -> PathBuf {
        self.data_dir.join("seeder")
    }
    /// Revision numbers that have a published directory.
    pub fn revisions_on_disk(&self, image: &str) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(self.image_dir(image)) else { return Vec::new() };
        let mut v: Vec<u32> = rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
        v.sort_unstable();
        v
    }
}

/// Held while an osimage is being packed.
#[derive(Debug)]
pub struct PackLock {
    _file: File,
}

/// Takes the pack lock of `image`; `Ok(None)` if someone else holds it.
pub fn try_pack_lock(layout: &Layout, image: &str) -> io::Result<Option<PackLock>> {
    std::fs::create_dir_all(layout.image_dir(image))?;
    let f = File::options().create(true).truncate(false).write(true).open(layout.pack_lock(image))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        return Ok(Some(PackLock { _file: f }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Whether lchroot sessions have an image open (the protocol is in `luna-cli`'s
/// `lchroot/lock.rs`: each session holds a shared `flock` on the lock file and appends its pid).
#[derive(Debug)]
pub enum LchrootState {
    /// No session: the lock is ours, exclusively, until this is dropped, so no session can
    /// start while the pack runs.
    Closed(LchrootExclusion),
    /// Sessions hold the lock: the live pids written in the file (empty if none is known).
    Open { pids: Vec<i32> },
}

/// Keeps lchroot sessions out of an image while a pack runs.
#[derive(Debug)]
pub struct LchrootExclusion {
    _file: File,
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Checks for open lchroot sessions of `image` and, when there are none, takes the image's
/// lchroot lock exclusively. A lock file nobody holds (its sessions ended or were killed)
/// means no session, whatever pids it lists; it is emptied then.
pub fn lchroot_state(layout: &Layout, image: &str) -> io::Result<LchrootState> {
    let path = layout.lchroot_lock(image);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = File::options().create(true).truncate(false).read(true).write(true).open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        f.set_len(0)?;
        return Ok(LchrootState::Closed(LchrootExclusion { _file: f }));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(e);
    }
    let text = std::fs::read_to_string(&path)?;
    let mut pids: Vec<i32> = Vec::new();
    for pid in text.split_whitespace().filter_map(|w| w.parse::<i32>().ok()) {
        if pid > 0 && !pids.contains(&pid) && alive(pid) {
            pids.push(pid);
        }
    }
    Ok(LchrootState::Open { pids })
}

/// Removes half-built revision directories left by a crashed pack (caller holds the pack lock).
pub fn remove_stale_tmp(layout: &Layout, image: &str) {
    let Ok(rd) = std::fs::read_dir(layout.image_dir(image)) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        if n.starts_with('.') && n.ends_with(".tmp") && e.path().is_dir() {
            tracing::warn!(path = %e.path().display(), "removing a half-built revision");
            if let Err(err) = std::fs::remove_dir_all(e.path()) {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove");
            }
        }
    }
}

/// The number the next revision gets: above every revision in the object and on disk.
pub fn next_revision(layout: &Layout, image: &Osimage) -> u32 {
    let in_object = image.revisions.iter().map(|r| r.id).max().unwrap_or(0);
    let on_disk = layout.revisions_on_disk(&image.name).into_iter().max().unwrap_or(0);
    in_object.max(on_disk) + 1
}

/// The object's revisions after adding `new` and keeping the newest `keep` (at least 1).
/// Returns (kept, dropped).
pub fn with_revision(
    revisions: &[ImageRevision],
    new: ImageRevision,
    keep: u32,
) -> (Vec<ImageRevision>, Vec<ImageRevision>) {
    let mut all: Vec<ImageRevision> = revisions.iter().filter(|r| r.id != new.id).cloned().collect();
    all.push(new);
    all.sort_by_key(|r| r.id);
    let keep = keep.max(1) as usize;
    let cut = all.len().saturating_sub(keep);
    let kept = all.split_off(cut);
    (kept, all)
}

/// The revision a rollback switches to: `wanted`, or the newest one older than the current.
pub fn rollback_target(image: &Osimage, wanted: Option<u32>) -> Result<u32, String> {
    let ids: Vec<u32> = image.revisions.iter().map(|r| r.id).collect();
    let list = || ids.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    match wanted {
        Some(w) if ids.contains(&w) => Ok(w),
        Some(w) => Err(format!("osimage '{}' has no revision {w} (kept: {})", image.name, list())),
        None => {
            let cur = image
                .current_revision
                .ok_or_else(|| format!("osimage '{}' has no current revision to roll back from", image.name))?;
            ids.iter()
                .copied()
                .filter(|&i| i < cur)
                .max()
                .ok_or_else(|| format!("osimage '{}' has no revision older than {cur} (kept: {})", image.name, list()))
        }
    }
}

/// Deletes revision directories of `image` that the object no longer lists (dropped by keep-N,
/// or left by a pack that died between rename and commit). Never touches `.tmp` directories.
pub fn remove_unlisted(layout: &Layout, image: &str, listed: &[u32]) {
    for rev in layout.revisions_on_disk(image) {
        if !listed.contains(&rev) {
            let dir = layout.revision_dir(image, rev);
            tracing::info!(image, rev, "deleting revision no longer kept");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(path = %dir.display(), error = %e, "cannot delete revision");
            }
        }
    }
}

/// Renames a finished build into place and syncs the parent directory.
pub fn install(tmp: &Path, dst: &Path) -> io::Result<()> {
    std::fs::rename(tmp, dst)?;
    if let Some(parent) = dst.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(id: u32) -> ImageRevision {
        ImageRevision {
            id,
            created: 0,
            kernel_version: "k".into(),
            archive: "a".into(),
            archive_size: 1,
            sha256: String::new(),
            kernel: "k".into(),
            initrd: "i".into(),
            kernel_sha256: String::new(),
            initrd_sha256: String::new(),
            torrent: "t".into(),
            info_hash: String::new(),
            piece_length: 0,
            tree_bytes: 0,
            squashfs: None,
        }
    }

    #[test]
    fn keep_n_drops_the_oldest() {
        let (kept, dropped) = with_revision(&[rev(1), rev(2), rev(3)], rev(4), 3);
        assert_eq!(kept.iter().map(|r| r.id).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(dropped.iter().map(|r| r.id).collect::<Vec<_>>(), [1]);
        let (kept, dropped) = with_revision(&[rev(1)], rev(2), 0);
        assert_eq!((kept.len(), dropped.len()), (1, 1), "at least the new one is kept");
    }

    #[test]
    fn rollback_defaults_to_the_one_before_current() {
        let mut img = Osimage::new("c", "/x");
        img.revisions = vec![rev(3), rev(5), rev(7)];
        img.current_revision = Some(7);
        assert_eq!(rollback_target(&img, None), Ok(5));
        img.current_revision = Some(5);
        assert_eq!(rollback_target(&img, None), Ok(3));
        assert_eq!(rollback_target(&img, Some(7)), Ok(7));
        img.current_revision = Some(3);
        let e = rollback_target(&img, None).unwrap_err();
        assert!(e.contains("no revision older than 3") && e.contains("3, 5, 7"), "{e}");
        let e = rollback_target(&img, Some(4)).unwrap_err();
        assert!(e.contains("no revision 4"), "{e}");
    }

    #[test]
    fn lchroot_sessions_are_the_lock_holders_and_their_live_pids() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        let LchrootState::Closed(x) = lchroot_state(&l, "c").unwrap() else { panic!("no session yet") };
        drop(x);
        // a file nobody holds lists pids of sessions that are gone: no session
        std::fs::write(l.lchroot_lock("c"), format!("{}\n", std::process::id())).unwrap();
        assert!(matches!(lchroot_state(&l, "c").unwrap(), LchrootState::Closed(_)));
        assert_eq!(std::fs::read_to_string(l.lchroot_lock("c")).unwrap(), "", "emptied");
        // a session: shared lock, its pid appended (a dead one listed too)
        let session = File::options().append(true).open(l.lchroot_lock("c")).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(session.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) }, 0);
        std::fs::write(l.lchroot_lock("c"), format!("99999999\n{0}\n{0}\n", std::process::id())).unwrap();
        match lchroot_state(&l, "c").unwrap() {
            LchrootState::Open { pids } => assert_eq!(pids, [std::process::id() as i32]),
            other => panic!("{other:?}"),
        }
        drop(session);
        assert!(matches!(lchroot_state(&l, "c").unwrap(), LchrootState::Closed(_)));
    }

    #[test]
    fn pack_lock_is_exclusive_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        let a = try_pack_lock(&l, "c").unwrap();
        assert!(a.is_some());
        assert!(try_pack_lock(&l, "c").unwrap().is_none());
        assert!(try_pack_lock(&l, "other").unwrap().is_some());
        drop(a);
        assert!(try_pack_lock(&l, "c").unwrap().is_some());
    }

    #[test]
    fn next_revision_is_above_object_and_disk() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        let mut img = Osimage::new("c", "/x");
        assert_eq!(next_revision(&l, &img), 1);
        img.revisions = vec![rev(4)];
        assert_eq!(next_revision(&l, &img), 5);
        std::fs::create_dir_all(l.revision_dir("c", 9)).unwrap();
        std::fs::create_dir_all(l.tmp_dir("c", 12)).unwrap();
        assert_eq!(next_revision(&l, &img), 10);
        remove_stale_tmp(&l, "c");
        assert!(!l.tmp_dir("c", 12).exists());
        remove_unlisted(&l, "c", &[4]);
        assert!(!l.revision_dir("c", 9).exists());
    }
}
