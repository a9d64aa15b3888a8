//! Decoded objects for the boot path: the DHCP server and the iPXE script read the same few
//! objects (cluster, node, group, network, osimage) for every packet and request, and decoding
//! their JSON each time cost more than the read itself.
//!
//! Invariant: an object handed out is exactly the decoding of the record the store returns
//! for that read (with the record's revision set). The decoded object is reused only while the
//! store hands out the *same* shared record (`Arc::ptr_eq` on [`Store::get_shared`]): the
//! cached sqlite store keeps one `Arc` per record until the record is written, so any write
//! (status included) is seen by the next read. A store that does not share records (MongoDB)
//! makes every read decode afresh, as before.
//!
//! A node comes with its status, which lives in its own record ([`Collection::Status`]): the
//! two point reads run together, and a node whose status alone changed reuses the decoded
//! node and decodes only the small status document.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use luna_core::model::{AnyObject, Cluster, Kind, NodeStatus};

use super::{Collection, Record, Store, StoreError};

/// Objects remembered at most; the map starts over when full.
const MAX_OBJECTS: usize = 100_000;

/// The object's record, its status record (nodes only) and their decoding.
type Decoded = (Arc<Record>, Option<Arc<Record>>, Arc<AnyObject>);
/// How many objects are remembered, and per kind by name.
type DecodedMap = (usize, HashMap<Kind, HashMap<String, Decoded>>);

pub struct Objects {
    store: Arc<dyn Store>,
    decoded: Mutex<DecodedMap>,
}

impl Objects {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Objects { store, decoded: Mutex::default() }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The object `kind`/`name` (the cluster whatever the name), `None` when absent.
    pub async fn get(&self, kind: Kind, name: &str) -> Result<Option<Arc<AnyObject>>, StoreError> {
        let key = if kind == Kind::Cluster { Cluster::KEY } else { name };
        let (rec, status) = if kind == Kind::Node {
            let (rec, status) = tokio::join!(
                self.store.get_shared(Collection::Object(kind), key),
                self.store.get_shared(Collection::Status, key)
            );
            (rec?, status?)
        } else {
            (self.store.get_shared(Collection::Object(kind), key).await?, None)
        };
        let Some(rec) = rec else { return Ok(None) };
        let same = |a: &Option<Arc<Record>>, b: &Option<Arc<Record>>| match (a, b) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        let known = {
            let map = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
            match map.1.get(&kind).and_then(|m| m.get(key)) {
                Some((r, st, o)) if Arc::ptr_eq(r, &rec) => {
                    if same(st, &status) {
                        return Ok(Some(o.clone()));
                    }
                    Some(o.clone())
                }
                _ => None,
            }
        };
        let mut obj = match known {
            // Only the status changed: the node as decoded before, with the new status.
            Some(o) => (*o).clone(),
            None => {
                let mut obj = AnyObject::from_value(kind, rec.doc.clone()).map_err(|e| StoreError::Corrupt {
                    collection: rec.collection,
                    key: rec.key.clone(),
                    reason: e.to_string(),
                })?;
                obj.set_rev(rec.rev);
                obj
            }
        };
        if let AnyObject::Node(n) = &mut obj {
            n.status = status.as_deref().map(decode_status).transpose()?;
        }
        let obj = Arc::new(obj);
        let mut map = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if map.0 >= MAX_OBJECTS {
            *map = Default::default();
        }
        if map.1.entry(kind).or_default().insert(key.to_string(), (rec, status, obj.clone())).is_none() {
            map.0 += 1;
        }
        Ok(Some(obj))
    }
}

/// A node's status record ([`Collection::Status`]).
pub fn decode_status(rec: &Record) -> Result<NodeStatus, StoreError> {
    serde_json::from_value(rec.doc.clone()).map_err(|e| StoreError::Corrupt {
        collection: rec.collection,
        key: rec.key.clone(),
        reason: e.to_string(),
    })
}

