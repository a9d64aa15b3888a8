//! Dynamic leases as kept in the store.
//!
//! Two records per lease in [`Collection::Lease`], always written together in one batch, with
//! the same document:
//! - `ip/<ip>`: who holds the address. This one is authoritative: a MAC holds an address only
//!   while this record names it. Creating it with `Expect::Absent` (or replacing it by revision
//!   once expired) is what keeps two MACs off one address.
//! - `mac/<mac>`: which address a MAC last had, so it gets the same one back (PXE, iPXE and the
//!   initramfs each ask again). It may point at an address since given to someone else once
//!   the lease expired; the `ip/` record then says so.

use std::net::Ipv4Addr;

use luna_core::MacAddr;
use serde::{Deserialize, Serialize};

use crate::store::{Collection, Record, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseState {
    /// Offered, not yet requested; held for `offer_time`.
    Offered,
    /// Acknowledged; held for `lease_time`.
    Bound,
    /// Given back by the client; free, but the same MAC gets it again if still unused.
    Released,
    /// The client found the address in use; quarantined for `decline_time`.
    Declined,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    pub mac: MacAddr,
    pub ip: Ipv4Addr,
    /// The network the address belongs to (for listing and claim checks).
    pub network: String,
    /// Unix seconds after which the address may go to another machine.
    pub expires: u64,
    pub state: LeaseState,
    /// The host name the client sent (option 12), for the admin's benefit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

impl Lease {
    pub fn mac_key(mac: &MacAddr) -> String {
        format!("mac/{mac}")
    }

    pub fn ip_key(ip: Ipv4Addr) -> String {
        format!("ip/{ip}")
    }

    /// Whether `mac` may use the address this `ip/` record describes: its own (not declined)
    /// record, or anybody's once expired.
    pub fn usable_by(&self, mac: &MacAddr, now: u64) -> bool {
        (self.mac == *mac && self.state != LeaseState::Declined) || self.expires <= now
    }

    /// Whether this `ip/` record shows `mac` holding the address.
    pub fn held_by(&self, mac: &MacAddr) -> bool {
        self.mac == *mac && self.state != LeaseState::Declined
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("leases always serialise")
    }
}

/// A store document with the revision it was read at (for compare-and-swap writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub rev: u64,
    pub value: T,
}

impl Versioned<Lease> {
    pub fn from_record(rec: Record) -> Result<Self, StoreError> {
        let value = serde_json::from_value(rec.doc).map_err(|e| StoreError::Corrupt {
            collection: Collection::Lease,
            key: rec.key.clone(),
            reason: e.to_string(),
        })?;
        Ok(Versioned { rev: rec.rev, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_documents_round_trip() {
        let l = Lease {
            mac: "52:54:00:00:00:01".parse().unwrap(),
            ip: "10.1.0.5".parse().unwrap(),
            network: "cluster".into(),
            expires: 100,
            state: LeaseState::Bound,
            hostname: None,
        };
        let v = l.to_value();
        assert_eq!(v["state"], "bound");
        assert_eq!(v["mac"], "52:54:00:00:00:01");
        assert!(v.get("hostname").is_none());
        let rec = Record { collection: Collection::Lease, key: Lease::ip_key(l.ip), rev: 3, doc: v };
        assert_eq!(Versioned::from_record(rec).unwrap(), Versioned { rev: 3, value: l.clone() });
        assert_eq!(Lease::ip_key(l.ip), "ip/10.1.0.5");
        assert_eq!(Lease::mac_key(&l.mac), "mac/52:54:00:00:00:01");

        let other: MacAddr = "52:54:00:00:00:02".parse().unwrap();
        assert!(l.usable_by(&l.mac, 50) && !l.usable_by(&other, 50) && l.usable_by(&other, 100));
        let declined = Lease { state: LeaseState::Declined, ..l.clone() };
        assert!(!declined.usable_by(&l.mac, 50) && declined.usable_by(&l.mac, 100));
    }

    #[test]
    fn corrupt_lease_names_the_key() {
        let rec = Record {
            collection: Collection::Lease,
            key: "ip/10.0.0.1".into(),
            rev: 1,
            doc: serde_json::json!({"ip": 5}),
        };
        let e = Versioned::from_record(rec).unwrap_err().to_string();
        assert!(e.contains("ip/10.0.0.1"), "{e}");
    }
}
