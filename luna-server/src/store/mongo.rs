//! The MongoDB store (production, HA): several luna-servers may share one database.
//!
//! # Layout
//! - Database: the path of the URL (`mongodb://h1,h2/luna?replicaSet=rs0`), `luna` when empty.
//! - One MongoDB collection per [`Collection`], named `luna_` + [`Collection::as_str`]
//!   (`luna_node`, `luna_claim`, …); a record is `{_id: key, rev: <int64>, doc: <string>}`. The
//!   prefix keeps luna's data apart from anything else in the database (the old Python luna
//!   used bare `node`, `group`, … collections) and dodges nx-27017's refusal of SQL keywords
//!   such as `group` as collection names. The document is kept as its JSON text, not as BSON:
//!   BSON cannot hold a u64 above `i64::MAX`, older servers refuse field names with `.` or a
//!   leading `$`, and a JSON→BSON→JSON trip may turn integers into floats. luna only ever looks
//!   records up by key, so nothing is lost by the server not seeing inside documents, and the
//!   text is the same as the SQLite backend's.
//!
//! # One batch, one multi-document transaction
//! A replica set (one member is enough) is required: `open` refuses a URL without
//! `replicaSet`, because standalone servers have no transactions. `commit` runs the batch in
//! one transaction on a session, committed with majority write concern:
//! 1. the current revision of every record the batch names is read inside the transaction (its
//!    snapshot); the first write in batch order whose expectation does not hold aborts the
//!    transaction with [`StoreError::Conflict`] naming it;
//! 2. then every write is applied with its expectation in the filter, so the server enforces it
//!    again: `Rev(n)` deletes and updates match `{_id, rev: n}` (matched 0 = conflict), `Absent`
//!    puts are inserts (duplicate key = conflict);
//! 3. a [`Write::Check`] must *write*: a transaction's plain read does not conflict with another
//!    transaction that changes the record after our snapshot, so two batches that each read
//!    what the other writes (write skew) could both commit. A `Check(Rev(n))` therefore sets a
//!    throw-away field (`chk`, a fresh ObjectId: a no-op `$set` of an equal value is not a
//!    write for the server) on `{_id, rev: n}`, and a `Check(Absent)` inserts a placeholder
//!    (`rev: 0`) and deletes it again in the same transaction. Any concurrent transaction that
//!    writes the record now conflicts with ours, and only one of the two commits. The
//!    placeholder is never visible outside the transaction; `chk` is never read.
//!
//! Retries follow the driver's documented transaction pattern: the whole transaction is re-run
//! on an error labelled `TransientTransactionError` (a write conflict with a concurrent
//! transaction, a primary election, a duplicate key met after our snapshot), and
//! `commitTransaction` alone is re-run on `UnknownTransactionCommitResult`; both are bounded
//! ([`MAX_ATTEMPTS`]) with exponential backoff and jitter, after which the error is returned.
//! Nothing is held between batches: a server that dies mid-batch leaves an open transaction that
//! the replica set aborts (its writes were never visible), and no other server waits for it
//! except a batch that writes the same records (MongoDB: until `transactionLifetimeLimitSeconds`).
//!
//! nx-27017 (the wire-compatible server the tests use) needs `tests/assets/nx-replset.py` to
//! announce a replica set; see there. Small integers may come back from it as int32, so every
//! integer is read through [`int`].

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use futures::TryStreamExt;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::{ClientOptions, WriteConcern};
use mongodb::{Client, ClientSession, Database};

use super::{Collection, Expect, Record, Result, Store, StoreError, Write};

/// Every MongoDB collection luna uses starts with this.
const PREFIX: &str = "luna_";
const DEFAULT_DATABASE: &str = "luna";
/// Keys per `$in` query / per bulk command.
const KEYS_PER_QUERY: usize = 1000;
/// Bytes of statements per `update` command, far below the 16 MiB command limit.
const UPDATE_COMMAND_BYTES: usize = 8 << 20;
/// Attempts of a whole transaction (transient errors), and of its commit (unknown result).
pub const MAX_ATTEMPTS: u32 = 10;
/// First backoff between attempts; doubled each time up to [`MAX_BACKOFF`], plus jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

pub struct MongoStore {
    client: Client,
    db: Database,
}

/// `url` with any password masked, for messages.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_string() };
    let rest = &url[scheme_end..];
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..host_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme_end], &rest[at..])
        }
        None => url.to_string(),
    }
}

