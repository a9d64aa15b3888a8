//! A read-through, write-through cache of point reads in front of a store this process alone
//! writes (the embedded sqlite file). The boot path (DHCP, iPXE scripts) reads the same few
//! records (the cluster, a MAC's claim, its node, group, network, osimage) for every packet and
//! request; here a repeated read is a hash lookup and a reference count instead of a database
//! round trip (and, through [`Store::get_shared`], without copying the document).
//!
//! Invariant: a `get` never returns a record older than the last `commit` that returned before
//! the `get` started. How:
//! - a commit that succeeded puts what it wrote into the cache (write-through): a put's new
//!   revision follows from its expectation (`Absent` → 1, `Rev(n)` → n + 1, the store's rule),
//!   a delete is cached as absent; a commit that failed drops the keys it named (an error need
//!   not mean nothing was written);
//! - commits are numbered (`epoch`), and every key remembers the number of the last commit that
//!   touched it; a read that missed fills the cache only if no commit touching *that key*
//!   finished while it read (else it might store what that commit replaced). Commits of other
//!   keys (the boot path's constant node status writes) no longer keep reads from filling.
//!
//! Lists are not cached. Not for MongoDB: other servers write there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Collection, Expect, Record, Result, Store, Write};

/// Keys remembered at most; the cache starts over when full (the boot path's working set is a
/// few records per node).
const MAX_ENTRIES: usize = 200_000;

struct Entry {
    /// `None`: not cached (a read must go to the store). `Some(None)`: known to be absent.
    value: Option<Option<Arc<Record>>>,
    /// The epoch of the last commit that named this key.
    written: u64,
}

#[derive(Default)]
struct State {
    /// Per collection, so a lookup borrows the key instead of allocating one.
    entries: HashMap<Collection, HashMap<String, Entry>>,
    len: usize,
    /// Commits finished so far.
    epoch: u64,
    /// The epoch at which the cache last started over: what was written before is forgotten,
    /// so a read that started earlier must not fill.
    cleared: u64,
}

impl State {
    fn entry(&mut self, collection: Collection, key: &str) -> &mut Entry {
        let map = self.entries.entry(collection).or_default();
        if !map.contains_key(key) {
            self.len += 1;
            map.insert(key.to_string(), Entry { value: None, written: 0 });
        }
        map.get_mut(key).expect("inserted above")
    }

    fn make_room(&mut self) {
        if self.len >= MAX_ENTRIES {
            self.entries.clear();
            self.len = 0;
            self.cleared = self.epoch;
        }
    }
}

pub struct CachedStore<S> {
    inner: S,
    state: Mutex<State>,
    /// Commits run one at a time here, so they update the cache in the order the store applied
    /// them (the sqlite store has one connection: nothing is lost by it).
    commits: tokio::sync::Mutex<()>,
}

