//! Address allocation on a network: lowest free host address first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::model::{IpRange, Network};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("network {network} has no free address left ({wanted} wanted, {free} free)")]
    Exhausted { network: String, wanted: usize, free: usize },
    #[error("ip {ip} is not a host address of network {network} ({cidr})")]
    Outside { network: String, cidr: String, ip: Ipv4Addr },
    #[error("ip {ip} is reserved on network {network}")]
    Reserved { network: String, ip: Ipv4Addr },
}

/// Returns the `count` lowest addresses of `network` that are neither in `used`, nor reserved by
/// the network (gateway, reserved ranges), nor in `also_reserved` (the server's own address, the
/// DHCP range for unknown machines).
pub fn lowest_free(
    network: &Network,
    used: &BTreeSet<Ipv4Addr>,
    also_reserved: &[IpRange],
    count: usize,
) -> Result<Vec<Ipv4Addr>, AllocError> {
    lowest_free_from(network, used, also_reserved, count, network.host_range().start)
}

/// [`lowest_free`] starting the scan at `from`: bulk allocators pass the address after their
/// last pick (everything below it is taken), which keeps allocating N nodes linear, not quadratic.
pub fn lowest_free_from(
    network: &Network,
    used: &BTreeSet<Ipv4Addr>,
    also_reserved: &[IpRange],
    count: usize,
    from: Ipv4Addr,
) -> Result<Vec<Ipv4Addr>, AllocError> {
    let range = network.host_range();
    let mut out = Vec::with_capacity(count);
    let mut cur = u32::from(range.start).max(u32::from(from));
    let end = u32::from(range.end);
    while out.len() < count && cur <= end {
        let ip = Ipv4Addr::from(cur);
        // Jump over a whole reserved range at once: a /8 with a big reserved block stays cheap.
        if let Some(r) = network.reserved.iter().chain(also_reserved).find(|r| r.contains(ip)) {
            cur = u32::from(r.end).saturating_add(1);
            if u32::from(r.end) == u32::MAX {
                break;
            }
            continue;
        }
        if !used.contains(&ip) && Some(ip) != network.gateway {
            out.push(ip);
        }
        cur += 1;
    }
    if out.len() < count {
        let free = out.len();
        return Err(AllocError::Exhausted { network: network.name.clone(), wanted: count, free });
    }
    Ok(out)
}

/// Checks an address an admin asked for explicitly (taken-ness is the store's claim check).
pub fn check_explicit(network: &Network, ip: Ipv4Addr, also_reserved: &[IpRange]) -> Result<(), AllocError> {
    if !network.contains_host(ip) {
        return Err(AllocError::Outside { network: network.name.clone(), cidr: network.cidr.to_string(), ip });
    }
    if network.is_reserved(ip) || also_reserved.iter().any(|r| r.contains(ip)) {
        return Err(AllocError::Reserved { network: network.name.clone(), ip });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(cidr: &str) -> Network {
        Network::new("cluster", cidr.parse().unwrap())
    }

    #[test]
    fn skips_gateway_reserved_and_used() {
        let mut n = net("10.141.0.0/29");
        n.gateway = Some("10.141.0.1".parse().unwrap());
        n.reserved.push("10.141.0.3-10.141.0.4".parse().unwrap());
        let used: BTreeSet<Ipv4Addr> = ["10.141.0.2".parse().unwrap()].into();
        let got = lowest_free(&n, &used, &[], 2).unwrap();
        assert_eq!(got, ["10.141.0.5".parse::<Ipv4Addr>().unwrap(), "10.141.0.6".parse().unwrap()]);
        let e = lowest_free(&n, &used, &[], 3).unwrap_err();
        assert_eq!(e, AllocError::Exhausted { network: "cluster".into(), wanted: 3, free: 2 });
    }

    #[test]
    fn explicit_checks() {
        let mut n = net("10.141.0.0/24");
        n.reserved.push(IpRange { start: "10.141.0.200".parse().unwrap(), end: "10.141.0.250".parse().unwrap() });
        assert!(check_explicit(&n, "10.141.0.7".parse().unwrap(), &[]).is_ok());
        assert!(matches!(check_explicit(&n, "10.141.0.0".parse().unwrap(), &[]), Err(AllocError::Outside { .. })));
        assert!(matches!(check_explicit(&n, "10.141.0.255".parse().unwrap(), &[]), Err(AllocError::Outside { .. })));
        assert!(matches!(check_explicit(&n, "10.142.0.5".parse().unwrap(), &[]), Err(AllocError::Outside { .. })));
        assert!(matches!(check_explicit(&n, "10.141.0.210".parse().unwrap(), &[]), Err(AllocError::Reserved { .. })));
    }

    #[test]
    fn huge_reserved_block_is_cheap() {
        let mut n = net("10.0.0.0/8");
        n.reserved.push("10.0.0.1-10.254.255.255".parse().unwrap());
        let got = lowest_free(&n, &BTreeSet::new(), &[], 1).unwrap();
        assert_eq!(got, ["10.255.0.0".parse::<Ipv4Addr>().unwrap()]);
    }

    proptest! {
        #[test]
        fn allocations_are_free_distinct_and_lowest(used in proptest::collection::btree_set(1u32..60, 0..40), count in 1usize..10) {
            let n = net("10.1.0.0/26");
            let used: BTreeSet<Ipv4Addr> = used.into_iter().map(|u| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + u)).collect();
            if let Ok(got) = lowest_free(&n, &used, &[], count) {
                let set: BTreeSet<_> = got.iter().copied().collect();
                prop_assert_eq!(set.len(), count);
                for ip in &got {
                    prop_assert!(!used.contains(ip) && n.contains_host(*ip));
                }
                // Nothing lower than the highest pick was left free.
                let max = *got.iter().max().unwrap();
                let mut c = u32::from(n.host_range().start);
                while c < u32::from(max) {
                    let ip = Ipv4Addr::from(c);
                    prop_assert!(used.contains(&ip) || set.contains(&ip));
                    c += 1;
                }
            }
        }
    }
}
