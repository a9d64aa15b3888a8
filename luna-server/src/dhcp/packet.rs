//! DHCPv4 wire format on top of `dhcproto`: tolerant decoding, deterministic encoding.
//!
//! Why not `Message::decode`/`to_vec` alone: dhcproto stops reading options at the first one it
//! cannot parse (a non-UTF-8 host name drops everything after it), keeps options in a hash map
//! (random order on the wire) and re-encodes the relay agent option from its own parse (sub-option
//! order and unknown details may change). Relays need option 82 back byte for byte, and some PXE
//! ROMs want the message type first, so both directions are handled here.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, DhcpOptions, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Encodable};
use luna_core::MacAddr;

use super::DhcpError;

/// The fixed BOOTP header plus the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
/// BOOTP's minimum message size; some PXE ROMs drop shorter replies.
const MIN_REPLY_LEN: usize = 300;
const OPT_PAD: u8 = 0;
const OPT_END: u8 = 255;
const OPT_RELAY_AGENT: u8 = 82;

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub message: Message,
    /// The raw body of option 82 (relay agent information), echoed unchanged in replies.
    pub relay_info: Option<Vec<u8>>,
}

impl Request {
    /// Decodes a datagram. Options that do not parse are skipped, not fatal.
    pub fn decode(bytes: &[u8]) -> Result<Request, DhcpError> {
        if bytes.len() < HEADER_LEN {
            return Err(DhcpError::Malformed(format!("{} bytes is shorter than the 240-byte header", bytes.len())));
        }
        if bytes[236..240] != MAGIC {
            return Err(DhcpError::Malformed(format!("magic cookie {:?} is not 99.130.83.99", &bytes[236..240])));
        }
        // Header only: the options are decoded below, one by one.
        let mut message = Message::from_bytes(&bytes[..HEADER_LEN]).map_err(|e| DhcpError::Malformed(e.to_string()))?;

        // RFC 3396: all instances of a code form one option, in order.
        let mut raw: BTreeMap<u8, Vec<u8>> = BTreeMap::new();
        let mut order: Vec<u8> = Vec::new();
        let mut i = HEADER_LEN;
        while i < bytes.len() {
            let code = bytes[i];
            if code == OPT_END {
                break;
            }
            if code == OPT_PAD {
                i += 1;
                continue;
            }
            let Some(&len) = bytes.get(i + 1) else { break };
            let end = i + 2 + len as usize;
            let Some(data) = bytes.get(i + 2..end) else { break };
            if !raw.contains_key(&code) {
                order.push(code);
            }
            raw.entry(code).or_default().extend_from_slice(data);
            i = end;
        }

        let mut opts = DhcpOptions::new();
        let mut relay_info = None;
        for code in order {
            let data = &raw[&code];
            if code == OPT_RELAY_AGENT {
                relay_info = Some(data.clone());
            }
            if !length_is_sound(code, data.len()) {
                tracing::debug!(code, len = data.len(), "dhcp: skipping an option of impossible length");
                continue;
            }
            let mut buf = Vec::with_capacity(data.len() + 4);
            encode_chunked(code, data, &mut buf);
            buf.push(OPT_END);
            match DhcpOption::from_bytes(&buf) {
                Ok(DhcpOption::End | DhcpOption::Pad) => {}
                Ok(opt) => {
                    opts.insert(opt);
                }
                Err(e) => tracing::debug!(code, error = %e, "dhcp: skipping an option that does not parse"),
            }
        }
        message.set_opts(opts);
        Ok(Request { message, relay_info })
    }

    /// Wraps a message built in code (tests, load generators); option 82 is taken as encoded.
    pub fn from_message(message: Message) -> Request {
        let relay_info = message.opts().get(OptionCode::RelayAgentInformation).and_then(|o| {
            let mut v = o.to_vec().ok()?;
            // Strip code and length: keep the body, as `decode` does.
            (v.len() >= 2).then(|| v.split_off(2))
        });
        Request { message, relay_info }
    }

    pub fn msg_type(&self) -> Option<MessageType> {
        self.message.opts().msg_type()
    }

