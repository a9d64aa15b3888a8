//! The `.torrent` of a packed image, written by us (BEP 3 single-file metainfo, BEP 27 private
//! flag, BEP 19 web seed) and read back for its info hash.

use bip_bencode::{ben_bytes, ben_int, ben_list, ben_map, BDecodeOpt, BMutAccess, BRefAccess, BencodeMut, BencodeRef};
use sha1::{Digest, Sha1};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metainfo {
    /// Tracker URL, `http://<frontend>:<port>/announce`.
    pub announce: String,
    /// Web seeds: HTTP URLs of the archive itself.
    pub url_list: Vec<String>,
    /// The file name clients save the archive as.
    pub name: String,
    pub length: u64,
    pub piece_length: u64,
    pub pieces: Vec<[u8; 20]>,
    pub private: bool,
    /// Unix seconds; left out when 0.
    pub creation_date: u64,
    pub created_by: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetainfoError {
    #[error("invalid torrent file: {0}")]
    Decode(String),
    #[error("invalid torrent file: {0}")]
    Field(&'static str),
}

impl Metainfo {
    fn info(&self) -> BencodeMut<'static> {
        let mut pieces = Vec::with_capacity(self.pieces.len() * 20);
        for p in &self.pieces {
            pieces.extend_from_slice(p);
        }
        let mut info = ben_map! {
            "name" => ben_bytes!(self.name.clone()),
            "length" => ben_int!(self.length as i64),
            "piece length" => ben_int!(self.piece_length as i64),
            "pieces" => ben_bytes!(pieces)
        };
        if self.private {
            if let Some(d) = info.dict_mut() {
                d.insert(b"private".to_vec().into(), ben_int!(1));
            }
        }
        info
    }

    /// The bencoded info dictionary: what the info hash is computed over.
    pub fn info_bytes(&self) -> Vec<u8> {
        self.info().encode()
    }

    /// SHA-1 of the bencoded info dictionary.
    pub fn info_hash(&self) -> [u8; 20] {
        Sha1::digest(self.info_bytes()).into()
    }

    /// The whole `.torrent` file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut root = ben_map! {
            "announce" => ben_bytes!(self.announce.clone()),
            "info" => self.info()
        };
        if let Some(d) = root.dict_mut() {
            if !self.url_list.is_empty() {
                let mut list = ben_list!();
                if let Some(l) = list.list_mut() {
                    for u in &self.url_list {
                        l.push(ben_bytes!(u.clone()));
                    }
                }
                d.insert(b"url-list".to_vec().into(), list);
            }
            if self.creation_date > 0 {
                d.insert(b"creation date".to_vec().into(), ben_int!(self.creation_date as i64));
            }
            if !self.created_by.is_empty() {
                d.insert(b"created by".to_vec().into(), ben_bytes!(self.created_by.clone()));
            }
        }
        root.encode()
    }
}

/// What the seeder and the tests need from a `.torrent`: the info hash (over the info dict's
/// exact bytes, as clients compute it) and the single file's name and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TorrentSummary {
    pub info_hash: [u8; 20],
    pub name: String,
    pub length: u64,
    pub piece_length: u64,
    pub pieces: usize,
    pub announce: String,
    pub url_list: Vec<String>,
    pub private: bool,
}

pub fn parse(bytes: &[u8]) -> Result<TorrentSummary, MetainfoError> {
    let root = BencodeRef::decode(bytes, BDecodeOpt::default()).map_err(|e| MetainfoError::Decode(e.to_string()))?;
    let d = root.dict().ok_or(MetainfoError::Field("top level is not a dictionary"))?;
    let info = d.lookup(b"info").ok_or(MetainfoError::Field("no info dictionary"))?;
    let info_hash: [u8; 20] = Sha1::digest(info.buffer()).into();
    let i = info.dict().ok_or(MetainfoError::Field("info is not a dictionary"))?;
    let text = |v: Option<&BencodeRef>| v.and_then(|v| v.bytes()).map(|b| String::from_utf8_lossy(b).into_owned());
    let int = |k: &[u8]| i.lookup(k).and_then(|v| v.int());
    let name = text(i.lookup(b"name")).ok_or(MetainfoError::Field("info has no name"))?;
    let length =
        int(b"length").and_then(|l| u64::try_from(l).ok()).ok_or(MetainfoError::Field("not a single-file torrent"))?;
    let piece_length =
        int(b"piece length").and_then(|l| u64::try_from(l).ok()).ok_or(MetainfoError::Field("no piece length"))?;
    let pieces = i.lookup(b"pieces").and_then(|v| v.bytes()).ok_or(MetainfoError::Field("no pieces"))?;
    if pieces.len() % 20 != 0 {
        return Err(MetainfoError::Field("pieces is not a multiple of 20 bytes"));
    }
    let url_list = match d.lookup(b"url-list") {
        Some(v) => match (v.bytes(), v.list()) {
            (Some(b), _) => vec![String::from_utf8_lossy(b).into_owned()],
            (_, Some(l)) => l.into_iter().filter_map(|u| text(Some(u))).collect(),
            _ => Vec::new(),
        },
        None => Vec::new(),
    };
    Ok(TorrentSummary {
        info_hash,
        name,
        length,
        piece_length,
        pieces: pieces.len() / 20,
        announce: text(d.lookup(b"announce")).unwrap_or_default(),
        url_list,
        private: int(b"private") == Some(1),
    })
}

