//! No longer used by luna-server (which serves every request through `crate::httpd`, hyper);
//! kept for `bench_tracker … fast` as the comparison, compiled only with the `test-support`
//! feature (never in the `.deb`'s server). The tracker's fast path: BitTorrent clients announce with a new TCP connection each time, so
//! per-connection cost decides how many announces a second the server takes. [`FastListener`]
//! sits between the TCP listener and `axum::serve`: it reads the first request head of every
//! connection itself and answers `GET /announce` and `GET /scrape` (HTTP/1.0 and 1.1, keep-alive
//! and pipelining honoured) straight from the [`TrackerHandle`], without a hyper connection, a
//! task for the service or a router lookup. Any other request, on a fresh connection or after
//! tracker requests on a kept-alive one, is handed to axum with the bytes already read put back
//! in front ([`Rewind`]), so the rest of the server sees an ordinary connection.
//!
//! The answers are byte for byte what [`super::router`] gives (status 200, `text/plain`, the
//! same body); the peer address is the connection's, as with `ConnectInfo`.
//!
//! The head is parsed by [`parse_head`] (sans-IO): only a plain `GET` of exactly `/announce` or
//! `/scrape` with no request body is taken; everything unusual (other methods, absolute-form
//! targets, bodies, HTTP/2, heads over 8 KiB) goes to axum, which knows the whole protocol.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::{Listener, ListenerExt, TapIo};
use std::os::unix::io::{AsRawFd, FromRawFd};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::TrackerHandle;

/// Longest request head the fast path reads before leaving the connection to axum.
const MAX_HEAD: usize = 8 * 1024;
/// A connection that sends no complete head for this long is closed (hyper's default too).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Which tracker request a head asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Announce,
    Scrape,
}

/// What [`parse_head`] made of the bytes at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// No complete head yet (and not yet too long to be ours).
    Incomplete,
    /// A tracker request: the head is `len` bytes; `query` is the range of the raw query string.
    Tracker { route: Route, query: std::ops::Range<usize>, keep_alive: bool, len: usize },
    /// Anything else: axum's.
    Other,
}

/// Finds the end of the head (`\r\n\r\n`) and decides whether it is a plain tracker request.
pub fn parse_head(buf: &[u8]) -> Head {
    // A request line that already cannot be ours need not wait for the rest of the head.
    if !buf.starts_with(&b"GET /"[..buf.len().min(5)]) {
        return Head::Other;
    }
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_HEAD { Head::Other } else { Head::Incomplete };
    };
    let len = end + 4;
    let mut lines = buf[..end].split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let Some(line) = lines.next() else { return Head::Other };
    let mut parts = line.split(|&b| b == b' ');
    let (Some(b"GET"), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Head::Other;
    };
    let mut keep_alive = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Head::Other,
    };
    let (path, query_len) = match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], target.len() - q - 1),
        None => (target, 0),
    };
    let route = match path {
        b"/announce" => Route::Announce,
        b"/scrape" => Route::Scrape,
        _ => return Head::Other,
    };
    if target.contains(&b'#') || std::str::from_utf8(target).is_err() {
        return Head::Other;
    }
    for h in lines {
        let Some(colon) = h.iter().position(|&b| b == b':') else { return Head::Other };
        let (name, value) = (&h[..colon], h[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || (name.eq_ignore_ascii_case(b"content-length") && value != b"0")
        {
            // A body or a protocol switch: not a plain tracker GET.
            return Head::Other;
        }
    }
    // "GET " + target start: the query follows the '?'.
    let query_start = 4 + target.len() - query_len;
    Head::Tracker { route, query: query_start..query_start + query_len, keep_alive, len }
}

/// The HTTP/1.1 answer to a tracker request, head and body in one buffer (one write).
pub fn response(body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 96);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(if keep_alive { b"\r\n\r\n" } else { b"\r\nconnection: close\r\n\r\n" });
    out.extend_from_slice(body);
    out
}

/// A connection with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind {
    prefix: Vec<u8>,
    pos: usize,
    inner: TcpStream,
}

