//! What lchroot mounts inside an image, decided without touching the system ([`plan`]), and
//! the few system calls that carry a plan out ([`apply`]).
//!
//! Every mount is made after `unshare(CLONE_NEWNS)` and a recursive `MS_PRIVATE` on `/`, so it
//! exists only in lchroot's own mount namespace: the host never sees it, and the kernel drops
//! it when the last process of the namespace exits, however that process ends (SIGKILL too).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, MsFlags};

/// One step of setting up an image's root, paths relative to nothing (absolute host paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    /// A fresh procfs.
    Proc { target: PathBuf },
    /// sysfs, read-only: package scripts read it, nothing inside should change the host's.
    Sysfs { target: PathBuf },
    /// The host's `/dev` with everything below it (`/dev/pts` among it, so the terminal the
    /// session runs on works inside).
    Rbind { source: PathBuf, target: PathBuf },
    /// An empty tmpfs with `mode`.
    Tmpfs { target: PathBuf, mode: u32 },
    /// A file written (mode 0644) into one of the tmpfs mounts above.
    WriteFile { path: PathBuf, contents: Vec<u8> },
    /// One file bind-mounted over another, read-only.
    BindFile { source: PathBuf, target: PathBuf },
}

/// What the image's `/etc/resolv.conf` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvConf {
    Missing,
    File,
    /// A symlink and its target as written in the link.
    Symlink(PathBuf),
    /// A directory or a device: left alone.
    Other,
}

impl ResolvConf {
    pub fn of(root: &Path) -> ResolvConf {
        let p = root.join("etc/resolv.conf");
        match std::fs::symlink_metadata(&p) {
            Err(_) => ResolvConf::Missing,
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::read_link(&p).map_or(ResolvConf::Other, ResolvConf::Symlink)
            }
            Ok(m) if m.is_file() => ResolvConf::File,
            Ok(_) => ResolvConf::Other,
        }
    }
}

/// Where the file that replaces `/proc/sys/kernel/osrelease` lives inside the image (on the
/// session's /run tmpfs).
pub const OSRELEASE_COPY: &str = "run/lchroot/osrelease";

/// Lexically normalises an absolute path inside the image (`..` never climbs above `/`).
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

/// The mounts of a session in the image at `root`: /proc, /sys (read-only), /dev (with
/// /dev/pts), tmpfs /run and /tmp, the host's resolver configuration (`host_resolv`, the
/// contents of the host's /etc/resolv.conf) and, when `release` is known, the image's kernel
/// release in `/proc/sys/kernel/osrelease`.
///
/// The resolver configuration: an image file is covered by a read-only bind mount of the host's
/// (nothing in the image changes); a symlink into /run (systemd-resolved's stub) gets the
/// host's contents written at its target on the session's /run tmpfs; anything else is left
/// alone (a missing file is not created in the image).
pub fn plan(root: &Path, resolv: &ResolvConf, host_resolv: Option<&[u8]>, release: Option<&str>) -> Vec<MountOp> {
    let at = |rel: &str| root.join(rel);
    let mut ops = vec![
        MountOp::Proc { target: at("proc") },
        MountOp::Sysfs { target: at("sys") },
        MountOp::Rbind { source: "/dev".into(), target: at("dev") },
        MountOp::Tmpfs { target: at("run"), mode: 0o755 },
        MountOp::Tmpfs { target: at("tmp"), mode: 0o1777 },
    ];
    if let Some(host) = host_resolv {
        match resolv {
            ResolvConf::File => {
                ops.push(MountOp::BindFile { source: "/etc/resolv.conf".into(), target: at("etc/resolv.conf") })
            }
            ResolvConf::Symlink(target) => {
                let inside = normalise(&Path::new("/etc").join(target));
                if inside.starts_with("run") {
                    ops.push(MountOp::WriteFile { path: root.join(inside), contents: host.to_vec() });
                }
            }
            ResolvConf::Missing | ResolvConf::Other => {}
        }
    }
    if let Some(r) = release {
        let copy = at(OSRELEASE_COPY);
        ops.push(MountOp::WriteFile { path: copy.clone(), contents: format!("{r}\n").into_bytes() });
        ops.push(MountOp::BindFile { source: copy, target: at("proc/sys/kernel/osrelease") });
    }
    ops
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{path} exists in the image but is not a directory; lchroot mounts there")]
    NotADir { path: PathBuf },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> MountError + 'a {
    move |source| MountError::Io { what, path: path.to_path_buf(), source }
}

fn nix_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(nix::Error) -> MountError + 'a {
    move |e| MountError::Io { what, path: path.to_path_buf(), source: io::Error::from(e) }
}

/// A mount point directory: created (0755) when missing, refused when something else.
fn ensure_dir(p: &Path) -> Result<(), MountError> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(m) if m.file_type().is_symlink() || m.file_type().is_file() || m.file_type().is_block_device() => {
            Err(MountError::NotADir { path: p.to_path_buf() })
        }
        Ok(_) => Err(MountError::NotADir { path: p.to_path_buf() }),
        Err(_) => std::fs::DirBuilder::new().recursive(true).mode(0o755).create(p).map_err(io_err("create", p)),
    }
}

