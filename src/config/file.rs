//! The TOML file format. Values that need more than a type check (weights, durations, addresses,
//! URLs) are read as raw values first and checked afterwards, so one run reports every problem.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use http::{HeaderName, Uri};
use serde::Deserialize;

use super::units::{parse_duration, parse_percent, parse_size, MAX_BASIS_POINTS};
use super::*;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: RawListener,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    state: RawState,
    registry: Option<RawRegistry>,
    identity: Option<RawIdentity>,
    #[serde(default)]
    shadow: RawShadow,
    #[serde(default)]
    versions: Vec<RawVersion>,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawListener {
    addr: Option<String>,
    header_read_timeout: Option<String>,
    max_request_body: Option<RawScalar>,
    tls: Option<RawTls>,
    max_header_bytes: Option<RawScalar>,
    max_headers: Option<usize>,
    max_connections: Option<usize>,
    http2_max_concurrent_streams: Option<u32>,
    http2_max_pending_resets: Option<usize>,
    http1_fast_path: Option<bool>,
    max_body_scan: Option<RawScalar>,
    models_endpoint: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawBackendTls {
    ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    addr: Option<String>,
    token_file: Option<PathBuf>,
    tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    version_header: Option<String>,
    connect_timeout: Option<String>,
    response_header_timeout: Option<String>,
    idle_timeout: Option<String>,
    drain_timeout: Option<String>,
    backend_eject: Option<String>,
    pool_idle_timeout: Option<String>,
    pool_max_idle_per_backend: Option<usize>,
    http2_max_connections_per_backend: Option<usize>,
    http2_keepalive_interval: Option<String>,
    #[serde(default)]
    backend_tls: RawBackendTls,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    file: Option<PathBuf>,
    mlflow: Option<String>,
    mlflow_token_file: Option<PathBuf>,
    mlflow_user: Option<String>,
    mlflow_password_file: Option<PathBuf>,
    mlflow_ca: Option<PathBuf>,
    mlflow_interval: Option<String>,
    mlflow_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    probe: String,
    interval: Option<String>,
    timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<PathBuf>,
    backend: Option<String>,
    etcd: Option<Vec<String>>,
    cluster: Option<String>,
    prefix: Option<String>,
    replica: Option<String>,
    lease_ttl: Option<String>,
    compaction_interval: Option<String>,
    etcd_ca: Option<PathBuf>,
    etcd_cert: Option<PathBuf>,
    etcd_key: Option<PathBuf>,
    etcd_user: Option<String>,
    etcd_password_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    model: String,
    version: String,
    backends: Vec<String>,
    balance: Option<String>,
    protocol: Option<String>,
    served_model: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    prefix: Option<String>,
    host: Option<String>,
    stable: Option<String>,
    candidate: Option<String>,
    mlflow_model: Option<String>,
    stable_alias: Option<String>,
    candidate_alias: Option<String>,
    weight: Option<RawScalar>,
    sticky_header: Option<String>,
    sticky_cookie: Option<String>,
    sticky_field: Option<String>,
    model: Option<RawModels>,
    model_header: Option<String>,
    api: Option<String>,
    #[serde(default)]
    allow_override: bool,
    mirror: Option<RawScalar>,
    comparators: Option<Vec<String>>,
    json_pointers: Option<Vec<String>>,
    number_tolerance: Option<f64>,
    text_threshold: Option<f64>,
    vector_threshold: Option<f64>,
    canary: Option<RawCanary>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCanary {
    steps: Vec<RawScalar>,
    interval: Option<String>,
    min_requests: Option<u64>,
    significance: Option<f64>,
    error_rate_tolerance: Option<f64>,
    max_error_rate_increase: Option<f64>,
    max_p99_ratio: Option<f64>,
    max_ttfb_p99_ratio: Option<f64>,
    min_agreement: Option<f64>,
    min_comparisons: Option<usize>,
    failure_limit: Option<u32>,
    progress_deadline: Option<String>,
    #[serde(default)]
    confirm_promotion: bool,
    #[serde(default)]
    rollback_steps: Vec<RawScalar>,
    eval: Option<RawEval>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEval {
    file: PathBuf,
    threshold: Option<f64>,
    before_first_step: Option<bool>,
    before_promotion: Option<bool>,
    compare: Option<bool>,
    #[serde(default)]
    categories: BTreeMap<String, f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    max_in_flight: Option<usize>,
    max_body: Option<RawScalar>,
    timeout: Option<String>,
    samples: Option<bool>,
    samples_max_bytes: Option<RawScalar>,
}

/// `model = "chat"` or `model = ["chat", "chat-mini"]`.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawModels {
    One(String),
    Many(Vec<String>),
}

/// A number or a string, checked after parsing.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawScalar {
    Int(i64),
    Float(f64),
    Str(String),
}

/// Collects problems while values are checked one by one.
struct Checker {
    problems: Vec<Problem>,
}

/// `[state] backend = "etcd"` and its settings; the etcd keys are refused under the file backend
/// so a half-configured fleet is not silently run as a single replica.
fn fleet(c: &mut Checker, raw: &RawState) -> Option<FleetConfig> {
    let etcd_keys = [
        ("state.etcd", raw.etcd.is_some()),
        ("state.cluster", raw.cluster.is_some()),
        ("state.prefix", raw.prefix.is_some()),
        ("state.replica", raw.replica.is_some()),
        ("state.lease_ttl", raw.lease_ttl.is_some()),
        (
            "state.compaction_interval",
            raw.compaction_interval.is_some(),
        ),
        ("state.etcd_ca", raw.etcd_ca.is_some()),
        ("state.etcd_cert", raw.etcd_cert.is_some()),
        ("state.etcd_key", raw.etcd_key.is_some()),
        ("state.etcd_user", raw.etcd_user.is_some()),
        ("state.etcd_password_file", raw.etcd_password_file.is_some()),
    ];
    match raw.backend.as_deref().unwrap_or("file") {
        "file" => {
            for (path, set) in etcd_keys {
                if set {
                    c.problem(path, "only used with backend = \"etcd\"; set `backend = \"etcd\"` in [state] or remove it");
                }
            }
            None
        }
        "etcd" => {
            let endpoints = raw.etcd.clone().unwrap_or_default();
            if endpoints.is_empty() {
                c.problem(
                    "state.etcd",
                    "backend = \"etcd\" needs the etcd client URLs, such as etcd = [\"http://127.0.0.1:2379\"]",
                );
            }
            for (i, url) in endpoints.iter().enumerate() {
                c.check(
                    &format!("state.etcd[{i}]"),
                    FleetConfig::validate_endpoint(url),
                );
            }
            let cluster = raw
                .cluster
                .clone()
                .unwrap_or_else(|| FleetConfig::DEFAULT_CLUSTER.to_string());
            if cluster.is_empty() || cluster.contains('/') {
                c.problem(
                    "state.cluster",
                    format!("expected a name without '/', such as \"prod\", got {cluster:?}"),
                );
            }
            let prefix = raw
                .prefix
                .clone()
                .unwrap_or_else(|| FleetConfig::default_prefix(&cluster));
            c.check("state.prefix", FleetConfig::validate_prefix(&prefix));
            let replica = raw
                .replica
                .clone()
                .unwrap_or_else(FleetConfig::default_replica);
            if replica.is_empty() || replica.contains('/') {
                c.problem(
                    "state.replica",
                    format!("expected a name without '/', such as \"weir-0\", got {replica:?}"),
                );
            }
            let lease_ttl = c.duration(
                "state.lease_ttl",
                &raw.lease_ttl,
                FleetConfig::DEFAULT_LEASE_TTL,
            );
            if lease_ttl < Duration::from_secs(1) {
                c.problem(
                    "state.lease_ttl",
                    "must be at least 1s (etcd leases count whole seconds)",
                );
            }
            let compaction_interval = match raw.compaction_interval.as_deref() {
                Some("off") => None,
                _ => Some(c.duration(
                    "state.compaction_interval",
                    &raw.compaction_interval,
                    FleetConfig::DEFAULT_COMPACTION_INTERVAL,
                )),
            };
            if compaction_interval.is_some_and(|every| every < Duration::from_secs(1)) {
                c.problem(
                    "state.compaction_interval",
                    "must be at least 1s, or \"off\" when the etcd cluster compacts itself",
                );
            }
            let client_cert = match (&raw.etcd_cert, &raw.etcd_key) {
                (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                (None, None) => None,
                (Some(_), None) => {
                    c.problem(
                        "state.etcd_key",
                        "etcd_cert needs etcd_key (the client certificate's private key)",
                    );
                    None
                }
                (None, Some(_)) => {
                    c.problem(
                        "state.etcd_cert",
                        "etcd_key needs etcd_cert (the client certificate)",
                    );
                    None
                }
            };
            let https = endpoints
                .iter()
                .filter(|u| u.starts_with("https://"))
                .count();
            if https > 0 && https < endpoints.len() {
                c.problem(
                    "state.etcd",
                    "mixes http:// and https:// endpoints; use one scheme for the whole cluster",
                );
            }
            let wants_tls = raw.etcd_ca.is_some() || client_cert.is_some();
            if wants_tls && https == 0 && !endpoints.is_empty() {
                c.problem(
                    "state.etcd",
                    "etcd_ca / etcd_cert are set, so the endpoints must be https:// URLs",
                );
            }
            let tls = (https > 0 || wants_tls).then(|| EtcdTls {
                ca: raw.etcd_ca.clone(),
                client_cert,
            });
            let user = match (&raw.etcd_user, &raw.etcd_password_file) {
                (Some(name), Some(file)) => Some(EtcdUser {
                    name: name.clone(),
                    password_file: file.clone(),
                }),
                (None, None) => None,
                (Some(_), None) => {
                    c.problem(
                        "state.etcd_password_file",
                        "etcd_user needs etcd_password_file (a file holding the password)",
                    );
                    None
                }
                (None, Some(_)) => {
                    c.problem("state.etcd_user", "etcd_password_file needs etcd_user");
                    None
                }
            };
            Some(FleetConfig {
                endpoints,
                prefix,
                replica,
                lease_ttl,
                compaction_interval,
                tls,
                user,
            })
        }
        other => {
            c.problem(
                "state.backend",
                format!("expected \"file\" or \"etcd\", got {other:?}"),
            );
            None
        }
    }
}

impl Checker {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn check<T>(&mut self, path: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|m| self.problem(path, m)).ok()
    }

    /// A share from 0 to 1 (thresholds, significance levels), or `default` when absent.
    fn unit(&mut self, path: &str, value: Option<f64>, default: f64) -> f64 {
        match value {
            Some(v) if (0.0..=1.0).contains(&v) => v,
            Some(v) => {
                self.problem(path, format!("expected a number from 0 to 1, got {v}"));
                default
            }
            None => default,
        }
    }

    fn duration(&mut self, path: &str, raw: &Option<String>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(text) => self.check(path, parse_duration(text)).unwrap_or(default),
        }
    }

    fn addr(&mut self, path: &str, raw: &Option<String>, default: &str) -> SocketAddr {
        let text = raw.as_deref().unwrap_or(default);
        let parsed = text.parse::<SocketAddr>().map_err(|_| {
            format!("expected an address with a port such as \"127.0.0.1:8080\", got {text:?}")
        });
        self.check(path, parsed)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

/// Largest `proxy.pool_max_idle_per_backend`: far above any backend's useful keep-alive count,
/// and about 6 MB of slots per backend.
const MAX_POOL_IDLE: usize = 65_536;

/// Largest `proxy.http2_max_connections_per_backend`.
const MAX_HTTP2_CONNECTIONS: usize = 1024;

pub(super) fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| vec![toml_problem(text, &e)])?;
    let mut c = Checker {
        problems: Vec::new(),
    };
    let listener = check_listener(&mut c, &raw.listener);
    let admin = check_admin(&mut c, &raw.admin);
    let proxy = check_proxy(&mut c, &raw.proxy);
    check_timeouts(&mut c, &listener, &proxy);
    let (versions, labels) = check_versions(&mut c, &raw.versions);
    let routes = check_routes(&mut c, &raw.routes, &labels);
    let (registry, mlflow) = check_registry(&mut c, raw.registry.as_ref(), &routes);
    let shadow = check_shadow(&mut c, &raw.shadow);
    let identity = check_identity(&mut c, &raw.identity);
    let fleet = fleet(&mut c, &raw.state);

    if c.problems.is_empty() {
        Ok(Config {
            listener,
            admin,
            proxy,
            state_dir: raw
                .state
                .dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            fleet,
            versions,
            routes,
            source: None,
            from_flags: false,
            registry,
            mlflow,
            mlflow_versions: Vec::new(),
            identity,
            shadow,
        })
    } else {
        Err(c.problems)
    }
}

