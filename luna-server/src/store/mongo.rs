//! The MongoDB store (production, HA): several luna-servers may share one database.
//!
//! # Layout
//! - Database: the path of the URL (`mongodb://h1,h2/luna?replicaSet=rs0`), `luna` when empty.
//! - One MongoDB collection per [`Collection`], named `luna_` + [`Collection::as_str`]
//!   (`luna_node`, `luna_claim`, …); a record is `{_id: key, rev: <int64>, doc: <string>}`. The
//!   prefix keeps luna's data apart from anything else in the database (the old Python luna
//!   used bare `node`, `group`, … collections) and dodges nx-27017's refusal of SQL keywords
//!   such as `group` as collection names. The document is kept as its JSON text, not as BSON: BSON cannot hold a u64
//!   above `i64::MAX`, older servers refuse field names with `.` or a leading `$`, and a
//!   JSON→BSON→JSON trip may turn integers into floats. luna only ever looks records up by key,
//!   so nothing is lost by the server not seeing inside documents, and the text is the same as
//!   the SQLite backend's.
//! - `luna_meta_lock` holds one document, `_id: "write"`: the cluster-wide write lock and the
//!   journal of the batch being applied. `luna_meta_journal` holds the chunks of journals too
//!   big to inline.
//!
//! # Atomic, compare-and-swap batches without multi-document transactions
//! Standalone servers (and nx-27017, the wire-compatible server the tests use) have no
//! transactions, so `commit` uses only single-document atomic operations (MongoDB >= 4.4):
//! 1. An optimistic expectation check without any lock (batches of up to 256 writes, again
//!    after queueing behind a local writer): revisions never go back, so a mismatch seen there
//!    is a real change and the batch fails at once, without taking the lock.
//! 2. Within one process callers queue on a tokio mutex; across processes the lock document is
//!    taken with `find_one_and_update({_id, owner: null})` (or `insert_one` when it does not exist
//!    yet; a duplicate-key error just means someone else won). The holder gets a fresh random
//!    `token` and bumps `beat` every `ttl / 4` from a heartbeat task. A waiter that sees the
//!    same `(token, beat)` for a whole `ttl` (default 30 s) of its own monotonic clock takes the
//!    lock over with a compare-and-swap on that pair. No wall clocks are compared, so clock skew
//!    between servers cannot break the lock.
//! 3. The new holder first replays a journal left by a holder that died (see 6).
//! 4. Every `Expect` is checked against the records (bulk `$in` reads) while holding the lock;
//!    on a mismatch the lock is released and nothing was written.
//! 5. The commit point: the batch's final states (`rev` and `doc` per put, deletes) are written
//!    into the lock document with an update filtered on our `token`. Small journals (< 1 MiB)
//!    are inlined; bigger ones are first inserted as `luna_meta_journal` chunks (< 4 MiB each) and the
//!    lock document then names the batch and its chunk count. Before the commit point nothing
//!    is visible; after it the batch is committed even if this process dies.
//! 6. The journal is applied idempotently: deletes are `delete_many({_id: {$in}})`, creations
//!    `insert_many` (on replay only the missing ones), updates replacement upserts with the
//!    final `rev`/`doc`, up to a thousand per `update` command. Then the chunks are deleted and the lock
//!    released with the journal cleared in one update. A journal naming more chunks than exist
//!    was already applied (chunks are deleted only after applying) and is just cleared.
//!
//! A process that hits an error after the commit point leaves the lock held (its own next
//! commit takes it over at once, others after `ttl`), so the batch is finished by replay and
//! never left half done; the caller sees the error, as with any commit whose outcome the network
//! hid. Readers (`get`, `list`) do not take the lock: during the milliseconds a batch is being
//! applied they may see part of it, but no writer can act on that, because every `Expect` is
//! re-checked after replay under the lock. A holder paused for longer than `ttl` in the middle of
//! applying (it checks between bulk steps whether its heartbeat noticed a takeover) could still
//! land one stale bulk step after the new holder; a 30 s stall inside one bulk operation is
//! what that takes.
//!
//! nx-27017 notes: a replacement upsert there ignores the filter's `_id`, so replacement
//! documents always carry `_id` themselves (also valid on MongoDB); small integers come back as
//! int32, so every integer is read through [`int`]; dates are not compared (none are used).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, ReturnDocument};
use mongodb::{Client, Database};
use serde::{Deserialize, Serialize};

use super::{Collection, Expect, Record, Result, Store, StoreError, Write};

