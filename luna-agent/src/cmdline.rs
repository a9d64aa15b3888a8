//! The `luna.*` parameters the iPXE script put on the kernel command line (sans-IO).

use std::path::Path;
use std::time::Duration;

use luna_core::mac::MacAddr;

/// Default for `luna.stall=SECS`: how long the swarm may make no progress before HTTP takes over.
pub const DEFAULT_STALL: Duration = Duration::from_secs(30);
/// Default for `luna.linger=SECS`: the longest a node that has the image keeps seeding it for
/// the nodes still downloading before it switches root (it stops sooner when the tracker lists
/// no node still downloading, or when no peer fetched anything from it for a while; see
/// `torrent::Linger`). 0: stop seeding at once.
pub const DEFAULT_LINGER: Duration = Duration::from_secs(120);
/// Default for `luna.piece_spread=N`: the swarm fetches a random one of the rarest (held by the
/// fewest peers) of the next N pieces the reader needs (1: strictly in order). See `torrent::SwarmOptions::piece_spread`.
pub const DEFAULT_PIECE_SPREAD: u32 = 8;
/// Default for `luna.upload_slots=N`: the node uploads to at most N peers at a time and hands
/// the slots on in turn (BitTorrent's choking; 0: to every peer at once). See
/// `torrent::SwarmOptions::upload_slots`.
pub const DEFAULT_UPLOAD_SLOTS: u32 = 4;
/// Default for `luna.peer_limit=N`: the node keeps at most N peer connections (the tracker may
/// name hundreds of nodes). See `torrent::SwarmOptions::peer_limit`.
pub const DEFAULT_PEER_LIMIT: u32 = 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootArgs {
    /// `luna.url`, without a trailing slash.
    pub url: String,
    /// `luna.fallback=URL[,URL…]`: the cluster's other luna-servers (no trailing slashes), tried
    /// in turn for the plan and status reports when `url` cannot be reached.
    pub fallbacks: Vec<String>,
    pub node: String,
    pub token: String,
    /// `luna.mac`, else the MAC in `BOOTIF=01-…`.
    pub mac: Option<MacAddr>,
    /// `luna.service=1`: boot into the service shell, install nothing.
    pub service: bool,
    pub stall: Duration,
    /// `luna.linger=SECS` (see [`DEFAULT_LINGER`]).
    pub linger: Duration,
    /// `luna.piece_spread=N`, at least 1 (see [`DEFAULT_PIECE_SPREAD`]).
    pub piece_spread: u32,
    /// `luna.upload_slots=N` (see [`DEFAULT_UPLOAD_SLOTS`]).
    pub upload_slots: u32,
    /// `luna.peer_limit=N`, 1 to 1024 (see [`DEFAULT_PEER_LIMIT`]).
    pub peer_limit: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("kernel command line lacks {0}")]
    Missing(&'static str),
    #[error("kernel command line has a bad {key}: '{value}'")]
    Bad { key: &'static str, value: String },
    #[error("read kernel command line {path}: {reason}")]
    Read { path: String, reason: String },
}

/// Splits a command line into words; double quotes group words (`key="a b"`), as the kernel does.
pub(crate) fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

fn flag(value: &str) -> Option<bool> {
    match value {
        "" | "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

pub fn parse(cmdline: &str) -> Result<BootArgs, CmdlineError> {
    let (mut url, mut node, mut token, mut mac, mut bootif) = (None, None, None, None, None);
    let mut fallbacks = Vec::new();
    let mut service = false;
    let mut stall = DEFAULT_STALL;
    let mut linger = DEFAULT_LINGER;
    let mut piece_spread = DEFAULT_PIECE_SPREAD;
    let mut upload_slots = DEFAULT_UPLOAD_SLOTS;
    let mut peer_limit = DEFAULT_PEER_LIMIT;
    for word in words(cmdline) {
        let (key, value) = word.split_once('=').unwrap_or((word.as_str(), ""));
        match key {
            "luna.url" => url = Some(value.trim_end_matches('/').to_string()),
            "luna.node" => node = Some(value.to_string()),
            "luna.fallback" => {
                for u in value.split(',').filter(|u| !u.is_empty()) {
                    if !u.starts_with("http://") && !u.starts_with("https://") {
                        return Err(CmdlineError::Bad { key: "luna.fallback", value: u.into() });
                    }
                    fallbacks.push(u.trim_end_matches('/').to_string());
                }
            }
            "luna.token" => token = Some(value.to_string()),
            "luna.mac" => {
                mac = Some(
                    value.parse::<MacAddr>().map_err(|_| CmdlineError::Bad { key: "luna.mac", value: value.into() })?,
                )
            }
            "luna.service" => {
                service = flag(value).ok_or_else(|| CmdlineError::Bad { key: "luna.service", value: value.into() })?
            }
            "luna.stall" => {
                let secs: u64 =
                    value.parse().map_err(|_| CmdlineError::Bad { key: "luna.stall", value: value.into() })?;
                stall = Duration::from_secs(secs.max(1));
            }
            "luna.linger" => {
                let secs: u64 =
                    value.parse().map_err(|_| CmdlineError::Bad { key: "luna.linger", value: value.into() })?;
                linger = Duration::from_secs(secs);
            }
            "luna.piece_spread" => {
                let bad = || CmdlineError::Bad { key: "luna.piece_spread", value: value.into() };
                piece_spread = value.parse().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(bad)?;
            }
            "luna.peer_limit" => {
                let bad = || CmdlineError::Bad { key: "luna.peer_limit", value: value.into() };
                peer_limit = value.parse().ok().filter(|n| (1..=1024).contains(n)).ok_or_else(bad)?;
            }
            "luna.upload_slots" => {
                let bad = || CmdlineError::Bad { key: "luna.upload_slots", value: value.into() };
                upload_slots = value.parse().ok().filter(|n| *n <= 1024).ok_or_else(bad)?;
            }
            // PXE's form: hardware type 01 (ethernet), then the MAC with dashes.
            "BOOTIF" => {
                let bad = || CmdlineError::Bad { key: "BOOTIF", value: value.into() };
                let hw = value.strip_prefix("01-").ok_or_else(bad)?;
                bootif = Some(hw.parse::<MacAddr>().map_err(|_| bad())?);
            }
            _ => {}
        }
    }
    let url = url.filter(|u| !u.is_empty()).ok_or(CmdlineError::Missing("luna.url"))?;
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(CmdlineError::Bad { key: "luna.url", value: url });
    }
    let node = node.filter(|n| !n.is_empty()).ok_or(CmdlineError::Missing("luna.node"))?;
    Ok(BootArgs {
        url,
        fallbacks,
        node,
        token: token.unwrap_or_default(),
        mac: mac.or(bootif),
        service,
        stall,
        linger,
        piece_spread,
        upload_slots,
        peer_limit,
    })
}

pub fn read(path: &Path) -> Result<BootArgs, CmdlineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CmdlineError::Read { path: path.display().to_string(), reason: e.to_string() })?;
    parse(&text)
}

