//! The objects luna keeps, their validation, what they refer to and what they claim.
//!
//! Invariants:
//! - every object kind is defined here and only here; the store sees JSON documents of these types;
//! - `validate` checks everything that can be checked from the object alone; checks that need other
//!   objects (does the group exist, is the IP inside the network) live in the server's service layer;
//! - `claims` lists the globally unique keys an object holds (MACs, IPs, switch ports). The store
//!   keeps one claim record per key, which is what makes uniqueness race-free on every backend.

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::mac::MacAddr;

/// The kinds of object, in the order they usually get created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Cluster,
    Network,
    Osimage,
    Bmcsetup,
    Group,
    Node,
    Switch,
    Otherdev,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Cluster,
        Kind::Network,
        Kind::Osimage,
        Kind::Bmcsetup,
        Kind::Group,
        Kind::Node,
        Kind::Switch,
        Kind::Otherdev,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Cluster => "cluster",
            Kind::Network => "network",
            Kind::Osimage => "osimage",
            Kind::Bmcsetup => "bmcsetup",
            Kind::Group => "group",
            Kind::Node => "node",
            Kind::Switch => "switch",
            Kind::Otherdev => "otherdev",
        }
    }

    /// Kinds whose objects may refer to objects of `self`.
    pub fn referrers(self) -> &'static [Kind] {
        match self {
            Kind::Network => &[Kind::Group, Kind::Node, Kind::Switch, Kind::Otherdev],
            Kind::Osimage | Kind::Bmcsetup => &[Kind::Group],
            Kind::Group | Kind::Switch => &[Kind::Node],
            Kind::Cluster | Kind::Node | Kind::Otherdev => &[],
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s).ok_or_else(|| {
            ModelError::invalid(
                "object kind",
                s,
                "expected one of cluster, network, osimage, bmcsetup, group, node, switch, otherdev",
            )
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("invalid {field} '{value}': {reason}")]
    Invalid { field: String, value: String, reason: String },
    #[error("invalid {kind} document: {reason}")]
    Document { kind: Kind, reason: String },
}

impl ModelError {
    pub fn invalid(field: impl Into<String>, value: impl fmt::Display, reason: impl Into<String>) -> Self {
        ModelError::Invalid { field: field.into(), value: value.to_string(), reason: reason.into() }
    }
}

/// Checks an object name: 1–63 characters of letters, digits, `-`, `_`, `.`, starting with a
/// letter or digit. Node names must also be valid host names (no `_` or `.`).
pub fn validate_name(kind: Kind, name: &str) -> Result<(), ModelError> {
    let field = format!("{kind} name");
    if name.is_empty() || name.len() > 63 {
        return Err(ModelError::invalid(field, name, "must be 1 to 63 characters"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(ModelError::invalid(field, name, "must start with a letter or digit"));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || (kind != Kind::Node && (c == '_' || c == '.'));
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(ModelError::invalid(field, name, format!("character '{c}' is not allowed")));
    }
    Ok(())
}

/// An inclusive IPv4 range, written `10.141.0.1-10.141.0.9` or as a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

impl IpRange {
    pub fn single(ip: Ipv4Addr) -> Self {
        IpRange { start: ip, end: ip }
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.start <= ip && ip <= self.end
    }
    pub fn len(&self) -> u64 {
        u64::from(u32::from(self.end)) - u64::from(u32::from(self.start)) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.start <= other.end && other.start <= self.end
    }
}

impl FromStr for IpRange {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| ModelError::invalid("address range", s, why);
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let start: Ipv4Addr =
            a.trim().parse().map_err(|_| bad("not an IPv4 address or range like 10.0.0.1-10.0.0.9"))?;
        let end: Ipv4Addr = b.trim().parse().map_err(|_| bad("not an IPv4 address or range like 10.0.0.1-10.0.0.9"))?;
        if start > end {
            return Err(bad("the range runs backwards"));
        }
        Ok(IpRange { start, end })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl Serialize for IpRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A secret string: serialised as-is (the API redacts it), but never printed by `Debug`, so it
/// cannot end up in a log line.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"********\"")
    }
}

pub const REDACTED: &str = "********";

fn is_false(b: &bool) -> bool {
    !*b
}

// ---------------------------------------------------------------------------------------------
// cluster

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub name: String,
    /// The server's address on the provisioning network; boot URLs and the tracker use it.
    pub frontend_address: Option<Ipv4Addr>,
    pub http_port: u16,
    pub nodename_prefix: String,
    pub nodename_digits: u8,
    /// Seconds between announces that the tracker asks for.
    pub tracker_interval: u32,
    pub tracker_max_peers: u32,
    /// Interface(s) DHCP answers on; nothing is answered anywhere else.
    pub dhcp_interfaces: Vec<String>,
    /// Addresses for machines luna does not know yet; unset means discovery is off.
    pub dhcp_range: Option<IpRange>,
    pub domain: String,
    /// SSH public keys put into root's authorized keys by cloud-init (NoCloud `user-data`).
    pub ssh_authorized_keys: Vec<String>,
    pub comment: String,
    pub rev: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            name: "luna".into(),
            frontend_address: None,
            http_port: 7050,
            nodename_prefix: "node".into(),
            nodename_digits: 3,
            tracker_interval: 30,
            tracker_max_peers: 50,
            dhcp_interfaces: Vec::new(),
            dhcp_range: None,
            domain: "cluster".into(),
            ssh_authorized_keys: Vec::new(),
            comment: String::new(),
            rev: 0,
        }
    }
}

