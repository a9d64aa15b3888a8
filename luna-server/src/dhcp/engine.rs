//! The sans-IO DHCP decision: request + context + what the store says → reply + store writes.
//!
//! The caller (the socket loop, or a test) loads a [`View`] for the client's MAC, calls
//! [`handle`], and
//! - on [`Decision::Probe`] loads the listed candidate addresses into `Unknown::candidates` and
//!   calls again (the engine asks for as few as it needs, so the common path reads little);
//! - on [`Decision::Act`] commits `writes` as one batch (a conflict means the view was stale:
//!   reload and decide again), then sends `reply` and reports `event`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode, UnknownOption};
use luna_core::model::{Cluster, Group, IpRange, Network, Node, NodeInterface, BOOTIF};
use luna_core::MacAddr;

use super::lease::{Lease, LeaseState, Versioned};
use super::packet::{Destination, Reply, Request};
use super::{DhcpConfig, DhcpEvent, DhcpEventKind};
use crate::store::{Collection, Expect, Write};

/// iPXE's encapsulated options (its "settings block", option 175).
const IPXE_ENCAP: u8 = 175;
/// Inside 175: setting 176 (`no-pxedhcp`), length 1, value 1.
const IPXE_NO_PXEDHCP: [u8; 3] = [176, 1, 1];

/// Addresses looked up in the first probe round; each later round looks up as many as all
/// before it (4, 4, 8, 16, …), up to [`MAX_PROBE_BATCH`].
pub const PROBE_BATCH: usize = 4;
pub const MAX_PROBE_BATCH: usize = 64;
/// Addresses looked at per request before giving up (the client retries; the hint moves on).
pub const MAX_PROBES: usize = 256;

/// Where and when a request arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// The interface the request arrived on.
    pub interface: String,
    /// That interface's IPv4 addresses, primary first.
    pub local_addrs: Vec<Ipv4Addr>,
    /// Unix seconds.
    pub now: u64,
    /// Where the last dynamic allocation ended; probing continues after it. Only a hint: a
    /// stale one costs a few extra lookups, never a wrong answer.
    pub alloc_hint: Option<Ipv4Addr>,
}

/// What the store says about the requesting MAC, read just before deciding.
#[derive(Debug, Clone, PartialEq)]
pub struct View {
    /// The cluster object (defaults if none is stored yet).
    pub cluster: Cluster,
    pub client: Client,
}

// One per request, moved once: boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Client {
    /// A node claims the MAC.
    Known(Known),
    /// Nobody claims the MAC. Only loaded when discovery is on (the cluster has a range).
    Unknown(Unknown),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Known {
    pub node: Node,
    pub group: Option<Group>,
    /// The network of the node interface with this MAC ([`node_interface`]).
    pub network: Option<Network>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Unknown {
    /// Every network, to find the one the request came from.
    pub networks: Vec<Network>,
    /// The `mac/<mac>` lease record.
    pub lease: Option<Versioned<Lease>>,
    /// The `ip/<ip>` record of the address `lease` names.
    pub held: Option<Versioned<Lease>>,
    /// Whether an object claims the address `lease` names (on `lease.network`).
    pub held_claimed: bool,
    /// Addresses looked up on the engine's request ([`Decision::Probe`]).
    pub candidates: BTreeMap<Ipv4Addr, Candidate>,
}

/// What the store says about one address of the dynamic range.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Candidate {
    /// Its `ip/<ip>` lease record.
    pub lease: Option<Versioned<Lease>>,
    /// Whether an object claims it (`ip/<network>/<ip>` in the claim collection).
    pub claimed: bool,
    /// Whether a concurrent request of this server is giving it to another machine right now
    /// (saves a doomed commit; the store's compare-and-swap is what guarantees uniqueness).
    pub busy: bool,
    /// The `mac/<mac>` record of the machine `lease` names, when that is another machine: it
    /// is deleted in the same batch when the address is taken over from it, so the records of
    /// machines that came once and went (a flood of random MACs) do not pile up.
    pub holder: Option<Versioned<Lease>>,
}

impl Candidate {
    fn free_for(&self, mac: &MacAddr, now: u64) -> bool {
        !self.claimed && !self.busy && self.lease.as_ref().is_none_or(|l| l.value.usable_by(mac, now))
    }
}

#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Say nothing; the reason is for debug logs.
    Ignore(String),
    /// Load these addresses of `network` into `Unknown::candidates` and decide again.
    Probe {
        network: String,
        ips: Vec<Ipv4Addr>,
    },
    Act(Action),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Action {
    /// One batch, all or nothing, before anything is sent.
    pub writes: Vec<Write>,
    pub reply: Option<Reply>,
    /// For the node's status, reported after the reply went out.
    pub event: Option<DhcpEvent>,
    /// A dynamic address newly taken from the range (moves the allocation hint).
    pub allocated: Option<Ipv4Addr>,
}

/// The interface of `node` that has `mac`: BOOTIF for the node's own MAC, else the interface
/// listing that MAC.
pub fn node_interface<'a>(node: &'a Node, mac: &MacAddr) -> Option<&'a NodeInterface> {
    if node.mac.as_ref() == Some(mac) {
        node.interface(BOOTIF)
    } else {
        node.interfaces.iter().find(|i| i.mac.as_ref() == Some(mac))
    }
}

fn ignore(why: impl Into<String>) -> Decision {
    Decision::Ignore(why.into())
}

/// Decides what to do with `req`. Pure: no I/O, no clock, no randomness.
pub fn handle(cfg: &DhcpConfig, req: &Request, ctx: &RequestContext, view: &View) -> Decision {
    if !cfg.interfaces.contains(&ctx.interface) {
        return ignore(format!("interface {} is not a dhcp interface", ctx.interface));
    }
    let cluster = &view.cluster;
    if !cluster.dhcp_interfaces.is_empty() && !cluster.dhcp_interfaces.contains(&ctx.interface) {
        return ignore(format!("interface {} is not in the cluster's dhcp_interfaces", ctx.interface));
    }
    let m = &req.message;
    if m.opcode() != Opcode::BootRequest {
        return ignore("not a boot request");
    }
    if m.hops() > 16 {
        return ignore(format!("relayed {} times, more than 16", m.hops()));
    }
    let Some(mac) = req.mac() else {
        return ignore(format!("hardware address length {} is not ethernet", m.hlen()));
    };
    let Some(kind) = req.msg_type() else {
        return ignore(format!("{mac}: plain BOOTP is not served"));
    };
    if !matches!(
        kind,
        MessageType::Discover
            | MessageType::Request
            | MessageType::Decline
            | MessageType::Release
            | MessageType::Inform
    ) {
        return ignore(format!("{mac}: message type {kind:?} is not for a server"));
    }
    let d = Dhcp { cfg, req, ctx, cluster, mac, kind };
    match &view.client {
        Client::Known(k) => d.known(k),
        Client::Unknown(u) => match cluster.dhcp_range {
            None => ignore(format!("{mac} is not a known node and discovery is off (no dhcp_range)")),
            Some(range) => match cfg.pool_range(range) {
                Ok(pool) => d.unknown(u, pool),
                Err(e) => ignore(format!("{mac}: {e}")),
            },
        },
    }
}

/// What a reply carries beyond the message type.
struct Offer<'a> {
    /// `yiaddr`; `None` for INFORM.
    ip: Option<Ipv4Addr>,
    net: &'a Network,
    server: Ipv4Addr,
    hostname: Option<&'a str>,
    domain: &'a str,
}

struct Dhcp<'a> {
    cfg: &'a DhcpConfig,
    req: &'a Request,
    ctx: &'a RequestContext,
    cluster: &'a Cluster,
    mac: MacAddr,
    kind: MessageType,
}

