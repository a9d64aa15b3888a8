//! The `overlay` root mode: the image is a squashfs that stays compressed in RAM, and the root is
//! an overlayfs of it with a tmpfs on top.
//!
//! Under the agent's scratch directory (`/run/luna`):
//! - `image/` — a tmpfs just big enough for the squashfs file (`root.squashfs`), which the
//!   download writes and verifies like any image;
//! - `lower/` — that file loop-mounted read-only (squashfs);
//! - `rw/` — a tmpfs holding the overlay's `upper/` and `work/`; `upper` → `rw/upper`;
//! - `/sysroot` — overlayfs `lowerdir=lower,upperdir=rw/upper,workdir=rw/work`: personality and
//!   post-script write into the upper layer.
//!
//! Why under `/run`: switch_root (util-linux's, and systemd's) moves `/run` with everything
//! mounted below it into the new root, so on the booted node the same paths hold the same
//! mounts and `/run/luna/upper` shows exactly where the node diverged from its image. The loop
//! device detaches by itself when the squashfs is unmounted (autoclear).

use std::path::{Path, PathBuf};

use crate::os::Os;

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct OverlayError {
    pub what: String,
    pub source: std::io::Error,
}

fn err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OverlayError {
    let what = what.into();
    move |source| OverlayError { what, source }
}

/// Where the pieces live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub base: PathBuf,
}

impl Layout {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Layout { base: base.into() }
    }
    /// The tmpfs the squashfs is downloaded into (the download's root).
    pub fn image_dir(&self) -> PathBuf {
        self.base.join("image")
    }
    pub fn image_file(&self) -> PathBuf {
        self.image_dir().join(FILE)
    }
    pub fn lower(&self) -> PathBuf {
        self.base.join("lower")
    }
    pub fn rw(&self) -> PathBuf {
        self.base.join("rw")
    }
    pub fn upper(&self) -> PathBuf {
        self.rw().join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.rw().join("work")
    }
    /// `upper` → `rw/upper`: where an admin looks on the booted node (`/run/luna/upper`).
    pub fn upper_link(&self) -> PathBuf {
        self.base.join("upper")
    }
}

/// The file name of the downloaded squashfs inside [`Layout::image_dir`].
pub const FILE: &str = "root.squashfs";

/// tmpfs size for a squashfs of `size` bytes: rounded up to MiB, plus 1 MiB for the file
/// system's own blocks.
pub fn image_tmpfs_size(size: u64) -> String {
    format!("{}m", size.div_ceil(1 << 20) + 1)
}

/// overlayfs mount options for `layout`.
pub fn overlay_options(layout: &Layout) -> String {
    format!(
        "lowerdir={},upperdir={},workdir={}",
        layout.lower().display(),
        layout.upper().display(),
        layout.work().display()
    )
}

/// Before the download: a tmpfs for the squashfs file.
pub fn prepare(os: &dyn Os, layout: &Layout, image_size: u64) -> Result<(), OverlayError> {
    let dir = layout.image_dir();
    std::fs::create_dir_all(&dir).map_err(err(format!("create {}", dir.display())))?;
    let data = format!("size={},mode=0700", image_tmpfs_size(image_size));
    os.mount("tmpfs", &dir, Some("tmpfs"), false, Some(&data)).map_err(err(format!("mount tmpfs on {}", dir.display())))
}