    /// The client MAC, when the hardware is Ethernet.
    pub fn mac(&self) -> Option<MacAddr> {
        let m = &self.message;
        if m.hlen() != 6 {
            return None;
        }
        let c = m.chaddr();
        let mut out = [0u8; 6];
        out.copy_from_slice(c.get(..6)?);
        Some(MacAddr(out))
    }

    pub fn requested_ip(&self) -> Option<Ipv4Addr> {
        match self.message.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        }
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        match self.message.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
            _ => None,
        }
    }

    /// Option 93, the first architecture listed.
    pub fn client_arch(&self) -> Option<u16> {
        match self.message.opts().get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
            _ => None,
        }
    }

    /// A PXE ROM (vendor class `PXEClient…`) or anything announcing its architecture.
    pub fn is_pxe(&self) -> bool {
        let vendor = matches!(self.message.opts().get(OptionCode::ClassIdentifier), Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient"));
        vendor || self.client_arch().is_some()
    }

    /// iPXE says so in its user class (option 77) and sends its feature option 175.
    pub fn is_ipxe(&self) -> bool {
        let opts = self.message.opts();
        let user_class = matches!(opts.get(OptionCode::UserClass), Some(DhcpOption::UserClass(v)) if v.windows(4).any(|w| w == b"iPXE"));
        user_class || opts.get(OptionCode::Unknown(175)).is_some()
    }

    /// The host name the client sent (option 12), if it is printable.
    pub fn hostname(&self) -> Option<String> {
        match self.message.opts().get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h))
                if !h.is_empty() && h.len() <= 63 && h.chars().all(|c| c.is_ascii_graphic()) =>
            {
                Some(h.clone())
            }
            _ => None,
        }
    }
}

/// Whether dhcproto may be handed option `code` with a body of `len` bytes.
///
/// dhcproto 0.12 checks these lengths with `debug_assert!` (or subtracts from them unchecked), so
/// a fuzzed option panicked in debug builds (1 964 times in 25 000 packets, each dropping the
/// request) and decoded garbage or failed in release builds. They are refused here, before
/// dhcproto sees them, so both builds skip such an option alike. The lengths are the RFCs':
/// rapid commit (RFC 4039) is empty, the client network interface identifier (RFC 4578) is 3
/// bytes, the bulk leasequery times (RFC 6926) are 4, its status code needs its code byte, and
/// the client FQDN (RFC 4702) its flags and two rcodes.
pub fn length_is_sound(code: u8, len: usize) -> bool {
    match OptionCode::from(code) {
        OptionCode::RapidCommit => len == 0,
        OptionCode::ClientNetworkInterface => len == 3,
        OptionCode::BulkLeaseQueryBaseTime
        | OptionCode::BulkLeasQueryStartTimeOfState
        | OptionCode::BulkLeaseQueryQueryStartTime
        | OptionCode::BulkLeaseQueryQueryEndTime => len == 4,
        OptionCode::BulkLeaseQueryStatusCode => len >= 1,
        OptionCode::ClientFQDN => len >= 3,
        _ => true,
    }
}

/// Where a reply goes (RFC 2131 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// To the relay agent at `giaddr`, on the server port.
    Relay(SocketAddrV4),
    /// To an address the client already has (`ciaddr`).
    Unicast(SocketAddrV4),
    /// To an address the client does not have yet: the kernel is told `ip` is at `mac` first,
    /// since the client cannot answer ARP. Falls back to broadcast if that fails.
    Hardware { ip: Ipv4Addr, mac: MacAddr, port: u16 },
    /// To 255.255.255.255 on the client port, out of the receiving interface.
    Broadcast(u16),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub message: Message,
    /// Raw option 82 body, appended last (relayed requests only).
    pub relay_info: Option<Vec<u8>>,
    pub destination: Destination,
}

impl Reply {
    pub fn msg_type(&self) -> Option<MessageType> {
        self.message.opts().msg_type()
    }
}

