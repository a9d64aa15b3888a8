//! The built-in DHCPv4 server: static addresses for known nodes, PXE/iPXE chain-loading, and an
//! optional dynamic range for machines luna does not know yet (discovery).
//!
//! Layout:
//! - [`packet`]: decoding requests (tolerant of bad options) and encoding replies (deterministic);
//! - [`lease`]: the lease documents kept in [`Collection::Lease`](crate::store::Collection::Lease);
//! - [`engine`]: the sans-IO decision function [`handle`] — packet + context + store snapshot in,
//!   reply + destination + store writes out;
//! - [`server`]: the thin socket loop [`serve`] that reads the store, calls `handle`, commits and
//!   sends;
//! - [`ra`]: answers IPv6 Router Solicitations on the same interfaces with "no router here", so
//!   iPXE does not wait for IPv6 configuration (`answer_router_solicitations`).
//!
//! Invariants:
//! - a packet is answered only when it arrived on an interface named in [`DhcpConfig::interfaces`]
//!   (and in the cluster's `dhcp_interfaces`, when that list is not empty);
//! - a MAC that no node claims is answered only when the cluster has a `dhcp_range`;
//! - a dynamic address is held by exactly one MAC: `ip/<ip>` lease records are created with
//!   `Expect::Absent` or replaced by revision, in the same batch as the `mac/<mac>` record;
//! - a dynamic address is never one a node, switch or other device claims, nor the server's own;
//! - lease records are bounded by the range: taking an expired address over deletes the previous
//!   holder's `mac/` record in the same batch; repeated DISCOVERs during a fresh offer or a bound
//!   lease write nothing, and a MAC holding a live lease is NAKed when it asks for another one;
//! - decoding never panics, in debug or release builds ([`packet::length_is_sound`]).

pub mod engine;
pub mod lease;
pub mod packet;
pub mod ra;
pub mod server;

use std::net::Ipv4Addr;

use luna_core::MacAddr;
use serde::{Deserialize, Serialize};

pub use self::engine::{handle, Action, Candidate, Client, Decision, Known, RequestContext, Unknown, View};
pub use self::lease::{Lease, LeaseState, Versioned};
pub use self::packet::{encode_reply, Destination, Reply, Request};
pub use self::server::{bind_all, serve, serve_on, DhcpSockets, Handler, Outcome};

/// The `[dhcp]` section of luna-server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DhcpConfig {
    /// Interfaces answered on (each gets its own socket bound with SO_BINDTODEVICE).
    /// Empty (the default) turns DHCP off.
    pub interfaces: Vec<String>,
    /// Seconds a lease lasts, for known nodes and discovered machines alike. Default 3600.
    pub lease_time: u32,
    /// Seconds a dynamic address stays held for a machine after an OFFER it has not yet
    /// requested. Default 60.
    pub offer_time: u32,
    /// Seconds a dynamic address is kept out of use after a client declined it (found it in use).
    /// Default 600.
    pub decline_time: u32,
    /// First-stage file for legacy BIOS PXE (client architecture 0). Default `undionly.kpxe`.
    pub bios_file: String,
    /// First-stage file for x86-64 UEFI PXE (client architectures 7 and 9). Default `ipxe.efi`.
    pub uefi_file: String,
    /// Boot-script URL handed to clients that are already iPXE. Placeholders: `{host}` (the
    /// cluster's `frontend_address`, or else the server address on the client's network),
    /// `{server}` (the server address on the client's network), `{http_port}` (the cluster's),
    /// `{mac}` (the client's MAC, `52:54:00:…`). iPXE variables such as `${net0/mac}` pass
    /// through untouched. Default `http://{host}:{http_port}/boot/ipxe?mac={mac}`.
    pub boot_url: String,
    /// The address announced as server identifier and next-server, instead of the receiving
    /// interface's own address (e.g. a floating address). Default: unset.
    pub server_address: Option<Ipv4Addr>,
    /// UDP port listened on and used to reach relays; clients are answered on `port + 1`.
    /// Default 67.
    pub port: u16,
    /// Requests handled at the same time (store round trips overlap). Default 256.
    pub max_in_flight: usize,
    /// With several luna-servers: the part of the cluster's `dhcp_range` this server hands to
    /// unknown machines (each server its own, checked against the others' heartbeat records at
    /// start), so two servers never offer the same address. Default: unset, the whole range.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<luna_core::model::IpRange>,
    /// Answer IPv6 Router Solicitations on the DHCP interfaces with an advertisement naming no
    /// router, no prefix and no DHCPv6, so iPXE stops waiting for IPv6 configuration (15 s
    /// per boot with Debian's iPXE) and hosts change nothing. Turn off where an IPv6 router
    /// serves the provisioning network. Default true.
    pub answer_router_solicitations: bool,
}

