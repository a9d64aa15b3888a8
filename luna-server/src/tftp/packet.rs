//! TFTP wire format (RFC 1350, options per RFC 2347): parsing and encoding, no I/O.

use std::fmt;

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// Block size when none is negotiated (RFC 1350).
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Most options a request may carry. Real clients send at most five (blksize, tsize, timeout,
/// windowsize, and iPXE's or PXE ROMs' multicast); a 65 KB datagram can carry ~14 000, and
/// before this cap and the linear parse one such request cost 1.45 s of CPU.
pub const MAX_OPTIONS: usize = 16;
/// Longest option name or value accepted (the longest real one, `windowsize`, is 10 bytes).
pub const MAX_OPTION_LEN: usize = 64;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// TFTP error codes (RFC 1350 section 5, code 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionNegotiation,
    /// A code outside 0..=8 as sent by a peer.
    Other(u16),
}

impl ErrorCode {
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTid => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionNegotiation => 8,
            ErrorCode::Other(c) => c,
        }
    }

    pub fn from_u16(c: u16) -> ErrorCode {
        match c {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTid,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionNegotiation,
            c => ErrorCode::Other(c),
        }
    }
}

/// Transfer mode of a request. `mail` is obsolete and refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The file name as sent: raw bytes, not yet checked in any way.
    pub filename: Vec<u8>,
    pub mode: Mode,
    /// Options in the order sent, names lower-cased (RFC 2347: case-insensitive); a repeated
    /// name keeps its first value.
    pub options: Vec<(String, String)>,
}

impl Request {
    /// The value of option `name` (lower-case), if the client sent it.
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// One parsed datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request),
    Wrq(Request),
    Data { block: u16, data: &'a [u8] },
    Ack(u16),
    Error { code: ErrorCode, message: String },
    Oack(Vec<(String, String)>),
}

/// Why a datagram could not be parsed; the text goes into the ERROR reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet too short ({0} bytes)")]
    TooShort(usize),
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("request is missing its {0} field or its terminating NUL")]
    MissingField(&'static str),
    #[error("unsupported transfer mode '{0}'")]
    UnsupportedMode(String),
    #[error("option '{0}' has no value")]
    OptionWithoutValue(String),
    #[error("option name or value is not ascii")]
    NonAsciiOption,
    #[error("request carries more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option name or value is longer than {MAX_OPTION_LEN} bytes")]
    OptionTooLong,
}

impl ParseError {
    /// The ERROR code this problem is answered with.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::IllegalOperation
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Splits `b` at the first NUL: `(field, rest after the NUL)`.
fn cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let end = b.iter().position(|&c| c == 0)?;
    Some((&b[..end], &b[end + 1..]))
}

fn ascii_string(b: &[u8]) -> Result<String, ParseError> {
    if !b.is_ascii() {
        return Err(ParseError::NonAsciiOption);
    }
    Ok(String::from_utf8_lossy(b).into_owned())
}

/// Parses `name\0value\0` pairs until the end of the packet: one pass over the bytes, at most
/// [`MAX_OPTIONS`] names kept (the duplicate check scans those few, so it is bounded too).
fn parse_options(mut b: &[u8]) -> Result<Vec<(String, String)>, ParseError> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut seen = 0usize;
    while !b.is_empty() {
        let (name, rest) = cstr(b).ok_or(ParseError::MissingField("option name"))?;
        if name.is_empty() {
            // Some clients pad requests with NULs; an empty name carries nothing.
            b = rest;
            continue;
        }
        seen += 1;
        if seen > MAX_OPTIONS {
            return Err(ParseError::TooManyOptions);
        }
        if name.len() > MAX_OPTION_LEN {
            return Err(ParseError::OptionTooLong);
        }
        let name = ascii_string(name)?.to_ascii_lowercase();
        let (value, rest) = cstr(rest).ok_or_else(|| ParseError::OptionWithoutValue(name.clone()))?;
        if value.len() > MAX_OPTION_LEN {
            return Err(ParseError::OptionTooLong);
        }
        let value = ascii_string(value)?;
        b = rest;
        if !out.iter().any(|(n, _)| *n == name) {
            out.push((name, value));
        }
    }
    Ok(out)
}

fn parse_request(body: &[u8]) -> Result<Request, ParseError> {
    let (filename, rest) = cstr(body).ok_or(ParseError::MissingField("filename"))?;
    let (mode, rest) = cstr(rest).ok_or(ParseError::MissingField("mode"))?;
    let mode = match mode.to_ascii_lowercase().as_slice() {
        b"octet" => Mode::Octet,
        b"netascii" => Mode::Netascii,
        other => return Err(ParseError::UnsupportedMode(String::from_utf8_lossy(other).into_owned())),
    };
    // Trailing garbage after a valid request is tolerated only as well-formed options.
    let options = parse_options(rest)?;
    Ok(Request { filename: filename.to_vec(), mode, options })
}