/// After the verified download: loop device, squashfs, upper tmpfs of `upper_size` (tmpfs
/// `size=`), overlayfs on `sysroot`. Returns the loop device.
pub fn mount(os: &dyn Os, layout: &Layout, sysroot: &Path, upper_size: &str) -> Result<PathBuf, OverlayError> {
    let file = layout.image_file();
    let lower = layout.lower();
    std::fs::create_dir_all(&lower).map_err(err(format!("create {}", lower.display())))?;
    let attached = os.loop_attach(&file, true).map_err(err(format!("loop device for {}", file.display())))?;
    let dev_name = attached.path.display().to_string();
    os.mount_readonly(&dev_name, &lower, "squashfs")
        .map_err(err(format!("mount squashfs {dev_name} on {}", lower.display())))?;
    // Mounted: the mount keeps the device; closing ours no longer detaches it.
    let dev = attached.path.clone();
    drop(attached);
    let rw = layout.rw();
    std::fs::create_dir_all(&rw).map_err(err(format!("create {}", rw.display())))?;
    os.mount("tmpfs", &rw, Some("tmpfs"), false, Some(&format!("size={upper_size},mode=0755")))
        .map_err(err(format!("mount tmpfs on {}", rw.display())))?;
    for d in [layout.upper(), layout.work()] {
        std::fs::create_dir_all(&d).map_err(err(format!("create {}", d.display())))?;
    }
    let link = layout.upper_link();
    if std::fs::symlink_metadata(&link).is_ok() {
        std::fs::remove_file(&link).map_err(err(format!("remove {}", link.display())))?;
    }
    std::os::unix::fs::symlink("rw/upper", &link).map_err(err(format!("create {}", link.display())))?;
    std::fs::create_dir_all(sysroot).map_err(err(format!("create {}", sysroot.display())))?;
    os.mount("overlay", sysroot, Some("overlay"), false, Some(&overlay_options(layout)))
        .map_err(err(format!("mount overlayfs on {}", sysroot.display())))?;
    Ok(dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::{OsCall, RecordingOs};

    #[test]
    fn sizes_and_options() {
        assert_eq!(image_tmpfs_size(0), "1m");
        assert_eq!(image_tmpfs_size(1), "2m");
        assert_eq!(image_tmpfs_size(10 << 20), "11m");
        let l = Layout::new("/run/luna");
        assert_eq!(
            overlay_options(&l),
            "lowerdir=/run/luna/lower,upperdir=/run/luna/rw/upper,workdir=/run/luna/rw/work"
        );
        assert_eq!(l.image_file(), Path::new("/run/luna/image/root.squashfs"));
    }

    #[test]
    fn mounts_in_order_and_links_the_upper_layer() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path().join("run-luna"));
        let sysroot = d.path().join("sysroot");
        let os = RecordingOs::default();
        prepare(&os, &l, 5 << 20).unwrap();
        std::fs::write(l.image_file(), b"hsqs").unwrap();
        let dev = mount(&os, &l, &sysroot, "800m").unwrap();
        assert_eq!(dev, Path::new("/dev/loop7"));
        let calls = os.calls();
        let m = |source: &str, target: PathBuf, fstype: &str, data: &str| OsCall::Mount {
            source: source.into(),
            target,
            fstype: Some(fstype.into()),
            bind: false,
            data: Some(data.into()),
        };
        assert_eq!(
            calls,
            vec![
                m("tmpfs", l.image_dir(), "tmpfs", "size=6m,mode=0700"),
                OsCall::LoopAttach { file: l.image_file(), read_only: true },
                OsCall::MountReadOnly { source: "/dev/loop7".into(), target: l.lower(), fstype: "squashfs".into() },
                m("tmpfs", l.rw(), "tmpfs", "size=800m,mode=0755"),
                m("overlay", sysroot.clone(), "overlay", &overlay_options(&l)),
            ]
        );
        assert!(l.upper().is_dir() && l.work().is_dir());
        assert_eq!(std::fs::read_link(l.upper_link()).unwrap(), Path::new("rw/upper"));
        // Again (a retried install): the link is replaced, not an error.
        mount(&os, &l, &sysroot, "800m").unwrap();
    }

    #[test]
    fn a_missing_squashfs_is_named() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        let e = mount(&RecordingOs::default(), &l, &d.path().join("sysroot"), "1m").unwrap_err().to_string();
        assert!(e.contains("loop device for") && e.contains("root.squashfs"), "{e}");
    }
}
