//! Wiring: binds the listeners, builds the first routing table and runs until shut down.
//!
//! Shutdown is graceful: `/readyz` turns unready, the proxy stops accepting and drains in-flight
//! requests and open streams within the drain timeout, then the admin listener stops.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::control::admin::{self, AdminState};
use crate::control::auth::AdminToken;
use crate::control::canary::Board;
use crate::control::fleet::{Fleet, FleetError};
use crate::control::history::History;
use crate::control::identity::{self, probe_once, Prober};
use crate::control::mlflow::MlflowSource;
use crate::control::replica;
use crate::control::state::StateStore;
use crate::control::writer::{Actor, Change, Command, CommandError};
use crate::control::Writer;
use crate::data::body::RequestBody;
pub use crate::data::listener::Drained;
use crate::data::listener::{self, ConnSettings, TlsConfigCell};
use crate::data::proxy::{upstream_client, ConnInfo, Proxy, ProxySettings};
use crate::metrics::Metrics;
use crate::shadow::task::Shadower;

/// Why weir could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::control::writer::OpenError),
    #[error(transparent)]
    Token(#[from] crate::control::auth::TokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("fleet mode: {0}")]
    Fleet(#[from] FleetError),
    #[error("MLflow registry: {0}")]
    Mlflow(#[from] crate::control::mlflow::SourceError),
    #[error("MLflow as the registry ([registry] mlflow) does not work with fleet mode ([state] backend = \"etcd\") yet: run one weir per MLflow-pinned route set, or pin versions in a registry file")]
    MlflowFleet,
    #[error("version {version}: the backend {backend} does not offer HTTP/2 by ALPN (h2), which protocol = \"http2\" needs; use protocol = \"auto\" (h2 where offered, else HTTP/1.1) or \"http1\", or enable h2 on the backend")]
    NoHttp2 { version: String, backend: String },
}

/// Entry point of the proxy.
#[derive(Debug)]
pub struct Server;

/// A started proxy: its bound addresses and the handle to stop it.
#[derive(Debug)]
pub struct Running {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<Drained>,
    writer: Arc<Writer>,
    canary: Arc<Board>,
    /// TLS of the listeners as configured at start, re-read by [`Running::reload_tls`].
    tls: Vec<(crate::config::TlsConfig, TlsConfigCell)>,
}

/// Closes pooled upstream connections idle longer than `max_idle` (or closed by their backend),
/// for every version the writer has built, every half `max_idle`, until `stop`.
async fn reap_idle_connections(
    writer: Arc<Writer>,
    max_idle: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    use std::time::Duration;
    let every = (max_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        let mut closed = 0;
        for version in writer.versions().await {
            for backend in version.backends.iter() {
                closed += backend.pool.reap(max_idle);
            }
        }
        if closed > 0 {
            tracing::debug!(closed, "closed idle upstream connections");
        }
    }
}

async fn bind(
    what: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { what, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}

impl Server {
    /// Binds the proxy and admin listeners and starts serving. Port 0 picks a free port; the
    /// bound addresses are on the returned [`Running`].
    pub async fn start(config: Config) -> Result<Running, StartError> {
        let token = AdminToken::resolve(&config)?;
        let listen_addr = config.listener.addr;
        let admin_addr = config.admin.addr;
        // Bind before touching state, so a second weir on the same ports fails without writing.
        let (proxy_listener, proxy_addr) = bind("proxy", listen_addr).await?;
        let (admin_listener, admin_addr) = bind("admin", admin_addr).await?;
        let metrics = Metrics::new();
        let (config, mlflow) = mlflow_pins(config, &metrics).await?;
        check_http2_backends(&config).await?;
        let writer = open_writer(&config, metrics).await?;
        if let Some(source) = mlflow {
            writer.attach_mlflow(source);
        }
        let table: Arc<ArcSwap<crate::data::RoutingTable>> = Arc::clone(writer.table());
        let prober = Arc::new(Prober::default());
        if config.identity.is_some() {
            // Nothing is served before the backends have said what they serve.
            let verified = probe_once(&writer, &prober).await;
            tracing::info!(verified, "identity probe: first round done");
        }

        let proxy = Arc::new(Proxy::new(
            Arc::clone(&table),
            upstream_client(&config.proxy)?,
            proxy_settings(&config),
            Arc::new(Shadower::new(&config.shadow, &config.state_dir)),
        ));
        let canary = Arc::new(Board::default());
        let history = Arc::new(History::default());
        let admin_state = Arc::new(AdminState {
            writer: Arc::clone(&writer),
            canary: Arc::clone(&canary),
            history: Arc::clone(&history),
            audit: Arc::default(),
            token,
            ready: AtomicBool::new(false),
        });

        let cell =
            |tls: &Option<crate::config::TlsConfig>| -> Result<Option<TlsConfigCell>, StartError> {
                Ok(match tls {
                    None => None,
                    Some(t) => Some(Arc::new(ArcSwap::new(crate::tls::server_config(t)?))),
                })
            };
        let proxy_tls = cell(&config.listener.tls)?;
        let admin_tls = cell(&config.admin.tls)?;
        let (stop, stop_rx) = watch::channel(false);
        let conn = ConnSettings {
            header_read_timeout: config.listener.header_read_timeout,
            drain_timeout: config.proxy.drain_timeout,
            limits: config.listener.limits.clone(),
        };
        let proxy_task = tokio::spawn(listener::serve(
            "proxy",
            proxy_listener,
            conn.clone(),
            proxy_tls.clone(),
            Some(Arc::clone(&proxy)),
            move |peer: SocketAddr, secure: bool| {
                let info = Arc::new(ConnInfo::new(peer.ip(), secure));
                let proxy = Arc::clone(&proxy);
                service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (proxy, info) = (Arc::clone(&proxy), Arc::clone(&info));
                    async move { proxy.handle(req.map(RequestBody::Left), &info).await }
                })
            },
            stop_rx.clone(),
        ));
        let (admin_stop, admin_stop_rx) = watch::channel(false);
        let admin_for_conn = Arc::clone(&admin_state);
        let admin_task = tokio::spawn(listener::serve(
            "admin",
            admin_listener,
            conn,
            admin_tls.clone(),
            None,
            move |_peer, _secure| {
                let state = Arc::clone(&admin_for_conn);
                service_fn(move |req| admin::handle(Arc::clone(&state), req))
            },
            admin_stop_rx,
        ));

        admin_state.ready.store(true, Ordering::Relaxed);
        tracing::info!(
            "listening proxy={proxy_addr} admin={admin_addr} routes={}",
            config.routes.len()
        );

        tokio::spawn(crate::control::history::run(
            Arc::clone(&writer),
            history,
            stop_rx.clone(),
        ));
        let fleet_tasks = spawn_control_tasks(&config, &writer, prober, &canary, &stop_rx);
        let task = tokio::spawn(shut_down_in_order(
            stop_rx,
            Arc::clone(&writer),
            admin_state,
            proxy_task,
            fleet_tasks,
            (admin_stop, admin_task),
        ));

        Ok(Running {
            proxy_addr,
            admin_addr,
            stop,
            task,
            writer,
            canary,
            tls: [
                (config.listener.tls.clone(), proxy_tls),
                (config.admin.tls.clone(), admin_tls),
            ]
            .into_iter()
            .filter_map(|(config, cell)| Some((config?, cell?)))
            .collect(),
        })
    }
}

/// Versions spoken to in HTTP/2 over TLS need their backends to offer `h2` by ALPN: one that
/// negotiates something else (or nothing) would fail every request, so weir refuses to start,
/// naming it. A backend that cannot be reached now is only warned about: it may start later.
async fn check_http2_backends(config: &Config) -> Result<(), StartError> {
    use crate::config::BackendProtocol;
    let http2_over_tls: Vec<(String, &http::Uri)> = config
        .versions
        .iter()
        .filter(|v| v.protocol == BackendProtocol::Http2)
        .flat_map(|v| v.backends.iter().map(move |b| (v.label(), b)))
        .filter(|(_, b)| b.scheme_str() == Some("https"))
        .collect();
    if http2_over_tls.is_empty() {
        return Ok(());
    }
    let mut tls = crate::tls::backend_client_config(&config.proxy.backend_tls)?;
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let wait = config.proxy.connect_timeout;
    for (version, backend) in http2_over_tls {
        let Some(authority) = backend.authority() else {
            continue;
        };
        let (host, port) = (authority.host(), authority.port_u16().unwrap_or(443));
        let unreachable = |why: String| {
            tracing::warn!(%version, %backend, "cannot check that the backend offers HTTP/2 (h2) now: {why}");
        };
        let tcp =
            match tokio::time::timeout(wait, tokio::net::TcpStream::connect((host, port))).await {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    unreachable(e.to_string());
                    continue;
                }
                Err(_) => {
                    unreachable("no connection within proxy.connect_timeout".into());
                    continue;
                }
            };
        let Ok(name) =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
        else {
            continue;
        };
        let no_http2 = || StartError::NoHttp2 {
            version: version.clone(),
            backend: backend.to_string(),
        };
        match tokio::time::timeout(wait, connector.connect(name, tcp)).await {
            Ok(Ok(stream)) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {}
            Ok(Ok(_)) => return Err(no_http2()),
            Ok(Err(e)) if e.to_string().to_ascii_lowercase().contains("application") => {
                return Err(no_http2())
            }
            Ok(Err(e)) => unreachable(e.to_string()),
            Err(_) => unreachable("no TLS handshake within proxy.connect_timeout".into()),
        }
    }
    Ok(())
}

