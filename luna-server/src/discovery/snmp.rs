//! SNMP v2c messages (RFC 3416 PDUs in RFC 1157/1901 framing), BER-encoded and decoded sans-IO.
//!
//! Hand-rolled, and why: the crates checked on crates.io (December 2026) either keep their
//! encoder private to a session that owns the socket (`snmp2` 0.5.3: `pdu::build_getbulk` is
//! `pub(crate)`, `AsyncSession` has no timeout and turns a late answer to an earlier request
//! into an error instead of skipping it), or are synchronous only (`snmp` 0.2). luna needs the
//! codec without a socket (the walk is tested without one, the benchmark's simulated switches
//! answer with the same codec) and needs to skip stale answers after a retry. What a manager
//! needs of v2c is small: one message shape, nine value types; this file is that, with the
//! decoder bounded (lengths checked against the buffer, no recursion beyond the fixed shape).

use std::fmt;
use std::str::FromStr;

/// An object identifier, as its arcs.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Oid(pub Vec<u32>);

impl Oid {
    pub fn starts_with(&self, prefix: &Oid) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The arcs after `prefix` (empty when `self` is not below it).
    pub fn suffix(&self, prefix: &Oid) -> &[u32] {
        self.0.strip_prefix(prefix.0.as_slice()).unwrap_or(&[])
    }

    pub fn child(&self, arcs: &[u32]) -> Oid {
        let mut v = self.0.clone();
        v.extend_from_slice(arcs);
        Oid(v)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write!(f, "{a}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid oid '{0}': expected numeric arcs like 1.3.6.1.2.1.17.7.1.2.2.1.2")]
pub struct OidParseError(pub String);

impl FromStr for Oid {
    type Err = OidParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || OidParseError(s.to_string());
        let arcs: Result<Vec<u32>, _> = s.trim_start_matches('.').split('.').map(str::parse::<u32>).collect();
        let arcs = arcs.map_err(|_| err())?;
        if arcs.len() < 2 || arcs[0] > 2 || (arcs[0] < 2 && arcs[1] >= 40) {
            return Err(err());
        }
        Ok(Oid(arcs))
    }
}

/// A varbind's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Integer(i64),
    OctetString(Vec<u8>),
    Null,
    Oid(Oid),
    IpAddress([u8; 4]),
    Counter32(u32),
    Gauge32(u32),
    TimeTicks(u32),
    Opaque(Vec<u8>),
    Counter64(u64),
    NoSuchObject,
    NoSuchInstance,
    EndOfMibView,
}

/// The PDU kinds luna sends or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PduType {
    Get,
    GetNext,
    Response,
    Set,
    GetBulk,
    Report,
}

impl PduType {
    fn tag(self) -> u8 {
        match self {
            PduType::Get => 0xa0,
            PduType::GetNext => 0xa1,
            PduType::Response => 0xa2,
            PduType::Set => 0xa3,
            PduType::GetBulk => 0xa5,
            PduType::Report => 0xa8,
        }
    }

    fn from_tag(t: u8) -> Option<Self> {
        Some(match t {
            0xa0 => PduType::Get,
            0xa1 => PduType::GetNext,
            0xa2 => PduType::Response,
            0xa3 => PduType::Set,
            0xa5 => PduType::GetBulk,
            0xa8 => PduType::Report,
            _ => return None,
        })
    }
}

/// SNMP version field: v2c.
pub const VERSION_2C: i64 = 1;

/// One v2c message. For GETBULK, `error_status` and `error_index` carry non-repeaters and
/// max-repetitions (RFC 3416 4.2.3).
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub community: Vec<u8>,
    pub pdu: PduType,
    pub request_id: i32,
    pub error_status: i64,
    pub error_index: i64,
    pub varbinds: Vec<(Oid, Value)>,
}

impl fmt::Debug for Message {
    // The community is a password: never in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("community", &"***")
            .field("pdu", &self.pdu)
            .field("request_id", &self.request_id)
            .field("error_status", &self.error_status)
            .field("error_index", &self.error_index)
            .field("varbinds", &self.varbinds)
            .finish()
    }
}