impl<S: Store> CachedStore<S> {
    pub fn new(inner: S) -> Self {
        CachedStore { inner, state: Mutex::new(State::default()), commits: tokio::sync::Mutex::new(()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read(&self, collection: Collection, key: &str) -> Result<Option<Arc<Record>>> {
        let start = {
            let st = self.lock();
            if let Some(v) = st.entries.get(&collection).and_then(|m| m.get(key)).and_then(|e| e.value.as_ref()) {
                return Ok(v.clone());
            }
            st.epoch
        };
        let read = self.inner.get(collection, key).await?.map(Arc::new);
        let mut st = self.lock();
        let raced = st.entries.get(&collection).and_then(|m| m.get(key)).is_some_and(|e| e.written > start);
        if !raced && start >= st.cleared {
            st.make_room();
            st.entry(collection, key).value = Some(read.clone());
        }
        Ok(read)
    }
}

#[async_trait::async_trait]
impl<S: Store> Store for CachedStore<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        Ok(self.read(collection, key).await?.map(|r| (*r).clone()))
    }

    async fn get_shared(&self, collection: Collection, key: &str) -> Result<Option<Arc<Record>>> {
        self.read(collection, key).await
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        self.inner.list(collection, prefix).await
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        // What the cache will hold for each key if the commit succeeds (`None`: a check, which
        // writes nothing).
        let after: Vec<(Collection, String, Option<Option<Arc<Record>>>)> = writes
            .iter()
            .map(|w| match w {
                Write::Put { collection, key, expect, doc } => {
                    let rev = match expect {
                        Expect::Absent => 1,
                        Expect::Rev(r) => r + 1,
                    };
                    let rec = Record { collection: *collection, key: key.clone(), rev, doc: doc.clone() };
                    (*collection, key.clone(), Some(Some(Arc::new(rec))))
                }
                Write::Delete { collection, key, .. } => (*collection, key.clone(), Some(None)),
                // A check changes nothing: a successful one leaves the cache as it is.
                Write::Check { collection, key, .. } => (*collection, key.clone(), None),
            })
            .collect();
        let _one_at_a_time = self.commits.lock().await;
        let result = self.inner.commit(writes).await;
        let mut st = self.lock();
        st.epoch += 1;
        let epoch = st.epoch;
        st.make_room();
        for (collection, key, rec) in after {
            match (rec, result.is_ok()) {
                (Some(rec), true) => {
                    let e = st.entry(collection, &key);
                    e.written = epoch;
                    e.value = Some(rec);
                }
                // A check that held: nothing was written, a concurrent read may still fill.
                (None, true) => {}
                // After a failure every key the batch named is dropped: an error need not mean
                // nothing was written (a lost connection), and a failed check means this
                // process read something older than the store holds.
                (_, false) => {
                    let e = st.entry(collection, &key);
                    e.written = epoch;
                    e.value = None;
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use serde_json::json;

    fn put(key: &str, expect: Expect, v: i64) -> Write {
        Write::Put { collection: Collection::Meta, key: key.into(), expect, doc: json!({ "v": v }) }
    }

    /// The raw store behind the cache, to see what a cached answer hides.
    fn raw(s: &CachedStore<SqliteStore>) -> &SqliteStore {
        &s.inner
    }

    #[tokio::test]
    async fn commits_write_through_with_the_stores_revisions() {
        let s = CachedStore::new(SqliteStore::open(":memory:").unwrap());
        s.commit(vec![put("a", Expect::Absent, 1), put("b", Expect::Absent, 1)]).await.unwrap();
        s.commit(vec![put("a", Expect::Rev(1), 2)]).await.unwrap();
        // Served from the cache (no read happened yet) and equal to what the store holds.
        let cached = s.get_shared(Collection::Meta, "a").await.unwrap().unwrap();
        assert_eq!((cached.rev, &cached.doc), (2, &json!({"v": 2})));
        assert_eq!(Some((*cached).clone()), raw(&s).get(Collection::Meta, "a").await.unwrap());
        // The same shared record until the next write.
        let again = s.get_shared(Collection::Meta, "a").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&cached, &again));
        s.commit(vec![Write::Delete { collection: Collection::Meta, key: "b".into(), expect: Expect::Rev(1) }])
            .await
            .unwrap();
        assert_eq!(s.get(Collection::Meta, "b").await.unwrap(), None);
        // Re-created after a delete: revision 1 again, as the store says.
        s.commit(vec![put("b", Expect::Absent, 3)]).await.unwrap();
        let b = s.get(Collection::Meta, "b").await.unwrap();
        assert_eq!(b, raw(&s).get(Collection::Meta, "b").await.unwrap());
        assert_eq!(b.map(|r| r.rev), Some(1));
    }

    #[tokio::test]
    async fn a_failed_commit_drops_the_keys_it_named() {
        let s = CachedStore::new(SqliteStore::open(":memory:").unwrap());
        s.commit(vec![put("a", Expect::Absent, 1)]).await.unwrap();
        assert!(s.get(Collection::Meta, "a").await.unwrap().is_some());
        // Written behind the cache's back (stands in for "the failed commit did write").
        raw(&s).commit(vec![put("a", Expect::Rev(1), 5)]).await.unwrap();
        let conflict = s.commit(vec![put("a", Expect::Rev(1), 9), put("x", Expect::Absent, 1)]).await;
        assert!(conflict.is_err());
        let a = s.get(Collection::Meta, "a").await.unwrap().unwrap();
        assert_eq!((a.rev, a.doc), (2, json!({"v": 5})));
        assert_eq!(s.get(Collection::Meta, "x").await.unwrap(), None);
    }

    #[tokio::test]
    async fn checks_keep_the_cache_and_a_failed_one_drops_the_key() {
        let s = CachedStore::new(SqliteStore::open(":memory:").unwrap());
        s.commit(vec![put("a", Expect::Absent, 1)]).await.unwrap();
        let before = s.get_shared(Collection::Meta, "a").await.unwrap().unwrap();
        let check = |expect| Write::Check { collection: Collection::Meta, key: "a".into(), expect };
        s.commit(vec![check(Expect::Rev(1)), put("b", Expect::Absent, 2)]).await.unwrap();
        // A check that held wrote nothing: the same shared record, same revision.
        let after = s.get_shared(Collection::Meta, "a").await.unwrap().unwrap();
        assert!(Arc::ptr_eq(&before, &after));
        assert_eq!(after.rev, 1);
        // Written behind the cache's back: the cached record is now stale, and a check of it
        // fails in the store...
        raw(&s).commit(vec![put("a", Expect::Rev(1), 5)]).await.unwrap();
        assert!(s.commit(vec![check(Expect::Rev(1))]).await.is_err());
        // ...which drops the key, so the next read sees what the store holds.
        let a = s.get(Collection::Meta, "a").await.unwrap().unwrap();
        assert_eq!((a.rev, a.doc), (2, json!({"v": 5})));
    }

    /// A store whose reads pause after reading until released, to interleave a commit.
    struct Gated {
        inner: SqliteStore,
        read_done: tokio::sync::Notify,
        release: tokio::sync::Notify,
    }

    #[async_trait::async_trait]
    impl Store for Gated {
        fn backend(&self) -> &'static str {
            "gated"
        }
        async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
            let got = self.inner.get(collection, key).await;
            self.read_done.notify_one();
            self.release.notified().await;
            got
        }
        async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
            self.inner.list(collection, prefix).await
        }
        async fn commit(&self, writes: Vec<Write>) -> Result<()> {
            self.inner.commit(writes).await
        }
    }

