//! The `Store`: revisioned JSON documents with atomic, compare-and-swap batches.
//!
//! Invariants (every backend, checked by `tests/conformance.rs`-style suites in `conformance.rs`):
//! - a record is `(collection, key) → (rev, doc)`; `rev` starts at 1 and grows by one per write;
//! - `commit` applies a batch all-or-nothing, and only if every `Expect` holds at that moment;
//!   otherwise it fails with `StoreError::Conflict` naming the first record that did not match;
//! - uniqueness (MACs, IPs, switch ports) is nothing but claim records in [`Collection::Claim`]
//!   created with `Expect::Absent`, so it is race-free wherever `commit` is atomic;
//! - a [`Write::Check`] is a read expectation: it writes nothing and leaves `rev` alone, but the
//!   batch applies only if the record is still as the operation read it (so a batch can depend on
//!   objects it does not change);
//! - a batch names each record at most once (the service layer builds batches that way);
//! - every boot-path lookup (node by name, by MAC, by switch port) is a primary-key `get`.

pub mod cache;
/// The backend conformance suite and the nx-27017 test server: tests only (and the
/// `test-support` feature, for test crates), never in the shipped server.
#[cfg(any(test, feature = "test-support"))]
pub mod conformance;
pub mod mongo;
pub mod objects;
pub mod sqlite;

use std::fmt;
use std::sync::Arc;

use luna_core::Kind;
use serde_json::Value;

/// The schema version this build writes. Older stores are migrated on open, newer ones refused.
/// 1 → 2: node status moved from the node document to [`Collection::Status`].
pub const SCHEMA_VERSION: u64 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Collection {
    /// Objects of one kind, keyed by name (the cluster by `"cluster"`).
    Object(Kind),
    /// Unique keys (`mac/…`, `ip/<net>/<ip>`, `port/<switch>/<port>`) → `{"kind", "owner"}`.
    Claim,
    /// DHCP leases of machines luna does not know yet, keyed by MAC.
    Lease,
    /// Node status (`NodeStatus`), keyed by node name: written by the boot path and the agent,
    /// apart from the node object so that reports never change the object's revision.
    Status,
    /// The boot-token ledger (`boot::token::TokenRecord`), keyed by node name: the SHA-256 of
    /// each node's latest per-boot token and what it may still do, shared by every server so a
    /// token minted by one is honoured by the others; expired records are swept.
    BootToken,
    /// Store bookkeeping: `schema`, and the service's referrer records (`users/<kind>/<name>`,
    /// whose revision changes whenever what refers to that object changes).
    Meta,
}

impl Collection {
    pub const ALL: [Collection; 13] = [
        Collection::Object(Kind::Cluster),
        Collection::Object(Kind::Network),
        Collection::Object(Kind::Osimage),
        Collection::Object(Kind::Bmcsetup),
        Collection::Object(Kind::Group),
        Collection::Object(Kind::Node),
        Collection::Object(Kind::Switch),
        Collection::Object(Kind::Otherdev),
        Collection::Claim,
        Collection::Lease,
        Collection::Status,
        Collection::BootToken,
        Collection::Meta,
    ];

    /// Table / collection name in the backend.
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Object(k) => k.as_str(),
            Collection::Claim => "claim",
            Collection::Lease => "lease",
            Collection::Status => "status",
            Collection::BootToken => "boot_token",
            Collection::Meta => "meta",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Collection::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub collection: Collection,
    pub key: String,
    pub rev: u64,
    pub doc: Value,
}

/// What a write expects to find before it applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The record must not exist (create).
    Absent,
    /// The record must exist at exactly this revision (compare-and-swap).
    Rev(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Put {
        collection: Collection,
        key: String,
        expect: Expect,
        doc: Value,
    },
    Delete {
        collection: Collection,
        key: String,
        expect: Expect,
    },
    /// Writes nothing: the batch applies only if the record is as `expect` says (a read the
    /// batch depends on, checked at commit).
    Check {
        collection: Collection,
        key: String,
        expect: Expect,
    },
}