/// Parses one datagram.
pub fn parse(b: &[u8]) -> Result<Packet<'_>, ParseError> {
    if b.len() < 2 {
        return Err(ParseError::TooShort(b.len()));
    }
    let op = u16_at(b, 0);
    let body = &b[2..];
    match op {
        OP_RRQ => Ok(Packet::Rrq(parse_request(body)?)),
        OP_WRQ => Ok(Packet::Wrq(parse_request(body)?)),
        OP_DATA => {
            if b.len() < 4 {
                return Err(ParseError::TooShort(b.len()));
            }
            Ok(Packet::Data { block: u16_at(b, 2), data: &b[4..] })
        }
        OP_ACK => {
            if b.len() < 4 {
                return Err(ParseError::TooShort(b.len()));
            }
            Ok(Packet::Ack(u16_at(b, 2)))
        }
        OP_ERROR => {
            if b.len() < 4 {
                return Err(ParseError::TooShort(b.len()));
            }
            // Be lenient with the message: a missing NUL or odd bytes must not hide the error.
            let msg = &b[4..];
            let msg = cstr(msg).map(|(m, _)| m).unwrap_or(msg);
            Ok(Packet::Error {
                code: ErrorCode::from_u16(u16_at(b, 2)),
                message: String::from_utf8_lossy(msg).into_owned(),
            })
        }
        OP_OACK => Ok(Packet::Oack(parse_options(body)?)),
        other => Err(ParseError::UnknownOpcode(other)),
    }
}

/// Writes a DATA packet into `out` (cleared first); `data` is filled by `fill`, which gets a
/// zeroed slice of exactly `len` bytes.
pub fn encode_data_with<E>(
    out: &mut Vec<u8>,
    block: u16,
    len: usize,
    fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
) -> Result<(), E> {
    out.clear();
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
    out.resize(4 + len, 0);
    fill(&mut out[4..])
}

pub fn encode_data(out: &mut Vec<u8>, block: u16, data: &[u8]) {
    let r: Result<(), ()> = encode_data_with(out, block, data.len(), |b| {
        b.copy_from_slice(data);
        Ok(())
    });
    debug_assert!(r.is_ok());
}

