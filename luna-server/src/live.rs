//! The live view's feed: what changed in the cluster, as it is committed.
//!
//! [`Live::observe`] wraps the store: every commit that succeeds is turned into
//! [`LiveEvent`]s (a status written by the boot path's group commit, by an agent report or by
//! an admin; a node added, changed, renamed or deleted) and sent on a tokio broadcast channel,
//! which the SSE route (`web/`) forwards to every open page and `luna node watch`. Watching
//! the store rather than each writer means no status write can be missed, whichever part of
//! the server makes it. The same wrapper times every commit (`luna_store_commit_seconds`).
//!
//! It also keeps, in memory, each node's current step (for the per-step counts and the
//! `luna_nodes` gauge) and the image bytes each node last reported having got from peers and
//! over HTTP (the swarm's saving; these are not stored, so they start again at zero when the
//! server restarts).
//!
//! Depends on the store and `metrics` only.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use luna_core::api::{LiveEvent, LiveNode};
use luna_core::model::{Kind, NodeStatus};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::metrics::Metrics;
use crate::store::{Collection, Record, Result, Store, Write};

/// Events buffered per subscriber; one that falls further behind gets a fresh snapshot.
pub const CHANNEL_CAPACITY: usize = 1024;

/// The step of a node that never reported.
pub const NO_STEP: &str = "none";

pub struct Live {
    tx: broadcast::Sender<Arc<LiveEvent>>,
    metrics: Arc<Metrics>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Node → its current step.
    steps: HashMap<String, String>,
    /// Node → (bytes from peers, bytes over HTTP) it last reported.
    bytes: HashMap<String, (u64, u64)>,
    /// Node → its last statuses, oldest first (at most [`HISTORY`]).
    history: HashMap<String, VecDeque<NodeStatus>>,
}

/// Statuses kept per node for the page's "last messages" (the server log has every one).
pub const HISTORY: usize = 12;

impl Live {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        let (tx, _) = broadcast::channel(CHANNEL_CAPACITY);
        Live { tx, metrics, inner: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<LiveEvent>> {
        self.tx.subscribe()
    }

    /// Sends `event` to every subscriber (none listening is fine).
    pub fn publish(&self, event: LiveEvent) {
        let _ = self.tx.send(Arc::new(event));
    }

    /// The store, watched: successful commits become events.
    pub fn observe(self: &Arc<Self>, store: Arc<dyn Store>) -> Arc<dyn Store> {
        Arc::new(Observed { inner: store, live: self.clone() })
    }

    /// Takes the steps of every node from a full listing (at start-up; the store's changes
    /// keep them from then on).
    pub fn seed(&self, nodes: &[LiveNode]) {
        let mut inner = self.lock();
        for n in nodes {
            let step = n.status.as_ref().and_then(|s| s.as_ref()).map_or(NO_STEP, |s| s.step.as_str());
            inner.steps.insert(n.name.clone(), step.to_string());
        }
    }

    /// Records what `node` reported having got so far.
    pub fn node_bytes(&self, node: &str, from_peers: u64, over_http: u64) {
        let mut inner = self.lock();
        // Only nodes that exist (a report for a node deleted meanwhile is dropped).
        if inner.steps.contains_key(node) {
            inner.bytes.insert(node.to_string(), (from_peers, over_http));
        }
    }

    /// Bytes the nodes got from peers and over HTTP, summed over their latest reports.
    pub fn node_byte_totals(&self) -> (u64, u64) {
        self.lock().bytes.values().fold((0, 0), |(p, h), (bp, bh)| (p + bp, h + bh))
    }

    /// The last statuses of `node`, oldest first.
    pub fn history(&self, node: &str) -> VecDeque<NodeStatus> {
        self.lock().history.get(node).cloned().unwrap_or_default()
    }

    /// Number of nodes per current step.
    pub fn step_counts(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for step in self.lock().steps.values() {
            *counts.entry(step.clone()).or_insert(0) += 1;
        }
        counts
    }

    /// Turns a committed batch into events and updates the in-memory steps.
    fn committed(&self, changes: Vec<Change>) {
        let mut nodes: Vec<LiveNode> = Vec::new();
        let mut gone = Vec::new();
        {
            let mut inner = self.lock();
            for c in changes {
                match c {
                    Change::Node { name, group, switch } => {
                        inner.steps.entry(name.clone()).or_insert_with(|| NO_STEP.to_string());
                        match nodes.iter_mut().find(|n| n.name == name) {
                            Some(n) => (n.group, n.switch) = (Some(group), switch),
                            None => nodes.push(LiveNode { name, group: Some(group), switch, status: None }),
                        }
                    }
                    Change::NodeGone(name) => {
                        inner.steps.remove(&name);
                        inner.bytes.remove(&name);
                        inner.history.remove(&name);
                        gone.push(name);
                    }
                    Change::Status(name, status) => {
                        let step = status.as_ref().map_or(NO_STEP, |s| s.step.as_str()).to_string();
                        if let Some(held) = inner.steps.get_mut(&name) {
                            *held = step;
                            if let Some(st) = &status {
                                let h = inner.history.entry(name.clone()).or_default();
                                // Download progress is one line that moves, not a step.
                                if h.back().is_some_and(|b| b.step == st.step && st.progress.is_some()) {
                                    h.pop_back();
                                }
                                h.push_back(st.clone());
                                while h.len() > HISTORY {
                                    h.pop_front();
                                }
                            }
                        }
                        match nodes.iter_mut().find(|n| n.name == name) {
                            Some(n) => n.status = Some(status),
                            None => nodes.push(LiveNode { name, status: Some(status), ..Default::default() }),
                        }
                    }
                }
            }
        }
        // A status put for a node gone in the same batch (a rename) is not news.
        nodes.retain(|n| !gone.contains(&n.name) || n.group.is_some());
        if !gone.is_empty() {
            self.publish(LiveEvent::Gone(gone));
        }
        if !nodes.is_empty() {
            self.publish(LiveEvent::Nodes(nodes));
        }
    }
}

/// What a write means for the live view.
enum Change {
    Node { name: String, group: String, switch: Option<String> },
    NodeGone(String),
    Status(String, Option<NodeStatus>),
}

impl Change {
    fn of(w: &Write) -> Option<Change> {
        let node = Collection::Object(Kind::Node);
        match w {
            Write::Put { collection, key, doc, .. } if *collection == node => {
                let field = |f: &str| doc.get(f).and_then(Value::as_str).map(String::from);
                Some(Change::Node {
                    name: key.clone(),
                    group: field("group").unwrap_or_default(),
                    switch: field("switch"),
                })
            }
            Write::Delete { collection, key, .. } if *collection == node => Some(Change::NodeGone(key.clone())),
            Write::Put { collection: Collection::Status, key, doc, .. } => {
                // A record the server could not read is shown as no status.
                Some(Change::Status(key.clone(), serde_json::from_value(doc.clone()).ok()))
            }
            Write::Delete { collection: Collection::Status, key, .. } => Some(Change::Status(key.clone(), None)),
            _ => None,
        }
    }
}

/// The store with every successful commit reported to [`Live`].
struct Observed {
    inner: Arc<dyn Store>,
    live: Arc<Live>,
}

#[async_trait::async_trait]
impl Store for Observed {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        self.inner.get(collection, key).await
    }