impl Dhcp<'_> {
    /// Our address as the client's network sees it, when the request came from `net`
    /// (through a relay whose `giaddr` is on it, or straight from an interface that has an
    /// address on it).
    fn server_on(&self, net: &Network) -> Option<Ipv4Addr> {
        let giaddr = self.req.message.giaddr();
        if !giaddr.is_unspecified() {
            if !net.cidr.contains(&giaddr) {
                return None;
            }
            return self.cfg.server_address.or_else(|| self.ctx.local_addrs.first().copied());
        }
        let local =
            self.ctx.local_addrs.iter().copied().chain(self.cfg.server_address).find(|a| net.cidr.contains(a))?;
        Some(self.cfg.server_address.unwrap_or(local))
    }

    /// The network the request came from, and our address on it.
    fn link<'n>(&self, networks: &'n [Network]) -> Option<(&'n Network, Ipv4Addr)> {
        let giaddr = self.req.message.giaddr();
        if !giaddr.is_unspecified() {
            let net = networks.iter().find(|n| n.cidr.contains(&giaddr))?;
            return Some((net, self.server_on(net)?));
        }
        self.ctx.local_addrs.iter().copied().chain(self.cfg.server_address).find_map(|a| {
            let net = networks.iter().find(|n| n.cidr.contains(&a))?;
            Some((net, self.server_on(net)?))
        })
    }

    /// RFC 2131 §4.1: relay, else (NAK) broadcast, else ciaddr, else broadcast flag, else the
    /// hardware address.
    fn destination(&self, kind: MessageType, yiaddr: Ipv4Addr) -> Destination {
        let m = &self.req.message;
        let client_port = self.cfg.client_port();
        if !m.giaddr().is_unspecified() {
            Destination::Relay(SocketAddrV4::new(m.giaddr(), self.cfg.port))
        } else if kind == MessageType::Nak {
            Destination::Broadcast(client_port)
        } else if !m.ciaddr().is_unspecified() {
            Destination::Unicast(SocketAddrV4::new(m.ciaddr(), client_port))
        } else if m.flags().broadcast() || yiaddr.is_unspecified() {
            Destination::Broadcast(client_port)
        } else {
            Destination::Hardware { ip: yiaddr, mac: self.mac, port: client_port }
        }
    }

    fn header(&self, ciaddr: Ipv4Addr, yiaddr: Ipv4Addr, siaddr: Ipv4Addr, flags: Flags) -> Message {
        let m = &self.req.message;
        let mut r = Message::new_with_id(m.xid(), ciaddr, yiaddr, siaddr, m.giaddr(), &self.mac.0);
        r.set_opcode(Opcode::BootReply);
        r.set_htype(m.htype());
        r.set_flags(flags);
        r
    }

    /// The first-stage file (PXE ROMs) or the boot-script URL (iPXE); nothing for other clients.
    fn boot_file(&self, server: Ipv4Addr) -> Option<String> {
        if self.req.is_ipxe() {
            let host = self.cluster.frontend_address.unwrap_or(server);
            let url = self
                .cfg
                .boot_url
                .replace("{host}", &host.to_string())
                .replace("{server}", &server.to_string())
                .replace("{http_port}", &self.cluster.http_port.to_string())
                .replace("{mac}", &self.mac.to_string());
            return Some(url);
        }
        if !self.req.is_pxe() {
            return None;
        }
        match self.req.client_arch().unwrap_or(0) {
            0 => Some(self.cfg.bios_file.clone()),
            7 | 9 => Some(self.cfg.uefi_file.clone()),
            arch => {
                tracing::debug!(mac = %self.mac, arch, "dhcp: no boot file for this client architecture");
                None
            }
        }
    }

    /// OFFER or ACK.
    fn reply(&self, kind: MessageType, o: &Offer<'_>) -> Reply {
        let m = &self.req.message;
        let yiaddr = o.ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let ciaddr = if kind == MessageType::Ack { m.ciaddr() } else { Ipv4Addr::UNSPECIFIED };
        let boot = self.boot_file(o.server);
        let siaddr = if boot.is_some() { o.server } else { Ipv4Addr::UNSPECIFIED };
        let mut r = self.header(ciaddr, yiaddr, siaddr, m.flags());
        let opts = r.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(o.server));
        if o.ip.is_some() {
            let t = self.cfg.lease_time;
            opts.insert(DhcpOption::AddressLeaseTime(t));
            opts.insert(DhcpOption::Renewal(t / 2));
            opts.insert(DhcpOption::Rebinding((u64::from(t) * 7 / 8) as u32));
        }
        opts.insert(DhcpOption::SubnetMask(o.net.cidr.netmask()));
        opts.insert(DhcpOption::BroadcastAddr(o.net.cidr.broadcast()));
        if let Some(gw) = o.net.gateway {
            opts.insert(DhcpOption::Router(vec![gw]));
        }
        if let Some(dns) = o.net.dns_server {
            opts.insert(DhcpOption::DomainNameServer(vec![dns]));
        }
        if !o.domain.is_empty() {
            opts.insert(DhcpOption::DomainName(o.domain.to_string()));
        }
        if let Some(h) = o.hostname {
            opts.insert(DhcpOption::Hostname(h.to_string()));
        }
        opts.insert(DhcpOption::InterfaceMtu(o.net.mtu));
        if let Some(id @ DhcpOption::ClientIdentifier(_)) = m.opts().get(dhcproto::v4::OptionCode::ClientIdentifier) {
            // RFC 6842: echo the client identifier.
            opts.insert(id.clone());
        }
        if boot.is_some() && self.req.is_ipxe() {
            // iPXE settings block 175, setting 176 `no-pxedhcp` = 1: this answer already holds
            // the boot script, so iPXE may request it at once instead of first waiting up to
            // its ProxyDHCP timeout for ProxyDHCP offers (iPXE's `dhcp_discovery_rx`; 2 s
            // upstream, 11 s in builds with the PXE spec's timeouts). dnsmasq's
            // `encap:175, 176, 1b` does the same. Debian's qemu ROM answered at once either way
            // here; its 15 s wait was IPv6 (see `ra`).
            opts.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::Unknown(IPXE_ENCAP),
                IPXE_NO_PXEDHCP.to_vec(),
            )));
        }
        if let Some(file) = boot {
            opts.insert(DhcpOption::TFTPServerName(o.server.to_string().into_bytes()));
            opts.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
            // The legacy field holds 127 bytes plus NUL; a longer URL travels in option 67 only.
            if file.len() <= 127 {
                r.set_fname_str(&file);
            }
        }
        Reply { destination: self.destination(kind, yiaddr), message: r, relay_info: self.relay_info() }
    }

    fn nak(&self, server: Ipv4Addr, why: String) -> Decision {
        let m = &self.req.message;
        // Through a relay the NAK must be broadcast on the client's segment (RFC 2131 §4.3.2).
        let flags = if m.giaddr().is_unspecified() { m.flags() } else { m.flags().set_broadcast() };
        let z = Ipv4Addr::UNSPECIFIED;
        let mut r = self.header(z, z, z, flags);
        let opts = r.opts_mut();
        opts.insert(DhcpOption::MessageType(MessageType::Nak));
        opts.insert(DhcpOption::ServerIdentifier(server));
        opts.insert(DhcpOption::Message(why.clone()));
        if let Some(id @ DhcpOption::ClientIdentifier(_)) = m.opts().get(dhcproto::v4::OptionCode::ClientIdentifier) {
            opts.insert(id.clone());
        }
        tracing::debug!(mac = %self.mac, reason = %why, "dhcp: nak");
        let reply =
            Reply { destination: self.destination(MessageType::Nak, z), message: r, relay_info: self.relay_info() };
        Decision::Act(Action { reply: Some(reply), ..Action::default() })
    }

    fn relay_info(&self) -> Option<Vec<u8>> {
        if self.req.message.giaddr().is_unspecified() {
            None
        } else {
            self.req.relay_info.clone()
        }
    }

    /// The address a REQUEST asks for: option 50, else `ciaddr` (renewing, rebinding).
    fn wanted(&self) -> Option<Ipv4Addr> {
        self.req.requested_ip().or_else(|| Some(self.req.message.ciaddr()).filter(|a| !a.is_unspecified()))
    }

    fn server_id_is(&self, server: Ipv4Addr) -> bool {
        self.req.server_id() == Some(server)
    }

    // -----------------------------------------------------------------------------------------
    // known nodes: static addresses, no writes

    fn known(&self, k: &Known) -> Decision {
        let node = &k.node;
        let mac = self.mac;
        let Some(iface) = node_interface(node, &mac) else {
            return ignore(format!("{mac} is claimed by node {} but none of its interfaces has it", node.name));
        };
        let Some(ip) = iface.ip else {
            return ignore(format!("node {} has no address on interface {}", node.name, iface.name));
        };
        let Some(net) = k.network.as_ref().filter(|n| n.name == iface.network) else {
            return ignore(format!("network {} of node {} does not exist", iface.network, node.name));
        };
        if !net.contains_host(ip) {
            return ignore(format!(
                "address {ip} of node {} is not a host address of network {} ({})",
                node.name, net.name, net.cidr
            ));
        }
        let Some(server) = self.server_on(net) else {
            let via = self.req.message.giaddr();
            let via =
                if via.is_unspecified() { format!("interface {}", self.ctx.interface) } else { format!("relay {via}") };
            return ignore(format!(
                "node {} is on network {} ({}) but asked through {via}, which is not",
                node.name, net.name, net.cidr
            ));
        };
        let domain = k.group.as_ref().and_then(|g| g.domain.clone()).unwrap_or_else(|| self.cluster.domain.clone());
        let offer = Offer { ip: Some(ip), net, server, hostname: Some(&node.name), domain: &domain };
        let event = |kind| Some(DhcpEvent { node: node.name.clone(), mac, ip, kind, time: self.ctx.now });
        let act = |kind: MessageType, ev| {
            Decision::Act(Action { reply: Some(self.reply(kind, &offer)), event: event(ev), ..Action::default() })
        };
        match self.kind {
            MessageType::Discover => act(MessageType::Offer, DhcpEventKind::Offered),
            MessageType::Request => {
                if let Some(sid) = self.req.server_id() {
                    if sid != server {
                        return ignore(format!("node {} chose server {sid}", node.name));
                    }
                }
                match self.wanted() {
                    None => ignore(format!("request from node {} names no address", node.name)),
                    Some(w) if w == ip => act(MessageType::Ack, DhcpEventKind::Acked),
                    Some(w) => self.nak(server, format!("address {w} is not node {}'s; it is {ip}", node.name)),
                }
            }
            MessageType::Inform => {
                let offer = Offer { ip: None, ..offer };
                Decision::Act(Action { reply: Some(self.reply(MessageType::Ack, &offer)), ..Action::default() })
            }
            MessageType::Decline if self.server_id_is(server) => {
                tracing::warn!(node = %node.name, %ip, "dhcp: node declined its address: another machine uses it");
                Decision::Act(Action { event: event(DhcpEventKind::Declined), ..Action::default() })
            }
            MessageType::Release if self.server_id_is(server) => {
                Decision::Act(Action { event: event(DhcpEventKind::Released), ..Action::default() })
            }
            _ => ignore(format!("{:?} from node {} names another server", self.kind, node.name)),
        }
    }

    // -----------------------------------------------------------------------------------------
    // unknown machines: the dynamic range

    fn unknown(&self, u: &Unknown, range: IpRange) -> Decision {
        let mac = self.mac;
        let now = self.ctx.now;
        let Some((net, server)) = self.link(&u.networks) else {
            return ignore(format!(
                "{mac}: no network holds the address of interface {} or the relay",
                self.ctx.interface
            ));
        };
        let Some(pool) = Pool::new(range, net, server, self.ctx, self.cfg, self.cluster) else {
            return ignore(format!("{mac}: the dhcp range {range} is not on network {}", net.name));
        };
        let domain = self.cluster.domain.clone();
        let offer = |ip| Offer { ip: Some(ip), net, server, hostname: None, domain: &domain };

        // The address this MAC holds (its `ip/` record names it), if still fit to give.
        let owned = match (&u.lease, &u.held) {
            (Some(l), Some(h)) if h.value.ip == l.value.ip && h.value.held_by(&mac) => Some(h),
            _ => None,
        };
        let held = owned.filter(|h| pool.allows(h.value.ip) && !u.held_claimed);

        match self.kind {
            MessageType::Discover => {
                if let Some(h) = held {
                    // Nothing is written for a repeated DISCOVER while the hold is fresh: a
                    // chatty or hostile client costs no store writes (per-MAC churn cap).
                    let fresh_offer = h.value.state == LeaseState::Offered
                        && h.value.expires >= now + u64::from(self.cfg.offer_time).div_ceil(2);
                    let keep = (h.value.state == LeaseState::Bound && h.value.expires > now) || fresh_offer;
                    let writes = if keep {
                        Vec::new()
                    } else {
                        self.lease_writes(u, h.value.ip, Some(&own(h)), net, LeaseState::Offered, &pool)
                    };
                    let reply = self.reply(MessageType::Offer, &offer(h.value.ip));
                    return Decision::Act(Action { writes, reply: Some(reply), ..Action::default() });
                }
                match self.choose(&pool, u) {
                    Choice::Free(ip) => {
                        let writes = self.lease_writes(u, ip, u.candidates.get(&ip), net, LeaseState::Offered, &pool);
                        let reply = self.reply(MessageType::Offer, &offer(ip));
                        Decision::Act(Action { writes, reply: Some(reply), allocated: Some(ip), ..Action::default() })
                    }
                    Choice::Probe(ips) => Decision::Probe { network: net.name.clone(), ips },
                    Choice::Exhausted(n) => {
                        ignore(format!("{mac}: no free address in {range} on network {} ({n} looked at)", net.name))
                    }
                }
            }
            MessageType::Request => {
                let sid = self.req.server_id();
                if let Some(sid) = sid.filter(|s| *s != server) {
                    // The client took another server's offer: free ours now, not at expiry (only
                    // ours: an offer outside our pool is the other server's, maybe the chosen one).
                    let ours = |h: &&Versioned<Lease>| {
                        h.value.state == LeaseState::Offered && h.value.expires > now && pool.allows(h.value.ip)
                    };
                    return match owned.filter(ours) {
                        Some(h) => {
                            let doc = Lease { state: LeaseState::Released, expires: now, ..h.value.clone() };
                            let writes = vec![put(Lease::ip_key(h.value.ip), Some(h), &doc)];
                            Decision::Act(Action { writes, ..Action::default() })
                        }
                        None => ignore(format!("{mac} chose server {sid}")),
                    };
                }
                let Some(wanted) = self.wanted() else {
                    return ignore(format!("request from {mac} names no address"));
                };
                if let Some(h) = held.filter(|h| h.value.ip == wanted) {
                    let writes = self.lease_writes(u, wanted, Some(&own(h)), net, LeaseState::Bound, &pool);
                    let reply = self.reply(MessageType::Ack, &offer(wanted));
                    return Decision::Act(Action { writes, reply: Some(reply), ..Action::default() });
                }
                if sid.is_some() {
                    // SELECTING our offer while another server offered too (two servers answer
                    // strangers, each from its slice): the one `mac/` record names the offer
                    // written last, maybe the other server's, but our `ip/` record still holds
                    // `wanted` for this MAC. That is our offer: ACK it (RFC 2131 §4.3.2).
                    if pool.allows(wanted) {
                        match u.candidates.get(&wanted) {
                            None => return Decision::Probe { network: net.name.clone(), ips: vec![wanted] },
                            Some(c)
                                if !c.claimed && c.lease.as_ref().is_some_and(|l| live_hold(&l.value, &mac, now)) =>
                            {
                                let writes = self.lease_writes(u, wanted, Some(c), net, LeaseState::Bound, &pool);
                                let reply = self.reply(MessageType::Ack, &offer(wanted));
                                return Decision::Act(Action { writes, reply: Some(reply), ..Action::default() });
                            }
                            Some(_) => {}
                        }
                    }
                    return self.nak(server, format!("address {wanted} was not offered to {mac}"));
                }
                // Per-MAC churn cap: a machine holding a live address here does not hop to
                // another one by asking (each hop rewrote three records); it is told no and
                // gets its own address back on its next DISCOVER (RFC 2131 4.3.2).
                if let Some(h) = held.filter(|h| h.value.expires > now) {
                    return self.nak(server, format!("{mac} holds {} and may not move to {wanted}", h.value.ip));
                }
                if !pool.allows(wanted) {
                    return self.nak(server, format!("address {wanted} is not ours to give on network {}", net.name));
                }
                // INIT-REBOOT, RENEWING or REBINDING for an address we have no lease for (a
                // wiped store, a lease taken over): give it if it is still free.
                match u.candidates.get(&wanted) {
                    None => Decision::Probe { network: net.name.clone(), ips: vec![wanted] },
                    Some(c) if c.free_for(&mac, now) => {
                        let writes = self.lease_writes(u, wanted, Some(c), net, LeaseState::Bound, &pool);
                        let reply = self.reply(MessageType::Ack, &offer(wanted));
                        Decision::Act(Action {
                            writes,
                            reply: Some(reply),
                            allocated: Some(wanted),
                            ..Action::default()
                        })
                    }
                    Some(_) => self.nak(server, format!("address {wanted} is in use by another machine")),
                }
            }
            MessageType::Decline | MessageType::Release if !self.server_id_is(server) => {
                ignore(format!("{:?} from {mac} names another server", self.kind))
            }
            MessageType::Decline => {
                let ip = self.req.requested_ip();
                match owned.filter(|h| Some(h.value.ip) == ip) {
                    Some(h) => {
                        tracing::warn!(%mac, ip = %h.value.ip, "dhcp: address declined: another machine uses it; quarantined");
                        let expires = now + u64::from(self.cfg.decline_time);
                        let doc = Lease { state: LeaseState::Declined, expires, ..h.value.clone() };
                        let writes = vec![put(Lease::ip_key(h.value.ip), Some(h), &doc)];
                        Decision::Act(Action { writes, ..Action::default() })
                    }
                    None => ignore(format!("{mac} declined an address it does not hold")),
                }
            }
            MessageType::Release => {
                let ip = self.req.message.ciaddr();
                match owned.filter(|h| h.value.ip == ip) {
                    Some(h) => {
                        let doc = Lease { state: LeaseState::Released, expires: now, ..h.value.clone() };
                        let writes = vec![put(Lease::ip_key(ip), Some(h), &doc)];
                        Decision::Act(Action { writes, ..Action::default() })
                    }
                    None => ignore(format!("{mac} released {ip}, which it does not hold")),
                }
            }
            MessageType::Inform => {
                let ciaddr = self.req.message.ciaddr();
                if !net.cidr.contains(&ciaddr) {
                    return ignore(format!("inform from {mac} for {ciaddr}, which is not on network {}", net.name));
                }
                let o = Offer { ip: None, ..offer(ciaddr) };
                Decision::Act(Action { reply: Some(self.reply(MessageType::Ack, &o)), ..Action::default() })
            }
            _ => ignore("unreachable message type"),
        }
    }

    /// A free address: the one asked for, else the next after the hint.
    fn choose(&self, pool: &Pool, u: &Unknown) -> Choice {
        let requested = self.req.requested_ip().filter(|ip| pool.allows(*ip));
        let mut unfetched: Vec<Ipv4Addr> = Vec::new();
        let batch = u.candidates.len().clamp(PROBE_BATCH, MAX_PROBE_BATCH);
        let mut seen = 0;
        for ip in requested.into_iter().chain(pool.sequence(self.ctx.alloc_hint)) {
            if seen >= MAX_PROBES || unfetched.len() == batch {
                break;
            }
            match u.candidates.get(&ip) {
                Some(c) if c.free_for(&self.mac, self.ctx.now) => return Choice::Free(ip),
                Some(_) => seen += 1,
                None if !unfetched.contains(&ip) => {
                    unfetched.push(ip);
                    seen += 1;
                }
                None => {}
            }
        }
        if unfetched.is_empty() {
            Choice::Exhausted(seen)
        } else {
            Choice::Probe(unfetched)
        }
    }

    /// The batch that gives `ip` to this MAC in `state`: its `ip/` and `mac/` records (each by
    /// revision, or created), the removal of the address it held before, if another (unless
    /// that is a live hold outside this server's pool: another server's offer or lease, which
    /// the client may still take from that server; it expires on its own), and the removal of
    /// the `mac/` record of the machine it takes the address over from, if that record still
    /// names the address.
    fn lease_writes(
        &self,
        u: &Unknown,
        ip: Ipv4Addr,
        target: Option<&Candidate>,
        net: &Network,
        state: LeaseState,
        pool: &Pool,
    ) -> Vec<Write> {
        let existing = target.and_then(|c| c.lease.as_ref());
        let now = self.ctx.now;
        let expires = match state {
            LeaseState::Offered => now + u64::from(self.cfg.offer_time),
            LeaseState::Bound => now + u64::from(self.cfg.lease_time),
            LeaseState::Released | LeaseState::Declined => now,
        };
        // Keep a longer hold when offering an address already bound (a re-DISCOVER).
        let expires = match existing {
            Some(e) if e.value.held_by(&self.mac) && state == LeaseState::Offered => expires.max(e.value.expires),
            _ => expires,
        };
        let hostname = self.req.hostname().or_else(|| existing.and_then(|e| e.value.hostname.clone()));
        let doc = Lease { mac: self.mac, ip, network: net.name.clone(), expires, state, hostname };
        let mut writes =
            vec![put(Lease::ip_key(ip), existing, &doc), put(Lease::mac_key(&self.mac), u.lease.as_ref(), &doc)];
        if let (Some(l), Some(h)) = (&u.lease, &u.held) {
            let elsewhere = !pool.allows(h.value.ip) && live_hold(&h.value, &self.mac, now);
            if l.value.ip != ip && h.value.ip == l.value.ip && h.value.held_by(&self.mac) && !elsewhere {
                writes.push(Write::Delete {
                    collection: Collection::Lease,
                    key: Lease::ip_key(h.value.ip),
                    expect: Expect::Rev(h.rev),
                });
            }
        }
        if let (Some(e), Some(holder)) = (existing, target.and_then(|c| c.holder.as_ref())) {
            if e.value.mac != self.mac && holder.value.mac == e.value.mac && holder.value.ip == ip {
                writes.push(Write::Delete {
                    collection: Collection::Lease,
                    key: Lease::mac_key(&holder.value.mac),
                    expect: Expect::Rev(holder.rev),
                });
            }
        }
        writes
    }
}