impl Rewind {
    pub fn new(prefix: Vec<u8>, inner: TcpStream) -> Self {
        Rewind { prefix, pos: 0, inner }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The listener `axum::serve` is given: connections that are not (or no longer) tracker
/// requests. Dropping it stops accepting.
pub struct TrackerListener {
    rx: mpsc::Receiver<(Rewind, SocketAddr)>,
    local: SocketAddr,
    accept_task: tokio::task::JoinHandle<()>,
}

/// [`TrackerListener`] as `axum::serve` takes it with `ConnectInfo<SocketAddr>` (axum provides
/// the connect info for listeners wrapped by `tap_io`).
pub type FastListener = TapIo<TrackerListener, fn(&mut Rewind)>;

/// Wraps `listener`: tracker requests are answered from `tracker`, the rest goes to axum.
/// Must be called inside a tokio runtime (it starts the accept loop).
pub fn listener(listener: TcpListener, tracker: Arc<TrackerHandle>) -> io::Result<FastListener> {
    let local = listener.local_addr()?;
    // Accepted by hand (see `accept_loop`): the socket is watched for readiness only.
    // SAFETY: the AsyncFd owns the listener, so the descriptor stays open (and is not
    // registered elsewhere: into_std took it out of tokio's reactor) for as long as it is watched.
    let listener = unsafe { AsyncFd::register(listener.into_std()?) }?;
    // Enough to ride out a burst while axum picks connections up; accepting waits when full.
    let (tx, rx) = mpsc::channel(256);
    let accept_task = tokio::spawn(accept_loop(listener, tracker, tx));
    let tap: fn(&mut Rewind) = |_| {};
    Ok(TrackerListener { rx, local, accept_task }.tap_io(tap))
}

impl Drop for TrackerListener {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl Listener for TrackerListener {
    type Io = Rewind;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Rewind, SocketAddr) {
        match self.rx.recv().await {
            Some(c) => c,
            // The accept loop only ends when aborted, i.e. with this listener.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// `accept4` with the new socket non-blocking; `None` when no connection is waiting.
fn accept_nonblocking(listener: &std::net::TcpListener) -> io::Result<(std::net::TcpStream, SocketAddr)> {
    // SAFETY: a zeroed sockaddr_storage is valid; accept4 writes at most `len` bytes into it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the listener's descriptor is open for the call; storage and len are ours.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            &mut storage as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    let stream = unsafe { std::net::TcpStream::from_raw_fd(fd) };
    match sockaddr(&storage, len) {
        Some(a) => Ok((stream, a)),
        None => stream.peer_addr().map(|a| (stream, a)),
    }
}

/// The address accept4 wrote, if it is IPv4 or IPv6.
fn sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in, and it is big enough.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Accepts connections one after the other on this task. A connection whose request has
/// already arrived and is a single tracker request (`Connection: close`, as BitTorrent clients
/// send) is answered right here with one read, one write and a close: no task, no reactor
/// registration. Everything else (request not there yet, keep-alive, not ours) gets a task.
async fn accept_loop(
    listener: AsyncFd<std::net::TcpListener>,
    tracker: Arc<TrackerHandle>,
    tx: mpsc::Sender<(Rewind, SocketAddr)>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let mut guard = match listener.readable().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "waiting for connections failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Take every waiting connection before waiting again.
        loop {
            let (stream, remote) = match accept_nonblocking(listener.get_ref()) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted || e.raw_os_error() == Some(libc::EINTR) => {
                    continue
                }
                Err(e) => {
                    // Out of descriptors and the like: as axum does, wait instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    break;
                }
            };
            let inline = answer_at_once(&stream, remote, &tracker, &mut buf);
            if let Inline::Done = inline {
                continue;
            }
            let mut stream = match TcpStream::from_std(stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "registering a connection failed");
                    continue;
                }
            };
            let prefix = match inline {
                Inline::Later(prefix) => prefix,
                Inline::Finish(rest) => {
                    tokio::spawn(async move { stream.write_all(&rest).await });
                    continue;
                }
                Inline::Done => continue,
            };
            // Kept-alive answers are one write each: never wait for an ACK before the next.
            let _ = stream.set_nodelay(true);
            tokio::spawn(connection(stream, remote, tracker.clone(), tx.clone(), prefix));
        }
    }
}

enum Inline {
    /// Answered and closed (or dead).
    Done,
    /// Needs a task; these bytes were read already.
    Later(Vec<u8>),
    /// Answered but not all sent: a task writes this rest and closes.
    Finish(Vec<u8>),
}

/// The single-request case of [`accept_loop`], on the non-blocking socket.
fn answer_at_once(stream: &std::net::TcpStream, remote: SocketAddr, tracker: &TrackerHandle, buf: &mut [u8]) -> Inline {
    use std::io::{Read, Write};
    let n = match (&*stream).read(buf) {
        Ok(0) => return Inline::Done,
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Inline::Later(Vec::new()),
        Err(_) => return Inline::Done,
    };
    let data = &buf[..n];
    match parse_head(data) {
        // Only a whole single request: nothing may follow it on this connection.
        Head::Tracker { route, query, keep_alive: false, len } if len == n => {
            let q = std::str::from_utf8(&data[query]).unwrap_or("");
            let body = match route {
                Route::Announce => tracker.announce_bytes(q, remote),
                Route::Scrape => tracker.scrape_bytes(q),
            };
            let mut out = response(&body, false);
            // A fresh socket's send buffer takes a tracker answer whole; a rest is left to a
            // task rather than block the accept loop.
            match (&*stream).write(&out) {
                Ok(n) if n == out.len() => Inline::Done,
                Ok(n) => Inline::Finish(out.split_off(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Inline::Finish(out),
                Err(_) => Inline::Done,
            }
        }
        _ => Inline::Later(data.to_vec()),
    }
}

/// Serves tracker requests on one connection until it closes or asks for something else.
async fn connection(
    mut stream: TcpStream,
    remote: SocketAddr,
    tracker: Arc<TrackerHandle>,
    tx: mpsc::Sender<(Rewind, SocketAddr)>,
    mut buf: Vec<u8>,
) {
    buf.reserve(1024);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Head::Incomplete => {}
                other => break other,
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(1024);
            }
            match tokio::time::timeout(HEAD_TIMEOUT, stream.read_buf(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                Ok(Ok(_)) => {}
            }
        };
        match head {
            Head::Tracker { route, query, keep_alive, len } => {
                // parse_head checked the target is UTF-8.
                let q = std::str::from_utf8(&buf[query]).unwrap_or("");
                let body = match route {
                    Route::Announce => tracker.announce_bytes(q, remote),
                    Route::Scrape => tracker.scrape_bytes(q),
                };
                if stream.write_all(&response(&body, keep_alive)).await.is_err() || !keep_alive {
                    return;
                }
                buf.drain(..len);
            }
            Head::Other => {
                // The receiver is gone only when the server stops.
                let _ = tx.send((Rewind::new(buf, stream), remote)).await;
                return;
            }
            Head::Incomplete => unreachable!("the loop above waits until the head is complete"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(head: &str) -> (Route, String, bool, usize) {
        match parse_head(head.as_bytes()) {
            Head::Tracker { route, query, keep_alive, len } => (route, head[query].to_string(), keep_alive, len),
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn announce_and_scrape_heads_are_ours() {
        let h = "GET /announce?info_hash=%12ab&port=1 HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(tracker(h), (Route::Announce, "info_hash=%12ab&port=1".into(), true, h.len()));
        let h = "GET /scrape HTTP/1.0\r\n\r\n";
        assert_eq!(tracker(h), (Route::Scrape, String::new(), false, h.len()));
        let h = "GET /announce? HTTP/1.1\r\nConnection: close\r\n\r\nGET /x";
        assert_eq!(tracker(h), (Route::Announce, String::new(), false, h.len() - 6));
        let h = "GET /scrape?a=b HTTP/1.0\r\nconnection: Keep-Alive\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(tracker(h), (Route::Scrape, "a=b".into(), true, h.len()));
    }

    #[test]
    fn incomplete_heads_wait_and_others_go_to_axum_at_once() {
        assert_eq!(parse_head(b""), Head::Incomplete);
        assert_eq!(parse_head(b"GE"), Head::Incomplete);
        assert_eq!(parse_head(b"GET /announce?x HTTP/1.1\r\nHost: a\r\n"), Head::Incomplete);
        assert_eq!(parse_head(b"POST /api/v1/node"), Head::Other);
        assert_eq!(parse_head(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Head::Other);
        for h in [
            "GET /announcex HTTP/1.1\r\n\r\n",
            "GET /announce/ HTTP/1.1\r\n\r\n",
            "GET /boot/ipxe?mac=1 HTTP/1.1\r\n\r\n",
            "GET http://h/announce HTTP/1.1\r\n\r\n",
            "GET /announce HTTP/2\r\n\r\n",
            "GET /announce  HTTP/1.1\r\n\r\n",
            "GET /announce HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            "GET /announce HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /announce HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            "GET /announce HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert_eq!(parse_head(h.as_bytes()), Head::Other, "{h:?}");
        }
        let long = format!("GET /announce?{} HTTP/1.1", "a".repeat(MAX_HEAD));
        assert_eq!(parse_head(long.as_bytes()), Head::Other);
    }

    #[test]
    fn response_has_length_and_close_when_asked() {
        assert_eq!(
            response(b"d1:ai1ee", true),
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 8\r\n\r\nd1:ai1ee".to_vec()
        );
        assert!(response(b"x", false).ends_with(b"content-length: 1\r\nconnection: close\r\n\r\nx"));
    }

    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn tracker_requests_are_answered_here_and_the_rest_by_axum_on_the_same_connection() {
        use axum::extract::ConnectInfo;
        use axum::routing::get;

        use super::super::{NoTopology, TrackerConfig};

        let handle = Arc::new(TrackerHandle::new(TrackerConfig::default(), Arc::new(NoTopology)));
        let app = super::super::router(handle.clone())
            .route("/hello", get(|ConnectInfo(a): ConnectInfo<SocketAddr>| async move { format!("hello {}", a.ip()) }));
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fast = listener(tcp, handle.clone()).unwrap();
        let addr = fast.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(fast, app.into_make_service_with_connect_info::<SocketAddr>()).await });

        let hash = "%12%00%ff%2B+%25%26%3D%80%3F%01%02%03%04%05%06%07%08%09%0a";
        let announce = |n: u8, close: bool| {
            format!(
                "GET /announce?info_hash={hash}&peer_id=-XX0001-00000000000{n}&port=600{n}&uploaded=0&downloaded=0&left=5 HTTP/1.1\r\nHost: t\r\n{}\r\n",
                if close { "Connection: close\r\n" } else { "" }
            )
        };
        // Two pipelined announces, then a request for axum, on one connection.
        let out = exchange(
            addr,
            &format!("{}{}GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n", announce(1, false), announce(2, false)),
        )
        .await;
        let body = "d8:completei0e10:incompletei1e8:intervali30e12:min intervali30e5:peers0:e";
        let first =
            format!("HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        assert!(out.starts_with(&first), "{out}");
        // The second announce sees the first peer (127.0.0.1:6001).
        let second =
            "d8:completei0e10:incompletei2e8:intervali30e12:min intervali30e5:peers6:\x7f\x00\x00\x01\x17\x71e";
        assert!(out.contains(second), "{out:?}");
        assert!(out.ends_with("hello 127.0.0.1"), "{out}");
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 3, "{out}");

        // One announce per connection, as clients do: closed after the answer.
        let out = exchange(addr, &announce(3, true)).await;
        assert!(out.contains("connection: close\r\n\r\nd8:complete"), "{out}");
        // HTTP/1.0 scrape
        let out = exchange(addr, &format!("GET /scrape?info_hash={hash} HTTP/1.0\r\n\r\n")).await;
        assert!(out.contains("d5:filesd20:"), "{out}");
        // the answers are the router's
        let direct = handle.scrape_bytes(&format!("info_hash={hash}"));
        assert!(out.ends_with(&*String::from_utf8_lossy(&direct)), "{out}");
        // unknown paths and other methods are axum's
        let out = exchange(addr, "GET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        let out = exchange(addr, "POST /announce HTTP/1.1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    }
}
