//! Configuration: a TOML file or quick-mode flags, turned into one validated [`Config`].
//!
//! Invariant: a `Config` that exists has passed every check — versions referenced by routes
//! exist, weights are in 0..=10000 basis points, addresses and URLs parse. Every problem found is
//! reported with its path (`routes[1].weight`), not just the first.

mod file;
mod quick;
pub mod units;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Uri};

pub use quick::QuickMode;

/// A backend origin (`http://host:port`), checked as the config checks `backends`.
pub fn parse_backend_url(url: &str) -> Result<Uri, String> {
    file::parse_backend_url(url)
}

/// How many comparisons a route's rolling shadow agreement covers (the canary's
/// `min_comparisons` cannot ask for more).
pub const AGREEMENT_WINDOW: usize = 1000;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub proxy: ProxyConfig,
    pub state_dir: PathBuf,
    /// Shared routing state in etcd (`[state] backend = "etcd"`); `None` keeps it in `state_dir`.
    pub fleet: Option<FleetConfig>,
    pub versions: Vec<VersionConfig>,
    pub routes: Vec<RouteConfig>,
    /// The file this config was read from; `POST /v1/reload` and SIGHUP re-read it.
    pub source: Option<PathBuf>,
    /// Built from `weir serve` flags (quick mode): there is no file to edit and reload.
    pub from_flags: bool,
    /// The model registry whose pins routes must satisfy; `None` runs unpinned (unless MLflow
    /// is the registry).
    pub registry: Option<PathBuf>,
    /// The MLflow Model Registry as a source of pins (`[registry] mlflow`).
    pub mlflow: Option<MlflowConfig>,
    /// Registry entries of the MLflow versions the routes are pinned to, read from their tags
    /// when the aliases were resolved (`control::mlflow`); empty without MLflow.
    pub mlflow_versions: Vec<crate::registry::ModelVersion>,
    /// How backends are asked which model they serve.
    pub identity: Option<IdentityProbe>,
    pub shadow: ShadowConfig,
}

/// Fleet mode: replicas share routing state, the audit head and one canary controller through
/// etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetConfig {
    /// etcd client URLs, such as `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key weir writes lives under this prefix (`/weir/<cluster>` by default).
    pub prefix: String,
    /// This replica's name in audit records, counters and the election.
    pub replica: String,
    /// TTL of the replica's lease: a dead controller's successor takes over within it.
    pub lease_ttl: Duration,
    /// How often the canary leader compacts etcd's history (keeping at least this much of it);
    /// `None` when the etcd cluster compacts itself.
    pub compaction_interval: Option<Duration>,
    /// TLS to etcd (https endpoints): a private CA and a client certificate, both optional.
    pub tls: Option<EtcdTls>,
    /// etcd authentication (etcd's own users), when the cluster has auth enabled.
    pub user: Option<EtcdUser>,
}

/// How weir trusts etcd and proves itself to it over TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM CA bundle that signed etcd's certificate; the system roots when absent.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for etcd's `--client-cert-auth`.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// An etcd user; the password is read from a file so it stays out of the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdUser {
    pub name: String,
    pub password_file: PathBuf,
}

impl FleetConfig {
    pub const DEFAULT_CLUSTER: &'static str = "default";
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
    /// kube-apiserver's default for the same job.
    pub const DEFAULT_COMPACTION_INTERVAL: Duration = Duration::from_secs(300);

    pub fn default_prefix(cluster: &str) -> String {
        format!("/weir/{cluster}")
    }

    /// `<hostname>-<pid>`: unique per process on a host, readable in the audit log.
    pub fn default_replica() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "weir".to_string());
        format!("{host}-{}", std::process::id())
    }

    /// Checks endpoint URLs and the prefix; the message names what was expected.
    pub fn validate_endpoint(url: &str) -> Result<(), String> {
        let parsed: Uri = url.parse().map_err(|_| {
            format!("expected an etcd client URL such as \"http://127.0.0.1:2379\", got {url:?}")
        })?;
        match (parsed.scheme_str(), parsed.authority()) {
            (Some("http" | "https"), Some(_)) => Ok(()),
            _ => Err(format!(
                "expected an etcd client URL such as \"http://127.0.0.1:2379\", got {url:?}"
            )),
        }
    }

    pub fn validate_prefix(prefix: &str) -> Result<(), String> {
        if prefix.starts_with('/') && prefix.len() > 1 && !prefix.ends_with('/') {
            Ok(())
        } else {
            Err(format!(
                "expected a key prefix such as \"/weir/prod\" (starts with '/', does not end with one), got {prefix:?}"
            ))
        }
    }
}

