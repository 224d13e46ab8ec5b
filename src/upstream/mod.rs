//! Upstream side: the backends of each version, how one is picked, and passive ejection.
//!
//! A `Version` outlives routing tables (tables are rebuilt, versions are reused), so in-flight
//! counts and ejections survive a weight change. Connections are pooled per backend origin by the
//! HTTP/1 [`pool`] of each backend, HTTP/2 ones by its [`h2`] connections (HTTPS backends
//! speaking HTTP/1.1 or `auto`: by the shared hyper client).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use crate::config::{BackendProtocol, Balance, VersionConfig};
use crate::metrics::ProxyFailure;

pub mod h2;
pub mod pool;

/// One model version and its backends.
#[derive(Debug)]
pub struct Version {
    pub label: Arc<str>,
    /// `label` as a header value, for `x-weir-version`.
    pub label_header: HeaderValue,
    pub backends: Box<[Backend]>,
    /// Every backend speaks plain HTTP/1.1 (the fast path serves it; TLS and HTTP/2 backends go
    /// through hyper's client).
    pub plain_http: bool,
    pub protocol: BackendProtocol,
    /// The body's `model` for this version on routes that route by model, as a JSON string
    /// token (quotes and escapes included); `None` keeps the client's.
    pub served_model: Option<Box<[u8]>>,
    balance: Balance,
    next: AtomicUsize,
}

/// One model server.
#[derive(Debug)]
pub struct Backend {
    pub scheme: Scheme,
    pub authority: Authority,
    /// `host:port` to connect to: the authority, with the scheme's default port when it has none.
    pub address: String,
    in_flight: AtomicUsize,
    /// Milliseconds since [`epoch`] until which this backend is skipped; 0 when usable.
    ejected_until: AtomicU64,
    /// Whether the backend reports the identity the registry expects. Always true without an
    /// identity probe; with one, false until the first probe says so.
    verified: AtomicBool,
    /// Idle keep-alive connections of the HTTP/1.1 fast path.
    pub pool: Arc<pool::Pool>,
    /// HTTP/2 connections, for `protocol = "http2"`.
    pub h2: h2::Connections,
    /// When each kind of failure was last logged, by [`ProxyFailure`] index.
    failure_logs: [FailureLog; ProxyFailure::ALL.len()],
}

/// Each kind of backend failure is logged at most once per this period per backend, with the
/// number of failures of that kind not logged since.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct FailureLog {
    /// Milliseconds since [`epoch`] before which this kind is not logged again.
    quiet_until: AtomicU64,
    suppressed: AtomicU64,
}

/// `host:port` for `authority`, with the scheme's default port when it names none.
fn address(scheme: &Scheme, authority: &Authority) -> String {
    match authority.port_u16() {
        Some(_) => authority.as_str().to_string(),
        None if *scheme == Scheme::HTTPS => format!("{}:443", authority.host()),
        None => format!("{}:80", authority.host()),
    }
}

/// Process-wide reference point for ejection deadlines, kept as plain integers.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_millis() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Version {
    /// A version whose backends start out verified (`verified`) or waiting for an identity probe,
    /// each keeping at most `pool_max_idle` idle connections for the fast path.
    pub fn from_config(config: &VersionConfig, verified: bool, pool_max_idle: usize) -> Version {
        let label = config.label();
        let backends: Box<[Backend]> = config
            .backends
            .iter()
            .map(|uri| {
                let scheme = uri.scheme().cloned().unwrap_or(Scheme::HTTP);
                let authority = uri
                    .authority()
                    .cloned()
                    .expect("config validation guarantees an authority");
                Backend {
                    address: address(&scheme, &authority),
                    scheme,
                    authority,
                    in_flight: AtomicUsize::new(0),
                    ejected_until: AtomicU64::new(0),
                    verified: AtomicBool::new(verified),
                    pool: Arc::new(pool::Pool::new(pool_max_idle)),
                    h2: h2::Connections::default(),
                    failure_logs: Default::default(),
                }
            })
            .collect();
        Version {
            label_header: label_header(&label),
            label: label.into(),
            plain_http: config.protocol != BackendProtocol::Http2
                && backends.iter().all(|b| b.scheme == Scheme::HTTP),
            protocol: config.protocol,
            served_model: config.served_model.as_ref().map(|name| {
                serde_json::to_vec(name)
                    .expect("a string serializes")
                    .into_boxed_slice()
            }),
            backends,
            balance: config.balance,
            next: AtomicUsize::new(0),
        }
    }

    /// Whether this version serves the same backends the same way as `config`.
    pub fn same_as(&self, config: &VersionConfig) -> bool {
        self.balance == config.balance
            && self.protocol == config.protocol
            && self.served_model.as_deref()
                == config
                    .served_model
                    .as_ref()
                    .map(|n| serde_json::to_vec(n).expect("a string serializes"))
                    .as_deref()
            && self.backends.len() == config.backends.len()
            && self
                .backends
                .iter()
                .zip(&config.backends)
                .all(|(b, uri)| Some(&b.authority) == uri.authority())
    }

    /// Picks a usable backend, or `None` when every backend is ejected.
    pub fn pick(self: &Arc<Self>) -> Option<BackendGuard> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = if self
            .backends
            .iter()
            .any(|b| b.ejected_until.load(Ordering::Relaxed) != 0)
        {
            now_millis()
        } else {
            0
        };
        let usable = |b: &Backend| {
            let until = b.ejected_until.load(Ordering::Relaxed);
            (until == 0 || until <= now) && b.verified.load(Ordering::Relaxed)
        };
        let index = match self.balance {
            Balance::RoundRobin => (0..n)
                .map(|i| (start + i) % n)
                .find(|&i| usable(&self.backends[i])),
            Balance::LeastLoaded => (0..n)
                .map(|i| (start + i) % n)
                .filter(|&i| usable(&self.backends[i]))
                .min_by_key(|&i| self.backends[i].in_flight.load(Ordering::Relaxed)),
        }?;
        self.backends[index]
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
        Some(BackendGuard {
            version: Arc::clone(self),
            index,
        })
    }
}