/// Finds the network interface whose MAC is `mac` under `/sys/class/net` (or a test copy).
pub fn find_nic(sys_class_net: &Path, mac: MacAddr) -> Option<String> {
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Deterministic when a bond/VLAN shares the MAC: the plain name sorts first.
    names.sort();
    names.into_iter().find(|name| {
        std::fs::read_to_string(sys_class_net.join(name).join("address"))
            .ok()
            .and_then(|a| a.trim().parse::<MacAddr>().ok())
            == Some(mac)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "BOOT_IMAGE=vmlinuz root=luna luna.url=http://10.141.255.254:7050/ luna.node=node001 \
        luna.mac=52:54:00:12:34:56 luna.token=abc ip=dhcp BOOTIF=01-52-54-00-aa-bb-cc quiet\n";

    #[test]
    fn parses_the_ipxe_line() {
        let a = parse(LINE).unwrap();
        assert_eq!(a.url, "http://10.141.255.254:7050");
        assert_eq!(a.node, "node001");
        assert_eq!(a.token, "abc");
        assert_eq!(a.mac, Some("52:54:00:12:34:56".parse().unwrap()));
        assert!(!a.service);
        assert_eq!(a.stall, DEFAULT_STALL);
        assert_eq!(a.linger, DEFAULT_LINGER);
    }

    #[test]
    fn bootif_when_no_luna_mac_and_options() {
        let a =
            parse("luna.url=http://s:1 luna.node=n1 BOOTIF=01-52-54-00-aa-bb-cc luna.service=1 luna.stall=5").unwrap();
        assert_eq!(a.mac, Some("52:54:00:aa:bb:cc".parse().unwrap()));
        assert!(a.service);
        assert_eq!(a.stall, Duration::from_secs(5));
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1 luna.linger=0").unwrap().linger, Duration::ZERO);
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1 luna.piece_spread=1").unwrap().piece_spread, 1);
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1").unwrap().upload_slots, DEFAULT_UPLOAD_SLOTS);
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1 luna.upload_slots=0").unwrap().upload_slots, 0);
        assert_eq!(
            parse("luna.url=http://s:1 luna.node=n1 luna.upload_slots=-1"),
            Err(CmdlineError::Bad { key: "luna.upload_slots", value: "-1".into() })
        );
        assert_eq!(
            parse("luna.url=http://s:1 luna.node=n1 luna.upload_slots=4096"),
            Err(CmdlineError::Bad { key: "luna.upload_slots", value: "4096".into() })
        );
        assert!(parse("luna.url=http://s:1 luna.node=n1 luna.service").unwrap().service);
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1").unwrap().peer_limit, DEFAULT_PEER_LIMIT);
        assert_eq!(parse("luna.url=http://s:1 luna.node=n1 luna.peer_limit=64").unwrap().peer_limit, 64);
        for bad in ["0", "1025", "-3", "many"] {
            assert_eq!(
                parse(&format!("luna.url=http://s:1 luna.node=n1 luna.peer_limit={bad}")),
                Err(CmdlineError::Bad { key: "luna.peer_limit", value: bad.into() })
            );
        }
    }

    #[test]
    fn quoted_values() {
        assert_eq!(words(r#"a="b c" d"#), vec!["a=b c", "d"]);
    }

    #[test]
    fn errors_name_the_input() {
        assert_eq!(parse("luna.node=n"), Err(CmdlineError::Missing("luna.url")));
        let a = parse("luna.url=http://a:1 luna.node=n luna.fallback=http://b:1/,https://c:2").unwrap();
        assert_eq!(a.fallbacks, ["http://b:1", "https://c:2"]);
        assert!(parse("luna.url=http://a:1 luna.node=n").unwrap().fallbacks.is_empty());
        assert_eq!(
            parse("luna.url=http://a:1 luna.node=n luna.fallback=http://b:1,ftp://c"),
            Err(CmdlineError::Bad { key: "luna.fallback", value: "ftp://c".into() })
        );
        assert_eq!(parse("luna.url=http://x"), Err(CmdlineError::Missing("luna.node")));
        assert_eq!(
            parse("luna.url=ftp://x luna.node=n"),
            Err(CmdlineError::Bad { key: "luna.url", value: "ftp://x".into() })
        );
        let e = parse("luna.url=http://x luna.node=n luna.stall=soon").unwrap_err();
        assert_eq!(e.to_string(), "kernel command line has a bad luna.stall: 'soon'");
        let e = parse("luna.url=http://x luna.node=n luna.linger=-1").unwrap_err();
        assert_eq!(e.to_string(), "kernel command line has a bad luna.linger: '-1'");
        let e = parse("luna.url=http://x luna.node=n luna.piece_spread=0").unwrap_err();
        assert_eq!(e.to_string(), "kernel command line has a bad luna.piece_spread: '0'");
        assert!(parse("luna.url=http://x luna.node=n BOOTIF=52-54-00-aa-bb-cc").is_err());
    }

    #[test]
    fn finds_nic_by_mac() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mac) in [("lo", "00:00:00:00:00:00"), ("ens3", "52:54:00:AA:bb:cc"), ("ens4", "52:54:00:aa:bb:cd")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        assert_eq!(find_nic(dir.path(), "52:54:00:aa:bb:cc".parse().unwrap()).as_deref(), Some("ens3"));
        assert_eq!(find_nic(dir.path(), "52:54:00:aa:bb:ce".parse().unwrap()), None);
    }
}
