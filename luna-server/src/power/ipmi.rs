//! IPMI 2.0 over LAN (RMCP+, "lanplus", cipher suite 3) with ipmi-rs: the session (RAKP
//! HMAC-SHA1, HMAC-SHA1-96, AES-CBC-128) is ipmi-rs's; the chassis commands ipmi-rs does not
//! have are [`IpmiCommand`]s here (bytes in, values out, unit-tested without sockets).
//! ipmi-rs is blocking: each try runs on tokio's blocking pool with socket timeouts inside its
//! budget, and its session is closed (Close Session, a luna patch of ipmi-rs) before it returns.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipmi_rs::connection::{IpmiCommand, Message, NetFn, NotEnoughData};
use ipmi_rs::rmcp::{ActivationError, Rmcp, RmcpIpmiError, RmcpIpmiReceiveError, V2_0ActivationError};
use ipmi_rs::{Ipmi, IpmiError};
use luna_core::power::PowerAction;

use super::{done_text, Bmc, BmcError, BmcTarget, Op, TryError};

/// The RMCP port.
pub const PORT: u16 = 623;

/// Get Chassis Status (IPMI 2.0 §28.2): whether the chassis power is on.
pub struct GetChassisStatus;

impl From<GetChassisStatus> for Message {
    fn from(_: GetChassisStatus) -> Self {
        Message::new_request(NetFn::Chassis, 0x01, vec![])
    }
}

impl IpmiCommand for GetChassisStatus {
    /// Power is on.
    type Output = bool;
    type Error = NotEnoughData;
    fn parse_success_response(data: &[u8]) -> Result<bool, NotEnoughData> {
        // Byte 1: current power state, bit 0 = system power on. Bytes 2 and 3 follow.
        if data.len() < 3 {
            return Err(NotEnoughData);
        }
        Ok(data[0] & 0x01 != 0)
    }
}

/// Set Session Privilege Level (§22.18) to Administrator. An IPMI 2.0 session starts at User
/// level whatever RAKP asked for (ipmitool sends this too); chassis control needs Operator and
/// boot options Administrator. ipmi-rs 0.6 does not send it.
pub struct SetSessionPrivilegeAdmin;

impl From<SetSessionPrivilegeAdmin> for Message {
    fn from(_: SetSessionPrivilegeAdmin) -> Self {
        Message::new_request(NetFn::App, 0x3B, vec![0x04])
    }
}