impl Default for DhcpConfig {
    fn default() -> Self {
        DhcpConfig {
            interfaces: Vec::new(),
            lease_time: 3600,
            offer_time: 60,
            decline_time: 600,
            bios_file: "undionly.kpxe".into(),
            uefi_file: "ipxe.efi".into(),
            boot_url: "http://{host}:{http_port}/boot/ipxe?mac={mac}".into(),
            server_address: None,
            port: 67,
            max_in_flight: 256,
            slice: None,
            answer_router_solicitations: true,
        }
    }
}

impl DhcpConfig {
    /// Checks what can be checked without the network; `serve` calls it first.
    pub fn validate(&self) -> Result<(), DhcpError> {
        for i in &self.interfaces {
            if i.is_empty() || i.len() > 15 || i.contains('/') || i.contains(char::is_whitespace) {
                return Err(DhcpError::Config(format!("dhcp interface '{i}' is not a valid interface name")));
            }
        }
        if self.lease_time < 60 {
            return Err(DhcpError::Config(format!("dhcp lease_time {} must be at least 60 seconds", self.lease_time)));
        }
        if self.offer_time == 0 {
            return Err(DhcpError::Config("dhcp offer_time must be at least 1 second".into()));
        }
        for (field, file) in [("bios_file", &self.bios_file), ("uefi_file", &self.uefi_file)] {
            if file.is_empty() || file.len() > 127 {
                return Err(DhcpError::Config(format!("dhcp {field} '{file}' must be 1 to 127 bytes")));
            }
        }
        if self.boot_url.is_empty() {
            return Err(DhcpError::Config("dhcp boot_url must not be empty".into()));
        }
        if self.port == 0 || self.port == u16::MAX {
            return Err(DhcpError::Config(format!("dhcp port {} must be 1 to 65534", self.port)));
        }
        if self.max_in_flight == 0 {
            return Err(DhcpError::Config("dhcp max_in_flight must be at least 1".into()));
        }
        Ok(())
    }

    /// The addresses this server hands out of the cluster's `range`: the range, or the part of it
    /// in this server's slice; an error naming both when they do not meet.
    pub fn pool_range(&self, range: luna_core::model::IpRange) -> Result<luna_core::model::IpRange, String> {
        let Some(slice) = self.slice else { return Ok(range) };
        if !slice.overlaps(&range) {
            return Err(format!("this server's dhcp slice {slice} is outside the cluster's dhcp_range {range}"));
        }
        Ok(luna_core::model::IpRange { start: slice.start.max(range.start), end: slice.end.min(range.end) })
    }

    /// The port clients listen on.
    pub fn client_port(&self) -> u16 {
        self.port.saturating_add(1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("{0}")]
    Config(String),
    #[error("dhcp interface '{interface}': {source}")]
    Interface { interface: String, source: std::io::Error },
    #[error("dhcp packet is malformed: {0}")]
    Malformed(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What happened to a known node, for its status (`step` = [`DhcpEventKind::STEP`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpEvent {
    pub node: String,
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    pub kind: DhcpEventKind,
    /// Unix seconds.
    pub time: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpEventKind {
    Offered,
    Acked,
    /// The node found its address in use by another machine.
    Declined,
    Released,
}

impl DhcpEventKind {
    /// The node status step these events belong to.
    pub const STEP: &'static str = "dhcp";

    /// The status message: `dhcp offered`, `dhcp acked`, …
    pub fn message(self) -> &'static str {
        match self {
            DhcpEventKind::Offered => "dhcp offered",
            DhcpEventKind::Acked => "dhcp acked",
            DhcpEventKind::Declined => "dhcp declined: address in use by another machine",
            DhcpEventKind::Released => "dhcp released",
        }
    }
}

/// Where node status changes go; the integrator routes them to the service layer.
///
/// Called on the packet path after the reply was sent: it must return quickly and never block
/// (queue or spawn any store write).
pub trait DhcpStatusSink: Send + Sync + 'static {
    fn dhcp_event(&self, event: DhcpEvent);
}

/// A sink that drops every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStatus;

impl DhcpStatusSink for NoStatus {
    fn dhcp_event(&self, _: DhcpEvent) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: DhcpConfig = toml::from_str("interfaces = [\"eth1\"]\nlease_time = 7200").unwrap();
        assert_eq!(c.interfaces, ["eth1"]);
        assert_eq!(c.lease_time, 7200);
        assert_eq!(c.bios_file, "undionly.kpxe");
        assert_eq!(c.port, 67);
        c.validate().unwrap();
        let e = toml::from_str::<DhcpConfig>("lease_tme = 7200").unwrap_err().to_string();
        assert!(e.contains("lease_tme"), "{e}");
        let bad = DhcpConfig { interfaces: vec!["eth 1".into()], ..DhcpConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("'eth 1'"));
        let bad = DhcpConfig { lease_time: 5, ..DhcpConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("lease_time 5"));
    }
}