/// Encodes a reply: header, message type, server identifier, the other options by code,
/// option 82 last, end, padded to 300 bytes.
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, DhcpError> {
    let bad = |e: dhcproto::error::EncodeError| DhcpError::Malformed(format!("reply does not encode: {e}"));
    let mut header = reply.message.clone();
    header.set_opts(DhcpOptions::new());
    let mut out = header.to_vec().map_err(bad)?;
    debug_assert_eq!(out.len(), HEADER_LEN);

    let opts = reply.message.opts();
    let first = [OptionCode::MessageType, OptionCode::ServerIdentifier];
    for code in first {
        if let Some(o) = opts.get(code) {
            out.extend(o.to_vec().map_err(bad)?);
        }
    }
    let mut rest: Vec<_> = opts
        .iter()
        .filter(|(c, _)| {
            !first.contains(c)
                && **c != OptionCode::RelayAgentInformation
                && **c != OptionCode::End
                && **c != OptionCode::Pad
        })
        .collect();
    rest.sort_by_key(|(c, _)| u8::from(**c));
    for (_, o) in rest {
        out.extend(o.to_vec().map_err(bad)?);
    }
    if let Some(body) = &reply.relay_info {
        encode_chunked(OPT_RELAY_AGENT, body, &mut out);
    }
    out.push(OPT_END);
    if out.len() < MIN_REPLY_LEN {
        out.resize(MIN_REPLY_LEN, OPT_PAD);
    }
    Ok(out)
}

/// Writes `code` with `data`, split into 255-byte pieces (RFC 3396).
fn encode_chunked(code: u8, data: &[u8], out: &mut Vec<u8>) {
    if data.is_empty() {
        out.extend([code, 0]);
    }
    for chunk in data.chunks(255) {
        out.push(code);
        out.push(chunk.len() as u8);
        out.extend_from_slice(chunk);
    }
}

/// Builders for client messages: the unit tests use them, and so can a load generator.
pub mod client {
    use super::*;
    use dhcproto::v4::{Architecture, Flags};

    /// Options of impossible length, each of which made dhcproto's `debug_assert!`s fire (or
    /// an unchecked `len - n` subtract below zero) in debug builds: what `Request::decode`
    /// must skip. The unit tests and the attack test send them.
    pub const BAD_OPTIONS: [&[u8]; 8] = [
        &[80, 1, 0],
        &[94, 2, 1, 2],
        &[152, 1, 0],
        &[153, 5, 0, 0, 0, 0, 0],
        &[154, 0],
        &[155, 3, 1, 2, 3],
        &[151, 0],
        &[81, 2, 0, 0],
    ];

    /// A bare client message of `kind` from `mac`.
    pub fn message(kind: MessageType, mac: MacAddr, xid: u32) -> Message {
        let z = Ipv4Addr::UNSPECIFIED;
        let mut m = Message::new_with_id(xid, z, z, z, z, &mac.0);
        m.set_opcode(Opcode::BootRequest);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m
    }

    pub fn discover(mac: MacAddr, xid: u32) -> Message {
        message(MessageType::Discover, mac, xid)
    }

    /// REQUEST in SELECTING state: answering `server`'s offer of `ip`.
    pub fn request_selecting(mac: MacAddr, xid: u32, ip: Ipv4Addr, server: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Request, mac, xid);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        m
    }

    /// REQUEST in INIT-REBOOT state: asking for a remembered `ip`.
    pub fn request_init_reboot(mac: MacAddr, xid: u32, ip: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Request, mac, xid);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m
    }

    /// REQUEST in RENEWING/REBINDING state: extending the lease on `ciaddr`.
    pub fn request_renew(mac: MacAddr, xid: u32, ciaddr: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Request, mac, xid);
        m.set_ciaddr(ciaddr);
        m
    }

    pub fn release(mac: MacAddr, xid: u32, ciaddr: Ipv4Addr, server: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Release, mac, xid);
        m.set_ciaddr(ciaddr);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        m
    }

    pub fn decline(mac: MacAddr, xid: u32, ip: Ipv4Addr, server: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Decline, mac, xid);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(server));
        m
    }

    pub fn inform(mac: MacAddr, xid: u32, ciaddr: Ipv4Addr) -> Message {
        let mut m = message(MessageType::Inform, mac, xid);
        m.set_ciaddr(ciaddr);
        m
    }

    /// Marks a message as coming from a PXE ROM of architecture `arch` (0 BIOS, 7/9 UEFI).
    pub fn pxe(mut m: Message, arch: u16) -> Message {
        m.opts_mut().insert(DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes()));
        m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(Architecture::from(arch)));
        m
    }

    /// Marks a message as coming from iPXE.
    pub fn ipxe(m: Message, arch: u16) -> Message {
        let mut m = pxe(m, arch);
        m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        m
    }

    /// Sets the broadcast flag.
    pub fn broadcast(mut m: Message) -> Message {
        m.set_flags(Flags::default().set_broadcast());
        m
    }

    /// Makes the message look relayed by `giaddr`.
    pub fn relayed(mut m: Message, giaddr: Ipv4Addr) -> Message {
        m.set_giaddr(giaddr);
        m.set_hops(1);
        m
    }

    /// Encodes a client message for the wire, options in code order, option 82 (`relay_info`
    /// raw body) last.
    pub fn encode(m: &Message, relay_info: Option<&[u8]>) -> Vec<u8> {
        let reply = Reply {
            message: m.clone(),
            relay_info: relay_info.map(<[u8]>::to_vec),
            destination: Destination::Broadcast(67),
        };
        encode_reply(&reply).expect("client messages built here always encode")
    }
}

