//! The Linux IPMI device (`/dev/ipmi0`, driver `ipmi_devintf` over `ipmi_si`): one request,
//! one response, through the `IPMICTL_SEND_COMMAND` / `IPMICTL_RECEIVE_MSG_TRUNC` ioctls
//! (`include/uapi/linux/ipmi.h`). No ipmitool needed in the initramfs.

use std::ffi::{c_int, c_long, c_short, c_uchar, c_uint, c_ushort};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::bmc::IpmiRequest;

const IPMI_SYSTEM_INTERFACE_ADDR_TYPE: c_int = 0x0c;
const IPMI_BMC_CHANNEL: c_short = 0x0f;
const IPMI_RESPONSE_RECV_TYPE: c_int = 1;
const DEVICES: [&str; 3] = ["/dev/ipmi0", "/dev/ipmi/0", "/dev/ipmidev/0"];
/// How long the BMC may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the device node may take to appear after the drivers load (udev creates it).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(15);

#[repr(C)]
struct SystemInterfaceAddr {
    addr_type: c_int,
    channel: c_short,
    lun: c_uchar,
}

#[repr(C)]
struct Msg {
    netfn: c_uchar,
    cmd: c_uchar,
    data_len: c_ushort,
    data: *mut c_uchar,
}

#[repr(C)]
struct Req {
    addr: *mut c_uchar,
    addr_len: c_uint,
    msgid: c_long,
    msg: Msg,
}

#[repr(C)]
struct Recv {
    recv_type: c_int,
    addr: *mut c_uchar,
    addr_len: c_uint,
    msgid: c_long,
    msg: Msg,
}

nix::ioctl_readwrite!(receive_msg_trunc, b'i', 11, Recv);
nix::ioctl_read!(send_command, b'i', 13, Req);

/// Opens the device, loading the drivers first when it is missing.
fn open() -> io::Result<File> {
    let open_any = || DEVICES.iter().find_map(|d| OpenOptions::new().read(true).write(true).open(d).ok());
    if let Some(f) = open_any() {
        return Ok(f);
    }
    for module in ["ipmi_devintf", "ipmi_si"] {
        match Command::new("modprobe").arg(module).status() {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!("modprobe {module}: {s}"),
            Err(e) => tracing::warn!("modprobe {module}: {e}"),
        }
    }
    let start = Instant::now();
    loop {
        if let Some(f) = open_any() {
            return Ok(f);
        }
        // The driver exists but udev has not made the node: make it ourselves from sysfs.
        if let Ok(dev) = std::fs::read_to_string("/sys/class/ipmi/ipmi0/dev") {
            if let Some((major, minor)) = dev.trim().split_once(':') {
                if let (Ok(major), Ok(minor)) = (major.parse::<u64>(), minor.parse::<u64>()) {
                    let _ = nix::sys::stat::mknod(
                        Path::new(DEVICES[0]),
                        nix::sys::stat::SFlag::S_IFCHR,
                        nix::sys::stat::Mode::from_bits_truncate(0o600),
                        nix::sys::stat::makedev(major, minor),
                    );
                }
            }
        }
        if start.elapsed() > DEVICE_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no ipmi device (/dev/ipmi0) after loading ipmi_si and ipmi_devintf: no BMC on this node?",
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Sends `req` to the BMC and returns its answer, completion code first.
pub fn exchange(req: &IpmiRequest) -> io::Result<Vec<u8>> {
    let dev = open()?;
    let fd = dev.as_raw_fd();
    let mut addr =
        SystemInterfaceAddr { addr_type: IPMI_SYSTEM_INTERFACE_ADDR_TYPE, channel: IPMI_BMC_CHANNEL, lun: 0 };
    let mut data = req.data.clone();
    let data_len = c_ushort::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("ipmi request '{}' too long", req.what)))?;
    let msgid: c_long = 1;
    let mut send = Req {
        addr: (&mut addr as *mut SystemInterfaceAddr).cast(),
        addr_len: std::mem::size_of::<SystemInterfaceAddr>() as c_uint,
        msgid,
        msg: Msg { netfn: req.netfn, cmd: req.cmd, data_len, data: data.as_mut_ptr() },
    };
    // SAFETY: every pointer in `send` points at a live local of the size given next to it.
    unsafe { send_command(fd, &mut send) }.map_err(io::Error::from)?;

    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("bmc did not answer '{}'", req.what)));
        }
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            continue;
        }
        let mut raddr = SystemInterfaceAddr { addr_type: 0, channel: 0, lun: 0 };
        let mut buf = vec![0u8; 1024];
        let mut recv = Recv {
            recv_type: 0,
            addr: (&mut raddr as *mut SystemInterfaceAddr).cast(),
            addr_len: std::mem::size_of::<SystemInterfaceAddr>() as c_uint,
            msgid: 0,
            msg: Msg { netfn: 0, cmd: 0, data_len: buf.len() as c_ushort, data: buf.as_mut_ptr() },
        };
        // SAFETY: as above; the kernel writes at most `data_len` bytes into `buf`.
        match unsafe { receive_msg_trunc(fd, &mut recv) } {
            Ok(_) => {}
            Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
        // Only our answer counts (events and other replies are dropped).
        if recv.recv_type != IPMI_RESPONSE_RECV_TYPE || recv.msgid != msgid || recv.msg.cmd != req.cmd {
            continue;
        }
        buf.truncate(usize::from(recv.msg.data_len));
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("empty bmc answer to '{}'", req.what)));
        }
        return Ok(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_layouts_match_the_kernel_abi() {
        // x86_64 and aarch64 (LP64): the sizes `_IOR('i', 13, struct ipmi_req)` encodes.
        if cfg!(target_pointer_width = "64") {
            assert_eq!(std::mem::size_of::<Msg>(), 16);
            assert_eq!(std::mem::size_of::<Req>(), 40);
            assert_eq!(std::mem::size_of::<Recv>(), 48);
            assert_eq!(std::mem::size_of::<SystemInterfaceAddr>(), 8);
            // IPMICTL_SEND_COMMAND as the kernel headers spell it on x86_64.
            assert_eq!(nix::request_code_read!(b'i', 13, std::mem::size_of::<Req>()), 0x8028_690d);
            assert_eq!(nix::request_code_readwrite!(b'i', 11, std::mem::size_of::<Recv>()), 0xc030_690b);
        }
    }
}