/// `[listener]`: the proxy's address, timeouts, body and header limits, TLS.
fn check_listener(c: &mut Checker, rl: &RawListener) -> ListenerConfig {
    let listener = ListenerConfig {
        tls: None,
        limits: ConnLimits::default(),
        http1_fast_path: rl.http1_fast_path.unwrap_or(true),
        max_body_scan: size_from(
            c,
            "listener.max_body_scan",
            &rl.max_body_scan,
            DEFAULT_MAX_BODY_SCAN as u64,
        ) as usize,
        models_endpoint: match rl.models_endpoint.as_deref() {
            None | Some("auto") => ModelsEndpoint::Auto,
            Some("weir") => ModelsEndpoint::Weir,
            Some("stable") => ModelsEndpoint::Stable,
            Some(other) => {
                c.problem(
                    "listener.models_endpoint",
                    format!("expected \"auto\", \"weir\" or \"stable\", got {other:?}"),
                );
                ModelsEndpoint::Auto
            }
        },
        addr: c.addr("listener.addr", &rl.addr, DEFAULT_LISTEN),
        header_read_timeout: c.duration(
            "listener.header_read_timeout",
            &rl.header_read_timeout,
            DEFAULT_HEADER_READ_TIMEOUT,
        ),
        max_request_body: match &rl.max_request_body {
            None => DEFAULT_MAX_REQUEST_BODY,
            Some(RawScalar::Int(n)) if *n >= 0 => *n as u64,
            Some(RawScalar::Str(s)) => c
                .check("listener.max_request_body", parse_size(s))
                .unwrap_or(DEFAULT_MAX_REQUEST_BODY),
            Some(_) => {
                c.problem(
                    "listener.max_request_body",
                    "expected a size such as \"32MiB\" or a whole number of bytes",
                );
                DEFAULT_MAX_REQUEST_BODY
            }
        },
    };
    let dl = ConnLimits::default();
    let limits = ConnLimits {
        max_header_bytes: size_from(
            c,
            "listener.max_header_bytes",
            &rl.max_header_bytes,
            dl.max_header_bytes as u64,
        ) as usize,
        max_headers: rl.max_headers.unwrap_or(dl.max_headers),
        max_connections: rl.max_connections.unwrap_or(dl.max_connections),
        http2_max_concurrent_streams: rl
            .http2_max_concurrent_streams
            .unwrap_or(dl.http2_max_concurrent_streams),
        http2_max_pending_resets: rl
            .http2_max_pending_resets
            .unwrap_or(dl.http2_max_pending_resets),
    };
    if limits.max_header_bytes < 8192 {
        c.problem("listener.max_header_bytes", "must be at least 8KiB");
    }
    if limits.max_connections == 0
        || limits.max_headers == 0
        || limits.http2_max_concurrent_streams == 0
    {
        c.problem(
            "listener",
            "max_connections, max_headers and http2_max_concurrent_streams must be above 0",
        );
    }
    ListenerConfig {
        tls: rl.tls.clone().map(tls_from),
        limits,
        ..listener
    }
}