/// The concrete object inside an [`AnyObject`] of a known kind.
#[macro_export]
macro_rules! object_as {
    ($obj:expr, $variant:ident) => {
        match &*$obj {
            luna_core::model::AnyObject::$variant(o) => Some(o),
            _ => None,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::cache::CachedStore;
    use crate::store::sqlite::SqliteStore;
    use crate::store::{Expect, Write};
    use luna_core::model::Node;

    fn node_doc(group: &str) -> serde_json::Value {
        serde_json::to_value(Node::new("n1", group)).unwrap()
    }

    #[tokio::test]
    async fn decoded_objects_follow_every_write() {
        let store: Arc<dyn Store> = Arc::new(CachedStore::new(SqliteStore::open(":memory:").unwrap()));
        let objects = Objects::new(store.clone());
        let col = Collection::Object(Kind::Node);
        assert!(objects.get(Kind::Node, "n1").await.unwrap().is_none());
        store
            .commit(vec![Write::Put { collection: col, key: "n1".into(), expect: Expect::Absent, doc: node_doc("a") }])
            .await
            .unwrap();
        let first = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        let n = object_as!(first, Node).unwrap();
        assert_eq!((n.group.as_str(), n.rev), ("a", 1));
        // Unchanged record: the same decoded object.
        assert!(Arc::ptr_eq(&first, &objects.get(Kind::Node, "n1").await.unwrap().unwrap()));
        store
            .commit(vec![Write::Put { collection: col, key: "n1".into(), expect: Expect::Rev(1), doc: node_doc("b") }])
            .await
            .unwrap();
        let second = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        let n = object_as!(second, Node).unwrap();
        assert_eq!((n.group.as_str(), n.rev), ("b", 2));
        store.commit(vec![Write::Delete { collection: col, key: "n1".into(), expect: Expect::Rev(2) }]).await.unwrap();
        assert!(objects.get(Kind::Node, "n1").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_node_comes_with_its_status_record() {
        let store: Arc<dyn Store> = Arc::new(CachedStore::new(SqliteStore::open(":memory:").unwrap()));
        let objects = Objects::new(store.clone());
        let (col, st) = (Collection::Object(Kind::Node), Collection::Status);
        store
            .commit(vec![Write::Put { collection: col, key: "n1".into(), expect: Expect::Absent, doc: node_doc("a") }])
            .await
            .unwrap();
        let bare = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        assert_eq!(object_as!(bare, Node).unwrap().status, None);
        let status = |step: &str| serde_json::json!({"step": step, "progress": null, "time": 1});
        store
            .commit(vec![Write::Put { collection: st, key: "n1".into(), expect: Expect::Absent, doc: status("dhcp") }])
            .await
            .unwrap();
        let with = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        let n = object_as!(with, Node).unwrap();
        assert_eq!((n.status.as_ref().map(|s| s.step.as_str()), n.rev, n.group.as_str()), (Some("dhcp"), 1, "a"));
        assert!(Arc::ptr_eq(&with, &objects.get(Kind::Node, "n1").await.unwrap().unwrap()));
        store.commit(vec![Write::Delete { collection: st, key: "n1".into(), expect: Expect::Rev(1) }]).await.unwrap();
        assert_eq!(object_as!(objects.get(Kind::Node, "n1").await.unwrap().unwrap(), Node).unwrap().status, None);
        // A status record that is not a status is an error naming it.
        store
            .commit(vec![Write::Put {
                collection: st,
                key: "n1".into(),
                expect: Expect::Absent,
                doc: serde_json::json!(3),
            }])
            .await
            .unwrap();
        let err = objects.get(Kind::Node, "n1").await.unwrap_err().to_string();
        assert!(err.contains("status 'n1'"), "{err}");
    }

    #[tokio::test]
    async fn an_uncached_store_decodes_every_read() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(":memory:").unwrap());
        let col = Collection::Object(Kind::Node);
        store
            .commit(vec![Write::Put { collection: col, key: "n1".into(), expect: Expect::Absent, doc: node_doc("a") }])
            .await
            .unwrap();
        let objects = Objects::new(store.clone());
        let first = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        // Behind the uncached store, a write never seen by `objects`' store handle is seen.
        store
            .commit(vec![Write::Put { collection: col, key: "n1".into(), expect: Expect::Rev(1), doc: node_doc("b") }])
            .await
            .unwrap();
        let second = objects.get(Kind::Node, "n1").await.unwrap().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(object_as!(second, Node).unwrap().group, "b");
    }
}