/// How long a silent lock holder is waited for before its lock is taken over.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(30);
/// Every MongoDB collection luna uses starts with this.
const PREFIX: &str = "luna_";
const LOCK_COLLECTION: &str = "luna_meta_lock";
const JOURNAL_COLLECTION: &str = "luna_meta_journal";
const LOCK_ID: &str = "write";
const DEFAULT_DATABASE: &str = "luna";
/// Journals up to this size (estimated) live inside the lock document.
const INLINE_JOURNAL_BYTES: usize = 1 << 20;
/// Size of one `meta_journal` chunk, far below the 16 MiB document limit.
const CHUNK_BYTES: usize = 4 << 20;
/// Keys per `$in` query / per bulk insert.
const KEYS_PER_QUERY: usize = 1000;
/// Bytes of replacements per `update` command, far below the 16 MiB command limit.
const UPDATE_COMMAND_BYTES: usize = 8 << 20;
/// Batches up to this many writes get the optimistic check before queueing for the lock.
const PRECHECK_MAX_WRITES: usize = 256;

pub struct MongoStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Who holds the lock, for operators reading `meta_lock`: host/pid/random.
    owner: String,
    lock_ttl: Duration,
    /// Local writers queue here instead of polling the lock document.
    local: tokio::sync::Mutex<()>,
    /// Lock tokens this process gave up after an error past the commit point: it may take them
    /// over at once instead of waiting for them to go stale.
    abandoned: std::sync::Mutex<HashSet<String>>,
}

/// One journal entry: the final state of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    /// Collection name.
    c: String,
    k: String,
    /// Final revision of a put; `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rev: Option<i64>,
    /// Final document (JSON text) of a put; `None` for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    doc: Option<String>,
    /// The record did not exist before the batch: applied as an insert.
    #[serde(default)]
    created: bool,
}

impl Entry {
    fn size(&self) -> usize {
        self.c.len() + self.k.len() + self.doc.as_ref().map_or(0, String::len) + 64
    }
}

/// The lock while this process holds it.
struct Held {
    token: String,
    /// The journal found in the lock document when it was taken (to replay).
    journal: Option<Document>,
    /// Set by the heartbeat when the lock document no longer carries our token.
    lost: Arc<AtomicBool>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Held {
    fn lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// What the lock-holding part of a commit asks the caller to do next.
enum Step {
    Done,
    /// The lock was lost before the commit point: nothing was written, start over.
    Retry,
    /// The lock was lost after the commit point: the batch is committed, wait until whoever
    /// holds the lock now has finished applying it.
    Settle,
}

impl MongoStore {
    /// Connects to `url` and replays a journal a crashed writer left behind.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with_lock_ttl(url, DEFAULT_LOCK_TTL).await
    }

    /// As [`MongoStore::open`], with a chosen lock expiry (tests use a short one).
    pub async fn open_with_lock_ttl(url: &str, lock_ttl: Duration) -> Result<Self> {
        let mut opts = ClientOptions::parse(url).await?;
        if opts.app_name.is_none() {
            opts.app_name = Some("luna-server".into());
        }
        let name = opts.default_database.clone().filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATABASE.into());
        let client = Client::with_options(opts)?;
        let db = client.database(&name);
        // Fail here, naming the server, rather than at the first request.
        db.run_command(doc! { "ping": 1 }).await?;
        let store = MongoStore {
            inner: Arc::new(Inner {
                db,
                owner: owner_id(),
                lock_ttl: lock_ttl.max(Duration::from_millis(40)),
                local: tokio::sync::Mutex::new(()),
                abandoned: std::sync::Mutex::new(HashSet::new()),
            }),
        };
        store.recover().await?;
        Ok(store)
    }

    /// The database this store lives in.
    pub fn database_name(&self) -> &str {
        self.inner.db.name()
    }

    /// Finishes a batch a crashed writer committed but did not apply, if there is one.
    pub async fn recover(&self) -> Result<()> {
        let lock = self.inner.db.collection::<Document>(LOCK_COLLECTION).find_one(doc! { "_id": LOCK_ID }).await?;
        let pending = lock.is_some_and(|d| matches!(d.get("journal"), Some(Bson::Document(_))));
        if pending {
            let inner = self.inner.clone();
            spawn(async move { inner.settle().await }).await?;
        }
        Ok(())
    }
}

/// Runs `f` to completion even if the caller is cancelled: a commit abandoned halfway would keep
/// the lock until it goes stale.
async fn spawn<T: Send + 'static>(f: impl std::future::Future<Output = Result<T>> + Send + 'static) -> Result<T> {
    tokio::spawn(f).await.map_err(|e| StoreError::Task(e.to_string()))?
}

fn owner_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
    format!("{host}/{}/{:08x}", std::process::id(), rand::random::<u32>())
}