/// A backend identity probe: `GET path`, then read the identity from a JSON pointer of the body
/// or from a response header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityProbe {
    pub path: String,
    pub source: IdentitySource,
    pub interval: Duration,
    pub timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    /// RFC 6901 pointer into the JSON body, e.g. `/data/0/id`.
    JsonPointer(String),
    Header(HeaderName),
    /// gRPC's standard health service (`grpc.health.v1.Health/Check`, over HTTP/2): the backend
    /// serves the identity it reports SERVING as a service name.
    GrpcHealth,
}

impl IdentityProbe {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

    /// The gRPC health service's Check method.
    pub const GRPC_HEALTH_CHECK: &str = crate::grpc::HEALTH_CHECK;

    /// Parses `PATH#/json/pointer`, `PATH#header:NAME` or `grpc-health`.
    pub fn parse(
        spec: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Result<IdentityProbe, String> {
        let expected = || {
            format!(
                "expected PATH#/json/pointer, PATH#header:NAME or grpc-health, such as \"/v1/models#/data/0/id\", got {spec:?}"
            )
        };
        if interval.is_zero() || timeout.is_zero() {
            return Err("the identity probe interval and timeout must be longer than zero".into());
        }
        if spec == "grpc-health" {
            return Ok(IdentityProbe {
                path: IdentityProbe::GRPC_HEALTH_CHECK.to_string(),
                source: IdentitySource::GrpcHealth,
                interval,
                timeout,
            });
        }
        let (path, what) = spec.split_once('#').ok_or_else(expected)?;
        if !path.starts_with('/') {
            return Err(expected());
        }
        let source = if let Some(name) = what.strip_prefix("header:") {
            IdentitySource::Header(HeaderName::try_from(name).map_err(|_| expected())?)
        } else if what.starts_with('/') {
            IdentitySource::JsonPointer(what.to_string())
        } else {
            return Err(expected());
        };
        Ok(IdentityProbe {
            path: path.to_string(),
            source,
            interval,
            timeout,
        })
    }
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    /// A client that has not sent a full request head within this time is disconnected.
    pub header_read_timeout: Duration,
    /// Request bodies larger than this get 413.
    pub max_request_body: u64,
    /// Terminate TLS on this listener.
    pub tls: Option<TlsConfig>,
    pub limits: ConnLimits,
    /// Relay the HTTP/1.1 requests that allow it byte for byte (true), or send every HTTP/1
    /// request through the general path (false). Both frame, route and answer alike; off is for
    /// comparing the two, or ruling the relay out.
    pub http1_fast_path: bool,
    /// How much of a request body weir reads to find the fields it routes by (`model`, a sticky
    /// field); a body without them in that much is refused.
    pub max_body_scan: usize,
    pub models_endpoint: ModelsEndpoint,
}

/// What one client may hold or send; beyond these weir refuses rather than stalls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Largest request head (request line plus headers); larger gets 431.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Open client connections at most; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// HTTP/2 streams one connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before they are accepted (rapid-reset protection).
    pub http2_max_pending_resets: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_connections: 10_000,
            http2_max_concurrent_streams: 256,
            http2_max_pending_resets: 20,
        }
    }
}

/// TLS termination on a listener: PEM certificate chain and key, and optionally the CA whose
/// client certificates are required (mTLS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// How weir talks to `https://` backends: system roots plus an optional private CA, and an
/// optional client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendTls {
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// The admin token itself (from `WEIR_ADMIN_TOKEN` or `--admin-token-file`); never from a
    /// config file, which is often under source control.
    pub token: Option<String>,
    /// A file holding the admin token (`[admin] token_file`).
    pub token_file: Option<PathBuf>,
    pub tls: Option<TlsConfig>,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Response header naming the version that served; `None` turns it off.
    pub version_header: Option<HeaderName>,
    pub connect_timeout: Duration,
    /// Longest wait for a backend's response head after the request was sent.
    pub response_header_timeout: Duration,
    /// Longest silence between two body chunks of a backend's response.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests and open streams.
    pub drain_timeout: Duration,
    /// How long a backend that refused a connection is skipped; zero never skips.
    pub backend_eject: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_backend: usize,
    /// Most HTTP/2 connections open to one `protocol = "http2"` backend at once.
    pub http2_max_connections_per_backend: usize,
    /// How often an HTTP/2 backend connection is PINGed (idle or not); one whose PING goes
    /// unanswered for 20 s is closed.
    pub http2_keepalive_interval: Duration,
    pub backend_tls: BackendTls,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            version_header: Some(HeaderName::from_static("x-weir-version")),
            connect_timeout: Duration::from_secs(2),
            response_header_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            backend_eject: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_backend: 256,
            http2_max_connections_per_backend: 4,
            http2_keepalive_interval: Duration::from_secs(30),
            backend_tls: BackendTls::default(),
        }
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
pub const DEFAULT_STATE_DIR: &str = "./weir-state";
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 32 * 1024 * 1024;
pub const DEFAULT_MAX_BODY_SCAN: usize = 64 * 1024;

