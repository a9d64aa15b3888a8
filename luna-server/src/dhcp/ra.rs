//! IPv6 Router Solicitations answered with "no router here", so iPXE boots without waiting.
//!
//! iPXE configures a NIC with every method it has at once (DHCPv4 and, in builds with IPv6 such
//! as Debian's, IPv6 autoconfiguration) and boots only when all of them have finished. On a
//! provisioning network without an IPv6 router nothing answers its Router Solicitations, so it
//! waits out their timeout after DHCPv4 is long done: 15.5 s of a 46 s VM boot with Debian's
//! `ipxe-qemu` (bench-vms, README). A Router Advertisement with router lifetime 0 (not a
//! default router, RFC 4861 §4.2), no prefix and neither the managed nor the other flag ends
//! that wait at once, and changes nothing for a host that receives it (no route, no address, no
//! DHCPv6). `[dhcp] answer_router_solicitations = false` turns it off where a real IPv6 router
//! serves the network (iPXE would take whichever advertisement comes first).
//!
//! The protocol part is sans-IO ([`is_router_solicitation`], [`advertisement`], [`reply_to`]);
//! [`answer`] is the socket side, one raw ICMPv6 socket per DHCP interface.

use std::io;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

/// ICMPv6 Router Solicitation (RFC 4861 §4.1).
const ROUTER_SOLICITATION: u8 = 133;
/// ICMPv6 Router Advertisement (RFC 4861 §4.2).
const ROUTER_ADVERTISEMENT: u8 = 134;
/// Neighbor Discovery option: source link-layer address.
const OPT_SOURCE_LL: u8 = 1;
/// The all-routers group, where solicitations go.
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// The all-nodes group, where an advertisement to an unspecified source goes.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// True when `icmp` (an ICMPv6 message, without the IPv6 header) is a Router Solicitation.
pub fn is_router_solicitation(icmp: &[u8]) -> bool {
    icmp.len() >= 8 && icmp[0] == ROUTER_SOLICITATION && icmp[1] == 0
}

/// The Router Advertisement sent in answer: router lifetime 0, no flags, no prefix, reachable
/// time and retransmit timer unspecified, and the interface's MAC as source link-layer address
/// when known. The checksum is left 0: the kernel fills it in on ICMPv6 raw sockets.
pub fn advertisement(mac: Option<[u8; 6]>) -> Vec<u8> {
    // type, code, checksum (2), cur hop limit, flags, router lifetime (2), reachable (4), retrans (4)
    let mut ra = vec![ROUTER_ADVERTISEMENT, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    if let Some(mac) = mac {
        ra.extend_from_slice(&[OPT_SOURCE_LL, 1]);
        ra.extend_from_slice(&mac);
    }
    ra
}

/// Where the answer to a solicitation from `source` goes: back to the soliciting host, or to
/// all nodes when it had no address yet (RFC 4861 §6.2.6). None for any other source: a host
/// solicits from its link-local address (RFC 4861 §6.3.7), so a solicitation from elsewhere is
/// not from a host on this link and gets nothing (no advertisement reflected off-link).
pub fn reply_to(source: Ipv6Addr) -> Option<Ipv6Addr> {
    if source.is_unspecified() {
        Some(ALL_NODES)
    } else if source.segments()[0] & 0xffc0 == 0xfe80 {
        Some(source)
    } else {
        None
    }
}

/// Binds the raw ICMPv6 socket of `iface`: only Router Solicitations pass its filter, it is in
/// the all-routers group, and what it sends has hop limit 255 (RFC 4861 §6.1.2: others drop it).
pub fn bind(iface: &str) -> io::Result<(AsyncFd<socket2::Socket>, u32, Option<[u8; 6]>)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let index = nix::net::if_::if_nametoindex(iface).map_err(io::Error::from)?;
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(iface.as_bytes()))?;
    pass_only_solicitations(&s)?;
    s.join_multicast_v6(&ALL_ROUTERS, index)?;
    s.set_multicast_if_v6(index)?;
    s.set_multicast_hops_v6(255)?;
    s.set_unicast_hops_v6(255)?;
    s.set_nonblocking(true)?;
    // SAFETY: the socket owns its descriptor and moves into the AsyncFd, so the descriptor
    // stays open and the same for as long as the AsyncFd lives.
    let fd = unsafe { AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE) }?;
    Ok((fd, index, interface_mac(iface)))
}

/// `ICMP6_FILTER` (RFC 3542 §3.2): block every ICMPv6 type but Router Solicitation, so the
/// socket is not woken by the neighbour discovery and pings of a busy network.
fn pass_only_solicitations(s: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let filter = solicitation_filter();
    const ICMP6_FILTER: libc::c_int = 1;
    // SAFETY: a valid socket and a 32-byte filter (struct icmp6_filter) that outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMP6_FILTER,
            filter.as_ptr() as *const libc::c_void,
            std::mem::size_of_val(&filter) as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `struct icmp6_filter` passing Router Solicitations only: a set bit blocks its type.
fn solicitation_filter() -> [u32; 8] {
    let mut filter = [u32::MAX; 8];
    filter[usize::from(ROUTER_SOLICITATION >> 5)] &= !(1u32 << (ROUTER_SOLICITATION & 31));
    filter
}

/// The interface's MAC, from sysfs (none for interfaces without one).
fn interface_mac(iface: &str) -> Option<[u8; 6]> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).ok()?;
    let mac: luna_core::MacAddr = text.trim().parse().ok()?;
    Some(mac.0)
}