/// `[admin]`: the admin listener and its token file.
fn check_admin(c: &mut Checker, ra: &RawAdmin) -> AdminConfig {
    AdminConfig {
        addr: c.addr("admin.addr", &ra.addr, DEFAULT_ADMIN),
        token: None,
        token_file: ra.token_file.clone(),
        tls: ra.tls.clone().map(tls_from),
    }
}

/// `[proxy]`: the backends' side: timeouts, the connection pool, backend TLS.
fn check_proxy(c: &mut Checker, p: &RawProxy) -> ProxyConfig {
    let d = ProxyConfig::default();
    let proxy = ProxyConfig {
        version_header: match p.version_header.as_deref() {
            None => d.version_header.clone(),
            Some("") => None,
            Some(name) => c.check(
                "proxy.version_header",
                HeaderName::try_from(name)
                    .map_err(|_| format!("{name:?} is not a valid header name")),
            ),
        },
        connect_timeout: c.duration(
            "proxy.connect_timeout",
            &p.connect_timeout,
            d.connect_timeout,
        ),
        response_header_timeout: c.duration(
            "proxy.response_header_timeout",
            &p.response_header_timeout,
            d.response_header_timeout,
        ),
        idle_timeout: c.duration("proxy.idle_timeout", &p.idle_timeout, d.idle_timeout),
        drain_timeout: c.duration("proxy.drain_timeout", &p.drain_timeout, d.drain_timeout),
        backend_eject: c.duration("proxy.backend_eject", &p.backend_eject, d.backend_eject),
        pool_idle_timeout: c.duration(
            "proxy.pool_idle_timeout",
            &p.pool_idle_timeout,
            d.pool_idle_timeout,
        ),
        pool_max_idle_per_backend: p
            .pool_max_idle_per_backend
            .unwrap_or(d.pool_max_idle_per_backend),
        http2_max_connections_per_backend: p
            .http2_max_connections_per_backend
            .unwrap_or(d.http2_max_connections_per_backend),
        http2_keepalive_interval: c.duration(
            "proxy.http2_keepalive_interval",
            &p.http2_keepalive_interval,
            d.http2_keepalive_interval,
        ),
        backend_tls: BackendTls {
            ca: p.backend_tls.ca.clone(),
            client_cert: p.backend_tls.client_cert.clone(),
            client_key: p.backend_tls.client_key.clone(),
        },
    };
    if proxy.pool_max_idle_per_backend > MAX_POOL_IDLE {
        c.problem(
            "proxy.pool_max_idle_per_backend",
            format!(
                "at most {MAX_POOL_IDLE} (each backend's idle slots are allocated up front), got {}",
                proxy.pool_max_idle_per_backend
            ),
        );
    }
    if !(1..=MAX_HTTP2_CONNECTIONS).contains(&proxy.http2_max_connections_per_backend) {
        c.problem(
            "proxy.http2_max_connections_per_backend",
            format!(
                "expected 1..={MAX_HTTP2_CONNECTIONS} (each connection carries many streams), got {}",
                proxy.http2_max_connections_per_backend
            ),
        );
    }
    if proxy.backend_tls.client_cert.is_some() != proxy.backend_tls.client_key.is_some() {
        c.problem(
            "proxy.backend_tls",
            "client_cert and client_key go together",
        );
    }
    proxy
}

/// Timeouts that must not be zero (a zero one would fail every request).
fn check_timeouts(c: &mut Checker, listener: &ListenerConfig, proxy: &ProxyConfig) {
    for (name, value) in [
        ("proxy.connect_timeout", proxy.connect_timeout),
        (
            "proxy.response_header_timeout",
            proxy.response_header_timeout,
        ),
        ("proxy.idle_timeout", proxy.idle_timeout),
        (
            "proxy.http2_keepalive_interval",
            proxy.http2_keepalive_interval,
        ),
        ("listener.header_read_timeout", listener.header_read_timeout),
    ] {
        if value.is_zero() {
            c.problem(name, "must be longer than zero");
        }
    }
}

