//! Every call into the operating system that needs privileges or changes global state goes
//! through [`Os`], so the install flow runs unprivileged in tests against `RecordingOs` (a test
//! double: compiled only for tests and with the `test-support` feature, never into the agent).
//!
//! Plain file work inside the target root (create, write, mkdir, symlink, hard link, chmod, mtime)
//! is done with `std` directly: it needs no privileges on a directory the caller owns.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
#[cfg(any(test, feature = "test-support"))]
use std::path::PathBuf;
use std::process::Command;
#[cfg(any(test, feature = "test-support"))]
use std::sync::Mutex;

#[cfg(any(test, feature = "test-support"))]
use crate::bmc::FakeBmc;
use crate::bmc::IpmiRequest;

/// Character or block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Char,
    Block,
}

/// A shell script to run with `/bin/sh -c`, optionally chrooted into a directory.
#[derive(Clone, Copy, Debug)]
pub struct Script<'a> {
    /// What it is (`prescript`, `partscript`, `postscript`), for logs and errors.
    pub name: &'a str,
    pub body: &'a str,
    pub env: &'a [(String, String)],
    pub chroot: Option<&'a Path>,
}

pub trait Os: Send + Sync {
    /// `mount -t fstype [-o data] source target`, or when `bind`
    /// `mount --rbind --make-rslave source target`: unmounts in the bound tree stay there. Under
    /// systemd every mount is shared, and unmounting a plain rbind of /sys took /sys/fs/cgroup
    /// away from the initramfs's systemd too (its next unit failed to start).
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        bind: bool,
        data: Option<&str>,
    ) -> io::Result<()>;
    fn umount(&self, target: &Path) -> io::Result<()>;
    /// `mount -t fstype -o ro source target` (`MS_RDONLY`: a read-only block device refuses a
    /// read-write mount).
    fn mount_readonly(&self, source: &str, target: &Path, fstype: &str) -> io::Result<()>;
    fn mknod(&self, path: &Path, kind: DeviceKind, mode: u32, major: u32, minor: u32) -> io::Result<()>;
    fn mkfifo(&self, path: &Path, mode: u32) -> io::Result<()>;
    /// Numeric owner, not following symlinks.
    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()>;
    /// Extended attribute, not following symlinks.
    fn lsetxattr(&self, path: &Path, name: &str, value: &[u8]) -> io::Result<()>;
    /// Runs a script to its end; returns its exit code (signals count as failure: -1).
    fn run_script(&self, script: &Script<'_>) -> io::Result<i32>;
    /// The IPv4 address and prefix length the initramfs network gave to `ifname`.
    fn interface_ipv4(&self, ifname: &str) -> Option<(Ipv4Addr, u8)>;
    /// One request to the node's BMC over the system interface; the answer, completion code
    /// first.
    fn ipmi(&self, req: &IpmiRequest) -> io::Result<Vec<u8>>;
    /// The UUID of the filesystem on block device `device` (`blkid -s UUID -o value`).
    fn fs_uuid(&self, device: &str) -> io::Result<String>;
    /// Attaches `file` to a free loop device (detached automatically with its last user: keep
    /// the returned value until the device is mounted).
    fn loop_attach(&self, file: &Path, read_only: bool) -> io::Result<crate::loopdev::Attached>;
}

/// The real thing: libc/nix calls, scripts through `/bin/sh`, chroot through the `chroot` tool.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealOs;

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("path {} contains a nul byte", path.display()))
    })
}

