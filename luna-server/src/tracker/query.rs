//! Raw query strings to requests. `info_hash` and `peer_id` are binary, so the query is decoded
//! here byte by byte instead of through a UTF-8 form decoder.

use std::net::{IpAddr, SocketAddr};

use super::{AnnounceRequest, Event, InfoHash, TrackerError};

/// Decodes `%XX` escapes and `+` (a space, as in form encoding: clients that build queries with
/// form encoders send spaces that way; clients that mean a literal `+` send `%2B`). Every other
/// byte stands for itself. `None` when a `%` is not followed by two hex digits.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    decode_into(s.as_bytes(), &mut out).then_some(out)
}

fn decode_into(s: &[u8], out: &mut Vec<u8>) -> bool {
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' => {
                let (Some(&hi), Some(&lo)) = (s.get(i + 1), s.get(i + 2)) else { return false };
                let (Some(hi), Some(lo)) = (hex_value(hi), hex_value(lo)) else { return false };
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    true
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// The `name=value` pairs of a raw query, names and values percent-decoded.
fn pairs(raw: &str) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), TrackerError>> + '_ {
    raw.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (name, value) = p.split_once('=').unwrap_or((p, ""));
        let name = percent_decode(name)
            .ok_or_else(|| TrackerError::invalid("query", "malformed percent-encoding in a parameter name"))?;
        let value = percent_decode(value)
            .ok_or_else(|| TrackerError::invalid(String::from_utf8_lossy(&name), "malformed percent-encoding"))?;
        Ok((name, value))
    })
}

fn hash20(param: &'static str, value: &[u8]) -> Result<[u8; 20], TrackerError> {
    value.try_into().map_err(|_| TrackerError::invalid(param, format!("must be 20 bytes, got {}", value.len())))
}

/// The value as text for error messages: short, and binary made harmless.
fn shown(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(&value[..value.len().min(32)]);
    format!("{text:?}")
}

fn number(param: &'static str, value: &[u8]) -> Result<u64, TrackerError> {
    // Digits only: `str::parse` would also take a leading `+`.
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(TrackerError::invalid(param, format!("must be a non-negative integer, got {}", shown(value))));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| TrackerError::invalid(param, format!("too large: {}", shown(value))))
}

fn flag(param: &'static str, value: &[u8]) -> Result<bool, TrackerError> {
    match value {
        b"1" => Ok(true),
        b"0" => Ok(false),
        _ => Err(TrackerError::invalid(param, format!("must be 0 or 1, got {}", shown(value)))),
    }
}