/// Whether an `ip/` record holds its address for `mac` right now (offered or bound, unexpired).
fn live_hold(l: &Lease, mac: &MacAddr, now: u64) -> bool {
    l.mac == *mac && matches!(l.state, LeaseState::Offered | LeaseState::Bound) && l.expires > now
}

/// This MAC's own `ip/` record as a candidate (nobody to take it over from).
fn own(h: &Versioned<Lease>) -> Candidate {
    Candidate { lease: Some(h.clone()), ..Candidate::default() }
}

fn put(key: String, existing: Option<&Versioned<Lease>>, doc: &Lease) -> Write {
    let expect = existing.map_or(Expect::Absent, |e| Expect::Rev(e.rev));
    Write::Put { collection: Collection::Lease, key, expect, doc: doc.to_value() }
}

enum Choice {
    Free(Ipv4Addr),
    Probe(Vec<Ipv4Addr>),
    Exhausted(usize),
}

/// The part of the dynamic range on one network, minus addresses that are never handed out.
struct Pool {
    range: IpRange,
    never: Vec<Ipv4Addr>,
}

impl Pool {
    fn new(
        range: IpRange,
        net: &Network,
        server: Ipv4Addr,
        ctx: &RequestContext,
        cfg: &DhcpConfig,
        cluster: &Cluster,
    ) -> Option<Pool> {
        let hosts = net.host_range();
        let start = range.start.max(hosts.start);
        let end = range.end.min(hosts.end);
        if start > end {
            return None;
        }
        let mut never: Vec<Ipv4Addr> = vec![server];
        never.extend(ctx.local_addrs.iter().copied());
        never.extend(cfg.server_address);
        never.extend(net.gateway);
        never.extend(net.dns_server);
        never.extend(cluster.frontend_address);
        Some(Pool { range: IpRange { start, end }, never })
    }

