//! Image trees on the server host: `luna osimage clone --path` (copy a tree) and
//! `luna osimage grab` (rsync from a running node). Both run in the CLI, not in the server:
//! grab uses the admin's ssh credentials and both show rsync's progress on the admin's
//! terminal and stop on the admin's Ctrl-C, while the server only records objects. (Packing
//! runs in the server because nodes depend on what it publishes.)
//!
//! Copies are made with rsync (`-aHAXS --numeric-ids`: hard links, ACLs, xattrs, device nodes,
//! sparse files, owners by number) rather than by hand: it is the tool admins already trust for
//! this, and it does remote trees (grab) the same way. Every write goes into a hidden staging
//! directory next to the destination that is renamed into place only when rsync succeeded; an
//! error or an interrupt (SIGINT, SIGTERM) removes it, so no half-written tree is left.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{path}: {detail}")]
    Path { path: PathBuf, detail: String },
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("cannot run rsync (apt-get install rsync): {0}")]
    NoRsync(io::Error),
    #[error("rsync failed ({status}) copying {from} to {to}")]
    Rsync { status: String, from: String, to: String },
    #[error("interrupted; nothing was written to {0}")]
    Interrupted(PathBuf),
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM while alive (the default comes back on drop), so a long copy
/// can clean up instead of dying mid-way.
pub struct InterruptGuard {
    old: [libc::sighandler_t; 2],
}

impl InterruptGuard {
    pub fn new() -> InterruptGuard {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        let old = unsafe { [libc::signal(libc::SIGINT, handler), libc::signal(libc::SIGTERM, handler)] };
        InterruptGuard { old }
    }

    pub fn interrupted(&self) -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

impl Default for InterruptGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for InterruptGuard {
    fn drop(&mut self) {
        // SAFETY: restores the dispositions saved in new().
        unsafe {
            libc::signal(libc::SIGINT, self.old[0]);
            libc::signal(libc::SIGTERM, self.old[1]);
        }
    }
}

/// A hidden directory next to `dst` that becomes `dst` on [`Staging::commit`] and is removed
/// otherwise.
pub struct Staging {
    tmp: PathBuf,
    dst: PathBuf,
    committed: bool,
}

impl Staging {
    /// `dst` must be absolute; its parent must exist.
    pub fn new(dst: &Path) -> Result<Staging, TreeError> {
        let bad = |detail: &str| TreeError::Path { path: dst.to_path_buf(), detail: detail.into() };
        if !dst.is_absolute() {
            return Err(bad("must be an absolute path"));
        }
        let (Some(parent), Some(name)) = (dst.parent(), dst.file_name()) else {
            return Err(bad("must name a directory below /"));
        };
        if !parent.is_dir() {
            return Err(bad("its parent directory does not exist"));
        }
        let mut tmp_name = OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".luna-tmp-{}", std::process::id()));
        let tmp = parent.join(tmp_name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|source| TreeError::Io {
                what: "remove",
                path: tmp.clone(),
                source,
            })?;
        }
        std::fs::create_dir(&tmp).map_err(|source| TreeError::Io { what: "create", path: tmp.clone(), source })?;
        Ok(Staging { tmp, dst: dst.to_path_buf(), committed: false })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Puts the staging directory in the place of the existing destination: the old tree is
    /// renamed aside, the new one into place, then the old one removed.
    pub fn replace(mut self) -> Result<(), TreeError> {
        let mut old_name = OsString::from(".");
        old_name.push(self.dst.file_name().unwrap_or_default());
        old_name.push(format!(".luna-old-{}", std::process::id()));
        let old = self.dst.with_file_name(old_name);
        std::fs::rename(&self.dst, &old).map_err(|source| TreeError::Io {
            what: "move the old tree aside",
            path: self.dst.clone(),
            source,
        })?;
        if let Err(source) = std::fs::rename(&self.tmp, &self.dst) {
            let _ = std::fs::rename(&old, &self.dst);
            return Err(TreeError::Io { what: "rename into place", path: self.dst.clone(), source });
        }
        self.committed = true;
        std::fs::remove_dir_all(&old).map_err(|source| TreeError::Io { what: "remove the old tree", path: old, source })
    }

    /// Renames the staging directory to the destination (which must not exist then).
    pub fn commit(mut self) -> Result<(), TreeError> {
        if self.dst.exists() {
            return Err(TreeError::Path {
                path: self.dst.clone(),
                detail: "appeared while copying; not replaced".into(),
            });
        }
        std::fs::rename(&self.tmp, &self.dst).map_err(|source| TreeError::Io {
            what: "rename into place",
            path: self.dst.clone(),
            source,
        })?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// rsync's options for an exact copy of an OS tree; `progress` adds a one-line total progress.
pub fn rsync_base(progress: bool) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["-aHAXS", "--numeric-ids"].map(OsString::from).to_vec();
    a.push(if progress { "--info=progress2" } else { "--info=stats1" }.into());
    a
}

