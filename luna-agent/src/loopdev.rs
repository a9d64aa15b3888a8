//! Loop devices for the `overlay` root: the squashfs file attached read-only to a free
//! `/dev/loopN` with the kernel's loop ioctls (`LOOP_CTL_GET_FREE`, then `LOOP_CONFIGURE`, or
//! `LOOP_SET_FD` + `LOOP_SET_STATUS64` on kernels before 5.8).
//!
//! Hand-rolled rather than `losetup` or a crate: the initramfs has no `losetup` (dracut installs
//! it only with its own dmsquash-live module, and busybox's applet is not in dracut's initramfs),
//! and the `loopdev` crates generate their bindings with bindgen at build time (libclang for the
//! static musl build of the agent) for four ioctls and two plain structs, taken here from
//! `linux/loop.h`. The values handed to the kernel are built by [`config`] (pure, unit-tested).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` of `linux/loop.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

/// `struct loop_config` of `linux/loop.h` (`LOOP_CONFIGURE`, Linux 5.8).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

/// What the kernel is told for `file` open as `fd`: read-only, detached automatically when the
/// last user (the squashfs mount) goes, the file's name (truncated, NUL-terminated) for
/// `/sys/block/loopN/loop/backing_file` readers that do not look further.
pub fn config(fd: u32, file: &Path, read_only: bool) -> LoopConfig {
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(file.as_os_str());
    let n = bytes.len().min(LO_NAME_SIZE - 1);
    name[..n].copy_from_slice(&bytes[..n]);
    let info = LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
        lo_file_name: name,
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; LO_KEY_SIZE],
        lo_init: [0; 2],
    };
    LoopConfig { fd, block_size: 0, info, reserved: [0; 8] }
}

fn check(rc: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(rc)
    }
}

/// An attached loop device. It holds the device open: with autoclear the kernel detaches the
/// device at its last close, so it must stay open until the file system on it is mounted
/// (then the mount is the user that keeps it); drop it after mounting.
#[derive(Debug)]
pub struct Attached {
    pub path: PathBuf,
    _hold: Option<File>,
}

impl Attached {
    /// A device that holds nothing open (test doubles).
    pub fn unheld(path: impl Into<PathBuf>) -> Self {
        Attached { path: path.into(), _hold: None }
    }
}

/// Attaches `file` to a free loop device (`/dev/loopN`). A device another process took between
/// "free" and "configure" (EBUSY) makes it ask for another, a few times.
pub fn attach(file: &Path, read_only: bool) -> io::Result<Attached> {
    let backing = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(file)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", file.display())))?;
    let control = open_control()?;
    let mut last = None;
    for _ in 0..8 {
        // SAFETY: an ioctl without argument on a descriptor we own.
        let n = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) }, "LOOP_CTL_GET_FREE")?;
        let dev = PathBuf::from(format!("/dev/loop{n}"));
        let loopdev = open_device(&dev)?;
        match configure(&loopdev, &backing, file, read_only) {
            Ok(()) => return Ok(Attached { path: dev, _hold: Some(loopdev) }),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => {
                return Err(io::Error::new(e.kind(), format!("attach {} to {}: {e}", file.display(), dev.display())))
            }
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
}

/// `/dev/loop-control`, loading the `loop` module first when it is missing (devtmpfs makes the
/// node when the module registers it; the initramfs has no udev rule doing it before).
fn open_control() -> io::Result<File> {
    let open = || OpenOptions::new().read(true).write(true).open("/dev/loop-control");
    if let Ok(f) = open() {
        return Ok(f);
    }
    match std::process::Command::new("modprobe").arg("loop").status() {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!("modprobe loop: {s}"),
        Err(e) => tracing::warn!("modprobe loop: {e}"),
    }
    let mut tries = 0;
    loop {
        match open() {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("open /dev/loop-control (modprobe loop did not help): {e}"),
                ))
            }
        }
    }
}

/// `/dev/loopN`: devtmpfs creates it when LOOP_CTL_GET_FREE adds the device, a moment later.
fn open_device(dev: &Path) -> io::Result<File> {
    let mut tries = 0;
    loop {
        match OpenOptions::new().read(true).write(true).open(dev) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound && tries < 50 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("open {}: {e}", dev.display()))),
        }
    }
}

fn configure(loopdev: &File, backing: &File, file: &Path, read_only: bool) -> io::Result<()> {
    let cfg = config(backing.as_raw_fd() as u32, file, read_only);
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `cfg` is (repr(C), the
    // kernel's layout), alive for the call.
    let rc = unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_CONFIGURE as _, &cfg as *const LoopConfig) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) {
        return Err(e);
    }
    // Before Linux 5.8: bind the file, then set the flags.
    // SAFETY: LOOP_SET_FD takes the backing descriptor as its integer argument.
    check(
        unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_SET_FD as _, backing.as_raw_fd() as libc::c_ulong) },
        "LOOP_SET_FD",
    )?;
    // SAFETY: LOOP_SET_STATUS64 reads one `struct loop_info64`, alive for the call.
    let rc = unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_SET_STATUS64 as _, &cfg.info as *const LoopInfo64) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: LOOP_CLR_FD takes no argument; undoes the LOOP_SET_FD above.
        unsafe { libc::ioctl(loopdev.as_raw_fd(), LOOP_CLR_FD as _) };
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_linux_loop_h() {
        // sizes from the kernel's uapi header (x86_64 and every 64-bit target)
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn config_is_read_only_autoclear_with_a_truncated_name() {
        let c = config(7, Path::new("/run/luna/image/root.squashfs"), true);
        assert_eq!(c.fd, 7);
        assert_eq!(c.info.lo_flags, LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR);
        assert_eq!(&c.info.lo_file_name[..29], b"/run/luna/image/root.squashfs");
        assert_eq!(c.info.lo_file_name[29], 0);
        let long = format!("/{}", "x".repeat(100));
        let c = config(1, Path::new(&long), false);
        assert_eq!(c.info.lo_flags, LO_FLAGS_AUTOCLEAR);
        assert_eq!(c.info.lo_file_name[62], b'x');
        assert_eq!(c.info.lo_file_name[63], 0, "always NUL-terminated");
    }
}