impl Os for RealOs {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        bind: bool,
        data: Option<&str>,
    ) -> io::Result<()> {
        use nix::mount::MsFlags;
        let flags = if bind { MsFlags::MS_BIND | MsFlags::MS_REC } else { MsFlags::empty() };
        nix::mount::mount(Some(source), target, fstype, flags, data).map_err(io::Error::from)?;
        if bind {
            let slave = nix::mount::mount(
                None::<&str>,
                target,
                None::<&str>,
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
                None::<&str>,
            );
            if let Err(e) = slave {
                // Unbound again rather than left shared.
                let _ = self.umount(target);
                return Err(io::Error::from(e));
            }
        }
        Ok(())
    }

    fn umount(&self, target: &Path) -> io::Result<()> {
        use nix::mount::MntFlags;
        match nix::mount::umount2(target, MntFlags::empty()) {
            // Something still holds it (a daemon the postscript left behind): detach lazily so
            // switch_root is not blocked.
            Err(nix::errno::Errno::EBUSY) => nix::mount::umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from),
            other => other.map_err(io::Error::from),
        }
    }

    fn mount_readonly(&self, source: &str, target: &Path, fstype: &str) -> io::Result<()> {
        use nix::mount::MsFlags;
        nix::mount::mount(Some(source), target, Some(fstype), MsFlags::MS_RDONLY, None::<&str>).map_err(io::Error::from)
    }

    fn mknod(&self, path: &Path, kind: DeviceKind, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        use nix::sys::stat::{makedev, Mode, SFlag};
        let kind = match kind {
            DeviceKind::Char => SFlag::S_IFCHR,
            DeviceKind::Block => SFlag::S_IFBLK,
        };
        let dev = makedev(u64::from(major), u64::from(minor));
        nix::sys::stat::mknod(path, kind, Mode::from_bits_truncate(mode & 0o7777), dev).map_err(io::Error::from)
    }

    fn mkfifo(&self, path: &Path, mode: u32) -> io::Result<()> {
        nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(mode & 0o7777)).map_err(io::Error::from)
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
    }

    fn lsetxattr(&self, path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let cpath = cpath(path)?;
        let cname = CString::new(name).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("xattr name {name:?} contains a nul byte"))
        })?;
        // SAFETY: both strings are valid NUL-terminated C strings that outlive the call, and
        // `value` is a live slice whose pointer and length are passed together.
        let rc = unsafe { libc::lsetxattr(cpath.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn run_script(&self, script: &Script<'_>) -> io::Result<i32> {
        let mut cmd = match script.chroot {
            Some(root) => {
                let mut c = Command::new("chroot");
                c.arg(root).arg("/bin/sh");
                c
            }
            None => Command::new("/bin/sh"),
        };
        cmd.arg("-c").arg(script.body).arg(script.name);
        cmd.envs(script.env.iter().map(|(k, v)| (k, v)));
        if script.chroot.is_some() {
            cmd.current_dir("/");
        }
        let status = cmd.status()?;
        Ok(status.code().unwrap_or(-1))
    }

    fn interface_ipv4(&self, ifname: &str) -> Option<(Ipv4Addr, u8)> {
        let addrs = nix::ifaddrs::getifaddrs().ok()?;
        for ifa in addrs {
            if ifa.interface_name != ifname {
                continue;
            }
            let Some(ip) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()).map(|s| s.ip()) else {
                continue;
            };
            let prefix = ifa
                .netmask
                .as_ref()
                .and_then(|m| m.as_sockaddr_in())
                .map(|m| u32::from(m.ip()).count_ones() as u8)
                .unwrap_or(32);
            return Some((ip, prefix));
        }
        None
    }

    fn ipmi(&self, req: &IpmiRequest) -> io::Result<Vec<u8>> {
        crate::ipmidev::Device::open()?.exchange(req)
    }

    fn fs_uuid(&self, device: &str) -> io::Result<String> {
        // blkid: libblkid knows every filesystem's superblock; -p probes the device itself
        // rather than a cache the initramfs does not have.
        let out = Command::new("blkid").args(["-p", "-s", "UUID", "-o", "value", device]).output()?;
        let uuid = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() || uuid.is_empty() {
            return Err(io::Error::other(format!(
                "blkid found no filesystem uuid (status {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(uuid)
    }

    fn loop_attach(&self, file: &Path, read_only: bool) -> io::Result<crate::loopdev::Attached> {
        crate::loopdev::attach(file, read_only)
    }
}

/// One recorded call of [`RecordingOs`].
#[cfg(any(test, feature = "test-support"))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OsCall {
    Mount {
        source: String,
        target: PathBuf,
        fstype: Option<String>,
        bind: bool,
        data: Option<String>,
    },
    Umount(PathBuf),
    MountReadOnly {
        source: String,
        target: PathBuf,
        fstype: String,
    },
    Mknod {
        path: PathBuf,
        kind: DeviceKind,
        mode: u32,
        major: u32,
        minor: u32,
    },
    Mkfifo {
        path: PathBuf,
        mode: u32,
    },
    Lchown {
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    Setxattr {
        path: PathBuf,
        name: String,
        value: Vec<u8>,
    },
    Script {
        name: String,
        chroot: Option<PathBuf>,
        env: Vec<(String, String)>,
        code: i32,
    },
    /// A filesystem UUID asked for.
    FsUuid(String),
    /// An IPMI request; `data` is `None` for those carrying the password.
    Ipmi {
        netfn: u8,
        cmd: u8,
        data: Option<Vec<u8>>,
    },
    LoopAttach {
        file: PathBuf,
        read_only: bool,
    },
}

/// A fake for tests: records every call; creates an empty placeholder file for device nodes
/// and FIFOs (so later chmod/mtime work), runs scripts with `/bin/sh` in the chroot directory
/// (without chrooting) when `exec_scripts` is set, else pretends they succeeded.
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Default)]
pub struct RecordingOs {
    pub calls: Mutex<Vec<OsCall>>,
    pub exec_scripts: bool,
    pub ipv4: Option<(Ipv4Addr, u8)>,
    /// The node's BMC; `None`: the node has no IPMI device.
    pub bmc: Mutex<Option<FakeBmc>>,
}

#[cfg(any(test, feature = "test-support"))]
impl RecordingOs {
    pub fn new(exec_scripts: bool, ipv4: Option<(Ipv4Addr, u8)>) -> Self {
        Self { calls: Mutex::new(Vec::new()), exec_scripts, ipv4, bmc: Mutex::new(None) }
    }

    /// A node with `bmc` behind its IPMI device.
    pub fn with_bmc(bmc: FakeBmc) -> Self {
        Self { bmc: Mutex::new(Some(bmc)), ..Self::default() }
    }

    /// The fake BMC's state now.
    pub fn bmc(&self) -> Option<FakeBmc> {
        self.bmc.lock().ok().and_then(|b| b.clone())
    }

    pub fn calls(&self) -> Vec<OsCall> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn record(&self, call: OsCall) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }
}

#[cfg(any(test, feature = "test-support"))]
impl Os for RecordingOs {
    fn mount(
        &self,
        source: &str,
        target: &Path,
        fstype: Option<&str>,
        bind: bool,
        data: Option<&str>,
    ) -> io::Result<()> {
        self.record(OsCall::Mount {
            source: source.to_string(),
            target: target.to_path_buf(),
            fstype: fstype.map(str::to_string),
            bind,
            data: data.map(str::to_string),
        });
        Ok(())
    }

    fn umount(&self, target: &Path) -> io::Result<()> {
        self.record(OsCall::Umount(target.to_path_buf()));
        Ok(())
    }

    fn mount_readonly(&self, source: &str, target: &Path, fstype: &str) -> io::Result<()> {
        self.record(OsCall::MountReadOnly {
            source: source.to_string(),
            target: target.to_path_buf(),
            fstype: fstype.to_string(),
        });
        Ok(())
    }

    fn mknod(&self, path: &Path, kind: DeviceKind, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        self.record(OsCall::Mknod { path: path.to_path_buf(), kind, mode, major, minor });
        Ok(())
    }

    fn mkfifo(&self, path: &Path, mode: u32) -> io::Result<()> {
        std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        self.record(OsCall::Mkfifo { path: path.to_path_buf(), mode });
        Ok(())
    }

    fn lchown(&self, path: &Path, uid: u32, gid: u32) -> io::Result<()> {
        self.record(OsCall::Lchown { path: path.to_path_buf(), uid, gid });
        Ok(())
    }

    fn lsetxattr(&self, path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        self.record(OsCall::Setxattr { path: path.to_path_buf(), name: name.to_string(), value: value.to_vec() });
        Ok(())
    }

    fn run_script(&self, script: &Script<'_>) -> io::Result<i32> {
        let code = if self.exec_scripts {
            let mut cmd = Command::new("/bin/sh");
            cmd.arg("-c").arg(script.body).arg(script.name);
            cmd.envs(script.env.iter().map(|(k, v)| (k, v)));
            if let Some(root) = script.chroot {
                cmd.current_dir(root);
            }
            cmd.status()?.code().unwrap_or(-1)
        } else {
            0
        };
        self.record(OsCall::Script {
            name: script.name.to_string(),
            chroot: script.chroot.map(Path::to_path_buf),
            env: script.env.to_vec(),
            code,
        });
        Ok(code)
    }

    fn interface_ipv4(&self, _ifname: &str) -> Option<(Ipv4Addr, u8)> {
        self.ipv4
    }

    fn ipmi(&self, req: &IpmiRequest) -> io::Result<Vec<u8>> {
        let data = (!req.secret()).then(|| req.data.clone());
        self.record(OsCall::Ipmi { netfn: req.netfn, cmd: req.cmd, data });
        let mut bmc = self.bmc.lock().map_err(|_| io::Error::other("fake bmc lock poisoned"))?;
        match bmc.as_mut() {
            Some(b) => Ok(b.handle(req.netfn, req.cmd, &req.data)),
            None => Err(io::Error::new(io::ErrorKind::NotFound, "no ipmi device")),
        }
    }

    /// `uuid-of-<device name>`.
    fn fs_uuid(&self, device: &str) -> io::Result<String> {
        self.record(OsCall::FsUuid(device.to_string()));
        Ok(format!("uuid-of-{}", device.rsplit('/').next().unwrap_or(device)))
    }

    /// Pretends: the file must exist; the device is `/dev/loop7`.
    fn loop_attach(&self, file: &Path, read_only: bool) -> io::Result<crate::loopdev::Attached> {
        std::fs::metadata(file)?;
        self.record(OsCall::LoopAttach { file: file.to_path_buf(), read_only });
        Ok(crate::loopdev::Attached::unheld("/dev/loop7"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::mount::{mount, MsFlags};

    /// The postscript's binds under systemd, where every mount is shared: unmounting the bound
    /// tree must leave the original's submounts (there: /sys/fs/cgroup) where they are.
    /// Needs root (`LUNA_TEST_PRIVILEGED=1`); runs in a private mount namespace of its own.
    #[test]
    fn unmounting_a_bind_leaves_the_shared_original_alone() {
        if !luna_core::test_support::gate("LUNA_TEST_PRIVILEGED") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().to_path_buf();
        // A thread of its own: the mount namespace goes away with it.
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).expect("unshare the mount namespace");
            let none = None::<&str>;
            // Nothing here propagates back to the machine's namespace.
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none).unwrap();
            let (orig, bound) = (dir.join("sys"), dir.join("sysroot-sys"));
            std::fs::create_dir_all(&orig).unwrap();
            std::fs::create_dir_all(&bound).unwrap();
            mount(Some("tmpfs"), &orig, Some("tmpfs"), MsFlags::empty(), none).unwrap();
            mount(none, &orig, none, MsFlags::MS_SHARED, none).unwrap();
            std::fs::create_dir(orig.join("cgroup")).unwrap();
            mount(Some("tmpfs"), &orig.join("cgroup"), Some("tmpfs"), MsFlags::empty(), none).unwrap();
            std::fs::write(orig.join("cgroup/marker"), "still mounted").unwrap();

            RealOs.mount(orig.to_str().unwrap(), &bound, None, true, None).unwrap();
            assert!(bound.join("cgroup/marker").exists(), "the bind shows the submount");
            RealOs.umount(&bound).unwrap();
            assert!(!bound.join("cgroup").exists(), "unbound");
            assert_eq!(std::fs::read_to_string(orig.join("cgroup/marker")).ok().as_deref(), Some("still mounted"));
        })
        .join()
        .unwrap();
    }
}
