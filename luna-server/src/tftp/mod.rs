//! luna's built-in read-only TFTP server: hands the iPXE binaries (and anything placed in its
//! root) to PXE ROMs.
//!
//! - [`packet`]: wire format; [`transfer`]: one transfer as a sans-IO state machine (RFC 1350,
//!   2347 options, 2348 blksize, 2349 tsize/timeout, 7440 windowsize, block rollover);
//!   [`files`]: name → bytes, confined to the root; [`net`]: the IP_PKTINFO receive call.
//! - This file: the configuration and the thin tokio loops. The listener parses requests and
//!   spawns one task per transfer; each task has its own ephemeral, connected socket (the
//!   transfer ID of RFC 1350) bound to the address the client talked to.

pub mod files;
pub mod net;
pub mod packet;
pub mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinSet;

use files::{Refusal, Resolver};
use packet::{ErrorCode, Packet, Request, MAX_BLKSIZE};
use transfer::{blksize_for_mtu, negotiate, Limits, Status, Transfer};

/// The `[tftp]` section of the server configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TftpConfig {
    /// Run the TFTP server. Default `true`.
    pub enabled: bool,
    /// Directory served read-only; nothing outside it is ever served. Default
    /// `/var/lib/luna/tftpboot`. It may be missing: then only `ipxe_files` are served.
    pub root: PathBuf,
    /// Listening address. Default `0.0.0.0:69`. On a wildcard address each reply still comes
    /// from the address the client sent to.
    pub bind: SocketAddr,
    /// Files served under exactly these names from these source paths, without copying them
    /// into `root` (a file of the same name in `root` wins). Default: the Debian/Ubuntu `ipxe`
    /// package's `undionly.kpxe`, `ipxe.efi` and `snponly.efi` in `/usr/lib/ipxe/`.
    pub ipxe_files: BTreeMap<String, PathBuf>,
    /// MTU of the provisioning network: when set, `blksize` is capped so that a DATA packet
    /// fits one frame (MTU − 32 on IPv4, − 52 on IPv6). Default: unset (cap 65464, RFC 2348).
    pub mtu: Option<u16>,
    /// Largest `windowsize` (RFC 7440) granted. Default 64.
    pub max_windowsize: u16,
    /// Retransmission timeout in milliseconds when the client does not negotiate `timeout`.
    /// Default 1000.
    pub timeout_ms: u64,
    /// Timeouts in a row before a transfer is abandoned. Default 5.
    pub max_retries: u32,
    /// Concurrent transfers; beyond this, requests get "server busy". Each holds one socket
    /// (and one file descriptor while a big uncached file is served), so keep the process's
    /// open-file limit above this. Default 512.
    pub max_transfers: usize,
    /// Concurrent transfers per client address (IP, any port); beyond this that address gets
    /// "too many transfers" while everyone else is served. A PXE ROM runs one at a time (a
    /// UEFI size query and its fetch overlap briefly). Default 4.
    pub max_transfers_per_client: usize,
    /// Longest retransmission timeout (seconds) a client may negotiate with the `timeout`
    /// option; a longer one is declined and `timeout_ms` used. Default 5, at most 255.
    pub max_timeout_secs: u8,
    /// Seconds a transfer may go without an ACK that moves it on before it is abandoned,
    /// however many retries are left: bounds how long a silent client holds a slot. Default 20.
    pub abandon_after_secs: u32,
}

impl Default for TftpConfig {
    fn default() -> Self {
        let ipxe = |name: &str| (name.to_string(), PathBuf::from(format!("/usr/lib/ipxe/{name}")));
        TftpConfig {
            enabled: true,
            root: PathBuf::from("/var/lib/luna/tftpboot"),
            bind: SocketAddr::from(([0, 0, 0, 0], 69)),
            ipxe_files: [ipxe("undionly.kpxe"), ipxe("ipxe.efi"), ipxe("snponly.efi")].into_iter().collect(),
            mtu: None,
            max_windowsize: 64,
            timeout_ms: 1000,
            max_retries: 5,
            max_transfers: 512,
            max_transfers_per_client: 4,
            max_timeout_secs: 5,
            abandon_after_secs: 20,
        }
    }
}