/// `[[versions]]`, and the set of their labels.
fn check_versions(c: &mut Checker, raw: &[RawVersion]) -> (Vec<VersionConfig>, HashSet<String>) {
    let mut versions = Vec::new();
    let mut labels = HashSet::new();
    for (i, v) in raw.iter().enumerate() {
        let path = format!("versions[{i}]");
        if let Some(version) = check_version(c, &path, v) {
            if !labels.insert(version.label()) {
                c.problem(
                    &path,
                    format!("{} is defined more than once", version.label()),
                );
            }
            versions.push(version);
        }
    }
    (versions, labels)
}

/// `[[routes]]`: each checked on its own and against the versions defined.
fn check_routes(c: &mut Checker, raw: &[RawRoute], labels: &HashSet<String>) -> Vec<RouteConfig> {
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    if raw.is_empty() {
        c.problem("routes", "at least one [[routes]] entry is needed");
    }
    for (i, r) in raw.iter().enumerate() {
        let path = format!("routes[{i}]");
        if !names.insert(r.name.clone()) {
            c.problem(
                format!("{path}.name"),
                format!("route {:?} is defined more than once", r.name),
            );
        }
        let route = route_from(c, &path, r);
        check_route(c, &path, &route, labels);
        routes.push(route);
    }
    // Two routes on the same host and prefix that serve one model: the second would never match.
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i + 1..] {
            if a.host != b.host || a.prefix != b.prefix {
                continue;
            }
            if let Some(model) = a.models.iter().find(|m| b.models.contains(m)) {
                c.problem(
                    format!(
                        "routes[{}].model",
                        routes.iter().position(|r| r.name == b.name).unwrap_or(0)
                    ),
                    format!(
                        "route {:?} serves {model:?} on the same path already",
                        a.name
                    ),
                );
            }
        }
    }
    routes
}

/// One route entry: weights, comparison, canary policy, sticky key.
fn route_from(c: &mut Checker, path: &str, r: &RawRoute) -> RouteConfig {
    let weight = match &r.weight {
        None => 0,
        Some(raw) => c
            .check(&format!("{path}.weight"), weight_from(raw))
            .unwrap_or(0),
    };
    let mirror = match &r.mirror {
        None => 0,
        Some(raw) => c
            .check(&format!("{path}.mirror"), weight_from(raw))
            .unwrap_or(0),
    };
    let compare = check_compare(c, path, r);
    let canary = r
        .canary
        .as_ref()
        .and_then(|raw| check_canary(c, &format!("{path}.canary"), raw));
    let mlflow = mlflow_route(c, path, r);
    if canary.is_some() && r.candidate.is_none() && mlflow.is_none() {
        c.problem(
            format!("{path}.canary"),
            "a canary policy needs a candidate version",
        );
    }
    RouteConfig {
        mlflow,
        canary,
        mirror,
        compare,
        name: r.name.clone(),
        prefix: r.prefix.clone().unwrap_or_else(|| "/".to_string()),
        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
        stable: r.stable.clone().unwrap_or_default(),
        candidate: r.candidate.clone(),
        weight,
        sticky: sticky_from(c, path, r),
        models: models_from(c, path, r),
        model_header: r.model_header.as_ref().and_then(|h| {
            c.check(
                &format!("{path}.model_header"),
                HeaderName::try_from(h.as_str())
                    .map_err(|_| format!("{h:?} is not a valid header name")),
            )
        }),
        api: match r.api.as_deref() {
            None if r.model.is_some() => Api::OpenAi,
            None | Some("plain") => Api::Plain,
            Some("openai") => Api::OpenAi,
            Some(other) => {
                c.problem(
                    format!("{path}.api"),
                    format!("expected \"openai\" or \"plain\", got {other:?}"),
                );
                Api::Plain
            }
        },
        allow_override: r.allow_override,
    }
}

/// The sticky key: one of a header, a cookie or a top-level body field.
fn sticky_from(c: &mut Checker, path: &str, r: &RawRoute) -> Option<StickyKey> {
    let set = [&r.sticky_header, &r.sticky_cookie, &r.sticky_field]
        .iter()
        .filter(|k| k.is_some())
        .count();
    if set > 1 {
        c.problem(
            path,
            "set one of sticky_header, sticky_cookie and sticky_field",
        );
        return None;
    }
    if let Some(h) = &r.sticky_header {
        return c
            .check(
                &format!("{path}.sticky_header"),
                HeaderName::try_from(h.as_str())
                    .map_err(|_| format!("{h:?} is not a valid header name")),
            )
            .map(StickyKey::Header);
    }
    for (key, name, make) in [
        (
            "sticky_cookie",
            &r.sticky_cookie,
            StickyKey::Cookie as fn(String) -> StickyKey,
        ),
        ("sticky_field", &r.sticky_field, StickyKey::Field),
    ] {
        match name {
            Some(name) if name.is_empty() => {
                c.problem(format!("{path}.{key}"), "the name is empty");
                return None;
            }
            Some(name) if key == "sticky_field" && name == "model" => {
                c.problem(
                    format!("{path}.{key}"),
                    "\"model\" picks the route; a sticky key that every request of the route shares would pin them all to one version",
                );
                return None;
            }
            Some(name) => return Some(make(name.clone())),
            None => {}
        }
    }
    None
}

/// `model = "chat"` or a list of names: non-empty, each once.
fn models_from(c: &mut Checker, path: &str, r: &RawRoute) -> Vec<String> {
    let models = match &r.model {
        None => {
            if r.model_header.is_some() {
                c.problem(
                    format!("{path}.model_header"),
                    "only used with model = \"NAME\" (the route's models)",
                );
            }
            return Vec::new();
        }
        Some(RawModels::One(name)) => vec![name.clone()],
        Some(RawModels::Many(names)) => names.clone(),
    };
    if models.is_empty() {
        c.problem(format!("{path}.model"), "name at least one model");
    }
    let mut seen = HashSet::new();
    for name in &models {
        if name.is_empty() {
            c.problem(format!("{path}.model"), "a model name is empty");
        } else if !seen.insert(name) {
            c.problem(format!("{path}.model"), format!("{name:?} is listed twice"));
        }
    }
    models
}

