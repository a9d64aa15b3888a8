//! In-band BMC setup (`setupbmc`): the node configures its own BMC over the system interface
//! (`/dev/ipmi0`) from the plan's bmcsetup and `BMC` interface — LAN channel with a static
//! address, netmask and gateway, the user's name and password, the user enabled with
//! administrator privilege and IPMI messaging on the channel, and IPMI over LAN always available.
//!
//! The IPMI messages are built and the answers judged here without I/O ([`setup_requests`],
//! [`readback_requests`], [`judge_readback`]); [`configure`] only sends them through
//! [`Os::ipmi`]. The password is in two request bodies only, which never print (see
//! [`IpmiRequest`]'s `Debug`).

use std::fmt;
use std::net::Ipv4Addr;

use luna_core::api::PlanBmc;
use luna_core::model::BmcProtocol;

use crate::os::Os;

/// Network functions (IPMI 2.0 table 5-1).
pub const NETFN_APP: u8 = 0x06;
pub const NETFN_TRANSPORT: u8 = 0x0c;

// App commands (IPMI 2.0 §22).
pub const CMD_SET_CHANNEL_ACCESS: u8 = 0x40;
pub const CMD_GET_CHANNEL_ACCESS: u8 = 0x41;
pub const CMD_SET_USER_ACCESS: u8 = 0x43;
pub const CMD_GET_USER_ACCESS: u8 = 0x44;
pub const CMD_SET_USER_NAME: u8 = 0x45;
pub const CMD_GET_USER_NAME: u8 = 0x46;
pub const CMD_SET_USER_PASSWORD: u8 = 0x47;
// Transport commands (IPMI 2.0 §23).
pub const CMD_SET_LAN_CONFIG: u8 = 0x01;
pub const CMD_GET_LAN_CONFIG: u8 = 0x02;

// LAN configuration parameters (IPMI 2.0 table 23-4).
pub const LAN_SET_IN_PROGRESS: u8 = 0;
pub const LAN_IP_ADDRESS: u8 = 3;
pub const LAN_IP_SOURCE: u8 = 4;
pub const LAN_SUBNET_MASK: u8 = 6;
pub const LAN_DEFAULT_GATEWAY: u8 = 12;

const IP_SOURCE_STATIC: u8 = 0x01;
const PRIV_ADMIN: u8 = 0x04;
const ACCESS_ALWAYS: u8 = 0x02;
/// Set/Get Channel Access selectors: non-volatile and volatile (active) settings.
const NON_VOLATILE: u8 = 0x40;
const VOLATILE: u8 = 0x80;
/// Set User Password operations.
const PW_ENABLE: u8 = 0x01;
const PW_SET: u8 = 0x02;
const PW_TEST: u8 = 0x03;
/// Completion codes a BMC gives for a "set in progress" it does not implement or is busy with;
/// the lock is a courtesy, so those do not stop the setup.
const SET_IN_PROGRESS_TOLERATED: &[u8] = &[0x80, 0x81, 0xc1, 0xcc];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BmcError {
    #[error("bmc protocol {0:?} cannot be set up in-band (only ipmi)")]
    Protocol(BmcProtocol),
    #[error("node has no BMC interface address to give the bmc")]
    NoAddress,
    #[error("bmc prefix length {0} is not 1 to 32")]
    Prefix(u8),
    #[error("bmc user id {0} cannot be named (1 is the anonymous user; 2 to 63)")]
    UserId(u8),
    #[error("bmc user name '{0}' must be 1 to 16 bytes")]
    UserName(String),
    #[error("bmc password must be 1 to 20 bytes")]
    Password,
    #[error("bmc channel {0} is not 0 to 15")]
    Channel(u8),
    #[error("ipmi device: {0}")]
    Device(String),
    #[error("bmc refused to {what}: completion code {code:#04x}")]
    Refused { what: &'static str, code: u8 },
    #[error("bmc answered '{what}' with {len} bytes, too short")]
    Short { what: &'static str, len: usize },
    #[error("bmc read-back differs: {0}")]
    Mismatch(String),
}

/// One IPMI request to the BMC over the system interface.
#[derive(Clone, PartialEq, Eq)]
pub struct IpmiRequest {
    /// What it does, for errors and logs.
    pub what: &'static str,
    pub netfn: u8,
    pub cmd: u8,
    pub data: Vec<u8>,
    /// Completion codes other than 0 that do not fail the setup.
    pub tolerate: &'static [u8],
}

impl IpmiRequest {
    fn new(what: &'static str, netfn: u8, cmd: u8, data: Vec<u8>) -> Self {
        Self { what, netfn, cmd, data, tolerate: &[] }
    }

    /// Whether the body carries the password (Set User Password, set or test).
    pub fn secret(&self) -> bool {
        self.netfn == NETFN_APP
            && self.cmd == CMD_SET_USER_PASSWORD
            && self.data.get(1).is_some_and(|op| op & 0x03 >= PW_SET)
    }
}

impl fmt::Debug for IpmiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("IpmiRequest");
        d.field("what", &self.what).field("netfn", &self.netfn).field("cmd", &self.cmd);
        if self.secret() {
            // User id and operation only: the rest is the password.
            d.field("data", &format_args!("{:02x?} + ********", &self.data[..2]));
        } else {
            d.field("data", &format_args!("{:02x?}", self.data));
        }
        d.finish()
    }
}

