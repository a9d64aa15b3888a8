//! `uname(2)` inside lchroot answers with the image's kernel release.
//!
//! How: a seccomp filter in the session's first process (inherited by everything it starts)
//! turns every `uname` system call into a user notification; lchroot receives it on the
//! filter's listener descriptor, writes a `struct utsname` (the host's, with the image's
//! release) into the caller's memory through `/proc/<pid>/mem` and answers "returned 0". This
//! works for dynamic and static binaries alike (glibc, musl, busybox-static, Go programs), unlike
//! an `LD_PRELOAD` library, and needs no kernel module. `/proc/sys/kernel/osrelease`, which some
//! tools read instead, is covered by a bind mount (see `mounts.rs`). If lchroot dies, the kernel
//! fails the trapped calls with `ENOSYS`; nothing else is affected.
//!
//! The BPF program and the reply are plain values ([`filter`], [`with_release`], [`reply`]);
//! the descriptor passing and the receive loop are the OS side.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

const SYS_UNAME: u32 = libc::SYS_uname as u32;

#[derive(Debug, thiserror::Error)]
pub enum UnameError {
    #[error("kernel release '{0}' is too long or contains a NUL byte for uname (at most 64 bytes)")]
    BadRelease(String),
}

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt: 0, jf: 0, k }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: code as u16, jt, jf, k }
}

/// The seccomp program: native-architecture `uname` → user notification, everything else
/// allowed (other architectures' calls, such as 32-bit ones, are not trapped).
pub fn filter() -> Vec<libc::sock_filter> {
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let jeq = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
    let ret = libc::BPF_RET | libc::BPF_K;
    vec![
        stmt(ld, std::mem::offset_of!(libc::seccomp_data, arch) as u32),
        jump(jeq, AUDIT_ARCH, 0, 3),
        stmt(ld, std::mem::offset_of!(libc::seccomp_data, nr) as u32),
        jump(jeq, SYS_UNAME, 0, 1),
        stmt(ret, libc::SECCOMP_RET_USER_NOTIF),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ]
}

/// `uts` with its release replaced.
pub fn with_release(mut uts: libc::utsname, release: &str) -> Result<libc::utsname, UnameError> {
    if release.len() >= uts.release.len() || release.contains('\0') {
        return Err(UnameError::BadRelease(release.into()));
    }
    uts.release = [0; 65];
    for (d, s) in uts.release.iter_mut().zip(release.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(uts)
}

/// The host's `uname`.
pub fn host() -> io::Result<libc::utsname> {
    // SAFETY: utsname is plain data; uname fills it or fails.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a utsname we own.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(uts)
}

/// How to answer a notification: `Ok(Some(addr))` means "write the utsname at addr and return
/// 0", `Ok(None)` means "let the call run" (the filter traps nothing else, but be safe).
pub fn reply(req: &libc::seccomp_notif) -> Option<u64> {
    (req.data.nr as u32 == SYS_UNAME && req.data.arch == AUDIT_ARCH).then_some(req.data.args[0])
}

fn uts_bytes(uts: &libc::utsname) -> &[u8] {
    // SAFETY: utsname is a plain C struct of c_char arrays without padding; viewing it as
    // bytes for its whole size is sound.
    unsafe {
        std::slice::from_raw_parts((uts as *const libc::utsname).cast::<u8>(), std::mem::size_of::<libc::utsname>())
    }
}

/// The program in the form `seccomp(2)` takes; `prog` must outlive the returned value.
pub fn fprog(prog: &[libc::sock_filter]) -> libc::sock_fprog {
    libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter }
}

#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Installs the filter in the calling process and sends the listener descriptor over `sock`.
///
/// # Safety
/// Runs between fork and exec (`Command::pre_exec`): it only makes system calls and touches
/// stack memory, nothing that allocates or locks. `prog` must point to a valid program.
pub unsafe fn install_and_send(prog: &libc::sock_fprog, sock: RawFd) -> io::Result<()> {
    // SAFETY: seccomp(SET_MODE_FILTER) reads the program `prog` points to (valid per the contract).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = fd as RawFd;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; zero is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/CMSG_LEN are arithmetic; the buffer (64 bytes, 8-aligned) holds one
    // int's control message, so CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it.
    let r = unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        libc::sendmsg(sock, &msg, 0)
    };
    let err = io::Error::last_os_error();
    // SAFETY: closing the descriptor seccomp just gave us; the parent has its own copy.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(err);
    }
    Ok(())
}