/// `[registry]`: the registry file, MLflow, or both (the file then gives the policy and the
/// versions MLflow does not hold).
fn check_registry(
    c: &mut Checker,
    raw: Option<&RawRegistry>,
    routes: &[RouteConfig],
) -> (Option<PathBuf>, Option<MlflowConfig>) {
    let bound = routes.iter().find(|r| r.mlflow.is_some());
    let Some(raw) = raw else {
        if let Some(route) = bound {
            c.problem(
                "registry.mlflow",
                format!("route {:?} names an MLflow model, so [registry] needs mlflow = \"http://host:5000\"", route.name),
            );
        }
        return (None, None);
    };
    let Some(url) = &raw.mlflow else {
        let stray = [
            ("mlflow_token_file", raw.mlflow_token_file.is_some()),
            ("mlflow_user", raw.mlflow_user.is_some()),
            ("mlflow_password_file", raw.mlflow_password_file.is_some()),
            ("mlflow_ca", raw.mlflow_ca.is_some()),
            ("mlflow_interval", raw.mlflow_interval.is_some()),
            ("mlflow_timeout", raw.mlflow_timeout.is_some()),
        ];
        for (key, _) in stray.iter().filter(|(_, set)| *set) {
            c.problem(format!("registry.{key}"), "only used with registry.mlflow");
        }
        if raw.file.is_none() {
            c.problem(
                "registry",
                "set file = \"registry.toml\", mlflow = \"http://host:5000\", or both",
            );
        }
        if let Some(route) = bound {
            c.problem(
                "registry.mlflow",
                format!("route {:?} names an MLflow model, so [registry] needs mlflow = \"http://host:5000\"", route.name),
            );
        }
        return (raw.file.clone(), None);
    };
    c.check("registry.mlflow", MlflowConfig::validate_url(url));
    let mut mlflow = MlflowConfig::new(url.trim_end_matches('/').to_string());
    mlflow.token_file = raw.mlflow_token_file.clone();
    mlflow.ca = raw.mlflow_ca.clone();
    mlflow.user = match (&raw.mlflow_user, &raw.mlflow_password_file) {
        (Some(user), Some(file)) => Some((user.clone(), file.clone())),
        (None, None) => None,
        _ => {
            c.problem(
                "registry.mlflow_user",
                "basic auth needs both mlflow_user and mlflow_password_file",
            );
            None
        }
    };
    if mlflow.user.is_some() && mlflow.token_file.is_some() {
        c.problem(
            "registry.mlflow_token_file",
            "set a bearer token or basic auth (mlflow_user), not both",
        );
    }
    mlflow.interval = c.duration(
        "registry.mlflow_interval",
        &raw.mlflow_interval,
        MlflowConfig::DEFAULT_INTERVAL,
    );
    mlflow.timeout = c.duration(
        "registry.mlflow_timeout",
        &raw.mlflow_timeout,
        MlflowConfig::DEFAULT_TIMEOUT,
    );
    if mlflow.interval < Duration::from_secs(1) {
        c.problem(
            "registry.mlflow_interval",
            "at least 1s: every read is a few MLflow calls per route",
        );
    }
    if bound.is_none() {
        c.problem(
            "registry.mlflow",
            "no route names an MLflow model: set mlflow_model = \"NAME\" on the routes MLflow pins",
        );
    }
    (raw.file.clone(), Some(mlflow))
}

/// `mlflow_model` and its aliases; `stable` and `candidate` are then MLflow's to say.
fn mlflow_route(c: &mut Checker, path: &str, r: &RawRoute) -> Option<MlflowRoute> {
    let Some(model) = &r.mlflow_model else {
        for (key, set) in [
            ("stable_alias", r.stable_alias.is_some()),
            ("candidate_alias", r.candidate_alias.is_some()),
        ] {
            if set {
                c.problem(format!("{path}.{key}"), "only used with mlflow_model");
            }
        }
        return None;
    };
    for (key, set) in [
        ("stable", r.stable.is_some()),
        ("candidate", r.candidate.is_some()),
    ] {
        if set {
            c.problem(
                format!("{path}.{key}"),
                "the MLflow aliases pin this route (stable_alias, candidate_alias): leave stable and candidate out",
            );
        }
    }
    if model.is_empty() {
        c.problem(
            format!("{path}.mlflow_model"),
            "the registered model's name is empty",
        );
    }
    let binding = MlflowRoute {
        model: model.clone(),
        stable_alias: r
            .stable_alias
            .clone()
            .unwrap_or_else(|| MlflowConfig::DEFAULT_STABLE_ALIAS.into()),
        candidate_alias: r
            .candidate_alias
            .clone()
            .unwrap_or_else(|| MlflowConfig::DEFAULT_CANDIDATE_ALIAS.into()),
    };
    for (key, alias) in [
        ("stable_alias", &binding.stable_alias),
        ("candidate_alias", &binding.candidate_alias),
    ] {
        if alias.is_empty() || alias.eq_ignore_ascii_case("latest") {
            c.problem(
                format!("{path}.{key}"),
                format!("expected an alias name such as \"champion\", got {alias:?}"),
            );
        }
    }
    if binding.stable_alias == binding.candidate_alias {
        c.problem(
            format!("{path}.candidate_alias"),
            "the candidate alias must differ from the stable alias",
        );
    }
    Some(binding)
}

/// `[shadow]`: how much mirroring may cost.
fn check_shadow(c: &mut Checker, rs: &RawShadow) -> ShadowConfig {
    let ds = ShadowConfig::default();
    ShadowConfig {
        max_in_flight: rs.max_in_flight.unwrap_or(ds.max_in_flight),
        max_body: size_from(c, "shadow.max_body", &rs.max_body, ds.max_body),
        timeout: c.duration("shadow.timeout", &rs.timeout, ds.timeout),
        samples: rs.samples.unwrap_or(ds.samples),
        samples_max_bytes: size_from(
            c,
            "shadow.samples_max_bytes",
            &rs.samples_max_bytes,
            ds.samples_max_bytes,
        ),
    }
}

/// `[identity]`: the probe that asks each backend what it serves.
fn check_identity(c: &mut Checker, raw: &Option<RawIdentity>) -> Option<IdentityProbe> {
    raw.as_ref().and_then(|i| {
        let interval = c.duration(
            "identity.interval",
            &i.interval,
            IdentityProbe::DEFAULT_INTERVAL,
        );
        let timeout = c.duration(
            "identity.timeout",
            &i.timeout,
            IdentityProbe::DEFAULT_TIMEOUT,
        );
        c.check(
            "identity.probe",
            IdentityProbe::parse(&i.probe, interval, timeout),
        )
    })
}

