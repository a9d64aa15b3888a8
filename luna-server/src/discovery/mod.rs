//! Switch-port autodiscovery: which MAC sits on which switch port, learned over SNMP v2c, and
//! the binding of an unknown machine to the node configured for its port.
//!
//! - `snmp.rs` (BER codec), `walk.rs` (GETBULK subtree walk) and `table.rs` (columns → learned
//!   table, uplinks) are sans-IO; `transport.rs` is the datagram trait and the request loop.
//! - Every switch is polled every `[discovery] interval`, all switches at once, each on its own
//!   (a switch that times out, refuses the community or answers garbage costs only its own
//!   table's freshness: the last good table is kept with its age and the error).
//! - The boot path never waits for a poll it did not ask for: `/boot/ipxe` reads the tables in
//!   memory; only the discovery menu's default entry (`/boot/ipxe/discover`) polls now.
//! - A MAC is bound only to a node configured for its port that has no MAC, in one
//!   compare-and-swap that also sets status `discovered`; a node with a MAC is never re-bound.

pub mod http;
pub mod snmp;
pub mod table;
pub mod transport;
pub mod walk;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use luna_core::api::{LearnedMac, NodePatch, SwitchMacs};
use luna_core::model::{AnyObject, Kind, Node, NodeStatus, Switch, SwitchPort};
use luna_core::MacAddr;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::service::{unix_now, Service, ServiceError};
use snmp::Oid;
use table::{Columns, SwitchTable};
use transport::{Client, PollError, Session, Transport};

/// `[discovery]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// Seconds between two polls of every switch; 0 turns polling off.
    pub interval: u64,
    /// A port with more MACs than this is an uplink, whatever the switch object says.
    pub uplink_threshold: usize,
    /// Milliseconds to wait for one SNMP answer.
    pub timeout_ms: u64,
    /// Sends of one request before a switch counts as not answering.
    pub tries: u32,
    /// UDP port of the switches' SNMP agents.
    pub snmp_port: u16,
    /// Rows asked for per GETBULK.
    pub max_repetitions: u32,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            interval: 30,
            uplink_threshold: 4,
            timeout_ms: 1000,
            tries: 2,
            snmp_port: 161,
            max_repetitions: 40,
        }
    }
}

impl DiscoveryConfig {
    pub fn documented_defaults() -> String {
        let d = DiscoveryConfig::default();
        format!(
            r#"
# Switch-port autodiscovery: every switch object is polled over SNMP v2c for its forwarding
# table (its `oid`: Q-BRIDGE dot1qTpFdbPort by default, or BRIDGE-MIB dot1dTpFdbPort).
[discovery]
# Seconds between two polls of every switch (0: no polling).
interval = {}
# A port carrying more MACs than this is an uplink: its MACs are never bound to nodes.
uplink_threshold = {}
# Milliseconds to wait for an SNMP answer, and sends of a request before giving up.
timeout_ms = {}
tries = {}
# UDP port of the switches' SNMP agents, and rows asked for per GETBULK.
snmp_port = {}
max_repetitions = {}
"#,
            d.interval, d.uplink_threshold, d.timeout_ms, d.tries, d.snmp_port, d.max_repetitions
        )
    }
}

/// What is known of one switch.
#[derive(Debug, Clone, Default)]
struct SwitchState {
    /// The last good table, when it was read, and when each (MAC, port) was first seen.
    table: Option<Arc<SwitchTable>>,
    polled_at: Option<u64>,
    first_seen: HashMap<(MacAddr, u32), u64>,
    error: Option<String>,
    /// Unix seconds of the last attempt, good or not.
    attempted_at: Option<u64>,
    /// MACs seen on a port whose node already has another MAC: reported, not bound.
    refused: BTreeMap<MacAddr, String>,
}

