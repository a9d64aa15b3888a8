//! The few socket calls tokio does not offer: receiving a request together with the local
//! address it was sent to (IP_PKTINFO / IPV6_PKTINFO).
//!
//! Why: with the listener on 0.0.0.0, replies must still come from the address the client
//! talked to (a floating HA address, a secondary address), or PXE ROMs drop them. Each
//! transfer's socket is bound to that address.

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;
use tokio::net::UdpSocket;

fn set_int_option(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is an open socket borrowed for the call; the value is a c_int passed by
    // pointer together with its exact size, as setsockopt(2) expects for these options.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to report each datagram's local address. Returns whether it worked.
pub fn enable_pktinfo(sock: &UdpSocket, ipv6: bool) -> bool {
    let fd = sock.as_raw_fd();
    if ipv6 {
        let v6 = set_int_option(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1).is_ok();
        // Dual-stack sockets report v4-mapped traffic with IP_PKTINFO; fine if refused.
        let _ = set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
        v6
    } else {
        set_int_option(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1).is_ok()
    }
}

/// Receives one datagram: `(length, peer, local address it was sent to if known)`.
pub async fn recv_with_local(sock: &UdpSocket, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    sock.async_io(Interest::READABLE, || recvmsg_once(sock.as_raw_fd(), buf)).await
}

fn recvmsg_once(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    // u64 words keep the control buffer aligned for `struct cmsghdr`.
    let mut control = [0u64; 16];
    let mut control_len = 0usize;
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: every pointer in `msg` refers to a live local buffer with its true length
    // (`iov` → `buf`, name → socket2's zeroed sockaddr storage, control → `control`), the
    // kernel writes at most those lengths, and `try_init` is told the address length it wrote.
    let (n, addr) = unsafe {
        socket2::SockAddr::try_init(|storage, len| {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = storage.cast();
            msg.msg_namelen = *len;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = libc::recvmsg(fd, &mut msg, 0);
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            *len = msg.msg_namelen;
            control_len = msg.msg_controllen as usize;
            Ok(n as usize)
        })?
    };
    let peer = addr.as_socket().ok_or_else(|| io::Error::other("datagram from a non-ip address"))?;
    let bytes: Vec<u8> = control.iter().flat_map(|w| w.to_ne_bytes()).take(control_len).collect();
    Ok((n, peer, local_from_cmsgs(&bytes)))
}

/// Reads the destination address out of a control-message buffer (Linux `cmsghdr` layout:
/// `size_t len; int level; int type;` then data, each record aligned to `size_t`).
pub fn local_from_cmsgs(control: &[u8]) -> Option<IpAddr> {
    const W: usize = size_of::<usize>();
    let align = |n: usize| (n + W - 1) & !(W - 1);
    let header = align(W + 8);
    let mut off = 0;
    let mut found = None;
    while off + header <= control.len() {
        let len = usize::from_ne_bytes(control[off..off + W].try_into().ok()?);
        let level = i32::from_ne_bytes(control[off + W..off + W + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[off + W + 4..off + W + 8].try_into().ok()?);
        if len < header || off + len > control.len() {
            break;
        }
        let data = &control[off + header..off + len];
        if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO && data.len() >= 12 {
            // struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }: spec_dst is
            // the local address to answer from (the destination itself for unicast).
            let a: [u8; 4] = data[4..8].try_into().ok()?;
            found = Some(IpAddr::V4(Ipv4Addr::from(a)));
        } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO && data.len() >= 16 {
            let a: [u8; 16] = data[..16].try_into().ok()?;
            found = Some(IpAddr::V6(Ipv6Addr::from(a)));
        }
        off += align(len);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmsg(level: i32, kind: i32, data: &[u8]) -> Vec<u8> {
        const W: usize = size_of::<usize>();
        let header = (W + 8 + W - 1) & !(W - 1);
        let len = header + data.len();
        let mut v = Vec::new();
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(&level.to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.resize(header, 0);
        v.extend_from_slice(data);
        v.resize((len + W - 1) & !(W - 1), 0);
        v
    }

    #[test]
    fn finds_ipv4_pktinfo_after_other_records() {
        let mut buf = cmsg(libc::SOL_SOCKET, libc::SO_TIMESTAMP, &[9; 16]);
        buf.extend(cmsg(libc::IPPROTO_IP, libc::IP_PKTINFO, &[2, 0, 0, 0, 10, 141, 255, 254, 10, 141, 255, 253]));
        assert_eq!(local_from_cmsgs(&buf), Some("10.141.255.254".parse().unwrap()));
    }

    #[test]
    fn finds_ipv6_pktinfo() {
        let mut data = [0u8; 20];
        data[..16].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        let buf = cmsg(libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &data);
        assert_eq!(local_from_cmsgs(&buf), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn tolerates_empty_and_truncated_buffers() {
        assert_eq!(local_from_cmsgs(&[]), None);
        let buf = cmsg(libc::IPPROTO_IP, libc::IP_PKTINFO, &[0; 12]);
        assert_eq!(local_from_cmsgs(&buf[..buf.len() - 8]), None);
    }

    #[tokio::test]
    async fn reports_destination_of_loopback_datagram() {
        // Listener on the wildcard address, datagram sent to 127.0.0.2: only pktinfo knows.
        let server = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        assert!(enable_pktinfo(&server, false));
        let port = server.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"hi", ("127.0.0.2", port)).await.unwrap();
        let mut buf = [0u8; 16];
        let (n, peer, local) = recv_with_local(&server, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
        assert_eq!(peer, client.local_addr().unwrap());
        assert_eq!(local, Some("127.0.0.2".parse().unwrap()));
    }
}