impl TftpConfig {
    /// The defaults as a commented `[tftp]` TOML section.
    pub fn documented_defaults() -> String {
        let d = TftpConfig::default();
        let files: Vec<String> = d.ipxe_files.iter().map(|(k, v)| format!("\"{k}\" = \"{}\"", v.display())).collect();
        format!(
            r#"[tftp]
# Run the built-in read-only TFTP server (serves the iPXE binaries to PXE ROMs).
enabled = {enabled}
# Directory served; nothing outside it is ever served. May be missing.
root = "{root}"
# Listening address; replies come from the address each client talked to.
bind = "{bind}"
# MTU of the provisioning network; caps the block size to fit one frame. Unset: no cap.
# mtu = 1500
# Largest RFC 7440 window granted.
max_windowsize = {win}
# Retransmission timeout (ms) unless the client negotiates one.
timeout_ms = {timeout}
# Timeouts in a row before a transfer is abandoned.
max_retries = {retries}
# Concurrent transfers (each needs a file descriptor).
max_transfers = {max}
# Concurrent transfers per client address; more get "too many transfers".
max_transfers_per_client = {per_client}
# Longest negotiated retransmission timeout (s); a longer one is declined.
max_timeout_secs = {max_timeout}
# A transfer with no ACK moving it on for this long (s) is abandoned.
abandon_after_secs = {abandon}

# Served under exactly these names without being copied into root; a file of the same name
# in root wins.
[tftp.ipxe_files]
{files}
"#,
            enabled = d.enabled,
            root = d.root.display(),
            bind = d.bind,
            win = d.max_windowsize,
            timeout = d.timeout_ms,
            retries = d.max_retries,
            max = d.max_transfers,
            per_client = d.max_transfers_per_client,
            max_timeout = d.max_timeout_secs,
            abandon = d.abandon_after_secs,
            files = files.join("\n"),
        )
    }

    fn limits(&self, ipv6: bool) -> Limits {
        Limits {
            max_blksize: self.mtu.map(|m| blksize_for_mtu(m, ipv6)).unwrap_or(MAX_BLKSIZE),
            max_windowsize: self.max_windowsize.max(1),
            default_timeout: Duration::from_millis(self.timeout_ms.max(1)),
            max_retries: self.max_retries,
            max_timeout: Duration::from_secs(u64::from(self.max_timeout_secs.max(1))),
        }
    }