impl MongoStore {
    /// Connects to `url`, which must name a replica set (`replicaSet=`; `mongodb+srv://` may
    /// bring it in its TXT record).
    pub async fn open(url: &str) -> Result<Self> {
        let mut opts = ClientOptions::parse(url).await?;
        if opts.repl_set_name.is_none() {
            return Err(StoreError::NeedsReplicaSet(redact_url(url)));
        }
        if opts.app_name.is_none() {
            opts.app_name = Some("luna-server".into());
        }
        let name = opts.default_database.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(opts)?;
        let db = client.database(&name);
        // Fail here, naming the server, rather than at the first request.
        db.run_command(doc! { "ping": 1 }).await?;
        let store = MongoStore { client, db };
        store.create_collections().await?;
        Ok(store)
    }

    /// The database this store lives in.
    pub fn database_name(&self) -> &str {
        self.db.name()
    }

    /// Creates the collections up front: servers before 4.4 cannot create one inside a
    /// transaction.
    async fn create_collections(&self) -> Result<()> {
        const NAMESPACE_EXISTS: i32 = 48;
        let existing = self.db.list_collection_names().await?;
        for c in Collection::ALL {
            let name = format!("{PREFIX}{}", c.as_str());
            if existing.contains(&name) {
                continue;
            }
            match self.db.create_collection(&name).await {
                Ok(()) => {}
                // Another server created it meanwhile.
                Err(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == NAMESPACE_EXISTS) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The MongoDB collection of a luna collection.
    fn coll(&self, c: Collection) -> mongodb::Collection<Document> {
        self.db.collection(&format!("{PREFIX}{}", c.as_str()))
    }

    /// Runs the batch as transactions until one commits, a conflict is found, or the attempts
    /// are used up.
    async fn commit_batch(&self, writes: &[Write]) -> Result<()> {
        let mut session = self.client.start_session().await?;
        let mut attempt = 0;
        'transaction: loop {
            attempt += 1;
            session.start_transaction().write_concern(WriteConcern::majority()).await?;
            if let Err(e) = self.apply(&mut session, writes).await {
                // Best effort: the server aborts it anyway when the session ends.
                let _ = session.abort_transaction().await;
                match e {
                    Failure::Transient(e) if attempt < MAX_ATTEMPTS => {
                        tracing::debug!(attempt, error = %e, "store transaction re-run");
                        backoff(attempt).await;
                        continue 'transaction;
                    }
                    Failure::Transient(e) | Failure::Other(e) => return Err(e),
                }
            }
            let mut commits = 0;
            loop {
                commits += 1;
                match session.commit_transaction().await {
                    Ok(()) => return Ok(()),
                    Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && commits < MAX_ATTEMPTS => {
                        tracing::debug!(commits, error = %e, "store commit re-sent");
                        backoff(commits).await;
                    }
                    Err(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR) && attempt < MAX_ATTEMPTS => {
                        tracing::debug!(attempt, error = %e, "store transaction re-run after commit");
                        backoff(attempt).await;
                        continue 'transaction;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    /// The body of one transaction (see the module doc).
    async fn apply(&self, session: &mut ClientSession, writes: &[Write]) -> Result<(), Failure> {
        let revs = self.current_revs(session, writes).await?;
        if let Some(conflict) = first_conflict(writes, &revs) {
            return Err(Failure::Other(conflict));
        }
        #[derive(Default)]
        struct Group<'a> {
            deletes: Vec<(&'a str, u64)>,
            /// Updates (put with `Rev`) and checks of existing records: (key, rev, new doc).
            updates: Vec<(&'a str, u64, Option<String>)>,
            inserts: Vec<Document>,
            placeholders: Vec<&'a str>,
        }
        let mut groups: BTreeMap<Collection, Group> = BTreeMap::new();
        for w in writes {
            let (c, key, expect) = w.target();
            let g = groups.entry(c).or_default();
            match (w, expect) {
                (Write::Put { doc, .. }, Expect::Absent) => {
                    g.inserts.push(doc! { "_id": key, "rev": 1_i64, "doc": doc.to_string() })
                }
                (Write::Put { doc, .. }, Expect::Rev(r)) => g.updates.push((key, r, Some(doc.to_string()))),
                (Write::Check { .. }, Expect::Rev(r)) => g.updates.push((key, r, None)),
                (Write::Check { .. }, Expect::Absent) => {
                    g.inserts.push(doc! { "_id": key, "rev": 0_i64, "doc": "" });
                    g.placeholders.push(key);
                }
                (Write::Delete { .. }, Expect::Rev(r)) => g.deletes.push((key, r)),
                // Checked above, and there is nothing to delete.
                (Write::Delete { .. }, Expect::Absent) => {}
            }
        }
        for (c, g) in groups {
            let coll = self.coll(c);
            for chunk in g.deletes.chunks(KEYS_PER_QUERY) {
                let deletes: Vec<Document> =
                    chunk.iter().map(|(k, r)| doc! { "q": { "_id": *k, "rev": *r as i64 }, "limit": 1 }).collect();
                let cmd = doc! { "delete": coll.name(), "deletes": deletes, "ordered": true };
                self.bulk(session, cmd, chunk.len(), "delete").await?;
            }
            let mut start = 0;
            while start < g.updates.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < g.updates.len() && end - start < KEYS_PER_QUERY && bytes < UPDATE_COMMAND_BYTES {
                    bytes += g.updates[end].0.len() + g.updates[end].2.as_ref().map_or(0, String::len) + 64;
                    end += 1;
                }
                let updates: Vec<Document> = g.updates[start..end]
                    .iter()
                    .map(|(k, r, doc)| {
                        let set = match doc {
                            Some(d) => doc! { "rev": *r as i64 + 1, "doc": d },
                            None => doc! { "chk": ObjectId::new() },
                        };
                        doc! { "q": { "_id": *k, "rev": *r as i64 }, "u": { "$set": set } }
                    })
                    .collect();
                let cmd = doc! { "update": coll.name(), "updates": updates, "ordered": true };
                self.bulk(session, cmd, end - start, "update").await?;
                start = end;
            }
            for chunk in g.inserts.chunks(KEYS_PER_QUERY) {
                match coll.insert_many(chunk).session(&mut *session).await {
                    Ok(_) => {}
                    // Someone created the record after our snapshot: the next attempt sees it
                    // and reports the conflict.
                    Err(e) if is_duplicate_key(&e) => return Err(Failure::Transient(e.into())),
                    Err(e) => return Err(Failure::from_mongo(e)),
                }
            }
            for chunk in g.placeholders.chunks(KEYS_PER_QUERY) {
                coll.delete_many(doc! { "_id": { "$in": chunk }, "rev": 0_i64 })
                    .session(&mut *session)
                    .await
                    .map_err(Failure::from_mongo)?;
            }
        }
        Ok(())
    }

    /// Runs a bulk `update` or `delete` command in the transaction; every statement must have
    /// matched exactly one record.
    async fn bulk(&self, session: &mut ClientSession, cmd: Document, want: usize, what: &str) -> Result<(), Failure> {
        let reply = self.db.run_command(cmd).session(&mut *session).await.map_err(Failure::from_mongo)?;
        let failed = |detail: String| mongodb::error::Error::custom(format!("{what} in {}: {detail}", self.db.name()));
        if let Some(Bson::Array(errs)) = reply.get("writeErrors") {
            if !errs.is_empty() {
                return Err(Failure::Other(failed(format!("write errors {errs:?}")).into()));
            }
        }
        let n = int(reply.get("n")).unwrap_or(-1);
        if n != want as i64 {
            // The expectations held in our snapshot, so a record changed after it: a write
            // conflict the server did not label. Re-run: the next snapshot names the record.
            return Err(Failure::Transient(failed(format!("{n} of {want} records matched")).into()));
        }
        Ok(())
    }

    /// Current revision of every record the batch names, read in the transaction.
    async fn current_revs(
        &self,
        session: &mut ClientSession,
        writes: &[Write],
    ) -> Result<HashMap<(Collection, String), u64>, Failure> {
        let mut by_coll: BTreeMap<Collection, Vec<&str>> = BTreeMap::new();
        for w in writes {
            let (c, k, _) = w.target();
            by_coll.entry(c).or_default().push(k);
        }
        let mut out = HashMap::new();
        for (c, keys) in by_coll {
            for chunk in keys.chunks(KEYS_PER_QUERY) {
                let mut cursor = self
                    .coll(c)
                    .find(doc! { "_id": { "$in": chunk } })
                    .projection(doc! { "rev": 1 })
                    .session(&mut *session)
                    .await
                    .map_err(Failure::from_mongo)?;
                let docs: Vec<Document> =
                    cursor.stream(&mut *session).try_collect().await.map_err(Failure::from_mongo)?;
                for d in &docs {
                    let key = d.get_str("_id").map_err(|_| {
                        Failure::Other(StoreError::Corrupt {
                            collection: c,
                            key: format!("{:?}", d.get("_id")),
                            reason: "_id is not a string".into(),
                        })
                    })?;
                    let rev = int(d.get("rev")).filter(|r| *r > 0).ok_or_else(|| {
                        Failure::Other(StoreError::Corrupt {
                            collection: c,
                            key: key.to_string(),
                            reason: "rev is not a positive integer".into(),
                        })
                    })?;
                    out.insert((c, key.to_string()), rev as u64);
                }
            }
        }
        Ok(out)
    }
}

/// Why one attempt of a transaction failed.
enum Failure {
    /// Worth re-running the whole transaction.
    Transient(StoreError),
    Other(StoreError),
}

impl Failure {
    fn from_mongo(e: mongodb::error::Error) -> Self {
        if e.contains_label(TRANSIENT_TRANSACTION_ERROR) {
            Failure::Transient(e.into())
        } else {
            Failure::Other(e.into())
        }
    }
}

async fn backoff(attempt: u32) {
    let base = FIRST_BACKOFF.saturating_mul(1 << attempt.min(10)).min(MAX_BACKOFF);
    let jitter = Duration::from_micros(rand::random::<u64>() % (base.as_micros() as u64 + 1));
    tokio::time::sleep(base / 2 + jitter / 2).await;
}

/// An integer field, whatever width the server chose to store it in.
fn int(b: Option<&Bson>) -> Option<i64> {
    match b {
        Some(Bson::Int32(v)) => Some(i64::from(*v)),
        Some(Bson::Int64(v)) => Some(*v),
        Some(Bson::Double(v)) if v.fract() == 0.0 => Some(*v as i64),
        _ => None,
    }
}

fn is_duplicate_key(e: &mongodb::error::Error) -> bool {
    const DUPLICATE_KEY: i32 = 11000;
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => {
            m.write_concern_error.is_none()
                && m.write_errors.as_ref().is_some_and(|w| !w.is_empty() && w.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => false,
    }
}

fn describe(rev: Option<u64>) -> String {
    rev.map_or_else(|| "absent".to_string(), |r| format!("rev {r}"))
}

fn decode(collection: Collection, d: &Document) -> Result<Record> {
    let key = match d.get("_id") {
        Some(Bson::String(k)) => k.clone(),
        other => {
            return Err(StoreError::Corrupt {
                collection,
                key: format!("{other:?}"),
                reason: "_id is not a string".into(),
            })
        }
    };
    let corrupt = |reason: String| StoreError::Corrupt { collection, key: key.clone(), reason };
    let rev = int(d.get("rev")).filter(|r| *r > 0).ok_or_else(|| corrupt("rev is not a positive integer".into()))?;
    let text = d.get_str("doc").map_err(|_| corrupt("doc is not a string".into()))?;
    let doc = serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    Ok(Record { collection, key, rev: rev as u64, doc })
}

/// The first write whose expectation `revs` (current revision per record) contradicts.
fn first_conflict(writes: &[Write], revs: &HashMap<(Collection, String), u64>) -> Option<StoreError> {
    writes.iter().find_map(|w| {
        let (collection, key, expect) = w.target();
        let current = revs.get(&(collection, key.to_string())).copied();
        let ok = match expect {
            Expect::Absent => current.is_none(),
            Expect::Rev(r) => current == Some(r),
        };
        (!ok).then(|| StoreError::Conflict {
            collection,
            key: key.to_string(),
            expected: describe(match expect {
                Expect::Absent => None,
                Expect::Rev(r) => Some(r),
            }),
            found: describe(current),
        })
    })
}

#[async_trait::async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        let d = self.coll(collection).find_one(doc! { "_id": key }).await?;
        d.map(|d| decode(collection, &d)).transpose()
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        // A range on the primary key, the same bounds as the SQLite backend.
        let upper = format!("{prefix}\u{10FFFF}");
        let docs: Vec<Document> = self
            .coll(collection)
            .find(doc! { "_id": { "$gte": prefix, "$lt": upper } })
            .sort(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        docs.iter().map(|d| decode(collection, d)).collect()
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        self.commit_batch(&writes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(c: Collection, k: &str, expect: Expect, doc: serde_json::Value) -> Write {
        Write::Put { collection: c, key: k.into(), expect, doc }
    }

    #[test]
    fn conflicts_name_the_first_mismatch_in_batch_order() {
        let mut revs = HashMap::new();
        revs.insert((Collection::Claim, "b".to_string()), 3);
        let writes = vec![
            put(Collection::Claim, "a", Expect::Absent, json!(1)),
            Write::Check { collection: Collection::Claim, key: "x".into(), expect: Expect::Absent },
            put(Collection::Claim, "b", Expect::Rev(2), json!(1)),
            put(Collection::Claim, "c", Expect::Rev(1), json!(1)),
        ];
        match first_conflict(&writes, &revs) {
            Some(StoreError::Conflict { key, expected, found, .. }) => {
                assert_eq!((key.as_str(), expected.as_str(), found.as_str()), ("b", "rev 2", "rev 3"));
            }
            other => panic!("expected a conflict on b, got {other:?}"),
        }
    }

    #[test]
    fn io_errors_are_not_duplicate_keys() {
        let io = mongodb::error::Error::from(std::io::Error::other("reset"));
        assert!(!is_duplicate_key(&io));
    }

    #[test]
    fn passwords_are_masked_in_urls() {
        assert_eq!(redact_url("mongodb://luna:s3cret@h1,h2/luna?x=1"), "mongodb://luna:***@h1,h2/luna?x=1");
        assert_eq!(redact_url("mongodb://h1/luna"), "mongodb://h1/luna");
        assert_eq!(redact_url("mongodb+srv://u:p@c.example/"), "mongodb+srv://u:***@c.example/");
    }

    #[tokio::test]
    async fn standalone_urls_are_refused() {
        // Refused before any connection is made: nothing listens there.
        for url in ["mongodb://127.0.0.1:1/luna", "mongodb://luna:s3cret@127.0.0.1:1/luna?w=majority"] {
            match MongoStore::open(url).await {
                Err(e @ StoreError::NeedsReplicaSet(_)) => {
                    let msg = e.to_string();
                    assert!(msg.contains("replicaSet") && msg.contains("transaction"), "{msg}");
                    assert!(!msg.contains("s3cret"), "the password leaked: {msg}");
                }
                Err(e) => panic!("{url}: wanted NeedsReplicaSet, got {e}"),
                Ok(_) => panic!("{url}: a standalone url was accepted"),
            }
        }
    }
    /// Several stores (as several luna-servers would have) share one database: contending
    /// claims have exactly one winner, and counters incremented from every store lose nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn separate_clients_do_not_lose_updates() {
        use crate::store::conformance::{mongo_gate, NxServer};
        use std::sync::Arc;
        let Some(bin) = mongo_gate() else { return };
        let server = NxServer::start(&bin).await.expect("nx-27017 starts");
        let url = server.url("multi");
        let mut stores = Vec::new();
        for _ in 0..4 {
            stores.push(Arc::new(MongoStore::open(&url).await.expect("open")));
        }
        stores[0].commit(vec![put(Collection::Meta, "counter", Expect::Absent, json!(0))]).await.expect("seed");
        let mut tasks = Vec::new();
        for (i, store) in stores.iter().cycle().take(8).enumerate() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let claim = put(Collection::Claim, "mac/ff", Expect::Absent, json!({"owner": i}));
                let won = store.commit(vec![claim]).await.is_ok();
                for _ in 0..10 {
                    loop {
                        let cur = store.get(Collection::Meta, "counter").await.expect("get").expect("counter");
                        let next = json!(cur.doc.as_i64().expect("number") + 1);
                        match store.commit(vec![put(Collection::Meta, "counter", Expect::Rev(cur.rev), next)]).await {
                            Ok(()) => break,
                            Err(StoreError::Conflict { .. }) => continue,
                            Err(e) => panic!("commit failed: {e}"),
                        }
                    }
                }
                won
            }));
        }
        let mut winners = 0;
        for t in tasks {
            winners += usize::from(t.await.expect("task"));
        }
        assert_eq!(winners, 1);
        let counter = stores[1].get(Collection::Meta, "counter").await.expect("get").expect("counter");
        assert_eq!((counter.doc, counter.rev), (json!(80), 81));
    }
}
