//! The socket side: one UDP socket per configured interface (SO_BINDTODEVICE, so a packet is
//! only ever seen by the socket of the interface it arrived on), store reads per request, the
//! engine's decision applied.
//!
//! Nothing read from the store is cached here: every request reads the cluster, the MAC's claim
//! and what hangs off it (the sqlite store answers repeated reads from its exact read cache,
//! `store/cache.rs`, and `store/objects.rs` keeps the decoding of a record until the record is
//! written, so a store change is still seen by the next request). Two things are kept in memory, neither store data: the interfaces'
//! addresses (re-read every [`ADDR_TTL`]) and where dynamic allocation left off (a hint).

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use ipnet::Ipv4Net;
use luna_core::model::{AnyObject, Claim, Cluster, IpRange, Kind};
use luna_core::MacAddr;
use serde::de::DeserializeOwned;
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::engine::{self, node_interface, Candidate, Client, Decision, Known, RequestContext, Unknown, View};
use super::lease::{Lease, Versioned};
use super::packet::{encode_reply, Destination, Reply, Request};
use super::{DhcpConfig, DhcpError, DhcpEvent, DhcpStatusSink};
use crate::store::objects::Objects;
use crate::store::{Collection, Record, Store, StoreError};

/// How long an interface's address list is trusted.
pub const ADDR_TTL: Duration = Duration::from_secs(2);
/// Decisions redone after a compare-and-swap conflict before the request is dropped.
const MAX_ATTEMPTS: usize = 8;
/// Largest datagram read; DHCP messages are far smaller.
const MAX_DATAGRAM: usize = 4096;

/// What one request came to: the reply to send and the event to report after sending.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    pub reply: Option<Reply>,
    pub event: Option<DhcpEvent>,
}

/// Everything but the sockets: decode, read the store, decide, commit. Public so tests and
/// load generators can drive the whole path without a network.
pub struct Handler {
    cfg: DhcpConfig,
    store: Arc<dyn Store>,
    /// Decoded cluster, node, group and network records (`store/objects.rs`).
    objects: Objects,
    alloc: Arc<Mutex<AllocState>>,
}

/// Where dynamic allocation stands in this process. Only ever a hint: the store's
/// compare-and-swap decides who gets an address; this just keeps concurrent requests from
/// looking at the same addresses (and from committing into certain conflicts).
#[derive(Debug, Default)]
struct AllocState {
    /// The last address handed out; a request alone starts right after it, so addresses go out
    /// in order.
    cursor: Option<Ipv4Addr>,
    /// The end of the last probe window handed out; while several requests probe, each next
    /// window starts after it.
    frontier: Option<Ipv4Addr>,
    /// Requests currently probing.
    probing: usize,
    /// Addresses being committed right now.
    inflight: HashSet<Ipv4Addr>,
}

/// `to` is ahead of `from` going round `range` (by less than half of it).
fn ahead(range: IpRange, from: Ipv4Addr, to: Ipv4Addr) -> bool {
    if !range.contains(from) || !range.contains(to) {
        return range.contains(to);
    }
    let len = range.len();
    let off = |ip: Ipv4Addr| u64::from(u32::from(ip) - u32::from(range.start));
    let d = (off(to) + len - off(from)) % len;
    d > 0 && d < len.div_ceil(2)
}

fn advance(slot: &mut Option<Ipv4Addr>, range: Option<IpRange>, to: Ipv4Addr) {
    match (*slot, range) {
        (Some(from), Some(r)) if !ahead(r, from, to) => {}
        _ => *slot = Some(to),
    }
}

/// Marks a request as probing, and the address it commits as in flight, until dropped.
struct AllocGuard {
    state: Arc<Mutex<AllocState>>,
    probing: bool,
    reserved: Option<Ipv4Addr>,
}

impl AllocGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, AllocState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn release_reservation(&mut self) {
        if let Some(ip) = self.reserved.take() {
            self.lock().inflight.remove(&ip);
        }
    }
}

impl Drop for AllocGuard {
    fn drop(&mut self) {
        self.release_reservation();
        if self.probing {
            let mut st = self.lock();
            st.probing = st.probing.saturating_sub(1);
        }
    }
}

impl Handler {
    pub fn new(cfg: DhcpConfig, store: Arc<dyn Store>) -> Self {
        let objects = Objects::new(store.clone());
        Handler { cfg, store, objects, alloc: Arc::new(Mutex::new(AllocState::default())) }
    }

