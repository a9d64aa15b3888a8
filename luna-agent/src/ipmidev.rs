//! The Linux IPMI device (`/dev/ipmi0`, driver `ipmi_devintf` over `ipmi_si`) through
//! ipmi-rs's `File` connection (its `IPMICTL_SEND_COMMAND` / `IPMICTL_RECEIVE_MSG_TRUNC`
//! ioctls), the crate luna-server uses for lanplus: one IPMI implementation in the project.
//! Here: finding the device (loading the drivers, making the node when udev does not) and
//! turning an [`IpmiRequest`] into one exchange. No ipmitool needed in the initramfs.
//!
//! Measured against the hand-rolled ioctl code it replaced (static musl agent, `--profile agent`,
//! same tree): see ARCHITECTURE.md (`setupbmc`) for the figures.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ipmi_rs::connection::{IpmiConnection, LogicalUnit, Message, Request, RequestTargetAddress, Response};

use crate::bmc::IpmiRequest;

const DEVICES: [&str; 3] = ["/dev/ipmi0", "/dev/ipmi/0", "/dev/ipmidev/0"];
/// How long the BMC may take to answer one request.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the device node may take to appear after the drivers load (udev creates it).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(15);

/// An open system interface to the node's BMC.
pub struct Device {
    file: ipmi_rs::File,
    path: PathBuf,
}

impl Device {
    /// Opens the device, loading the drivers first when it is missing.
    pub fn open() -> io::Result<Device> {
        let path = find()?;
        let file = ipmi_rs::File::new(&path, ANSWER_TIMEOUT)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
        Ok(Device { file, path })
    }

    /// Sends `req` to the BMC and returns its answer, completion code first.
    pub fn exchange(&mut self, req: &IpmiRequest) -> io::Result<Vec<u8>> {
        let mut request = Request::new(
            Message::new_raw(req.netfn, req.cmd, req.data.clone()),
            RequestTargetAddress::Bmc(LogicalUnit::Zero),
        );
        let what = req.what;
        let failed = |e: io::Error| io::Error::new(e.kind(), format!("{} ({what}): {e}", self.path.display()));
        self.file.send(&mut request).map_err(failed)?;
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        let resp = loop {
            match self.file.recv() {
                Ok(r) => break r,
                // A signal cut the wait short: wait again for what is left of it.
                Err(e) if e.kind() == io::ErrorKind::Interrupted && Instant::now() < deadline => continue,
                // ipmi-rs says EAGAIN when its poll saw nothing within the answer timeout.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, format!("bmc did not answer '{what}'")))
                }
                Err(e) => return Err(failed(e)),
            }
        };
        answer(req, &resp)
    }
}

/// The answer as the setup judges it (completion code, then the data), if it answers `req`.
fn answer(req: &IpmiRequest, resp: &Response) -> io::Result<Vec<u8>> {
    if resp.netfn_raw() != req.netfn | 1 || resp.cmd() != req.cmd {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bmc answered '{}' with netfn {:#04x} command {:#04x}", req.what, resp.netfn_raw(), resp.cmd()),
        ));
    }
    let mut out = Vec::with_capacity(1 + resp.data().len());
    out.push(resp.cc());
    out.extend_from_slice(resp.data());
    Ok(out)
}

/// The device's path, loading the drivers first when there is none.
fn find() -> io::Result<PathBuf> {
    let present = || DEVICES.iter().map(PathBuf::from).find(|d| d.exists());
    if let Some(d) = present() {
        return Ok(d);
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
        if let Some(d) = present() {
            return Ok(d);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bmc::{CMD_GET_USER_NAME, NETFN_APP};

    fn req() -> IpmiRequest {
        IpmiRequest {
            what: "read the user name",
            netfn: NETFN_APP,
            cmd: CMD_GET_USER_NAME,
            data: vec![3],
            tolerate: &[],
        }
    }

    fn resp(netfn: u8, cmd: u8, data: &[u8]) -> Response {
        Response::new(Message::new_raw(netfn, cmd, data.to_vec()), 0).unwrap()
    }

    #[test]
    fn an_answer_is_the_completion_code_then_the_data() {
        assert_eq!(answer(&req(), &resp(0x07, 0x46, &[0, b'a', b'b'])).unwrap(), vec![0, b'a', b'b']);
        assert_eq!(answer(&req(), &resp(0x07, 0x46, &[0xcc])).unwrap(), vec![0xcc]);
    }

    #[test]
    fn an_answer_to_another_command_is_refused_naming_it() {
        let e = answer(&req(), &resp(0x07, 0x45, &[0])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(e.to_string(), "bmc answered 'read the user name' with netfn 0x07 command 0x45");
        assert!(answer(&req(), &resp(0x0d, 0x46, &[0])).is_err());
    }
}