impl Cluster {
    /// The store key of the one cluster object.
    pub const KEY: &'static str = "cluster";

    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Cluster, &self.name)?;
        if self.http_port == 0 {
            return Err(ModelError::invalid("http_port", self.http_port, "must be 1 to 65535"));
        }
        if !(1..=10).contains(&self.nodename_digits) {
            return Err(ModelError::invalid("nodename_digits", self.nodename_digits, "must be 1 to 10"));
        }
        if self.tracker_interval < 5 {
            return Err(ModelError::invalid("tracker_interval", self.tracker_interval, "must be at least 5 seconds"));
        }
        if self.tracker_max_peers == 0 {
            return Err(ModelError::invalid("tracker_max_peers", 0, "must be at least 1"));
        }
        validate_domain(&self.domain)?;
        for k in &self.ssh_authorized_keys {
            validate_ssh_key(k)?;
        }
        for i in &self.dhcp_interfaces {
            validate_ifname("dhcp interface", i)?;
        }
        Ok(())
    }

    /// The name given to the n-th automatically named node: prefix + zero-padded number.
    pub fn node_name(&self, n: u64) -> String {
        format!("{}{:0width$}", self.nodename_prefix, n, width = self.nodename_digits as usize)
    }
}

/// One line of an `authorized_keys` file: `TYPE BASE64 [COMMENT]`, no line breaks.
fn validate_ssh_key(key: &str) -> Result<(), ModelError> {
    let mut words = key.split_whitespace();
    let kind = words.next().unwrap_or("");
    let blob = words.next().unwrap_or("");
    let kind_ok = kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
    let blob_ok = !blob.is_empty() && blob.bytes().all(|c| c.is_ascii_alphanumeric() || b"+/=".contains(&c));
    if !kind_ok || !blob_ok || key.contains(['\n', '\r']) {
        let shown: String = key.chars().take(40).collect();
        return Err(ModelError::invalid(
            "ssh key",
            shown,
            "must be one line: TYPE BASE64 [COMMENT] (ssh-ed25519 AAAA...)",
        ));
    }
    Ok(())
}

fn validate_domain(domain: &str) -> Result<(), ModelError> {
    if domain.is_empty() {
        return Ok(());
    }
    for label in domain.split('.') {
        if label.is_empty() || label.len() > 63 || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ModelError::invalid(
                "domain",
                domain,
                "must be dot-separated labels of letters, digits and '-'",
            ));
        }
    }
    Ok(())
}

fn validate_ifname(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() || name.len() > 15 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-:".contains(c)) {
        return Err(ModelError::invalid(
            field,
            name,
            "must be 1 to 15 characters of letters, digits, '_', '.', '-', ':'",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// network

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    #[serde(deserialize_with = "de_cidr")]
    pub cidr: Ipv4Net,
    /// Reserved for dual-stack networks; allocation is IPv4-only today.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr6: Option<ipnet::Ipv6Net>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns_server: Option<Ipv4Addr>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// Addresses never handed out (switches' own, the DHCP range, anything outside luna).
    #[serde(default)]
    pub reserved: Vec<IpRange>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Net, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!("invalid cidr '{s}': expected an IPv4 network like 10.141.0.0/16"))
    })
}

fn default_mtu() -> u16 {
    1500
}

impl Network {
    pub fn new(name: &str, cidr: Ipv4Net) -> Self {
        Network {
            name: name.into(),
            cidr,
            cidr6: None,
            gateway: None,
            dns_server: None,
            mtu: 1500,
            reserved: Vec::new(),
            comment: String::new(),
            rev: 0,
        }
    }

    /// The first and last address a host may have (network and broadcast excluded).
    pub fn host_range(&self) -> IpRange {
        let net = u32::from(self.cidr.network());
        let bc = u32::from(self.cidr.broadcast());
        IpRange { start: Ipv4Addr::from(net + 1), end: Ipv4Addr::from(bc - 1) }
    }

    pub fn contains_host(&self, ip: Ipv4Addr) -> bool {
        self.host_range().contains(ip)
    }