fn check_compare(c: &mut Checker, path: &str, r: &RawRoute) -> CompareConfig {
    let d = CompareConfig::default();
    let comparators = r.comparators.as_ref().map(|names| {
        names
            .iter()
            .enumerate()
            .filter_map(|(i, n)| c.check(&format!("{path}.comparators[{i}]"), Comparator::parse(n)))
            .collect::<Vec<_>>()
    });
    let json_pointers = r.json_pointers.clone().unwrap_or_default();
    for (i, p) in json_pointers.iter().enumerate() {
        if !p.starts_with('/') {
            c.problem(
                format!("{path}.json_pointers[{i}]"),
                format!("expected a JSON pointer such as \"/choices/0/finish_reason\", got {p:?}"),
            );
        }
    }
    if comparators
        .as_ref()
        .is_some_and(|cs| cs.contains(&Comparator::Json))
        && json_pointers.is_empty()
    {
        c.problem(
            format!("{path}.json_pointers"),
            "the json comparator needs at least one pointer to compare",
        );
    }
    let mut unit = |name: &str, value: Option<f64>, default: f64| {
        c.unit(&format!("{path}.{name}"), value, default)
    };
    CompareConfig {
        comparators,
        json_pointers,
        number_tolerance: unit("number_tolerance", r.number_tolerance, d.number_tolerance),
        text_threshold: unit("text_threshold", r.text_threshold, d.text_threshold),
        vector_threshold: unit("vector_threshold", r.vector_threshold, d.vector_threshold),
    }
}

fn tls_from(raw: RawTls) -> TlsConfig {
    TlsConfig {
        cert: raw.cert,
        key: raw.key,
        client_ca: raw.client_ca,
    }
}

fn check_canary(c: &mut Checker, path: &str, raw: &RawCanary) -> Option<CanaryPolicy> {
    let steps: Vec<u16> = raw
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| c.check(&format!("{path}.steps[{i}]"), weight_from(s)))
        .collect();
    if steps.is_empty() {
        c.problem(
            format!("{path}.steps"),
            "at least one step is needed, such as [\"5%\", \"25%\", \"100%\"]",
        );
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) || steps.first() == Some(&0) {
        c.problem(format!("{path}.steps"), "steps must rise, each above 0%");
    }
    let mut p = CanaryPolicy::with_steps(steps);
    p.interval = c.duration(&format!("{path}.interval"), &raw.interval, p.interval);
    p.progress_deadline = c.duration(
        &format!("{path}.progress_deadline"),
        &raw.progress_deadline,
        p.progress_deadline,
    );
    p.min_requests = raw.min_requests.unwrap_or(p.min_requests);
    let mut unit = |name: &str, value: Option<f64>, default: f64| {
        c.unit(&format!("{path}.{name}"), value, default)
    };
    p.significance = unit("significance", raw.significance, p.significance);
    p.error_rate_tolerance = unit(
        "error_rate_tolerance",
        raw.error_rate_tolerance,
        p.error_rate_tolerance,
    );
    p.max_error_rate_increase = unit(
        "max_error_rate_increase",
        raw.max_error_rate_increase,
        p.max_error_rate_increase,
    );
    p.min_agreement = raw
        .min_agreement
        .map(|v| unit("min_agreement", Some(v), 0.9));
    p.eval = raw.eval.as_ref().map(|e| EvalGate {
        file: e.file.clone(),
        threshold: unit("eval.threshold", e.threshold, 1.0),
        before_first_step: e.before_first_step.unwrap_or(true),
        before_promotion: e.before_promotion.unwrap_or(true),
        compare: e.compare.unwrap_or(false),
        categories: e
            .categories
            .iter()
            .map(|(name, share)| {
                let path = format!("eval.categories.{name}");
                (name.clone(), unit(&path, Some(*share), 1.0))
            })
            .collect(),
    });
    for (name, value) in [
        ("max_p99_ratio", raw.max_p99_ratio),
        ("max_ttfb_p99_ratio", raw.max_ttfb_p99_ratio),
    ] {
        if value.is_some_and(|v| v < 1.0) {
            c.problem(
                format!("{path}.{name}"),
                "a ratio cap below 1 would fail a candidate as fast as stable",
            );
        }
    }
    p.max_p99_ratio = raw.max_p99_ratio.unwrap_or(p.max_p99_ratio);
    p.max_ttfb_p99_ratio = raw.max_ttfb_p99_ratio;
    p.min_comparisons = raw.min_comparisons.unwrap_or(p.min_comparisons);
    if p.min_comparisons > super::AGREEMENT_WINDOW {
        c.problem(
            format!("{path}.min_comparisons"),
            format!(
                "the rolling agreement covers the last {} comparisons; ask for at most that many",
                super::AGREEMENT_WINDOW
            ),
        );
    }
    p.failure_limit = raw.failure_limit.unwrap_or(p.failure_limit).max(1);
    p.confirm_promotion = raw.confirm_promotion;
    p.rollback_steps = raw
        .rollback_steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| c.check(&format!("{path}.rollback_steps[{i}]"), weight_from(s)))
        .collect();
    if p.rollback_steps.windows(2).any(|w| w[0] <= w[1]) {
        c.problem(
            format!("{path}.rollback_steps"),
            "rollback steps must fall, such as [\"5%\", \"1%\"]",
        );
    }
    Some(p)
}

fn size_from(c: &mut Checker, path: &str, raw: &Option<RawScalar>, default: u64) -> u64 {
    match raw {
        None => default,
        Some(RawScalar::Int(n)) if *n >= 0 => *n as u64,
        Some(RawScalar::Str(s)) => c.check(path, parse_size(s)).unwrap_or(default),
        Some(_) => {
            c.problem(
                path,
                "expected a size such as \"1MiB\" or a whole number of bytes",
            );
            default
        }
    }
}

/// In a file a weight is a percentage string ("5%", "0.5%") or a whole number of basis points.
fn weight_from(raw: &RawScalar) -> Result<u16, String> {
    let expected = "expected 0..=10000 basis points or a percentage";
    match raw {
        RawScalar::Int(n) if (0..=i64::from(MAX_BASIS_POINTS)).contains(n) => Ok(*n as u16),
        RawScalar::Int(n) => Err(format!("{expected}, got {n}")),
        RawScalar::Float(f) => Err(format!(
            "{expected}, got {f} (a bare number is basis points; write \"{f}%\" for a percentage)"
        )),
        RawScalar::Str(s) if s.trim_end().ends_with('%') => {
            parse_percent(s).map_err(|_| format!("{expected}, got {s:?}"))
        }
        RawScalar::Str(s) => Err(format!("{expected}, got {s:?} (add % for a percentage)")),
    }
}