/// One servable model version and the backends that serve it.
#[derive(Clone, Debug)]
pub struct VersionConfig {
    pub model: String,
    pub version: String,
    /// Origins (`http://host:port`) of the model servers for this version.
    pub backends: Vec<Uri>,
    pub balance: Balance,
    pub protocol: BackendProtocol,
    /// Defined by the registry (an MLflow version's `weir.backends` tag), not by the config:
    /// replaced whenever the aliases are resolved again.
    pub from_registry: bool,
    /// The name this version's servers know the model by: requests routed by model have their
    /// body's `model` replaced with it.
    pub served_model: Option<String>,
}

/// The MLflow tracking server whose Model Registry aliases pin the routes that name a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlflowConfig {
    /// `http://host:5000` or `https://...` (a path prefix, as behind a gateway, is kept).
    pub url: String,
    /// A file holding a bearer token (MLflow's token auth, Databricks personal access tokens).
    pub token_file: Option<PathBuf>,
    /// Basic auth (`mlflow server --app-name basic-auth`): user name and a file with the password.
    pub user: Option<(String, PathBuf)>,
    /// PEM CA bundle for an `https://` MLflow with a private CA; the system roots otherwise.
    pub ca: Option<PathBuf>,
    /// How often the aliases are read again (MLflow has no watch API).
    pub interval: Duration,
    /// Bound on each MLflow call.
    pub timeout: Duration,
}

impl MlflowConfig {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_STABLE_ALIAS: &'static str = "champion";
    pub const DEFAULT_CANDIDATE_ALIAS: &'static str = "challenger";

    pub fn new(url: String) -> MlflowConfig {
        MlflowConfig {
            url,
            token_file: None,
            user: None,
            ca: None,
            interval: MlflowConfig::DEFAULT_INTERVAL,
            timeout: MlflowConfig::DEFAULT_TIMEOUT,
        }
    }

    pub fn validate_url(url: &str) -> Result<(), String> {
        let expected = || {
            format!("expected the MLflow tracking server's URL such as \"http://127.0.0.1:5000\", got {url:?}")
        };
        let parsed: Uri = url.parse().map_err(|_| expected())?;
        match (parsed.scheme_str(), parsed.authority()) {
            (Some("http" | "https"), Some(a)) if !a.as_str().contains('@') => Ok(()),
            _ => Err(expected()),
        }
    }
}

/// A route whose pins are the aliases of an MLflow registered model: the version the stable
/// alias names serves as stable, the one the candidate alias names as candidate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlflowRoute {
    /// The registered model's name in MLflow; its versions are `model@<version number>`.
    pub model: String,
    pub stable_alias: String,
    pub candidate_alias: String,
}

/// The HTTP version weir speaks to a version's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendProtocol {
    /// HTTP/1.1 (the default): the fast path's pooled connections for `http://` backends.
    #[default]
    Http1,
    /// HTTP/2: over `http://` with prior knowledge (h2c), over `https://` by ALPN `h2`. Needed
    /// for gRPC servers (Triton, KServe v2, TF Serving, vLLM and TGI gRPC frontends).
    Http2,
    /// HTTP/2 where TLS's ALPN offers it, HTTP/1.1 otherwise (and always over `http://`).
    Auto,
}

impl BackendProtocol {
    pub fn parse(text: &str) -> Result<BackendProtocol, String> {
        match text {
            "http1" => Ok(BackendProtocol::Http1),
            "http2" => Ok(BackendProtocol::Http2),
            "auto" => Ok(BackendProtocol::Auto),
            other => Err(format!(
                "expected \"http1\", \"http2\" or \"auto\", got {other:?}"
            )),
        }
    }
}

impl VersionConfig {
    /// The `model@version` label used in headers, metrics and routes.
    pub fn label(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }
}

/// How requests are spread over the backends of one version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight (ties go round robin).
    LeastLoaded,
}

/// Where the sticky key of a request comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StickyKey {
    Header(HeaderName),
    Cookie(String),
    /// A top-level string field of the JSON body, such as OpenAI's end-user `user`.
    Field(String),
}