/// Parses the raw (still percent-encoded) query of `GET /announce`. `remote` is the address the
/// request came from. The first occurrence of a repeated parameter counts; unknown ones are
/// ignored (`key`, `trackerid`, `supportcrypto`... carry nothing this tracker uses).
pub fn parse_announce(raw_query: &str, remote: SocketAddr) -> Result<AnnounceRequest, TrackerError> {
    let mut info_hash = None;
    let mut peer_id = None;
    let mut port = None;
    let mut uploaded = None;
    let mut downloaded = None;
    let mut left = None;
    let mut event = None;
    let mut numwant = None;
    let mut compact = None;
    let mut no_peer_id = None;
    let mut ip = None;

    for pair in pairs(raw_query) {
        let (name, value) = pair?;
        match name.as_slice() {
            b"info_hash" if info_hash.is_none() => info_hash = Some(hash20("info_hash", &value)?),
            b"peer_id" if peer_id.is_none() => peer_id = Some(hash20("peer_id", &value)?),
            b"port" if port.is_none() => {
                let n = number("port", &value)?;
                let p = u16::try_from(n)
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| TrackerError::invalid("port", format!("must be 1 to 65535, got {n}")))?;
                port = Some(p);
            }
            b"uploaded" if uploaded.is_none() => uploaded = Some(number("uploaded", &value)?),
            b"downloaded" if downloaded.is_none() => downloaded = Some(number("downloaded", &value)?),
            b"left" if left.is_none() => left = Some(number("left", &value)?),
            b"event" if event.is_none() => {
                event = Some(match value.as_slice() {
                    b"" => Event::None,
                    b"started" => Event::Started,
                    b"stopped" => Event::Stopped,
                    b"completed" => Event::Completed,
                    _ => {
                        return Err(TrackerError::invalid(
                            "event",
                            format!("must be started, stopped, completed or empty, got {}", shown(&value)),
                        ))
                    }
                })
            }
            b"numwant" if numwant.is_none() => {
                // Clients ask for "as many as possible" with huge numbers; the cap comes later.
                numwant = Some(u32::try_from(number("numwant", &value)?).unwrap_or(u32::MAX))
            }
            b"compact" if compact.is_none() => compact = Some(flag("compact", &value)?),
            b"no_peer_id" if no_peer_id.is_none() => no_peer_id = Some(flag("no_peer_id", &value)?),
            b"ip" if ip.is_none() => {
                let parsed = std::str::from_utf8(&value).ok().and_then(|s| s.parse::<IpAddr>().ok());
                ip = Some(parsed.ok_or_else(|| {
                    TrackerError::invalid("ip", format!("must be an ip address, got {}", shown(&value)))
                })?);
            }
            _ => {}
        }
    }

    Ok(AnnounceRequest {
        info_hash: info_hash.ok_or(TrackerError::Missing("info_hash"))?,
        peer_id: peer_id.ok_or(TrackerError::Missing("peer_id"))?,
        port: port.ok_or(TrackerError::Missing("port"))?,
        uploaded: uploaded.ok_or(TrackerError::Missing("uploaded"))?,
        downloaded: downloaded.ok_or(TrackerError::Missing("downloaded"))?,
        left: left.ok_or(TrackerError::Missing("left"))?,
        event: event.unwrap_or_default(),
        numwant,
        compact: compact.unwrap_or(true),
        no_peer_id: no_peer_id.unwrap_or(false),
        ip,
        remote,
    })
}

/// Parses the raw query of `GET /scrape`: every `info_hash` it carries, in order, duplicates
/// dropped. None at all asks for every torrent (a "full scrape").
pub fn parse_scrape(raw_query: &str) -> Result<Vec<InfoHash>, TrackerError> {
    let mut hashes: Vec<InfoHash> = Vec::new();
    for pair in pairs(raw_query) {
        let (name, value) = pair?;
        if name == b"info_hash" {
            let h = hash20("info_hash", &value)?;
            if !hashes.contains(&h) {
                if hashes.len() == MAX_SCRAPE_HASHES {
                    return Err(TrackerError::invalid(
                        "info_hash",
                        format!("at most {MAX_SCRAPE_HASHES} different ones per scrape"),
                    ));
                }
                hashes.push(h);
            }
        }
    }
    Ok(hashes)
}

/// The most info hashes one scrape may ask for: a scrape answers in one go under the tracker's
/// locks, so its cost must stay small (a client scrapes the few torrents it has).
pub const MAX_SCRAPE_HASHES: usize = 64;