    fn allows(&self, ip: Ipv4Addr) -> bool {
        self.range.contains(ip) && !self.never.contains(&ip)
    }

    /// Every allowed address once, starting after `hint` and wrapping around.
    fn sequence(&self, hint: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let start = u32::from(self.range.start);
        let len = self.range.len();
        let first = match hint {
            Some(h) if self.range.contains(h) => u64::from(u32::from(h) - start) + 1,
            _ => 0,
        };
        (0..len).map(move |i| Ipv4Addr::from(start + ((first + i) % len) as u32)).filter(|ip| !self.never.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::super::packet::client;
    use super::*;
    use dhcproto::v4::OptionCode;
    use luna_core::model::{GroupInterface, NodeInterface};

    const IFACE: &str = "prov0";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }
    fn cfg() -> DhcpConfig {
        DhcpConfig { interfaces: vec![IFACE.into(), "prov1".into()], ..DhcpConfig::default() }
    }
    fn ctx() -> RequestContext {
        RequestContext { interface: IFACE.into(), local_addrs: vec![ip("10.141.255.254")], now: 1000, alloc_hint: None }
    }
    fn network() -> Network {
        let mut n = Network::new("cluster", "10.141.0.0/16".parse().unwrap());
        n.gateway = Some(ip("10.141.255.1"));
        n.dns_server = Some(ip("10.141.255.254"));
        n.mtu = 9000;
        n
    }
    fn ipmi_network() -> Network {
        Network::new("ipmi", "10.148.0.0/16".parse().unwrap())
    }
    fn cluster() -> Cluster {
        Cluster { domain: "cluster.local".into(), ..Cluster::default() }
    }
    fn node() -> Node {
        let mut n = Node::new("node001", "compute");
        n.mac = Some(mac(1));
        n.interfaces.push(NodeInterface {
            name: BOOTIF.into(),
            network: "cluster".into(),
            ip: Some(ip("10.141.0.1")),
            mac: None,
        });
        n.interfaces.push(NodeInterface {
            name: "eth1".into(),
            network: "ipmi".into(),
            ip: Some(ip("10.148.0.1")),
            mac: Some(mac(2)),
        });
        n
    }
    fn group() -> Group {
        let mut g = Group::new("compute", "rocky9");
        g.interfaces.push(GroupInterface { name: BOOTIF.into(), network: "cluster".into(), params: String::new() });
        g.domain = Some("compute.example".into());
        g
    }
    fn known_view() -> View {
        View {
            cluster: cluster(),
            client: Client::Known(Known { node: node(), group: Some(group()), network: Some(network()) }),
        }
    }
    fn unknown_view(range: Option<&str>) -> View {
        let cluster = Cluster { dhcp_range: range.map(|r| r.parse().unwrap()), ..cluster() };
        View {
            cluster,
            client: Client::Unknown(Unknown { networks: vec![network(), ipmi_network()], ..Unknown::default() }),
        }
    }
    fn run(req: Message, view: &View) -> Decision {
        handle(&cfg(), &Request::from_message(req), &ctx(), view)
    }
    fn act(d: Decision) -> Action {
        match d {
            Decision::Act(a) => a,
            other => panic!("expected an action, got {other:?}"),
        }
    }
    fn reply(d: Decision) -> Reply {
        act(d).reply.expect("a reply")
    }
    fn opt(r: &Reply, code: OptionCode) -> Option<&DhcpOption> {
        r.message.opts().get(code)
    }
    fn bootfile(r: &Reply) -> Option<String> {
        match opt(r, OptionCode::BootfileName) {
            Some(DhcpOption::BootfileName(b)) => Some(String::from_utf8(b.clone()).unwrap()),
            _ => None,
        }
    }
    fn assert_ignored(d: Decision, why: &str) {
        match d {
            Decision::Ignore(r) => assert!(r.contains(why), "ignored for '{r}', expected '{why}'"),
            other => panic!("expected silence ({why}), got {other:?}"),
        }
    }
    fn lease(m: MacAddr, addr: &str, state: LeaseState, expires: u64) -> Lease {
        Lease { mac: m, ip: ip(addr), network: "cluster".into(), expires, state, hostname: None }
    }
    fn v(rev: u64, value: Lease) -> Versioned<Lease> {
        Versioned { rev, value }
    }
    fn unknown_mut(view: &mut View) -> &mut Unknown {
        match &mut view.client {
            Client::Unknown(u) => u,
            Client::Known(_) => unreachable!(),
        }
    }
    /// Answers a probe the way the store would, from a table of known ip records and claims.
    fn answer_probes(
        view: &mut View,
        records: &BTreeMap<Ipv4Addr, Versioned<Lease>>,
        claimed: &[Ipv4Addr],
    ) -> Decision {
        for _ in 0..100 {
            match run(client::discover(mac(9), 1), view) {
                Decision::Probe { ips, network } => {
                    assert_eq!(network, "cluster");
                    for i in ips {
                        let c = Candidate {
                            lease: records.get(&i).cloned(),
                            claimed: claimed.contains(&i),
                            busy: false,
                            holder: None,
                        };
                        assert!(unknown_mut(view).candidates.insert(i, c).is_none(), "{i} probed twice");
                    }
                }
                d => return d,
            }
        }
        panic!("probing never ended");
    }

    #[test]
    fn known_node_bios_pxe_gets_its_static_address_and_everything_else() {
        let r = reply(run(client::pxe(client::discover(mac(1), 42), 0), &known_view()));
        let m = &r.message;
        assert_eq!(r.msg_type(), Some(MessageType::Offer));
        assert_eq!(m.opcode(), Opcode::BootReply);
        assert_eq!(m.xid(), 42);
        assert_eq!(m.yiaddr(), ip("10.141.0.1"));
        assert_eq!(m.siaddr(), ip("10.141.255.254"));
        assert_eq!(m.chaddr()[..6], mac(1).0);
        assert_eq!(m.fname_str().unwrap().unwrap(), "undionly.kpxe");
        assert_eq!(bootfile(&r).as_deref(), Some("undionly.kpxe"));
        assert_eq!(opt(&r, OptionCode::TFTPServerName), Some(&DhcpOption::TFTPServerName(b"10.141.255.254".to_vec())));
        assert_eq!(opt(&r, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip("10.141.255.254"))));
        assert_eq!(opt(&r, OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(ip("255.255.0.0"))));
        assert_eq!(opt(&r, OptionCode::Router), Some(&DhcpOption::Router(vec![ip("10.141.255.1")])));
        assert_eq!(
            opt(&r, OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![ip("10.141.255.254")]))
        );
        assert_eq!(opt(&r, OptionCode::DomainName), Some(&DhcpOption::DomainName("compute.example".into())));
        assert_eq!(opt(&r, OptionCode::Hostname), Some(&DhcpOption::Hostname("node001".into())));
        assert_eq!(opt(&r, OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(9000)));
        assert_eq!(opt(&r, OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
        assert_eq!(opt(&r, OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
        assert_eq!(opt(&r, OptionCode::Rebinding), Some(&DhcpOption::Rebinding(3150)));
        // No broadcast flag, no ciaddr: straight to the hardware address.
        assert_eq!(r.destination, Destination::Hardware { ip: ip("10.141.0.1"), mac: mac(1), port: 68 });
        assert_eq!(r.relay_info, None);
    }

    #[test]
    fn uefi_and_ipxe_clients_get_their_files() {
        for arch in [7, 9] {
            let r = reply(run(client::broadcast(client::pxe(client::discover(mac(1), 1), arch)), &known_view()));
            assert_eq!(bootfile(&r).as_deref(), Some("ipxe.efi"), "arch {arch}");
            assert_eq!(r.destination, Destination::Broadcast(68));
        }
        // An architecture we have nothing for still gets its address.
        let r = reply(run(client::pxe(client::discover(mac(1), 1), 11), &known_view()));
        assert_eq!((bootfile(&r), r.message.yiaddr()), (None, ip("10.141.0.1")));

        let r = reply(run(client::ipxe(client::discover(mac(1), 1), 9), &known_view()));
        assert_eq!(bootfile(&r).as_deref(), Some("http://10.141.255.254:7050/boot/ipxe?mac=52:54:00:00:00:01"));
        assert_eq!(r.message.yiaddr(), ip("10.141.0.1"), "iPXE keeps the address PXE had");

        // frontend_address wins for {host}; iPXE variables pass through; http_port is the cluster's.
        let mut view = known_view();
        view.cluster.frontend_address = Some(ip("10.141.255.250"));
        view.cluster.http_port = 8080;
        let custom = DhcpConfig { boot_url: "http://{host}:{http_port}/b?m=${net0/mac}&s={server}".into(), ..cfg() };
        let d = handle(&custom, &Request::from_message(client::ipxe(client::discover(mac(1), 1), 0)), &ctx(), &view);
        assert_eq!(bootfile(&reply(d)).as_deref(), Some("http://10.141.255.250:8080/b?m=${net0/mac}&s=10.141.255.254"));

        // Configured names are used.
        let cfg = DhcpConfig { bios_file: "x/undi.kpxe".into(), uefi_file: "x/snp.efi".into(), ..cfg() };
        let d =
            handle(&cfg, &Request::from_message(client::pxe(client::discover(mac(1), 1), 7)), &ctx(), &known_view());
        assert_eq!(bootfile(&reply(d)).as_deref(), Some("x/snp.efi"));
    }

    /// Option 175 of a reply as it goes on the wire (encoded and decoded again).
    fn ipxe_settings_on_the_wire(r: &Reply) -> Option<Vec<u8>> {
        use dhcproto::{Decodable, Decoder, Encodable};
        let bytes = r.message.to_vec().unwrap();
        let m = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        match m.opts().get(OptionCode::Unknown(175)) {
            Some(DhcpOption::Unknown(u)) => Some(u.data().to_vec()),
            _ => None,
        }
    }

    #[test]
    fn ipxe_is_told_not_to_wait_for_proxy_dhcp_and_nobody_else_is() {
        let server = ip("10.141.255.254");
        let offer = reply(run(client::ipxe(client::discover(mac(1), 1), 0), &known_view()));
        assert_eq!(offer.msg_type(), Some(MessageType::Offer));
        assert_eq!(ipxe_settings_on_the_wire(&offer), Some(vec![176, 1, 1]), "no-pxedhcp in the offer");
        let ack =
            reply(run(client::ipxe(client::request_selecting(mac(1), 2, ip("10.141.0.1"), server), 0), &known_view()));
        assert_eq!(ack.msg_type(), Some(MessageType::Ack));
        assert_eq!(ipxe_settings_on_the_wire(&ack), Some(vec![176, 1, 1]), "and in the ack");
        // A PXE ROM (it does not know option 175) and a plain client get none.
        let pxe = reply(run(client::pxe(client::discover(mac(1), 1), 0), &known_view()));
        assert_eq!((bootfile(&pxe).as_deref(), ipxe_settings_on_the_wire(&pxe)), (Some("undionly.kpxe"), None));
        let plain = reply(run(client::discover(mac(1), 1), &known_view()));
        assert_eq!(ipxe_settings_on_the_wire(&plain), None);
    }

    #[test]
    fn plain_clients_get_no_boot_file() {
        let r = reply(run(client::discover(mac(1), 1), &known_view()));
        assert_eq!(bootfile(&r), None);
        assert_eq!(r.message.siaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.message.fname(), None);
        assert_eq!(r.message.yiaddr(), ip("10.141.0.1"));
    }

    #[test]
    fn long_boot_urls_go_in_option_67_only() {
        let cfg = DhcpConfig { boot_url: format!("http://{{host}}/{}", "a".repeat(150)), ..cfg() };
        let d =
            handle(&cfg, &Request::from_message(client::ipxe(client::discover(mac(1), 1), 0)), &ctx(), &known_view());
        let r = reply(d);
        assert_eq!(bootfile(&r).unwrap().len(), "http://10.141.255.254/".len() + 150);
        assert_eq!(r.message.fname(), None);
    }

    #[test]
    fn known_node_request_ack_and_nak() {
        let server = ip("10.141.255.254");
        let a = act(run(client::request_selecting(mac(1), 5, ip("10.141.0.1"), server), &known_view()));
        let r = a.reply.unwrap();
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        assert_eq!(r.message.yiaddr(), ip("10.141.0.1"));
        assert_eq!(
            a.event.unwrap(),
            DhcpEvent {
                node: "node001".into(),
                mac: mac(1),
                ip: ip("10.141.0.1"),
                kind: DhcpEventKind::Acked,
                time: 1000
            }
        );
        assert!(a.writes.is_empty(), "known nodes cost no store writes");

        // Chose another server: say nothing.
        assert_ignored(
            run(client::request_selecting(mac(1), 5, ip("10.141.0.1"), ip("10.141.255.253")), &known_view()),
            "chose server",
        );
        // Asked our server for the wrong address: NAK, broadcast.
        let r = reply(run(client::request_selecting(mac(1), 5, ip("10.141.0.2"), server), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Nak));
        assert_eq!(r.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(r.destination, Destination::Broadcast(68));
        // INIT-REBOOT with an address from another life: NAK.
        let r = reply(run(client::request_init_reboot(mac(1), 5, ip("192.168.1.7")), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Nak));
        match opt(&r, OptionCode::Message) {
            Some(DhcpOption::Message(s)) => assert!(s.contains("192.168.1.7") && s.contains("10.141.0.1"), "{s}"),
            o => panic!("no message option: {o:?}"),
        }
        // INIT-REBOOT with the right address: ACK.
        let r = reply(run(client::request_init_reboot(mac(1), 5, ip("10.141.0.1")), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        // RENEWING: unicast back to ciaddr.
        let r = reply(run(client::request_renew(mac(1), 5, ip("10.141.0.1")), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        assert_eq!(r.message.ciaddr(), ip("10.141.0.1"));
        assert_eq!(r.destination, Destination::Unicast("10.141.0.1:68".parse().unwrap()));
        // RENEWING the wrong address: NAK.
        let r = reply(run(client::request_renew(mac(1), 5, ip("10.141.0.9")), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn discover_reports_offered_and_the_client_id_is_echoed() {
        let mut m = client::discover(mac(1), 1);
        m.opts_mut().insert(DhcpOption::ClientIdentifier(vec![1, 0x52, 0x54, 0, 0, 0, 1]));
        let a = act(run(m, &known_view()));
        assert_eq!(a.event.unwrap().kind, DhcpEventKind::Offered);
        assert_eq!(
            opt(a.reply.as_ref().unwrap(), OptionCode::ClientIdentifier),
            Some(&DhcpOption::ClientIdentifier(vec![1, 0x52, 0x54, 0, 0, 0, 1]))
        );
    }

    #[test]
    fn a_second_nic_of_a_node_gets_that_interface_address() {
        let mut view = known_view();
        if let Client::Known(k) = &mut view.client {
            k.network = Some(ipmi_network());
        }
        let c = RequestContext { local_addrs: vec![ip("10.148.255.254")], ..ctx() };
        let r = reply(handle(&cfg(), &Request::from_message(client::discover(mac(2), 1)), &c, &view));
        assert_eq!(r.message.yiaddr(), ip("10.148.0.1"));
        assert_eq!(opt(&r, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip("10.148.255.254"))));
    }

    #[test]
    fn inform_gets_configuration_without_an_address() {
        let r = reply(run(client::inform(mac(1), 1, ip("10.141.0.1")), &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Ack));
        assert_eq!(r.message.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(opt(&r, OptionCode::AddressLeaseTime), None);
        assert!(opt(&r, OptionCode::Router).is_some());
        assert_eq!(r.destination, Destination::Unicast("10.141.0.1:68".parse().unwrap()));
    }

    #[test]
    fn known_node_decline_and_release_are_reported_not_answered() {
        let server = ip("10.141.255.254");
        let a = act(run(client::decline(mac(1), 1, ip("10.141.0.1"), server), &known_view()));
        assert_eq!((a.reply, a.event.map(|e| e.kind)), (None, Some(DhcpEventKind::Declined)));
        let a = act(run(client::release(mac(1), 1, ip("10.141.0.1"), server), &known_view()));
        assert_eq!((a.reply, a.event.map(|e| e.kind)), (None, Some(DhcpEventKind::Released)));
        assert_ignored(
            run(client::release(mac(1), 1, ip("10.141.0.1"), ip("10.0.0.9")), &known_view()),
            "another server",
        );
    }

    #[test]
    fn relayed_requests_go_back_to_the_relay_with_option_82() {
        let relay_body = vec![1u8, 4, 0, 1, 0, 7, 2, 3, b's', b'w', b'1'];
        let c = RequestContext { local_addrs: vec![ip("192.168.0.1")], ..ctx() };
        let mut req =
            Request::from_message(client::pxe(client::relayed(client::discover(mac(1), 3), ip("10.141.255.1")), 0));
        req.relay_info = Some(relay_body.clone());
        let r = reply(handle(&cfg(), &req, &c, &known_view()));
        assert_eq!(r.destination, Destination::Relay("10.141.255.1:67".parse().unwrap()));
        assert_eq!(r.relay_info, Some(relay_body.clone()));
        assert_eq!(r.message.giaddr(), ip("10.141.255.1"));
        assert_eq!(r.message.yiaddr(), ip("10.141.0.1"));
        // Our address is that of the interface the relay reached.
        assert_eq!(opt(&r, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip("192.168.0.1"))));

        // A NAK through a relay carries the broadcast bit.
        let mut req = Request::from_message(client::relayed(
            client::request_init_reboot(mac(1), 3, ip("10.141.0.77")),
            ip("10.141.255.1"),
        ));
        req.relay_info = Some(relay_body.clone());
        let r = reply(handle(&cfg(), &req, &c, &known_view()));
        assert_eq!(r.msg_type(), Some(MessageType::Nak));
        assert!(r.message.flags().broadcast());
        assert_eq!(r.destination, Destination::Relay("10.141.255.1:67".parse().unwrap()));
        assert_eq!(r.relay_info, Some(relay_body));

        // A relay on another network than the node's: silence.
        let req = Request::from_message(client::relayed(client::discover(mac(1), 3), ip("10.200.0.1")));
        assert_ignored(handle(&cfg(), &req, &c, &known_view()), "relay 10.200.0.1");
    }

    #[test]
    fn unconfigured_interfaces_and_strangers_get_silence() {
        let c = RequestContext { interface: "eth9".into(), ..ctx() };
        assert_ignored(
            handle(&cfg(), &Request::from_message(client::discover(mac(1), 1)), &c, &known_view()),
            "not a dhcp interface",
        );
        // The cluster may narrow the list further.
        let mut view = known_view();
        view.cluster.dhcp_interfaces = vec!["prov1".into()];
        assert_ignored(run(client::discover(mac(1), 1), &view), "dhcp_interfaces");
        // Discovery off: unknown MACs never get an answer, whatever they send.
        for m in [
            client::discover(mac(9), 1),
            client::request_init_reboot(mac(9), 1, ip("10.141.200.1")),
            client::inform(mac(9), 1, ip("10.141.200.1")),
        ] {
            assert_ignored(run(m, &unknown_view(None)), "discovery is off");
        }
        // A node on another network than the interface's.
        let c = RequestContext { local_addrs: vec![ip("10.200.0.1")], ..ctx() };
        assert_ignored(
            handle(&cfg(), &Request::from_message(client::discover(mac(1), 1)), &c, &known_view()),
            "interface prov0",
        );
        // Replies and non-server messages.
        let mut m = client::discover(mac(1), 1);
        m.set_opcode(Opcode::BootReply);
        assert_ignored(run(m, &known_view()), "not a boot request");
        assert_ignored(run(client::message(MessageType::Offer, mac(1), 1), &known_view()), "not for a server");
        let mut m = client::discover(mac(1), 1);
        m.opts_mut().remove(OptionCode::MessageType);
        assert_ignored(run(m, &known_view()), "BOOTP");
    }

    #[test]
    fn node_without_address_or_network_gets_silence() {
        let mut view = known_view();
        if let Client::Known(k) = &mut view.client {
            k.node.interfaces[0].ip = None;
        }
        assert_ignored(run(client::discover(mac(1), 1), &view), "no address on interface BOOTIF");
        let mut view = known_view();
        if let Client::Known(k) = &mut view.client {
            k.network = None;
        }
        assert_ignored(run(client::discover(mac(1), 1), &view), "network cluster of node node001 does not exist");
    }

    #[test]
    fn discovery_probes_then_offers_the_first_free_address() {
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let records: BTreeMap<_, _> = [
            // Held by another machine, still valid.
            (ip("10.141.200.2"), v(4, lease(mac(7), "10.141.200.2", LeaseState::Bound, 5000))),
            // Declined and still quarantined.
            (ip("10.141.200.3"), v(2, lease(mac(8), "10.141.200.3", LeaseState::Declined, 1500))),
            // Expired: reusable.
            (ip("10.141.200.4"), v(6, lease(mac(7), "10.141.200.4", LeaseState::Bound, 999))),
        ]
        .into();
        // .1 is claimed by a switch.
        let d = answer_probes(&mut view, &records, &[ip("10.141.200.1")]);
        let a = act(d);
        let r = a.reply.unwrap();
        assert_eq!(r.msg_type(), Some(MessageType::Offer));
        assert_eq!(r.message.yiaddr(), ip("10.141.200.4"));
        assert_eq!(opt(&r, OptionCode::Hostname), None);
        assert_eq!(opt(&r, OptionCode::DomainName), Some(&DhcpOption::DomainName("cluster.local".into())));
        assert_eq!(a.allocated, Some(ip("10.141.200.4")));
        assert_eq!(a.event, None);
        let doc = lease(mac(9), "10.141.200.4", LeaseState::Offered, 1060).to_value();
        assert_eq!(
            a.writes,
            vec![
                Write::Put {
                    collection: Collection::Lease,
                    key: "ip/10.141.200.4".into(),
                    expect: Expect::Rev(6),
                    doc: doc.clone()
                },
                Write::Put {
                    collection: Collection::Lease,
                    key: "mac/52:54:00:00:00:09".into(),
                    expect: Expect::Absent,
                    doc
                },
            ]
        );
        // Probed in batches, in order, nothing beyond what was needed.
        let probed: Vec<_> = unknown_mut(&mut view).candidates.keys().copied().collect();
        assert_eq!(probed, ["10.141.200.1", "10.141.200.2", "10.141.200.3", "10.141.200.4"].map(ip));
    }

    #[test]
    fn discovery_offers_only_from_this_servers_slice() {
        let view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let sliced = DhcpConfig { slice: Some("10.141.200.11-10.141.200.30".parse().unwrap()), ..cfg() };
        let req = Request::from_message(client::discover(mac(9), 1));
        match handle(&sliced, &req, &ctx(), &view) {
            Decision::Probe { ips, .. } => {
                assert_eq!(ips.first(), Some(&ip("10.141.200.11")), "{ips:?}");
                assert!(ips.iter().all(|a| (ip("10.141.200.11")..=ip("10.141.200.20")).contains(a)), "{ips:?}");
            }
            other => panic!("expected a probe of the slice, got {other:?}"),
        }
        let outside = DhcpConfig { slice: Some("10.141.201.1-10.141.201.9".parse().unwrap()), ..cfg() };
        assert_ignored(
            handle(&outside, &req, &ctx(), &view),
            "dhcp slice 10.141.201.1-10.141.201.9 is outside the cluster's dhcp_range 10.141.200.1-10.141.200.20",
        );
        assert_eq!(
            sliced.pool_range("10.141.200.1-10.141.200.20".parse().unwrap()).unwrap().to_string(),
            "10.141.200.11-10.141.200.20"
        );
    }

    #[test]
    fn discovery_never_offers_the_server_gateway_or_dns() {
        let mut view = unknown_view(Some("10.141.255.250-10.141.255.254"));
        view.cluster.frontend_address = Some(ip("10.141.255.253"));
        if let Client::Unknown(u) = &mut view.client {
            u.networks[0].dns_server = Some(ip("10.141.255.250"));
            u.networks[0].gateway = Some(ip("10.141.255.251"));
        }
        let d = answer_probes(&mut view, &BTreeMap::new(), &[]);
        assert_eq!(reply(d).message.yiaddr(), ip("10.141.255.252"));
        let probed: Vec<_> = unknown_mut(&mut view).candidates.keys().copied().collect();
        assert_eq!(probed, [ip("10.141.255.252")]);
    }

    #[test]
    fn discovery_starts_after_the_hint_and_wraps() {
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.3"));
        let c = RequestContext { alloc_hint: Some(ip("10.141.200.2")), ..ctx() };
        match handle(&cfg(), &Request::from_message(client::discover(mac(9), 1)), &c, &view) {
            Decision::Probe { ips, .. } => assert_eq!(ips, ["10.141.200.3", "10.141.200.1", "10.141.200.2"].map(ip)),
            d => panic!("{d:?}"),
        }
        // A requested address comes first when it is allowed.
        let mut m = client::discover(mac(9), 1);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip("10.141.200.2")));
        match handle(&cfg(), &Request::from_message(m), &c, &view) {
            Decision::Probe { ips, .. } => assert_eq!(ips, ["10.141.200.2", "10.141.200.3", "10.141.200.1"].map(ip)),
            d => panic!("{d:?}"),
        }
        // Everything taken: silence, after looking at each address once.
        let taken: BTreeMap<_, _> = (1..=3)
            .map(|i| {
                (
                    ip(&format!("10.141.200.{i}")),
                    v(1, lease(mac(7), &format!("10.141.200.{i}"), LeaseState::Bound, 5000)),
                )
            })
            .collect();
        assert_ignored(
            answer_probes(&mut view, &taken, &[]),
            "no free address in 10.141.200.1-10.141.200.3 on network cluster (3 looked at)",
        );
    }

    #[test]
    fn discovery_probing_is_bounded_on_big_full_ranges() {
        let mut view = unknown_view(Some("10.141.0.1-10.141.250.255"));
        let claimed: Vec<Ipv4Addr> =
            (0..(MAX_PROBES as u32 + 10)).map(|i| Ipv4Addr::from(u32::from(ip("10.141.0.1")) + i)).collect();
        assert_ignored(answer_probes(&mut view, &BTreeMap::new(), &claimed), &format!("({MAX_PROBES} looked at)"));
    }

    #[test]
    fn a_range_outside_the_link_network_gives_nothing() {
        assert_ignored(
            run(client::discover(mac(9), 1), &unknown_view(Some("10.148.0.10-10.148.0.20"))),
            "not on network cluster",
        );
        let c = RequestContext { local_addrs: vec![ip("192.168.7.1")], ..ctx() };
        let view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        assert_ignored(
            handle(&cfg(), &Request::from_message(client::discover(mac(9), 1)), &c, &view),
            "no network holds",
        );
    }

    fn holding(state: LeaseState, expires: u64) -> View {
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let u = unknown_mut(&mut view);
        u.lease = Some(v(3, lease(mac(9), "10.141.200.7", LeaseState::Offered, 1060)));
        u.held = Some(v(5, lease(mac(9), "10.141.200.7", state, expires)));
        view
    }

    #[test]
    fn a_returning_machine_gets_its_lease_back() {
        // Bound and valid: offered again, nothing written.
        let a = act(run(client::pxe(client::discover(mac(9), 1), 0), &holding(LeaseState::Bound, 4000)));
        assert_eq!(a.reply.unwrap().message.yiaddr(), ip("10.141.200.7"));
        assert!(a.writes.is_empty());
        // Expired but nobody took it: same address, held again.
        let a = act(run(client::ipxe(client::discover(mac(9), 1), 0), &holding(LeaseState::Released, 10)));
        let r = a.reply.unwrap();
        assert_eq!(r.message.yiaddr(), ip("10.141.200.7"));
        assert_eq!(bootfile(&r).as_deref(), Some("http://10.141.255.254:7050/boot/ipxe?mac=52:54:00:00:00:09"));
        assert_eq!(a.writes.len(), 2);
        assert!(
            matches!(&a.writes[0], Write::Put { key, expect: Expect::Rev(5), doc, .. } if key == "ip/10.141.200.7" && doc["state"] == "offered")
        );
        assert!(
            matches!(&a.writes[1], Write::Put { key, expect: Expect::Rev(3), .. } if key == "mac/52:54:00:00:00:09")
        );
    }

    #[test]
    fn a_lease_on_a_now_claimed_address_is_replaced() {
        let mut view = holding(LeaseState::Bound, 4000);
        unknown_mut(&mut view).held_claimed = true;
        // Renewing it: NAK (the probe says it is claimed).
        let req = client::request_renew(mac(9), 1, ip("10.141.200.7"));
        let Decision::Probe { ips, .. } = run(req.clone(), &view) else { panic!() };
        assert_eq!(ips, [ip("10.141.200.7")]);
        unknown_mut(&mut view)
            .candidates
            .insert(ip("10.141.200.7"), Candidate { lease: None, claimed: true, busy: false, holder: None });
        assert_eq!(reply(run(req, &view)).msg_type(), Some(MessageType::Nak));
        // Discovering: a new address, and the old record goes.
        let mut view = holding(LeaseState::Bound, 4000);
        unknown_mut(&mut view).held_claimed = true;
        let a = act(answer_probes(&mut view, &BTreeMap::new(), &[]));
        assert_eq!(a.allocated, Some(ip("10.141.200.1")));
        assert_eq!(
            a.writes[2],
            Write::Delete { collection: Collection::Lease, key: "ip/10.141.200.7".into(), expect: Expect::Rev(5) }
        );
    }

    #[test]
    fn a_lease_taken_over_by_another_machine_is_not_ours() {
        let mut view = holding(LeaseState::Bound, 10);
        unknown_mut(&mut view).held = Some(v(9, lease(mac(7), "10.141.200.7", LeaseState::Offered, 1060)));
        let a = act(answer_probes(&mut view, &BTreeMap::new(), &[]));
        assert_eq!(a.allocated, Some(ip("10.141.200.1")));
        assert_eq!(a.writes.len(), 2, "the other machine's record is left alone: {:?}", a.writes);
        assert!(matches!(&a.writes[1], Write::Put { expect: Expect::Rev(3), .. }));
    }

    #[test]
    fn taking_over_an_expired_address_deletes_the_old_holders_mac_record() {
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let old = lease(mac(7), "10.141.200.1", LeaseState::Offered, 900);
        let holder = |ip_: &str, rev| Some(v(rev, lease(mac(7), ip_, LeaseState::Offered, 900)));
        unknown_mut(&mut view).candidates.insert(
            ip("10.141.200.1"),
            Candidate { lease: Some(v(4, old.clone())), holder: holder("10.141.200.1", 6), ..Candidate::default() },
        );
        let a = act(run(client::discover(mac(9), 1), &view));
        assert_eq!(a.allocated, Some(ip("10.141.200.1")));
        assert_eq!(a.writes.len(), 3, "{:?}", a.writes);
        assert!(matches!(&a.writes[0], Write::Put { key, expect: Expect::Rev(4), .. } if key == "ip/10.141.200.1"));
        assert!(
            matches!(&a.writes[1], Write::Put { key, expect: Expect::Absent, .. } if key == "mac/52:54:00:00:00:09")
        );
        assert_eq!(
            a.writes[2],
            Write::Delete {
                collection: Collection::Lease,
                key: "mac/52:54:00:00:00:07".into(),
                expect: Expect::Rev(6)
            }
        );
        // The old holder's record names another address by now: it is left alone.
        unknown_mut(&mut view).candidates.get_mut(&ip("10.141.200.1")).unwrap().holder = holder("10.141.200.5", 8);
        assert_eq!(act(run(client::discover(mac(9), 1), &view)).writes.len(), 2);
    }

    #[test]
    fn per_mac_churn_is_capped() {
        let server = ip("10.141.255.254");
        // A fresh offer (expires 1060, now 1000, offer_time 60): a repeated DISCOVER writes nothing.
        let a = act(run(client::discover(mac(9), 1), &holding(LeaseState::Offered, 1060)));
        assert_eq!(a.reply.unwrap().message.yiaddr(), ip("10.141.200.7"));
        assert!(a.writes.is_empty(), "{:?}", a.writes);
        // Half of it gone: the hold is renewed.
        let a = act(run(client::discover(mac(9), 1), &holding(LeaseState::Offered, 1029)));
        assert_eq!(a.writes.len(), 2);
        // Holding a live lease, asking for another address: NAK, nothing written, no lookups.
        let view = holding(LeaseState::Bound, 4000);
        let d = run(client::request_init_reboot(mac(9), 1, ip("10.141.200.11")), &view);
        assert_eq!(reply(d).msg_type(), Some(MessageType::Nak));
        // Once that lease has expired the machine may move.
        let mut view = holding(LeaseState::Bound, 999);
        unknown_mut(&mut view).candidates.insert(ip("10.141.200.11"), Candidate::default());
        let a = act(run(client::request_init_reboot(mac(9), 1, ip("10.141.200.11")), &view));
        assert_eq!(a.reply.unwrap().msg_type(), Some(MessageType::Ack));
        let _ = server;
    }

    #[test]
    fn discovery_request_paths() {
        let server = ip("10.141.255.254");
        let view = holding(LeaseState::Offered, 1060);
        // SELECTING our offer: ACK, bound for the lease time.
        let a = act(run(client::request_selecting(mac(9), 1, ip("10.141.200.7"), server), &view));
        assert_eq!(a.reply.unwrap().msg_type(), Some(MessageType::Ack));
        assert!(
            matches!(&a.writes[0], Write::Put { expect: Expect::Rev(5), doc, .. } if doc["state"] == "bound" && doc["expires"] == 4600)
        );
        // SELECTING another address from us: its record is looked up, and with no offer of
        // ours there: NAK.
        let other_addr = client::request_selecting(mac(9), 1, ip("10.141.200.8"), server);
        assert_eq!(
            run(other_addr.clone(), &view),
            Decision::Probe { network: "cluster".into(), ips: vec![ip("10.141.200.8")] }
        );
        let mut probed = view.clone();
        unknown_mut(&mut probed).candidates.insert(ip("10.141.200.8"), Candidate::default());
        assert_eq!(reply(run(other_addr, &probed)).msg_type(), Some(MessageType::Nak));
        // SELECTING another server: our offer is freed at once.
        let a = act(run(client::request_selecting(mac(9), 1, ip("10.9.9.9"), ip("10.141.255.1")), &view));
        assert_eq!(a.reply, None);
        assert!(
            matches!(&a.writes[..], [Write::Put { key, expect: Expect::Rev(5), doc, .. }] if key == "ip/10.141.200.7" && doc["state"] == "released" && doc["expires"] == 1000)
        );
        // INIT-REBOOT outside the range or network: NAK, no lookups.
        for bad in ["10.141.0.5", "192.168.1.5", "10.141.255.254"] {
            let r = reply(run(client::request_init_reboot(mac(9), 1, ip(bad)), &view));
            assert_eq!(r.msg_type(), Some(MessageType::Nak), "{bad}");
        }
        // INIT-REBOOT with a free in-range address we have no record of: probe, then ACK.
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let req = client::request_init_reboot(mac(9), 1, ip("10.141.200.11"));
        assert_eq!(
            run(req.clone(), &view),
            Decision::Probe { network: "cluster".into(), ips: vec![ip("10.141.200.11")] }
        );
        unknown_mut(&mut view).candidates.insert(ip("10.141.200.11"), Candidate::default());
        let a = act(run(req.clone(), &view));
        assert_eq!(a.reply.unwrap().msg_type(), Some(MessageType::Ack));
        assert!(matches!(&a.writes[0], Write::Put { expect: Expect::Absent, doc, .. } if doc["state"] == "bound"));
        // …but NAK when another machine holds it.
        let other = v(2, lease(mac(7), "10.141.200.11", LeaseState::Bound, 5000));
        unknown_mut(&mut view)
            .candidates
            .insert(ip("10.141.200.11"), Candidate { lease: Some(other), claimed: false, busy: false, holder: None });
        assert_eq!(reply(run(req, &view)).msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn discovery_release_and_decline() {
        let server = ip("10.141.255.254");
        let view = holding(LeaseState::Bound, 4000);
        let a = act(run(client::release(mac(9), 1, ip("10.141.200.7"), server), &view));
        assert_eq!(a.reply, None);
        assert!(
            matches!(&a.writes[..], [Write::Put { key, expect: Expect::Rev(5), doc, .. }] if key == "ip/10.141.200.7" && doc["state"] == "released" && doc["expires"] == 1000)
        );
        assert_ignored(run(client::release(mac(9), 1, ip("10.141.200.8"), server), &view), "does not hold");
        assert_ignored(run(client::release(mac(9), 1, ip("10.141.200.7"), ip("10.1.1.1")), &view), "another server");

        let a = act(run(client::decline(mac(9), 1, ip("10.141.200.7"), server), &view));
        assert_eq!(a.reply, None);
        assert!(
            matches!(&a.writes[..], [Write::Put { expect: Expect::Rev(5), doc, .. }] if doc["state"] == "declined" && doc["expires"] == 1600)
        );
        // A declined address is not offered back to the decliner.
        let mut view = holding(LeaseState::Declined, 1600);
        let a = act(answer_probes(&mut view, &BTreeMap::new(), &[]));
        assert_eq!(a.allocated, Some(ip("10.141.200.1")));
        assert_eq!(a.writes.len(), 2, "the quarantine record stays");
    }

    #[test]
    fn discovery_inform_and_relay() {
        let r =
            reply(run(client::inform(mac(9), 1, ip("10.141.0.99")), &unknown_view(Some("10.141.200.1-10.141.200.20"))));
        assert_eq!((r.msg_type(), r.message.yiaddr()), (Some(MessageType::Ack), Ipv4Addr::UNSPECIFIED));
        // Relayed discovery: the network is the relay's.
        let mut view = unknown_view(Some("10.148.200.1-10.148.200.20"));
        let c = RequestContext { local_addrs: vec![ip("10.141.255.254")], ..ctx() };
        let req = Request::from_message(client::relayed(client::discover(mac(9), 1), ip("10.148.0.1")));
        let d = handle(&cfg(), &req, &c, &view);
        assert_eq!(
            d,
            Decision::Probe {
                network: "ipmi".into(),
                ips: ["10.148.200.1", "10.148.200.2", "10.148.200.3", "10.148.200.4"].map(ip).to_vec()
            }
        );
        unknown_mut(&mut view).candidates.insert(ip("10.148.200.1"), Candidate::default());
        let r = reply(handle(&cfg(), &req, &c, &view));
        assert_eq!(r.message.yiaddr(), ip("10.148.200.1"));
        assert_eq!(r.destination, Destination::Relay("10.148.0.1:67".parse().unwrap()));
    }

    #[test]
    fn server_address_override_is_announced() {
        let cfg = DhcpConfig { server_address: Some(ip("10.141.255.200")), ..cfg() };
        let r = reply(handle(
            &cfg,
            &Request::from_message(client::pxe(client::discover(mac(1), 1), 0)),
            &ctx(),
            &known_view(),
        ));
        assert_eq!(opt(&r, OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(ip("10.141.255.200"))));
        assert_eq!(r.message.siaddr(), ip("10.141.255.200"));
        // A REQUEST naming the interface address is then for another server.
        let req = Request::from_message(client::request_selecting(mac(1), 1, ip("10.141.0.1"), ip("10.141.255.254")));
        assert_ignored(handle(&cfg, &req, &ctx(), &known_view()), "chose server");
    }

    #[test]
    fn custom_ports() {
        let cfg = DhcpConfig { port: 6767, ..cfg() };
        let r = reply(handle(
            &cfg,
            &Request::from_message(client::broadcast(client::discover(mac(1), 1))),
            &ctx(),
            &known_view(),
        ));
        assert_eq!(r.destination, Destination::Broadcast(6768));
        let req = Request::from_message(client::relayed(client::discover(mac(1), 1), ip("10.141.255.1")));
        assert_eq!(
            reply(handle(&cfg, &req, &ctx(), &known_view())).destination,
            Destination::Relay("10.141.255.1:6767".parse().unwrap())
        );
    }

    /// One server of two on a shared lease table: decides on `req` with the table as the store
    /// would load it (the `mac/` record, the `ip/` record it names, probed addresses), and
    /// commits the writes (checking every expectation, as the store's compare-and-swap does).
    fn decide_on_table(
        cfg: &DhcpConfig,
        ctx: &RequestContext,
        req: Message,
        table: &mut BTreeMap<String, Versioned<Lease>>,
    ) -> Action {
        let mut view = unknown_view(Some("10.141.200.1-10.141.200.20"));
        let m = mac(9);
        let u = unknown_mut(&mut view);
        u.lease = table.get(&Lease::mac_key(&m)).cloned();
        u.held = u.lease.as_ref().and_then(|l| table.get(&Lease::ip_key(l.value.ip)).cloned());
        let req = Request::from_message(req);
        for _ in 0..50 {
            match handle(cfg, &req, ctx, &view) {
                Decision::Probe { ips, .. } => {
                    for i in ips {
                        let c = Candidate { lease: table.get(&Lease::ip_key(i)).cloned(), ..Candidate::default() };
                        unknown_mut(&mut view).candidates.insert(i, c);
                    }
                }
                Decision::Act(a) => {
                    for w in &a.writes {
                        let (_, key, expect) = w.target();
                        let found = table.get(key).map(|r| r.rev);
                        match expect {
                            Expect::Absent => assert_eq!(found, None, "{key} exists"),
                            Expect::Rev(n) => assert_eq!(found, Some(n), "{key} moved"),
                        }
                    }
                    for w in &a.writes {
                        match w {
                            Write::Put { key, doc, .. } => {
                                let rev = table.get(key).map_or(1, |r| r.rev + 1);
                                table.insert(key.clone(), v(rev, serde_json::from_value(doc.clone()).unwrap()));
                            }
                            Write::Delete { key, .. } => {
                                table.remove(key);
                            }
                            Write::Check { .. } => {}
                        }
                    }
                    return a;
                }
                Decision::Ignore(_) => return Action::default(),
            }
        }
        panic!("probing never ended");
    }

    /// Two servers answer a stranger's DISCOVER, each from its slice, on one lease table; the
    /// client may take either offer. The server it names ACKs (it used to NAK: the shared
    /// `mac/` record named the other server's offer), the other stays silent, and the address
    /// ends bound to the client in both records.
    #[test]
    fn two_servers_offer_to_one_stranger_and_the_chosen_one_acks() {
        let (sa, sb) = (ip("10.141.255.254"), ip("10.141.255.253"));
        let cfg_a = DhcpConfig { slice: Some("10.141.200.1-10.141.200.10".parse().unwrap()), ..cfg() };
        let cfg_b = DhcpConfig { slice: Some("10.141.200.11-10.141.200.20".parse().unwrap()), ..cfg() };
        let ctx_a = ctx();
        let ctx_b = RequestContext { local_addrs: vec![sb], ..ctx() };
        for (first_is_a, choose_a) in [(true, true), (true, false), (false, true), (false, false)] {
            let mut table = BTreeMap::new();
            let mut offers = Vec::new();
            let order =
                if first_is_a { [(&cfg_a, &ctx_a), (&cfg_b, &ctx_b)] } else { [(&cfg_b, &ctx_b), (&cfg_a, &ctx_a)] };
            for (c, x) in order {
                let a = decide_on_table(c, x, client::discover(mac(9), 1), &mut table);
                let r = a.reply.expect("both servers offer");
                offers.push((r.message.yiaddr(), x.local_addrs[0]));
            }
            let (offered_a, offered_b) =
                if first_is_a { (offers[0].0, offers[1].0) } else { (offers[1].0, offers[0].0) };
            assert!((ip("10.141.200.1")..=ip("10.141.200.10")).contains(&offered_a), "{offered_a}");
            assert!((ip("10.141.200.11")..=ip("10.141.200.20")).contains(&offered_b), "{offered_b}");
            let (chosen, server) = if choose_a { (offered_a, sa) } else { (offered_b, sb) };
            let req = client::request_selecting(mac(9), 2, chosen, server);
            // Both receive the broadcast REQUEST, in either order.
            let mut acks = 0;
            for (c, x) in order {
                let a = decide_on_table(c, x, req.clone(), &mut table);
                match a.reply {
                    Some(r) => {
                        assert_eq!(x.local_addrs[0], server, "only the chosen server answers");
                        assert_eq!(r.msg_type(), Some(MessageType::Ack), "case {first_is_a} {choose_a}");
                        assert_eq!(r.message.yiaddr(), chosen);
                        acks += 1;
                    }
                    None => assert_ne!(x.local_addrs[0], server, "the chosen server is silent"),
                }
            }
            assert_eq!(acks, 1);
            let bound = &table[&Lease::ip_key(chosen)].value;
            assert_eq!((bound.mac, bound.state), (mac(9), LeaseState::Bound));
            assert_eq!(table[&Lease::mac_key(&mac(9))].value.ip, chosen);
        }
    }
}