fn new_token() -> String {
    format!("{:032x}", rand::random::<u128>())
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

fn journal_corrupt(reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        collection: Collection::Meta,
        key: format!("{LOCK_COLLECTION}/{LOCK_ID} journal"),
        reason: reason.into(),
    }
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

fn record_doc(e: &Entry) -> Document {
    doc! { "_id": &e.k, "rev": e.rev.unwrap_or(1), "doc": e.doc.clone().unwrap_or_default() }
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

/// The journal of a batch whose expectations hold: every record's final state.
fn entries(writes: &[Write], revs: &HashMap<(Collection, String), u64>) -> Vec<Entry> {
    writes
        .iter()
        .map(|w| {
            let (collection, key, _) = w.target();
            let current = revs.get(&(collection, key.to_string())).copied();
            match w {
                Write::Put { doc, .. } => Entry {
                    c: collection.as_str().to_string(),
                    k: key.to_string(),
                    rev: Some(current.unwrap_or(0) as i64 + 1),
                    doc: Some(doc.to_string()),
                    created: current.is_none(),
                },
                Write::Delete { .. } => Entry {
                    c: collection.as_str().to_string(),
                    k: key.to_string(),
                    rev: None,
                    doc: None,
                    created: false,
                },
            }
        })
        .collect()
}

fn to_bson_entries(entries: &[Entry]) -> Result<Vec<Bson>> {
    entries
        .iter()
        .map(|e| {
            mongodb::bson::to_bson(e)
                .map_err(|err| journal_corrupt(format!("cannot encode entry for '{}': {err}", e.k)))
        })
        .collect()
}

fn parse_entries(arr: &[Bson]) -> Result<Vec<Entry>> {
    arr.iter()
        .map(|b| mongodb::bson::from_bson::<Entry>(b.clone()).map_err(|e| journal_corrupt(e.to_string())))
        .collect()
}

impl Inner {
    fn lock_coll(&self) -> mongodb::Collection<Document> {
        self.db.collection(LOCK_COLLECTION)
    }

    fn journal_coll(&self) -> mongodb::Collection<Document> {
        self.db.collection(JOURNAL_COLLECTION)
    }

    /// The MongoDB collection of a luna collection (by [`Collection::as_str`] name).
    fn coll(&self, name: &str) -> mongodb::Collection<Document> {
        self.db.collection(&format!("{PREFIX}{name}"))
    }

    /// Current revision of every record the batch names (absent ones are missing).
    async fn current_revs(&self, writes: &[Write]) -> Result<HashMap<(Collection, String), u64>> {
        let mut by_coll: BTreeMap<Collection, Vec<&str>> = BTreeMap::new();
        for w in writes {
            let (c, k, _) = w.target();
            by_coll.entry(c).or_default().push(k);
        }
        let mut out = HashMap::new();
        for (c, keys) in by_coll {
            for chunk in keys.chunks(KEYS_PER_QUERY) {
                let docs: Vec<Document> = self
                    .coll(c.as_str())
                    .find(doc! { "_id": { "$in": chunk } })
                    .projection(doc! { "rev": 1 })
                    .await?
                    .try_collect()
                    .await?;
                for d in &docs {
                    let key = d.get_str("_id").map_err(|_| StoreError::Corrupt {
                        collection: c,
                        key: format!("{:?}", d.get("_id")),
                        reason: "_id is not a string".into(),
                    })?;
                    let rev = int(d.get("rev")).filter(|r| *r > 0).ok_or_else(|| StoreError::Corrupt {
                        collection: c,
                        key: key.to_string(),
                        reason: "rev is not a positive integer".into(),
                    })?;
                    out.insert((c, key.to_string()), rev as u64);
                }
            }
        }
        Ok(out)
    }

    /// Takes the cluster-wide write lock, waiting for (or taking over from) other holders.
    async fn acquire(&self) -> Result<Held> {
        let lock = self.lock_coll();
        let token = new_token();
        let mut backoff = Duration::from_millis(1);
        // The holder state we keep seeing, and since when (our monotonic clock).
        let mut seen: Option<((Bson, Bson), Instant)> = None;
        loop {
            let taken = lock
                .find_one_and_update(
                    doc! { "_id": LOCK_ID, "owner": Bson::Null },
                    doc! { "$set": { "owner": &self.owner, "token": &token, "beat": 0_i64 } },
                )
                .return_document(ReturnDocument::After)
                .await?;
            if let Some(d) = taken {
                return Ok(self.held(token, &d));
            }
            match lock.find_one(doc! { "_id": LOCK_ID }).await? {
                None => {
                    let d = doc! { "_id": LOCK_ID, "owner": &self.owner, "token": &token, "beat": 0_i64, "journal": Bson::Null };
                    match lock.insert_one(&d).await {
                        Ok(_) => return Ok(self.held(token, &d)),
                        Err(e) if is_duplicate_key(&e) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(cur) if !matches!(cur.get("owner"), None | Some(Bson::Null)) => {
                    // Watch the holder's (token, beat) exactly as stored, whatever their types,
                    // so that even a hand-edited lock document can go stale and be taken over.
                    let state = (
                        cur.get("token").cloned().unwrap_or(Bson::Null),
                        cur.get("beat").cloned().unwrap_or(Bson::Null),
                    );
                    let stale = match &seen {
                        Some((s, since)) if *s == state => since.elapsed() >= self.lock_ttl,
                        _ => {
                            seen = Some((state.clone(), Instant::now()));
                            false
                        }
                    };
                    let holder = state.0.as_str().unwrap_or_default().to_string();
                    let ours = self.abandoned.lock().map(|a| a.contains(&holder)).unwrap_or(false);
                    if stale || ours {
                        let taken = lock
                            .find_one_and_update(
                                doc! { "_id": LOCK_ID, "token": state.0.clone(), "beat": state.1.clone() },
                                doc! { "$set": { "owner": &self.owner, "token": &token, "beat": 0_i64 } },
                            )
                            .return_document(ReturnDocument::After)
                            .await?;
                        if let Some(d) = taken {
                            if let Ok(mut a) = self.abandoned.lock() {
                                a.remove(&holder);
                            }
                            if !ours {
                                tracing::warn!(
                                    previous = cur.get_str("owner").unwrap_or("?"),
                                    ttl = ?self.lock_ttl,
                                    "took over the store write lock from a silent holder"
                                );
                            }
                            return Ok(self.held(token, &d));
                        }
                    }
                }
                // Freed between our two reads: try again.
                Some(_) => {}
            }
            let jitter = Duration::from_micros(rand::random::<u64>() % 1000);
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    fn held(&self, token: String, lock_doc: &Document) -> Held {
        let journal = match lock_doc.get("journal") {
            Some(Bson::Document(j)) => Some(j.clone()),
            _ => None,
        };
        let lost = Arc::new(AtomicBool::new(false));
        let heartbeat = {
            let lock = self.lock_coll();
            let token = token.clone();
            let lost = lost.clone();
            let every = self.lock_ttl / 4;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match lock
                        .update_one(doc! { "_id": LOCK_ID, "token": &token }, doc! { "$inc": { "beat": 1_i64 } })
                        .await
                    {
                        Ok(r) if r.matched_count == 0 => {
                            tracing::warn!("the store write lock was taken over while this server held it");
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "could not renew the store write lock"),
                    }
                }
            })
        };
        Held { token, journal, lost, heartbeat }
    }

    /// Frees the lock (clearing an applied journal). Losing it meanwhile is fine: whoever took it
    /// replays what we committed, which is idempotent.
    async fn release(&self, held: Held) -> Result<()> {
        // A renewal landing after the release would report a takeover that never happened.
        held.heartbeat.abort();
        let r = self
            .lock_coll()
            .update_one(
                doc! { "_id": LOCK_ID, "token": &held.token },
                doc! { "$set": { "owner": Bson::Null, "token": Bson::Null, "beat": 0_i64, "journal": Bson::Null } },
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                self.abandon(held);
                Err(e.into())
            }
        }
    }

    /// Releases a lock that holds no journal, after a failure before the commit point.
    async fn release_after_error(&self, held: Held, err: StoreError) -> StoreError {
        held.heartbeat.abort();
        let filter = doc! { "_id": LOCK_ID, "token": &held.token, "journal": Bson::Null };
        let clear = doc! { "$set": { "owner": Bson::Null, "token": Bson::Null, "beat": 0_i64 } };
        if self.lock_coll().update_one(filter, clear).await.is_err() {
            self.abandon(held);
        }
        err
    }

    /// Leaves the lock held so that the next holder replays the journal; this process may take
    /// it over at once.
    fn abandon(&self, held: Held) {
        if let Ok(mut a) = self.abandoned.lock() {
            a.insert(held.token.clone());
        }
    }

    /// Applies and clears the journal found when the lock was taken. `Ok(false)`: lock lost.
    async fn replay(&self, held: &mut Held) -> Result<bool> {
        let Some(j) = held.journal.take() else { return Ok(true) };
        let batch = j.get_str("batch").map_err(|_| journal_corrupt("no batch id"))?.to_string();
        let mut chunked = false;
        let entries = if let Ok(arr) = j.get_array("writes") {
            Some(parse_entries(arr)?)
        } else {
            chunked = true;
            let n = int(j.get("chunks")).ok_or_else(|| journal_corrupt("neither writes nor chunks"))?;
            let docs: Vec<Document> =
                self.journal_coll().find(doc! { "batch": &batch }).sort(doc! { "seq": 1 }).await?.try_collect().await?;
            if docs.len() as i64 == n {
                let mut all = Vec::new();
                for (i, d) in docs.iter().enumerate() {
                    if int(d.get("seq")) != Some(i as i64) {
                        return Err(journal_corrupt(format!("chunk {i} of batch {batch} is missing")));
                    }
                    all.extend(parse_entries(
                        d.get_array("writes").map_err(|_| journal_corrupt("chunk without writes"))?,
                    )?);
                }
                Some(all)
            } else {
                // Chunks are deleted only once the batch is applied.
                None
            }
        };
        if let Some(entries) = entries {
            tracing::info!(batch, writes = entries.len(), "replaying the store journal a crashed writer left");
            if !self.apply(&entries, true, &held.lost).await? {
                return Ok(false);
            }
        }
        if chunked {
            self.journal_coll().delete_many(doc! { "batch": &batch }).await?;
        }
        let r = self
            .lock_coll()
            .update_one(doc! { "_id": LOCK_ID, "token": &held.token }, doc! { "$set": { "journal": Bson::Null } })
            .await?;
        Ok(r.matched_count == 1)
    }

    /// Writes the final states. `replay`: some may already be in place. `Ok(false)`: stopped
    /// because the lock was lost (the new holder finishes the job).
    async fn apply(&self, entries: &[Entry], replay: bool, lost: &AtomicBool) -> Result<bool> {
        #[derive(Default)]
        struct Group<'a> {
            deletes: Vec<&'a str>,
            creates: Vec<&'a Entry>,
            updates: Vec<&'a Entry>,
        }
        let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
        for e in entries {
            let g = groups.entry(e.c.as_str()).or_default();
            match (&e.doc, e.created) {
                (None, _) => g.deletes.push(&e.k),
                (Some(_), true) => g.creates.push(e),
                (Some(_), false) => g.updates.push(e),
            }
        }
        for (name, g) in groups {
            if Collection::from_name(name).is_none() {
                return Err(journal_corrupt(format!("unknown collection '{name}'")));
            }
            let coll = self.coll(name);
            for keys in g.deletes.chunks(KEYS_PER_QUERY) {
                if lost.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                coll.delete_many(doc! { "_id": { "$in": keys } }).await?;
            }
            for chunk in g.creates.chunks(KEYS_PER_QUERY) {
                if lost.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                let mut todo: Vec<&Entry> = chunk.to_vec();
                if replay {
                    let keys: Vec<&str> = chunk.iter().map(|e| e.k.as_str()).collect();
                    let present: HashSet<String> = coll
                        .find(doc! { "_id": { "$in": keys } })
                        .projection(doc! { "_id": 1 })
                        .await?
                        .try_collect::<Vec<Document>>()
                        .await?
                        .into_iter()
                        .filter_map(|d| d.get_str("_id").ok().map(str::to_string))
                        .collect();
                    todo.retain(|e| !present.contains(&e.k));
                }
                if todo.is_empty() {
                    continue;
                }
                match coll.insert_many(todo.iter().map(|e| record_doc(e))).await {
                    Ok(_) => {}
                    // A replay racing a holder that had not yet noticed losing the lock.
                    Err(e) if replay && is_duplicate_key(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let mut start = 0;
            while start < g.updates.len() {
                if lost.load(Ordering::SeqCst) {
                    return Ok(false);
                }
                let mut end = start;
                let mut bytes = 0;
                while end < g.updates.len() && end - start < KEYS_PER_QUERY && bytes < UPDATE_COMMAND_BYTES {
                    bytes += g.updates[end].size();
                    end += 1;
                }
                self.replace_many(name, &g.updates[start..end]).await?;
                start = end;
            }
        }
        Ok(true)
    }

    /// Upserts the final state of existing records, many per round trip: the `update` command
    /// with one statement per record is the wire protocol's own bulk write, on every server
    /// version (the driver's `Client::bulk_write` needs MongoDB 8). Replacements carry `_id`.
    async fn replace_many(&self, name: &str, entries: &[&Entry]) -> Result<()> {
        let coll = format!("{PREFIX}{name}");
        let updates: Vec<Document> =
            entries.iter().map(|e| doc! { "q": { "_id": &e.k }, "u": record_doc(e), "upsert": true }).collect();
        let reply = self.db.run_command(doc! { "update": &coll, "updates": updates, "ordered": false }).await?;
        let failed = |what: &str, detail: &dyn std::fmt::Debug| {
            StoreError::Mongo(mongodb::error::Error::custom(format!("update of {coll} failed: {what} {detail:?}")))
        };
        match reply.get("writeErrors") {
            Some(Bson::Array(errs)) if !errs.is_empty() => return Err(failed("write errors", errs)),
            _ => {}
        }
        if let Some(wce) = reply.get("writeConcernError") {
            return Err(failed("write concern error", wce));
        }
        let n = int(reply.get("n")).unwrap_or(-1);
        if n != entries.len() as i64 {
            return Err(failed("records written:", &n));
        }
        Ok(())
    }

    /// Takes the lock only to replay a leftover journal.
    async fn settle(&self) -> Result<()> {
        let _local = self.local.lock().await;
        loop {
            let mut held = self.acquire().await?;
            match self.replay(&mut held).await {
                Ok(true) => return self.release(held).await,
                Ok(false) => continue,
                Err(e) => {
                    self.abandon(held);
                    return Err(e);
                }
            }
        }
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        // Optimistic: a record already changed is a conflict whoever holds the lock (revisions
        // never go back). Big batches skip it: they rarely conflict and the check reads a lot.
        let precheck = writes.len() <= PRECHECK_MAX_WRITES;
        if precheck {
            self.precheck(&writes).await?;
        }
        let _local = match self.local.try_lock() {
            Ok(guard) => guard,
            Err(_) => {
                let guard = self.local.lock().await;
                // Whoever we queued behind may have changed our records.
                if precheck {
                    self.precheck(&writes).await?;
                }
                guard
            }
        };
        loop {
            let mut held = self.acquire().await?;
            match self.replay(&mut held).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    self.abandon(held);
                    return Err(e);
                }
            }
            match self.commit_locked(held, &writes).await? {
                Step::Done => return Ok(()),
                Step::Retry => continue,
                Step::Settle => {
                    drop(_local);
                    return self.settle().await;
                }
            }
        }
    }

    async fn precheck(&self, writes: &[Write]) -> Result<()> {
        let revs = self.current_revs(writes).await?;
        first_conflict(writes, &revs).map_or(Ok(()), Err)
    }

    async fn commit_locked(&self, held: Held, writes: &[Write]) -> Result<Step> {
        let revs = match self.current_revs(writes).await {
            Ok(r) => r,
            Err(e) => return Err(self.release_after_error(held, e).await),
        };
        if let Some(conflict) = first_conflict(writes, &revs) {
            return Err(self.release_after_error(held, conflict).await);
        }
        let entries = entries(writes, &revs);
        let size: usize = entries.iter().map(Entry::size).sum();
        let batch = new_token();
        let journal = if size <= INLINE_JOURNAL_BYTES {
            match to_bson_entries(&entries) {
                Ok(w) => doc! { "batch": &batch, "writes": w },
                Err(e) => return Err(self.release_after_error(held, e).await),
            }
        } else {
            match self.write_chunks(&batch, &entries).await {
                Ok(n) => doc! { "batch": &batch, "chunks": n },
                Err(e) => return Err(self.release_after_error(held, e).await),
            }
        };
        if held.lost() {
            return Ok(Step::Retry);
        }
        // The commit point.
        match self
            .lock_coll()
            .update_one(doc! { "_id": LOCK_ID, "token": &held.token }, doc! { "$set": { "journal": journal } })
            .await
        {
            Ok(r) if r.matched_count == 1 => {}
            Ok(_) => return Ok(Step::Retry),
            Err(e) => {
                self.abandon(held);
                return Err(e.into());
            }
        }
        match self.apply(&entries, false, &held.lost).await {
            Ok(true) => {}
            Ok(false) => return Ok(Step::Settle),
            Err(e) => {
                self.abandon(held);
                return Err(e);
            }
        }
        if size > INLINE_JOURNAL_BYTES {
            if let Err(e) = self.journal_coll().delete_many(doc! { "batch": &batch }).await {
                self.abandon(held);
                return Err(e.into());
            }
        }
        self.release(held).await?;
        Ok(Step::Done)
    }

    /// Stores a big journal as `luna_meta_journal` chunks; returns their number.
    async fn write_chunks(&self, batch: &str, entries: &[Entry]) -> Result<i64> {
        let coll = self.journal_coll();
        // We hold the lock and no journal is pending, so any chunk there is an orphan of a
        // writer that died before its commit point.
        coll.delete_many(doc! {}).await?;
        let mut seq = 0_i64;
        let mut start = 0;
        while start < entries.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < entries.len() && (end == start || bytes + entries[end].size() <= CHUNK_BYTES) {
                bytes += entries[end].size();
                end += 1;
            }
            let writes = to_bson_entries(&entries[start..end])?;
            coll.insert_one(doc! { "_id": format!("{batch}/{seq}"), "batch": batch, "seq": seq, "writes": writes })
                .await?;
            seq += 1;
            start = end;
        }
        Ok(seq)
    }
}

#[async_trait::async_trait]
impl Store for MongoStore {
    fn backend(&self) -> &'static str {
        "mongodb"
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        let d = self.inner.coll(collection.as_str()).find_one(doc! { "_id": key }).await?;
        d.map(|d| decode(collection, &d)).transpose()
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        // A range on the primary key, the same bounds as the SQLite backend.
        let upper = format!("{prefix}\u{10FFFF}");
        let docs: Vec<Document> = self
            .inner
            .coll(collection.as_str())
            .find(doc! { "_id": { "$gte": prefix, "$lt": upper } })
            .sort(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        docs.iter().map(|d| decode(collection, d)).collect()
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let inner = self.inner.clone();
        spawn(async move { inner.commit(writes).await }).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{mongo_gate, NxServer};
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
            put(Collection::Claim, "b", Expect::Rev(2), json!(1)),
            put(Collection::Claim, "c", Expect::Rev(1), json!(1)),
        ];
        match first_conflict(&writes, &revs) {
            Some(StoreError::Conflict { key, expected, found, .. }) => {
                assert_eq!((key.as_str(), expected.as_str(), found.as_str()), ("b", "rev 2", "rev 3"));
            }
            other => panic!("expected a conflict on b, got {other:?}"),
        }
        let e = entries(&writes, &revs);
        assert_eq!(e[0].rev, Some(1));
        assert!(e[0].created);
        assert_eq!(e[1].rev, Some(4));
        assert!(!e[1].created);
    }

    #[test]
    fn journal_entries_survive_bson() {
        let e = vec![
            Entry { c: "node".into(), k: "n.1".into(), rev: Some(7), doc: Some("{\"$a\":1}".into()), created: false },
            Entry { c: "claim".into(), k: "mac/aa".into(), rev: None, doc: None, created: false },
        ];
        let b = to_bson_entries(&e).expect("encodes");
        assert_eq!(parse_entries(&b).expect("decodes"), e);
    }

    #[test]
    fn io_errors_are_not_duplicate_keys() {
        let io = mongodb::error::Error::from(std::io::Error::other("reset"));
        assert!(!is_duplicate_key(&io));
    }

    /// A hand-made crash state: records, the lock document and journal chunks.
    async fn seed(db: &Database, lock: Document, chunks: Vec<Document>) {
        let nodes = db.collection::<Document>("luna_node");
        nodes
            .insert_many(vec![
                doc! { "_id": "upd", "rev": 1_i64, "doc": "\"old\"" },
                doc! { "_id": "del", "rev": 2_i64, "doc": "\"bye\"" },
            ])
            .await
            .expect("seed records");
        db.collection::<Document>(LOCK_COLLECTION).insert_one(lock).await.expect("seed lock");
        if !chunks.is_empty() {
            db.collection::<Document>(JOURNAL_COLLECTION).insert_many(chunks).await.expect("seed chunks");
        }
    }

    fn crash_batch() -> Vec<Entry> {
        vec![
            Entry { c: "node".into(), k: "upd".into(), rev: Some(2), doc: Some("\"new\"".into()), created: false },
            Entry { c: "node".into(), k: "del".into(), rev: None, doc: None, created: false },
            Entry {
                c: "claim".into(),
                k: "mac/01".into(),
                rev: Some(1),
                doc: Some("{\"owner\":\"upd\"}".into()),
                created: true,
            },
        ]
    }

    async fn assert_batch_applied(store: &MongoStore) {
        let upd = store.get(Collection::Object(luna_core::Kind::Node), "upd").await.expect("get").expect("upd exists");
        assert_eq!((upd.rev, upd.doc), (2, json!("new")));
        assert!(store.get(Collection::Object(luna_core::Kind::Node), "del").await.expect("get").is_none());
        let claim = store.get(Collection::Claim, "mac/01").await.expect("get").expect("claim exists");
        assert_eq!((claim.rev, claim.doc), (1, json!({"owner": "upd"})));
        let lock = store.inner.lock_coll().find_one(doc! { "_id": LOCK_ID }).await.expect("lock").expect("lock doc");
        assert_eq!(lock.get("journal"), Some(&Bson::Null), "journal cleared: {lock:?}");
        assert_eq!(lock.get("owner"), Some(&Bson::Null), "lock released: {lock:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leftover_journals_are_replayed() {
        let Some(bin) = mongo_gate() else { return };
        let server = NxServer::start(&bin).await.expect("nx-27017 starts");
        let client = Client::with_uri_str(server.url("admin")).await.expect("client");
        let dups = client.database("dups").collection::<Document>("luna_x");
        dups.insert_one(doc! { "_id": "a" }).await.expect("first insert");
        let one = dups.insert_one(doc! { "_id": "a" }).await.expect_err("duplicate insert_one");
        assert!(is_duplicate_key(&one), "{one}");
        let many =
            dups.insert_many(vec![doc! { "_id": "b" }, doc! { "_id": "a" }]).await.expect_err("duplicate insert_many");
        assert!(is_duplicate_key(&many), "{many}");
        let batch = to_bson_entries(&crash_batch()).expect("encode");

        // 1. Free lock with an inline journal (crash between release steps): replayed on open.
        let db = client.database("crash_inline");
        seed(
            &db,
            doc! { "_id": LOCK_ID, "owner": Bson::Null, "token": Bson::Null, "beat": 0_i64,
            "journal": { "batch": "b1", "writes": batch.clone() } },
            vec![],
        )
        .await;
        let store = MongoStore::open(&server.url("crash_inline")).await.expect("open replays");
        assert_batch_applied(&store).await;

        // 2. Lock held by a dead writer with a chunked journal: the next commit waits for the
        //    lock to go stale, takes it over, replays, then commits its own batch.
        let db = client.database("crash_chunked");
        let chunks = vec![
            doc! { "_id": "b2/0", "batch": "b2", "seq": 0_i64, "writes": batch[..2].to_vec() },
            doc! { "_id": "b2/1", "batch": "b2", "seq": 1_i64, "writes": batch[2..].to_vec() },
        ];
        let dead = doc! { "_id": LOCK_ID, "owner": "dead/1/0", "token": "t-dead", "beat": 5_i64,
        "journal": { "batch": "b2", "chunks": 2_i64 } };
        seed(&db, dead, chunks).await;
        let ttl = Duration::from_millis(300);
        let opening = Instant::now();
        // The lock is held, so open replays it too, after the lock went stale.
        let store = MongoStore::open_with_lock_ttl(&server.url("crash_chunked"), ttl).await.expect("open");
        assert!(opening.elapsed() >= ttl, "a live-looking lock must be waited for");
        assert_batch_applied(&store).await;
        let left = db.collection::<Document>(JOURNAL_COLLECTION).count_documents(doc! {}).await.expect("count");
        assert_eq!(left, 0, "journal chunks removed");
        store
            .commit(vec![put(Collection::Claim, "mac/02", Expect::Absent, json!({"owner": "x"}))])
            .await
            .expect("commit after recovery");

        // 3. A journal naming more chunks than exist was applied already: not applied again.
        let db = client.database("crash_applied");
        let applied = doc! { "_id": LOCK_ID, "owner": "dead/1/0", "token": "t-dead2", "beat": 0_i64,
        "journal": { "batch": "b3", "chunks": 2_i64 } };
        let one = vec![doc! { "_id": "b3/1", "batch": "b3", "seq": 1_i64, "writes": batch[2..].to_vec() }];
        seed(&db, applied, one).await;
        // Orphan chunks of a writer that died before its commit point are never applied.
        db.collection::<Document>(JOURNAL_COLLECTION)
            .insert_one(doc! { "_id": "b4/0", "batch": "b4", "seq": 0_i64, "writes": batch[..1].to_vec() })
            .await
            .expect("orphan");
        let store = MongoStore::open_with_lock_ttl(&server.url("crash_applied"), ttl).await.expect("open");
        let upd = store.get(Collection::Object(luna_core::Kind::Node), "upd").await.expect("get").expect("upd");
        assert_eq!(upd.rev, 1, "a finished batch must not be applied twice");
        assert!(store.get(Collection::Claim, "mac/01").await.expect("get").is_none());
        // The next chunked commit clears the orphans.
        let big: Vec<Write> = (0..300)
            .map(|i| put(Collection::Lease, &format!("l{i:03}"), Expect::Absent, json!("x".repeat(4096))))
            .collect();
        store.commit(big).await.expect("big commit");
        let left: Vec<Document> = db
            .collection::<Document>(JOURNAL_COLLECTION)
            .find(doc! {})
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("c");
        assert!(left.is_empty(), "orphans and own chunks removed: {left:?}");
        assert_eq!(store.list(Collection::Lease, "").await.expect("list").len(), 300);

        // 4. A hand-made lock document without token or beat still goes stale.
        let db = client.database("crash_odd");
        db.collection::<Document>(LOCK_COLLECTION)
            .insert_one(doc! { "_id": LOCK_ID, "owner": "someone" })
            .await
            .expect("lock");
        let store = MongoStore::open_with_lock_ttl(&server.url("crash_odd"), ttl).await.expect("open");
        let started = Instant::now();
        store.commit(vec![put(Collection::Lease, "l", Expect::Absent, json!(1))]).await.expect("commit");
        assert!(started.elapsed() >= ttl, "the odd lock was not waited for");
        assert_eq!(store.get(Collection::Lease, "l").await.expect("get").map(|r| r.rev), Some(1));
    }

    /// Several stores (as several luna-servers would have) share one database.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn separate_clients_do_not_lose_updates() {
        let Some(bin) = mongo_gate() else { return };
        let server = NxServer::start(&bin).await.expect("nx-27017 starts");
        let url = server.url("multi");
        let mut stores = Vec::new();
        for _ in 0..4 {
            stores.push(Arc::new(MongoStore::open_with_lock_ttl(&url, Duration::from_secs(5)).await.expect("open")));
        }
        stores[0].commit(vec![put(Collection::Meta, "counter", Expect::Absent, json!(0))]).await.expect("seed");
        let mut tasks = Vec::new();
        for (i, store) in stores.iter().cycle().take(8).enumerate() {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                // Contending claims from every server: exactly one may win.
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