impl IpmiCommand for SetSessionPrivilegeAdmin {
    type Output = ();
    type Error = NotEnoughData;
    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Chassis Control (§28.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChassisControl {
    PowerDown = 0,
    PowerUp = 1,
    PowerCycle = 2,
    HardReset = 3,
    /// ACPI soft shutdown.
    SoftShutdown = 5,
}

impl From<ChassisControl> for Message {
    fn from(c: ChassisControl) -> Self {
        Message::new_request(NetFn::Chassis, 0x02, vec![c as u8])
    }
}

impl IpmiCommand for ChassisControl {
    type Output = ();
    type Error = NotEnoughData;
    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Chassis Identify (§28.5): blink for `seconds` (0 = off).
pub struct ChassisIdentify(pub u8);

impl From<ChassisIdentify> for Message {
    fn from(c: ChassisIdentify) -> Self {
        Message::new_request(NetFn::Chassis, 0x04, vec![c.0])
    }
}

impl IpmiCommand for ChassisIdentify {
    type Output = ();
    type Error = NotEnoughData;
    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Where the next boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    Pxe,
    Disk,
}

/// Set System Boot Options, parameter 5 (boot flags, §28.13 table 28-14): valid, next boot only,
/// legacy boot type, the device selector.
pub struct SetBootFlags(pub BootDevice);

impl From<SetBootFlags> for Message {
    fn from(c: SetBootFlags) -> Self {
        let selector = match c.0 {
            BootDevice::Pxe => 0b0001,
            BootDevice::Disk => 0b0010,
        };
        // param 5 (not locked); data 1: valid (bit 7), one-time (bit 6 = 0); data 2: device
        // selector in bits 5:2; data 3-5: no overrides.
        Message::new_request(NetFn::Chassis, 0x08, vec![0x05, 0x80, selector << 2, 0, 0, 0])
    }
}

impl IpmiCommand for SetBootFlags {
    type Output = ();
    type Error = NotEnoughData;
    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// The IPMI lanplus implementation of [`Bmc`].
pub struct IpmiBmc;

#[async_trait]
impl Bmc for IpmiBmc {
    async fn attempt(&self, target: &BmcTarget, op: Op, budget: Duration) -> Result<String, TryError> {
        let addr = SocketAddr::from((target.addr, target.port));
        let user = target.user.clone();
        let password = target.password.clone();
        // The thread may outlive the caller's timeout by one socket timeout; its socket timeouts
        // are what bound it.
        tokio::task::spawn_blocking(move || blocking_attempt(addr, &user, password.0.as_bytes(), op, budget))
            .await
            .map_err(|e| TryError::before(BmcError::Protocol(format!("ipmi thread failed: {e}"))))?
    }
}

/// One try, blocking: open a session, send the command, close the session.
pub fn blocking_attempt(
    addr: SocketAddr,
    user: &str,
    password: &[u8],
    op: Op,
    budget: Duration,
) -> Result<String, TryError> {
    let start = Instant::now();
    // Every receive waits at most this long; a session is ~5 exchanges, so an unanswered
    // first one (a dead address) fails within the budget.
    let recv_timeout = budget.max(Duration::from_millis(10));
    let mut rmcp = Rmcp::new(addr, recv_timeout).map_err(|e| TryError::before(io_error(&e, budget)))?;
    rmcp.activate(true, Some(user), Some(password)).map_err(|e| TryError::before(activation_error(e, budget)))?;
    let mut ipmi = Ipmi::new(rmcp);
    let result = match op.action {
        // Reading the power state needs no more than User.
        PowerAction::Status => Ok(()),
        _ => {
            ipmi.send_recv(SetSessionPrivilegeAdmin).map_err(|e| TryError::before(command_error(op.action, e, budget)))
        }
    }
    .and_then(|()| command(&mut ipmi, op, budget));
    // Close Session even if the command failed; its own failure changes nothing for the node.
    if let Err(e) = ipmi.inner_mut().close() {
        tracing::debug!(%addr, error = ?e, "ipmi close session failed");
    }
    tracing::trace!(%addr, ms = start.elapsed().as_millis() as u64, "ipmi try done");
    result
}

fn command(ipmi: &mut Ipmi<Rmcp>, op: Op, budget: Duration) -> Result<String, TryError> {
    let refused = |e| TryError::after(command_error(op.action, e, budget));
    match op.action {
        PowerAction::Status => {
            let on =
                ipmi.send_recv(GetChassisStatus).map_err(|e| TryError::before(command_error(op.action, e, budget)))?;
            Ok(if on { "on" } else { "off" }.into())
        }
        PowerAction::On => ipmi.send_recv(ChassisControl::PowerUp).map_err(refused).map(|_| done_text(op)),
        PowerAction::Off => ipmi.send_recv(ChassisControl::PowerDown).map_err(refused).map(|_| done_text(op)),
        PowerAction::Soft => ipmi.send_recv(ChassisControl::SoftShutdown).map_err(refused).map(|_| done_text(op)),
        PowerAction::Reset => ipmi.send_recv(ChassisControl::HardReset).map_err(refused).map(|_| done_text(op)),
        PowerAction::Cycle => ipmi.send_recv(ChassisControl::PowerCycle).map_err(refused).map(|_| done_text(op)),
        PowerAction::Identify => ipmi.send_recv(ChassisIdentify(op.seconds)).map_err(refused).map(|_| done_text(op)),
        PowerAction::Pxe => ipmi.send_recv(SetBootFlags(BootDevice::Pxe)).map_err(refused).map(|_| done_text(op)),
        PowerAction::Disk => ipmi.send_recv(SetBootFlags(BootDevice::Disk)).map_err(refused).map(|_| done_text(op)),
    }
}

fn io_error(e: &std::io::Error, budget: Duration) -> BmcError {
    use std::io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => BmcError::Timeout(budget),
        _ => BmcError::Unreachable(e.to_string()),
    }
}

fn receive_error(e: &RmcpIpmiReceiveError, budget: Duration) -> BmcError {
    match e {
        RmcpIpmiReceiveError::Io(io) => io_error(io, budget),
        other => BmcError::Protocol(format!("{other:?}")),
    }
}

/// Sorts ipmi-rs's activation errors into what an admin can act on. Only names and codes are
/// formatted: none of these values holds the password.
pub fn activation_error(e: ActivationError, budget: Duration) -> BmcError {
    use V2_0ActivationError as V2;
    match e {
        ActivationError::BindSocket(io) | ActivationError::PingSend(io) | ActivationError::PongReceive(io) => {
            io_error(&io, budget)
        }
        ActivationError::GetChannelAuthenticationCapabilities(IpmiError::Connection(RmcpIpmiError::Receive(r))) => {
            receive_error(&r, budget)
        }
        ActivationError::V2_0(v2) => match v2 {
            V2::Io(io) => io_error(&io, budget),
            V2::OpenSessionResponseReceive(r) | V2::RakpMessage2Receive(r) | V2::RakpMessage4Receive(r) => {
                receive_error(&r, budget)
            }
            // The BMC did not know the user, or our HMAC of its reply did not match (the password).
            V2::RakpMessage2Parse(_)
            | V2::ServerAuthenticationFailed
            | V2::RakpMessage4Parse(_)
            | V2::RakpMessage4InvalidIntegrityCheckValue => BmcError::Auth,
            other => BmcError::Session(format!("{other:?}")),
        },
        ActivationError::IpmiNotSupported | ActivationError::NoSupportedIpmiLANVersions => {
            BmcError::Session("the BMC offers no IPMI 2.0 (lanplus) session".into())
        }
        other => BmcError::Session(format!("{other:?}")),
    }
}

fn command_error<P: std::fmt::Debug>(
    action: PowerAction,
    e: IpmiError<RmcpIpmiError, P>,
    budget: Duration,
) -> BmcError {
    match e {
        IpmiError::Connection(RmcpIpmiError::Receive(r)) => receive_error(&r, budget),
        IpmiError::Connection(other) => BmcError::Protocol(format!("{other:?}")),
        IpmiError::Failed { completion_code, .. } => {
            BmcError::Refused { action, detail: format!("completion code {completion_code:?}") }
        }
        IpmiError::Command { completion_code: Some(cc), .. } => {
            BmcError::Refused { action, detail: format!("completion code {cc:?}") }
        }
        other => BmcError::Protocol(format!("{other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<M: Into<Message>>(m: M) -> (u8, u8, Vec<u8>) {
        let m: Message = m.into();
        (m.netfn_raw(), m.cmd(), m.data().to_vec())
    }

    #[test]
    fn chassis_messages_are_the_spec_bytes() {
        assert_eq!(bytes(SetSessionPrivilegeAdmin), (0x06, 0x3B, vec![4]));
        assert_eq!(bytes(GetChassisStatus), (0x00, 0x01, vec![]));
        assert_eq!(bytes(ChassisControl::PowerDown), (0x00, 0x02, vec![0]));
        assert_eq!(bytes(ChassisControl::PowerUp), (0x00, 0x02, vec![1]));
        assert_eq!(bytes(ChassisControl::PowerCycle), (0x00, 0x02, vec![2]));
        assert_eq!(bytes(ChassisControl::HardReset), (0x00, 0x02, vec![3]));
        assert_eq!(bytes(ChassisControl::SoftShutdown), (0x00, 0x02, vec![5]));
        assert_eq!(bytes(ChassisIdentify(15)), (0x00, 0x04, vec![15]));
        assert_eq!(bytes(ChassisIdentify(0)), (0x00, 0x04, vec![0]));
        // What `ipmitool chassis bootdev pxe` / `disk` send as parameter 5 (one-time boot).
        assert_eq!(bytes(SetBootFlags(BootDevice::Pxe)), (0x00, 0x08, vec![5, 0x80, 0x04, 0, 0, 0]));
        assert_eq!(bytes(SetBootFlags(BootDevice::Disk)), (0x00, 0x08, vec![5, 0x80, 0x08, 0, 0, 0]));
    }

    #[test]
    fn chassis_status_reads_the_power_bit() {
        assert_eq!(GetChassisStatus::parse_success_response(&[0x01, 0x00, 0x00]), Ok(true));
        assert_eq!(GetChassisStatus::parse_success_response(&[0x60, 0x10, 0x40, 0x00]), Ok(false));
        assert_eq!(GetChassisStatus::parse_success_response(&[0x01]), Err(NotEnoughData));
    }

    #[test]
    fn activation_errors_are_sorted() {
        let t = Duration::from_secs(5);
        let timeout = std::io::Error::from(std::io::ErrorKind::WouldBlock);
        assert_eq!(activation_error(ActivationError::PongReceive(timeout), t), BmcError::Timeout(t));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(matches!(activation_error(ActivationError::PongReceive(refused), t), BmcError::Unreachable(_)));
        let auth = ActivationError::V2_0(V2_0ActivationError::ServerAuthenticationFailed);
        assert_eq!(activation_error(auth, t), BmcError::Auth);
        assert!(matches!(activation_error(ActivationError::IpmiNotSupported, t), BmcError::Session(_)));
    }
}
