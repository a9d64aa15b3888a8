//! Glue between the parts of the server that must not know each other: the tracker learns
//! the rack topology and limits from the store, the seeder registers with the tracker, and the
//! image listings read the tracker's counters.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use luna_core::model::{AnyObject, Kind};

use crate::image::{TorrentCounters, TorrentStatsSource};
use crate::service::Service;
use crate::tracker::{SwitchId, Topology, TrackerConfig, TrackerHandle};

/// How often the tracker's view of the store (switches, limits) is refreshed.
pub const REFRESH: Duration = Duration::from_secs(10);

/// Node address → switch, from a snapshot of the store (the tracker asks under its lock, so
/// the answer must come from memory).
#[derive(Default)]
pub struct StoreTopology {
    map: RwLock<HashMap<Ipv4Addr, SwitchId>>,
}

impl Topology for StoreTopology {
    fn switch_of(&self, ip: Ipv4Addr) -> Option<SwitchId> {
        self.map.read().ok()?.get(&ip).cloned()
    }
}

impl StoreTopology {
    /// Rebuilds the snapshot: every address of every node that has a switch.
    pub async fn refresh(&self, service: &Service) -> Result<(), crate::service::ServiceError> {
        let mut map = HashMap::new();
        let mut names: HashMap<String, SwitchId> = HashMap::new();
        for o in service.list(Kind::Node).await? {
            let AnyObject::Node(n) = o else { continue };
            let Some(sw) = &n.switch else { continue };
            let id = names.entry(sw.clone()).or_insert_with(|| Arc::from(sw.as_str())).clone();
            for ip in n.interfaces.iter().filter_map(|i| i.ip) {
                map.insert(ip, id.clone());
            }
        }
        if let Ok(mut m) = self.map.write() {
            *m = map;
        }
        Ok(())
    }
}

/// Keeps the tracker's topology and limits in step with the store until the token is cancelled.
pub async fn follow_store(
    service: Service,
    tracker: Arc<TrackerHandle>,
    topology: Arc<StoreTopology>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(e) = topology.refresh(&service).await {
            tracing::warn!(error = %e, "cannot refresh the tracker topology");
        }
        if let Ok(c) = service.cluster().await {
            let want = TrackerConfig::from_cluster(&c);
            tracker.set_limits(want.interval, want.max_peers);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// The tracker's counters as the image listings want them.
pub struct TrackerStats(pub Arc<TrackerHandle>);

impl TorrentStatsSource for TrackerStats {
    fn torrent_stats(&self, info_hash: &str) -> Option<TorrentCounters> {
        let bytes = hex::decode(info_hash).ok()?;
        let hash: [u8; 20] = bytes.try_into().ok()?;
        let s = self.0.torrent_stats(&hash)?;
        Some(TorrentCounters {
            seeders: s.seeders,
            leechers: s.leechers,
            completed: s.completed.min(u32::MAX as u64) as u32,
        })
    }
}

/// What the seeder calls for each torrent it serves: the tracker lists it as a permanent peer.
pub fn registrar(tracker: Arc<TrackerHandle>) -> crate::image::seeder::PeerRegistrar {
    Arc::new(move |hash: [u8; 20], addr: SocketAddrV4| tracker.register_permanent_peer(hash, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn topology_follows_the_nodes_switches() {
        let store = crate::store::open("sqlite://:memory:").await.unwrap();
        let service = Service::new(store);
        service.ensure_cluster("t").await.unwrap();
        for (k, v) in [
            (Kind::Network, serde_json::json!({"name": "net", "cidr": "10.1.0.0/24"})),
            (Kind::Osimage, serde_json::json!({"name": "img", "path": "/img"})),
            (
                Kind::Group,
                serde_json::json!({"name": "g", "osimage": "img", "interfaces": [{"name": "BOOTIF", "network": "net"}]}),
            ),
            (Kind::Switch, serde_json::json!({"name": "rack1", "network": "net", "ip": "10.1.0.250"})),
        ] {
            service.create(k, v).await.unwrap();
        }
        let add = |name: &str, switch: Option<&str>| luna_core::api::NodeCreate {
            name: name.into(),
            group: "g".into(),
            switch: switch.map(String::from),
            port: switch.map(|_| luna_core::model::SwitchPort::Number(1)),
            ..Default::default()
        };
        service.add_nodes(add("n1", Some("rack1"))).await.unwrap();
        service.add_nodes(add("n2", None)).await.unwrap();
        let t = StoreTopology::default();
        t.refresh(&service).await.unwrap();
        assert_eq!(t.switch_of("10.1.0.1".parse().unwrap()).as_deref(), Some("rack1"));
        assert_eq!(t.switch_of("10.1.0.2".parse().unwrap()), None);
    }
}
