//! Service operations racing each other on one store: what one operation read must still hold
//! when its batch commits (read checks and referrer records, see `service.rs`).
//!
//! Each scenario runs many rounds of two operations started together, with both backends: the
//! embedded store (sqlite file behind its cache) always, MongoDB (nx-27017 announcing a
//! one-member replica set, or `LUNA_TEST_MONGODB_URI`) when the MongoDB tests are on. After every
//! round: no object names one that does not exist, no address lies outside its network or in a
//! reserved range, and every operation either succeeded or failed with a named error (never a
//! store conflict leaking out, never "busy").

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use luna_core::api::NodeCreate;
use luna_core::model::{AnyObject, IpRange, Kind};
use luna_server::service::{Service, ServiceError};
use luna_server::store::conformance::{mongo_gate, unique_db_name, with_database, NxServer};
use luna_server::store::{Collection, Store};
use serde_json::json;

const ROUNDS: usize = 40;

/// Where the stores of one test live.
enum Backend {
    Sqlite(tempfile::TempDir),
    Mongo { base: String, _server: Option<NxServer> },
}

impl Backend {
    async fn store(&self, tag: &str) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => {
                let path = dir.path().join(format!("{tag}.db"));
                luna_server::store::open(&format!("sqlite://{}", path.display())).await.expect("open sqlite")
            }
            Backend::Mongo { base, .. } => {
                let url = with_database(base, &unique_db_name(tag));
                luna_server::store::open(&url).await.unwrap_or_else(|e| panic!("open {url}: {e}"))
            }
        }
    }
}

/// The backends this run covers: sqlite always, MongoDB when its tests are on.
async fn backends() -> Vec<(&'static str, Backend)> {
    let mut out = vec![("sqlite", Backend::Sqlite(tempfile::tempdir().expect("tempdir")))];
    if let Ok(uri) = std::env::var("LUNA_TEST_MONGODB_URI") {
        out.push(("mongodb", Backend::Mongo { base: uri, _server: None }));
    } else if let Some(bin) = mongo_gate() {
        let server = NxServer::start(&bin).await.expect("nx-27017 starts");
        out.push(("nx-27017", Backend::Mongo { base: server.url("admin"), _server: Some(server) }));
    }
    out
}

async fn seed(service: &Service) {
    service.ensure_cluster("races").await.expect("cluster");
    for (kind, doc) in [
        (Kind::Network, json!({"name": "cluster", "cidr": "10.141.0.0/24"})),
        (Kind::Osimage, json!({"name": "compute", "path": "/images/compute"})),
    ] {
        service.create(kind, doc).await.expect("seed");
    }
    make_group(service, "g").await;
}

async fn make_group(service: &Service, name: &str) {
    let doc = json!({"name": name, "osimage": "compute", "interfaces": [{"name": "BOOTIF", "network": "cluster"}]});
    service.create(Kind::Group, doc).await.expect("group");
}

fn node(name: &str, group: &str) -> NodeCreate {
    NodeCreate { name: name.into(), group: group.into(), ..Default::default() }
}

/// A small random pause so the two operations interleave differently each round.
async fn jitter() {
    let us = rand::random::<u64>() % 1500;
    tokio::time::sleep(Duration::from_micros(us)).await;
}

/// The loser of a race must get a named error, never a raw store conflict or "busy".
fn named<T: std::fmt::Debug>(what: &str, r: &Result<T, ServiceError>, allowed: fn(&ServiceError) -> bool) {
    if let Err(e) = r {
        assert!(allowed(e), "{what}: unexpected error {e:?}");
    }
}