fn stdout_is_tty() -> bool {
    // SAFETY: isatty has no preconditions.
    unsafe { libc::isatty(1) == 1 }
}

/// Runs rsync with `args`; on an interrupt kills it and reports [`TreeError::Interrupted`].
pub fn run_rsync(args: &[OsString], from: &str, to: &Path, guard: &InterruptGuard) -> Result<(), TreeError> {
    let mut child = Command::new("rsync").args(args).spawn().map_err(TreeError::NoRsync)?;
    let status = loop {
        if guard.interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TreeError::Interrupted(to.to_path_buf()));
        }
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(source) => {
                return Err(TreeError::Io { what: "wait for rsync writing", path: to.to_path_buf(), source })
            }
        }
    };
    if guard.interrupted() {
        return Err(TreeError::Interrupted(to.to_path_buf()));
    }
    if !status.success() {
        return Err(TreeError::Rsync { status: status.to_string(), from: from.into(), to: to.display().to_string() });
    }
    Ok(())
}

/// With a trailing slash: rsync copies the directory's contents.
fn contents(p: &Path) -> OsString {
    let mut s = p.as_os_str().to_os_string();
    s.push("/");
    s
}

/// Copies the tree at `src` to the new directory `dst` (which must not exist).
pub fn copy_tree(src: &Path, dst: &Path) -> Result<(), TreeError> {
    if !src.is_dir() {
        return Err(TreeError::Path { path: src.to_path_buf(), detail: "is not a directory".into() });
    }
    if dst.exists() {
        return Err(TreeError::Path { path: dst.to_path_buf(), detail: "already exists".into() });
    }
    let guard = InterruptGuard::new();
    let staging = Staging::new(dst)?;
    let mut args = rsync_base(stdout_is_tty());
    args.push(contents(src));
    args.push(contents(staging.path()));
    run_rsync(&args, &src.display().to_string(), dst, &guard)?;
    staging.commit()
}

/// rsync `--exclude` options for `grab_exclude` globs (relative to the tree's root, so
/// anchored at the transfer's root).
pub fn exclude_args(patterns: &[String]) -> Vec<OsString> {
    patterns
        .iter()
        .map(|p| p.trim().trim_start_matches('/'))
        .filter(|p| !p.is_empty())
        .map(|p| OsString::from(format!("--exclude=/{p}")))
        .collect()
}

/// rsync filter options that select exactly what `patterns` match (with the directories
/// leading to them and everything below a matched directory): the second pass of a grab
/// carries these paths over from the image's own tree.
pub fn carry_args(patterns: &[String]) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    let mut push = |s: String| {
        let s = OsString::from(s);
        if !out.contains(&s) {
            out.push(s);
        }
    };
    for p in patterns.iter().map(|p| p.trim().trim_start_matches('/')).filter(|p| !p.is_empty()) {
        let parts: Vec<&str> = p.split('/').collect();
        for i in 1..parts.len() {
            push(format!("--include=/{}/", parts[..i].join("/")));
        }
        push(format!("--include=/{p}"));
        push(format!("--include=/{p}/**"));
    }
    out.push("--exclude=*".into());
    out
}