fn check_version(c: &mut Checker, path: &str, v: &RawVersion) -> Option<VersionConfig> {
    let mut ok = true;
    for (field, value) in [("model", &v.model), ("version", &v.version)] {
        if value.is_empty() || value.contains('@') || value.chars().any(char::is_whitespace) {
            c.problem(
                format!("{path}.{field}"),
                format!("expected a non-empty name without '@' or spaces, got {value:?}"),
            );
            ok = false;
        }
    }
    if v.version.eq_ignore_ascii_case("latest") {
        c.problem(
            format!("{path}.version"),
            "\"latest\" is not a version: pin an explicit version so a restart cannot change what is served",
        );
        ok = false;
    }
    if v.backends.is_empty() {
        c.problem(
            format!("{path}.backends"),
            "at least one backend URL is needed",
        );
        ok = false;
    }
    let mut backends = Vec::new();
    for (j, url) in v.backends.iter().enumerate() {
        match parse_backend_url(url) {
            Ok(uri) => backends.push(uri),
            Err(m) => {
                c.problem(format!("{path}.backends[{j}]"), m);
                ok = false;
            }
        }
    }
    let balance = match v.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_loaded") => Balance::LeastLoaded,
        Some(other) => {
            c.problem(
                format!("{path}.balance"),
                format!("expected \"round_robin\" or \"least_loaded\", got {other:?}"),
            );
            ok = false;
            Balance::RoundRobin
        }
    };
    let protocol = match v.protocol.as_deref().map(BackendProtocol::parse) {
        None => BackendProtocol::Http1,
        Some(Ok(protocol)) => protocol,
        Some(Err(message)) => {
            c.problem(format!("{path}.protocol"), message);
            ok = false;
            BackendProtocol::Http1
        }
    };
    ok.then(|| VersionConfig {
        model: v.model.clone(),
        version: v.version.clone(),
        backends,
        balance,
        protocol,
        from_registry: false,
        served_model: v.served_model.clone(),
    })
}

/// A backend is an origin: `http://host:port`, with no path, query or credentials.
pub(super) fn parse_backend_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("expected a URL such as \"http://127.0.0.1:8000\", got {url:?}"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => "http",
        Some("https") => "https",
        _ => {
            return Err(format!(
                "expected a URL such as \"http://127.0.0.1:8000\", got {url:?}"
            ))
        }
    };
    let Some(authority) = uri.authority() else {
        return Err(format!("{url:?} has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: credentials in backend URLs are not supported"
        ));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: a backend is an origin (scheme, host, port); requests keep their own path"
        ));
    }
    Uri::builder()
        .scheme(scheme)
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| format!("{url:?}: {e}"))
}

fn check_route(c: &mut Checker, path: &str, r: &RouteConfig, labels: &HashSet<String>) {
    if r.name.is_empty() {
        c.problem(format!("{path}.name"), "route name is empty");
    }
    if !r.prefix.starts_with('/') {
        c.problem(
            format!("{path}.prefix"),
            format!("expected a path starting with '/', got {:?}", r.prefix),
        );
    }
    if r.mlflow.is_some() {
        // The pins are the aliases' versions, resolved when weir starts and re-read after.
        return;
    }
    if r.stable.is_empty() {
        c.problem(
            format!("{path}.stable"),
            "expected the stable version as \"model@version\" (or mlflow_model = \"NAME\" to take it from MLflow)",
        );
        return;
    }
    let known = || {
        let mut all: Vec<_> = labels.iter().cloned().collect();
        all.sort();
        all.join(", ")
    };
    if !labels.contains(&r.stable) {
        c.problem(
            format!("{path}.stable"),
            format!(
                "{:?} is not a defined version (model@version); defined: {}",
                r.stable,
                known()
            ),
        );
    }
    if let Some(candidate) = &r.candidate {
        if !labels.contains(candidate) {
            c.problem(
                format!("{path}.candidate"),
                format!(
                    "{candidate:?} is not a defined version (model@version); defined: {}",
                    known()
                ),
            );
        }
        if candidate == &r.stable {
            c.problem(
                format!("{path}.candidate"),
                "the candidate must differ from the stable version",
            );
        }
    } else {
        if r.weight > 0 {
            c.problem(
                format!("{path}.weight"),
                "a weight above 0 needs a candidate version",
            );
        }
        if r.mirror > 0 {
            c.problem(
                format!("{path}.mirror"),
                "mirroring needs a candidate version",
            );
        }
    }
}