/// A checked bmcsetup: what goes into the BMC.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Target {
    pub lan_channel: u8,
    pub user_channel: u8,
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub userid: u8,
    pub user: String,
    password: luna_core::model::Secret,
}

impl Target {
    pub fn from_plan(bmc: &PlanBmc) -> Result<Self, BmcError> {
        if bmc.protocol != BmcProtocol::Ipmi {
            return Err(BmcError::Protocol(bmc.protocol));
        }
        let ip = bmc.ip.ok_or(BmcError::NoAddress)?;
        if !(1..=32).contains(&bmc.prefix) {
            return Err(BmcError::Prefix(bmc.prefix));
        }
        let netmask = Ipv4Addr::from(u32::MAX << (32 - u32::from(bmc.prefix)));
        if !(2..=63).contains(&bmc.userid) {
            return Err(BmcError::UserId(bmc.userid));
        }
        if bmc.user.is_empty() || bmc.user.len() > 16 {
            return Err(BmcError::UserName(bmc.user.clone()));
        }
        if bmc.password.0.is_empty() || bmc.password.0.len() > 20 {
            return Err(BmcError::Password);
        }
        for ch in [bmc.netchannel, bmc.mgmtchannel] {
            if ch > 15 {
                return Err(BmcError::Channel(ch));
            }
        }
        Ok(Self {
            lan_channel: bmc.netchannel,
            user_channel: bmc.mgmtchannel,
            ip,
            netmask,
            gateway: bmc.gateway,
            userid: bmc.userid,
            user: bmc.user.clone(),
            password: bmc.password.clone(),
        })
    }

    fn lan_set(&self, what: &'static str, param: u8, value: &[u8]) -> IpmiRequest {
        let mut data = vec![self.lan_channel, param];
        data.extend_from_slice(value);
        IpmiRequest::new(what, NETFN_TRANSPORT, CMD_SET_LAN_CONFIG, data)
    }

    fn lan_get(&self, what: &'static str, param: u8) -> IpmiRequest {
        IpmiRequest::new(what, NETFN_TRANSPORT, CMD_GET_LAN_CONFIG, vec![self.lan_channel, param, 0, 0])
    }

    /// Set User Password body for `op`: 16-byte form, or the 20-byte form (user id bit 7) for
    /// longer passwords; NUL padded.
    fn password_request(&self, what: &'static str, op: u8) -> IpmiRequest {
        let pw = self.password.0.as_bytes();
        let (flag, size) = if pw.len() > 16 { (0x80, 20) } else { (0, 16) };
        let mut data = vec![self.userid | flag, op];
        data.extend_from_slice(pw);
        data.resize(2 + size, 0);
        IpmiRequest::new(what, NETFN_APP, CMD_SET_USER_PASSWORD, data)
    }
}

