//! From the walked MIB columns to a switch's learned table, sans-IO: MAC → bridge port →
//! ifIndex → port name, with uplinks marked.

use std::collections::{BTreeMap, BTreeSet};

use luna_core::MacAddr;
use serde::{Deserialize, Serialize};

use super::snmp::Value;

/// BRIDGE-MIB dot1dTpFdbPort: index = MAC (6 arcs), value = bridge port.
pub const BRIDGE_FDB_PORT: &str = "1.3.6.1.2.1.17.4.3.1.2";
/// Q-BRIDGE-MIB dot1qTpFdbPort: index = FDB id (VLAN) + MAC, value = bridge port.
pub const Q_BRIDGE_FDB_PORT: &str = luna_core::model::DEFAULT_FDB_OID;
/// BRIDGE-MIB dot1dBasePortIfIndex: index = bridge port, value = ifIndex.
pub const BASE_PORT_IF_INDEX: &str = "1.3.6.1.2.1.17.1.4.1.2";
/// IF-MIB ifName: index = ifIndex, value = `Gi1/0/7`, `swp7`…
pub const IF_NAME: &str = "1.3.6.1.2.1.31.1.1.1.1";
/// IF-MIB ifDescr: the fallback when a switch has no ifName.
pub const IF_DESCR: &str = "1.3.6.1.2.1.2.2.1.2";

/// The columns one poll read.
#[derive(Debug, Clone, Default)]
pub struct Columns {
    pub fdb: Vec<(Vec<u32>, Value)>,
    pub base_port_if_index: Vec<(Vec<u32>, Value)>,
    pub if_name: Vec<(Vec<u32>, Value)>,
    pub if_descr: Vec<(Vec<u32>, Value)>,
}

/// Why a port is not taken as a node's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Uplink {
    /// Listed in the switch object's `uplinks`.
    Listed,
    /// Carries more MACs than `[discovery] uplink_threshold`.
    Threshold,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub port: u32,
    pub if_index: Option<u32>,
    pub name: Option<String>,
    pub macs: BTreeSet<MacAddr>,
    pub uplink: Option<Uplink>,
}

/// What one switch reported in one poll.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SwitchTable {
    pub ports: BTreeMap<u32, Port>,
}

fn as_u32(v: &Value) -> Option<u32> {
    match v {
        Value::Integer(i) => u32::try_from(*i).ok(),
        Value::Gauge32(u) | Value::Counter32(u) => Some(*u),
        _ => None,
    }
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::OctetString(s) => {
            let t = String::from_utf8_lossy(s).trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string();
            (!t.is_empty()).then_some(t)
        }
        _ => None,
    }
}

/// Builds the table. Rows that do not fit their column (wrong type, short index, port 0 — the
/// switch itself) are skipped: one odd row must not cost the whole switch.
pub fn build(cols: &Columns, listed_uplinks: &[u32], uplink_threshold: usize) -> SwitchTable {
    let if_index: BTreeMap<u32, u32> =
        cols.base_port_if_index.iter().filter_map(|(idx, v)| Some((*single(idx)?, as_u32(v)?))).collect();
    let names = |col: &[(Vec<u32>, Value)]| -> BTreeMap<u32, String> {
        col.iter().filter_map(|(idx, v)| Some((*single(idx)?, as_text(v)?))).collect()
    };
    let if_name = names(&cols.if_name);
    let if_descr = names(&cols.if_descr);
    let mut table = SwitchTable::default();
    for (idx, v) in &cols.fdb {
        let (Some(port), Some(mac)) = (as_u32(v), mac_of(idx)) else { continue };
        if port == 0 {
            continue;
        }
        let entry = table.ports.entry(port).or_insert_with(|| {
            let ifi = if_index.get(&port).copied();
            Port {
                port,
                if_index: ifi,
                name: ifi.and_then(|i| if_name.get(&i).or_else(|| if_descr.get(&i)).cloned()),
                macs: BTreeSet::new(),
                uplink: None,
            }
        });
        entry.macs.insert(mac);
    }
    for p in table.ports.values_mut() {
        p.uplink = if listed_uplinks.contains(&p.port) {
            Some(Uplink::Listed)
        } else if p.macs.len() > uplink_threshold {
            Some(Uplink::Threshold)
        } else {
            None
        };
    }
    table
}

