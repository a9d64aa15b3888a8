//! Serving the HTTP port (REST API, boot scripts, images, tracker) with hyper, guarded against
//! slow and greedy clients.
//!
//! `axum::serve` has no knobs for this: it reads request heads for as long as a client likes and
//! accepts every connection until `accept` fails for lack of file descriptors, which then takes
//! the API, `/boot/ipxe` and TFTP (same process) down with it. Here every connection goes
//! through hyper's HTTP/1 server with a timer, so:
//!
//! - a request head (the first one and every one after on a kept-alive connection, including the
//!   idle wait for it) must arrive whole within `header_timeout_s` (hyper's header read timeout),
//!   else the connection is closed;
//! - at most `max_connections` connections are open at once, and at most
//!   `max_connections_per_address` from one address ([`ConnLimits`]); a connection beyond either
//!   is closed at once, before anything is read;
//! - at start-up the process's open-file soft limit is raised to its hard limit
//!   ([`raise_open_file_limit`]), so the caps, not the descriptor limit, decide.
//!
//! HTTP/1.1 only (iPXE, BitTorrent clients, the agent and the CLI all speak it). The peer's
//! address reaches handlers as `ConnectInfo<SocketAddr>`, as with `axum::serve`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// The `[http]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Seconds a client has to send a whole request head (and, on a kept-alive connection, the
    /// next one). Default 10.
    pub header_timeout_s: u64,
    /// Open connections at once; beyond this, new ones are closed at once. Default 4096.
    pub max_connections: usize,
    /// Open connections from one address; beyond this, new ones from it are closed at once.
    /// Default 64 (a booting node needs a handful).
    pub max_connections_per_address: usize,
    /// HTTPS address of the admin API (`/api/v1`). Default 0.0.0.0:7051.
    pub api_listen: SocketAddr,
    /// The admin API's certificate chain (PEM). Unset: the one `luna-server init` generates in
    /// `<data_dir>/tls/`. Set together with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`; tightened to 0600 at start if others may read it.
    pub tls_key: Option<PathBuf>,
    /// Names (DNS or IP) clients reach the API by, added to the certificate `init` generates.
    pub tls_names: Vec<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout_s: 10,
            max_connections: 4096,
            max_connections_per_address: 64,
            api_listen: SocketAddr::from(([0, 0, 0, 0], 7051)),
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
        }
    }
}

impl HttpConfig {
    /// The `[http]` section for `--print-config`.
    pub fn documented_defaults() -> String {
        let d = HttpConfig::default();
        format!(
            r#"
# The HTTP ports: limits against slow or greedy clients (both ports), and the admin API's
# HTTPS port. The boot port (`listen`: iPXE scripts, images, tracker) stays plain HTTP, as iPXE
# cannot verify a certificate; it refuses /api/v1 and any request carrying a bearer token.
[http]
# Seconds a client has to send a whole request head (also the idle limit between requests, and
# the limit for a TLS handshake).
header_timeout_s = {}
# Connections open at once, in total and from one address, over both ports; more are closed at once.
max_connections = {}
max_connections_per_address = {}
# HTTPS address of the admin API (/api/v1); `luna` and `lpower` verify its certificate.
api_listen = "{}"
# The API's certificate and key (PEM). Unset: `luna-server init` generates a CA and a
# certificate in <data_dir>/tls/ (clients trust <data_dir>/tls/ca.pem, which the package
# copies to /etc/luna/ca.pem).
# tls_cert = "/etc/luna/tls/server.pem"
# tls_key = "/etc/luna/tls/server.key"
# Extra names (DNS or IP) clients use for the API, put into the generated certificate besides
# localhost, the host name and the host's addresses.
tls_names = []
"#,
            d.header_timeout_s, d.max_connections, d.max_connections_per_address, d.api_listen
        )
    }

    /// Refuses settings that would make the port unusable.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_timeout_s == 0 {
            return Err("[http] header_timeout_s must be at least 1".into());
        }
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err("[http] max_connections and max_connections_per_address must be at least 1".into());
        }
        Ok(())
    }
}

