//! REST wire types shared by the server and the CLI.
//!
//! Routes (all JSON, under [`API_PREFIX`]; writes need `Authorization: Bearer <admin token>`):
//!
//! | method | path                               | body                 | answer            |
//! |--------|------------------------------------|----------------------|-------------------|
//! | GET    | `/{kind}`                          |                      | `[object]`        |
//! | GET    | `/{kind}/{name}`                   |                      | object            |
//! | POST   | `/{kind}`                          | object (`NodeCreate` for nodes) | `[object]` |
//! | PATCH  | `/{kind}/{name}`                   | merge patch (`NodePatch` for nodes, name may be a hostlist) | `[object]` |
//! | DELETE | `/{kind}/{name}`                   |                      | `{"deleted": [names]}` |
//! | POST   | `/{kind}/{name}/rename`            | `RenameRequest`      | object            |
//! | POST   | `/{kind}/{name}/clone`             | `RenameRequest`      | object            |
//! | POST   | `/network/{name}/reserve`, `/release` | `RangeRequest`    | network           |
//! | GET/PATCH | `/cluster`                      |                      | cluster           |
//! | POST   | `/power`                           | `power::PowerRequest` | `power::PowerReply` |
//! | GET    | `/discovery/macs[?switch=NAME]`    |                      | `[SwitchMacs]`    |
//! | GET    | `/cluster/servers`                 |                      | `[ServerInfo]`    |
//! | GET    | `/live[?token=T]`                  |                      | Server-Sent Events, see [`LiveEvent`] |
//!
//! `?secrets=1` on GET shows secrets (admin token required). Every error is an [`ErrorBody`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::mac::MacAddr;
use crate::model::{IpRange, NodeStatus};

pub const API_PREFIX: &str = "/api/v1";

/// Machine-readable error class; the HTTP status is derived from it in one place (the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    NotFound,
    AlreadyExists,
    InUse,
    Conflict,
    Exhausted,
    Unauthorized,
    Forbidden,
    Unavailable,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    pub new_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeRequest {
    pub range: IpRange,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub deleted: Vec<String>,
}

/// `POST /node`: `name` may be a hostlist; all nodes are created in one atomic write.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeCreate {
    pub name: String,
    pub group: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Explicit addresses per interface; the rest are allocated.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ips: BTreeMap<String, Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<crate::model::SwitchPort>,
    #[serde(default)]
    pub localboot: bool,
    #[serde(default)]
    pub service: bool,
    #[serde(default)]
    pub setupbmc: bool,
    #[serde(default)]
    pub comment: String,
}