/// The API a route speaks, which shapes weir's own answers on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Api {
    /// `{"error": "<message>", "kind", "version"}`.
    #[default]
    Plain,
    /// OpenAI's `{"error": {"message", "type", "code", "param"}}`, with `kind` and `version`
    /// beside it, so OpenAI SDKs show the message.
    OpenAi,
}

/// Who answers `GET /v1/models`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ModelsEndpoint {
    /// weir, when any route routes by model; else the matching route's stable version.
    #[default]
    Auto,
    /// weir, from its routes: every model they serve.
    Weir,
    /// The matching route's stable version, never split.
    Stable,
}

#[derive(Clone, Debug)]
pub struct RouteConfig {
    pub name: String,
    /// Path prefix, matched on segment boundaries (`/v1` matches `/v1` and `/v1/x`, not `/v1x`).
    pub prefix: String,
    /// Host (without port) the route is limited to; `None` matches any host.
    pub host: Option<String>,
    /// `model@version` of the production version.
    pub stable: String,
    /// `model@version` of the candidate, if a canary is running.
    pub candidate: Option<String>,
    /// Share of traffic for the candidate, in basis points (0..=10000).
    pub weight: u16,
    pub sticky: Option<StickyKey>,
    /// The models the route serves: it matches only requests whose JSON body's top-level
    /// `model` (or `model_header`) names one. Empty: any request on its path.
    pub models: Vec<String>,
    /// A request header that names the model, read instead of the body when present.
    pub model_header: Option<HeaderName>,
    pub api: Api,
    /// Whether `x-weir-version` may pin a request to this route's stable or candidate version.
    pub allow_override: bool,
    /// Share of stable-routed requests also sent to the candidate as shadows, in basis points.
    pub mirror: u16,
    /// How shadow answers are compared with the stable ones.
    pub compare: CompareConfig,
    /// Progressive delivery of the candidate by the canary controller.
    pub canary: Option<CanaryPolicy>,
    /// The pins come from MLflow aliases: `stable` and `candidate` are filled in when they are
    /// resolved (empty until then).
    pub mlflow: Option<MlflowRoute>,
}

/// How the canary controller moves a route's candidate through its steps.
#[derive(Clone, Debug, PartialEq)]
pub struct CanaryPolicy {
    /// Candidate weights in basis points, rising; the last is normally 10000.
    pub steps: Vec<u16>,
    /// Time between analyses.
    pub interval: Duration,
    /// Responses each version needs in a window before it is judged.
    pub min_requests: u64,
    /// One-sided two-proportion z-test: a candidate error rate higher than stable's at this
    /// significance (and by more than `error_rate_tolerance`) fails.
    pub significance: f64,
    pub error_rate_tolerance: f64,
    /// Absolute cap: the candidate's error rate may exceed stable's by at most this.
    pub max_error_rate_increase: f64,
    /// Candidate p99 latency / stable p99 latency at most this.
    pub max_p99_ratio: f64,
    /// Candidate p99 time to first byte / stable's at most this (streaming routes).
    pub max_ttfb_p99_ratio: Option<f64>,
    /// Rolling shadow agreement at least this (when the route mirrors).
    pub min_agreement: Option<f64>,
    /// Shadow comparisons needed before the agreement gate judges.
    pub min_comparisons: usize,
    /// Failed analyses in a row before rolling back (1: at once).
    pub failure_limit: u32,
    /// A step that cannot be judged for this long (too little data) is rolled back.
    pub progress_deadline: Duration,
    /// After the last step passes, wait for an admin to promote.
    pub confirm_promotion: bool,
    /// Weights to ramp down through (one per interval) before a rollback; empty: at once.
    pub rollback_steps: Vec<u16>,
    pub eval: Option<EvalGate>,
}

/// A held-out evaluation the candidate must pass.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalGate {
    pub file: PathBuf,
    /// Share of cases that must pass (0..=1).
    pub threshold: f64,
    pub before_first_step: bool,
    pub before_promotion: bool,
    /// Send every case to stable too, and pass a case only when the candidate agrees with
    /// stable's answer (the route's comparators) as well as meeting its expectations.
    pub compare: bool,
    /// Threshold per category (a trigger probe may need 1); the set must have cases of each.
    /// Categories not named take `threshold`.
    pub categories: BTreeMap<String, f64>,
}