    pub fn config(&self) -> &DhcpConfig {
        &self.cfg
    }

    /// Handles one datagram that arrived on `interface`, whose addresses are `local_addrs`.
    pub async fn process(
        &self,
        interface: &str,
        local_addrs: &[Ipv4Addr],
        bytes: &[u8],
        now: u64,
    ) -> Result<Outcome, DhcpError> {
        let req = Request::decode(bytes)?;
        let Some(mac) = req.mac() else {
            tracing::debug!(interface, hlen = req.message.hlen(), "dhcp: ignoring a non-ethernet request");
            return Ok(Outcome::default());
        };
        let mut ctx = RequestContext {
            interface: interface.to_string(),
            local_addrs: local_addrs.to_vec(),
            now,
            alloc_hint: None,
        };
        let mut guard = AllocGuard { state: self.alloc.clone(), probing: false, reserved: None };
        // The last address this request looked up: where the next one goes on if this one
        // finds nothing (else a run of taken addresses would stop every request alike).
        let mut last_probed: Option<Ipv4Addr> = None;
        'attempts: for attempt in 1..=MAX_ATTEMPTS {
            let mut view = load_view(&self.objects, &mac).await?;
            let range = view.cluster.dhcp_range.and_then(|r| self.cfg.pool_range(r).ok());
            let mut first_round = true;
            loop {
                let decision = {
                    let mut st = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
                    let others = st.probing - usize::from(guard.probing);
                    if first_round {
                        // Alone: go on from the last address given (so they go out in order).
                        // With company: start past every window handed out, so nobody looks
                        // at the same addresses. Later rounds keep the start: the engine
                        // walks on from it, over what it already looked up.
                        ctx.alloc_hint = if others == 0 { st.cursor } else { st.frontier.or(st.cursor) };
                        first_round = false;
                    }
                    let d = engine::handle(&self.cfg, &req, &ctx, &view);
                    if let Decision::Probe { ips, .. } = &d {
                        if !guard.probing {
                            guard.probing = true;
                            st.probing += 1;
                        }
                        if let Some(last) = ips.last() {
                            if others == 0 {
                                st.frontier = Some(*last);
                            } else {
                                advance(&mut st.frontier, range, *last);
                            }
                        }
                    }
                    d
                };
                let action = match decision {
                    Decision::Probe { network, ips } => {
                        let (probed, leased, claimed, busy) = match &view.client {
                            Client::Unknown(u) => (
                                u.candidates.len(),
                                u.candidates.values().filter(|c| c.lease.is_some()).count(),
                                u.candidates.values().filter(|c| c.claimed).count(),
                                u.candidates.values().filter(|c| c.busy).count(),
                            ),
                            Client::Known(_) => (0, 0, 0, 0),
                        };
                        if probed >= engine::MAX_PROBES {
                            tracing::debug!(interface, %mac, probed, leased, claimed, busy, hint = ?ctx.alloc_hint, "dhcp: no free address found; the client will retry");
                            if let Some(last) = last_probed {
                                advance(&mut guard.lock().cursor, range, last);
                            }
                            return Ok(Outcome::default());
                        }
                        last_probed = ips.last().copied().or(last_probed);
                        let found = load_candidates(self.store.as_ref(), &network, &ips, &mac).await?;
                        if let Client::Unknown(u) = &mut view.client {
                            u.candidates.extend(found);
                        }
                        continue;
                    }
                    Decision::Ignore(why) => {
                        tracing::debug!(interface, %mac, reason = %why, "dhcp: no answer");
                        if let Some(last) = last_probed {
                            advance(&mut guard.lock().cursor, range, last);
                        }
                        return Ok(Outcome::default());
                    }
                    Decision::Act(a) => a,
                };
                if let Some(ip) = action.allocated {
                    if !guard.lock().inflight.insert(ip) {
                        // Another request here is giving it away right now: pick again.
                        if let Client::Unknown(u) = &mut view.client {
                            u.candidates.entry(ip).or_default().busy = true;
                        }
                        continue;
                    }
                    guard.reserved = Some(ip);
                }
                if !action.writes.is_empty() {
                    let committed = self.store.commit(action.writes).await;
                    guard.release_reservation();
                    match committed {
                        Ok(()) => {}
                        Err(StoreError::Conflict { collection, key, .. }) => {
                            tracing::debug!(%mac, attempt, %collection, %key, "dhcp: lease changed concurrently; deciding again");
                            continue 'attempts;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                if let Some(ip) = action.allocated {
                    let mut st = guard.lock();
                    advance(&mut st.cursor, range, ip);
                }
                if let Some(r) = &action.reply {
                    tracing::debug!(interface, %mac, kind = ?r.msg_type(), yiaddr = %r.message.yiaddr(), dest = ?r.destination, "dhcp: reply");
                }
                return Ok(Outcome { reply: action.reply, event: action.event });
            }
        }
        tracing::warn!(%mac, "dhcp: lease records kept changing under this request; dropped it (the client retries)");
        Ok(Outcome::default())
    }
}

fn parse<T: DeserializeOwned>(rec: Record) -> Result<T, StoreError> {
    serde_json::from_value(rec.doc).map_err(|e| StoreError::Corrupt {
        collection: rec.collection,
        key: rec.key,
        reason: e.to_string(),
    })
}

/// The object `kind`/`name` decoded (shared until its record is written again), as `T`.
async fn object<T: Clone>(
    objects: &Objects,
    kind: Kind,
    name: &str,
    pick: impl Fn(&AnyObject) -> Option<&T>,
) -> Result<Option<T>, StoreError> {
    let Some(obj) = objects.get(kind, name).await? else { return Ok(None) };
    match pick(&obj) {
        Some(o) => Ok(Some(o.clone())),
        None => Err(StoreError::Corrupt {
            collection: Collection::Object(kind),
            key: name.to_string(),
            reason: format!("not a {kind}"),
        }),
    }
}

/// Reads what the engine needs about `mac`: three rounds of point reads for a known node
/// (cluster and claim, node, group and network), up to three for an unknown one when
/// discovery is on, two when it is off. Objects come decoded from `objects`, so a repeated
/// read of an unchanged record costs a lookup and a copy, not a JSON decode.
pub async fn load_view(objects: &Objects, mac: &MacAddr) -> Result<View, StoreError> {
    let store = objects.store().as_ref();
    let claim_key = Claim::Mac(*mac).key();
    let (cluster, claim) = tokio::join!(
        object(objects, Kind::Cluster, Cluster::KEY, |o| match o {
            AnyObject::Cluster(c) => Some(c),
            _ => None,
        }),
        store.get_shared(Collection::Claim, &claim_key)
    );
    let cluster: Cluster = cluster?.unwrap_or_default();
    let owner = claim?.and_then(|c| {
        match (c.doc.get("kind").and_then(|k| k.as_str()), c.doc.get("owner").and_then(|o| o.as_str())) {
            (Some("node"), Some(owner)) => Some(owner.to_string()),
            _ => None,
        }
    });
    if let Some(owner) = owner {
        let node = object(objects, Kind::Node, &owner, |o| match o {
            AnyObject::Node(n) => Some(n),
            _ => None,
        })
        .await?;
        if let Some(node) = node {
            let net_name = node_interface(&node, mac).map(|i| i.network.clone());
            let (group, network) = tokio::join!(
                object(objects, Kind::Group, &node.group, |o| match o {
                    AnyObject::Group(g) => Some(g),
                    _ => None,
                }),
                async {
                    match &net_name {
                        Some(n) => {
                            object(objects, Kind::Network, n, |o| match o {
                                AnyObject::Network(n) => Some(n),
                                _ => None,
                            })
                            .await
                        }
                        None => Ok(None),
                    }
                }
            );
            return Ok(View { cluster, client: Client::Known(Known { node, group: group?, network: network? }) });
        }
        // The claim outlived its node (a delete in flight): a stranger for now.
    }
    let mut unknown = Unknown::default();
    if cluster.dhcp_range.is_some() {
        let lease_key = Lease::mac_key(mac);
        let (networks, lease) =
            tokio::join!(store.list(Collection::Object(Kind::Network), ""), store.get(Collection::Lease, &lease_key));
        unknown.networks = networks?.into_iter().map(parse).collect::<Result<_, _>>()?;
        unknown.lease = lease?.map(Versioned::from_record).transpose()?;
        if let Some(l) = &unknown.lease {
            let claim = Claim::Ip { network: l.value.network.clone(), ip: l.value.ip }.key();
            let ip_key = Lease::ip_key(l.value.ip);
            let (held, claimed) =
                tokio::join!(store.get(Collection::Lease, &ip_key), store.get_shared(Collection::Claim, &claim));
            unknown.held = held?.map(Versioned::from_record).transpose()?;
            unknown.held_claimed = claimed?.is_some();
        }
    }
    Ok(View { cluster, client: Client::Unknown(unknown) })
}

/// Reads the lease record and the claim of each address, and for an address leased to another
/// machine than `mac`, that machine's `mac/` record (so a takeover can delete it).
pub async fn load_candidates(
    store: &dyn Store,
    network: &str,
    ips: &[Ipv4Addr],
    mac: &MacAddr,
) -> Result<Vec<(Ipv4Addr, Candidate)>, StoreError> {
    let reads = ips.iter().map(|ip| async move {
        let claim = Claim::Ip { network: network.to_string(), ip: *ip }.key();
        let ip_key = Lease::ip_key(*ip);
        let (lease, claimed) =
            tokio::join!(store.get(Collection::Lease, &ip_key), store.get(Collection::Claim, &claim));
        let lease = lease?.map(Versioned::from_record).transpose()?;
        let holder = match &lease {
            Some(l) if l.value.mac != *mac => store
                .get(Collection::Lease, &Lease::mac_key(&l.value.mac))
                .await?
                .map(Versioned::from_record)
                .transpose()?,
            _ => None,
        };
        Ok::<_, StoreError>((*ip, Candidate { lease, claimed: claimed?.is_some(), busy: false, holder }))
    });
    join_all(reads).await.into_iter().collect()
}

/// The sockets of every configured interface, bound and ready: [`bind_all`] then [`serve_on`] is
/// [`serve`] with a point in between where the server knows DHCP is listening (its readiness
/// signal to systemd waits for that).
pub struct DhcpSockets(Vec<(String, Arc<UdpSocket>)>);

/// Checks the configuration and binds one socket per configured interface (none when DHCP is
/// off). Fails when an interface cannot be bound (missing device, port taken).
pub fn bind_all(cfg: &DhcpConfig) -> Result<DhcpSockets, DhcpError> {
    cfg.validate()?;
    let mut sockets = Vec::new();
    for iface in &cfg.interfaces {
        let sock = bind(iface, cfg.port).map_err(|source| DhcpError::Interface { interface: iface.clone(), source })?;
        tracing::info!(interface = %iface, port = cfg.port, "dhcp: listening");
        sockets.push((iface.clone(), Arc::new(sock)));
    }
    Ok(DhcpSockets(sockets))
}

/// Answers DHCP on `cfg.interfaces` until `shutdown` is cancelled. With no interfaces DHCP is
/// off and this just waits. Fails at start when an interface cannot be bound (missing device,
/// port taken); per-request errors are logged, not fatal.
pub async fn serve(
    cfg: DhcpConfig,
    store: Arc<dyn Store>,
    status: Arc<dyn DhcpStatusSink>,
    shutdown: CancellationToken,
) -> Result<(), DhcpError> {
    let sockets = bind_all(&cfg)?;
    serve_on(sockets, cfg, store, status, shutdown).await
}

/// [`serve`] on sockets that [`bind_all`] bound with the same `cfg`.
pub async fn serve_on(
    sockets: DhcpSockets,
    cfg: DhcpConfig,
    store: Arc<dyn Store>,
    status: Arc<dyn DhcpStatusSink>,
    shutdown: CancellationToken,
) -> Result<(), DhcpError> {
    if sockets.0.is_empty() {
        tracing::info!("dhcp: off (no interfaces configured)");
        shutdown.cancelled().await;
        return Ok(());
    }
    let shared = Arc::new(Shared {
        handler: Handler::new(cfg.clone(), store),
        status,
        addrs: Mutex::new(HashMap::new()),
        permits: Arc::new(Semaphore::new(cfg.max_in_flight)),
    });
    let mut loops = JoinSet::new();
    for (iface, sock) in sockets.0 {
        if cfg.answer_router_solicitations {
            loops.spawn(super::ra::answer(iface.clone(), shutdown.clone()));
        }
        loops.spawn(receive_loop(shared.clone(), iface, sock, shutdown.clone()));
    }
    while let Some(r) = loops.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "dhcp: receive loop failed");
        }
    }
    Ok(())
}