/// `PATCH /node/{hostlist}`: fields left out stay; `null` clears an optional field.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub mac: Option<Option<MacAddr>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ips: BTreeMap<String, Ipv4Addr>,
    #[serde(default, deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub switch: Option<Option<String>>,
    #[serde(default, deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub port: Option<Option<crate::model::SwitchPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localboot: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setupbmc: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, deserialize_with = "some", skip_serializing_if = "Option::is_none")]
    pub status: Option<Option<NodeStatus>>,
    /// Compare-and-swap: refuse with `conflict` unless the node is at this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rev: Option<u64>,
}

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn some<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so the value is safe as one
/// path segment or one query value (node names in hostlist form carry `[`, `]` and `,`).
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_only_unreserved() {
        assert_eq!(percent_encode("node[001-004],gpu1"), "node%5B001-004%5D%2Cgpu1");
        assert_eq!(percent_encode("a b&c=d/é~x_y.z"), "a%20b%26c%3Dd%2F%C3%A9~x_y.z");
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn patch_tells_null_from_absent() {
        let p: NodePatch = serde_json::from_str(r#"{"mac": null}"#).unwrap();
        assert_eq!(p.mac, Some(None));
        let p: NodePatch = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(p.mac, None);
        assert!(serde_json::from_str::<NodePatch>(r#"{"macc": null}"#).is_err());
        let back = serde_json::to_string(&NodePatch { mac: Some(None), ..Default::default() }).unwrap();
        assert_eq!(back, r#"{"mac":null}"#);
    }
}

/// `GET /boot/plan?node=NAME&token=TOKEN`: everything the agent needs to install a node.
/// Only the node itself may fetch it (boot token from the iPXE command line, or its own BOOTIF IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallPlan {
    pub node: String,
    pub hostname: String,
    pub domain: String,
    pub interfaces: Vec<PlanInterface>,
    /// `None` until the node's osimage has been packed.
    pub image: Option<PlanImage>,
    /// How the root is made: the group's `root`, else the osimage's.
    #[serde(default)]
    pub root: crate::model::RootMode,
    pub prescript: String,
    pub partscript: String,
    pub postscript: String,
    /// Interface whose address the BitTorrent client binds to.
    pub torrent_interface: String,
    pub service: bool,
    pub setupbmc: bool,
    /// The BMC to configure in-band: set only when `setupbmc` and the group has a bmcsetup; its
    /// address comes from the node's `BMC` interface.
    pub bmc: Option<PlanBmc>,
    /// Base URL of the server (`http://10.141.255.254:7050`).
    pub server_url: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanInterface {
    pub name: String,
    pub mac: Option<MacAddr>,
    pub ip: Option<Ipv4Addr>,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Option<Ipv4Addr>,
    pub mtu: u16,
    /// Extra parameters from the group (e.g. `MTU=9000`), written into the interface config.
    pub params: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanImage {
    pub osimage: String,
    pub revision: u32,
    /// Where the `.torrent` can be fetched.
    pub torrent_url: String,
    /// The same archive over HTTP (Range supported): the fallback when the swarm stalls.
    pub http_url: String,
    pub sha256: String,
    pub size: u64,
    pub info_hash: String,
    /// The same archive on the cluster's other servers that hold the revision: the HTTP
    /// fallback tries `http_url` first, then these in turn. Empty with one server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_mirrors: Vec<String>,
    /// The `.torrent` on those servers, tried when `torrent_url` cannot be fetched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub torrent_mirrors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanBmc {
    pub protocol: crate::model::BmcProtocol,
    pub userid: u8,
    pub user: String,
    /// Only ever sent to the node itself (plan authentication); masked in `Debug`.
    pub password: crate::model::Secret,
    pub netchannel: u8,
    pub mgmtchannel: u8,
    pub ip: Option<Ipv4Addr>,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// `POST /boot/status?node=NAME&token=TOKEN`: the agent reports a step.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    /// `plan`, `prescript`, `partscript`, `download`, `http-fallback`, `verify`, `unpack`,
    /// `overlay`, `personality`, `postscript`, `installed`, `service`, `error` (the agent); `booted` (the
    /// installed OS, once up).
    pub step: String,
    #[serde(default)]
    pub progress: Option<u8>,
    #[serde(default)]
    pub message: Option<String>,
    /// Image bytes this node got from other peers so far (download progress, `unpack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_from_peers: Option<u64>,
    /// Image bytes this node got over HTTP (the server's fallback) so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_over_http: Option<u64>,
}

/// `GET /discovery/macs`: what switch-port autodiscovery learned from one switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchMacs {
    pub switch: String,
    /// Unix seconds of the last poll that succeeded (its table is the one shown).
    pub polled_at: Option<u64>,
    /// Seconds since then.
    pub age_secs: Option<u64>,
    /// Why the last poll failed, if it did (the table is then the last good one).
    pub error: Option<String>,
    pub macs: Vec<LearnedMac>,
}

/// One MAC a switch reported on one of its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedMac {
    /// Bridge port number (dot1dBasePort).
    pub port: u32,
    /// ifName (or ifDescr) of the port.
    pub port_name: Option<String>,
    pub if_index: Option<u32>,
    pub mac: MacAddr,
    /// Seconds since this MAC was first seen on this port.
    pub seen_secs: u64,
    /// `listed` or `threshold` when the port is an uplink (its MACs are never bound).
    pub uplink: Option<String>,
    /// The node configured for this port, if any.
    pub node: Option<String>,
    /// Something the admin should know (a second MAC on a bound port…).
    pub note: Option<String>,
}

/// One luna-server of the cluster as its heartbeat record in the store says
/// (`GET /api/v1/cluster/servers`, `luna cluster show`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerInfo {
    /// The server's identity (`[server] id`).
    pub id: String,
    /// Base URLs of its HTTP port (`http://ADDR:PORT`), one per advertised address.
    pub urls: Vec<String>,
    /// Where its seeder takes peers, if it seeds.
    pub seeder: Option<std::net::SocketAddrV4>,
    /// The part of the cluster's `dhcp_range` it hands out (`[dhcp] slice`).
    pub dhcp_slice: Option<IpRange>,
    /// Unix time of its last heartbeat.
    pub heartbeat: u64,
    /// Unix time it started.
    pub started: u64,
    /// luna-server version.
    pub version: String,
    /// Revisions it has published locally (whole, verified) and whether it seeds each.
    #[serde(default)]
    pub holds: Vec<HeldRevision>,
    /// Filled in by the answering server: seconds since the heartbeat (by its clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_secs: Option<u64>,
    /// Filled in by the answering server: no heartbeat for three intervals.
    #[serde(default)]
    pub stale: bool,
}

/// A revision a server holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeldRevision {
    pub osimage: String,
    pub revision: u32,
    pub info_hash: String,
    /// Its seeder has every piece and serves it.
    pub seeding: bool,
}

/// The live view's event stream (`GET /api/v1/live`, Server-Sent Events; the admin token as a
/// bearer header or `?token=`, since a browser's `EventSource` cannot send headers). Each SSE
/// event's name is the variant's name in snake case and its data the variant's JSON:
/// `snapshot` first (and again whenever the client fell behind), then `nodes` and `gone` as
/// the store changes, and `stats` every second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveEvent {
    /// Every node, with its group, switch and status.
    Snapshot(Vec<LiveNode>),
    /// Nodes that were added or changed, or whose status changed (only what changed is set).
    Nodes(Vec<LiveNode>),
    /// Nodes that were deleted (or renamed away).
    Gone(Vec<String>),
    Stats(LiveStats),
}