    async fn get_shared(&self, collection: Collection, key: &str) -> Result<Option<Arc<Record>>> {
        self.inner.get_shared(collection, key).await
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        self.inner.list(collection, prefix).await
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let changes: Vec<Change> = writes.iter().filter_map(Change::of).collect();
        let start = Instant::now();
        let result = self.inner.commit(writes).await;
        self.live.metrics.store_commit_seconds.observe(start.elapsed().as_secs_f64());
        if result.is_ok() && !changes.is_empty() {
            self.live.committed(changes);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::Service;

    async fn setup() -> (Arc<Live>, Service) {
        let live = Arc::new(Live::new(Arc::new(Metrics::new())));
        let store = live.observe(crate::store::open("sqlite://:memory:").await.unwrap());
        let service = Service::new(store);
        service.ensure_cluster("t").await.unwrap();
        service.create(Kind::Osimage, serde_json::json!({"name": "img", "path": "/img"})).await.unwrap();
        service.create(Kind::Group, serde_json::json!({"name": "g", "osimage": "img"})).await.unwrap();
        (live, service)
    }

    fn next(rx: &mut broadcast::Receiver<Arc<LiveEvent>>) -> LiveEvent {
        (*rx.try_recv().expect("an event")).clone()
    }

    #[tokio::test]
    async fn every_kind_of_status_write_becomes_an_event() {
        let (live, service) = setup().await;
        let mut rx = live.subscribe();
        let add = luna_core::api::NodeCreate { name: "n[1-2]".into(), group: "g".into(), ..Default::default() };
        service.add_nodes(add).await.unwrap();
        let LiveEvent::Nodes(added) = next(&mut rx) else { panic!("not a nodes event") };
        assert_eq!(added.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n1", "n2"]);
        assert!(added.iter().all(|n| n.group.as_deref() == Some("g") && n.status.is_none()));
        assert_eq!(live.step_counts(), BTreeMap::from([(NO_STEP.to_string(), 2)]));

        // An agent's report (written directly).
        service.set_node_status("n1", "download", Some(40), None).await.unwrap();
        let LiveEvent::Nodes(n) = next(&mut rx) else { panic!("not a nodes event") };
        let st = n[0].status.clone().flatten().unwrap();
        assert_eq!((n[0].name.as_str(), st.step.as_str(), st.progress), ("n1", "download", Some(40)));
        // The boot path's group commit.
        service.record_node_status("n2", "ipxe", "boot script served".into(), true).await;
        let LiveEvent::Nodes(n) = next(&mut rx) else { panic!("not a nodes event") };
        assert_eq!(n[0].status.clone().flatten().unwrap().step, "ipxe");
        assert_eq!(live.step_counts(), BTreeMap::from([("download".to_string(), 1), ("ipxe".to_string(), 1)]));

        // Bytes: only nodes that exist, summed over their latest reports.
        live.node_bytes("n1", 100, 10);
        live.node_bytes("n1", 300, 20);
        live.node_bytes("n2", 50, 0);
        live.node_bytes("ghost", 1000, 1000);
        assert_eq!(live.node_byte_totals(), (350, 20));

        // A delete: the node is gone and so are its bytes.
        service.delete(Kind::Node, "n1").await.unwrap();
        let mut saw_gone = false;
        while let Ok(e) = rx.try_recv() {
            if let LiveEvent::Gone(g) = &*e {
                saw_gone = g == &["n1".to_string()];
            }
        }
        assert!(saw_gone);
        assert_eq!(live.node_byte_totals(), (50, 0));
        assert_eq!(live.step_counts(), BTreeMap::from([("ipxe".to_string(), 1)]));
        // A commit that fails says nothing.
        let stale = Write::Put {
            collection: Collection::Status,
            key: "n2".into(),
            expect: crate::store::Expect::Rev(999),
            doc: serde_json::json!({"step": "booted", "time": 1}),
        };
        assert!(live.observe(service.store().clone()).commit(vec![stale]).await.is_err());
        assert!(rx.try_recv().is_err());
        assert_eq!(live.step_counts(), BTreeMap::from([("ipxe".to_string(), 1)]));
    }
}