impl Message {
    /// A GETBULK request for the rows after each of `oids`.
    pub fn get_bulk(community: &[u8], request_id: i32, max_repetitions: u32, oids: &[Oid]) -> Message {
        Message {
            community: community.to_vec(),
            pdu: PduType::GetBulk,
            request_id,
            error_status: 0,
            error_index: i64::from(max_repetitions),
            varbinds: oids.iter().map(|o| (o.clone(), Value::Null)).collect(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut pdu = Vec::with_capacity(64 + self.varbinds.len() * 32);
        tlv(&mut pdu, 0x02, &int_bytes(i64::from(self.request_id)));
        tlv(&mut pdu, 0x02, &int_bytes(self.error_status));
        tlv(&mut pdu, 0x02, &int_bytes(self.error_index));
        let mut list = Vec::with_capacity(self.varbinds.len() * 32);
        for (oid, value) in &self.varbinds {
            let mut vb = Vec::with_capacity(32);
            tlv(&mut vb, 0x06, &oid_bytes(oid));
            encode_value(&mut vb, value);
            tlv(&mut list, 0x30, &vb);
        }
        tlv(&mut pdu, 0x30, &list);
        let mut msg = Vec::with_capacity(pdu.len() + 32);
        tlv(&mut msg, 0x02, &int_bytes(VERSION_2C));
        tlv(&mut msg, 0x04, &self.community);
        tlv(&mut msg, self.pdu.tag(), &pdu);
        let mut out = Vec::with_capacity(msg.len() + 4);
        tlv(&mut out, 0x30, &msg);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
        let mut outer = Reader(bytes);
        let mut msg = Reader(outer.expect(0x30, "message")?);
        let version = msg.integer("version")?;
        if version != VERSION_2C {
            return Err(DecodeError::Version(version));
        }
        let community = msg.expect(0x04, "community")?.to_vec();
        let (tag, body) = msg.any("pdu")?;
        let pdu = PduType::from_tag(tag).ok_or(DecodeError::Tag { what: "pdu", tag })?;
        let mut p = Reader(body);
        let request_id = i32::try_from(p.integer("request-id")?).map_err(|_| DecodeError::Range("request-id"))?;
        let error_status = p.integer("error-status")?;
        let error_index = p.integer("error-index")?;
        let mut list = Reader(p.expect(0x30, "varbind list")?);
        let mut varbinds = Vec::new();
        while !list.0.is_empty() {
            let mut vb = Reader(list.expect(0x30, "varbind")?);
            let oid = decode_oid(vb.expect(0x06, "varbind name")?)?;
            let (tag, raw) = vb.any("varbind value")?;
            varbinds.push((oid, decode_value(tag, raw)?));
        }
        Ok(Message { community, pdu, request_id, error_status, error_index, varbinds })
    }
}

/// What is wrong with a datagram that should have been an SNMP v2c message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("unexpected tag 0x{tag:02x} for {what}")]
    Tag { what: &'static str, tag: u8 },
    #[error("{0} out of range")]
    Range(&'static str),
    #[error("not snmp v2c (version field {0})")]
    Version(i64),
    #[error("malformed oid")]
    Oid,
}

fn tlv(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    let n = body.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes = (n as u64).to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (8 - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(body);
}

/// Minimal two's complement.
fn int_bytes(v: i64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut i = 0;
    while i < 7 && ((b[i] == 0 && b[i + 1] & 0x80 == 0) || (b[i] == 0xff && b[i + 1] & 0x80 != 0)) {
        i += 1;
    }
    b[i..].to_vec()
}

/// Minimal unsigned (application types are unsigned, so a leading zero keeps them positive).
fn uint_bytes(v: u64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let mut i = 0;
    while i < 7 && b[i] == 0 && b[i + 1] & 0x80 == 0 {
        i += 1;
    }
    if i == 0 && b[0] & 0x80 != 0 {
        let mut v = vec![0];
        v.extend_from_slice(&b);
        return v;
    }
    b[i..].to_vec()
}

fn oid_bytes(oid: &Oid) -> Vec<u8> {
    let arcs = &oid.0;
    let mut out = Vec::with_capacity(arcs.len() + 4);
    let (first, rest) = match arcs.len() {
        0 => (0u64, &arcs[..]),
        1 => (u64::from(arcs[0]) * 40, &arcs[1..]),
        _ => (u64::from(arcs[0]) * 40 + u64::from(arcs[1]), &arcs[2..]),
    };
    base128(&mut out, first);
    for a in rest {
        base128(&mut out, u64::from(*a));
    }
    out
}

fn base128(out: &mut Vec<u8>, v: u64) {
    let mut groups = [0u8; 10];
    let mut n = 0;
    let mut v = v;
    loop {
        groups[n] = (v & 0x7f) as u8;
        n += 1;
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    for i in (0..n).rev() {
        out.push(groups[i] | if i > 0 { 0x80 } else { 0 });
    }
}

fn encode_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Integer(i) => tlv(out, 0x02, &int_bytes(*i)),
        Value::OctetString(s) => tlv(out, 0x04, s),
        Value::Null => tlv(out, 0x05, &[]),
        Value::Oid(o) => tlv(out, 0x06, &oid_bytes(o)),
        Value::IpAddress(a) => tlv(out, 0x40, a),
        Value::Counter32(c) => tlv(out, 0x41, &uint_bytes(u64::from(*c))),
        Value::Gauge32(c) => tlv(out, 0x42, &uint_bytes(u64::from(*c))),
        Value::TimeTicks(c) => tlv(out, 0x43, &uint_bytes(u64::from(*c))),
        Value::Opaque(s) => tlv(out, 0x44, s),
        Value::Counter64(c) => tlv(out, 0x46, &uint_bytes(*c)),
        Value::NoSuchObject => tlv(out, 0x80, &[]),
        Value::NoSuchInstance => tlv(out, 0x81, &[]),
        Value::EndOfMibView => tlv(out, 0x82, &[]),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn any(&mut self, what: &'static str) -> Result<(u8, &'a [u8]), DecodeError> {
        let b = self.0;
        if b.len() < 2 {
            return Err(DecodeError::Truncated(what));
        }
        let tag = b[0];
        if tag & 0x1f == 0x1f {
            // High tag numbers never occur in SNMP.
            return Err(DecodeError::Tag { what, tag });
        }
        let (len, hdr) = if b[1] < 0x80 {
            (usize::from(b[1]), 2)
        } else {
            let n = usize::from(b[1] & 0x7f);
            if n == 0 || n > 4 || b.len() < 2 + n {
                return Err(DecodeError::Truncated(what));
            }
            let len = b[2..2 + n].iter().fold(0usize, |acc, x| (acc << 8) | usize::from(*x));
            (len, 2 + n)
        };
        let end = hdr.checked_add(len).filter(|e| *e <= b.len()).ok_or(DecodeError::Truncated(what))?;
        self.0 = &b[end..];
        Ok((tag, &b[hdr..end]))
    }

    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (t, body) = self.any(what)?;
        if t != tag {
            return Err(DecodeError::Tag { what, tag: t });
        }
        Ok(body)
    }

    fn integer(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        decode_int(self.expect(0x02, what)?, what)
    }
}

fn decode_int(raw: &[u8], what: &'static str) -> Result<i64, DecodeError> {
    if raw.is_empty() || raw.len() > 8 {
        return Err(DecodeError::Range(what));
    }
    let mut v: i64 = if raw[0] & 0x80 != 0 { -1 } else { 0 };
    for b in raw {
        v = (v << 8) | i64::from(*b);
    }
    Ok(v)
}

fn decode_uint(raw: &[u8], what: &'static str, max: u64) -> Result<u64, DecodeError> {
    let raw = if raw.len() > 1 && raw[0] == 0 { &raw[1..] } else { raw };
    if raw.is_empty() || raw.len() > 8 {
        return Err(DecodeError::Range(what));
    }
    let v = raw.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    if v > max {
        return Err(DecodeError::Range(what));
    }
    Ok(v)
}

fn decode_oid(raw: &[u8]) -> Result<Oid, DecodeError> {
    let mut arcs = Vec::with_capacity(raw.len() + 1);
    let mut acc: u64 = 0;
    let mut in_arc = false;
    for &b in raw {
        if !in_arc && b == 0x80 {
            return Err(DecodeError::Oid);
        }
        acc = (acc << 7) | u64::from(b & 0x7f);
        if acc > u64::from(u32::MAX) * 40 + 39 {
            return Err(DecodeError::Oid);
        }
        in_arc = b & 0x80 != 0;
        if !in_arc {
            if arcs.is_empty() {
                let first = (acc / 40).min(2);
                arcs.push(first as u32);
                arcs.push(u32::try_from(acc - first * 40).map_err(|_| DecodeError::Oid)?);
            } else {
                arcs.push(u32::try_from(acc).map_err(|_| DecodeError::Oid)?);
            }
            acc = 0;
        }
    }
    if in_arc || arcs.is_empty() {
        return Err(DecodeError::Oid);
    }
    Ok(Oid(arcs))
}

fn decode_value(tag: u8, raw: &[u8]) -> Result<Value, DecodeError> {
    const U32: u64 = u32::MAX as u64;
    Ok(match tag {
        0x02 => Value::Integer(decode_int(raw, "integer")?),
        0x04 => Value::OctetString(raw.to_vec()),
        0x05 => Value::Null,
        0x06 => Value::Oid(decode_oid(raw)?),
        0x40 => Value::IpAddress(raw.try_into().map_err(|_| DecodeError::Range("ip address"))?),
        0x41 => Value::Counter32(decode_uint(raw, "counter32", U32)? as u32),
        0x42 => Value::Gauge32(decode_uint(raw, "gauge32", U32)? as u32),
        0x43 => Value::TimeTicks(decode_uint(raw, "timeticks", U32)? as u32),
        0x44 => Value::Opaque(raw.to_vec()),
        0x46 => Value::Counter64(decode_uint(raw, "counter64", u64::MAX)?),
        0x80 => Value::NoSuchObject,
        0x81 => Value::NoSuchInstance,
        0x82 => Value::EndOfMibView,
        t => return Err(DecodeError::Tag { what: "varbind value", tag: t }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oid(s: &str) -> Oid {
        s.parse().unwrap()
    }

    #[test]
    fn get_bulk_encodes_to_the_rfc_layout() {
        // GETBULK, community "public", request id 0x1234, non-repeaters 0, max-repetitions 10,
        // one varbind 1.3.6.1.2.1.17.4.3.1.2 = NULL, written out by hand from X.690.
        let m = Message::get_bulk(b"public", 0x1234, 10, &[oid("1.3.6.1.2.1.17.4.3.1.2")]);
        let expected: &[u8] = &[
            0x30, 0x29, 0x02, 0x01, 0x01, 0x04, 0x06, b'p', b'u', b'b', b'l', b'i', b'c', 0xa5, 0x1c, 0x02, 0x02, 0x12,
            0x34, 0x02, 0x01, 0x00, 0x02, 0x01, 0x0a, 0x30, 0x10, 0x30, 0x0e, 0x06, 0x0a, 0x2b, 0x06, 0x01, 0x02, 0x01,
            0x11, 0x04, 0x03, 0x01, 0x02, 0x05, 0x00,
        ];
        assert_eq!(m.encode(), expected);
        assert_eq!(Message::decode(expected).unwrap(), m);
    }

    #[test]
    fn every_value_type_round_trips() {
        let values = vec![
            Value::Integer(0),
            Value::Integer(127),
            Value::Integer(128),
            Value::Integer(-1),
            Value::Integer(-129),
            Value::Integer(i64::MAX),
            Value::Integer(i64::MIN),
            Value::OctetString(b"Gi1/0/7".to_vec()),
            Value::OctetString(vec![0; 300]),
            Value::Null,
            Value::Oid(oid("1.3.6.1.4.1.9.1.1")),
            Value::IpAddress([10, 0, 0, 1]),
            Value::Counter32(u32::MAX),
            Value::Gauge32(0x80),
            Value::TimeTicks(12345),
            Value::Opaque(vec![1, 2]),
            Value::Counter64(u64::MAX),
            Value::NoSuchObject,
            Value::NoSuchInstance,
            Value::EndOfMibView,
        ];
        let m = Message {
            community: b"s3cret".to_vec(),
            pdu: PduType::Response,
            request_id: -5,
            error_status: 0,
            error_index: 0,
            varbinds: values
                .into_iter()
                .enumerate()
                .map(|(i, v)| (oid(&format!("1.3.6.1.{i}.4294967295")), v))
                .collect(),
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn known_bytes_decode() {
        // A Response from net-snmp: sysUpTime.0 = Timeticks 1000, community "public", id 1.
        let bytes: &[u8] = &[
            0x30, 0x29, 0x02, 0x01, 0x01, 0x04, 0x06, b'p', b'u', b'b', b'l', b'i', b'c', 0xa2, 0x1c, 0x02, 0x01, 0x01,
            0x02, 0x01, 0x00, 0x02, 0x01, 0x00, 0x30, 0x11, 0x30, 0x0f, 0x06, 0x08, 0x2b, 0x06, 0x01, 0x02, 0x01, 0x01,
            0x03, 0x00, 0x43, 0x03, 0x00, 0x03, 0xe8,
        ];
        let m = Message::decode(bytes).unwrap();
        assert_eq!(m.pdu, PduType::Response);
        assert_eq!(m.request_id, 1);
        assert_eq!(m.varbinds, vec![(oid("1.3.6.1.2.1.1.3.0"), Value::TimeTicks(1000))]);
        assert_eq!(m.community, b"public");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let good = Message::get_bulk(b"public", 7, 10, &[oid("1.3.6.1.2.1.17.4.3.1.2")]).encode();
        for cut in 0..good.len() {
            assert!(Message::decode(&good[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0xff;
            let _ = Message::decode(&bad); // must not panic
        }
        assert_eq!(Message::decode(b"\x30\x03\x02\x01\x00"), Err(DecodeError::Version(0)));
        assert!(Message::decode(b"\x30\x84\xff\xff\xff\xff").is_err());
    }

    #[test]
    fn oids_parse_and_print() {
        assert_eq!(oid(".1.3.6.1").to_string(), "1.3.6.1");
        assert!("1.3.x".parse::<Oid>().is_err());
        assert!("1".parse::<Oid>().is_err());
        assert!("1.40".parse::<Oid>().is_err());
        assert!(oid("1.3.6.1.2").starts_with(&oid("1.3.6")));
        assert_eq!(oid("1.3.6.1.2").suffix(&oid("1.3.6")), &[1, 2]);
        assert!(format!("{:?}", Message::get_bulk(b"s3cret", 1, 1, &[])).contains("***"));
        assert!(!format!("{:?}", Message::get_bulk(b"s3cret", 1, 1, &[])).contains("s3cret"));
    }
}