struct Shared {
    handler: Handler,
    status: Arc<dyn DhcpStatusSink>,
    addrs: Mutex<HashMap<String, (Instant, Vec<Ipv4Net>)>>,
    permits: Arc<Semaphore>,
}

impl Shared {
    fn local_nets(&self, iface: &str) -> Vec<Ipv4Net> {
        let mut cache = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, nets)) = cache.get(iface) {
            if at.elapsed() < ADDR_TTL {
                return nets.clone();
            }
        }
        let nets = interface_addrs(iface).unwrap_or_else(|e| {
            tracing::warn!(interface = iface, error = %e, "dhcp: cannot read interface addresses");
            Vec::new()
        });
        cache.insert(iface.to_string(), (Instant::now(), nets.clone()));
        nets
    }
}

fn bind(iface: &str, port: u16) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Several sockets share port 67, one per device; SO_REUSEADDR lets them (and a relay
    // simulator on a specific address) coexist.
    s.set_reuse_address(true)?;
    s.set_broadcast(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    set_recv_buffer(&s, RECV_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
    UdpSocket::from_std(s.into())
}

/// The receive buffer asked for: a rack powering on sends DISCOVERs in bursts, and the default
/// (about 200 KiB, some 90 datagrams) overflowed under load, each drop costing the client a
/// retransmit seconds later.
const RECV_BUFFER: usize = 4 << 20;

/// Sets the socket's receive buffer to `size`, beyond `net.core.rmem_max` when allowed
/// (`SO_RCVBUFFORCE` needs CAP_NET_ADMIN, which DHCP has anyway for ARP entries); a failure
/// leaves the default, which still works.
pub fn set_recv_buffer(s: &impl std::os::fd::AsFd, size: usize) {
    use std::os::fd::AsRawFd;
    let fd = s.as_fd();
    let val = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket and an int option value that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &val as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        if let Err(e) = socket2::SockRef::from(&fd).set_recv_buffer_size(size) {
            tracing::debug!(error = %e, "dhcp: cannot enlarge the receive buffer");
        }
    }
}

async fn receive_loop(shared: Arc<Shared>, iface: String, sock: Arc<UdpSocket>, shutdown: CancellationToken) {
    let mut tasks = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let (len, from) = match received {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(interface = %iface, error = %e, "dhcp: receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = shared.permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let bytes = buf[..len].to_vec();
        let (shared, iface, sock) = (shared.clone(), iface.clone(), sock.clone());
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = answer(&shared, &iface, &sock, &bytes).await {
                tracing::warn!(interface = %iface, %from, error = %e, "dhcp: request failed");
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    tasks.shutdown().await;
}

async fn answer(shared: &Shared, iface: &str, sock: &UdpSocket, bytes: &[u8]) -> Result<(), DhcpError> {
    let nets = shared.local_nets(iface);
    let addrs: Vec<Ipv4Addr> = nets.iter().map(Ipv4Net::addr).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let counted = |outcome: &str| {
        let labels = crate::metrics::l2("type", super::packet::message_type_name(bytes), "outcome", outcome);
        crate::metrics::global().dhcp_packets.get_or_create(&labels).inc();
    };
    let outcome = match shared.handler.process(iface, &addrs, bytes, now).await {
        Ok(o) => o,
        Err(e) => {
            counted("error");
            return Err(e);
        }
    };
    counted(if outcome.reply.is_some() { "answered" } else { "ignored" });
    if let Some(reply) = &outcome.reply {
        send(sock, iface, &nets, reply)
            .await
            .map_err(|source| DhcpError::Interface { interface: iface.to_string(), source })?;
    }
    if let Some(ev) = outcome.event {
        shared.status.dhcp_event(ev);
    }
    Ok(())
}

async fn send(sock: &UdpSocket, iface: &str, nets: &[Ipv4Net], reply: &Reply) -> io::Result<()> {
    let bytes = encode_reply(reply).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    let to = match reply.destination {
        Destination::Relay(a) | Destination::Unicast(a) => a,
        Destination::Broadcast(port) => SocketAddrV4::new(Ipv4Addr::BROADCAST, port),
        Destination::Hardware { ip, mac, port } => {
            // The client has no address yet, so it cannot answer ARP: tell the kernel where it
            // is. If that is impossible (not on a local subnet, no CAP_NET_ADMIN), broadcast.
            let local = nets.iter().any(|n| n.contains(&ip));
            match local.then(|| set_arp(sock, iface, ip, &mac)) {
                Some(Ok(())) => SocketAddrV4::new(ip, port),
                Some(Err(e)) => {
                    tracing::debug!(interface = iface, %ip, error = %e, "dhcp: cannot add an arp entry; broadcasting");
                    SocketAddrV4::new(Ipv4Addr::BROADCAST, port)
                }
                None => SocketAddrV4::new(Ipv4Addr::BROADCAST, port),
            }
        }
    };
    sock.send_to(&bytes, to).await?;
    Ok(())
}

/// `ATF_COM` from <net/if_arp.h>: the entry is complete (has a hardware address).
const ATF_COM: libc::c_int = 0x02;

fn set_arp(sock: &UdpSocket, iface: &str, ip: Ipv4Addr, mac: &MacAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let pa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes; this is how the ioctl expects it.
    req.arp_pa = unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(pa) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = ATF_COM;
    let name = iface.as_bytes();
    if name.len() >= req.arp_dev.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name '{iface}' is too long")));
    }
    for (d, s) in req.arp_dev.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: a valid socket and a fully initialised arpreq that outlives the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP as _, &req as *const libc::arpreq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The IPv4 addresses (with prefix) of interface `name`, in the kernel's order (primary first).
pub fn interface_addrs(name: &str) -> io::Result<Vec<Ipv4Net>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: p walks the list getifaddrs returned; every pointer in it is valid or null.
        let ifa = unsafe { &*p };
        p = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: checked non-null above; the kernel gives NUL-terminated names.
        let (family, ifname) = unsafe { ((*ifa.ifa_addr).sa_family, CStr::from_ptr(ifa.ifa_name)) };
        if i32::from(family) != libc::AF_INET || ifname.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: AF_INET entries carry sockaddr_in addresses and netmasks.
        let (addr, prefix) = unsafe {
            let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
            let prefix = if ifa.ifa_netmask.is_null() {
                32
            } else {
                u32::from_be((*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr).count_ones() as u8
            };
            (Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)), prefix)
        };
        if let Ok(net) = Ipv4Net::new(addr, prefix) {
            out.push(net);
        }
    }
    // SAFETY: ifap came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::packet::client;
    use super::super::LeaseState;
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Expect, Write};
    use dhcproto::v4::MessageType;
    use luna_core::model::{Group, Network, Node, NodeInterface, BOOTIF};
    use serde_json::json;

    const IFACE: &str = "prov0";

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn mac(n: u16) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, (n >> 8) as u8, n as u8])
    }
    fn put(c: Collection, key: &str, doc: serde_json::Value) -> Write {
        Write::Put { collection: c, key: key.into(), expect: Expect::Absent, doc }
    }

    async fn store(range: Option<&str>) -> Arc<dyn Store> {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:").unwrap());
        let cluster = Cluster { dhcp_range: range.map(|r| r.parse().unwrap()), ..Cluster::default() };
        let mut net = Network::new("cluster", "10.141.0.0/16".parse().unwrap());
        net.gateway = Some(ip("10.141.255.1"));
        let mut node = Node::new("node001", "compute");
        node.mac = Some(mac(1));
        node.interfaces.push(NodeInterface {
            name: BOOTIF.into(),
            network: "cluster".into(),
            ip: Some(ip("10.141.0.1")),
            mac: None,
        });
        let group = Group::new("compute", "rocky9");
        let obj = |k| Collection::Object(k);
        s.commit(vec![
            put(obj(Kind::Cluster), Cluster::KEY, serde_json::to_value(&cluster).unwrap()),
            put(obj(Kind::Network), "cluster", serde_json::to_value(&net).unwrap()),
            put(obj(Kind::Group), "compute", serde_json::to_value(&group).unwrap()),
            put(obj(Kind::Node), "node001", serde_json::to_value(&node).unwrap()),
            put(Collection::Claim, &Claim::Mac(mac(1)).key(), json!({"kind": "node", "owner": "node001"})),
            put(
                Collection::Claim,
                &Claim::Ip { network: "cluster".into(), ip: ip("10.141.0.1") }.key(),
                json!({"kind": "node", "owner": "node001"}),
            ),
            // A switch holds the first range address.
            put(
                Collection::Claim,
                &Claim::Ip { network: "cluster".into(), ip: ip("10.141.200.1") }.key(),
                json!({"kind": "switch", "owner": "sw1"}),
            ),
        ])
        .await
        .unwrap();
        s
    }

    fn handler(store: Arc<dyn Store>) -> Handler {
        Handler::new(DhcpConfig { interfaces: vec![IFACE.into()], ..DhcpConfig::default() }, store)
    }

    async fn send(h: &Handler, m: dhcproto::v4::Message, now: u64) -> Outcome {
        h.process(IFACE, &[ip("10.141.255.254")], &client::encode(&m, None), now).await.unwrap()
    }

    async fn dora(h: &Handler, m: MacAddr, now: u64) -> Ipv4Addr {
        let offer = send(h, client::discover(m, 1), now).await.reply.expect("an offer");
        let yiaddr = offer.message.yiaddr();
        let ack =
            send(h, client::request_selecting(m, 1, yiaddr, ip("10.141.255.254")), now).await.reply.expect("an ack");
        assert_eq!(ack.msg_type(), Some(MessageType::Ack));
        yiaddr
    }

    #[tokio::test]
    async fn known_node_through_the_store() {
        let h = handler(store(None).await);
        let o = send(&h, client::discover(mac(1), 1), 10).await;
        assert_eq!(o.reply.unwrap().message.yiaddr(), ip("10.141.0.1"));
        assert_eq!(o.event.unwrap().node, "node001");
        // Nothing was written for a known node.
        assert!(h.store.list(Collection::Lease, "").await.unwrap().is_empty());
        // Strangers: nothing, and nothing read beyond cluster and claim.
        assert_eq!(send(&h, client::discover(mac(2), 1), 10).await, Outcome::default());
    }

    #[tokio::test]
    async fn discovery_through_the_store() {
        let h = handler(store(Some("10.141.200.1-10.141.200.5")).await);
        // .1 is claimed by the switch: the first machine gets .2, again and again.
        let a = dora(&h, mac(2), 100).await;
        assert_eq!(a, ip("10.141.200.2"));
        assert_eq!(dora(&h, mac(2), 110).await, a, "same lease on the next boot stage");
        let rec = h.store.get(Collection::Lease, "ip/10.141.200.2").await.unwrap().unwrap();
        let l = Versioned::from_record(rec).unwrap().value;
        assert_eq!((l.mac, l.state, l.expires), (mac(2), LeaseState::Bound, 110 + 3600));
        assert!(h.store.get(Collection::Lease, "mac/52:54:00:00:00:02").await.unwrap().is_some());

        // Release, then the same machine comes back to the same address.
        assert_eq!(send(&h, client::release(mac(2), 1, a, ip("10.141.255.254")), 120).await, Outcome::default());
        let l = Versioned::from_record(h.store.get(Collection::Lease, "ip/10.141.200.2").await.unwrap().unwrap())
            .unwrap()
            .value;
        assert_eq!((l.state, l.expires), (LeaseState::Released, 120));
        assert_eq!(dora(&h, mac(2), 130).await, a);

        // Fill the range: .3 .4 .5 go to three others, the fifth stranger gets nothing.
        let mut got = Vec::new();
        for n in 3..=5 {
            got.push(dora(&h, mac(n), 140).await);
        }
        got.sort();
        assert_eq!(got, ["10.141.200.3", "10.141.200.4", "10.141.200.5"].map(ip));
        assert_eq!(send(&h, client::discover(mac(6), 1), 150).await.reply, None);
        // Once the first lease expires, its address goes to the newcomer.
        let o = send(&h, client::discover(mac(6), 1), 130 + 3600).await;
        assert_eq!(o.reply.unwrap().message.yiaddr(), a);
        // …and the old owner is NAKed when it asks for it back.
        let o = send(&h, client::request_init_reboot(mac(2), 1, a), 130 + 3601).await;
        assert_eq!(o.reply.unwrap().msg_type(), Some(MessageType::Nak));
    }

    #[tokio::test]
    async fn a_flood_of_new_macs_keeps_the_lease_records_bounded() {
        // Four usable addresses (.1 is the switch's); 600 machines, each seen once, spaced so
        // that the previous offers have expired (offer_time 60 s).
        let h = handler(store(Some("10.141.200.1-10.141.200.5")).await);
        let mut answered = 0;
        for n in 0..600u16 {
            let now = 1000 + u64::from(n / 4) * 61;
            if send(&h, client::discover(mac(1000 + n), 1), now).await.reply.is_some() {
                answered += 1;
            }
        }
        assert_eq!(answered, 600, "every newcomer got an expired address");
        let leases = h.store.list(Collection::Lease, "").await.unwrap();
        let (ips, macs): (Vec<_>, Vec<_>) = leases.iter().partition(|r| r.key.starts_with("ip/"));
        assert_eq!(ips.len(), 4, "{:?}", leases.iter().map(|r| &r.key).collect::<Vec<_>>());
        assert_eq!(macs.len(), 4, "{:?}", macs.iter().map(|r| &r.key).collect::<Vec<_>>());
        // Each remaining mac/ record belongs to the machine its ip/ record names.
        for r in &ips {
            let l = Versioned::from_record((*r).clone()).unwrap().value;
            assert!(macs.iter().any(|m| m.key == Lease::mac_key(&l.mac)), "{l:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_allocations_never_share_an_address() {
        let store = store(Some("10.141.200.1-10.141.200.100")).await;
        // Two servers on one store (HA): only the store's compare-and-swap keeps them apart.
        let servers = [Arc::new(handler(store.clone())), Arc::new(handler(store.clone()))];
        let tasks: Vec<_> = (10..60)
            .map(|n| {
                let h = servers[usize::from(n % 2)].clone();
                tokio::spawn(async move {
                    send(&h, client::discover(mac(n), 1), 100).await.reply.map(|r| r.message.yiaddr())
                })
            })
            .collect();
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        for t in tasks {
            ips.push(t.await.unwrap().expect("every machine gets an offer"));
        }
        let n = ips.len();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), n, "two machines were offered one address");
        assert!(!ips.contains(&ip("10.141.200.1")));
        // The store agrees: one ip record per machine.
        assert_eq!(store.list(Collection::Lease, "ip/").await.unwrap().len(), n);
    }

    #[tokio::test]
    async fn addresses_go_out_in_order_and_a_long_taken_run_is_crossed_by_retries() {
        let store = store(Some("10.141.200.1-10.141.203.254")).await;
        let h = handler(store.clone());
        // One at a time: in order (.1 is the switch's).
        for (n, want) in [(2, "10.141.200.2"), (3, "10.141.200.3"), (4, "10.141.200.4")] {
            assert_eq!(dora(&h, mac(n), 100).await, ip(want));
        }
        // 600 claimed addresses after those: more than one request looks at.
        let claims: Vec<Write> = (5..605u32)
            .map(|i| {
                let a = Ipv4Addr::from(u32::from(ip("10.141.200.0")) + i);
                put(
                    Collection::Claim,
                    &Claim::Ip { network: "cluster".into(), ip: a }.key(),
                    json!({"kind": "otherdev", "owner": format!("d{i}")}),
                )
            })
            .collect();
        store.commit(claims).await.unwrap();
        let mut tries = 0;
        let got = loop {
            tries += 1;
            assert!(tries <= 4, "no offer after {tries} tries");
            if let Some(r) = send(&h, client::discover(mac(9), 1), 100).await.reply {
                break r.message.yiaddr();
            }
        };
        assert_eq!(got, Ipv4Addr::from(u32::from(ip("10.141.200.0")) + 605));
        assert!(tries > 1, "one request looked at more than {} addresses", engine::MAX_PROBES);
    }

    #[test]
    fn ahead_goes_round_the_range() {
        let r: IpRange = "10.0.0.1-10.0.0.10".parse().unwrap();
        assert!(ahead(r, ip("10.0.0.2"), ip("10.0.0.5")));
        assert!(!ahead(r, ip("10.0.0.5"), ip("10.0.0.2")));
        assert!(!ahead(r, ip("10.0.0.5"), ip("10.0.0.5")));
        assert!(ahead(r, ip("10.0.0.9"), ip("10.0.0.1")), "wraps");
        assert!(ahead(r, ip("10.0.9.9"), ip("10.0.0.1")), "anything in range beats a stale hint");
        let mut slot = Some(ip("10.0.0.5"));
        advance(&mut slot, Some(r), ip("10.0.0.3"));
        assert_eq!(slot, Some(ip("10.0.0.5")));
        advance(&mut slot, Some(r), ip("10.0.0.7"));
        assert_eq!(slot, Some(ip("10.0.0.7")));
    }

    #[test]
    fn loopback_addresses_are_read() {
        let nets = interface_addrs("lo").unwrap();
        assert!(nets.contains(&"127.0.0.1/8".parse().unwrap()), "{nets:?}");
        assert!(interface_addrs("no-such-if0").unwrap().is_empty());
    }

    #[tokio::test]
    async fn serve_with_no_interfaces_waits_for_shutdown() {
        let token = CancellationToken::new();
        let t = tokio::spawn(serve(
            DhcpConfig::default(),
            store(None).await,
            Arc::new(super::super::NoStatus),
            token.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!t.is_finished());
        token.cancel();
        t.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn serve_names_a_missing_interface() {
        let cfg = DhcpConfig { interfaces: vec!["no-such-if0".into()], port: 16767, ..DhcpConfig::default() };
        let e = serve(cfg, store(None).await, Arc::new(super::super::NoStatus), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no-such-if0"), "{e}");
    }
}