/// Percent-encodes every byte that is not unreserved (RFC 3986), as BitTorrent clients do.
pub fn percent_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn remote() -> SocketAddr {
        "192.0.2.7:40000".parse().unwrap()
    }

    const HASH: [u8; 20] = [
        0x00, 0xff, 0x2b, 0x20, 0x25, 0x26, 0x3d, 0x3f, 0x80, 0x7f, b'a', b'Z', b'~', b'-', b'.', b'_', 0x0a, 0x0d,
        0xfe, 0x01,
    ];

    fn query(hash: &[u8], extra: &str) -> String {
        format!(
            "info_hash={}&peer_id={}&port=6881&uploaded=1&downloaded=2&left=3{extra}",
            percent_encode(hash),
            percent_encode(b"-LR0001-abcdefghijkl")
        )
    }

    #[test]
    fn every_byte_decodes_from_both_escape_cases() {
        for b in 0..=255u8 {
            let upper = format!("%{b:02X}");
            let lower = format!("%{b:02x}");
            assert_eq!(percent_decode(&upper), Some(vec![b]), "{upper}");
            assert_eq!(percent_decode(&lower), Some(vec![b]), "{lower}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(percent_decode(&percent_encode(&all)), Some(all));
    }

    #[test]
    fn plus_is_space_and_escaped_plus_is_plus() {
        assert_eq!(percent_decode("+"), Some(b" ".to_vec()));
        assert_eq!(percent_decode("%2B"), Some(b"+".to_vec()));
        assert_eq!(percent_decode("%2b%20a+b"), Some(b"+ a b".to_vec()));
    }

    #[test]
    fn unreserved_bytes_stand_for_themselves() {
        assert_eq!(percent_decode("aZ09-._~"), Some(b"aZ09-._~".to_vec()));
    }

    #[test]
    fn malformed_escapes_are_rejected() {
        for bad in ["%", "%4", "%zz", "%4g", "ab%", "%%41"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn announce_parses_binary_hash_and_all_fields() {
        let q = query(&HASH, "&event=started&numwant=7&compact=0&no_peer_id=1&ip=10.0.0.5&key=x");
        let r = parse_announce(&q, remote()).unwrap();
        assert_eq!(r.info_hash, HASH);
        assert_eq!(&r.peer_id, b"-LR0001-abcdefghijkl");
        assert_eq!((r.port, r.uploaded, r.downloaded, r.left), (6881, 1, 2, 3));
        assert_eq!(r.event, Event::Started);
        assert_eq!(r.numwant, Some(7));
        assert!(!r.compact);
        assert!(r.no_peer_id);
        assert_eq!(r.ip, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(r.remote, remote());
    }

    #[test]
    fn announce_defaults() {
        let r = parse_announce(&query(&HASH, ""), remote()).unwrap();
        assert_eq!(r.event, Event::None);
        assert_eq!(r.numwant, None);
        assert!(r.compact);
        assert!(!r.no_peer_id);
        assert_eq!(r.ip, None);
        let r = parse_announce(&query(&HASH, "&event="), remote()).unwrap();
        assert_eq!(r.event, Event::None);
    }

    #[test]
    fn raw_plus_in_hash_is_a_space_byte() {
        // A form-encoding client sends byte 0x20 as `+`; the literal `+` byte comes as %2B.
        let mut hash = [b'a'; 20];
        hash[3] = b' ';
        hash[4] = b'+';
        let q = format!(
            "info_hash=aaa+%2Baaaaaaaaaaaaaaa&peer_id={}&port=1&uploaded=0&downloaded=0&left=0",
            "b".repeat(20)
        );
        assert_eq!(parse_announce(&q, remote()).unwrap().info_hash, hash);
    }

    #[test]
    fn announce_errors_name_the_parameter() {
        let cases: &[(&str, &str)] = &[
            ("", "missing info_hash"),
            ("info_hash=abc", "invalid info_hash: must be 20 bytes, got 3"),
            ("info_hash=aaaaaaaaaaaaaaaaaaaa", "missing peer_id"),
            ("info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=%zz", "invalid peer_id: malformed percent-encoding"),
            (
                "info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=bbbbbbbbbbbbbbbbbbbbb",
                "invalid peer_id: must be 20 bytes, got 21",
            ),
        ];
        for (q, want) in cases {
            assert_eq!(parse_announce(q, remote()).unwrap_err().to_string(), *want, "{q}");
        }
        let cases: &[(&str, &str)] = &[
            ("&port=0", "invalid port: must be 1 to 65535, got 0"),
            ("&port=65536", "invalid port: must be 1 to 65535, got 65536"),
            ("&port=-1", "invalid port: must be a non-negative integer, got \"-1\""),
            ("&uploaded=x", "invalid uploaded: must be a non-negative integer, got \"x\""),
            ("&downloaded=+1", "invalid downloaded: must be a non-negative integer, got \" 1\""),
            ("&left=", "invalid left: must be a non-negative integer, got \"\""),
            ("&left=99999999999999999999999", "invalid left: too large: \"99999999999999999999999\""),
            ("&event=paused", "invalid event: must be started, stopped, completed or empty, got \"paused\""),
            ("&numwant=many", "invalid numwant: must be a non-negative integer, got \"many\""),
            ("&compact=yes", "invalid compact: must be 0 or 1, got \"yes\""),
            ("&no_peer_id=2", "invalid no_peer_id: must be 0 or 1, got \"2\""),
            ("&ip=node1.cluster", "invalid ip: must be an ip address, got \"node1.cluster\""),
        ];
        for (extra, want) in cases {
            // The bad value comes first so the first occurrence counts.
            let q = format!("{}&{}", &extra[1..], query(&HASH, ""));
            assert_eq!(parse_announce(&q, remote()).unwrap_err().to_string(), *want, "{extra}");
        }
        let base = "info_hash=aaaaaaaaaaaaaaaaaaaa&peer_id=bbbbbbbbbbbbbbbbbbbb";
        for (missing, rest) in [
            ("port", "&uploaded=0&downloaded=0&left=0"),
            ("uploaded", "&port=1&downloaded=0&left=0"),
            ("downloaded", "&port=1&uploaded=0&left=0"),
            ("left", "&port=1&uploaded=0&downloaded=0"),
        ] {
            let err = parse_announce(&format!("{base}{rest}"), remote()).unwrap_err();
            assert_eq!(err, TrackerError::Missing(missing));
            assert_eq!(err.to_string(), format!("missing {missing}"));
        }
    }

    #[test]
    fn numwant_larger_than_u32_is_capped() {
        let r = parse_announce(&query(&HASH, "&numwant=99999999999"), remote()).unwrap();
        assert_eq!(r.numwant, Some(u32::MAX));
    }

    #[test]
    fn scrape_takes_every_hash_once() {
        let a = [1u8; 20];
        let b = HASH;
        let q = format!(
            "info_hash={}&info_hash={}&info_hash={}&other=1",
            percent_encode(&a),
            percent_encode(&b),
            percent_encode(&a)
        );
        assert_eq!(parse_scrape(&q).unwrap(), vec![a, b]);
        assert_eq!(parse_scrape("").unwrap(), Vec::<InfoHash>::new());
        assert_eq!(
            parse_scrape("info_hash=short").unwrap_err().to_string(),
            "invalid info_hash: must be 20 bytes, got 5"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn announce_parser_never_panics(q in ".{0,300}") {
            let _ = parse_announce(&q, remote());
            let _ = parse_scrape(&q);
        }

        #[test]
        fn announce_parser_never_panics_on_query_like_input(
            parts in proptest::collection::vec(
                (prop_oneof![
                    Just("info_hash".to_string()), Just("peer_id".to_string()), Just("port".to_string()),
                    Just("left".to_string()), Just("event".to_string()), Just("numwant".to_string()),
                    Just("ip".to_string()), Just("compact".to_string()), "[a-z_%+=&0-9]{0,12}",
                ], "[%0-9a-fA-F+=&.:-]{0,64}"),
                0..12,
            )
        ) {
            let q: Vec<String> = parts.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let q = q.join("&");
            let _ = parse_announce(&q, remote());
            let _ = parse_scrape(&q);
        }

        #[test]
        fn any_hash_round_trips(hash in proptest::array::uniform20(any::<u8>())) {
            let r = parse_announce(&query(&hash, ""), remote()).unwrap();
            prop_assert_eq!(r.info_hash, hash);
            prop_assert_eq!(parse_scrape(&format!("info_hash={}", percent_encode(&hash))).unwrap(), vec![hash]);
        }
    }
}