impl Backend {
    /// Skips this backend for `duration` after it refused a connection. Returns whether it was
    /// usable until now (so the caller logs an ejection once, not per request).
    pub fn eject(&self, duration: Duration) -> bool {
        if duration.is_zero() {
            return false;
        }
        let now = now_millis();
        let previous = self
            .ejected_until
            .swap(now + duration.as_millis() as u64, Ordering::Relaxed);
        previous == 0 || previous <= now
    }

    /// Ejects this backend after it refused a connection (`error` says how), warning once per
    /// ejection rather than per request.
    pub fn refused(&self, duration: Duration, version: &str, error: impl std::fmt::Display) {
        if self.eject(duration) {
            tracing::warn!(
                version,
                backend = %self.authority,
                %error,
                "backend refused a connection; skipping it for {duration:?}"
            );
        }
    }

    /// Logs a request this backend failed (after it accepted the connection) at WARN: the
    /// first of each kind, then at most one line per kind every [`FAILURE_LOG_PERIOD`] with
    /// the count of those not logged, so a backend failing every request is seen without a
    /// line per request.
    pub fn failed(&self, version: &str, kind: ProxyFailure, what: &str) {
        let log = &self.failure_logs[kind as usize];
        let now = now_millis();
        let quiet_until = log.quiet_until.load(Ordering::Relaxed);
        let period = FAILURE_LOG_PERIOD.as_millis() as u64;
        if now < quiet_until
            || log
                .quiet_until
                .compare_exchange(
                    quiet_until,
                    now + period,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            log.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = log.suppressed.swap(0, Ordering::Relaxed);
        tracing::warn!(
            version,
            backend = %self.authority,
            kind = kind.as_str(),
            not_logged = suppressed,
            "backend {what}; further {} failures of this backend are logged at most every {FAILURE_LOG_PERIOD:?}",
            kind.as_str()
        );
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn is_verified(&self) -> bool {
        self.verified.load(Ordering::Relaxed)
    }

    /// Puts the backend in or out of rotation by its identity; returns the previous verdict.
    pub fn set_verified(&self, verified: bool) -> bool {
        self.verified.swap(verified, Ordering::Relaxed)
    }
}

impl Version {
    /// Whether any backend currently reports the expected identity.
    pub fn any_verified(&self) -> bool {
        self.backends.iter().any(Backend::is_verified)
    }
}

/// A backend chosen for one request; counts it in flight until dropped.
#[derive(Debug)]
pub struct BackendGuard {
    version: Arc<Version>,
    index: usize,
}

impl BackendGuard {
    pub fn backend(&self) -> &Backend {
        &self.version.backends[self.index]
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.backend().in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A version label as a response header value, built once per version.
fn label_header(label: &str) -> HeaderValue {
    HeaderValue::from_str(label).unwrap_or_else(|_| HeaderValue::from_static("invalid-label"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(balance: Balance, n: usize) -> Arc<Version> {
        Arc::new(Version::from_config(
            &VersionConfig {
                model: "m".into(),
                version: "v".into(),
                backends: (0..n)
                    .map(|i| format!("http://127.0.0.1:{}/", 9000 + i).parse().unwrap())
                    .collect(),
                balance,
                protocol: BackendProtocol::Http1,
                from_registry: false,
                served_model: None,
            },
            true,
            4,
        ))
    }

    #[test]
    fn backends_without_a_port_connect_to_the_schemes_default() {
        let address = |uri: &str| {
            let uri: http::Uri = uri.parse().unwrap();
            address(uri.scheme().unwrap(), uri.authority().unwrap())
        };
        assert_eq!(address("http://models.internal/"), "models.internal:80");
        assert_eq!(address("https://models.internal"), "models.internal:443");
        assert_eq!(address("http://127.0.0.1:9000/"), "127.0.0.1:9000");
        assert_eq!(address("http://[::1]/"), "[::1]:80");
        assert_eq!(address("http://[::1]:8080"), "[::1]:8080");
    }

    #[test]
    fn round_robin_visits_every_backend_and_skips_ejected_ones() {
        let v = version(Balance::RoundRobin, 3);
        let seen: Vec<_> = (0..6)
            .map(|_| v.pick().unwrap().backend().authority.port_u16().unwrap())
            .collect();
        assert_eq!(seen, [9000, 9001, 9002, 9000, 9001, 9002]);
        assert!(v.backends[1].eject(Duration::from_secs(60)));
        assert!(
            !v.backends[1].eject(Duration::from_secs(60)),
            "already ejected"
        );
        for _ in 0..6 {
            assert_ne!(v.pick().unwrap().backend().authority.port_u16(), Some(9001));
        }
        v.backends[0].eject(Duration::from_secs(60));
        v.backends[2].eject(Duration::from_secs(60));
        assert!(v.pick().is_none());
    }

    #[test]
    fn least_loaded_prefers_idle_backends() {
        let v = version(Balance::LeastLoaded, 2);
        let first = v.pick().unwrap();
        let second = v.pick().unwrap();
        assert_ne!(first.backend().authority, second.backend().authority);
        let busy = first.backend().authority.clone();
        drop(second);
        for _ in 0..4 {
            assert_ne!(v.pick().unwrap().backend().authority, busy);
        }
        drop(first);
        assert_eq!(v.backends[0].in_flight() + v.backends[1].in_flight(), 0);
    }
}