/// Reads a single-file `.torrent` we wrote back into a [`Metainfo`] (the info dict is rebuilt
/// canonically, so the info hash matches only for canonical files, which ours are).
pub fn parse_full(bytes: &[u8]) -> Result<Metainfo, MetainfoError> {
    let s = parse(bytes)?;
    let root = BencodeRef::decode(bytes, BDecodeOpt::default()).map_err(|e| MetainfoError::Decode(e.to_string()))?;
    let d = root.dict().ok_or(MetainfoError::Field("top level is not a dictionary"))?;
    let i = d.lookup(b"info").and_then(|i| i.dict()).ok_or(MetainfoError::Field("no info dictionary"))?;
    let raw = i.lookup(b"pieces").and_then(|v| v.bytes()).ok_or(MetainfoError::Field("no pieces"))?;
    let pieces = raw.chunks_exact(20).map(|c| c.try_into().expect("chunks of 20")).collect();
    let int = |k: &[u8]| d.lookup(k).and_then(|v| v.int()).and_then(|v| u64::try_from(v).ok());
    let text = |k: &[u8]| d.lookup(k).and_then(|v| v.bytes()).map(|b| String::from_utf8_lossy(b).into_owned());
    let m = Metainfo {
        announce: s.announce,
        url_list: s.url_list,
        name: s.name,
        length: s.length,
        piece_length: s.piece_length,
        pieces,
        private: s.private,
        creation_date: int(b"creation date").unwrap_or(0),
        created_by: text(b"created by").unwrap_or_default(),
    };
    if m.info_hash() != s.info_hash {
        return Err(MetainfoError::Field("info dictionary is not in canonical form"));
    }
    Ok(m)
}

/// `bytes` with `announce` = the first of `trackers` and a BEP 12 `announce-list` of one tier per
/// tracker (so clients announce to every server's tracker), every other key (the info dict
/// above all) copied byte for byte: the info hash cannot change. The outer dictionary is
/// re-encoded by hand because bip_bencode cannot embed the info dict's raw bytes, and re-encoding
/// it from a decoded tree would change the hash of a non-canonical file.
pub fn with_trackers(bytes: &[u8], trackers: &[String]) -> Result<Vec<u8>, MetainfoError> {
    let root = BencodeRef::decode(bytes, BDecodeOpt::default()).map_err(|e| MetainfoError::Decode(e.to_string()))?;
    let d = root.dict().ok_or(MetainfoError::Field("top level is not a dictionary"))?;
    if d.lookup(b"info").is_none() {
        return Err(MetainfoError::Field("no info dictionary"));
    }
    let Some(first) = trackers.first() else { return Ok(bytes.to_vec()) };
    let str_bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(b.len().to_string().as_bytes());
        out.push(b':');
        out.extend_from_slice(b);
    };
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = d
        .to_list()
        .into_iter()
        .filter(|(k, _)| **k != b"announce".as_slice() && **k != b"announce-list".as_slice())
        .map(|(k, v)| (k.to_vec(), v.buffer().to_vec()))
        .collect();
    let mut announce = Vec::new();
    str_bytes(&mut announce, first.as_bytes());
    entries.push((b"announce".to_vec(), announce));
    let mut list = b"l".to_vec();
    for t in trackers {
        list.push(b'l');
        str_bytes(&mut list, t.as_bytes());
        list.push(b'e');
    }
    list.push(b'e');
    entries.push((b"announce-list".to_vec(), list));
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = b"d".to_vec();
    for (k, v) in entries {
        str_bytes(&mut out, &k);
        out.extend_from_slice(&v);
    }
    out.push(b'e');
    Ok(out)
}

