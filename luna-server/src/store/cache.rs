//! A read-through cache of point reads in front of a store this process alone writes (the
//! embedded sqlite file). The boot path (DHCP, iPXE scripts) reads the same few records (the
//! cluster, a MAC's claim, its node, group, network, osimage) for every packet and request;
//! here a repeated read is a hash lookup instead of a database round trip.
//!
//! Invariant: a `get` never returns a record older than the last `commit` that returned before
//! the `get` started. Every commit drops the keys it wrote and bumps an epoch; a read that
//! missed fills the cache only if no commit finished while it read (else it might store what
//! that commit replaced). Lists are not cached. Not for MongoDB: other servers write there.

use std::collections::HashMap;
use std::sync::Mutex;

use super::{Collection, Record, Result, Store, Write};

/// Entries kept at most; the cache starts over when full (the boot path's working set is a
/// few records per node).
const MAX_ENTRIES: usize = 200_000;

type Key = (Collection, String);

#[derive(Default)]
struct State {
    /// `None`: known to be absent.
    entries: HashMap<Key, Option<Record>>,
    /// Commits finished so far.
    epoch: u64,
}

pub struct CachedStore<S> {
    inner: S,
    state: Mutex<State>,
}

impl<S: Store> CachedStore<S> {
    pub fn new(inner: S) -> Self {
        CachedStore { inner, state: Mutex::new(State::default()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait::async_trait]
impl<S: Store> Store for CachedStore<S> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn get(&self, collection: Collection, key: &str) -> Result<Option<Record>> {
        let k = (collection, key.to_string());
        let epoch = {
            let st = self.lock();
            if let Some(hit) = st.entries.get(&k) {
                return Ok(hit.clone());
            }
            st.epoch
        };
        let read = self.inner.get(collection, key).await?;
        let mut st = self.lock();
        if st.epoch == epoch {
            if st.entries.len() >= MAX_ENTRIES {
                st.entries.clear();
            }
            st.entries.insert(k, read.clone());
        }
        Ok(read)
    }

    async fn list(&self, collection: Collection, prefix: &str) -> Result<Vec<Record>> {
        self.inner.list(collection, prefix).await
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<()> {
        let keys: Vec<Key> = writes
            .iter()
            .map(|w| {
                let (c, k, _) = w.target();
                (c, k.to_string())
            })
            .collect();
        let result = self.inner.commit(writes).await;
        // Also after a failure: an error need not mean nothing was written (a lost connection).
        let mut st = self.lock();
        for k in &keys {
            st.entries.remove(k);
        }
        st.epoch += 1;
        result
    }
}