    /// Reads `key` (a miss) and commits `during` between the read and the fill.
    async fn read_across_commit(key: &str, during: Write) -> (Arc<CachedStore<Gated>>, Option<Record>) {
        let gated = Gated {
            inner: SqliteStore::open(":memory:").unwrap(),
            read_done: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        };
        gated.inner.commit(vec![put("a", Expect::Absent, 1)]).await.unwrap();
        let s = Arc::new(CachedStore::new(gated));
        let reader = {
            let (s, key) = (s.clone(), key.to_string());
            tokio::spawn(async move { s.get(Collection::Meta, &key).await.unwrap() })
        };
        s.inner.read_done.notified().await;
        s.commit(vec![during]).await.unwrap();
        s.inner.release.notify_one();
        let read = reader.await.unwrap();
        (s, read)
    }

    fn cached(s: &CachedStore<Gated>, key: &str) -> Option<Option<Arc<Record>>> {
        s.lock().entries.get(&Collection::Meta).and_then(|m| m.get(key)).and_then(|e| e.value.clone())
    }

    #[tokio::test]
    async fn reads_fill_despite_commits_of_other_keys() {
        // The old global epoch refused this fill; the boot path's status writes made most
        // reads miss that way.
        let (s, read) = read_across_commit("a", put("b", Expect::Absent, 1)).await;
        assert_eq!(read.map(|r| r.doc), Some(json!({"v": 1})));
        assert!(cached(&s, "a").is_some(), "the read filled the cache");
    }

    #[tokio::test]
    async fn a_read_racing_a_commit_of_its_key_does_not_fill() {
        let (s, read) = read_across_commit("a", put("a", Expect::Rev(1), 2)).await;
        // The read saw the old record (it returned before the commit)…
        assert_eq!(read.map(|r| r.doc), Some(json!({"v": 1})));
        // …and did not replace the commit's record in the cache.
        assert_eq!(cached(&s, "a").flatten().map(|r| r.doc.clone()), Some(json!({"v": 2})));
        let now = s.get(Collection::Meta, "a").await.unwrap().unwrap();
        assert_eq!((now.rev, now.doc), (2, json!({"v": 2})));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_and_commits_never_see_an_older_record() {
        let s = Arc::new(CachedStore::new(SqliteStore::open(":memory:").unwrap()));
        s.commit(vec![put("k", Expect::Absent, 0)]).await.unwrap();
        for v in 1..200i64 {
            // Drop the cached value so readers go to sqlite while the commit runs.
            s.lock().entries.get_mut(&Collection::Meta).unwrap().get_mut("k").unwrap().value = None;
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    let s = s.clone();
                    tokio::spawn(async move { s.get(Collection::Meta, "k").await.unwrap() })
                })
                .collect();
            s.commit(vec![put("k", Expect::Rev(v as u64), v)]).await.unwrap();
            let got = s.get(Collection::Meta, "k").await.unwrap().unwrap();
            assert_eq!(got.doc, json!({ "v": v }), "stale record after commit {v}");
            for r in readers {
                r.await.unwrap();
            }
            let got = s.get(Collection::Meta, "k").await.unwrap().unwrap();
            assert_eq!(got.doc, json!({ "v": v }), "a racing read filled a stale record at {v}");
        }
    }
}