const NONE: Option<&OsStr> = None;

/// Makes every mount of the current mount namespace private, so nothing mounted afterwards
/// propagates to the host (call after `unshare(CLONE_NEWNS)`).
pub fn make_private() -> Result<(), MountError> {
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE).map_err(nix_err("make private", Path::new("/")))
}

/// Carries out a plan, in order.
pub fn apply(ops: &[MountOp]) -> Result<(), MountError> {
    let safe = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    for op in ops {
        match op {
            MountOp::Proc { target } => {
                ensure_dir(target)?;
                mount(Some("proc"), target, Some("proc"), safe, NONE).map_err(nix_err("mount proc on", target))?;
            }
            MountOp::Sysfs { target } => {
                ensure_dir(target)?;
                mount(Some("sysfs"), target, Some("sysfs"), safe | MsFlags::MS_RDONLY, NONE)
                    .map_err(nix_err("mount sysfs on", target))?;
            }
            MountOp::Rbind { source, target } => {
                ensure_dir(target)?;
                mount(Some(source.as_path()), target, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE)
                    .map_err(nix_err("bind-mount /dev on", target))?;
            }
            MountOp::Tmpfs { target, mode } => {
                ensure_dir(target)?;
                let data = format!("mode={mode:o}");
                mount(
                    Some("tmpfs"),
                    target,
                    Some("tmpfs"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                    Some(data.as_str()),
                )
                .map_err(nix_err("mount tmpfs on", target))?;
            }
            MountOp::WriteFile { path, contents } => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
                }
                std::fs::write(path, contents).map_err(io_err("write", path))?;
            }
            MountOp::BindFile { source, target } => {
                mount(Some(source.as_path()), target, NONE, MsFlags::MS_BIND, NONE)
                    .map_err(nix_err("bind-mount a file on", target))?;
                // A bind mount takes the flags of its source; read-only needs a remount.
                let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                mount(NONE, target, NONE, ro, NONE).map_err(nix_err("make read-only", target))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_mounts_the_api_filesystems_and_tmpfs() {
        let ops = plan(Path::new("/img"), &ResolvConf::Missing, Some(b"nameserver 1.1.1.1\n"), None);
        assert_eq!(
            ops,
            [
                MountOp::Proc { target: "/img/proc".into() },
                MountOp::Sysfs { target: "/img/sys".into() },
                MountOp::Rbind { source: "/dev".into(), target: "/img/dev".into() },
                MountOp::Tmpfs { target: "/img/run".into(), mode: 0o755 },
                MountOp::Tmpfs { target: "/img/tmp".into(), mode: 0o1777 },
            ],
            "a missing resolv.conf is not created in the image"
        );
    }

    #[test]
    fn resolv_conf_file_is_covered_read_only() {
        let ops = plan(Path::new("/img"), &ResolvConf::File, Some(b"x"), None);
        assert_eq!(
            ops.last(),
            Some(&MountOp::BindFile { source: "/etc/resolv.conf".into(), target: "/img/etc/resolv.conf".into() })
        );
        let ops = plan(Path::new("/img"), &ResolvConf::File, None, None);
        assert_eq!(ops.len(), 5, "no host resolv.conf, nothing to show");
    }

    #[test]
    fn resolv_conf_symlink_into_run_is_written_on_the_tmpfs() {
        for link in ["../run/systemd/resolve/stub-resolv.conf", "/run/systemd/resolve/stub-resolv.conf"] {
            let ops = plan(Path::new("/img"), &ResolvConf::Symlink(link.into()), Some(b"nameserver 9.9.9.9\n"), None);
            assert_eq!(
                ops.last(),
                Some(&MountOp::WriteFile {
                    path: "/img/run/systemd/resolve/stub-resolv.conf".into(),
                    contents: b"nameserver 9.9.9.9\n".to_vec()
                }),
                "{link}"
            );
        }
        // a link elsewhere would mean writing into the image: left alone
        let ops = plan(Path::new("/img"), &ResolvConf::Symlink("../../../../etc/x".into()), Some(b"x"), None);
        assert_eq!(ops.len(), 5);
    }

    #[test]
    fn kernel_release_covers_osrelease_after_proc_and_run() {
        let ops = plan(Path::new("/img"), &ResolvConf::Missing, None, Some("6.1.0-28-amd64"));
        let n = ops.len();
        assert_eq!(
            ops[n - 2],
            MountOp::WriteFile { path: "/img/run/lchroot/osrelease".into(), contents: b"6.1.0-28-amd64\n".to_vec() }
        );
        assert_eq!(
            ops[n - 1],
            MountOp::BindFile {
                source: "/img/run/lchroot/osrelease".into(),
                target: "/img/proc/sys/kernel/osrelease".into()
            }
        );
    }

    #[test]
    fn mount_points_that_are_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("proc"), b"").unwrap();
        let e = ensure_dir(&d.path().join("proc")).unwrap_err().to_string();
        assert!(e.contains("not a directory") && e.contains("proc"), "{e}");
        ensure_dir(&d.path().join("run")).unwrap();
        assert!(d.path().join("run").is_dir());
    }
}