    /// Checks what serde cannot; [`TftpServer::bind`] calls it first.
    pub fn validate(&self) -> Result<(), TftpError> {
        let bad = |m: String| Err(TftpError::Config(m));
        if self.max_transfers == 0 {
            return bad("tftp max_transfers must be at least 1".into());
        }
        if self.max_transfers_per_client == 0 {
            return bad("tftp max_transfers_per_client must be at least 1".into());
        }
        if self.max_timeout_secs == 0 {
            return bad("tftp max_timeout_secs must be 1 to 255".into());
        }
        if self.abandon_after_secs == 0 {
            return bad("tftp abandon_after_secs must be at least 1".into());
        }
        if self.timeout_ms == 0 || self.timeout_ms > u64::from(self.abandon_after_secs) * 1000 {
            return bad(format!(
                "tftp timeout_ms {} must be at least 1 and at most abandon_after_secs ({} s)",
                self.timeout_ms, self.abandon_after_secs
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TftpError {
    #[error("cannot bind tftp socket {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("invalid tftp configuration: {0}")]
    Config(String),
}

/// Runs the TFTP server until `shutdown` becomes true (or its sender is dropped). When
/// `cfg.enabled` is false, it just waits for shutdown, so it can sit in a `select!` with the
/// other services.
pub async fn serve(cfg: TftpConfig, mut shutdown: watch::Receiver<bool>) -> Result<(), TftpError> {
    if !cfg.enabled {
        tracing::info!("tftp: disabled");
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        return Ok(());
    }
    TftpServer::bind(cfg).await?.run(shutdown).await
}

/// A bound server; [`TftpServer::bind`] then [`TftpServer::run`] is [`serve`] with a chance
/// to learn the port in between (tests bind port 0).
pub struct TftpServer {
    cfg: TftpConfig,
    socket: UdpSocket,
    pktinfo: bool,
    resolver: Arc<Resolver>,
}

impl TftpServer {
    pub async fn bind(cfg: TftpConfig) -> Result<TftpServer, TftpError> {
        cfg.validate()?;
        let resolver = Resolver::new(cfg.root.clone(), &cfg.ipxe_files).map_err(TftpError::Config)?;
        for (name, src) in &cfg.ipxe_files {
            if !src.is_file() {
                tracing::warn!(name, source = %src.display(), "tftp: ipxe file missing (install the ipxe package?)");
            }
        }
        let socket = UdpSocket::bind(cfg.bind).await.map_err(|source| TftpError::Bind { addr: cfg.bind, source })?;
        // Only a wildcard listener needs to be told where each request was sent.
        let pktinfo = cfg.bind.ip().is_unspecified() && net::enable_pktinfo(&socket, cfg.bind.is_ipv6());
        Ok(TftpServer { cfg, socket, pktinfo, resolver: Arc::new(resolver) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) -> Result<(), TftpError> {
        let addr = self.socket.local_addr().unwrap_or(self.cfg.bind);
        tracing::info!(%addr, root = %self.cfg.root.display(), "tftp: serving");
        let ctx = Arc::new(Ctx { cfg: self.cfg.clone(), resolver: self.resolver.clone() });
        let mut tasks: JoinSet<()> = JoinSet::new();
        // Peers with a transfer running: a retransmitted RRQ must not start a second one.
        let mut active: HashMap<tokio::task::Id, SocketAddr> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        loop {
            if *shutdown.borrow_and_update() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            if e.is_panic() {
                                tracing::error!("tftp: transfer task panicked");
                            }
                            e.id()
                        }
                    };
                    active.remove(&id);
                }
                received = self.recv(&mut buf) => match received {
                    Ok((n, peer, local)) => {
                        if let Some(req) = self.on_request(&buf[..n], peer, &active, tasks.len()).await {
                            let local = self.reply_address(local, peer);
                            let handle = tasks.spawn(transfer_task(ctx.clone(), req, peer, local));
                            active.insert(handle.id(), peer);
                        }
                    }
                    Err(e) => {
                        // ICMP errors from earlier replies surface here; none is fatal.
                        tracing::debug!(error = %e, "tftp: receive failed");
                    }
                },
            }
        }
        tracing::info!(aborted = tasks.len(), "tftp: shutting down");
        tasks.shutdown().await;
        Ok(())
    }

    async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
        if self.pktinfo {
            net::recv_with_local(&self.socket, buf).await
        } else {
            let (n, peer) = self.socket.recv_from(buf).await?;
            Ok((n, peer, None))
        }
    }

    /// The address a transfer's socket binds to: the listener's own address, else the one the
    /// request was sent to, written in the listener's family.
    fn reply_address(&self, local: Option<IpAddr>, peer: SocketAddr) -> IpAddr {
        let bind = self.cfg.bind.ip();
        if !bind.is_unspecified() {
            return bind;
        }
        match (local, peer) {
            (Some(IpAddr::V4(v4)), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
            (Some(ip), _) => ip,
            (None, _) => bind,
        }
    }

    /// Checks a datagram sent to the listener; returns the request to serve, answering
    /// everything else itself.
    async fn on_request(
        &self,
        datagram: &[u8],
        peer: SocketAddr,
        active: &HashMap<tokio::task::Id, SocketAddr>,
        running: usize,
    ) -> Option<Request> {
        let mut out = Vec::new();
        match packet::parse(datagram) {
            Ok(Packet::Rrq(req)) => {
                if active.values().any(|p| *p == peer) {
                    tracing::debug!(%peer, "tftp: retransmitted request ignored, transfer running");
                    return None;
                }
                let same_client = active.values().filter(|p| p.ip() == peer.ip()).count();
                if same_client >= self.cfg.max_transfers_per_client {
                    tracing::warn!(%peer, running = same_client, "tftp: too many transfers from this address, request refused");
                    packet::encode_error(&mut out, ErrorCode::NotDefined, "too many transfers from your address");
                } else if running >= self.cfg.max_transfers {
                    tracing::warn!(%peer, running, "tftp: too many transfers, request refused");
                    packet::encode_error(&mut out, ErrorCode::NotDefined, "server busy, try again");
                } else {
                    return Some(req);
                }
            }
            Ok(Packet::Wrq(req)) => {
                tracing::info!(%peer, file = %String::from_utf8_lossy(&req.filename), "tftp: write request refused");
                packet::encode_error(&mut out, ErrorCode::AccessViolation, "read-only");
            }
            Ok(_) => {
                // DATA/ACK/ERROR/OACK on port 69 belong to no transfer; answering them could
                // start an error ping-pong with another server.
                tracing::debug!(%peer, "tftp: stray packet on the listener ignored");
                return None;
            }
            Err(e) => {
                tracing::debug!(%peer, error = %e, "tftp: malformed request");
                packet::encode_error(&mut out, e.code(), &e.to_string());
            }
        }
        if let Err(e) = self.socket.send_to(&out, peer).await {
            tracing::debug!(%peer, error = %e, "tftp: cannot send error reply");
        }
        None
    }
}

struct Ctx {
    cfg: TftpConfig,
    resolver: Arc<Resolver>,
}

async fn transfer_task(ctx: Arc<Ctx>, req: Request, peer: SocketAddr, local: IpAddr) {
    let file = String::from_utf8_lossy(&req.filename).into_owned();
    if let Err(e) = run_transfer(&ctx, req, peer, local, &file).await {
        tracing::warn!(%peer, file, error = %e, "tftp: transfer aborted");
    }
}

async fn transfer_socket(local: IpAddr, peer: SocketAddr) -> io::Result<UdpSocket> {
    let sock = match UdpSocket::bind((local, 0)).await {
        Ok(s) => s,
        // The address may have gone away (a moved floating address): let routing pick one.
        Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
            let any: IpAddr = if peer.is_ipv6() { [0u16; 8].into() } else { [0u8; 4].into() };
            UdpSocket::bind((any, 0)).await?
        }
        Err(e) => return Err(e),
    };
    // Connected: the kernel drops datagrams from any other TID for us.
    sock.connect(peer).await?;
    Ok(sock)
}

async fn run_transfer(ctx: &Ctx, req: Request, peer: SocketAddr, local: IpAddr, file: &str) -> io::Result<()> {
    let sock = transfer_socket(local, peer).await?;
    let resolver = ctx.resolver.clone();
    let (name, mode) = (req.filename.clone(), req.mode);
    let opened = tokio::task::spawn_blocking(move || resolver.open(&name, mode))
        .await
        .unwrap_or_else(|e| Err(Refusal::Io(format!("file lookup failed: {e}"))));
    let opened = match opened {
        Ok(o) => o,
        Err(refusal) => {
            tracing::info!(%peer, file, reason = %refusal, "tftp: request refused");
            let mut out = Vec::new();
            packet::encode_error(&mut out, refusal.code(), &refusal.to_string());
            sock.send(&out).await?;
            return Ok(());
        }
    };
    let limits = ctx.cfg.limits(peer.is_ipv6());
    let neg = negotiate(&req, opened.len, &limits);
    let (blksize, windowsize) = (neg.blksize, neg.windowsize);
    let started = Instant::now();
    let mut transfer = Transfer::new(neg, opened.len, limits.max_retries, started)
        .give_up_after(Duration::from_secs(u64::from(ctx.cfg.abandon_after_secs)));
    let mut source = opened.source;
    drive(&sock, &mut transfer, &mut source).await?;
    let stats = transfer.stats();
    match transfer.status() {
        Status::Done => tracing::info!(
            %peer, file, path = %opened.path.display(), bytes = opened.len, blksize, windowsize,
            ms = started.elapsed().as_millis() as u64, retransmitted = stats.retransmitted,
            "tftp: sent"
        ),
        // UEFI PXE clients ask for the size first and end that transfer after the OACK (error
        // 8); they fetch the file right after, so that is no failure.
        Status::Failed(transfer::Failure::ClientError { code: ErrorCode::OptionNegotiation, .. })
            if stats.data_sent == 0 =>
        {
            tracing::debug!(%peer, file, "tftp: size query answered")
        }
        Status::Failed(why) => tracing::warn!(%peer, file, reason = ?why, "tftp: transfer failed"),
        Status::Running => {}
    }
    Ok(())
}

/// The thin I/O loop around [`Transfer`].
async fn drive(sock: &UdpSocket, t: &mut Transfer, src: &mut files::Source) -> io::Result<()> {
    let mut out = Vec::with_capacity(t.blksize() as usize + 4);
    // Clients only send ACKs and ERRORs; a longer datagram is cut, which is harmless.
    let mut inbuf = vec![0u8; 1024];
    loop {
        while t.poll_transmit(src, &mut out) {
            sock.send(&out).await?;
        }
        if t.is_finished() {
            return Ok(());
        }
        let Some(deadline) = t.poll_timeout() else { return Ok(()) };
        tokio::select! {
            received = sock.recv(&mut inbuf) => match received {
                Ok(n) => t.handle_datagram(Instant::now(), &inbuf[..n]),
                // Typically ICMP port unreachable (connection refused): the client is gone.
                Err(e) => return Err(e),
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {
                t.handle_timeout(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_documented_and_parse_back() {
        #[derive(Deserialize)]
        struct Wrapper {
            tftp: TftpConfig,
        }
        let text = TftpConfig::documented_defaults();
        let parsed: Wrapper = toml::from_str(&text).unwrap();
        assert_eq!(parsed.tftp, TftpConfig::default());
        let d = TftpConfig::default();
        assert_eq!(d.ipxe_files["undionly.kpxe"], PathBuf::from("/usr/lib/ipxe/undionly.kpxe"));
        assert_eq!(d.ipxe_files["ipxe.efi"], PathBuf::from("/usr/lib/ipxe/ipxe.efi"));
        assert_eq!(d.ipxe_files["snponly.efi"], PathBuf::from("/usr/lib/ipxe/snponly.efi"));
        assert_eq!(d.bind, "0.0.0.0:69".parse().unwrap());
    }

    #[test]
    fn config_rejects_unknown_keys_and_fills_defaults() {
        let c: TftpConfig = toml::from_str("bind = \"127.0.0.1:6969\"\nmtu = 1500").unwrap();
        assert_eq!(c.bind, "127.0.0.1:6969".parse().unwrap());
        assert_eq!(c.root, PathBuf::from("/var/lib/luna/tftpboot"));
        assert_eq!(c.limits(false).max_blksize, 1468);
        assert_eq!(c.limits(true).max_blksize, 1448);
        assert!(toml::from_str::<TftpConfig>("blksize = 5").is_err());
        assert!(toml::from_str::<TftpConfig>("max_timeout_secs = 256").is_err());
    }

    #[test]
    fn validate_names_the_bad_key() {
        TftpConfig::default().validate().unwrap();
        for (cfg, key) in [
            (TftpConfig { max_transfers_per_client: 0, ..TftpConfig::default() }, "max_transfers_per_client"),
            (TftpConfig { max_timeout_secs: 0, ..TftpConfig::default() }, "max_timeout_secs"),
            (TftpConfig { abandon_after_secs: 0, ..TftpConfig::default() }, "abandon_after_secs"),
            (TftpConfig { max_transfers: 0, ..TftpConfig::default() }, "max_transfers"),
            (TftpConfig { timeout_ms: 30_000, ..TftpConfig::default() }, "timeout_ms 30000"),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