/// Turns a TOML syntax or type error into a problem with line and column.
fn toml_problem(text: &str, e: &toml::de::Error) -> Problem {
    let position = e.span().map(|span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        format!("line {line}, column {column}")
    });
    Problem {
        path: position.unwrap_or_default(),
        message: e.message().trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[versions]]
        model = "chat"
        version = "v1"
        backends = ["http://127.0.0.1:9001"]

        [[versions]]
        model = "chat"
        version = "v2"
        backends = ["http://127.0.0.1:9002", "http://127.0.0.1:9003"]
        balance = "least_loaded"

        [[routes]]
        name = "chat"
        stable = "chat@v1"
        candidate = "chat@v2"
        weight = "0.5%"
        sticky_header = "x-session-id"
    "#;

    #[test]
    fn minimal_file_parses_with_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.listener.addr.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.routes[0].weight, 50);
        assert_eq!(config.routes[0].prefix, "/");
        assert_eq!(config.versions[1].balance, Balance::LeastLoaded);
        assert_eq!(config.versions[1].backends.len(), 2);
    }

    #[test]
    fn a_version_names_the_protocol_its_backends_speak() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.versions[0].protocol, BackendProtocol::Http1);
        for (text, protocol) in [
            ("http2", BackendProtocol::Http2),
            ("auto", BackendProtocol::Auto),
            ("http1", BackendProtocol::Http1),
        ] {
            let with = MINIMAL.replace(
                "balance = \"least_loaded\"",
                &format!("balance = \"least_loaded\"\nprotocol = \"{text}\""),
            );
            assert_eq!(parse(&with).unwrap().versions[1].protocol, protocol);
        }
        let bad = MINIMAL.replace(
            "balance = \"least_loaded\"",
            "balance = \"least_loaded\"\nprotocol = \"grpc\"",
        );
        let problems = parse(&bad).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.to_string().contains("versions[1].protocol")
                    && p.to_string()
                        .contains("expected \"http1\", \"http2\" or \"auto\"")),
            "{problems:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [proxy]
            connect_timeout = "soon"
            [[versions]]
            model = "chat"
            version = "latest"
            backends = ["ftp://x", "http://h:1/base"]
            [[routes]]
            name = "a"
            stable = "chat@v1"
            [[routes]]
            name = "b"
            stable = "chat@v1"
            candidate = "chat@v9"
            weight = "150%"
        "#;
        let problems = parse(text).unwrap_err();
        let paths: Vec<_> = problems.iter().map(|p| p.path.as_str()).collect();
        for expected in [
            "proxy.connect_timeout",
            "versions[0].version",
            "versions[0].backends[0]",
            "versions[0].backends[1]",
            "routes[0].stable",
            "routes[1].candidate",
            "routes[1].weight",
        ] {
            assert!(
                paths.contains(&expected),
                "{expected} missing from {problems:?}"
            );
        }
        let weight = problems
            .iter()
            .find(|p| p.path == "routes[1].weight")
            .unwrap();
        assert_eq!(
            weight.to_string(),
            "routes[1].weight: expected 0..=10000 basis points or a percentage, got \"150%\""
        );
    }

    #[test]
    fn http2_connections_per_backend_are_bounded_and_at_least_one() {
        for bad in [0, 100_000] {
            let problems = parse(&format!(
                "[proxy]\nhttp2_max_connections_per_backend = {bad}\n{MINIMAL}"
            ))
            .unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].path, "proxy.http2_max_connections_per_backend");
            assert!(problems[0].message.contains("1..=1024"), "{problems:?}");
        }
        let config = parse(&format!(
            "[proxy]\nhttp2_max_connections_per_backend = 2\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(config.proxy.http2_max_connections_per_backend, 2);
    }

    #[test]
    fn an_unbounded_idle_pool_is_refused() {
        let problems = parse(&format!(
            "[proxy]\npool_max_idle_per_backend = 1000000\n{MINIMAL}"
        ))
        .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].path, "proxy.pool_max_idle_per_backend");
        assert!(
            problems[0].message.contains("at most 65536"),
            "{problems:?}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_a_position() {
        let problems = parse("[listener]\naddr = \"127.0.0.1:1\"\nadress = \"x\"\n").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(problems[0].path.starts_with("line 3"), "{problems:?}");
        assert!(problems[0].message.contains("adress"), "{problems:?}");
    }

    #[test]
    fn integer_weight_is_basis_points() {
        let text = MINIMAL.replace("\"0.5%\"", "250");
        assert_eq!(parse(&text).unwrap().routes[0].weight, 250);
        let text = MINIMAL.replace("\"0.5%\"", "0.5");
        let problems = parse(&text).unwrap_err();
        assert!(problems[0].message.contains("\"0.5%\""), "{problems:?}");
    }

    #[test]
    fn fleet_settings_are_checked_with_their_paths() {
        let fleet = |state: &str| parse(&format!("[state]\n{state}\n{MINIMAL}"));
        let config = fleet("backend = \"etcd\"\netcd = [\"http://127.0.0.1:2379\"]").unwrap();
        let f = config.fleet.expect("fleet mode");
        assert_eq!(f.prefix, "/weir/default");
        assert_eq!(f.lease_ttl, std::time::Duration::from_secs(10));
        assert_eq!(
            f.compaction_interval,
            Some(std::time::Duration::from_secs(300))
        );
        for (text, expected) in [("off", None), ("1h", Some(3600))] {
            let config = fleet(&format!(
                "backend = \"etcd\"\netcd = [\"http://a:2379\"]\ncompaction_interval = {text:?}"
            ))
            .unwrap();
            assert_eq!(
                config.fleet.unwrap().compaction_interval,
                expected.map(std::time::Duration::from_secs),
                "{text}"
            );
        }
        let config = fleet(
            "backend = \"etcd\"\netcd = [\"http://a:2379\"]\ncluster = \"prod\"\nreplica = \"w0\"",
        )
        .unwrap();
        let f = config.fleet.unwrap();
        assert_eq!(
            (f.prefix.as_str(), f.replica.as_str()),
            ("/weir/prod", "w0")
        );
        assert!(parse(MINIMAL).unwrap().fleet.is_none());

        let problems = fleet(
            "backend = \"etcd\"\netcd = [\"127.0.0.1:2379\"]\nprefix = \"weir/\"\nlease_ttl = \"500ms\"\ncompaction_interval = \"100ms\"",
        )
        .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "state.etcd[0]",
                "state.prefix",
                "state.lease_ttl",
                "state.compaction_interval"
            ],
            "{problems:?}"
        );
        let problems = fleet("backend = \"etcd\"").unwrap_err();
        assert_eq!(problems[0].path, "state.etcd");
        // etcd keys without the etcd backend are a mistake, not silently a single weir.
        let problems = fleet("etcd = [\"http://127.0.0.1:2379\"]").unwrap_err();
        assert_eq!(problems[0].path, "state.etcd");
        assert!(problems[0].message.contains("backend = \"etcd\""));
        let problems = fleet("backend = \"zookeeper\"").unwrap_err();
        assert_eq!(problems[0].path, "state.backend");

        // TLS and users: pairs go together, TLS needs https endpoints.
        let problems = fleet(
            "backend = \"etcd\"\netcd = [\"http://a:2379\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"c.pem\"\netcd_user = \"weir\"",
        )
        .unwrap_err();
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["state.etcd_key", "state.etcd", "state.etcd_password_file"],
            "{problems:?}"
        );
        let config = fleet("backend = \"etcd\"\netcd = [\"https://a:2379\"]").unwrap();
        let tls = config.fleet.unwrap().tls.expect("https means TLS");
        assert_eq!((tls.ca, tls.client_cert), (None, None)); // the system roots
        let config = fleet(
            "backend = \"etcd\"\netcd = [\"https://a:2379\"]\netcd_ca = \"ca.pem\"\netcd_cert = \"c.pem\"\netcd_key = \"c.key\"\netcd_user = \"weir\"\netcd_password_file = \"pw\"",
        )
        .unwrap();
        let f = config.fleet.unwrap();
        assert!(f.tls.unwrap().client_cert.is_some());
        assert_eq!(f.user.unwrap().name, "weir");
    }

    #[test]
    fn shipped_examples_are_valid() {
        for (name, text) in [
            ("config/weir.toml", include_str!("../../config/weir.toml")),
            (
                "config/minimal.toml",
                include_str!("../../config/minimal.toml"),
            ),
            ("config/fleet.toml", include_str!("../../config/fleet.toml")),
        ] {
            if let Err(problems) = parse(text) {
                panic!("{name}: {problems:?}");
            }
        }
    }
}