/// `luna osimage grab`: the tree of the running node at `addr` (rsync over ssh as root; ssh
/// options come from `RSYNC_RSH` or the admin's ssh configuration) replaces the image's tree.
/// Paths matching `excludes` are not taken from the node; the image keeps its own. With
/// `dry_run`, lists what would change (rsync's itemized list) and changes nothing.
pub fn grab(addr: &str, image_root: &Path, excludes: &[String], dry_run: bool) -> Result<(), TreeError> {
    if !image_root.is_dir() {
        return Err(TreeError::Path { path: image_root.to_path_buf(), detail: "is not a directory".into() });
    }
    let remote = format!("root@{addr}:/");
    let guard = InterruptGuard::new();
    if dry_run {
        let mut args: Vec<OsString> =
            ["-aHAXS", "--numeric-ids", "--dry-run", "--itemize-changes", "--delete"].map(OsString::from).to_vec();
        args.extend(exclude_args(excludes));
        args.push(remote.clone().into());
        args.push(contents(image_root));
        return run_rsync(&args, &remote, image_root, &guard);
    }
    let staging = Staging::new(image_root)?;
    let mut link_dest = OsString::from("--link-dest=");
    link_dest.push(image_root);
    // Pass 1: the node's tree, unchanged files hard-linked to the image's (no inode of the
    // image is ever modified: rsync links only files whose data and attributes all match).
    let mut args = rsync_base(stdout_is_tty());
    args.extend(["--delete".into(), link_dest.clone()]);
    args.extend(exclude_args(excludes));
    args.push(remote.clone().into());
    args.push(contents(staging.path()));
    run_rsync(&args, &remote, image_root, &guard)?;
    // Pass 2: what the node did not give (the excluded paths), from the image itself.
    let mut args: Vec<OsString> = ["-aHAXS", "--numeric-ids", "--ignore-existing"].map(OsString::from).to_vec();
    args.push(link_dest);
    args.extend(carry_args(excludes));
    args.push(contents(image_root));
    args.push(contents(staging.path()));
    run_rsync(&args, &image_root.display().to_string(), image_root, &guard)?;
    staging.replace()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_removed_unless_committed() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("img");
        let s = Staging::new(&dst).unwrap();
        let tmp = s.path().to_path_buf();
        assert!(tmp.is_dir() && tmp.file_name().unwrap().to_string_lossy().starts_with(".img.luna-tmp-"));
        std::fs::write(tmp.join("f"), b"x").unwrap();
        drop(s);
        assert!(!tmp.exists() && !dst.exists());
        let s = Staging::new(&dst).unwrap();
        std::fs::write(s.path().join("f"), b"x").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(dst.join("f")).unwrap(), b"x");
        let e = Staging::new(Path::new("relative")).err().unwrap().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = Staging::new(&d.path().join("no/such")).err().unwrap().to_string();
        assert!(e.contains("parent"), "{e}");
    }

    #[test]
    fn grab_filters_are_anchored_and_carry_parents() {
        let p = vec!["proc/*".to_string(), "/etc/ssh/ssh_host_*".into(), " ".into()];
        assert_eq!(exclude_args(&p), ["--exclude=/proc/*", "--exclude=/etc/ssh/ssh_host_*"]);
        assert_eq!(
            carry_args(&p),
            [
                "--include=/proc/",
                "--include=/proc/*",
                "--include=/proc/*/**",
                "--include=/etc/",
                "--include=/etc/ssh/",
                "--include=/etc/ssh/ssh_host_*",
                "--include=/etc/ssh/ssh_host_*/**",
                "--exclude=*"
            ]
        );
    }

    #[test]
    fn replace_swaps_the_trees() {
        let d = tempfile::tempdir().unwrap();
        let dst = d.path().join("img");
        std::fs::create_dir(&dst).unwrap();
        std::fs::write(dst.join("old"), b"").unwrap();
        let s = Staging::new(&dst).unwrap();
        std::fs::write(s.path().join("new"), b"").unwrap();
        s.replace().unwrap();
        assert!(dst.join("new").exists() && !dst.join("old").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "nothing else left");
    }

    #[test]
    fn copies_keep_links_acls_xattrs_devices_and_holes() {
        assert_eq!(rsync_base(false), ["-aHAXS", "--numeric-ids", "--info=stats1"]);
        assert_eq!(contents(Path::new("/a/b")), "/a/b/");
    }
}