fn single(idx: &[u32]) -> Option<&u32> {
    match idx {
        [one] => Some(one),
        _ => None,
    }
}

/// The MAC in an FDB index: its last six arcs (BRIDGE-MIB: the whole index; Q-BRIDGE: after
/// the FDB id).
fn mac_of(idx: &[u32]) -> Option<MacAddr> {
    if idx.len() < 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (slot, arc) in m.iter_mut().zip(&idx[idx.len() - 6..]) {
        *slot = u8::try_from(*arc).ok()?;
    }
    Some(MacAddr(m))
}

impl SwitchTable {
    /// The port `mac` was learned on, unless that port is an uplink.
    pub fn port_of(&self, mac: MacAddr) -> Option<&Port> {
        self.ports.values().find(|p| p.uplink.is_none() && p.macs.contains(&mac))
    }

    /// The port named `name` (ifName, else ifDescr), if the switch reported it.
    pub fn port_named(&self, name: &str) -> Option<&Port> {
        self.ports.values().find(|p| p.name.as_deref() == Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac_idx(vlan: Option<u32>, last: u8) -> Vec<u32> {
        let mut v: Vec<u32> = vlan.into_iter().collect();
        v.extend([0x52, 0x54, 0, 0xaa, 0, u32::from(last)]);
        v
    }

    fn cols(vlan: Option<u32>) -> Columns {
        let mut fdb = vec![
            (mac_idx(vlan, 7), Value::Integer(7)),
            (mac_idx(vlan, 8), Value::Integer(8)),
            (mac_idx(vlan, 1), Value::Integer(0)), // the switch itself
            (vec![1, 2], Value::Integer(9)),       // garbage index
            (mac_idx(vlan, 2), Value::OctetString(b"x".to_vec())),
        ];
        fdb.extend((100..106).map(|i| (mac_idx(vlan, i), Value::Integer(48))));
        Columns {
            fdb,
            base_port_if_index: vec![
                (vec![7], Value::Integer(1007)),
                (vec![8], Value::Integer(1008)),
                (vec![48], Value::Integer(1048)),
            ],
            if_name: vec![
                (vec![1007], Value::OctetString(b"Gi1/0/7".to_vec())),
                (vec![1048], Value::OctetString(vec![])),
            ],
            if_descr: vec![
                (vec![1008], Value::OctetString(b"GigabitEthernet1/0/8\0".to_vec())),
                (vec![1048], Value::OctetString(b"Te1/1/1".to_vec())),
            ],
        }
    }

    #[test]
    fn both_mib_variants_give_the_same_table() {
        for vlan in [None, Some(1)] {
            let t = build(&cols(vlan), &[], 4);
            assert_eq!(t.ports.keys().copied().collect::<Vec<_>>(), [7, 8, 48]);
            let p7 = &t.ports[&7];
            assert_eq!((p7.if_index, p7.name.as_deref(), p7.uplink), (Some(1007), Some("Gi1/0/7"), None));
            assert_eq!(t.ports[&8].name.as_deref(), Some("GigabitEthernet1/0/8"));
            let mac7: MacAddr = "52:54:00:aa:00:07".parse().unwrap();
            assert_eq!(t.port_of(mac7).map(|p| p.port), Some(7));
            assert_eq!(t.port_named("Gi1/0/7").map(|p| p.port), Some(7));
        }
    }

    #[test]
    fn uplinks_listed_or_by_threshold() {
        let t = build(&cols(Some(1)), &[8], 4);
        assert_eq!(t.ports[&8].uplink, Some(Uplink::Listed));
        assert_eq!(t.ports[&48].uplink, Some(Uplink::Threshold));
        assert_eq!(t.ports[&48].name.as_deref(), Some("Te1/1/1"));
        assert_eq!(t.ports[&7].uplink, None);
        let uplinked: MacAddr = "52:54:00:aa:00:64".parse().unwrap();
        assert_eq!(t.port_of(uplinked), None);
        assert_eq!(t.port_of("52:54:00:aa:00:08".parse().unwrap()), None);
        // Exactly at the threshold is still an access port.
        assert_eq!(build(&cols(None), &[], 6).ports[&48].uplink, None);
    }
}