impl CanaryPolicy {
    pub fn with_steps(steps: Vec<u16>) -> CanaryPolicy {
        CanaryPolicy {
            steps,
            interval: Duration::from_secs(60),
            min_requests: 200,
            significance: 0.01,
            error_rate_tolerance: 0.005,
            max_error_rate_increase: 0.05,
            max_p99_ratio: 1.5,
            max_ttfb_p99_ratio: None,
            min_agreement: None,
            min_comparisons: 20,
            failure_limit: 1,
            progress_deadline: Duration::from_secs(600),
            confirm_promotion: false,
            rollback_steps: Vec::new(),
            eval: None,
        }
    }
}

/// One way of comparing a candidate's shadow answer with the stable answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comparator {
    /// Same status class.
    Status,
    /// Identical body bytes.
    Exact,
    /// The listed JSON pointers hold equal values (numbers within a tolerance).
    Json,
    /// Generated text similar above a threshold (token-level, normalised).
    Text,
    /// Embeddings with a cosine similarity above a threshold.
    Vector,
}

impl Comparator {
    pub const ALL: [Comparator; 5] = [
        Comparator::Status,
        Comparator::Exact,
        Comparator::Json,
        Comparator::Text,
        Comparator::Vector,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Comparator::Status => "status",
            Comparator::Exact => "exact",
            Comparator::Json => "json",
            Comparator::Text => "text",
            Comparator::Vector => "vector",
        }
    }

    pub fn parse(text: &str) -> Result<Comparator, String> {
        Comparator::ALL
            .into_iter()
            .find(|c| c.as_str() == text)
            .ok_or_else(|| {
                format!("expected one of status, exact, json, text, vector; got {text:?}")
            })
    }
}

/// A route's comparison settings.
#[derive(Clone, Debug, PartialEq)]
pub struct CompareConfig {
    /// `None`: by request path — chat and completions get status + text, embeddings status +
    /// vector, anything else status + exact.
    pub comparators: Option<Vec<Comparator>>,
    pub json_pointers: Vec<String>,
    /// Largest relative difference for numbers to count as equal in `json`.
    pub number_tolerance: f64,
    pub text_threshold: f64,
    pub vector_threshold: f64,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            comparators: None,
            json_pointers: Vec::new(),
            number_tolerance: 1e-6,
            text_threshold: 0.8,
            vector_threshold: 0.99,
        }
    }
}

/// Bounds of shadow traffic, shared by every route.
#[derive(Clone, Debug)]
pub struct ShadowConfig {
    /// Shadow requests in flight at most; more are dropped and counted.
    pub max_in_flight: usize,
    /// Larger request or response bodies are not mirrored or compared.
    pub max_body: u64,
    pub timeout: Duration,
    /// Keep a rotating file of disagreement samples in the state dir (prompts may be sensitive).
    pub samples: bool,
    pub samples_max_bytes: u64,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        ShadowConfig {
            max_in_flight: 64,
            max_body: 1024 * 1024,
            timeout: Duration::from_secs(30),
            samples: false,
            samples_max_bytes: 1024 * 1024,
        }
    }
}

/// One problem in a configuration, with the path of the offending value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub source_name: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.source_name,
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Parses and validates a TOML configuration; `source_name` names it in errors.
    pub fn from_toml_str(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        file::parse(text).map_err(|problems| ConfigError {
            source_name: source_name.to_string(),
            problems,
        })
    }

    /// Reads, parses and validates a TOML configuration file.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            problems: vec![Problem {
                path: String::new(),
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        let mut config = Config::from_toml_str(&text, &name)?;
        config.source = Some(path.to_path_buf());
        // A relative registry path is relative to the config file, wherever weir runs from.
        if let Some(dir) = path.parent() {
            if let Some(registry) = config.registry.as_mut().filter(|r| r.is_relative()) {
                *registry = dir.join(&*registry);
            }
            if let Some(mlflow) = config.mlflow.as_mut() {
                let files = [
                    mlflow.token_file.as_mut(),
                    mlflow.ca.as_mut(),
                    mlflow.user.as_mut().map(|(_, file)| file),
                ];
                for file in files.into_iter().flatten().filter(|f| f.is_relative()) {
                    *file = dir.join(&*file);
                }
            }
            for route in &mut config.routes {
                let eval = route.canary.as_mut().and_then(|c| c.eval.as_mut());
                if let Some(eval) = eval.filter(|e| e.file.is_relative()) {
                    eval.file = dir.join(&eval.file);
                }
            }
        }
        Ok(config)
    }

    pub fn version(&self, label: &str) -> Option<&VersionConfig> {
        self.versions.iter().find(|v| v.label() == label)
    }
}