/// The one writer: on the state directory, or joined to the fleet's state in etcd.
/// With MLflow as the registry: the config pinned by its aliases (or, MLflow unreachable, by
/// the pins the last run kept), and the source the writer moves aliases through.
async fn mlflow_pins(
    config: Config,
    metrics: &Metrics,
) -> Result<(Config, Option<Arc<MlflowSource>>), StartError> {
    if config.mlflow.is_none() {
        return Ok((config, None));
    }
    if config.fleet.is_some() {
        return Err(StartError::MlflowFleet);
    }
    let source = MlflowSource::new(&config, metrics)?;
    let previous = StateStore::new(&config.state_dir)
        .load()
        .ok()
        .flatten()
        .map(|body| body.state);
    let settled = source.at_start(&config, previous.as_ref()).await?;
    for note in &settled.notes {
        tracing::info!("{note}");
    }
    for refusal in &settled.refusals {
        tracing::warn!(route = %refusal.route, reason = %refusal.message, "MLflow alias refused at start: serving the route's last good pin");
    }
    Ok((settled.config, Some(Arc::new(source))))
}

async fn open_writer(config: &Config, metrics: Metrics) -> Result<Arc<Writer>, StartError> {
    let writer = match &config.fleet {
        None => Writer::open(config.clone(), metrics)?,
        Some(fleet) => {
            let fleet = Arc::new(Fleet::connect(fleet).await?);
            metrics.enable_fleet();
            metrics.set_fleet(false, true);
            Writer::open_fleet(config.clone(), metrics, fleet).await?
        }
    };
    Ok(Arc::new(writer))
}

