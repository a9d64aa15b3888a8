//! Responses to bencoded bytes (with `bip_bencode`).

use bip_bencode::{ben_bytes, ben_int, ben_map, BMutAccess, BencodeMut};

use super::{AnnounceResponse, ScrapeResponse, TrackerError};

fn int(n: impl Into<i64>) -> BencodeMut<'static> {
    ben_int!(n.into())
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The announce answer: `complete`, `incomplete`, `interval`, `min interval` and `peers`, the peers as one
/// string of 6-byte IPv4+port entries (`compact`, BEP 23) or as a list of dictionaries with
/// `ip`, `port` and (unless `no_peer_id`, and if the peer has one) `peer id`.
pub fn encode_announce(resp: &AnnounceResponse, compact: bool, no_peer_id: bool) -> Vec<u8> {
    let peers = if compact {
        let mut bytes = Vec::with_capacity(resp.peers.len() * 6);
        for p in &resp.peers {
            bytes.extend_from_slice(&p.addr.ip().octets());
            bytes.extend_from_slice(&p.addr.port().to_be_bytes());
        }
        ben_bytes!(bytes)
    } else {
        let mut list = BencodeMut::new_list();
        if let Some(l) = list.list_mut() {
            for p in &resp.peers {
                let ip = ben_bytes!(p.addr.ip().to_string());
                let port = int(p.addr.port());
                l.push(match p.peer_id.as_ref().filter(|_| !no_peer_id) {
                    Some(id) => ben_map! { "ip" => ip, "peer id" => ben_bytes!(&id[..]), "port" => port },
                    None => ben_map! { "ip" => ip, "port" => port },
                });
            }
        }
        list
    };
    (ben_map! {
        "complete" => int(resp.complete),
        "incomplete" => int(resp.incomplete),
        "interval" => int(resp.interval),
        "min interval" => int(resp.min_interval),
        "peers" => peers
    })
    .encode()
}

/// The scrape answer (BEP 48): `files`, keyed by the 20-byte info hash.
pub fn encode_scrape(resp: &ScrapeResponse) -> Vec<u8> {
    let mut files = BencodeMut::new_dict();
    if let Some(d) = files.dict_mut() {
        for f in &resp.files {
            d.insert(
                f.info_hash[..].into(),
                ben_map! {
                    "complete" => int(f.complete),
                    "downloaded" => int(clamp(f.downloaded)),
                    "incomplete" => int(f.incomplete)
                },
            );
        }
    }
    (ben_map! { "files" => files }).encode()
}