/// The writes, in order. The LAN parameters are written inside a "set in progress" lock and
/// committed (some BMCs, ipmi_sim among them, apply address changes only on commit).
pub fn setup_requests(t: &Target) -> Vec<IpmiRequest> {
    let mut lock = t.lan_set("lock the lan parameters", LAN_SET_IN_PROGRESS, &[0x01]);
    lock.tolerate = SET_IN_PROGRESS_TOLERATED;
    let mut commit = t.lan_set("commit the lan parameters", LAN_SET_IN_PROGRESS, &[0x02]);
    commit.tolerate = SET_IN_PROGRESS_TOLERATED;
    let mut unlock = t.lan_set("unlock the lan parameters", LAN_SET_IN_PROGRESS, &[0x00]);
    unlock.tolerate = SET_IN_PROGRESS_TOLERATED;

    let mut v = vec![
        lock,
        t.lan_set("set the ip address source to static", LAN_IP_SOURCE, &[IP_SOURCE_STATIC]),
        t.lan_set("set the ip address", LAN_IP_ADDRESS, &t.ip.octets()),
        t.lan_set("set the subnet mask", LAN_SUBNET_MASK, &t.netmask.octets()),
    ];
    if let Some(gw) = t.gateway {
        v.push(t.lan_set("set the default gateway", LAN_DEFAULT_GATEWAY, &gw.octets()));
    }
    let mut name = t.user.as_bytes().to_vec();
    name.resize(16, 0);
    let mut name_data = vec![t.userid];
    name_data.extend_from_slice(&name);
    v.extend([
        commit,
        unlock,
        IpmiRequest::new("set the user name", NETFN_APP, CMD_SET_USER_NAME, name_data),
        t.password_request("set the user password", PW_SET),
        // Bit 7: change the bits; 5: link authentication; 4: IPMI messaging; callback-only off.
        IpmiRequest::new(
            "set the user access",
            NETFN_APP,
            CMD_SET_USER_ACCESS,
            vec![0x80 | 0x20 | 0x10 | t.user_channel, t.userid, PRIV_ADMIN],
        ),
        IpmiRequest::new("enable the user", NETFN_APP, CMD_SET_USER_PASSWORD, vec![t.userid, PW_ENABLE]),
        IpmiRequest::new(
            "enable ipmi over lan (non-volatile)",
            NETFN_APP,
            CMD_SET_CHANNEL_ACCESS,
            vec![t.lan_channel, NON_VOLATILE | ACCESS_ALWAYS, NON_VOLATILE | PRIV_ADMIN],
        ),
        IpmiRequest::new(
            "enable ipmi over lan (active)",
            NETFN_APP,
            CMD_SET_CHANNEL_ACCESS,
            vec![t.lan_channel, VOLATILE | ACCESS_ALWAYS, VOLATILE | PRIV_ADMIN],
        ),
    ]);
    v
}

/// The reads that check the writes, in the order [`judge_readback`] expects their answers.
pub fn readback_requests(t: &Target) -> Vec<IpmiRequest> {
    vec![
        t.lan_get("read the ip address source", LAN_IP_SOURCE),
        t.lan_get("read the ip address", LAN_IP_ADDRESS),
        t.lan_get("read the subnet mask", LAN_SUBNET_MASK),
        t.lan_get("read the default gateway", LAN_DEFAULT_GATEWAY),
        IpmiRequest::new("read the user name", NETFN_APP, CMD_GET_USER_NAME, vec![t.userid]),
        IpmiRequest::new("read the user access", NETFN_APP, CMD_GET_USER_ACCESS, vec![t.user_channel, t.userid]),
        IpmiRequest::new("read the channel access", NETFN_APP, CMD_GET_CHANNEL_ACCESS, vec![t.lan_channel, VOLATILE]),
        t.password_request("test the user password", PW_TEST),
    ]
}

/// What the BMC says it has, after the setup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readback {
    pub channel: u8,
    pub ip_source: u8,
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub userid: u8,
    pub user: String,
    pub privilege: u8,
    pub ipmi_messaging: bool,
    pub lan_access_mode: u8,
}

impl fmt::Display for Readback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.ip_source == IP_SOURCE_STATIC { "static".to_string() } else { self.ip_source.to_string() };
        let access = if self.lan_access_mode == ACCESS_ALWAYS { "always" } else { "not always" };
        write!(
            f,
            "channel {} ip source {source} ip {} netmask {} gateway {}; user {} '{}' privilege {} ipmi messaging {}; \
             lan access {access}",
            self.channel,
            self.ip,
            self.netmask,
            self.gateway,
            self.userid,
            self.user,
            if self.privilege == PRIV_ADMIN { "admin".to_string() } else { self.privilege.to_string() },
            if self.ipmi_messaging { "on" } else { "off" },
        )
    }
}

fn payload<'a>(req: &IpmiRequest, resp: &'a [u8], len: usize) -> Result<&'a [u8], BmcError> {
    let code = *resp.first().ok_or(BmcError::Short { what: req.what, len: 0 })?;
    if code != 0 {
        return Err(BmcError::Refused { what: req.what, code });
    }
    if resp.len() < 1 + len {
        return Err(BmcError::Short { what: req.what, len: resp.len() });
    }
    Ok(&resp[1..])
}