/// Every reference resolves; every address lies in its network, outside its reserved ranges;
/// every address claim belongs to an object that holds it.
async fn assert_consistent(service: &Service, ctx: &str) {
    let mut names: BTreeSet<(Kind, String)> = BTreeSet::new();
    let mut objects = Vec::new();
    for kind in Kind::ALL {
        for o in service.list(kind).await.expect("list") {
            names.insert((kind, o.name().to_string()));
            objects.push(o);
        }
    }
    let mut held = BTreeSet::new();
    for o in &objects {
        for (kind, name) in o.references() {
            assert!(
                names.contains(&(kind, name.clone())),
                "{ctx}: {} {} names missing {kind} {name}",
                o.kind(),
                o.name()
            );
        }
        for (net, ip) in o.addresses() {
            let Ok(network) = service.network(&net).await else {
                panic!("{ctx}: {} {} has an address on missing network {net}", o.kind(), o.name())
            };
            assert!(
                network.contains_host(ip) && !network.is_reserved(ip),
                "{ctx}: {} {} holds {ip}, outside network {net} ({}, reserved {:?})",
                o.kind(),
                o.name(),
                network.cidr,
                network.reserved
            );
            held.insert(format!("ip/{net}/{ip}"));
        }
    }
    let claims: BTreeSet<String> =
        service.store().list(Collection::Claim, "ip/").await.expect("claims").into_iter().map(|r| r.key).collect();
    assert_eq!(claims, held, "{ctx}: address claims and objects disagree");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_add_races_group_delete() {
    for (backend, b) in backends().await {
        let service = Service::new(b.store("add_delete").await);
        seed(&service).await;
        let (mut added, mut deleted) = (0, 0);
        for round in 0..ROUNDS {
            let (s1, s2) = (service.clone(), service.clone());
            let name = format!("n{round}");
            let add = tokio::spawn(async move {
                jitter().await;
                s1.add_nodes(node(&name, "g")).await
            });
            let del = tokio::spawn(async move {
                jitter().await;
                s2.delete(Kind::Group, "g").await
            });
            let (add, del) = (add.await.expect("add task"), del.await.expect("delete task"));
            named("node add", &add, |e| matches!(e, ServiceError::NotFound { kind: Kind::Group, .. }));
            named("group delete", &del, |e| matches!(e, ServiceError::InUse { kind: Kind::Group, .. }));
            let ctx = format!("{backend} round {round}");
            assert_consistent(&service, &ctx).await;
            added += usize::from(add.is_ok());
            deleted += usize::from(del.is_ok());
            // Start the next round with the group and without nodes.
            if add.is_ok() {
                service.delete(Kind::Node, &format!("n{round}")).await.expect("delete node");
            }
            if service.list(Kind::Group).await.expect("groups").is_empty() {
                make_group(&service, "g").await;
            }
        }
        println!("{backend}: {added} adds and {deleted} deletes won of {ROUNDS} rounds");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_rename_races_node_add() {
    for (backend, b) in backends().await {
        let service = Service::new(b.store("rename_add").await);
        seed(&service).await;
        for round in 0..ROUNDS {
            let (from, to) = if round % 2 == 0 { ("g", "h") } else { ("h", "g") };
            let (s1, s2) = (service.clone(), service.clone());
            let name = format!("n{round}");
            let add = tokio::spawn(async move {
                jitter().await;
                s1.add_nodes(node(&name, from)).await
            });
            let rename = tokio::spawn(async move {
                jitter().await;
                s2.rename(Kind::Group, from, to).await
            });
            let (add, rename) = (add.await.expect("add task"), rename.await.expect("rename task"));
            named("node add", &add, |e| matches!(e, ServiceError::NotFound { kind: Kind::Group, .. }));
            assert!(rename.is_ok(), "{backend} round {round}: rename failed: {:?}", rename.err());
            assert_consistent(&service, &format!("{backend} round {round}")).await;
            for n in service.list(Kind::Node).await.expect("nodes") {
                let AnyObject::Node(n) = n else { unreachable!() };
                assert_eq!(n.group, to, "{backend} round {round}: node {} left behind in {}", n.name, n.group);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn network_change_races_allocation() {
    for (backend, b) in backends().await {
        let service = Service::new(b.store("net_alloc").await);
        seed(&service).await;
        let ip = |last: u8| Ipv4Addr::new(10, 141, 0, last);
        // Allocation picks the lowest free address: .11 once .1-.10 are reserved.
        service.reserve("cluster", IpRange { start: ip(1), end: ip(10) }).await.expect("reserve");
        let mut refused = 0;
        for round in 0..ROUNDS {
            let (s1, s2) = (service.clone(), service.clone());
            let name = format!("n{round}");
            let add = tokio::spawn(async move {
                jitter().await;
                s1.add_nodes(node(&name, "g")).await
            });
            // Reserve the next free addresses while the node is being added.
            let range = IpRange { start: ip(11), end: ip(20) };
            let reserve = tokio::spawn(async move {
                jitter().await;
                s2.reserve("cluster", range).await
            });
            let (add, reserve) = (add.await.expect("add task"), reserve.await.expect("reserve task"));
            named("node add", &add, |_| false);
            named("reserve", &reserve, |e| matches!(e, ServiceError::InUse { kind: Kind::Network, .. }));
            refused += usize::from(reserve.is_err());
            assert_consistent(&service, &format!("{backend} round {round}")).await;
            service.delete(Kind::Node, &format!("n{round}")).await.expect("delete node");
            if reserve.is_ok() {
                service.release("cluster", range).await.expect("release");
            }
        }
        println!("{backend}: the reservation was refused in {refused} of {ROUNDS} rounds");
    }
}