impl Write {
    pub fn target(&self) -> (Collection, &str, Expect) {
        match self {
            Write::Put { collection, key, expect, .. }
            | Write::Delete { collection, key, expect }
            | Write::Check { collection, key, expect } => (*collection, key, *expect),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{collection} '{key}' changed concurrently (expected {expected}, found {found})")]
    Conflict { collection: Collection, key: String, expected: String, found: String },
    #[error(
        "store schema version {found} is newer than this luna-server understands ({supported}); upgrade luna-server"
    )]
    SchemaTooNew { found: u64, supported: u64 },
    #[error("store schema record {0} has no version this luna-server can migrate from")]
    SchemaUnknown(String),
    #[error(
        "store url '{0}' is not supported: use sqlite:///path/to/luna.db or mongodb://host1,host2/db?replicaSet=rs0"
    )]
    BadUrl(String),
    #[error(
        "mongodb store url '{0}' names no replica set: luna commits every batch as a multi-document transaction, which MongoDB offers only on a replica set; add ?replicaSet=<name> (a one-member replica set is fine: mongod --replSet rs0, then rs.initiate())"
    )]
    NeedsReplicaSet(String),
    #[error("sqlite store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("mongodb store: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("store document {collection} '{key}' is not valid json: {reason}")]
    Corrupt { collection: Collection, key: String, reason: String },
    #[error("store task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Permissions(#[from] crate::fsperm::PermError),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// `sqlite` or `mongodb`, for logs and `luna cluster show`.
    fn backend(&self) -> &'static str;
    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>>;
    /// `get` as a shared record: a cached store hands out the same `Arc` until the record is
    /// written again (no copy of the document), which lets callers keep what they decoded
    /// from it ([`objects::Objects`]).
    async fn get_shared(&self, collection: Collection, key: &str) -> Result<Option<Arc<Record>>> {
        Ok(self.get(collection, key).await?.map(Arc::new))
    }
    /// Records whose key starts with `prefix` (all when empty), sorted by key.
    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>>;
    /// Applies every write or none; see the module invariants.
    async fn commit(&self, writes: Vec<Write>) -> Result<()>;
}

/// Opens the store a URL names, creating or migrating its schema.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = if let Some(path) = url.strip_prefix("sqlite://") {
        // This process is the file's only writer, so its own commits keep the cache exact.
        Arc::new(cache::CachedStore::new(sqlite::SqliteStore::open(path)?))
    } else if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
        Arc::new(mongo::MongoStore::open(url).await?)
    } else {
        return Err(StoreError::BadUrl(url.to_string()));
    };
    ensure_schema(store.as_ref()).await?;
    Ok(store)
}

/// Schema 1 → 2: every node document's `status` moves to a [`Collection::Status`] record, in
/// one batch with the schema record (expected at `schema_rev`).
async fn migrate_status_out_of_nodes(store: &dyn Store, schema_rev: u64) -> Result<()> {
    let node = Collection::Object(Kind::Node);
    let mut writes = Vec::new();
    for mut rec in store.list(node, "").await? {
        let Some(status) = rec.doc.as_object_mut().and_then(|fields| fields.remove("status")) else { continue };
        if !status.is_null() {
            writes.push(Write::Put {
                collection: Collection::Status,
                key: rec.key.clone(),
                expect: Expect::Absent,
                doc: status,
            });
        }
        writes.push(Write::Put { collection: node, key: rec.key, expect: Expect::Rev(rec.rev), doc: rec.doc });
    }
    writes.push(Write::Put {
        collection: Collection::Meta,
        key: "schema".into(),
        expect: Expect::Rev(schema_rev),
        doc: serde_json::json!({ "version": 2 }),
    });
    store.commit(writes).await
}

/// Records the schema version in a new store, migrates an older one, refuses a newer one.
pub async fn ensure_schema(store: &dyn Store) -> Result<()> {
    match store.get(Collection::Meta, "schema").await? {
        None => {
            let doc = serde_json::json!({ "version": SCHEMA_VERSION });
            match store
                .commit(vec![Write::Put {
                    collection: Collection::Meta,
                    key: "schema".into(),
                    expect: Expect::Absent,
                    doc,
                }])
                .await
            {
                // Another server initialised it first: fine.
                Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        }
        Some(rec) => {
            let found = rec.doc.get("version").and_then(Value::as_u64).unwrap_or(0);
            if found > SCHEMA_VERSION {
                return Err(StoreError::SchemaTooNew { found, supported: SCHEMA_VERSION });
            }
            if found == 0 {
                return Err(StoreError::SchemaUnknown(rec.doc.to_string()));
            }
            if found == 1 {
                // Each step bumps the schema record in the same commit as its changes, so a
                // server that loses the race re-reads and finds the store migrated.
                match migrate_status_out_of_nodes(store, rec.rev).await {
                    Ok(()) | Err(StoreError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
                return Box::pin(ensure_schema(store)).await;
            }
            Ok(())
        }
    }
}