fn ip_of(b: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(b[0], b[1], b[2], b[3])
}

/// Checks the answers to [`readback_requests`] against the target; the password is judged by
/// the BMC itself (test password), never read.
pub fn judge_readback(t: &Target, reqs: &[IpmiRequest], resps: &[Vec<u8>]) -> Result<Readback, BmcError> {
    let short = BmcError::Short { what: "read-back", len: resps.len() };
    if reqs.len() != 8 || resps.len() != 8 {
        return Err(short);
    }
    // Get LAN Configuration Parameters answers: revision byte, then the value.
    let source = payload(&reqs[0], &resps[0], 2)?[1] & 0x0f;
    let ip = ip_of(&payload(&reqs[1], &resps[1], 5)?[1..]);
    let netmask = ip_of(&payload(&reqs[2], &resps[2], 5)?[1..]);
    let gateway = ip_of(&payload(&reqs[3], &resps[3], 5)?[1..]);
    let name = payload(&reqs[4], &resps[4], 16)?;
    let user = String::from_utf8_lossy(&name[..16]).trim_end_matches('\0').to_string();
    let access = payload(&reqs[5], &resps[5], 4)?[3];
    let chan = payload(&reqs[6], &resps[6], 2)?[0];
    payload(&reqs[7], &resps[7], 0)?;
    let rb = Readback {
        channel: t.lan_channel,
        ip_source: source,
        ip,
        netmask,
        gateway,
        userid: t.userid,
        user,
        privilege: access & 0x0f,
        ipmi_messaging: access & 0x10 != 0,
        lan_access_mode: chan & 0x07,
    };
    let mut diffs = Vec::new();
    if rb.ip_source != IP_SOURCE_STATIC {
        diffs.push(format!("ip source {} (want static)", rb.ip_source));
    }
    if rb.ip != t.ip {
        diffs.push(format!("ip {} (want {})", rb.ip, t.ip));
    }
    if rb.netmask != t.netmask {
        diffs.push(format!("netmask {} (want {})", rb.netmask, t.netmask));
    }
    if let Some(gw) = t.gateway.filter(|gw| *gw != rb.gateway) {
        diffs.push(format!("gateway {} (want {gw})", rb.gateway));
    }
    if rb.user != t.user {
        diffs.push(format!("user name '{}' (want '{}')", rb.user, t.user));
    }
    if rb.privilege != PRIV_ADMIN || !rb.ipmi_messaging {
        diffs.push(format!("user access {access:#04x} (want admin with ipmi messaging)"));
    }
    if rb.lan_access_mode != ACCESS_ALWAYS {
        diffs.push(format!("lan channel access {chan:#04x} (want always available)"));
    }
    if diffs.is_empty() {
        Ok(rb)
    } else {
        Err(BmcError::Mismatch(diffs.join(", ")))
    }
}

/// Sets the BMC up and reads it back. Every exchange goes through [`Os::ipmi`].
pub fn configure(os: &dyn Os, bmc: &PlanBmc) -> Result<Readback, BmcError> {
    let t = Target::from_plan(bmc)?;
    for req in setup_requests(&t) {
        let resp = os.ipmi(&req).map_err(|e| BmcError::Device(format!("{}: {e}", req.what)))?;
        match resp.first() {
            Some(0) => {}
            Some(code) if req.tolerate.contains(code) => {
                tracing::debug!("bmc: {} not supported (completion code {code:#04x}), going on", req.what);
            }
            Some(&code) => return Err(BmcError::Refused { what: req.what, code }),
            None => return Err(BmcError::Short { what: req.what, len: 0 }),
        }
    }
    let reads = readback_requests(&t);
    let mut resps = Vec::with_capacity(reads.len());
    for req in &reads {
        resps.push(os.ipmi(req).map_err(|e| BmcError::Device(format!("{}: {e}", req.what)))?);
    }
    judge_readback(&t, &reads, &resps)
}

