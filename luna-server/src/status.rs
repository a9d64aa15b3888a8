//! Group commit of node status updates from the boot path (DHCP offered/acked, script served,
//! kernel fetched).
//!
//! Hundreds of nodes booting at once each report several steps within a second; one store
//! transaction per report made the status writes, not the answers, the limit of DHCP and HTTP
//! boot. Here reports queue per node (a newer report replaces an older one not yet written)
//! and one writer commits everything queued as one batch, then the next round. The boot path
//! does not wait for its round ([`StatusQueue::enqueue`]): the status is in the store within
//! about one round (at most [`MAX_PAUSE`] plus the commit) after the answer went out. A caller
//! that needs "answered implies recorded" waits ([`StatusQueue::record`]).
//!
//! After a round of `n` reports the writer pauses `n ×` [`PAUSE_PER_REPORT`] (at most
//! [`MAX_PAUSE`]), so under a storm of reports more of them coalesce per node and the store
//! sees a bounded number of writes per second; a lone report is written at once.
//!
//! A status is its own record ([`Collection::Status`], keyed by node name), never part of the
//! node document, so reports do not change the node's revision and never make an admin's
//! change of the node conflict. It is written as a compare-and-swap on the status record's
//! revision (`Absent` for the first); a status changed meanwhile (an agent's direct report, a
//! node deleted or renamed with its status) is re-read and the round retried, a node deleted
//! meanwhile is skipped, and a report equal to the stored status (same step, message and
//! second) is not written again. A report superseded by a direct status write
//! ([`StatusQueue::forget`]) while its round is being written is dropped from the round.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::future::join_all;
use luna_core::model::{Kind, NodeStatus};
use tokio::sync::{watch, Notify};

use crate::store::{Collection, Expect, Store, StoreError, Write};

/// Rounds retried after a conflicting concurrent change before the round's reports are dropped.
const MAX_ATTEMPTS: u32 = 8;
/// The writer's pause after a round, per report it wrote.
pub const PAUSE_PER_REPORT: Duration = Duration::from_micros(200);
/// The longest pause between rounds.
pub const MAX_PAUSE: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Pending {
    statuses: HashMap<String, NodeStatus>,
    /// Nodes whose status was written directly since the writer took its round.
    superseded: HashSet<String>,
    /// The number of the round that will take what is queued now.
    round: u64,
    writer: bool,
}

/// The queue and its writer task (started on first use, inside the caller's runtime).
pub struct StatusQueue {
    pending: Mutex<Pending>,
    wake: Notify,
    /// The last round committed (or given up on).
    done: watch::Sender<u64>,
}

impl Default for StatusQueue {
    fn default() -> Self {
        StatusQueue {
            pending: Mutex::new(Pending { round: 1, ..Pending::default() }),
            wake: Notify::new(),
            done: watch::channel(0).0,
        }
    }
}

impl StatusQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `status` for `node` and returns the round that will write it; starts the writer
    /// if it is not running. Needs a tokio runtime.
    pub fn enqueue(self: &Arc<Self>, store: &Arc<dyn Store>, node: &str, status: NodeStatus) -> u64 {
        let (round, start) = {
            let mut p = self.lock();
            match p.statuses.get_mut(node) {
                Some(s) => *s = status,
                None => {
                    p.statuses.insert(node.to_string(), status);
                }
            }
            let start = !p.writer;
            p.writer = true;
            (p.round, start)
        };
        if start {
            tokio::spawn(writer(Arc::downgrade(self), store.clone()));
        }
        self.wake.notify_one();
        round
    }

    /// Queues `status` for `node` and waits until it is committed.
    pub async fn record(self: &Arc<Self>, store: &Arc<dyn Store>, node: &str, status: NodeStatus) {
        let round = self.enqueue(store, node, status);
        self.wait(round).await;
    }

    /// Waits until `round` is committed (or given up on).
    pub async fn wait(&self, round: u64) {
        let mut done = self.done.subscribe();
        // Err only when the queue is gone, and then there is nothing left to wait for.
        let _ = done.wait_for(|d| *d >= round).await;
    }

    /// Waits until everything queued so far is committed (or given up on).
    pub async fn flush(&self) {
        let round = {
            let p = self.lock();
            // Nothing queued: the round being written, if any, is the last one to wait for.
            if p.statuses.is_empty() {
                p.round - 1
            } else {
                p.round
            }
        };
        self.wait(round).await;
    }

    /// Drops a queued report for `node`, and the one being written if any: a status written
    /// directly is newer than both.
    pub fn forget(&self, node: &str) {
        let mut p = self.lock();
        p.statuses.remove(node);
        p.superseded.insert(node.to_string());
    }

    fn superseded(&self, node: &str) -> bool {
        self.lock().superseded.contains(node)
    }
}