/// Answers Router Solicitations on `iface` until `shutdown`. A socket that cannot be opened
/// (IPv6 off on the interface) is logged and leaves DHCP running without it.
pub async fn answer(iface: String, shutdown: CancellationToken) {
    let (sock, index, mac) = match bind(&iface) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(interface = %iface, error = %e, "dhcp: not answering IPv6 router solicitations");
            return;
        }
    };
    tracing::info!(interface = %iface, "dhcp: answering IPv6 router solicitations (no router, no prefix)");
    let ra = advertisement(mac);
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            g = sock.readable() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(interface = %iface, error = %e, "dhcp: router solicitation socket failed");
                    return;
                }
            },
        };
        let received = guard.try_io(|s| s.get_ref().recv_from(&mut buf));
        let (len, from) = match received {
            Err(_would_block) => continue,
            Ok(Err(e)) => {
                // Wait for the next readiness rather than spin on an error that repeats.
                guard.clear_ready();
                tracing::debug!(interface = %iface, error = %e, "dhcp: reading a router solicitation failed");
                continue;
            }
            Ok(Ok(x)) => x,
        };
        // SAFETY: recv_from initialised the first `len` bytes of `buf`.
        let msg = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, len) };
        let Some(source) = from.as_socket_ipv6().map(|a| *a.ip()) else { continue };
        let Some(dest) = reply_to(source).filter(|_| is_router_solicitation(msg)) else { continue };
        let to = SocketAddrV6::new(dest, 0, 0, index);
        match sock.get_ref().send_to(&ra, &to.into()) {
            Ok(_) => tracing::debug!(interface = %iface, %source, "dhcp: answered a router solicitation"),
            Err(e) => {
                tracing::debug!(interface = %iface, %source, error = %e, "dhcp: cannot answer a router solicitation")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solicitations_are_recognised_and_nothing_else() {
        assert!(is_router_solicitation(&[133, 0, 0x12, 0x34, 0, 0, 0, 0]));
        assert!(is_router_solicitation(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0x52, 0x54, 0, 0xbe, 0x77, 1]));
        assert!(!is_router_solicitation(&[133, 0, 0, 0, 0, 0, 0]), "shorter than its fixed part");
        assert!(!is_router_solicitation(&[133, 1, 0, 0, 0, 0, 0, 0]), "code must be 0");
        assert!(!is_router_solicitation(&[134, 0, 0, 0, 0, 0, 0, 0]), "an advertisement");
        assert!(!is_router_solicitation(&[135, 0, 0, 0, 0, 0, 0, 0]), "a neighbour solicitation");
        assert!(!is_router_solicitation(&[]));
    }

    #[test]
    fn the_advertisement_names_no_router_no_prefix_and_no_dhcpv6() {
        let ra = advertisement(Some([0x52, 0x54, 0, 0xbe, 0x77, 0x01]));
        assert_eq!(ra.len(), 24);
        assert_eq!((ra[0], ra[1]), (134, 0), "type and code");
        assert_eq!(ra[5] & 0xc0, 0, "neither managed nor other configuration: no DHCPv6");
        assert_eq!(u16::from_be_bytes([ra[6], ra[7]]), 0, "router lifetime 0: not a default router");
        assert_eq!(&ra[8..16], &[0; 8], "reachable time and retransmit timer unspecified");
        assert_eq!(&ra[16..], &[1, 1, 0x52, 0x54, 0, 0xbe, 0x77, 0x01], "source link-layer address, 8 bytes");
        // Options after the fixed part: only that one, so no prefix information.
        assert_eq!(advertisement(None), ra[..16].to_vec());
    }

    #[test]
    fn answers_go_back_to_a_host_on_the_link_or_to_all_nodes_and_nowhere_else() {
        let host: Ipv6Addr = "fe80::5054:ff:febe:7701".parse().unwrap();
        assert_eq!(reply_to(host), Some(host));
        assert_eq!(reply_to(Ipv6Addr::UNSPECIFIED), Some("ff02::1".parse::<Ipv6Addr>().unwrap()));
        // Not from a host on this link: nothing, so nothing is reflected elsewhere.
        for other in ["2001:db8::1", "fd00::2", "ff02::1", "::1", "fec0::1"] {
            assert_eq!(reply_to(other.parse().unwrap()), None, "{other}");
        }
    }

    #[test]
    fn the_filter_passes_type_133_only() {
        let filter = solicitation_filter();
        let blocked = |t: u8| filter[usize::from(t >> 5)] & (1 << (t & 31)) != 0;
        assert!(!blocked(133));
        assert!((0..=255u8).filter(|&t| t != 133).all(blocked));
    }
}