/// A refusal: `failure reason` with the error's text.
pub fn encode_failure(err: &TrackerError) -> Vec<u8> {
    (ben_map! { "failure reason" => ben_bytes!(err.to_string()) }).encode()
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use bip_bencode::{BDecodeOpt, BRefAccess, BencodeRef};

    use super::super::{Peer, ScrapeEntry};
    use super::*;

    fn resp() -> AnnounceResponse {
        AnnounceResponse {
            interval: 30,
            min_interval: 30,
            complete: 2,
            incomplete: 1,
            peers: vec![
                Peer {
                    peer_id: Some(*b"-LR0001-abcdefghijkl"),
                    addr: SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 3), 6881),
                },
                Peer { peer_id: None, addr: SocketAddrV4::new(Ipv4Addr::new(192, 168, 255, 0), 0x1f90) },
            ],
        }
    }

    #[test]
    fn compact_peers_exact_bytes() {
        let got = encode_announce(&resp(), true, false);
        let mut want = b"d8:completei2e10:incompletei1e8:intervali30e12:min intervali30e5:peers12:".to_vec();
        want.extend_from_slice(&[10, 1, 2, 3, 0x1a, 0xe1, 192, 168, 255, 0, 0x1f, 0x90]);
        want.push(b'e');
        assert_eq!(got, want);
    }

    #[test]
    fn empty_compact_peer_list() {
        let r = AnnounceResponse { interval: 45, min_interval: 45, complete: 0, incomplete: 1, peers: vec![] };
        assert_eq!(
            encode_announce(&r, true, false),
            b"d8:completei0e10:incompletei1e8:intervali45e12:min intervali45e5:peers0:e"
        );
        assert_eq!(
            encode_announce(&r, false, false),
            b"d8:completei0e10:incompletei1e8:intervali45e12:min intervali45e5:peerslee"
        );
    }

    #[test]
    fn dictionary_peers_exact_bytes() {
        let got = encode_announce(&resp(), false, false);
        let want: &[u8] = b"d8:completei2e10:incompletei1e8:intervali30e12:min intervali30e5:peersl\
            d2:ip8:10.1.2.37:peer id20:-LR0001-abcdefghijkl4:porti6881ee\
            d2:ip13:192.168.255.04:porti8080eeee";
        assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
        let no_id = encode_announce(&resp(), false, true);
        let want: &[u8] = b"d8:completei2e10:incompletei1e8:intervali30e12:min intervali30e5:peersl\
            d2:ip8:10.1.2.34:porti6881eed2:ip13:192.168.255.04:porti8080eeee";
        assert_eq!(String::from_utf8_lossy(&no_id), String::from_utf8_lossy(want));
    }

    #[test]
    fn announce_round_trips_through_the_decoder() {
        let bytes = encode_announce(&resp(), false, false);
        let b = BencodeRef::decode(&bytes, BDecodeOpt::default()).unwrap();
        let d = b.dict().unwrap();
        assert_eq!(d.lookup(b"interval").unwrap().int(), Some(30));
        assert_eq!(d.lookup(b"complete").unwrap().int(), Some(2));
        let peers = d.lookup(b"peers").unwrap().list().unwrap();
        assert_eq!(peers.len(), 2);
        let first = peers.get(0).unwrap().dict().unwrap();
        assert_eq!(first.lookup(b"ip").unwrap().str(), Some("10.1.2.3"));
        assert_eq!(first.lookup(b"port").unwrap().int(), Some(6881));
        assert_eq!(first.lookup(b"peer id").unwrap().bytes(), Some(&b"-LR0001-abcdefghijkl"[..]));
        assert!(peers.get(1).unwrap().dict().unwrap().lookup(b"peer id").is_none());

        let bytes = encode_announce(&resp(), true, false);
        let b = BencodeRef::decode(&bytes, BDecodeOpt::default()).unwrap();
        let compact = b.dict().unwrap().lookup(b"peers").unwrap().bytes().unwrap();
        assert_eq!(compact.len(), 12);
        assert_eq!(&compact[..6], &[10, 1, 2, 3, 0x1a, 0xe1]);
    }

    #[test]
    fn scrape_exact_bytes_for_binary_hashes() {
        let h1 = [0u8; 20];
        let mut h2 = [0xffu8; 20];
        h2[0] = b'e'; // a bencode delimiter inside a key must not confuse anything
        let resp = ScrapeResponse {
            files: vec![
                ScrapeEntry { info_hash: h2, complete: 3, incomplete: 4, downloaded: 5 },
                ScrapeEntry { info_hash: h1, complete: 0, incomplete: 1, downloaded: 0 },
            ],
        };
        let got = encode_scrape(&resp);
        let mut want = b"d5:filesd20:".to_vec();
        want.extend_from_slice(&h1);
        want.extend_from_slice(b"d8:completei0e10:downloadedi0e10:incompletei1ee20:");
        want.extend_from_slice(&h2);
        want.extend_from_slice(b"d8:completei3e10:downloadedi5e10:incompletei4eeee");
        assert_eq!(got, want, "keys sorted, values per BEP 48");

        let b = BencodeRef::decode(&got, BDecodeOpt::default()).unwrap();
        let files = b.dict().unwrap().lookup(b"files").unwrap().dict().unwrap();
        let e = files.lookup(&h2).unwrap().dict().unwrap();
        assert_eq!(e.lookup(b"complete").unwrap().int(), Some(3));
        assert_eq!(e.lookup(b"incomplete").unwrap().int(), Some(4));
        assert_eq!(e.lookup(b"downloaded").unwrap().int(), Some(5));
    }

    #[test]
    fn empty_scrape() {
        assert_eq!(encode_scrape(&ScrapeResponse::default()), b"d5:filesdee");
    }

    #[test]
    fn failure_reason_bytes() {
        let e = TrackerError::Missing("info_hash");
        assert_eq!(encode_failure(&e), b"d14:failure reason17:missing info_hashe");
        let e = TrackerError::invalid("port", "must be 1 to 65535, got 0");
        let bytes = encode_failure(&e);
        let b = BencodeRef::decode(&bytes, BDecodeOpt::default()).unwrap();
        assert_eq!(
            b.dict().unwrap().lookup(b"failure reason").unwrap().str(),
            Some("invalid port: must be 1 to 65535, got 0")
        );
    }
}