/// An in-memory BMC answering the requests above as the IPMI specification says (the
/// [`crate::os::RecordingOs`] fake's BMC). Password tests compare for real. A test double:
/// only in tests and with the `test-support` feature.
#[cfg(any(test, feature = "test-support"))]
#[derive(Clone, Debug, Default)]
pub struct FakeBmc {
    pub lan: std::collections::BTreeMap<(u8, u8), Vec<u8>>,
    pub users: std::collections::BTreeMap<u8, FakeUser>,
    /// Channel → (non-volatile, volatile) access bytes.
    pub channel_access: std::collections::BTreeMap<u8, (u8, u8)>,
    /// Requests answered with this completion code: (netfn, cmd, first data byte or any).
    pub refuse: Vec<(u8, u8, Option<u8>, u8)>,
}

#[cfg(any(test, feature = "test-support"))]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeUser {
    pub name: String,
    pub password: Vec<u8>,
    pub enabled: bool,
    /// Per channel: the Get User Access byte (bit 4 IPMI messaging, bits 3:0 privilege).
    pub access: std::collections::BTreeMap<u8, u8>,
}

#[cfg(any(test, feature = "test-support"))]
impl FakeBmc {
    /// The reply bytes (completion code first).
    pub fn handle(&mut self, netfn: u8, cmd: u8, data: &[u8]) -> Vec<u8> {
        for &(n, c, first, code) in &self.refuse {
            if n == netfn && c == cmd && first.is_none_or(|f| data.get(1) == Some(&f)) {
                return vec![code];
            }
        }
        const BAD_LEN: u8 = 0xc7;
        const BAD_FIELD: u8 = 0xcc;
        match (netfn, cmd) {
            (NETFN_TRANSPORT, CMD_SET_LAN_CONFIG) if data.len() >= 3 => {
                self.lan.insert((data[0], data[1]), data[2..].to_vec());
                vec![0]
            }
            (NETFN_TRANSPORT, CMD_GET_LAN_CONFIG) if data.len() >= 4 => {
                let mut r = vec![0, 0x11];
                r.extend(self.lan.get(&(data[0], data[1])).cloned().unwrap_or_else(|| vec![0; 4]));
                r
            }
            (NETFN_APP, CMD_SET_USER_NAME) if data.len() == 17 => {
                let name = String::from_utf8_lossy(&data[1..]).trim_end_matches('\0').to_string();
                self.users.entry(data[0] & 0x3f).or_default().name = name;
                vec![0]
            }
            (NETFN_APP, CMD_GET_USER_NAME) if !data.is_empty() => {
                let mut r = vec![0];
                let mut name =
                    self.users.get(&(data[0] & 0x3f)).map(|u| u.name.as_bytes().to_vec()).unwrap_or_default();
                name.resize(16, 0);
                r.extend(name);
                r
            }
            (NETFN_APP, CMD_SET_USER_PASSWORD) if data.len() >= 2 => {
                let size = if data[0] & 0x80 != 0 { 20 } else { 16 };
                let user = self.users.entry(data[0] & 0x3f).or_default();
                match data[1] & 0x03 {
                    0 => user.enabled = false,
                    1 => user.enabled = true,
                    _ if data.len() != 2 + size => return vec![BAD_LEN],
                    2 => user.password = data[2..].to_vec(),
                    _ => {
                        let mut want = user.password.clone();
                        want.resize(size, 0);
                        if want != data[2..] {
                            return vec![0x80];
                        }
                    }
                }
                vec![0]
            }
            (NETFN_APP, CMD_SET_USER_ACCESS) if data.len() >= 3 => {
                let user = self.users.entry(data[1] & 0x3f).or_default();
                let byte = user.access.entry(data[0] & 0x0f).or_default();
                if data[0] & 0x80 != 0 {
                    *byte = (*byte & 0x0f) | (data[0] & 0x70);
                }
                *byte = (*byte & 0xf0) | (data[2] & 0x0f);
                vec![0]
            }
            (NETFN_APP, CMD_GET_USER_ACCESS) if data.len() >= 2 => {
                let user = self.users.get(&(data[1] & 0x3f)).cloned().unwrap_or_default();
                let enabled = self.users.values().filter(|u| u.enabled).count() as u8;
                vec![0, 63, enabled, 0, user.access.get(&(data[0] & 0x0f)).copied().unwrap_or(0x0f)]
            }
            (NETFN_APP, CMD_SET_CHANNEL_ACCESS) if data.len() >= 3 => {
                let entry = self.channel_access.entry(data[0] & 0x0f).or_default();
                match data[1] >> 6 {
                    1 => entry.0 = data[1] & 0x3f,
                    2 => entry.1 = data[1] & 0x3f,
                    0 => {}
                    _ => return vec![BAD_FIELD],
                }
                vec![0]
            }
            (NETFN_APP, CMD_GET_CHANNEL_ACCESS) if data.len() >= 2 => {
                let (nv, v) = self.channel_access.get(&(data[0] & 0x0f)).copied().unwrap_or_default();
                match data[1] >> 6 {
                    1 => vec![0, nv, PRIV_ADMIN],
                    2 => vec![0, v, PRIV_ADMIN],
                    _ => vec![BAD_FIELD],
                }
            }
            (NETFN_TRANSPORT | NETFN_APP, _) => vec![BAD_LEN],
            _ => vec![0xc1],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::{OsCall, RecordingOs};
    use luna_core::model::Secret;

    fn plan() -> PlanBmc {
        PlanBmc {
            protocol: BmcProtocol::Ipmi,
            userid: 3,
            user: "admin".into(),
            password: Secret("s3cr3t-pw".into()),
            netchannel: 1,
            mgmtchannel: 1,
            ip: Some("10.148.0.10".parse().unwrap()),
            prefix: 16,
            gateway: Some("10.148.255.254".parse().unwrap()),
        }
    }

    #[test]
    fn the_writes_are_the_ipmi_messages_for_the_setup() {
        let t = Target::from_plan(&plan()).unwrap();
        let reqs = setup_requests(&t);
        let wire: Vec<(u8, u8, Vec<u8>)> = reqs.iter().map(|r| (r.netfn, r.cmd, r.data.clone())).collect();
        let mut pw = b"s3cr3t-pw".to_vec();
        pw.resize(16, 0);
        let mut name = b"admin".to_vec();
        name.resize(16, 0);
        let expect: Vec<(u8, u8, Vec<u8>)> = vec![
            (0x0c, 0x01, vec![1, 0, 1]),
            (0x0c, 0x01, vec![1, 4, 1]),
            (0x0c, 0x01, vec![1, 3, 10, 148, 0, 10]),
            (0x0c, 0x01, vec![1, 6, 255, 255, 0, 0]),
            (0x0c, 0x01, vec![1, 12, 10, 148, 255, 254]),
            (0x0c, 0x01, vec![1, 0, 2]),
            (0x0c, 0x01, vec![1, 0, 0]),
            (0x06, 0x45, [vec![3], name].concat()),
            (0x06, 0x47, [vec![3, 2], pw].concat()),
            (0x06, 0x43, vec![0xb1, 3, 4]),
            (0x06, 0x47, vec![3, 1]),
            (0x06, 0x40, vec![1, 0x42, 0x44]),
            (0x06, 0x40, vec![1, 0x82, 0x84]),
        ];
        assert_eq!(wire, expect);
        // Only the lock requests may be refused.
        assert!(reqs.iter().filter(|r| !r.tolerate.is_empty()).all(|r| r.data[1] == LAN_SET_IN_PROGRESS));
    }

    #[test]
    fn long_passwords_use_the_twenty_byte_form_and_no_gateway_is_not_written() {
        let mut p = plan();
        p.password = Secret("0123456789abcdefghij".into());
        p.gateway = None;
        p.prefix = 24;
        let reqs = setup_requests(&Target::from_plan(&p).unwrap());
        let pw = reqs.iter().find(|r| r.cmd == CMD_SET_USER_PASSWORD && r.data[1] == PW_SET).unwrap();
        assert_eq!(pw.data[0], 0x83);
        assert_eq!(&pw.data[2..], b"0123456789abcdefghij");
        assert!(!reqs.iter().any(|r| r.cmd == CMD_SET_LAN_CONFIG && r.data[1] == LAN_DEFAULT_GATEWAY));
        let mask = reqs.iter().find(|r| r.cmd == CMD_SET_LAN_CONFIG && r.data[1] == LAN_SUBNET_MASK).unwrap();
        assert_eq!(&mask.data[2..], &[255, 255, 255, 0]);
    }

    #[test]
    fn bad_setups_are_refused_naming_the_field() {
        type Change = fn(&mut PlanBmc);
        let cases: Vec<(Change, BmcError)> = vec![
            (|p| p.ip = None, BmcError::NoAddress),
            (|p| p.userid = 1, BmcError::UserId(1)),
            (|p| p.user = "a-user-name-too-long".into(), BmcError::UserName("a-user-name-too-long".into())),
            (|p| p.password = Secret("x".repeat(21)), BmcError::Password),
            (|p| p.password = Secret(String::new()), BmcError::Password),
            (|p| p.netchannel = 16, BmcError::Channel(16)),
            (|p| p.prefix = 0, BmcError::Prefix(0)),
            (|p| p.protocol = BmcProtocol::Redfish, BmcError::Protocol(BmcProtocol::Redfish)),
        ];
        for (change, want) in cases {
            let mut p = plan();
            change(&mut p);
            assert_eq!(Target::from_plan(&p).unwrap_err(), want);
        }
    }

    #[test]
    fn the_password_never_prints() {
        let t = Target::from_plan(&plan()).unwrap();
        let all: Vec<IpmiRequest> = setup_requests(&t).into_iter().chain(readback_requests(&t)).collect();
        let text = format!("{all:?} {t:?} {:?}", plan());
        assert!(!text.contains("s3cr3t"), "{text}");
        // Nor as the hex of its bytes ('s', '3', 'c', 'r').
        assert!(!text.contains("73, 33, 63, 72"), "{text}");
        assert_eq!(all.iter().filter(|r| r.secret()).count(), 2);
    }

    #[test]
    fn configure_sets_up_the_fake_bmc_and_reads_it_back() {
        let os = RecordingOs::with_bmc(FakeBmc::default());
        let rb = configure(&os, &plan()).unwrap();
        assert_eq!(
            rb.to_string(),
            "channel 1 ip source static ip 10.148.0.10 netmask 255.255.0.0 gateway 10.148.255.254; \
             user 3 'admin' privilege admin ipmi messaging on; lan access always"
        );
        let bmc = os.bmc().unwrap();
        let user = &bmc.users[&3];
        assert!(user.enabled);
        assert_eq!(&user.password[..9], b"s3cr3t-pw");
        assert_eq!(bmc.channel_access[&1], (0x02, 0x02));
        let calls = os.calls();
        let ipmi: Vec<&OsCall> = calls.iter().filter(|c| matches!(c, OsCall::Ipmi { .. })).collect();
        assert_eq!(ipmi.len(), 13 + 8);
        // The recording keeps the password out too.
        assert!(!format!("{calls:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_bmc_without_the_set_in_progress_lock_is_still_set_up() {
        let mut fake = FakeBmc::default();
        fake.refuse.push((NETFN_TRANSPORT, CMD_SET_LAN_CONFIG, Some(LAN_SET_IN_PROGRESS), 0x80));
        let os = RecordingOs::with_bmc(fake);
        assert!(configure(&os, &plan()).is_ok());
    }

    #[test]
    fn refusals_and_wrong_read_backs_fail_naming_the_step() {
        let mut fake = FakeBmc::default();
        fake.refuse.push((NETFN_APP, CMD_SET_USER_ACCESS, None, 0xd4));
        let err = configure(&RecordingOs::with_bmc(fake), &plan()).unwrap_err();
        assert_eq!(err, BmcError::Refused { what: "set the user access", code: 0xd4 });
        assert_eq!(err.to_string(), "bmc refused to set the user access: completion code 0xd4");

        // A BMC that keeps its old address: the read-back says so.
        let t = Target::from_plan(&plan()).unwrap();
        let reads = readback_requests(&t);
        let mut fake = FakeBmc::default();
        for r in setup_requests(&t) {
            fake.handle(r.netfn, r.cmd, &r.data);
        }
        fake.lan.insert((1, LAN_IP_ADDRESS), vec![10, 148, 0, 99]);
        let resps: Vec<Vec<u8>> = reads.iter().map(|r| fake.handle(r.netfn, r.cmd, &r.data)).collect();
        let err = judge_readback(&t, &reads, &resps).unwrap_err();
        assert_eq!(err, BmcError::Mismatch("ip 10.148.0.99 (want 10.148.0.10)".into()));

        // A wrong password (as the BMC judges it) fails too.
        fake.users.get_mut(&3).unwrap().password = b"other".to_vec();
        let resps: Vec<Vec<u8>> = reads.iter().map(|r| fake.handle(r.netfn, r.cmd, &r.data)).collect();
        assert!(matches!(
            judge_readback(&t, &reads, &resps),
            Err(BmcError::Refused { what: "test the user password", code: 0x80 })
        ));

        // No ipmi device at all.
        let err = configure(&RecordingOs::new(false, None), &plan()).unwrap_err();
        assert!(matches!(err, BmcError::Device(_)), "{err}");
    }
}