pub fn encode_ack(out: &mut Vec<u8>, block: u16) {
    out.clear();
    out.extend_from_slice(&OP_ACK.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

pub fn encode_error(out: &mut Vec<u8>, code: ErrorCode, message: &str) {
    out.clear();
    out.extend_from_slice(&OP_ERROR.to_be_bytes());
    out.extend_from_slice(&code.to_u16().to_be_bytes());
    // The message is a C string: never let an embedded NUL cut it short or smuggle fields.
    out.extend(message.bytes().filter(|&c| c != 0));
    out.push(0);
}

pub fn encode_oack(out: &mut Vec<u8>, options: &[(String, String)]) {
    out.clear();
    out.extend_from_slice(&OP_OACK.to_be_bytes());
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

fn encode_request(out: &mut Vec<u8>, op: u16, filename: &[u8], mode: Mode, options: &[(String, String)]) {
    out.clear();
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(filename);
    out.push(0);
    out.extend_from_slice(match mode {
        Mode::Octet => b"octet",
        Mode::Netascii => b"netascii",
    });
    out.push(0);
    for (name, value) in options {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

/// Encodes a read request (used by clients: the benchmark's load generator and tests).
pub fn encode_rrq(out: &mut Vec<u8>, filename: &[u8], mode: Mode, options: &[(String, String)]) {
    encode_request(out, OP_RRQ, filename, mode, options)
}

/// Encodes a write request (tests only need it to check that it is refused).
pub fn encode_wrq(out: &mut Vec<u8>, filename: &[u8], mode: Mode, options: &[(String, String)]) {
    encode_request(out, OP_WRQ, filename, mode, options)
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Octet => "octet",
            Mode::Netascii => "netascii",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rrq_with_options_case_insensitively() {
        let raw = b"\x00\x01pxelinux.0\x00OcTeT\x00BLKSIZE\x001428\x00tsize\x000\x00blksize\x00512\x00";
        let Packet::Rrq(req) = parse(raw).unwrap() else { panic!("not an rrq") };
        assert_eq!(req.filename, b"pxelinux.0");
        assert_eq!(req.mode, Mode::Octet);
        // The repeated blksize keeps its first value.
        assert_eq!(req.options, vec![("blksize".into(), "1428".into()), ("tsize".into(), "0".into())]);
        assert_eq!(req.option("tsize"), Some("0"));
    }

    #[test]
    fn parses_netascii_and_wrq() {
        let Packet::Wrq(req) = parse(b"\x00\x02a\x00NetAscii\x00").unwrap() else { panic!("not a wrq") };
        assert_eq!(req.mode, Mode::Netascii);
        assert!(req.options.is_empty());
    }

    #[test]
    fn rejects_malformed_requests() {
        assert_eq!(parse(b"\x00"), Err(ParseError::TooShort(1)));
        assert_eq!(parse(b"\x00\x01file"), Err(ParseError::MissingField("filename")));
        assert_eq!(parse(b"\x00\x01file\x00octet"), Err(ParseError::MissingField("mode")));
        assert_eq!(parse(b"\x00\x01file\x00mail\x00"), Err(ParseError::UnsupportedMode("mail".into())));
        assert_eq!(
            parse(b"\x00\x01file\x00octet\x00blksize\x00"),
            Err(ParseError::OptionWithoutValue("blksize".into()))
        );
        assert_eq!(parse(b"\x00\x09"), Err(ParseError::UnknownOpcode(9)));
        assert_eq!(parse(b"\x00\x04\x00"), Err(ParseError::TooShort(3)));
    }

    #[test]
    fn option_count_and_length_are_capped() {
        let mut raw = b"\x00\x01f\x00octet\x00".to_vec();
        for i in 0..MAX_OPTIONS {
            raw.extend_from_slice(format!("x{i}\x001\x00").as_bytes());
        }
        let Packet::Rrq(req) = parse(&raw).unwrap() else { panic!("not an rrq") };
        assert_eq!(req.options.len(), MAX_OPTIONS);
        raw.extend_from_slice(b"blksize\x001468\x00");
        assert_eq!(parse(&raw), Err(ParseError::TooManyOptions));
        // Repeats count too: 13 921 copies of one option are refused, not deduplicated.
        let mut raw = b"\x00\x01f\x00octet\x00".to_vec();
        for _ in 0..13_921 {
            raw.extend_from_slice(b"a\x00b\x00");
        }
        assert_eq!(parse(&raw), Err(ParseError::TooManyOptions));
        let long = format!("\x00\x01f\x00octet\x00blksize\x00{}\x00", "1".repeat(MAX_OPTION_LEN + 1));
        assert_eq!(parse(long.as_bytes()), Err(ParseError::OptionTooLong));
        let long = format!("\x00\x01f\x00octet\x00{}\x001\x00", "n".repeat(MAX_OPTION_LEN + 1));
        assert_eq!(parse(long.as_bytes()), Err(ParseError::OptionTooLong));
        // NUL padding is not an option.
        let mut raw = b"\x00\x01f\x00octet\x00".to_vec();
        raw.extend(std::iter::repeat_n(0u8, 1000));
        assert!(matches!(parse(&raw), Ok(Packet::Rrq(_))));
    }

    #[test]
    fn nul_in_filename_ends_the_field() {
        // "a\0../../etc/passwd\0octet\0": the mode field becomes the traversal string: refused.
        let raw = b"\x00\x01a\x00../../etc/passwd\x00octet\x00";
        assert!(matches!(parse(raw), Err(ParseError::UnsupportedMode(_))));
    }

    #[test]
    fn round_trips_every_kind() {
        let mut b = Vec::new();
        encode_data(&mut b, 0xfffe, b"hello");
        assert_eq!(b, b"\x00\x03\xff\xfehello");
        assert_eq!(parse(&b).unwrap(), Packet::Data { block: 0xfffe, data: b"hello" });

        encode_ack(&mut b, 7);
        assert_eq!(b, b"\x00\x04\x00\x07");
        assert_eq!(parse(&b).unwrap(), Packet::Ack(7));

        encode_error(&mut b, ErrorCode::AccessViolation, "no\0pe");
        assert_eq!(b, b"\x00\x05\x00\x02nope\x00");
        assert_eq!(parse(&b).unwrap(), Packet::Error { code: ErrorCode::AccessViolation, message: "nope".into() });

        let opts = vec![("blksize".to_string(), "1468".to_string()), ("tsize".to_string(), "99".to_string())];
        encode_oack(&mut b, &opts);
        assert_eq!(b, b"\x00\x06blksize\x001468\x00tsize\x0099\x00");
        assert_eq!(parse(&b).unwrap(), Packet::Oack(opts.clone()));

        encode_rrq(&mut b, b"x/y", Mode::Netascii, &opts);
        assert_eq!(
            parse(&b).unwrap(),
            Packet::Rrq(Request { filename: b"x/y".to_vec(), mode: Mode::Netascii, options: opts })
        );
    }

    #[test]
    fn error_without_terminator_is_still_read() {
        assert_eq!(
            parse(b"\x00\x05\x00\x08refused").unwrap(),
            Packet::Error { code: ErrorCode::OptionNegotiation, message: "refused".into() }
        );
    }
}