    /// Whether `ip` is unavailable for allocation because the network itself holds it.
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        Some(ip) == self.gateway || self.reserved.iter().any(|r| r.contains(ip))
    }

    /// Adds a reserved range, merging it with ranges it overlaps or touches.
    pub fn reserve(&mut self, r: IpRange) {
        let mut merged = r;
        let touches = |a: &IpRange, b: &IpRange| {
            u64::from(u32::from(a.start)) <= u64::from(u32::from(b.end)) + 1
                && u64::from(u32::from(b.start)) <= u64::from(u32::from(a.end)) + 1
        };
        self.reserved.retain(|x| {
            if touches(x, &merged) {
                merged = IpRange { start: merged.start.min(x.start), end: merged.end.max(x.end) };
                false
            } else {
                true
            }
        });
        self.reserved.push(merged);
        self.reserved.sort();
    }

    /// Removes `r` from the reserved ranges, splitting ranges it cuts through.
    pub fn release(&mut self, r: IpRange) {
        let mut out = Vec::new();
        for x in self.reserved.drain(..) {
            if !x.overlaps(&r) {
                out.push(x);
                continue;
            }
            if x.start < r.start {
                out.push(IpRange { start: x.start, end: Ipv4Addr::from(u32::from(r.start) - 1) });
            }
            if x.end > r.end {
                out.push(IpRange { start: Ipv4Addr::from(u32::from(r.end) + 1), end: x.end });
            }
        }
        self.reserved = out;
    }

    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Network, &self.name)?;
        if self.cidr.prefix_len() > 30 {
            return Err(ModelError::invalid("cidr", self.cidr, "prefix must be /30 or shorter to hold hosts"));
        }
        if self.cidr.addr() != self.cidr.network() {
            return Err(ModelError::invalid(
                "cidr",
                self.cidr,
                format!("host bits are set; did you mean {}/{}?", self.cidr.network(), self.cidr.prefix_len()),
            ));
        }
        if let Some(gw) = self.gateway {
            if !self.contains_host(gw) {
                return Err(ModelError::invalid("gateway", gw, format!("is not a host address of {}", self.cidr)));
            }
        }
        if !(576..=9216).contains(&self.mtu) {
            return Err(ModelError::invalid("mtu", self.mtu, "must be 576 to 9216"));
        }
        for r in &self.reserved {
            if !self.cidr.contains(&r.start) || !self.cidr.contains(&r.end) {
                return Err(ModelError::invalid("reserved range", r, format!("is not inside {}", self.cidr)));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// osimage

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Osimage {
    pub name: String,
    /// The chroot tree the image is packed from.
    pub path: String,
    #[serde(default)]
    pub kernel_version: Option<String>,
    #[serde(default)]
    pub kernel_opts: String,
    #[serde(default)]
    pub dracut_modules_add: Vec<String>,
    #[serde(default)]
    pub dracut_modules_omit: Vec<String>,
    #[serde(default)]
    pub dracut_drivers_add: Vec<String>,
    #[serde(default)]
    pub dracut_drivers_omit: Vec<String>,
    /// Paths (globs, relative to the chroot) left out of the packed archive.
    #[serde(default = "default_grab_exclude")]
    pub grab_exclude: Vec<String>,
    /// How nodes booting this image make their root (groups may override it).
    #[serde(default)]
    pub root: RootMode,
    /// Published revisions, newest last (filled in by `luna osimage pack`).
    #[serde(default)]
    pub revisions: Vec<ImageRevision>,
    /// The revision nodes boot; `None` until the first pack.
    #[serde(default)]
    pub current_revision: Option<u32>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

/// Left out of packed archives and of `luna osimage grab`: the API filesystems' contents,
/// scratch and caches, logs, the node's identity (machine-id, ssh host keys) and the files the
/// agent writes on install (hostname, network configuration).
pub fn default_grab_exclude() -> Vec<String> {
    [
        "proc/*",
        "sys/*",
        "dev/*",
        "tmp/*",
        "run/*",
        "var/tmp/*",
        "var/cache/*",
        "var/log/*",
        "etc/machine-id",
        "etc/ssh/ssh_host_*",
        "etc/hostname",
        "etc/sysconfig/network-scripts/ifcfg-*",
        "etc/NetworkManager/system-connections/luna-*",
        "etc/systemd/network/10-luna-*",
    ]
    .map(String::from)
    .to_vec()
}

/// One published, immutable build of an osimage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRevision {
    pub id: u32,
    /// Unix seconds.
    pub created: u64,
    pub kernel_version: String,
    pub archive: String,
    pub archive_size: u64,
    pub sha256: String,
    pub kernel: String,
    pub initrd: String,
    /// SHA-256 (lower-case hex) of the kernel and of the initramfs: the other servers check
    /// their copies against them before publishing a replica. Empty in revisions packed before
    /// they were recorded (such a replica is published unchecked, with a warning).
    #[serde(default)]
    pub kernel_sha256: String,
    #[serde(default)]
    pub initrd_sha256: String,
    pub torrent: String,
    pub info_hash: String,
    /// Torrent piece size in bytes (0 in revisions packed before it was recorded).
    #[serde(default)]
    pub piece_length: u64,
    /// Bytes of file data read from the chroot for the archive; with `archive_size` it gives the
    /// compression ratio the next pack uses to pick its piece size. 0 when unknown.
    #[serde(default)]
    pub tree_bytes: u64,
    /// The same tree as a squashfs with its own torrent, for nodes in `overlay` root mode;
    /// `None` when no node used that mode at pack time (or packed before it existed).
    #[serde(default)]
    pub squashfs: Option<SquashfsImage>,
}

/// A revision's squashfs: file names inside the revision directory, digest and torrent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SquashfsImage {
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub torrent: String,
    pub info_hash: String,
    pub piece_length: u64,
}

impl Osimage {
    pub fn new(name: &str, path: &str) -> Self {
        Osimage {
            name: name.into(),
            path: path.into(),
            kernel_version: None,
            kernel_opts: String::new(),
            dracut_modules_add: Vec::new(),
            dracut_modules_omit: Vec::new(),
            dracut_drivers_add: Vec::new(),
            dracut_drivers_omit: Vec::new(),
            grab_exclude: default_grab_exclude(),
            root: RootMode::default(),
            revisions: Vec::new(),
            current_revision: None,
            comment: String::new(),
            rev: 0,
        }
    }

    pub fn current(&self) -> Option<&ImageRevision> {
        let id = self.current_revision?;
        self.revisions.iter().find(|r| r.id == id)
    }

    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Osimage, &self.name)?;
        if !self.path.starts_with('/') {
            return Err(ModelError::invalid("osimage path", &self.path, "must be an absolute path"));
        }
        if let Some(k) = &self.kernel_version {
            if k.is_empty() || k.contains('/') || k.chars().any(char::is_whitespace) {
                return Err(ModelError::invalid("kernel version", k, "must be a version like 6.1.0-28-amd64"));
            }
        }
        if let Some(cur) = self.current_revision {
            if !self.revisions.iter().any(|r| r.id == cur) {
                return Err(ModelError::invalid("current revision", cur, "no such revision is kept"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// bmcsetup

/// How a node's root filesystem is made from its image (`osimage.root`, `group.root`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootMode {
    /// The image unpacked into a tmpfs (RAM).
    #[default]
    Tmpfs,
    /// A read-only squashfs of the image under an overlayfs whose upper layer is a tmpfs.
    Overlay,
    /// The image installed onto local disks prepared by the part-script; later boots are local.
    Disk,
}

impl RootMode {
    pub const ALL: [RootMode; 3] = [RootMode::Tmpfs, RootMode::Overlay, RootMode::Disk];

    pub fn as_str(self) -> &'static str {
        match self {
            RootMode::Tmpfs => "tmpfs",
            RootMode::Overlay => "overlay",
            RootMode::Disk => "disk",
        }
    }
}

impl fmt::Display for RootMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RootMode {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RootMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| ModelError::invalid("root mode", s, "expected tmpfs, overlay or disk"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BmcProtocol {
    #[default]
    Ipmi,
    Redfish,
}

impl FromStr for BmcProtocol {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ipmi" => Ok(BmcProtocol::Ipmi),
            "redfish" => Ok(BmcProtocol::Redfish),
            _ => Err(ModelError::invalid("bmc protocol", s, "expected ipmi or redfish")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bmcsetup {
    pub name: String,
    #[serde(default = "default_userid")]
    pub userid: u8,
    pub user: String,
    /// The group-wide password; not needed (and not sent to nodes) with `per_node_password`.
    #[serde(default)]
    pub password: Secret,
    /// Each node gets its own random password, generated by luna on its first install plan and
    /// kept on the node (`Node::bmc_password`), so one leaked password opens one BMC.
    #[serde(default, skip_serializing_if = "is_false")]
    pub per_node_password: bool,
    #[serde(default = "one")]
    pub netchannel: u8,
    #[serde(default = "one")]
    pub mgmtchannel: u8,
    #[serde(default)]
    pub protocol: BmcProtocol,
    /// Redfish only: accept the BMC's certificate without verifying it (self-signed BMCs).
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_tls: bool,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

fn default_userid() -> u8 {
    2
}
fn one() -> u8 {
    1
}

impl Bmcsetup {
    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Bmcsetup, &self.name)?;
        if !(1..=63).contains(&self.userid) {
            return Err(ModelError::invalid("bmc user id", self.userid, "must be 1 to 63"));
        }
        if self.user.is_empty() || self.user.len() > 16 {
            return Err(ModelError::invalid("bmc user", &self.user, "must be 1 to 16 characters"));
        }
        if (self.password.0.is_empty() && !self.per_node_password) || self.password.0.len() > 20 {
            // The password itself is never echoed back, not even in an error.
            return Err(ModelError::invalid(
                "bmc password",
                REDACTED,
                "must be 1 to 20 characters (or set per_node_password)",
            ));
        }
        for (field, ch) in [("netchannel", self.netchannel), ("mgmtchannel", self.mgmtchannel)] {
            if ch > 15 {
                return Err(ModelError::invalid(field, ch, "must be 0 to 15"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// group

/// The interface that carries provisioning traffic (PXE, the image download).
pub const BOOTIF: &str = "BOOTIF";
/// The pseudo-interface of the node's BMC.
pub const BMC: &str = "BMC";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupInterface {
    pub name: String,
    pub network: String,
    /// Extra parameters written into the node's interface configuration (e.g. `MTU=9000`).
    #[serde(default)]
    pub params: String,
}

pub const DEFAULT_PARTSCRIPT: &str = "mount -t tmpfs -o size=${LUNA_TMPFS_SIZE:-80%},mode=0755 tmpfs /sysroot\n";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub osimage: String,
    #[serde(default)]
    pub bmcsetup: Option<String>,
    #[serde(default)]
    pub interfaces: Vec<GroupInterface>,
    #[serde(default)]
    pub prescript: String,
    #[serde(default = "default_partscript")]
    pub partscript: String,
    #[serde(default)]
    pub postscript: String,
    #[serde(default = "default_torrent_if")]
    pub torrent_interface: String,
    /// Overrides the osimage's root mode for this group's nodes; `None` inherits it.
    #[serde(default)]
    pub root: Option<RootMode>,
    /// cloud-init `user-data` (`#cloud-config` YAML or a script) served to the group's nodes in
    /// their NoCloud data; empty: a `#cloud-config` with the hostname and the cluster's ssh keys.
    #[serde(default)]
    pub cloudinit_userdata: String,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

fn default_partscript() -> String {
    DEFAULT_PARTSCRIPT.into()
}
fn default_torrent_if() -> String {
    BOOTIF.into()
}

impl Group {
    pub fn new(name: &str, osimage: &str) -> Self {
        Group {
            name: name.into(),
            osimage: osimage.into(),
            bmcsetup: None,
            interfaces: Vec::new(),
            prescript: String::new(),
            partscript: default_partscript(),
            postscript: String::new(),
            torrent_interface: default_torrent_if(),
            root: None,
            cloudinit_userdata: String::new(),
            domain: None,
            comment: String::new(),
            rev: 0,
        }
    }

    pub fn interface(&self, name: &str) -> Option<&GroupInterface> {
        self.interfaces.iter().find(|i| i.name == name)
    }

    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Group, &self.name)?;
        let mut seen = BTreeSet::new();
        for i in &self.interfaces {
            validate_ifname("interface name", &i.name)?;
            if !seen.insert(&i.name) {
                return Err(ModelError::invalid("interface name", &i.name, "is listed twice"));
            }
        }
        if !self.interfaces.is_empty()
            && self.torrent_interface != BMC
            && self.interface(&self.torrent_interface).is_none()
        {
            return Err(ModelError::invalid(
                "torrent interface",
                &self.torrent_interface,
                "is not one of the group's interfaces",
            ));
        }
        if let Some(d) = &self.domain {
            validate_domain(d)?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// node

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeInterface {
    pub name: String,
    pub network: String,
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// MAC of a non-boot interface, when known (the BOOTIF MAC is `Node::mac`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeStatus {
    /// What the node is doing: `dhcp`, `ipxe`, `kernel`, `download`, `installed` (the agent, about to
    /// switch root), `booted` (the booted OS), `service`, `error`…
    pub step: String,
    #[serde(default)]
    pub progress: Option<u8>,
    /// Unix seconds of the last report.
    pub time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: String,
    pub group: String,
    /// The BOOTIF (provisioning NIC) MAC.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    #[serde(default)]
    pub interfaces: Vec<NodeInterface>,
    #[serde(default)]
    pub switch: Option<String>,
    /// The port on `switch`: its bridge port number or its name (see [`SwitchPort`]).
    #[serde(default)]
    pub port: Option<SwitchPort>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub localboot: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub service: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub setupbmc: bool,
    /// The node's own BMC password when its group's bmcsetup has `per_node_password`: generated
    /// by luna-server, never set through the API, shown only with `?secrets=1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bmc_password: Option<Secret>,
    #[serde(default)]
    pub status: Option<NodeStatus>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

impl Node {
    pub fn new(name: &str, group: &str) -> Self {
        Node {
            name: name.into(),
            group: group.into(),
            mac: None,
            interfaces: Vec::new(),
            switch: None,
            port: None,
            localboot: false,
            service: false,
            setupbmc: false,
            bmc_password: None,
            status: None,
            comment: String::new(),
            rev: 0,
        }
    }

    pub fn interface(&self, name: &str) -> Option<&NodeInterface> {
        self.interfaces.iter().find(|i| i.name == name)
    }

    /// The address on the provisioning interface.
    pub fn boot_ip(&self) -> Option<Ipv4Addr> {
        self.interface(BOOTIF).and_then(|i| i.ip)
    }

    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Node, &self.name)?;
        let mut seen = BTreeSet::new();
        let mut macs = BTreeSet::new();
        macs.extend(self.mac);
        for i in &self.interfaces {
            validate_ifname("interface name", &i.name)?;
            if !seen.insert(&i.name) {
                return Err(ModelError::invalid("interface name", &i.name, "is listed twice"));
            }
            if let Some(m) = i.mac {
                if !macs.insert(m) {
                    return Err(ModelError::invalid("mac", m, format!("is used twice on node {}", self.name)));
                }
            }
        }
        if let Some(p) = &self.port {
            if self.switch.is_none() {
                return Err(ModelError::invalid("port", p, "needs a switch"));
            }
            p.validate()?;
        }
        if let Some(s) = &self.status {
            if s.progress.is_some_and(|p| p > 100) {
                return Err(ModelError::invalid("status progress", s.progress.unwrap_or_default(), "must be 0 to 100"));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// switch, otherdev

/// A node's port on its switch: the bridge port number (`7`, dot1dBasePort) or the port's name
/// as the switch reports it in IF-MIB ifName/ifDescr (`Gi1/0/7`, `swp7`). A name is never all
/// digits (that is a number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SwitchPort {
    Number(u32),
    Name(String),
}

impl fmt::Display for SwitchPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SwitchPort::Number(n) => write!(f, "{n}"),
            SwitchPort::Name(s) => f.write_str(s),
        }
    }
}

impl std::str::FromStr for SwitchPort {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let p = if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            SwitchPort::Number(
                s.parse().map_err(|_| ModelError::invalid("port", s, "must be a port number or a port name"))?,
            )
        } else {
            SwitchPort::Name(s.to_string())
        };
        p.validate()?;
        Ok(p)
    }
}

impl SwitchPort {
    fn validate(&self) -> Result<(), ModelError> {
        let SwitchPort::Name(s) = self else { return Ok(()) };
        if s.is_empty() || s.len() > 64 {
            return Err(ModelError::invalid("port", s, "a port name must be 1 to 64 characters"));
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ModelError::invalid("port", s, "is a number: give it as a number, not a string"));
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(ModelError::invalid("port", s, format!("character {c:?} is not allowed in a port name")));
        }
        Ok(())
    }
}

/// dot1qTpFdbPort from Q-BRIDGE-MIB: MAC → bridge port, per VLAN.
pub const DEFAULT_FDB_OID: &str = "1.3.6.1.2.1.17.7.1.2.2.1.2";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Switch {
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    #[serde(default = "default_community")]
    pub community: Secret,
    #[serde(default = "default_fdb_oid")]
    pub oid: String,
    /// Ports that lead to other switches; MACs learnt there are not this switch's nodes.
    #[serde(default)]
    pub uplinks: Vec<u32>,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

fn default_community() -> Secret {
    Secret("public".into())
}
fn default_fdb_oid() -> String {
    DEFAULT_FDB_OID.into()
}

impl Switch {
    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Switch, &self.name)?;
        validate_oid(&self.oid)?;
        if self.community.0.is_empty() {
            return Err(ModelError::invalid("snmp community", "", "must not be empty"));
        }
        Ok(())
    }
}

fn validate_oid(oid: &str) -> Result<(), ModelError> {
    let ok = !oid.is_empty()
        && oid.trim_start_matches('.').split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(ModelError::invalid("oid", oid, "must be numeric like 1.3.6.1.2.1.17.7.1.2.2.1.2"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Otherdev {
    pub name: String,
    pub network: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub rev: u64,
}

impl Otherdev {
    fn validate(&self) -> Result<(), ModelError> {
        validate_name(Kind::Otherdev, &self.name)
    }
}

// ---------------------------------------------------------------------------------------------
// generic handling

/// Any object, for code that treats all kinds alike (the store, the generic API handlers).
#[derive(Debug, Clone, PartialEq)]
pub enum AnyObject {
    Cluster(Cluster),
    Network(Network),
    Osimage(Osimage),
    Bmcsetup(Bmcsetup),
    Group(Group),
    Node(Node),
    Switch(Switch),
    Otherdev(Otherdev),
}

macro_rules! each {
    ($self:expr, $o:ident => $e:expr) => {
        match $self {
            AnyObject::Cluster($o) => $e,
            AnyObject::Network($o) => $e,
            AnyObject::Osimage($o) => $e,
            AnyObject::Bmcsetup($o) => $e,
            AnyObject::Group($o) => $e,
            AnyObject::Node($o) => $e,
            AnyObject::Switch($o) => $e,
            AnyObject::Otherdev($o) => $e,
        }
    };
}

/// A key only one object may hold at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Claim {
    Mac(MacAddr),
    Ip { network: String, ip: Ipv4Addr },
    SwitchPort { switch: String, port: SwitchPort },
}

impl Claim {
    /// The store key; prefixes make per-network listing a range scan.
    pub fn key(&self) -> String {
        match self {
            Claim::Mac(m) => format!("mac/{m}"),
            Claim::Ip { network, ip } => format!("ip/{network}/{ip}"),
            Claim::SwitchPort { switch, port } => format!("port/{switch}/{port}"),
        }
    }

    pub fn ip_prefix(network: &str) -> String {
        format!("ip/{network}/")
    }

    pub fn describe(&self) -> String {
        match self {
            Claim::Mac(m) => format!("mac {m}"),
            Claim::Ip { network, ip } => format!("ip {ip} on network {network}"),
            Claim::SwitchPort { switch, port } => format!("port {port} of switch {switch}"),
        }
    }
}

impl AnyObject {
    pub fn from_value(kind: Kind, value: serde_json::Value) -> Result<Self, ModelError> {
        fn de<T: serde::de::DeserializeOwned>(kind: Kind, v: serde_json::Value) -> Result<T, ModelError> {
            serde_json::from_value(v).map_err(|e| ModelError::Document { kind, reason: e.to_string() })
        }
        Ok(match kind {
            Kind::Cluster => AnyObject::Cluster(de(kind, value)?),
            Kind::Network => AnyObject::Network(de(kind, value)?),
            Kind::Osimage => AnyObject::Osimage(de(kind, value)?),
            Kind::Bmcsetup => AnyObject::Bmcsetup(de(kind, value)?),
            Kind::Group => AnyObject::Group(de(kind, value)?),
            Kind::Node => AnyObject::Node(de(kind, value)?),
            Kind::Switch => AnyObject::Switch(de(kind, value)?),
            Kind::Otherdev => AnyObject::Otherdev(de(kind, value)?),
        })
    }

    pub fn to_value(&self) -> serde_json::Value {
        each!(self, o => serde_json::to_value(o).expect("objects always serialise"))
    }

    pub fn kind(&self) -> Kind {
        match self {
            AnyObject::Cluster(_) => Kind::Cluster,
            AnyObject::Network(_) => Kind::Network,
            AnyObject::Osimage(_) => Kind::Osimage,
            AnyObject::Bmcsetup(_) => Kind::Bmcsetup,
            AnyObject::Group(_) => Kind::Group,
            AnyObject::Node(_) => Kind::Node,
            AnyObject::Switch(_) => Kind::Switch,
            AnyObject::Otherdev(_) => Kind::Otherdev,
        }
    }

    pub fn name(&self) -> &str {
        each!(self, o => &o.name)
    }

    /// The store key: the name, except for the one cluster object.
    pub fn key(&self) -> &str {
        match self {
            AnyObject::Cluster(_) => Cluster::KEY,
            _ => self.name(),
        }
    }

    pub fn set_name(&mut self, name: &str) {
        each!(self, o => o.name = name.to_string())
    }

    pub fn rev(&self) -> u64 {
        each!(self, o => o.rev)
    }

    pub fn set_rev(&mut self, rev: u64) {
        each!(self, o => o.rev = rev)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        each!(self, o => o.validate())
    }

    /// The objects this one names, as (kind, name).
    pub fn references(&self) -> Vec<(Kind, String)> {
        let mut out = Vec::new();
        match self {
            AnyObject::Cluster(_) | AnyObject::Network(_) | AnyObject::Osimage(_) | AnyObject::Bmcsetup(_) => {}
            AnyObject::Group(g) => {
                out.push((Kind::Osimage, g.osimage.clone()));
                out.extend(g.bmcsetup.iter().map(|b| (Kind::Bmcsetup, b.clone())));
                out.extend(g.interfaces.iter().map(|i| (Kind::Network, i.network.clone())));
            }
            AnyObject::Node(n) => {
                out.push((Kind::Group, n.group.clone()));
                out.extend(n.switch.iter().map(|s| (Kind::Switch, s.clone())));
                out.extend(n.interfaces.iter().map(|i| (Kind::Network, i.network.clone())));
            }
            AnyObject::Switch(s) => out.push((Kind::Network, s.network.clone())),
            AnyObject::Otherdev(d) => out.push((Kind::Network, d.network.clone())),
        }
        out.sort();
        out.dedup();
        out
    }

    /// Points references to `kind`/`old` at `new` (renames follow through).
    pub fn rename_reference(&mut self, kind: Kind, old: &str, new: &str) {
        let fix = |s: &mut String| {
            if s == old {
                *s = new.to_string();
            }
        };
        match (self, kind) {
            (AnyObject::Group(g), Kind::Osimage) => fix(&mut g.osimage),
            (AnyObject::Group(g), Kind::Bmcsetup) => g.bmcsetup.iter_mut().for_each(fix),
            (AnyObject::Group(g), Kind::Network) => g.interfaces.iter_mut().for_each(|i| fix(&mut i.network)),
            (AnyObject::Node(n), Kind::Group) => fix(&mut n.group),
            (AnyObject::Node(n), Kind::Switch) => n.switch.iter_mut().for_each(fix),
            (AnyObject::Node(n), Kind::Network) => n.interfaces.iter_mut().for_each(|i| fix(&mut i.network)),
            (AnyObject::Switch(s), Kind::Network) => fix(&mut s.network),
            (AnyObject::Otherdev(d), Kind::Network) => fix(&mut d.network),
            _ => {}
        }
    }

    /// The unique keys this object holds.
    pub fn claims(&self) -> Vec<Claim> {
        let mut out = Vec::new();
        match self {
            AnyObject::Node(n) => {
                out.extend(n.mac.map(Claim::Mac));
                for i in &n.interfaces {
                    out.extend(i.mac.map(Claim::Mac));
                    out.extend(i.ip.map(|ip| Claim::Ip { network: i.network.clone(), ip }));
                }
                if let (Some(switch), Some(port)) = (&n.switch, &n.port) {
                    out.push(Claim::SwitchPort { switch: switch.clone(), port: port.clone() });
                }
            }
            AnyObject::Switch(s) => out.push(Claim::Ip { network: s.network.clone(), ip: s.ip }),
            AnyObject::Otherdev(d) => out.push(Claim::Ip { network: d.network.clone(), ip: d.ip }),
            _ => {}
        }
        out
    }

    /// The addresses this object holds, as (network, ip), for inside-the-network checks.
    pub fn addresses(&self) -> Vec<(String, Ipv4Addr)> {
        self.claims()
            .into_iter()
            .filter_map(|c| match c {
                Claim::Ip { network, ip } => Some((network, ip)),
                _ => None,
            })
            .collect()
    }

    /// Hides secrets for display.
    pub fn redact(&mut self) {
        match self {
            AnyObject::Bmcsetup(b) => b.password = Secret(REDACTED.into()),
            AnyObject::Switch(s) => s.community = Secret(REDACTED.into()),
            AnyObject::Node(n) => {
                if let Some(p) = n.bmc_password.as_mut() {
                    *p = Secret(REDACTED.into());
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn root_modes_parse_and_default_to_tmpfs() {
        for m in RootMode::ALL {
            assert_eq!(m.as_str().parse::<RootMode>().unwrap(), m);
            assert_eq!(serde_json::to_value(m).unwrap(), json!(m.as_str()));
        }
        let e = "nfs".parse::<RootMode>().unwrap_err().to_string();
        assert!(e.contains("nfs") && e.contains("tmpfs, overlay or disk"), "{e}");
        let o = AnyObject::from_value(Kind::Osimage, json!({"name": "i", "path": "/i"})).unwrap();
        assert!(matches!(o, AnyObject::Osimage(ref i) if i.root == RootMode::Tmpfs));
        let g = AnyObject::from_value(Kind::Group, json!({"name": "g", "osimage": "i", "root": "overlay"})).unwrap();
        assert!(matches!(g, AnyObject::Group(ref g) if g.root == Some(RootMode::Overlay)));
        assert!(AnyObject::from_value(Kind::Group, json!({"name": "g", "osimage": "i", "root": "nfs"})).is_err());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = AnyObject::from_value(Kind::Network, json!({"name": "n", "cidr": "10.0.0.0/16", "gatway": "10.0.0.1"}))
            .unwrap_err();
        assert!(e.to_string().contains("gatway"), "{e}");
    }

    #[test]
    fn network_validation_names_the_input() {
        let mut n = Network::new("ib", "10.141.0.1/16".parse().unwrap());
        let e = AnyObject::Network(n.clone()).validate().unwrap_err().to_string();
        assert!(e.contains("10.141.0.1/16") && e.contains("10.141.0.0/16"), "{e}");
        n.cidr = "10.141.0.0/16".parse().unwrap();
        n.gateway = Some("10.142.0.1".parse().unwrap());
        let e = AnyObject::Network(n.clone()).validate().unwrap_err().to_string();
        assert!(e.contains("gateway '10.142.0.1'"), "{e}");
        n.gateway = Some("10.141.255.254".parse().unwrap());
        AnyObject::Network(n).validate().unwrap();
    }

    #[test]
    fn node_names_are_hostnames() {
        assert!(validate_name(Kind::Node, "node001").is_ok());
        assert!(validate_name(Kind::Node, "node_1").is_err());
        assert!(validate_name(Kind::Group, "gpu_a100").is_ok());
        assert!(validate_name(Kind::Group, "-x").is_err());
        assert!(validate_name(Kind::Group, &"x".repeat(64)).is_err());
    }

    #[test]
    fn claims_and_references_of_a_node() {
        let mut n = Node::new("node001", "compute");
        n.mac = Some("52:54:00:00:00:01".parse().unwrap());
        n.interfaces.push(NodeInterface {
            name: BOOTIF.into(),
            network: "cluster".into(),
            ip: Some("10.141.0.1".parse().unwrap()),
            mac: None,
        });
        n.switch = Some("sw1".into());
        n.port = Some(SwitchPort::Number(7));
        let o = AnyObject::Node(n);
        let keys: Vec<String> = o.claims().iter().map(Claim::key).collect();
        assert_eq!(keys, ["mac/52:54:00:00:00:01", "ip/cluster/10.141.0.1", "port/sw1/7"]);
        assert_eq!(
            o.references(),
            [
                (Kind::Network, "cluster".to_string()),
                (Kind::Group, "compute".to_string()),
                (Kind::Switch, "sw1".to_string())
            ]
        );
    }

    #[test]
    fn rename_follows_through() {
        let mut g = AnyObject::Group(Group::new("compute", "rocky9"));
        g.rename_reference(Kind::Osimage, "rocky9", "rocky9.4");
        assert_eq!(g.references(), [(Kind::Osimage, "rocky9.4".to_string())]);
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let b = Bmcsetup {
            name: "b".into(),
            userid: 2,
            user: "admin".into(),
            password: Secret("hunter2".into()),
            per_node_password: false,
            netchannel: 1,
            mgmtchannel: 1,
            protocol: BmcProtocol::Ipmi,
            insecure_tls: false,
            comment: String::new(),
            rev: 0,
        };
        assert!(!format!("{b:?}").contains("hunter2"));
        let mut o = AnyObject::Bmcsetup(b);
        o.redact();
        assert!(!o.to_value().to_string().contains("hunter2"));
    }

    #[test]
    fn reserve_merges_and_release_splits() {
        let mut n = Network::new("n", "10.0.0.0/24".parse().unwrap());
        n.reserve("10.0.0.10-10.0.0.20".parse().unwrap());
        n.reserve("10.0.0.21-10.0.0.30".parse().unwrap());
        n.reserve("10.0.0.100".parse().unwrap());
        assert_eq!(n.reserved.iter().map(|r| r.to_string()).collect::<Vec<_>>(), ["10.0.0.10-10.0.0.30", "10.0.0.100"]);
        n.release("10.0.0.15-10.0.0.16".parse().unwrap());
        n.release("10.0.0.100".parse().unwrap());
        assert_eq!(
            n.reserved.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["10.0.0.10-10.0.0.14", "10.0.0.17-10.0.0.30"]
        );
    }

    #[test]
    fn ip_ranges_parse() {
        let r: IpRange = "10.0.0.5-10.0.0.9".parse().unwrap();
        assert_eq!(r.len(), 5);
        assert!("10.0.0.9-10.0.0.5".parse::<IpRange>().is_err());
        assert_eq!("10.0.0.7".parse::<IpRange>().unwrap().to_string(), "10.0.0.7");
    }

    #[test]
    fn switch_ports_are_numbers_or_names() {
        assert_eq!("7".parse::<SwitchPort>().unwrap(), SwitchPort::Number(7));
        assert_eq!("Gi1/0/7".parse::<SwitchPort>().unwrap(), SwitchPort::Name("Gi1/0/7".into()));
        assert!("".parse::<SwitchPort>().is_err());
        assert!("Gi 1".parse::<SwitchPort>().unwrap_err().to_string().contains("'Gi 1'"));
        assert!("99999999999".parse::<SwitchPort>().is_err());
        let p: Option<SwitchPort> = serde_json::from_str("7").unwrap();
        assert_eq!(p, Some(SwitchPort::Number(7)));
        let p: SwitchPort = serde_json::from_str("\"swp7\"").unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"swp7\"");
        let mut n = Node::new("node001", "g");
        n.switch = Some("sw1".into());
        n.port = Some(SwitchPort::Name("7".into()));
        assert!(n.validate().unwrap_err().to_string().contains("is a number"));
        n.port = Some(SwitchPort::Name("Gi1/0/7".into()));
        n.validate().unwrap();
        let keys: Vec<String> = AnyObject::Node(n).claims().iter().map(Claim::key).collect();
        assert!(keys.contains(&"port/sw1/Gi1/0/7".to_string()), "{keys:?}");
    }
}