/// The announce-list tiers of a torrent (BEP 12), flattened in order.
pub fn announce_list(bytes: &[u8]) -> Result<Vec<String>, MetainfoError> {
    let root = BencodeRef::decode(bytes, BDecodeOpt::default()).map_err(|e| MetainfoError::Decode(e.to_string()))?;
    let d = root.dict().ok_or(MetainfoError::Field("top level is not a dictionary"))?;
    let Some(tiers) = d.lookup(b"announce-list").and_then(|v| v.list()) else { return Ok(Vec::new()) };
    Ok(tiers
        .into_iter()
        .filter_map(|t| t.list())
        .flat_map(|t| t.into_iter().filter_map(|u| u.bytes().map(|b| String::from_utf8_lossy(b).into_owned())))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Metainfo {
        Metainfo {
            announce: "http://10.0.0.1:7050/announce".into(),
            url_list: vec!["http://10.0.0.1:7050/images/c/1/c.tar.zst".into()],
            name: "c.tar.zst".into(),
            length: 5,
            piece_length: 262144,
            pieces: vec![Sha1::digest(b"hello").into()],
            private: true,
            creation_date: 0,
            created_by: String::new(),
        }
    }

    #[test]
    fn info_dict_bytes_are_canonical_bencode() {
        let m = sample();
        let mut want = b"d6:lengthi5e4:name9:c.tar.zst12:piece lengthi262144e6:pieces20:".to_vec();
        want.extend_from_slice(&Sha1::digest(b"hello"));
        want.extend_from_slice(b"7:privatei1ee");
        assert_eq!(m.info_bytes(), want);
        // Known vector: transmission-show ("Hash:") and aria2c --show-files ("Info Hash:")
        // report this info hash for sample().to_bytes().
        assert_eq!(hex::encode(m.info_hash()), "52d98f015bfa2c5f314a77d668e7187013a82557");
    }

    #[test]
    fn whole_file_has_sorted_keys_and_web_seed() {
        let bytes = sample().to_bytes();
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("d8:announce29:http://10.0.0.1:7050/announce4:infod6:length"), "{text}");
        assert!(text.ends_with("8:url-listl41:http://10.0.0.1:7050/images/c/1/c.tar.zstee"), "{text}");
    }

    #[test]
    fn parse_reads_back_what_we_write() {
        let m = sample();
        let s = parse(&m.to_bytes()).unwrap();
        assert_eq!(s.info_hash, m.info_hash());
        assert_eq!((s.name.as_str(), s.length, s.piece_length, s.pieces), ("c.tar.zst", 5, 262144, 1));
        assert_eq!(s.announce, m.announce);
        assert_eq!(s.url_list, m.url_list);
        assert!(s.private);
    }

    #[test]
    fn parse_full_round_trips() {
        let mut m = sample();
        m.creation_date = 1_700_000_000;
        m.created_by = "luna".into();
        assert_eq!(parse_full(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn parse_rejects_garbage_and_multi_file_torrents() {
        assert!(parse(b"not bencode").is_err());
        let multi = b"d4:infod5:filesle4:name1:x12:piece lengthi16384e6:pieces0:ee";
        assert_eq!(parse(multi).unwrap_err(), MetainfoError::Field("not a single-file torrent"));
    }

    #[test]
    fn trackers_go_outside_the_info_dict_and_the_hash_stays() {
        let mut m = sample();
        m.creation_date = 1_700_000_000;
        m.created_by = "luna".into();
        let bytes = m.to_bytes();
        let t = ["http://10.0.0.2:7050/announce".to_string(), "http://10.0.0.1:7050/announce".to_string()];
        let out = with_trackers(&bytes, &t).unwrap();
        let s = parse(&out).unwrap();
        assert_eq!(s.info_hash, m.info_hash());
        assert_eq!(s.announce, t[0]);
        assert_eq!(s.url_list, m.url_list);
        assert_eq!(announce_list(&out).unwrap(), t);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with(
                "d8:announce29:http://10.0.0.2:7050/announce13:announce-listll29:http://10.0.0.2:7050/announceel29:http://10.0.0.1:7050/announceee10:created by4:luna13:creation datei1700000000e4:infod"
            ),
            "{text}"
        );
        // applying it again replaces the list; an empty list leaves the file alone
        let again = with_trackers(&out, &t[1..]).unwrap();
        assert_eq!(announce_list(&again).unwrap(), &t[1..]);
        assert_eq!(parse(&again).unwrap().info_hash, m.info_hash());
        assert_eq!(with_trackers(&bytes, &[]).unwrap(), bytes);
        // a decoded-then-parsed file is still ours: parse_full agrees
        assert_eq!(parse_full(&out).unwrap().info_hash(), m.info_hash());
        assert!(with_trackers(b"d3:fooi1ee", &t).is_err());
    }

    #[test]
    fn public_torrent_has_no_private_key() {
        let mut m = sample();
        m.private = false;
        assert!(!String::from_utf8_lossy(&m.info_bytes()).contains("private"));
    }
}
