//! The service layer: every change to objects goes through here.
//!
//! Invariants:
//! - each operation reads what it needs, computes one batch of writes and commits it atomically;
//!   objects are written with `Expect::Rev` (or `Absent` on create), so a concurrent change makes the
//!   commit fail and the whole operation is re-run on fresh data (no lost update);
//! - claims (MACs, IPs, switch ports) are derived from objects by `AnyObject::claims` and written in
//!   the same batch as the object; a claim taken by someone else is reported as `Taken`;
//! - cross-object rules (references exist, addresses lie inside their network and outside reserved
//!   ranges, nothing deletes what others use) are checked here, never in the API or CLI.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use luna_core::api::{NodeCreate, NodePatch};
use luna_core::hostlist::{self, HostlistError};
use luna_core::ipalloc::{self, AllocError};
use luna_core::model::{
    validate_name, AnyObject, Claim, Cluster, Group, IpRange, Kind, ModelError, Network, Node, NodeInterface,
    NodeStatus, RootMode, Secret, SwitchPort, BOOTIF,
};
use luna_core::MacAddr;
use serde_json::{json, Value};

use crate::store::{Collection, Expect, Record, Store, StoreError, Write};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{kind} '{name}' does not exist")]
    NotFound { kind: Kind, name: String },
    #[error("{kind} '{name}' already exists")]
    AlreadyExists { kind: Kind, name: String },
    #[error("{kind} '{name}' is used by {users}")]
    InUse { kind: Kind, name: String, users: String },
    #[error("{what} is already taken by {owner}")]
    Taken { what: String, owner: String },
    #[error("{0}")]
    Invalid(#[from] ModelError),
    #[error("{0}")]
    Alloc(#[from] AllocError),
    #[error("{0}")]
    Hostlist(#[from] HostlistError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{kind} '{name}' was changed by someone else (now at rev {current}, you had rev {given})")]
    Stale { kind: Kind, name: String, given: u64, current: u64 },
    #[error("too much concurrent change: gave up after {0} attempts, try again")]
    Busy(u32),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

const MAX_ATTEMPTS: u32 = 64;

fn bad(msg: impl Into<String>) -> ServiceError {
    ServiceError::BadRequest(msg.into())
}

/// Runs `op` until its commit does not hit a concurrent change.
macro_rules! retrying {
    ($body:expr) => {{
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match $body {
                Err(ServiceError::Store(StoreError::Conflict { .. })) if attempt < MAX_ATTEMPTS => {
                    // Jitter so that racing writers do not collide again in lock step.
                    let wait = rand::random::<u64>() % (2 + u64::from(attempt.min(10)) * 3);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Err(ServiceError::Store(StoreError::Conflict { .. })) => break Err(ServiceError::Busy(attempt)),
                other => break other,
            }
        }
    }};
}

/// One object as read from the store, with its revision.
fn parse(kind: Kind, rec: Record) -> Result<AnyObject> {
    let mut o = AnyObject::from_value(kind, rec.doc)?;
    o.set_rev(rec.rev);
    Ok(o)
}

fn to_doc(o: &AnyObject) -> Value {
    let mut o = o.clone();
    // The store owns revisions; the copy inside the document would only go stale.
    o.set_rev(0);
    let mut doc = o.to_value();
    if let (AnyObject::Node(_), Some(fields)) = (&o, doc.as_object_mut()) {
        // A node's status is its own record (`Collection::Status`), never part of the object.
        fields.remove("status");
    }
    doc
}

/// The status record write that takes `name`'s status from what the store holds (`held`, its
/// revision) to `status`; `None` when nothing changes.
fn status_write(name: &str, held: Option<u64>, status: Option<&NodeStatus>) -> Option<Write> {
    let (collection, key) = (Collection::Status, name.to_string());
    let expect = held.map_or(Expect::Absent, Expect::Rev);
    match status {
        Some(st) => Some(Write::Put { collection, key, expect, doc: json!(st) }),
        None => held.map(|_| Write::Delete { collection, key, expect }),
    }
}

fn claim_doc(o: &AnyObject) -> Value {
    json!({ "kind": o.kind(), "owner": o.name() })
}

/// Accumulates the writes of one operation; claims follow their objects automatically.
#[derive(Default)]
struct Batch {
    writes: Vec<Write>,
    /// Claims known to be held, key → (rev, owner kind, owner name).
    claims: HashMap<String, (u64, String, String)>,
    touched: BTreeSet<String>,
    /// Claims of addresses we picked ourselves: if someone took one meanwhile, pick again.
    auto: BTreeSet<String>,
    /// Read checks: records the operation read and depends on, at the revision it saw (or
    /// absent). Committed as [`Write::Check`] unless the batch writes the record anyway.
    reads: BTreeMap<(Collection, String), Expect>,
    /// Objects whose referrer record ([`users_key`]) this batch must bump: someone starts or
    /// stops referring to them (or, for a network and the cluster, an address on it changes).
    bumps: BTreeSet<(Kind, String)>,
    /// Objects this batch deletes or renames away: their referrer record goes with them.
    gone: BTreeSet<(Kind, String)>,
}

/// The record whose revision changes whenever the set of objects that refer to `kind`/`name`
/// changes, and for a network (and the cluster, [`ADDRESSES`]) whenever an address held on it
/// changes.
///
/// Why: a read check can only protect a record that exists when it is read. An operation that
/// decides from a *list* (a delete refused while users exist, a rename that rewrites every
/// user, a network change checked against the addresses held on it, a group change that
/// re-allocates its nodes) would miss a referrer added concurrently, whose batch only checks the
/// referred object and does not write it. So every batch that adds or removes a referrer writes
/// this record, and every operation that lists referrers checks it at the revision it saw
/// before listing: one of the two batches then fails and is re-run on fresh data.
fn users_key(kind: Kind, name: &str) -> String {
    format!("users/{kind}/{name}")
}

/// The referrer record of every address (the cluster's DHCP range must not overlap one).
const ADDRESSES: (Kind, &str) = (Kind::Cluster, "addresses");

/// Whether `kind`/`name` can have a referrer record (nodes and other devices are referred to
/// by nothing).
fn has_users(kind: Kind, name: &str) -> bool {
    !kind.referrers().is_empty() || (kind, name) == ADDRESSES
}

impl Batch {
    async fn load_claim(&mut self, store: &dyn Store, key: &str) -> Result<Option<(u64, String, String)>> {
        if let Some(c) = self.claims.get(key) {
            return Ok(Some(c.clone()));
        }
        let Some(rec) = store.get(Collection::Claim, key).await? else { return Ok(None) };
        let c = claim_owner(&rec);
        self.claims.insert(key.to_string(), c.clone());
        Ok(Some(c))
    }

    /// Writes `new` in place of `old` (create when `old` is `None`), with its claims.
    async fn put(&mut self, store: &dyn Store, old: Option<&AnyObject>, new: &AnyObject) -> Result<()> {
        let old_claims: BTreeSet<String> = old.map(|o| o.claims().iter().map(Claim::key).collect()).unwrap_or_default();
        let new_claims: Vec<Claim> = new.claims();
        let new_keys: BTreeSet<String> = new_claims.iter().map(Claim::key).collect();
        let renamed = old.is_some_and(|o| o.key() != new.key());
        if let Some(o) = old.filter(|_| renamed) {
            self.gone.insert((o.kind(), o.name().to_string()));
        }
        self.follow_references(old, Some(new));
        match old {
            Some(o) if !renamed => self.writes.push(Write::Put {
                collection: Collection::Object(new.kind()),
                key: new.key().to_string(),
                expect: Expect::Rev(o.rev()),
                doc: to_doc(new),
            }),
            _ => {
                if let Some(o) = old {
                    self.delete_record(Collection::Object(o.kind()), o.key(), Expect::Rev(o.rev()));
                    if o.kind() == Kind::Node {
                        // The status follows the node to its new name.
                        self.move_status(store, o.key(), Some(new.key())).await?;
                    }
                }
                self.writes.push(Write::Put {
                    collection: Collection::Object(new.kind()),
                    key: new.key().to_string(),
                    expect: Expect::Absent,
                    doc: to_doc(new),
                });
            }
        }
        for key in old_claims.difference(&new_keys) {
            let rev = self.load_claim(store, key).await?.map(|c| c.0);
            if let Some(rev) = rev {
                self.delete_record(Collection::Claim, key, Expect::Rev(rev));
            }
        }
        for claim in &new_claims {
            let key = claim.key();
            if !self.touched.insert(key.clone()) {
                continue;
            }
            let held_by_old = old_claims.contains(&key);
            if old.is_none() && self.auto.contains(&key) {
                // We picked it as free moments ago; if someone took it since, the commit's
                // `Absent` check fails and the operation is re-run with fresh data.
                self.writes.push(Write::Put {
                    collection: Collection::Claim,
                    key,
                    expect: Expect::Absent,
                    doc: claim_doc(new),
                });
                continue;
            }
            let existing = self.load_claim(store, &key).await?;
            match existing {
                Some((rev, kind, owner)) if held_by_old && !renamed && kind == new.kind().as_str() => {
                    let _ = (rev, owner);
                }
                Some((rev, kind, owner)) => {
                    let mine = old.is_some_and(|o| kind == o.kind().as_str() && owner == o.name());
                    if !mine && self.auto.contains(&key) {
                        return Err(StoreError::Conflict {
                            collection: Collection::Claim,
                            key,
                            expected: "absent".into(),
                            found: format!("rev {rev}"),
                        }
                        .into());
                    }
                    if !mine {
                        return Err(ServiceError::Taken { what: claim.describe(), owner: format!("{kind} {owner}") });
                    }
                    self.writes.push(Write::Put {
                        collection: Collection::Claim,
                        key,
                        expect: Expect::Rev(rev),
                        doc: claim_doc(new),
                    });
                }
                None => self.writes.push(Write::Put {
                    collection: Collection::Claim,
                    key,
                    expect: Expect::Absent,
                    doc: claim_doc(new),
                }),
            }
        }
        Ok(())
    }

    async fn delete(&mut self, store: &dyn Store, old: &AnyObject) -> Result<()> {
        self.gone.insert((old.kind(), old.name().to_string()));
        self.follow_references(Some(old), None);
        self.delete_record(Collection::Object(old.kind()), old.key(), Expect::Rev(old.rev()));
        if old.kind() == Kind::Node {
            self.move_status(store, old.key(), None).await?;
        }
        for claim in old.claims() {
            let key = claim.key();
            if let Some((rev, _, _)) = self.load_claim(store, &key).await? {
                self.delete_record(Collection::Claim, &key, Expect::Rev(rev));
            }
        }
        Ok(())
    }

    /// Deletes node `from`'s status record, and writes it as `to`'s when given (replacing a
    /// status left behind under that name).
    async fn move_status(&mut self, store: &dyn Store, from: &str, to: Option<&str>) -> Result<()> {
        let held = store.get(Collection::Status, from).await?;
        let status = held.as_ref().map(crate::store::objects::decode_status).transpose()?;
        self.writes.extend(status_write(from, held.as_ref().map(|r| r.rev), None));
        if let Some(to) = to {
            let left = store.get(Collection::Status, to).await?.map(|r| r.rev);
            self.writes.extend(status_write(to, left, status.as_ref()));
        }
        Ok(())
    }

    /// Notes the referrer records a change from `old` to `new` must bump.
    fn follow_references(&mut self, old: Option<&AnyObject>, new: Option<&AnyObject>) {
        let refs = |o: Option<&AnyObject>| -> BTreeSet<(Kind, String)> {
            o.map(|o| o.references().into_iter().collect()).unwrap_or_default()
        };
        let addrs = |o: Option<&AnyObject>| -> BTreeSet<(String, Ipv4Addr)> {
            o.map(|o| o.addresses().into_iter().collect()).unwrap_or_default()
        };
        let (old_refs, new_refs) = (refs(old), refs(new));
        self.bumps.extend(old_refs.symmetric_difference(&new_refs).cloned());
        let (old_addrs, new_addrs) = (addrs(old), addrs(new));
        for (net, _) in old_addrs.symmetric_difference(&new_addrs) {
            self.bumps.insert((Kind::Network, net.clone()));
            self.bumps.insert((ADDRESSES.0, ADDRESSES.1.to_string()));
        }
    }

    /// The operation read `kind`/`key` at `rev` and depends on it.
    fn read(&mut self, kind: Kind, key: &str, rev: u64) {
        self.reads.entry((Collection::Object(kind), key.to_string())).or_insert(Expect::Rev(rev));
    }

    fn read_object(&mut self, o: &AnyObject) {
        self.read(o.kind(), o.key(), o.rev());
    }

    /// Reads the referrer record of `kind`/`name` and checks it at commit. Call it *before*
    /// listing the referrers.
    async fn read_users(&mut self, store: &dyn Store, kind: Kind, name: &str) -> Result<()> {
        if !has_users(kind, name) {
            return Ok(());
        }
        let key = users_key(kind, name);
        let expect = store.get(Collection::Meta, &key).await?.map_or(Expect::Absent, |r| Expect::Rev(r.rev));
        self.reads.entry((Collection::Meta, key)).or_insert(expect);
        Ok(())
    }

    /// The writes to commit: the batch's own, the referrer records it bumps or removes, and a
    /// check of every record it read but does not write.
    async fn finish(mut self, store: &dyn Store) -> Result<Vec<Write>> {
        let mut users: BTreeSet<(Kind, String)> = self.bumps.clone();
        users.extend(self.gone.iter().filter(|(k, n)| has_users(*k, n)).cloned());
        for (kind, name) in users {
            let key = users_key(kind, &name);
            let expect = match self.reads.remove(&(Collection::Meta, key.clone())) {
                Some(e) => e,
                None => store.get(Collection::Meta, &key).await?.map_or(Expect::Absent, |r| Expect::Rev(r.rev)),
            };
            let gone = self.gone.contains(&(kind, name.clone()));
            match (gone, expect) {
                (true, Expect::Rev(_)) => self.writes.push(Write::Delete { collection: Collection::Meta, key, expect }),
                (true, Expect::Absent) => self.writes.push(Write::Check { collection: Collection::Meta, key, expect }),
                (false, _) => self.writes.push(Write::Put {
                    collection: Collection::Meta,
                    key,
                    expect,
                    doc: json!({ "kind": kind, "name": name }),
                }),
            }
        }
        let written: BTreeSet<(Collection, String)> = self
            .writes
            .iter()
            .map(|w| {
                let (c, k, _) = w.target();
                (c, k.to_string())
            })
            .collect();
        for ((collection, key), expect) in self.reads {
            if !written.contains(&(collection, key.clone())) {
                self.writes.push(Write::Check { collection, key, expect });
            }
        }
        Ok(self.writes)
    }

    fn delete_record(&mut self, collection: Collection, key: &str, expect: Expect) {
        if collection == Collection::Claim && !self.touched.insert(key.to_string()) {
            return;
        }
        self.writes.push(Write::Delete { collection, key: key.to_string(), expect });
    }
}

fn claim_owner(rec: &Record) -> (u64, String, String) {
    let s = |f: &str| rec.doc.get(f).and_then(Value::as_str).unwrap_or_default().to_string();
    (rec.rev, s("kind"), s("owner"))
}

/// What a network looks like for allocation: its object and the addresses already held on it.
struct NetworkUse {
    network: Network,
    used: BTreeSet<Ipv4Addr>,
    /// Every host address below this one is used: allocation scans from here.
    cursor: Ipv4Addr,
}

#[derive(Clone)]
pub struct Service {
    store: Arc<dyn Store>,
    /// Boot-path status reports, committed in groups (see `status.rs`).
    status: Arc<crate::status::StatusQueue>,
    /// Decoded objects for the boot path (see `store/objects.rs`).
    objects: Arc<crate::store::objects::Objects>,
}

impl Service {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let objects = Arc::new(crate::store::objects::Objects::new(store.clone()));
        Service { store, status: Arc::default(), objects }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Commits a batch with its read checks and referrer records.
    async fn commit(&self, b: Batch) -> Result<()> {
        let writes = b.finish(self.store.as_ref()).await?;
        self.store.commit(writes).await?;
        Ok(())
    }

    // -- boot-path reads: shared, decoded objects (read-only; as fresh as `get`) ----------------

    /// The object `kind`/`name` as the boot path reads it: shared and decoded once per
    /// revision the store hands out.
    pub async fn shared(&self, kind: Kind, name: &str) -> Result<Arc<AnyObject>> {
        self.objects.get(kind, name).await?.ok_or_else(|| ServiceError::NotFound { kind, name: name.to_string() })
    }

    /// [`Service::node_by_mac`] for the boot path: the node as a shared, decoded object.
    pub async fn shared_node_by_mac(&self, mac: MacAddr) -> Result<Option<Arc<AnyObject>>> {
        let Some(rec) = self.store.get_shared(Collection::Claim, &Claim::Mac(mac).key()).await? else {
            return Ok(None);
        };
        let (_, kind, owner) = claim_owner(&rec);
        if kind != Kind::Node.as_str() {
            return Ok(None);
        }
        Ok(self.objects.get(Kind::Node, &owner).await?)
    }

    // -- reads ---------------------------------------------------------------------------------

    pub async fn get(&self, kind: Kind, name: &str) -> Result<AnyObject> {
        let key = if kind == Kind::Cluster { Cluster::KEY } else { name };
        match self.store.get(Collection::Object(kind), key).await? {
            Some(rec) => {
                let mut o = parse(kind, rec)?;
                if let AnyObject::Node(n) = &mut o {
                    // Read after the node: a status is never older than the node it is shown with.
                    let status = self.store.get(Collection::Status, key).await?;
                    n.status = status.as_ref().map(crate::store::objects::decode_status).transpose()?;
                }
                Ok(o)
            }
            None => Err(ServiceError::NotFound { kind, name: name.to_string() }),
        }
    }

    async fn find(&self, kind: Kind, name: &str) -> Result<Option<AnyObject>> {
        match self.get(kind, name).await {
            Ok(o) => Ok(Some(o)),
            Err(ServiceError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn list(&self, kind: Kind) -> Result<Vec<AnyObject>> {
        let recs = self.store.list(Collection::Object(kind), "").await?;
        let mut out: Vec<AnyObject> = recs.into_iter().map(|r| parse(kind, r)).collect::<Result<_>>()?;
        if kind == Kind::Node {
            let mut statuses: HashMap<String, Record> =
                self.store.list(Collection::Status, "").await?.into_iter().map(|r| (r.key.clone(), r)).collect();
            for o in &mut out {
                if let AnyObject::Node(n) = o {
                    n.status =
                        statuses.remove(&n.name).as_ref().map(crate::store::objects::decode_status).transpose()?;
                }
            }
            // Natural order: node2 before node10 when the padding differs.
            out.sort_by_key(|o| natural_key(o.name()));
        }
        Ok(out)
    }

    pub async fn cluster(&self) -> Result<Cluster> {
        match self.get(Kind::Cluster, Cluster::KEY).await? {
            AnyObject::Cluster(c) => Ok(c),
            _ => unreachable!("kind checked by get"),
        }
    }

    pub async fn node(&self, name: &str) -> Result<Node> {
        match self.get(Kind::Node, name).await? {
            AnyObject::Node(n) => Ok(n),
            _ => unreachable!("kind checked by get"),
        }
    }

    pub async fn group(&self, name: &str) -> Result<Group> {
        match self.get(Kind::Group, name).await? {
            AnyObject::Group(g) => Ok(g),
            _ => unreachable!("kind checked by get"),
        }
    }

    pub async fn network(&self, name: &str) -> Result<Network> {
        match self.get(Kind::Network, name).await? {
            AnyObject::Network(n) => Ok(n),
            _ => unreachable!("kind checked by get"),
        }
    }

    /// The node whose BOOTIF or other interface has this MAC (a primary-key lookup on claims).
    pub async fn node_by_mac(&self, mac: MacAddr) -> Result<Option<Node>> {
        self.node_by_claim(&Claim::Mac(mac).key()).await
    }

    /// The node configured for a switch port.
    pub async fn node_by_switch_port(&self, switch: &str, port: &SwitchPort) -> Result<Option<Node>> {
        self.node_by_claim(&Claim::SwitchPort { switch: switch.to_string(), port: port.clone() }.key()).await
    }

    async fn node_by_claim(&self, key: &str) -> Result<Option<Node>> {
        let Some(rec) = self.store.get(Collection::Claim, key).await? else { return Ok(None) };
        let (_, kind, owner) = claim_owner(&rec);
        if kind != Kind::Node.as_str() {
            return Ok(None);
        }
        match self.find(Kind::Node, &owner).await? {
            Some(AnyObject::Node(n)) => Ok(Some(n)),
            _ => Ok(None),
        }
    }

    /// Objects that refer to `kind`/`name`.
    async fn users_of(&self, kind: Kind, name: &str) -> Result<Vec<AnyObject>> {
        let mut users = Vec::new();
        for &k in kind.referrers() {
            for o in self.list(k).await? {
                if o.references().iter().any(|(rk, rn)| *rk == kind && rn == name) {
                    users.push(o);
                }
            }
        }
        Ok(users)
    }

    fn describe_users(users: &[AnyObject]) -> String {
        let mut by_kind: BTreeMap<Kind, Vec<&str>> = BTreeMap::new();
        for u in users {
            by_kind.entry(u.kind()).or_default().push(u.name());
        }
        by_kind
            .into_iter()
            .map(|(k, names)| format!("{k} {}", hostlist::compress(&names)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The network and its used addresses; `b` checks the network at commit.
    async fn network_use(&self, b: &mut Batch, name: &str) -> Result<NetworkUse> {
        let network = self.network(name).await?;
        b.read(Kind::Network, name, network.rev);
        let used = self
            .store
            .list(Collection::Claim, &Claim::ip_prefix(name))
            .await?
            .iter()
            .filter_map(|r| r.key.rsplit('/').next().and_then(|ip| ip.parse().ok()))
            .collect();
        let cursor = network.host_range().start;
        Ok(NetworkUse { network, used, cursor })
    }

    /// Ranges no static allocation may use: the server's own address and the discovery range.
    /// `b` checks the cluster at commit.
    async fn cluster_reserved(&self, b: &mut Batch) -> Result<Vec<IpRange>> {
        let c = self.cluster().await?;
        b.read(Kind::Cluster, Cluster::KEY, c.rev);
        let mut out: Vec<IpRange> = c.frontend_address.map(IpRange::single).into_iter().collect();
        out.extend(c.dhcp_range);
        Ok(out)
    }

    /// Checks that what `o` names exists and that its addresses fit their networks.
    /// `b` checks every object read at commit.
    async fn check_references(&self, b: &mut Batch, o: &AnyObject) -> Result<()> {
        for (kind, name) in o.references() {
            match self.find(kind, &name).await? {
                Some(r) => b.read_object(&r),
                None => return Err(ServiceError::NotFound { kind, name }),
            }
        }
        let addresses = o.addresses();
        if addresses.is_empty() {
            return Ok(());
        }
        let reserved = self.cluster_reserved(b).await?;
        for (net, ip) in addresses {
            let network = self.network(&net).await?;
            b.read(Kind::Network, &net, network.rev);
            ipalloc::check_explicit(&network, ip, &reserved)?;
        }
        Ok(())
    }

    // -- generic writes --------------------------------------------------------------------------

    /// Creates any object but a node (see [`Service::add_nodes`]) or the cluster.
    pub async fn create(&self, kind: Kind, doc: Value) -> Result<AnyObject> {
        match kind {
            Kind::Node => return Err(bad("nodes are created with a node add request")),
            Kind::Cluster => return Err(bad("the cluster exists once; change it instead")),
            _ => {}
        }
        let mut obj = AnyObject::from_value(kind, doc)?;
        obj.set_rev(0);
        obj.validate()?;
        retrying!(self.create_once(&obj).await)
    }

    async fn create_once(&self, obj: &AnyObject) -> Result<AnyObject> {
        if self.find(obj.kind(), obj.name()).await?.is_some() {
            return Err(ServiceError::AlreadyExists { kind: obj.kind(), name: obj.name().to_string() });
        }
        let mut b = Batch::default();
        self.check_references(&mut b, obj).await?;
        b.put(self.store.as_ref(), None, obj).await?;
        self.commit(b).await?;
        self.get(obj.kind(), obj.name()).await
    }

    /// Applies a JSON merge patch (RFC 7396) to any object but a node.
    pub async fn update(&self, kind: Kind, name: &str, patch: Value) -> Result<AnyObject> {
        if kind == Kind::Node {
            return Err(bad("nodes are changed with a node patch"));
        }
        if !patch.is_object() {
            return Err(bad(format!("a change of {kind} '{name}' must be a json object")));
        }
        retrying!(self.update_once(kind, name, &patch).await)
    }

    async fn update_once(&self, kind: Kind, name: &str, patch: &Value) -> Result<AnyObject> {
        let old = self.get(kind, name).await?;
        let mut doc = old.to_value();
        if let Some(rev) = patch.get("rev").and_then(Value::as_u64) {
            if rev != old.rev() {
                return Err(ServiceError::Stale { kind, name: name.into(), given: rev, current: old.rev() });
            }
        }
        merge_patch(&mut doc, patch);
        if doc.get("name") != Some(&Value::String(old.name().to_string())) {
            return Err(bad(format!("renaming {kind} '{name}' is done with rename, not change")));
        }
        let mut new = AnyObject::from_value(kind, doc)?;
        new.set_rev(old.rev());
        new.validate()?;
        let mut b = Batch::default();
        self.check_references(&mut b, &new).await?;
        match (&old, &new) {
            (AnyObject::Network(o), AnyObject::Network(n)) => self.check_network_change(&mut b, o, n).await?,
            (AnyObject::Group(o), AnyObject::Group(n)) if o.interfaces != n.interfaces => {
                self.follow_group_interfaces(&mut b, n).await?
            }
            (AnyObject::Cluster(_), AnyObject::Cluster(c)) => self.check_cluster_change(&mut b, c).await?,
            _ => {}
        }
        b.put(self.store.as_ref(), Some(&old), &new).await?;
        self.commit(b).await?;
        self.get(kind, name).await
    }

    /// A network may change only if every address held on it still fits.
    async fn check_network_change(&self, b: &mut Batch, old: &Network, new: &Network) -> Result<()> {
        if old.cidr == new.cidr && old.gateway == new.gateway && old.reserved == new.reserved {
            return Ok(());
        }
        // Before listing: an address taken after the list is then a conflict at commit.
        b.read_users(self.store.as_ref(), Kind::Network, &old.name).await?;
        let mut misfits = Vec::new();
        for rec in self.store.list(Collection::Claim, &Claim::ip_prefix(&old.name)).await? {
            let ip: Ipv4Addr = match rec.key.rsplit('/').next().and_then(|s| s.parse().ok()) {
                Some(ip) => ip,
                None => continue,
            };
            if !new.contains_host(ip) || new.is_reserved(ip) {
                let (_, kind, owner) = claim_owner(&rec);
                misfits.push(format!("{kind} {owner} ({ip})"));
            }
        }
        if !misfits.is_empty() {
            misfits.truncate(10);
            return Err(ServiceError::InUse { kind: Kind::Network, name: old.name.clone(), users: misfits.join(", ") });
        }
        Ok(())
    }

    async fn check_cluster_change(&self, b: &mut Batch, c: &Cluster) -> Result<()> {
        if let Some(r) = c.dhcp_range {
            b.read_users(self.store.as_ref(), ADDRESSES.0, ADDRESSES.1).await?;
            for rec in self.store.list(Collection::Claim, "ip/").await? {
                let ip: Option<Ipv4Addr> = rec.key.rsplit('/').next().and_then(|s| s.parse().ok());
                if ip.is_some_and(|ip| r.contains(ip)) {
                    let (_, kind, owner) = claim_owner(&rec);
                    return Err(ServiceError::Taken {
                        what: format!("dhcp range {r} overlaps {}", rec.key.trim_start_matches("ip/")),
                        owner: format!("{kind} {owner}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Re-allocates the interfaces of every node of a group whose interfaces changed.
    async fn follow_group_interfaces(&self, b: &mut Batch, group: &Group) -> Result<()> {
        // Before listing: a node added to the group meanwhile is then a conflict at commit.
        b.read_users(self.store.as_ref(), Kind::Group, &group.name).await?;
        let nodes: Vec<Node> = self
            .list(Kind::Node)
            .await?
            .into_iter()
            .filter_map(|o| match o {
                AnyObject::Node(n) if n.group == group.name => Some(n),
                _ => None,
            })
            .collect();
        let mut nets = self.networks_for(b, group).await?;
        let reserved = self.cluster_reserved(b).await?;
        for old in nodes {
            let mut new = old.clone();
            reconcile_interfaces(&mut new, group, &mut nets, &reserved, &BTreeMap::new(), &mut b.auto)?;
            b.put(self.store.as_ref(), Some(&AnyObject::Node(old)), &AnyObject::Node(new)).await?;
        }
        Ok(())
    }

    async fn networks_for(&self, b: &mut Batch, group: &Group) -> Result<HashMap<String, NetworkUse>> {
        let mut nets = HashMap::new();
        for i in &group.interfaces {
            if !nets.contains_key(&i.network) {
                nets.insert(i.network.clone(), self.network_use(b, &i.network).await?);
            }
        }
        Ok(nets)
    }

    /// Deletes objects: one name, or a hostlist for nodes. Refused while others use them.
    pub async fn delete(&self, kind: Kind, names: &str) -> Result<Vec<String>> {
        if kind == Kind::Cluster {
            return Err(bad("the cluster cannot be deleted"));
        }
        let names = if kind == Kind::Node { hostlist::expand(names)? } else { vec![names.to_string()] };
        retrying!(self.delete_once(kind, &names).await)
    }

    async fn delete_once(&self, kind: Kind, names: &[String]) -> Result<Vec<String>> {
        let mut b = Batch::default();
        let wanted: BTreeSet<&String> = names.iter().collect();
        for name in names {
            let obj = self.get(kind, name).await?;
            // Before listing: a user added meanwhile is then a conflict at commit.
            b.read_users(self.store.as_ref(), kind, name).await?;
            let users: Vec<AnyObject> = self
                .users_of(kind, name)
                .await?
                .into_iter()
                .filter(|u| !(u.kind() == kind && wanted.contains(&u.name().to_string())))
                .collect();
            if !users.is_empty() {
                return Err(ServiceError::InUse { kind, name: name.clone(), users: Self::describe_users(&users) });
            }
            b.delete(self.store.as_ref(), &obj).await?;
        }
        self.commit(b).await?;
        Ok(names.to_vec())
    }

    /// Renames an object; everything that refers to it follows.
    pub async fn rename(&self, kind: Kind, name: &str, new_name: &str) -> Result<AnyObject> {
        if kind == Kind::Cluster {
            return Err(bad("rename the cluster by changing its name field"));
        }
        validate_name(kind, new_name)?;
        retrying!(self.rename_once(kind, name, new_name).await)
    }

    async fn rename_once(&self, kind: Kind, name: &str, new_name: &str) -> Result<AnyObject> {
        let old = self.get(kind, name).await?;
        if name == new_name {
            return Ok(old);
        }
        if self.find(kind, new_name).await?.is_some() {
            return Err(ServiceError::AlreadyExists { kind, name: new_name.to_string() });
        }
        let mut new = old.clone();
        new.set_name(new_name);
        let mut b = Batch::default();
        let store = self.store.as_ref();
        b.put(store, Some(&old), &new).await?;
        // Before listing: a user added meanwhile is then a conflict at commit.
        b.read_users(store, kind, name).await?;
        for user in self.users_of(kind, name).await? {
            let mut changed = user.clone();
            changed.rename_reference(kind, name, new_name);
            b.put(store, Some(&user), &changed).await?;
        }
        self.commit(b).await?;
        self.get(kind, new_name).await
    }

    /// Copies an object under a new name. Node clones get fresh addresses and no MAC or port.
    pub async fn clone_object(&self, kind: Kind, name: &str, new_name: &str) -> Result<AnyObject> {
        validate_name(kind, new_name)?;
        let old = self.get(kind, name).await?;
        match old {
            AnyObject::Cluster(_) => Err(bad("the cluster exists once and cannot be cloned")),
            AnyObject::Node(n) => {
                let req = NodeCreate {
                    name: new_name.to_string(),
                    group: n.group,
                    localboot: n.localboot,
                    service: n.service,
                    setupbmc: n.setupbmc,
                    comment: n.comment,
                    ..Default::default()
                };
                let mut created = self.add_nodes(req).await?;
                Ok(AnyObject::Node(created.remove(0)))
            }
            AnyObject::Switch(_) | AnyObject::Otherdev(_) => {
                // The copy needs its own address: the next free one on the same network.
                let mut copy = old.clone();
                copy.set_name(new_name);
                let (net, _) = copy.addresses().remove(0);
                retrying!(
                    async {
                        // What is read here is checked again by `create_once`.
                        let mut b = Batch::default();
                        let reserved = self.cluster_reserved(&mut b).await?;
                        let nu = self.network_use(&mut b, &net).await?;
                        let ip = ipalloc::lowest_free(&nu.network, &nu.used, &reserved, 1)?[0];
                        let mut value = copy.to_value();
                        value["ip"] = json!(ip);
                        let obj = AnyObject::from_value(kind, value)?;
                        obj.validate()?;
                        self.create_once(&obj).await
                    }
                    .await
                )
            }
            other => {
                let mut copy = other.clone();
                copy.set_name(new_name);
                copy.set_rev(0);
                if let AnyObject::Osimage(o) = &mut copy {
                    // Published artifacts belong to the original; the clone packs its own.
                    o.revisions.clear();
                    o.current_revision = None;
                }
                copy.validate()?;
                retrying!(self.create_once(&copy).await)
            }
        }
    }

    // -- networks ------------------------------------------------------------------------------

    /// Reserves a range on a network; refused if anything holds an address in it.
    pub async fn reserve(&self, network: &str, range: IpRange) -> Result<Network> {
        retrying!(self.reserve_once(network, range, true).await)
    }

    pub async fn release(&self, network: &str, range: IpRange) -> Result<Network> {
        retrying!(self.reserve_once(network, range, false).await)
    }

    async fn reserve_once(&self, name: &str, range: IpRange, reserve: bool) -> Result<Network> {
        let old = self.network(name).await?;
        let mut new = old.clone();
        if reserve {
            if !old.cidr.contains(&range.start) || !old.cidr.contains(&range.end) {
                return Err(ModelError::invalid(
                    "range",
                    range,
                    format!("is not inside network {name} ({})", old.cidr),
                )
                .into());
            }
            new.reserve(range);
        } else {
            if !old.reserved.iter().any(|r| r.overlaps(&range)) {
                return Err(bad(format!("range {range} is not reserved on network {name}")));
            }
            new.release(range);
        }
        let (old, new) = (AnyObject::Network(old), AnyObject::Network(new));
        new.validate()?;
        let mut b = Batch::default();
        if let (AnyObject::Network(o), AnyObject::Network(n)) = (&old, &new) {
            self.check_network_change(&mut b, o, n).await?;
        }
        b.put(self.store.as_ref(), Some(&old), &new).await?;
        self.commit(b).await?;
        self.network(name).await
    }

    // -- nodes ---------------------------------------------------------------------------------

    /// Adds one node or a hostlist of nodes in one atomic write, allocating addresses.
    pub async fn add_nodes(&self, req: NodeCreate) -> Result<Vec<Node>> {
        let names = hostlist::expand(&req.name)?;
        for n in &names {
            validate_name(Kind::Node, n)?;
        }
        let single = names.len() == 1;
        if !single && (req.mac.is_some() || !req.ips.is_empty() || req.port.is_some()) {
            return Err(bad(format!("--mac, --ip and --port need a single node, not '{}'", req.name)));
        }
        if req.port.is_some() && req.switch.is_none() {
            return Err(bad("--port needs --switch"));
        }
        retrying!(self.add_nodes_once(&req, &names).await)
    }

    async fn add_nodes_once(&self, req: &NodeCreate, names: &[String]) -> Result<Vec<Node>> {
        let mut b = Batch::default();
        let group = self.group(&req.group).await.map_err(|e| match e {
            ServiceError::NotFound { .. } => ServiceError::NotFound { kind: Kind::Group, name: req.group.clone() },
            e => e,
        })?;
        b.read(Kind::Group, &group.name, group.rev);
        if let Some(s) = &req.switch {
            match self.find(Kind::Switch, s).await? {
                Some(sw) => b.read_object(&sw),
                None => return Err(ServiceError::NotFound { kind: Kind::Switch, name: s.clone() }),
            }
        }
        // One list instead of thousands of point reads: bulk adds stay fast.
        let existing: BTreeSet<String> =
            self.store.list(Collection::Object(Kind::Node), "").await?.into_iter().map(|r| r.key).collect();
        if let Some(dup) = names.iter().find(|n| existing.contains(*n)) {
            return Err(ServiceError::AlreadyExists { kind: Kind::Node, name: dup.clone() });
        }
        for ifname in req.ips.keys() {
            if group.interface(ifname).is_none() {
                return Err(bad(format!("group {} has no interface '{ifname}'", group.name)));
            }
        }
        let mut nets = self.networks_for(&mut b, &group).await?;
        let reserved = self.cluster_reserved(&mut b).await?;
        // A status record can outlive its node when a report raced the node's delete: a new
        // node of that name starts without it.
        let wanted: BTreeSet<&String> = names.iter().collect();
        for rec in self.store.list(Collection::Status, "").await? {
            if wanted.contains(&rec.key) {
                b.writes.extend(status_write(&rec.key, Some(rec.rev), None));
            }
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let mut node = Node::new(name, &group.name);
            node.mac = req.mac;
            node.switch = req.switch.clone();
            node.port = req.port.clone();
            node.localboot = req.localboot;
            node.service = req.service;
            node.setupbmc = req.setupbmc;
            node.comment = req.comment.clone();
            reconcile_interfaces(&mut node, &group, &mut nets, &reserved, &req.ips, &mut b.auto)?;
            let obj = AnyObject::Node(node);
            obj.validate()?;
            b.put(self.store.as_ref(), None, &obj).await?;
            if let AnyObject::Node(n) = obj {
                out.push(n);
            }
        }
        self.commit(b).await?;
        Ok(out)
    }

    /// Changes one node or a hostlist of nodes atomically.
    pub async fn change_nodes(&self, names: &str, patch: NodePatch) -> Result<Vec<Node>> {
        let list = hostlist::expand(names)?;
        let single_only = patch.mac.as_ref().is_some_and(Option::is_some)
            || !patch.ips.is_empty()
            || patch.port.as_ref().is_some_and(Option::is_some)
            || patch.rev.is_some();
        if list.len() > 1 && single_only {
            return Err(bad(format!("--mac, --ip, --port and rev need a single node, not '{names}'")));
        }
        retrying!(self.change_nodes_once(&list, &patch).await)
    }

    async fn change_nodes_once(&self, names: &[String], patch: &NodePatch) -> Result<Vec<Node>> {
        let mut b = Batch::default();
        let new_group = match &patch.group {
            Some(g) => Some(self.group(g).await.map_err(|e| match e {
                ServiceError::NotFound { .. } => ServiceError::NotFound { kind: Kind::Group, name: g.clone() },
                e => e,
            })?),
            None => None,
        };
        if let Some(g) = &new_group {
            b.read(Kind::Group, &g.name, g.rev);
        }
        if let Some(Some(s)) = &patch.switch {
            match self.find(Kind::Switch, s).await? {
                Some(sw) => b.read_object(&sw),
                None => return Err(ServiceError::NotFound { kind: Kind::Switch, name: s.clone() }),
            }
        }
        // Read (and checked at commit) only when addresses are (re)allocated or checked.
        let mut reserved: Option<Vec<IpRange>> = None;
        let mut groups: HashMap<String, Group> = HashMap::new();
        let mut nets: HashMap<String, NetworkUse> = HashMap::new();
        let mut out = Vec::new();
        for name in names {
            let old = self.node(name).await?;
            if let Some(rev) = patch.rev {
                if rev != old.rev {
                    return Err(ServiceError::Stale {
                        kind: Kind::Node,
                        name: name.clone(),
                        given: rev,
                        current: old.rev,
                    });
                }
            }
            let mut new = old.clone();
            apply_node_patch(&mut new, patch);
            let group = match &new_group {
                Some(g) => g.clone(),
                None => match groups.get(&new.group) {
                    Some(g) => g.clone(),
                    None => {
                        let g = self.group(&new.group).await?;
                        groups.insert(g.name.clone(), g.clone());
                        g
                    }
                },
            };
            for ifname in patch.ips.keys() {
                if group.interface(ifname).is_none() {
                    return Err(bad(format!("group {} has no interface '{ifname}'", group.name)));
                }
            }
            if new_group.is_some() || !patch.ips.is_empty() {
                // The node's interfaces follow from the group's: a change of it must fail this.
                b.read(Kind::Group, &group.name, group.rev);
                if reserved.is_none() {
                    reserved = Some(self.cluster_reserved(&mut b).await?);
                }
                for gi in &group.interfaces {
                    if !nets.contains_key(&gi.network) {
                        nets.insert(gi.network.clone(), self.network_use(&mut b, &gi.network).await?);
                    }
                }
                // The node's own current addresses are free for itself.
                for i in &old.interfaces {
                    if let (Some(ip), Some(nu)) = (i.ip, nets.get_mut(&i.network)) {
                        if !patch.ips.contains_key(&i.name) {
                            nu.used.insert(ip);
                        } else {
                            nu.used.remove(&ip);
                            nu.cursor = nu.cursor.min(ip);
                        }
                    }
                }
                let reserved = reserved.as_deref().unwrap_or_default();
                reconcile_interfaces(&mut new, &group, &mut nets, reserved, &patch.ips, &mut b.auto)?;
            }
            if let Some(status) = &patch.status {
                let held = self.store.get(Collection::Status, name).await?.map(|r| r.rev);
                b.writes.extend(status_write(name, held, status.as_ref()));
            }
            let (old, new) = (AnyObject::Node(old), AnyObject::Node(new));
            new.validate()?;
            b.put(self.store.as_ref(), Some(&old), &new).await?;
            if let AnyObject::Node(n) = new {
                out.push(n);
            }
        }
        self.commit(b).await?;
        let mut fresh = Vec::with_capacity(out.len());
        for n in out {
            fresh.push(self.node(&n.name).await?);
        }
        Ok(fresh)
    }

    /// Records what a node is doing (boot path, agent reports).
    pub async fn set_node_status(
        &self,
        name: &str,
        step: &str,
        progress: Option<u8>,
        message: Option<String>,
    ) -> Result<Node> {
        let status = NodeStatus { step: step.to_string(), progress, time: unix_now(), message };
        // Checked before the queue forgets anything: a bad report changes nothing.
        if let Some(p) = progress.filter(|p| *p > 100) {
            return Err(ModelError::invalid("status progress", p, "must be 0 to 100").into());
        }
        count_report(step);
        // This one is newer than any report still queued for the node.
        self.status.forget(name);
        retrying!(
            async {
                // Only the status record is written: the node's revision stays the admin's.
                self.node(name).await?;
                let held = self.store.get(Collection::Status, name).await?.map(|r| r.rev);
                self.store.commit(status_write(name, held, Some(&status)).into_iter().collect()).await?;
                self.node(name).await
            }
            .await
        )
    }

    /// The agent's `installed` report. For a node whose root mode (its group's, else its
    /// osimage's) is `disk`, `localboot` is set in the same batch as the status, so its next
    /// boots come from its disk until `luna node reinstall` clears the flag; the group and
    /// osimage it was decided from are checked at commit. Any other node gets the status only.
    pub async fn set_node_installed(&self, name: &str, message: Option<String>) -> Result<Node> {
        let status = NodeStatus { step: "installed".to_string(), progress: None, time: unix_now(), message };
        count_report("installed");
        self.status.forget(name);
        retrying!(
            async {
                let node = self.node(name).await?;
                let group = self.group(&node.group).await?;
                let image = match self.get(Kind::Osimage, &group.osimage).await? {
                    AnyObject::Osimage(o) => o,
                    _ => unreachable!("kind checked by get"),
                };
                let mut b = Batch::default();
                if group.root.unwrap_or(image.root) == RootMode::Disk && !node.localboot {
                    b.read(Kind::Group, &group.name, group.rev);
                    b.read(Kind::Osimage, &image.name, image.rev);
                    let mut new = node.clone();
                    new.localboot = true;
                    b.put(self.store.as_ref(), Some(&AnyObject::Node(node)), &AnyObject::Node(new)).await?;
                    tracing::info!(node = name, "installed on disk: localboot set");
                }
                let held = self.store.get(Collection::Status, name).await?.map(|r| r.rev);
                b.writes.extend(status_write(name, held, Some(&status)));
                self.commit(b).await?;
                self.node(name).await
            }
            .await
        )
    }

    /// Records a boot-path step of a node (DHCP, script served, kernel fetched) through the
    /// group-commit queue. With `wait` it returns once the status is in the store; without, at
    /// once. A node deleted meanwhile is skipped; a failed write is logged.
    pub async fn record_node_status(&self, name: &str, step: &str, message: String, wait: bool) {
        let round = self.queue_node_status(name, step, message);
        if wait {
            self.status.wait(round).await;
        }
    }

    /// Returns once every boot-path status queued so far is written (or given up on).
    pub async fn flush_node_status(&self) {
        self.status.flush().await;
    }

    /// [`Service::record_node_status`] without waiting, for the packet path (needs a tokio
    /// runtime); returns the round that will write it.
    pub fn queue_node_status(&self, name: &str, step: &str, message: String) -> u64 {
        count_report(step);
        let status = NodeStatus { step: step.to_string(), progress: None, time: unix_now(), message: Some(message) };
        self.status.enqueue(&self.store, name, status)
    }

    /// The node's own BMC password (bmcsetup `per_node_password`): the stored one, or a new
    /// random one stored first (compare-and-swap, so two concurrent plans agree on one).
    pub async fn node_bmc_password(&self, name: &str) -> Result<Secret> {
        retrying!(
            async {
                let old = self.node(name).await?;
                if let Some(p) = &old.bmc_password {
                    return Ok(p.clone());
                }
                let password = Secret(random_bmc_password());
                let mut new = old.clone();
                new.bmc_password = Some(password.clone());
                let (old, new) = (AnyObject::Node(old), AnyObject::Node(new));
                let mut b = Batch::default();
                b.put(self.store.as_ref(), Some(&old), &new).await?;
                self.store.commit(b.writes).await?;
                Ok(password)
            }
            .await
        )
    }

    /// Binds a MAC to a node that has none (the boot menu's "choose a node").
    pub async fn bind_mac(&self, name: &str, mac: MacAddr) -> Result<Node> {
        retrying!(
            async {
                let node = self.node(name).await?;
                if let Some(m) = node.mac {
                    return Err(bad(format!("node {name} already has mac {m}")));
                }
                let patch = NodePatch { mac: Some(Some(mac)), rev: Some(node.rev), ..Default::default() };
                self.change_nodes_once(&[name.to_string()], &patch).await.map(|mut v| v.remove(0))
            }
            .await
        )
    }

    /// Creates the cluster object if the store has none.
    pub async fn ensure_cluster(&self, name: &str) -> Result<Cluster> {
        if let Some(AnyObject::Cluster(c)) = self.find(Kind::Cluster, Cluster::KEY).await? {
            return Ok(c);
        }
        let c = Cluster { name: name.to_string(), ..Default::default() };
        let obj = AnyObject::Cluster(c);
        obj.validate()?;
        let mut b = Batch::default();
        b.put(self.store.as_ref(), None, &obj).await?;
        match self.store.commit(b.finish(self.store.as_ref()).await?).await {
            Ok(()) | Err(StoreError::Conflict { .. }) => self.cluster().await,
            Err(e) => Err(e.into()),
        }
    }
}

fn apply_node_patch(n: &mut Node, p: &NodePatch) {
    if let Some(g) = &p.group {
        n.group = g.clone();
    }
    if let Some(m) = p.mac {
        n.mac = m;
    }
    if let Some(s) = &p.switch {
        n.switch = s.clone();
        if s.is_none() {
            n.port = None;
        }
    }
    if let Some(port) = &p.port {
        n.port = port.clone();
    }
    if let Some(v) = p.localboot {
        n.localboot = v;
    }
    if let Some(v) = p.service {
        n.service = v;
    }
    if let Some(v) = p.setupbmc {
        n.setupbmc = v;
    }
    if let Some(c) = &p.comment {
        n.comment = c.clone();
    }
    if let Some(s) = &p.status {
        n.status = s.clone();
    }
}

/// Makes a node's interfaces match its group's: an interface keeps its address while it stays on
/// the same network, explicit addresses are checked, everything else gets the lowest free address.
fn reconcile_interfaces(
    node: &mut Node,
    group: &Group,
    nets: &mut HashMap<String, NetworkUse>,
    reserved: &[IpRange],
    explicit: &BTreeMap<String, Ipv4Addr>,
    auto: &mut BTreeSet<String>,
) -> Result<()> {
    let old: HashMap<String, NodeInterface> = node.interfaces.drain(..).map(|i| (i.name.clone(), i)).collect();
    for gi in &group.interfaces {
        let nu = nets
            .get_mut(&gi.network)
            .ok_or_else(|| ServiceError::NotFound { kind: Kind::Network, name: gi.network.clone() })?;
        let kept = old.get(&gi.name).filter(|i| i.network == gi.network);
        let ip = if let Some(&ip) = explicit.get(&gi.name) {
            // Whether someone else holds it is the claim check's job: it can name the holder.
            ipalloc::check_explicit(&nu.network, ip, reserved)?;
            ip
        } else if let Some(ip) = kept.and_then(|k| k.ip) {
            ip
        } else {
            let ip = ipalloc::lowest_free_from(&nu.network, &nu.used, reserved, 1, nu.cursor)?[0];
            nu.cursor = Ipv4Addr::from(u32::from(ip).saturating_add(1));
            auto.insert(Claim::Ip { network: gi.network.clone(), ip }.key());
            ip
        };
        nu.used.insert(ip);
        node.interfaces.push(NodeInterface {
            name: gi.name.clone(),
            network: gi.network.clone(),
            ip: Some(ip),
            mac: old.get(&gi.name).and_then(|i| i.mac),
        });
    }
    // Keep the provisioning interface first: it is what people look for.
    node.interfaces.sort_by_key(|i| i.name != BOOTIF);
    Ok(())
}

/// RFC 7396 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(Default::default());
        }
        let t = target.as_object_mut().expect("made an object above");
        for (k, v) in p {
            if k == "rev" {
                continue;
            }
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Sort key that orders embedded numbers numerically.
fn natural_key(s: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
        } else {
            if !num.is_empty() {
                out.push((std::mem::take(&mut text), num.parse().unwrap_or(u64::MAX)));
                num.clear();
            }
            text.push(c);
        }
    }
    out.push((text, num.parse().unwrap_or(0)));
    out
}

/// A BMC password luna generates: 16 characters from [A-Za-z0-9] (about 95 bits), within
/// IPMI 1.5's 16-byte limit and free of characters a BMC's web UI or shell might mangle.
pub fn random_bmc_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::rngs::OsRng, 16)
}
/// Counts a status report by step (`luna_status_reports_total`).
fn count_report(step: &str) {
    crate::metrics::global().status_reports.get_or_create(&crate::metrics::l1("step", step)).inc();
}