/// Receives the listener descriptor [`install_and_send`] sent; `None` when the child closed
/// the socket without sending one (it failed before its exec).
pub fn receive(sock: &OwnedFd) -> io::Result<Option<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: msghdr is plain data; zero is a valid "empty" value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    // SAFETY: the buffers outlive the call and their sizes are right.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recvmsg filled msg; CMSG_FIRSTHDR checks msg_controllen before returning a header.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || c.is_null() || (*c).cmsg_level != libc::SOL_SOCKET || (*c).cmsg_type != libc::SCM_RIGHTS {
            return Ok(None);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
        Ok(Some(OwnedFd::from_raw_fd(fd)))
    }
}

fn id_valid(fd: RawFd, id: u64) -> bool {
    // SAFETY: the ioctl reads the u64 we pass a pointer to.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &id as *const u64) == 0 }
}

fn write_uts(fd: RawFd, req: &libc::seccomp_notif, addr: u64, uts: &libc::utsname) -> Result<(), i32> {
    let mem = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{}/mem", req.pid))
        .map_err(|e| e.raw_os_error().unwrap_or(libc::EFAULT))?;
    // The pid may have been reused between the notification and the open: check the
    // notification is still pending, so the file is the caller's memory.
    if !id_valid(fd, req.id) {
        return Err(libc::ESRCH);
    }
    mem.write_all_at(uts_bytes(uts), addr).map_err(|_| libc::EFAULT)
}

/// Answers the notifications on `listener` until every process under the filter has exited.
pub fn supervise(listener: OwnedFd, uts: libc::utsname) {
    let fd = listener.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, -1) };
        if r < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if pfd.revents & libc::POLLIN == 0 {
            // POLLHUP: no process is left under the filter.
            return;
        }
        // SAFETY: seccomp_notif is plain data and must be zeroed before NOTIF_RECV.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: NOTIF_RECV fills the seccomp_notif we pass.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req as *mut libc::seccomp_notif) } != 0 {
            // ENOENT: the caller died meanwhile; EINTR: try again.
            continue;
        }
        let mut resp = libc::seccomp_notif_resp { id: req.id, val: 0, error: 0, flags: 0 };
        match reply(&req) {
            None => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            Some(addr) => {
                if let Err(errno) = write_uts(fd, &req, addr, &uts) {
                    resp.error = -errno;
                }
            }
        }
        // SAFETY: NOTIF_SEND reads the response we pass; ENOENT (the caller is gone) is fine.
        unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp as *const libc::seccomp_notif_resp) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic-BPF seccomp program on one call (the subset the filter uses).
    fn run(prog: &[libc::sock_filter], nr: i32, arch: u32) -> u32 {
        // SAFETY: plain data.
        let mut data: libc::seccomp_data = unsafe { std::mem::zeroed() };
        data.nr = nr;
        data.arch = arch;
        // SAFETY: seccomp_data is plain data; view it as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&data as *const libc::seccomp_data).cast::<u8>(),
                size_of::<libc::seccomp_data>(),
            )
        };
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = prog[pc];
            match i.code as u32 {
                c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_ne_bytes(bytes[k..k + 4].try_into().unwrap());
                    pc += 1;
                }
                c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => {
                    pc += 1 + if acc == i.k { i.jt as usize } else { i.jf as usize };
                }
                c if c == libc::BPF_RET | libc::BPF_K => return i.k,
                c => panic!("unexpected instruction {c:#x}"),
            }
        }
    }

    #[test]
    fn filter_traps_uname_only() {
        let p = filter();
        assert_eq!(run(&p, libc::SYS_uname as i32, AUDIT_ARCH), libc::SECCOMP_RET_USER_NOTIF);
        assert_eq!(run(&p, libc::SYS_getpid as i32, AUDIT_ARCH), libc::SECCOMP_RET_ALLOW);
        assert_eq!(run(&p, libc::SYS_uname as i32, 0x4000_0003), libc::SECCOMP_RET_ALLOW, "foreign arch");
    }

    #[test]
    fn release_is_replaced_and_checked() {
        let h = host().unwrap();
        let u = with_release(h, "6.1.0-28-amd64").unwrap();
        let rel: Vec<u8> = u.release.iter().take_while(|c| **c != 0).map(|c| *c as u8).collect();
        assert_eq!(rel, b"6.1.0-28-amd64");
        assert_eq!(u.sysname, h.sysname);
        assert_eq!(u.machine, h.machine);
        assert!(with_release(h, &"9".repeat(65)).is_err());
        assert!(with_release(h, "6.1\0x").is_err());
        assert_eq!(uts_bytes(&u).len(), 6 * 65);
    }

    #[test]
    fn reply_writes_only_for_uname() {
        // SAFETY: plain data.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        req.data.nr = libc::SYS_uname as i32;
        req.data.arch = AUDIT_ARCH;
        req.data.args[0] = 0x7fff_0000;
        assert_eq!(reply(&req), Some(0x7fff_0000));
        req.data.nr = libc::SYS_getpid as i32;
        assert_eq!(reply(&req), None);
    }
}