/// Where a MAC was learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub switch: String,
    pub port: u32,
    pub port_name: Option<String>,
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "switch {} port {}", self.switch, self.port)?;
        if let Some(n) = &self.port_name {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

/// What an attempt to bind an unknown MAC came to.
#[derive(Debug)]
pub enum BindOutcome {
    /// Bound now, in this call.
    Bound(Box<Node>, Location),
    /// No switch reports the MAC (on a port that is not an uplink).
    NotLearned,
    /// Learned, but no node is configured for that port.
    NoNode(Location),
    /// Learned, but binding would be a guess; the message says why.
    Refused(Location, String),
}

pub struct Discovery {
    service: Service,
    config: DiscoveryConfig,
    transport: Arc<dyn Transport>,
    state: Mutex<BTreeMap<String, SwitchState>>,
    /// One poll of a switch at a time; a poll asked for while one runs waits for it.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When each switch's last poll finished (Unix milliseconds).
    attempted: Mutex<HashMap<String, u128>>,
}

impl Discovery {
    pub fn new(service: Service, config: DiscoveryConfig, transport: Arc<dyn Transport>) -> Arc<Self> {
        Arc::new(Discovery {
            service,
            config,
            transport,
            state: Mutex::new(BTreeMap::new()),
            locks: Mutex::new(HashMap::new()),
            attempted: Mutex::new(HashMap::new()),
        })
    }

    /// Whether any switch is configured (discovery has something to offer).
    pub async fn has_switches(&self) -> bool {
        if !self.state.lock().expect("discovery state lock").is_empty() {
            return true;
        }
        self.switches().await.is_ok_and(|s| !s.is_empty())
    }

    pub fn config(&self) -> &DiscoveryConfig {
        &self.config
    }

    fn client(&self) -> Client {
        Client {
            timeout: Duration::from_millis(self.config.timeout_ms.max(1)),
            tries: self.config.tries.max(1),
            max_repetitions: self.config.max_repetitions.clamp(1, 200),
        }
    }

    /// Polls every switch every interval until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.config.interval == 0 {
            tracing::info!("switch polling off ([discovery] interval = 0)");
            return;
        }
        let period = Duration::from_secs(self.config.interval);
        loop {
            if let Err(e) = self.poll_all().await {
                tracing::warn!(error = %e, "cannot list switches to poll");
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
        }
    }

    /// One round: every switch at once; returns when each has answered or failed.
    pub async fn poll_all(&self) -> Result<(), ServiceError> {
        let switches = self.switches().await?;
        {
            let mut st = self.state.lock().expect("discovery state lock");
            st.retain(|name, _| switches.iter().any(|s| &s.name == name));
        }
        futures::future::join_all(switches.iter().map(|s| self.poll_switch(s))).await;
        Ok(())
    }

    /// Polls the switches whose network holds `client` (the booting machine's address), or all
    /// of them when none does; for the discovery menu's "look now".
    pub async fn poll_for(&self, client: Option<IpAddr>) -> Result<(), ServiceError> {
        let switches = self.switches().await?;
        let mut near = Vec::new();
        if let Some(IpAddr::V4(ip)) = client {
            for s in &switches {
                if let Ok(net) = self.service.network(&s.network).await {
                    if net.cidr.contains(&ip) {
                        near.push(s.clone());
                    }
                }
            }
        }
        let chosen = if near.is_empty() { switches } else { near };
        futures::future::join_all(chosen.iter().map(|s| self.poll_switch(s))).await;
        Ok(())
    }

    async fn switches(&self) -> Result<Vec<Switch>, ServiceError> {
        Ok(self
            .service
            .list(Kind::Switch)
            .await?
            .into_iter()
            .filter_map(|o| match o {
                AnyObject::Switch(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// Polls one switch and records the outcome. Never fails: an error is kept in the state.
    pub async fn poll_switch(&self, sw: &Switch) {
        let lock = {
            let mut locks = self.locks.lock().expect("discovery lock map");
            locks.entry(sw.name.clone()).or_default().clone()
        };
        let asked = unix_now_ms();
        let _guard = lock.lock().await;
        // Someone polled this switch while we waited: that answer is as fresh as ours would be.
        if self.attempted_ms(&sw.name).is_some_and(|t| t >= asked) {
            return;
        }
        let result = self.read_switch(sw).await;
        let now = unix_now();
        let mut st = self.state.lock().expect("discovery state lock");
        let entry = st.entry(sw.name.clone()).or_default();
        entry.attempted_at = Some(now);
        match result {
            Ok(cols) => {
                let table = table::build(&cols, &sw.uplinks, self.config.uplink_threshold);
                let mut first_seen = HashMap::new();
                for p in table.ports.values() {
                    for m in &p.macs {
                        let t = entry.first_seen.get(&(*m, p.port)).copied().unwrap_or(now);
                        first_seen.insert((*m, p.port), t);
                    }
                }
                if entry.error.is_some() {
                    tracing::info!(switch = %sw.name, "switch answers again");
                }
                entry.first_seen = first_seen;
                entry.refused.retain(|m, _| table.ports.values().any(|p| p.macs.contains(m)));
                entry.table = Some(Arc::new(table));
                entry.polled_at = Some(now);
                entry.error = None;
            }
            Err(e) => {
                let msg = e.to_string();
                if entry.error.as_deref() != Some(&msg) {
                    tracing::warn!(switch = %sw.name, error = %msg, "switch poll failed; keeping its last good table");
                }
                entry.error = Some(msg);
            }
        }
        drop(st);
        self.attempted.lock().expect("attempt map").insert(sw.name.clone(), unix_now_ms());
    }

    fn attempted_ms(&self, name: &str) -> Option<u128> {
        self.attempted.lock().expect("attempt map").get(name).copied()
    }

    async fn read_switch(&self, sw: &Switch) -> Result<Columns, PollError> {
        let target = SocketAddr::new(IpAddr::V4(sw.ip), self.config.snmp_port);
        let client = self.client();
        let channel = self.transport.open(target).await.map_err(|error| PollError::Io { target, error })?;
        let mut session = Session {
            client: &client,
            target,
            community: sw.community.0.as_bytes(),
            channel,
            next_id: rand::random::<i32>() & 0x3fff_ffff,
        };
        let fdb_root: Oid = sw.oid.parse().map_err(|e: snmp::OidParseError| PollError::Config(e.to_string()))?;
        let fdb = session.walk(fdb_root).await?;
        let base_port_if_index = session.walk(oid(table::BASE_PORT_IF_INDEX)).await?;
        let if_name = session.walk(oid(table::IF_NAME)).await?;
        let if_descr = if if_name.is_empty() { session.walk(oid(table::IF_DESCR)).await? } else { Vec::new() };
        Ok(Columns { fdb, base_port_if_index, if_name, if_descr })
    }

    /// Where `mac` was learned, on ports that are not uplinks.
    pub fn locate(&self, mac: MacAddr) -> Vec<Location> {
        let st = self.state.lock().expect("discovery state lock");
        st.iter()
            .filter_map(|(name, s)| {
                let p = s.table.as_ref()?.port_of(mac)?;
                Some(Location { switch: name.clone(), port: p.port, port_name: p.name.clone() })
            })
            .collect()
    }

    /// Binds `mac` to the node configured for the port it was learned on, if that is certain.
    pub async fn try_bind(&self, mac: MacAddr) -> Result<BindOutcome, ServiceError> {
        let found = self.locate(mac);
        let loc = match found.as_slice() {
            [] => return Ok(BindOutcome::NotLearned),
            [one] => one.clone(),
            many => {
                let list: Vec<String> = many.iter().map(ToString::to_string).collect();
                let msg = format!("mac {mac} is learned on several access ports: {}", list.join(", "));
                tracing::warn!(%mac, "{msg}; not bound");
                return Ok(BindOutcome::Refused(many[0].clone(), msg));
            }
        };
        for _ in 0..8 {
            let node = match self.configured_node(&loc).await? {
                Configured::None => return Ok(BindOutcome::NoNode(loc)),
                Configured::Two(a, b) => {
                    let msg = format!("nodes {a} and {b} are both configured for {loc}");
                    tracing::warn!(%mac, "{msg}; not bound");
                    return Ok(BindOutcome::Refused(loc, msg));
                }
                Configured::One(n) => n,
            };
            if let Some(bound) = node.mac {
                let msg = format!("{loc} belongs to node {} which has mac {bound}", node.name);
                tracing::warn!(%mac, node = %node.name, "second mac on a bound port: {msg}; not bound");
                self.note_refused(&loc.switch, mac, format!("not bound: node {} has mac {bound}", node.name));
                return Ok(BindOutcome::Refused(loc, msg));
            }
            let status = NodeStatus {
                step: "discovered".into(),
                progress: None,
                time: unix_now(),
                message: Some(format!("mac {mac} learned on {loc}")),
            };
            let patch = NodePatch {
                mac: Some(Some(mac)),
                status: Some(Some(status)),
                rev: Some(node.rev),
                ..Default::default()
            };
            match self.service.change_nodes(&node.name, patch).await {
                Ok(mut v) if !v.is_empty() => {
                    let bound = v.remove(0);
                    tracing::info!(node = %bound.name, %mac, switch = %loc.switch, port = loc.port,
                        port_name = loc.port_name.as_deref().unwrap_or(""), "mac bound by switch-port discovery");
                    return Ok(BindOutcome::Bound(Box::new(bound), loc));
                }
                Ok(_) => return Ok(BindOutcome::NoNode(loc)),
                // Changed meanwhile (bound by someone else, port moved): decide again.
                Err(ServiceError::Stale { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ServiceError::Busy(8))
    }

    async fn configured_node(&self, loc: &Location) -> Result<Configured, ServiceError> {
        let by_number = self.service.node_by_switch_port(&loc.switch, &SwitchPort::Number(loc.port)).await?;
        let by_name = match &loc.port_name {
            Some(n) => match n.parse::<SwitchPort>() {
                Ok(p @ SwitchPort::Name(_)) => self.service.node_by_switch_port(&loc.switch, &p).await?,
                _ => None,
            },
            None => None,
        };
        Ok(match (by_number, by_name) {
            (None, None) => Configured::None,
            (Some(a), Some(b)) if a.name != b.name => Configured::Two(a.name, b.name),
            (Some(n), _) | (None, Some(n)) => Configured::One(Box::new(n)),
        })
    }

    fn note_refused(&self, switch: &str, mac: MacAddr, note: String) {
        let mut st = self.state.lock().expect("discovery state lock");
        if let Some(s) = st.get_mut(switch) {
            s.refused.insert(mac, note);
        }
    }

    /// `luna switch listmacs`: every switch's learned table (or one switch's).
    pub async fn list(&self, only: Option<&str>) -> Result<Vec<SwitchMacs>, ServiceError> {
        let mut switches = self.switches().await?;
        if let Some(name) = only {
            switches.retain(|s| s.name == name);
            if switches.is_empty() {
                return Err(ServiceError::NotFound { kind: Kind::Switch, name: name.to_string() });
            }
        }
        // Nodes by (switch, port) to name the configured node of each row.
        let mut by_port: HashMap<(String, SwitchPort), String> = HashMap::new();
        for o in self.service.list(Kind::Node).await? {
            if let AnyObject::Node(n) = o {
                if let (Some(s), Some(p)) = (n.switch, n.port) {
                    by_port.insert((s, p), n.name);
                }
            }
        }
        let now = unix_now();
        let st = self.state.lock().expect("discovery state lock").clone();
        Ok(switches
            .into_iter()
            .map(|sw| {
                let s = st.get(&sw.name).cloned().unwrap_or_default();
                let mut macs = Vec::new();
                if let Some(t) = &s.table {
                    for p in t.ports.values() {
                        let node = by_port
                            .get(&(sw.name.clone(), SwitchPort::Number(p.port)))
                            .or_else(|| {
                                let name = SwitchPort::Name(p.name.clone()?);
                                by_port.get(&(sw.name.clone(), name))
                            })
                            .cloned();
                        for m in &p.macs {
                            let seen = s.first_seen.get(&(*m, p.port)).copied().unwrap_or(now);
                            macs.push(LearnedMac {
                                port: p.port,
                                port_name: p.name.clone(),
                                if_index: p.if_index,
                                mac: *m,
                                seen_secs: now.saturating_sub(seen),
                                uplink: p.uplink.map(|u| match u {
                                    table::Uplink::Listed => "listed".to_string(),
                                    table::Uplink::Threshold => "threshold".to_string(),
                                }),
                                node: if p.uplink.is_none() { node.clone() } else { None },
                                note: s.refused.get(m).cloned(),
                            });
                        }
                    }
                }
                SwitchMacs {
                    switch: sw.name,
                    polled_at: s.polled_at,
                    age_secs: s.polled_at.map(|t| now.saturating_sub(t)),
                    error: s.error.clone(),
                    macs,
                }
            })
            .collect())
    }
}

enum Configured {
    None,
    One(Box<Node>),
    Two(String, String),
}

fn oid(s: &str) -> Oid {
    s.parse().expect("mib constants are valid oids")
}

fn unix_now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}
