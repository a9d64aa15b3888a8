//! Start-up and shutdown: `init` and `serve`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api;
use crate::boot::{self, BootContext, BootTokens};
use crate::config::Config;
use crate::dhcp::{self, DhcpError, DhcpEvent, DhcpStatusSink};
use crate::http::{self, AppState};
use crate::service::{Service, ServiceError};
use crate::store::{self, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("cannot read token file {path}: {source} (run `luna-server init` first)")]
    TokenRead { path: PathBuf, source: std::io::Error },
    #[error("token file {path} is empty (run `luna-server init` again)")]
    TokenEmpty { path: PathBuf },
    #[error("cannot write token file {path}: {source}")]
    TokenWrite { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("http server failed: {0}")]
    Http(std::io::Error),
    #[error(transparent)]
    Dhcp(#[from] DhcpError),
    #[error(transparent)]
    Tftp(#[from] crate::tftp::TftpError),
    #[error("cannot start the seeder: {0}")]
    Seeder(String),
    #[error("data directory: {0}")]
    DataDir(#[from] crate::fsperm::PermError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Power(#[from] crate::power::PowerConfigError),
    #[error(transparent)]
    Servers(#[from] crate::servers::ServersError),
    #[error("admin API tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Creates the store and the cluster object, and the admin token file if there is none.
pub async fn init(config: &Config) -> Result<InitReport, ServerError> {
    crate::fsperm::secure_dir(&config.data_dir)?;
    let store = store::open(&config.store).await?;
    let service = Service::new(store);
    let cluster = service.ensure_cluster(&config.cluster_name).await?;
    let token_created = ensure_token(&config.token_file)?;
    let tls = crate::tls::ensure(config)?;
    Ok(InitReport { cluster: cluster.name, token_file: config.token_file.clone(), token_created, tls })
}

pub struct InitReport {
    pub cluster: String,
    pub token_file: PathBuf,
    pub token_created: bool,
    /// What became of the admin API's certificate.
    pub tls: crate::tls::Ensured,
}

fn ensure_token(path: &Path) -> Result<bool, ServerError> {
    if path.exists() {
        return Ok(false);
    }
    let err = |source| ServerError::TokenWrite { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let token: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(err)?;
    writeln!(f, "{token}").map_err(err)?;
    Ok(true)
}

pub fn read_token(path: &Path) -> Result<String, ServerError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServerError::TokenRead { path: path.into(), source })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(ServerError::TokenEmpty { path: path.into() });
    }
    Ok(token)
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Tells systemd (`Type=notify`, `NOTIFY_SOCKET` set) that every listener is bound. Outside
/// systemd there is no socket and nothing is sent.
fn notify_ready() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that the server is ready");
    }
}

/// Tells systemd that a shutdown began (queued status is flushed before the process exits).
fn notify_stopping() {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::warn!(error = %e, "cannot tell systemd that the server is stopping");
    }
}

/// Routes DHCP events into node status without blocking the packet path.
struct StatusToService(Service);

impl DhcpStatusSink for StatusToService {
    fn dhcp_event(&self, event: DhcpEvent) {
        let msg = format!("{} {}", event.kind.message(), event.ip);
        // Queued, not awaited: the reply already went out.
        self.0.queue_node_status(&event.node, dhcp::DhcpEventKind::STEP, msg);
    }
}

