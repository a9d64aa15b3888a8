//! Ports and MAC addresses for tests.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{HarnessError, Result};

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it).
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| HarnessError::io("bind 127.0.0.1:0 (tcp)", e))?;
    let addr = listener.local_addr().map_err(|e| HarnessError::io("local address of tcp listener", e))?;
    Ok(addr.port())
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
pub fn free_udp_port() -> Result<u16> {
    let socket =
        UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| HarnessError::io("bind 127.0.0.1:0 (udp)", e))?;
    let addr = socket.local_addr().map_err(|e| HarnessError::io("local address of udp socket", e))?;
    Ok(addr.port())
}

static MAC_SEQ: AtomicU32 = AtomicU32::new(1);

/// A locally administered unicast MAC (`52:54:00:..`, qemu's prefix) unique within this
/// process and unlikely to collide with a concurrent test process: pid bits + a counter.
pub fn next_mac() -> String {
    let n = MAC_SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", pid & 0xff, (n >> 8) & 0xff, n & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        let port = free_udp_port().unwrap();
        UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }

    #[test]
    fn macs_are_distinct_and_well_formed() {
        let a = next_mac();
        let b = next_mac();
        assert_ne!(a, b);
        for mac in [a, b] {
            let parts: Vec<_> = mac.split(':').collect();
            assert_eq!(parts.len(), 6, "{mac}");
            assert!(parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok()), "{mac}");
            assert_eq!(&parts[..3], ["52", "54", "00"]);
        }
    }
}