/// Connection counts, in total and per address (sans-IO: addresses in, tickets out).
#[derive(Debug)]
pub struct ConnLimits {
    total_max: usize,
    per_address_max: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Total,
    PerAddress,
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct Ticket {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl ConnLimits {
    pub fn new(total_max: usize, per_address_max: usize) -> Arc<Self> {
        Arc::new(ConnLimits { total_max, per_address_max, open: Mutex::new(Open::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        // Counting only: a panic under the lock cannot leave anything half-done worth refusing.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a connection from `ip`, if there is one.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refused> {
        let ip = ip.to_canonical();
        let mut open = self.lock();
        if open.total >= self.total_max {
            return Err(Refused::Total);
        }
        let n = open.by_address.entry(ip).or_insert(0);
        if *n >= self.per_address_max {
            return Err(Refused::PerAddress);
        }
        *n += 1;
        open.total += 1;
        Ok(Ticket { limits: self.clone(), ip })
    }

    /// Open connections: in total and from `ip`.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let open = self.lock();
        (open.total, open.by_address.get(&ip.to_canonical()).copied().unwrap_or(0))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        open.total -= 1;
        if let Some(n) = open.by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&self.ip);
            }
        }
    }
}

/// Raises the open-file soft limit to the hard limit; returns the limit in force.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

/// Whether the plain-HTTP boot port refuses a request: the admin API (`/api/...`) lives on the
/// HTTPS port only, and a request carrying credentials (`Authorization`) is refused whatever its
/// path, so a misdirected admin client fails loudly instead of working in clear (sans-IO).
pub fn plain_port_refuses(path: &str, has_authorization: bool) -> bool {
    has_authorization || path == "/api" || path.starts_with("/api/")
}

/// Middleware of the boot port: see [`plain_port_refuses`]. `api_port` is the HTTPS port named in
/// the refusal. The bearer token, if any, is neither checked nor logged.
pub async fn plain_port_guard(
    axum::extract::State(api_port): axum::extract::State<u16>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let has_auth = req.headers().contains_key(hyper::header::AUTHORIZATION);
    if !plain_port_refuses(req.uri().path(), has_auth) {
        return next.run(req).await;
    }
    crate::http::error_response(
        hyper::StatusCode::FORBIDDEN,
        luna_core::api::ErrorCode::Forbidden,
        format!(
            "this plain-HTTP port serves only the boot path and refuses admin requests and credentials: \
             the admin API is served over HTTPS at port {api_port}"
        ),
    )
}

/// How long shutdown waits for open connections to finish their request.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `cancel` fires, then lets open requests finish (at most
/// [`SHUTDOWN_GRACE`]). With `tls`, each connection first completes a TLS handshake, which must
/// end within `header_timeout_s` like a request head. `limits` may be shared between listeners,
/// so the caps hold for the process. Fails only if accepting fails for a reason other than a
/// client or a resource shortage (those are logged and waited out).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: &HttpConfig,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: Arc<ConnLimits>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let header_timeout = Duration::from_secs(config.header_timeout_s);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "http accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        let ticket = match limits.admit(remote.ip()) {
            Ok(t) => t,
            Err(why) => {
                tracing::debug!(%remote, ?why, "http connection refused: too many open");
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(remote));
            let app = app.clone();
            async move { Ok::<_, Infallible>(app.oneshot(req).await.unwrap_or_else(|never| match never {})) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => watcher.watch(builder.serve_connection(TokioIo::new(stream), service)).await,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "tls handshake failed");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "tls handshake timed out");
                        Ok(())
                    }
                },
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "http connection ended with an error");
            }
            drop(ticket);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown()).await.is_err() {
        tracing::warn!("http connections still open after {SHUTDOWN_GRACE:?}; closing them");
    }
    Ok(())
}

/// Out of descriptors or memory: wait for connections to close.
fn is_transient(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// A client that went away between SYN and accept.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset | Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, n])
    }

    #[test]
    fn caps_count_per_address_and_in_total_and_free_on_drop() {
        let l = ConnLimits::new(3, 2);
        let a1 = l.admit(ip(1)).unwrap();
        let a2 = l.admit(ip(1)).unwrap();
        assert_eq!(l.admit(ip(1)).unwrap_err(), Refused::PerAddress);
        let b1 = l.admit(ip(2)).unwrap();
        assert_eq!(l.admit(ip(3)).unwrap_err(), Refused::Total);
        assert_eq!(l.open(ip(1)), (3, 2));
        drop(a1);
        assert_eq!(l.open(ip(1)), (2, 1));
        let _a3 = l.admit(ip(1)).unwrap();
        drop((a2, b1));
        assert_eq!(l.open(ip(2)), (1, 0));
        // IPv4-mapped IPv6 is the same address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(l.open(mapped), (1, 1));
        let _m = l.admit(mapped).unwrap();
        assert_eq!(l.admit(ip(1)).unwrap_err(), Refused::PerAddress);
    }

    #[test]
    fn plain_port_refuses_the_api_and_any_credentials() {
        assert!(plain_port_refuses("/api/v1/cluster", false));
        assert!(plain_port_refuses("/api", false));
        assert!(plain_port_refuses("/boot/ipxe", true));
        assert!(!plain_port_refuses("/boot/ipxe", false));
        assert!(!plain_port_refuses("/announce", false));
        assert!(!plain_port_refuses("/apiary", false));
    }

    #[test]
    fn defaults_parse_back_and_zero_is_refused() {
        let d: HttpConfig = toml::from_str(
            &HttpConfig::documented_defaults().replace("[http]", "").lines().collect::<Vec<_>>().join("\n"),
        )
        .unwrap();
        assert_eq!(d, HttpConfig::default());
        assert!(HttpConfig { header_timeout_s: 0, ..d.clone() }.validate().unwrap_err().contains("header_timeout_s"));
        assert!(HttpConfig { max_connections: 0, ..d }.validate().unwrap_err().contains("max_connections"));
    }
}