/// Runs every service of the server until `shutdown` turns true.
pub async fn serve(config: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
    // Published images and the embedded store live here; nobody but luna reads them.
    crate::fsperm::secure_dir(&config.data_dir)?;
    config.http.validate().map_err(ServerError::Config)?;
    config.server.validate().map_err(ServerError::Config)?;
    let server_id = config.server.identity().map_err(ServerError::Config)?;
    if config.listen.port() != 0
        && config.http.api_listen.port() == config.listen.port()
        && (config.http.api_listen.ip() == config.listen.ip()
            || config.http.api_listen.ip().is_unspecified()
            || config.listen.ip().is_unspecified())
    {
        return Err(ServerError::Config(format!(
            "[http] api_listen {} and listen {} share a port: the admin API needs its own (HTTPS) port",
            config.http.api_listen, config.listen
        )));
    }
    // Loaded before anything listens: a server whose API cannot be reached safely does not start.
    let tls_config = crate::tls::server_config(&crate::tls::TlsPaths::of(&config)?)?;
    // Connections, TFTP transfers and the seeder's files all take descriptors: let the caps in
    // [http] and [tftp], not the usual soft limit of 1024, decide.
    match crate::httpd::raise_open_file_limit() {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    // Every commit is watched for the live view (status and node changes) and timed.
    let live = Arc::new(crate::live::Live::new(crate::metrics::global().clone()));
    let store = live.observe(store::open(&config.store).await?);
    tracing::info!(backend = store.backend(), "store opened");
    let service = Service::new(store.clone());
    service.ensure_cluster(&config.cluster_name).await?;
    let admin_token = read_token(&config.token_file)?;
    let view = Arc::new(crate::servers::View::new(&server_id));
    let discovery = crate::discovery::Discovery::new(
        service.clone(),
        config.discovery.clone(),
        Arc::new(crate::discovery::transport::Udp),
    );
    let boot = BootContext::new(BootTokens::new(admin_token.as_bytes()), config.data_dir.clone())
        .with_discovery(discovery.clone())
        .with_servers(view.clone());
    // Every server sweeps the shared ledger (a delete is a CAS: two sweeping at once is harmless).
    let token_sweep = boot::token::Ledger::new(BootTokens::new(admin_token.as_bytes()), store.clone());
    live.seed(&crate::web::snapshot(&service).await?);
    let state = Arc::new(AppState::with_live(service.clone(), admin_token, live));

    let topology = Arc::new(crate::wiring::StoreTopology::default());
    let cluster = service.cluster().await?;
    // interval and max_peers follow the cluster object (see wiring::follow_store).
    let tracker_config = config.tracker.config(&cluster);
    let tracker = Arc::new(crate::tracker::TrackerHandle::new(tracker_config, topology.clone()));
    // The swarms of the last clean stop: peers keep their remaining lifetime, counters go on.
    let swarm_file = config.data_dir.join(crate::tracker::persist::FILE_NAME);
    match crate::tracker::persist::load(&swarm_file) {
        Ok(Some(saved)) => {
            let peers = tracker.restore(&saved.torrents, saved.age(crate::service::unix_now()));
            tracing::info!(torrents = saved.torrents.len(), peers, "tracker swarms restored");
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "tracker starts empty"),
    }
    let images = Arc::new(
        crate::image::ImageState::new(service.clone(), &config.data_dir, config.image.clone())
            .with_stats(Arc::new(crate::wiring::TrackerStats(tracker.clone())))
            .with_view(view.clone()),
    );
    let image_api = crate::image::http::router(images.clone())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), http::require_token));
    let power = crate::power::Power::new(config.power.clone())?;
    let power_api =
        crate::power::http::router(Arc::new(crate::power::http::PowerState { service: service.clone(), power }))
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), http::require_token));
    // The boot routes are on both ports: nodes use the plain one; admin previews
    // (`/boot/ipxe?preview=1`, which need the token) come over HTTPS.
    let boot_routes = boot::router(state.clone(), boot);
    // The live page, its event stream and /metrics: over HTTPS with the API (they take the
    // admin token, which never crosses the plain port).
    let web = crate::web::Web::new(state.clone(), Some(images.clone()), config.metrics.clone());
    let admin_app = api::router(state.clone())
        .merge(crate::web::router(web.clone()))
        .merge(image_api)
        .merge(power_api)
        .merge(crate::discovery::http::router(discovery.clone(), state.clone()))
        .merge(crate::servers::router(store.clone(), config.server.heartbeat_interval_s, state))
        .merge(boot_routes.clone());
    let plain_app = crate::image::http::files_router(images.clone())
        .merge(crate::tracker::router(tracker.clone()))
        .merge(boot_routes)
        .layer(axum::middleware::from_fn_with_state(config.http.api_listen.port(), crate::httpd::plain_port_guard));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.listen, source })?;
    let api_listener = tokio::net::TcpListener::bind(config.http.api_listen)
        .await
        .map_err(|source| ServerError::Listen { addr: config.http.api_listen, source })?;
    let api_addr = api_listener.local_addr().map_err(ServerError::Http)?;
    tracing::info!(addr = %api_addr, "https listening (admin api)");
    tracing::info!(addr = %listener.local_addr().map_err(ServerError::Http)?, "http listening");

    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        stop.cancel();
    });

    tokio::spawn(discovery.run(cancel.clone()));
    tokio::spawn(token_sweep.sweep_every(boot::token::SWEEP_INTERVAL, cancel.clone()));
    tokio::spawn(crate::web::sampler(web, cancel.clone()));
    tokio::spawn(crate::wiring::follow_store(service.clone(), tracker.clone(), topology, cancel.clone()));
    let mut seeder_addr = None;
    if config.image.seed {
        let seeder =
            crate::image::seeder::Seeder::start(images.clone(), Some(crate::wiring::registrar(tracker.clone())))
                .await
                .map_err(|e| ServerError::Seeder(e.to_string()))?;
        seeder_addr = Some(seeder.listen_addr());
        // Revisions packed on the other servers come through the swarm into this seeder.
        let replicator = crate::image::replicate::Replicator::new(
            images.clone(),
            seeder.clone(),
            std::time::Duration::from_secs(config.server.replicate_interval_s),
        )
        .map_err(ServerError::Seeder)?;
        tokio::spawn(replicator.run(cancel.clone()));
        let (seed_tx, seed_rx) = watch::channel(false);
        let seed_stop = cancel.clone();
        tokio::spawn(async move {
            seed_stop.cancelled().await;
            let _ = seed_tx.send(true);
        });
        tokio::spawn(seeder.run(seed_rx));
    }
    // This server's record in the store: where it answers, its DHCP slice, what it holds.
    let advertise = match (config.server.advertise.is_empty(), cluster.frontend_address) {
        (false, _) => config.server.advertise.clone(),
        (true, Some(fe)) => vec![fe],
        (true, None) => Vec::new(),
    };
    let seeder_public = seeder_addr.and_then(|a| match a {
        std::net::SocketAddr::V4(v4) if !v4.ip().is_unspecified() => Some(v4),
        other => advertise.first().map(|ip| std::net::SocketAddrV4::new(*ip, other.port())),
    });
    let now = crate::service::unix_now();
    let me = luna_core::api::ServerInfo {
        id: server_id.clone(),
        urls: crate::servers::urls(&advertise, config.listen.port()),
        seeder: seeder_public,
        dhcp_slice: config.dhcp.slice,
        heartbeat: now,
        started: now,
        version: env!("CARGO_PKG_VERSION").into(),
        holds: crate::image::held(&images).await,
        age_secs: None,
        stale: false,
    };
    let held_images = images.clone();
    let holds: crate::servers::HoldsSource = Arc::new(move || {
        let st = held_images.clone();
        Box::pin(async move { crate::image::held(&st).await })
    });
    let heartbeat = crate::servers::Heartbeat::register(
        store.clone(),
        me,
        cluster.dhcp_range,
        config.server.heartbeat_interval_s,
        now,
        Some(holds),
        view.clone(),
    )
    .await?;
    tokio::spawn(heartbeat.clone().run(cancel.clone()));
    // Every socket is bound before systemd hears READY=1 (a bind that fails ends `serve` first).
    let dhcp_sockets = dhcp::bind_all(&config.dhcp)?;
    let tftp_server = match config.tftp.enabled {
        true => Some(crate::tftp::TftpServer::bind(config.tftp.clone()).await?),
        false => None,
    };
    let dhcp_task = tokio::spawn(dhcp::serve_on(
        dhcp_sockets,
        config.dhcp.clone(),
        store,
        Arc::new(StatusToService(service.clone())),
        cancel.clone(),
    ));
    let (tftp_tx, tftp_rx) = watch::channel(false);
    let tftp_stop = cancel.clone();
    tokio::spawn(async move {
        tftp_stop.cancelled().await;
        let _ = tftp_tx.send(true);
    });
    let tftp_task = match tftp_server {
        Some(server) => tokio::spawn(server.run(tftp_rx)),
        None => tokio::spawn(crate::tftp::serve(config.tftp.clone(), tftp_rx)),
    };
    // One set of caps for both ports: a flood of either cannot starve the process of descriptors.
    let limits = crate::httpd::ConnLimits::new(config.http.max_connections, config.http.max_connections_per_address);
    let http = crate::httpd::serve(listener, plain_app, &config.http, None, limits.clone(), cancel.clone());
    let https = crate::httpd::serve(
        api_listener,
        admin_app,
        &config.http,
        Some(tokio_rustls::TlsAcceptor::from(tls_config)),
        limits,
        cancel.clone(),
    );
    notify_ready();
    // A listener that fails takes the whole server down: half a boot service is worse than none.
    let result = tokio::select! {
        // Both ports end together (each drains its own connections); either failing ends both.
        r = async { tokio::try_join!(http, https).map(|_| ()) } => r.map_err(ServerError::Http),
        r = dhcp_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ServerError::Http(std::io::Error::other(e.to_string()))),
        },
        r = tftp_task => match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(ServerError::Http(std::io::Error::other(e.to_string()))),
        },
    };
    notify_stopping();
    cancel.cancel();
    match heartbeat.leave().await {
        Ok(()) => tracing::info!("server record removed from the store"),
        Err(e) => tracing::warn!(error = %e, "server record not removed; it goes stale"),
    }
    // No announce is answered any more: keep the swarms for the next start.
    let saved =
        crate::tracker::persist::SavedSwarm { saved_at_unix: crate::service::unix_now(), torrents: tracker.save() };
    match crate::tracker::persist::store(&swarm_file, &saved) {
        Ok(()) => tracing::info!(torrents = saved.torrents.len(), "tracker swarms saved"),
        Err(e) => tracing::warn!(error = %e, "tracker swarms not saved"),
    }
    // Boot-path status reports are queued without the answer waiting: write what is left.
    if tokio::time::timeout(std::time::Duration::from_secs(5), service.flush_node_status()).await.is_err() {
        tracing::warn!("stopped before every queued node status was written");
    }
    tracing::info!("stopped");
    result
}