/// What the data path takes from the config.
fn proxy_settings(config: &Config) -> ProxySettings {
    ProxySettings {
        max_request_body: config.listener.max_request_body,
        response_header_timeout: config.proxy.response_header_timeout,
        idle_timeout: config.proxy.idle_timeout,
        backend_eject: config.proxy.backend_eject,
        version_header: config.proxy.version_header.clone(),
        connect_timeout: config.proxy.connect_timeout,
        pool_idle_timeout: config.proxy.pool_idle_timeout,
        pool_max_idle: config.proxy.pool_max_idle_per_backend,
        http1_relay: config.listener.http1_fast_path,
        max_body_scan: config.listener.max_body_scan,
    }
}

/// Starts the control path's tasks: fleet mode's replica tasks (returned: shutdown waits for
/// them, so the election seat is given up), identity probes, the idle-connection reaper and the
/// canary controller.
fn spawn_control_tasks(
    config: &Config,
    writer: &Arc<Writer>,
    prober: Arc<Prober>,
    canary: &Arc<Board>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut fleet_tasks = Vec::new();
    if writer.fleet().is_some() {
        let w = || Arc::clone(writer);
        fleet_tasks.push(tokio::spawn(replica::follow(w(), stop.clone())));
        fleet_tasks.push(tokio::spawn(replica::lead(w(), stop.clone())));
        fleet_tasks.push(tokio::spawn(replica::publish_counters(w(), stop.clone())));
        fleet_tasks.push(tokio::spawn(replica::compact_history(w(), stop.clone())));
    }
    if config.identity.is_some() {
        tokio::spawn(identity::run(Arc::clone(writer), prober, stop.clone()));
    }
    if writer.mlflow().is_some() {
        tokio::spawn(crate::control::aliases::watch(
            Arc::clone(writer),
            stop.clone(),
        ));
    }
    tokio::spawn(reap_idle_connections(
        Arc::clone(writer),
        config.proxy.pool_idle_timeout,
        stop.clone(),
    ));
    if config.routes.iter().any(|r| r.canary.is_some()) || config.source.is_some() {
        // Reloads may add a canary policy, so a file-based weir always runs the controller.
        tokio::spawn(crate::control::canary::run(
            Arc::clone(writer),
            Arc::clone(canary),
            stop.clone(),
        ));
    }
    fleet_tasks
}