/// The DHCP message type (option 53) of a raw datagram, lower-case, for the packet counters:
/// a scan of the options (no decoding of the rest, so counting costs nothing on the packet
/// path); `unknown` when the datagram has no readable type.
pub fn message_type_name(bytes: &[u8]) -> &'static str {
    const COOKIE: [u8; 4] = [99, 130, 83, 99];
    if bytes.len() < HEADER_LEN || bytes[HEADER_LEN - 4..HEADER_LEN] != COOKIE {
        return "unknown";
    }
    let mut i = HEADER_LEN;
    while i < bytes.len() {
        match bytes[i] {
            0 => i += 1,
            255 => break,
            code => {
                let Some(&len) = bytes.get(i + 1) else { break };
                if code == 53 && len == 1 {
                    return match bytes.get(i + 2) {
                        Some(1) => "discover",
                        Some(2) => "offer",
                        Some(3) => "request",
                        Some(4) => "decline",
                        Some(5) => "ack",
                        Some(6) => "nak",
                        Some(7) => "release",
                        Some(8) => "inform",
                        _ => "unknown",
                    };
                }
                i += 2 + usize::from(len);
            }
        }
    }
    "unknown"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac() -> MacAddr {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn decode_skips_a_bad_option_and_keeps_the_rest() {
        let m = client::pxe(client::discover(mac(), 7), 9);
        let mut bytes = client::encode(&m, None);
        // Put a non-UTF-8 host name (dhcproto cannot parse it) right after the header.
        let bad = [12u8, 2, 0xff, 0xfe];
        bytes.splice(HEADER_LEN..HEADER_LEN, bad);
        let r = Request::decode(&bytes).unwrap();
        assert_eq!(r.msg_type(), Some(MessageType::Discover));
        assert_eq!(r.client_arch(), Some(9));
        assert!(r.is_pxe() && !r.is_ipxe());
        assert_eq!(r.hostname(), None);
        assert_eq!(r.mac(), Some(mac()));
        assert_eq!(r.message.xid(), 7);
    }

    #[test]
    fn options_of_impossible_length_are_skipped_in_every_build() {
        let m = client::pxe(client::discover(mac(), 7), 9);
        let good = client::encode(&m, None);
        for opt in client::BAD_OPTIONS {
            let mut bytes = good.clone();
            bytes.splice(HEADER_LEN..HEADER_LEN, opt.iter().copied());
            let r = Request::decode(&bytes).unwrap();
            assert_eq!(r.msg_type(), Some(MessageType::Discover), "{opt:?}");
            assert_eq!(r.client_arch(), Some(9), "{opt:?}");
            assert!(r.message.opts().get(OptionCode::from(opt[0])).is_none(), "{opt:?}");
        }
        // The same options with their proper lengths still decode.
        assert!(length_is_sound(80, 0) && length_is_sound(94, 3) && length_is_sound(81, 3));
        let mut bytes = good.clone();
        bytes.splice(HEADER_LEN..HEADER_LEN, [94u8, 3, 1, 2, 0]);
        let r = Request::decode(&bytes).unwrap();
        assert!(r.message.opts().get(OptionCode::ClientNetworkInterface).is_some());
    }

    #[test]
    fn decode_concatenates_split_options_and_keeps_option_82_raw() {
        let m = client::discover(mac(), 1);
        // Sub-options deliberately out of numeric order, plus an unknown one (9).
        let relay = vec![2u8, 3, b'r', b'i', b'd', 9, 2, 0xaa, 0xbb, 1, 4, b'p', b'o', b'r', b't'];
        let mut bytes = client::encode(&m, Some(&relay));
        // A host name sent in two pieces.
        let split = [12u8, 3, b'n', b'o', b'd', 12, 2, b'e', b'1'];
        bytes.splice(HEADER_LEN..HEADER_LEN, split);
        let r = Request::decode(&bytes).unwrap();
        assert_eq!(r.hostname().as_deref(), Some("node1"));
        assert_eq!(r.relay_info.as_deref(), Some(&relay[..]));
    }

    #[test]
    fn decode_rejects_short_and_non_dhcp_packets() {
        let e = Request::decode(&[0u8; 100]).unwrap_err().to_string();
        assert!(e.contains("100 bytes"), "{e}");
        let mut bytes = client::encode(&client::discover(mac(), 1), None);
        bytes[236] = 1;
        assert!(Request::decode(&bytes).unwrap_err().to_string().contains("magic cookie"));
    }

    #[test]
    fn ipxe_is_recognised_by_user_class_or_option_175() {
        let r = Request::from_message(client::ipxe(client::discover(mac(), 1), 0));
        assert!(r.is_ipxe());
        let mut m = client::discover(mac(), 1);
        m.opts_mut()
            .insert(DhcpOption::Unknown(dhcproto::v4::UnknownOption::new(OptionCode::Unknown(175), vec![1, 1, 1])));
        let bytes = client::encode(&m, None);
        assert!(Request::decode(&bytes).unwrap().is_ipxe());
        assert!(!Request::from_message(client::discover(mac(), 1)).is_ipxe());
    }

    #[test]
    fn replies_are_deterministic_type_first_relay_last_and_padded() {
        let mut m = client::discover(mac(), 1);
        m.opts_mut().insert(DhcpOption::ServerIdentifier("10.0.0.1".parse().unwrap()));
        m.opts_mut().insert(DhcpOption::Router(vec!["10.0.0.254".parse().unwrap()]));
        m.opts_mut().insert(DhcpOption::SubnetMask("255.255.255.0".parse().unwrap()));
        m.opts_mut().insert(DhcpOption::InterfaceMtu(9000));
        let relay = vec![1u8, 2, 7, 7];
        let reply = Reply { message: m, relay_info: Some(relay.clone()), destination: Destination::Broadcast(68) };
        let a = encode_reply(&reply).unwrap();
        assert_eq!(a, encode_reply(&reply).unwrap());
        assert_eq!(a.len(), MIN_REPLY_LEN);
        let codes: Vec<u8> = {
            let mut v = Vec::new();
            let mut i = HEADER_LEN;
            while a[i] != OPT_END {
                v.push(a[i]);
                i += 2 + a[i + 1] as usize;
            }
            v
        };
        assert_eq!(codes, [53, 54, 1, 3, 26, 82]);
        let back = Request::decode(&a).unwrap();
        assert_eq!(back.relay_info, Some(relay));
        assert_eq!(back.server_id(), Some("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn message_type_name_reads_option_53_only() {
        let mac: MacAddr = "52:54:00:00:00:01".parse().unwrap();
        for (kind, name) in
            [(MessageType::Discover, "discover"), (MessageType::Request, "request"), (MessageType::Release, "release")]
        {
            let mut m = client::message(kind, mac, 7);
            // Another option, so the scan may have to step over it.
            m.opts_mut().insert(DhcpOption::Hostname("node001".into()));
            let bytes = client::encode(&m, None);
            assert_eq!(message_type_name(&bytes), name);
        }
        assert_eq!(message_type_name(&[0u8; 100]), "unknown");
        let mut no_cookie = client::encode(&client::discover(mac, 7), None);
        no_cookie[236] = 0;
        assert_eq!(message_type_name(&no_cookie), "unknown");
        // A truncated option list ends the scan.
        let mut cut = vec![0u8; HEADER_LEN];
        cut[236..240].copy_from_slice(&[99, 130, 83, 99]);
        cut.extend([12, 200, b'x']);
        assert_eq!(message_type_name(&cut), "unknown");
    }
}