async fn writer(queue: Weak<StatusQueue>, store: Arc<dyn Store>) {
    loop {
        let (batch, round) = {
            let Some(q) = queue.upgrade() else { return };
            let notified = q.wake.notified();
            tokio::pin!(notified);
            // Registers interest before looking, so a report queued in between still wakes us.
            notified.as_mut().enable();
            let taken = {
                let mut p = q.lock();
                let batch = std::mem::take(&mut p.statuses);
                p.superseded.clear();
                let round = p.round;
                if !batch.is_empty() {
                    p.round += 1;
                }
                (batch, round)
            };
            if taken.0.is_empty() {
                // Wake up now and then to notice the queue is gone.
                let _ = tokio::time::timeout(Duration::from_secs(5), notified).await;
                continue;
            }
            taken
        };
        let n = batch.len();
        if let Err(e) = write(store.as_ref(), &queue, &batch).await {
            tracing::warn!(nodes = n, error = %e, "cannot record node status");
        }
        let Some(q) = queue.upgrade() else { return };
        q.done.send_replace(round);
        drop(q);
        let pause = PAUSE_PER_REPORT.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX)).min(MAX_PAUSE);
        if n > 1 {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Writes every status in one batch, retrying the whole round on a concurrent change.
async fn write(
    store: &dyn Store,
    queue: &Weak<StatusQueue>,
    batch: &HashMap<String, NodeStatus>,
) -> Result<(), StoreError> {
    let (node, col) = (Collection::Object(Kind::Node), Collection::Status);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let reads = batch.iter().map(|(name, status)| async move {
            let (exists, held) = tokio::join!(store.get_shared(node, name), store.get_shared(col, name));
            let held = held?;
            Ok::<_, StoreError>(exists?.map(|_| (name, held, status)))
        });
        let mut writes = Vec::with_capacity(batch.len());
        for read in join_all(reads).await {
            // A node deleted meanwhile has no status to keep.
            let Some((name, held, status)) = read? else { continue };
            if queue.upgrade().is_some_and(|q| q.superseded(name)) {
                continue;
            }
            let doc = serde_json::to_value(status).map_err(|e| StoreError::Corrupt {
                collection: col,
                key: name.clone(),
                reason: e.to_string(),
            })?;
            if held.as_ref().is_some_and(|h| h.doc == doc) {
                // Already recorded (same step, message and second).
                continue;
            }
            let expect = held.map_or(Expect::Absent, |h| Expect::Rev(h.rev));
            writes.push(Write::Put { collection: col, key: name.clone(), expect, doc });
        }
        if writes.is_empty() {
            return Ok(());
        }
        match store.commit(writes).await {
            Err(StoreError::Conflict { .. }) if attempt < MAX_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(u64::from(attempt))).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;
    use luna_core::model::{AnyObject, Node};

    fn status(step: &str, msg: &str) -> NodeStatus {
        NodeStatus { step: step.into(), progress: None, time: 1, message: Some(msg.into()) }
    }

    async fn store_with(nodes: &[&str]) -> Arc<dyn Store> {
        let s: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:").unwrap());
        let writes = nodes
            .iter()
            .map(|n| Write::Put {
                collection: Collection::Object(Kind::Node),
                key: n.to_string(),
                expect: Expect::Absent,
                doc: serde_json::to_value(Node::new(n, "compute")).unwrap(),
            })
            .collect();
        s.commit(writes).await.unwrap();
        s
    }

    async fn status_of(s: &dyn Store, name: &str) -> Option<NodeStatus> {
        let rec = s.get(Collection::Status, name).await.unwrap()?;
        Some(serde_json::from_value(rec.doc).unwrap())
    }

    #[tokio::test]
    async fn recorded_status_is_in_the_store_when_record_returns() {
        let s = store_with(&["n1", "n2"]).await;
        let q = Arc::new(StatusQueue::default());
        q.record(&s, "n1", status("ipxe", "boot script served")).await;
        assert_eq!(status_of(s.as_ref(), "n1").await, Some(status("ipxe", "boot script served")));
        assert_eq!(status_of(s.as_ref(), "n2").await, None);
        let rev = rev_of(s.as_ref(), "n1").await;
        // Many concurrent reports: each waiter returns with its node written.
        let waits = (0..50).map(|i| {
            let (q, s) = (q.clone(), s.clone());
            async move {
                let node = if i % 2 == 0 { "n1" } else { "n2" };
                q.record(&s, node, status("dhcp", &format!("report {i}"))).await;
                assert!(status_of(s.as_ref(), node).await.is_some_and(|st| st.step == "dhcp"));
            }
        });
        join_all(waits).await;
        let after = rev_of(s.as_ref(), "n1").await;
        // Coalesced: far fewer writes of n1 than its 25 reports.
        assert!(after > rev && after - rev < 25, "revision went from {rev} to {after}");
        // The node itself was never written.
        assert_eq!(s.get(Collection::Object(Kind::Node), "n1").await.unwrap().unwrap().rev, 1);
    }

    #[tokio::test]
    async fn newest_report_wins_and_deleted_nodes_are_skipped() {
        let s = store_with(&["n1"]).await;
        let q = Arc::new(StatusQueue::default());
        q.enqueue(&s, "gone", status("dhcp", "dhcp offered 10.0.0.9"));
        q.enqueue(&s, "n1", status("dhcp", "dhcp offered 10.0.0.1"));
        q.record(&s, "n1", status("dhcp", "dhcp acked 10.0.0.1")).await;
        assert_eq!(status_of(s.as_ref(), "n1").await, Some(status("dhcp", "dhcp acked 10.0.0.1")));
        assert!(s.get(Collection::Object(Kind::Node), "gone").await.unwrap().is_none());
        assert!(s.get(Collection::Status, "gone").await.unwrap().is_none());
        // forget() drops what is still queued (the writer cannot run before the next await on
        // this single-threaded test runtime).
        q.enqueue(&s, "n1", status("dhcp", "dhcp offered 10.0.0.1"));
        q.forget("n1");
        assert!(!q.lock().statuses.contains_key("n1"));
        q.record(&s, "gone", status("dhcp", "dhcp acked 10.0.0.9")).await;
        assert_eq!(status_of(s.as_ref(), "n1").await, Some(status("dhcp", "dhcp acked 10.0.0.1")));
    }

    /// The revision of `name`'s status record.
    async fn rev_of(s: &dyn Store, name: &str) -> u64 {
        s.get(Collection::Status, name).await.unwrap().unwrap().rev
    }

    #[tokio::test]
    async fn an_unchanged_status_is_not_written_again() {
        let s = store_with(&["n1"]).await;
        let q = Arc::new(StatusQueue::default());
        q.record(&s, "n1", status("ipxe", "boot script served")).await;
        let rev = rev_of(s.as_ref(), "n1").await;
        // Same step, message and second: nothing to write.
        q.record(&s, "n1", status("ipxe", "boot script served")).await;
        assert_eq!(rev_of(s.as_ref(), "n1").await, rev);
        // Anything different is written, and the node is left alone.
        q.record(&s, "n1", status("kernel", "kernel fetched")).await;
        assert_eq!(rev_of(s.as_ref(), "n1").await, rev + 1);
        assert_eq!(status_of(s.as_ref(), "n1").await, Some(status("kernel", "kernel fetched")));
        let rec = s.get(Collection::Object(Kind::Node), "n1").await.unwrap().unwrap();
        let AnyObject::Node(n) = AnyObject::from_value(Kind::Node, rec.doc).unwrap() else { unreachable!() };
        assert_eq!((n.group.as_str(), n.status, rec.rev), ("compute", None, 1));
    }

    #[tokio::test]
    async fn a_report_superseded_during_its_round_is_dropped() {
        let s = store_with(&["n1", "n2"]).await;
        let q = Arc::new(StatusQueue::default());
        let queue = Arc::downgrade(&q);
        let batch: HashMap<String, NodeStatus> =
            [("n1".to_string(), status("dhcp", "old")), ("n2".to_string(), status("dhcp", "old"))].into();
        // The round was taken, then n1's status was written directly.
        q.forget("n1");
        write(s.as_ref(), &queue, &batch).await.unwrap();
        assert_eq!(status_of(s.as_ref(), "n1").await, None);
        assert_eq!(status_of(s.as_ref(), "n2").await, Some(status("dhcp", "old")));
    }

    #[tokio::test]
    async fn enqueued_reports_reach_the_store_without_anyone_waiting() {
        let s = store_with(&["n1", "n2", "n3"]).await;
        let q = Arc::new(StatusQueue::default());
        for n in ["n1", "n2", "n3"] {
            q.enqueue(&s, n, status("dhcp", "offered"));
        }
        let last = q.enqueue(&s, "n1", status("dhcp", "acked"));
        // Possibly a later round than the first ones, which is written after the pause.
        q.wait(last).await;
        assert_eq!(status_of(s.as_ref(), "n1").await, Some(status("dhcp", "acked")));
        assert_eq!(status_of(s.as_ref(), "n3").await, Some(status("dhcp", "offered")));
        // flush() waits for what is queued, and returns at once when nothing is.
        q.enqueue(&s, "n2", status("dhcp", "acked"));
        q.flush().await;
        assert_eq!(status_of(s.as_ref(), "n2").await, Some(status("dhcp", "acked")));
        tokio::time::timeout(Duration::from_secs(1), q.flush()).await.expect("nothing left to wait for");
        tokio::time::timeout(Duration::from_secs(1), StatusQueue::default().flush()).await.expect("an unused queue");
    }
}