/// Waits for `stop`, then shuts down in order: not ready, drain the proxy, stop the replica
/// tasks, close the last serving window in the audit log, stop the admin listener.
async fn shut_down_in_order(
    mut stop: watch::Receiver<bool>,
    writer: Arc<Writer>,
    admin_state: Arc<AdminState>,
    proxy_task: JoinHandle<Drained>,
    fleet_tasks: Vec<JoinHandle<()>>,
    (admin_stop, admin_task): (watch::Sender<bool>, JoinHandle<Drained>),
) -> Drained {
    let _ = stop.wait_for(|s| *s).await;
    admin_state.ready.store(false, Ordering::Relaxed);
    let drained = proxy_task.await.unwrap_or(Drained::TimedOut);
    // The election seat is given up here, so a successor leads without waiting a TTL.
    for task in fleet_tasks {
        let _ = task.await;
    }
    if let Err(e) = writer.close().await {
        tracing::error!(error = %e, "cannot record the last serving window in the audit log");
    }
    let _ = admin_stop.send(true);
    let _ = admin_task.await;
    tracing::info!(?drained, "stopped");
    drained
}

impl Running {
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The live routing table (read-only).
    pub fn table(&self) -> Arc<crate::data::RoutingTable> {
        self.writer.table().load_full()
    }

    /// The live table and the routing state it was built from (read-only).
    pub fn live(&self) -> Arc<crate::control::writer::Live> {
        self.writer.live()
    }

    /// The one writer of routing changes.
    pub fn writer(&self) -> &Arc<Writer> {
        &self.writer
    }

    /// The canary controller's last decision per route.
    pub fn canary(&self) -> &Board {
        &self.canary
    }

    /// Re-reads the listeners' certificates and keys (SIGHUP): new handshakes use them, open
    /// connections keep theirs. A file that does not load leaves the old material in place.
    pub fn reload_tls(&self) -> Result<usize, crate::tls::TlsError> {
        let mut fresh = Vec::with_capacity(self.tls.len());
        for (config, _) in &self.tls {
            fresh.push(crate::tls::server_config(config)?);
        }
        for ((_, cell), config) in self.tls.iter().zip(fresh) {
            cell.store(config);
        }
        Ok(self.tls.len())
    }

    /// Re-reads the config file (SIGHUP).
    pub async fn reload(&self, actor: &str) -> Result<u64, CommandError> {
        let applied = self
            .writer
            .apply(Change {
                command: Command::Reload,
                actor: Actor::Operator(actor.to_string()),
                reason: None,
                if_match: None,
            })
            .await?;
        Ok(applied.generation)
    }

    /// Starts a graceful shutdown: stop accepting, drain open requests and streams.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped (after [`Running::shutdown`]).
    pub async fn wait(self) -> Drained {
        self.task.await.unwrap_or(Drained::TimedOut)
    }
}