impl LiveEvent {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            LiveEvent::Snapshot(_) => "snapshot",
            LiveEvent::Nodes(_) => "nodes",
            LiveEvent::Gone(_) => "gone",
            LiveEvent::Stats(_) => "stats",
        }
    }

    /// Parses one SSE event (name and data).
    pub fn parse(name: &str, data: &str) -> Result<LiveEvent, serde_json::Error> {
        fn de<T: serde::de::DeserializeOwned>(data: &str) -> Result<T, serde_json::Error> {
            serde_json::from_str(data)
        }
        Ok(match name {
            "snapshot" => LiveEvent::Snapshot(de(data)?),
            "nodes" => LiveEvent::Nodes(de(data)?),
            "gone" => LiveEvent::Gone(de(data)?),
            "stats" => LiveEvent::Stats(de(data)?),
            other => {
                return Err(serde::de::Error::custom(format!("unknown live event '{other}'")));
            }
        })
    }

    /// The JSON of the event's data (what follows `data:`).
    pub fn data(&self) -> String {
        let v = match self {
            LiveEvent::Snapshot(n) | LiveEvent::Nodes(n) => serde_json::to_string(n),
            LiveEvent::Gone(g) => serde_json::to_string(g),
            LiveEvent::Stats(s) => serde_json::to_string(s),
        };
        // Plain structs of strings and numbers always serialise.
        v.unwrap_or_default()
    }
}

/// One node in the live view. In a `snapshot` every field is set; in `nodes`, `group` and
/// `switch` come with a change of the node object and `status` with a status change (`null`:
/// the status was cleared).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LiveNode {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "some")]
    pub status: Option<Option<NodeStatus>>,
}

/// The swarm and the server's upload, once a second.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct LiveStats {
    /// Unix seconds.
    pub time: u64,
    /// Revisions of every image with swarm counters (from the tracker) and seeder bytes.
    pub images: Vec<LiveImage>,
    /// Bytes the server's seeder sent (all revisions, since it started seeding them).
    pub seeder_bytes: u64,
    /// Image bytes the server sent over HTTP since it started.
    pub http_bytes: u64,
    /// What the server sends per second now (seeder and HTTP; averaged over the last seconds).
    pub upload_rate: f64,
    /// Image bytes the nodes report they got from each other (their latest reports, summed).
    pub node_bytes_from_peers: u64,
    /// Image bytes the nodes report they got over HTTP.
    pub node_bytes_over_http: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LiveImage {
    pub osimage: String,
    pub revision: u32,
    pub current: bool,
    pub seeders: u32,
    pub leechers: u32,
    pub completed: u32,
    pub seeder_uploaded_bytes: u64,
}
