//! Prometheus metrics. Families are registered once; the per-route, per-version handles a request
//! touches are resolved when a routing table is built ([`TargetStats`]), so the hot path only
//! increments atomics and never formats or looks up a label.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// A decision the canary controller takes: each is a `weir_canary_decisions_total` label,
/// exported at zero for every canary route from the start so alerts see the first one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CanaryDecision {
    /// The candidate passed its gates at this weight: on to the next step.
    Advance,
    /// Not enough evidence yet, or a refused promotion: stay at this weight.
    Hold,
    /// The last step passed: the candidate becomes stable.
    Promote,
    /// A gate failed or the deadline passed: back to the stable version.
    Rollback,
}

impl CanaryDecision {
    pub const ALL: [CanaryDecision; 4] = [
        CanaryDecision::Advance,
        CanaryDecision::Hold,
        CanaryDecision::Promote,
        CanaryDecision::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CanaryDecision::Advance => "advance",
            CanaryDecision::Hold => "hold",
            CanaryDecision::Promote => "promote",
            CanaryDecision::Rollback => "rollback",
        }
    }
}

impl std::fmt::Display for CanaryDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a proxied request failed. A closed set: each kind is a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyFailure {
    /// The backend refused the connection (or the address did not resolve).
    Connect,
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// The backend closed or reset the connection before the response head.
    Reset,
    /// No response head within the response-header timeout.
    Timeout,
    /// The backend answered with something that is not HTTP.
    Protocol,
    /// Every backend of the version is ejected.
    NoBackend,
    /// No backend of the version reports the registry's identity: weir fails closed.
    Unverified,
    /// The response body broke off mid-stream.
    Body,
    /// The backend went silent mid-body for longer than the idle timeout.
    IdleTimeout,
}

impl ProxyFailure {
    pub const ALL: [ProxyFailure; 9] = [
        ProxyFailure::Connect,
        ProxyFailure::ConnectTimeout,
        ProxyFailure::Reset,
        ProxyFailure::Timeout,
        ProxyFailure::Protocol,
        ProxyFailure::NoBackend,
        ProxyFailure::Unverified,
        ProxyFailure::Body,
        ProxyFailure::IdleTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProxyFailure::Connect => "connect",
            ProxyFailure::ConnectTimeout => "connect_timeout",
            ProxyFailure::Reset => "reset",
            ProxyFailure::Timeout => "timeout",
            ProxyFailure::Protocol => "protocol",
            ProxyFailure::NoBackend => "no_backend",
            ProxyFailure::Unverified => "unverified",
            ProxyFailure::Body => "body",
            ProxyFailure::IdleTimeout => "idle_timeout",
        }
    }

    /// The status the client gets when this happens before the response head.
    pub fn status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            ProxyFailure::ConnectTimeout | ProxyFailure::Timeout | ProxyFailure::IdleTimeout => {
                S::GATEWAY_TIMEOUT
            }
            ProxyFailure::NoBackend | ProxyFailure::Unverified => S::SERVICE_UNAVAILABLE,
            ProxyFailure::Connect
            | ProxyFailure::Reset
            | ProxyFailure::Protocol
            | ProxyFailure::Body => S::BAD_GATEWAY,
        }
    }

    /// Whether the backend was not reached: refused or not accepted in time.
    pub fn is_connect(self) -> bool {
        matches!(self, ProxyFailure::Connect | ProxyFailure::ConnectTimeout)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Which side of a split a request went to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Stable,
    Candidate,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Stable => "stable",
            Role::Candidate => "candidate",
        }
    }
}

/// All metric families, registered in one registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    in_flight: IntGaugeVec,
    weight: IntGaugeVec,
    generation: IntGauge,
    pinned: IntGauge,
    mismatch: IntGaugeVec,
    mirror: IntCounterVec,
    comparisons: IntCounterVec,
    agreement: GaugeVec,
    agreement_window: IntGaugeVec,
    canary: IntCounterVec,
    eval_cases: IntCounterVec,
    eval_bound: GaugeVec,
    grpc_errors: IntCounterVec,
    /// Fleet mode only (registered by [`Metrics::enable_fleet`]).
    fleet_leader: IntGauge,
    fleet_etcd_up: IntGauge,
    fleet_state_applied: IntGauge,
    /// With an MLflow source only (registered by [`Metrics::enable_mlflow`]).
    mlflow: MlflowMetrics,
}

/// The MLflow source's gauges: reachability and refused pins per route.
#[derive(Clone, Debug)]
pub struct MlflowMetrics {
    pub up: IntGauge,
    pub refused: IntGaugeVec,
    pub refusals: IntCounterVec,
}

impl MlflowMetrics {
    fn new() -> MlflowMetrics {
        MlflowMetrics {
            up: IntGauge::new(
                "weir_mlflow_up",
                "1 while the last read of MLflow's aliases succeeded, 0 while MLflow is unreachable (traffic stays on the last pins)",
            )
            .expect("valid metric"),
            refused: IntGaugeVec::new(
                Opts::new(
                    "weir_mlflow_pin_refused",
                    "1 while a route's MLflow alias names a version the registry policy refuses (the route stays on its last good pin)",
                ),
                &["route"],
            )
            .expect("valid metric"),
            refusals: IntCounterVec::new(
                Opts::new(
                    "weir_mlflow_refusals_total",
                    "Times an MLflow alias moved to a version the registry policy refused",
                ),
                &["route"],
            )
            .expect("valid metric"),
        }
    }
}

/// Latency buckets from 1 ms to 5 min: inference spans fast embeddings to long generations.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "weir_requests_total",
                "Requests answered, by route, version, role and status class",
            ),
            &["route", "version", "role", "status_class"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "weir_request_errors_total",
                "Requests that failed at a backend, by kind",
            ),
            &["route", "version", "kind"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_request_duration_seconds",
                "Time from request to the last byte of the response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "version"],
        )
        .expect("valid metric");
        let ttfb = HistogramVec::new(
            HistogramOpts::new(
                "weir_time_to_first_byte_seconds",
                "Time from request to the first byte of the response body",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "version"],
        )
        .expect("valid metric");
        let in_flight = IntGaugeVec::new(
            Opts::new("weir_in_flight_requests", "Requests being served now"),
            &["route", "version"],
        )
        .expect("valid metric");
        let weight = IntGaugeVec::new(
            Opts::new(
                "weir_route_weight_basis_points",
                "Candidate share of each route, in basis points",
            ),
            &["route"],
        )
        .expect("valid metric");
        let generation = IntGauge::new(
            "weir_routing_generation",
            "Generation of the routing table in use",
        )
        .expect("valid metric");
        let pinned = IntGauge::new(
            "weir_registry_pinned",
            "1 when routed versions are checked against a model registry, 0 when weir runs unpinned",
        )
        .expect("valid metric");
        let mismatch = IntGaugeVec::new(
            Opts::new(
                "weir_backend_version_mismatch",
                "1 while a backend reports another identity than the registry's for its version",
            ),
            &["route", "version", "backend"],
        )
        .expect("valid metric");
        let mirror = IntCounterVec::new(
            Opts::new(
                "weir_mirror_requests_total",
                "Mirror decisions by outcome: sent, dropped, too_large, failed, timeout",
            ),
            &["route", "version", "outcome"],
        )
        .expect("valid metric");
        let comparisons = IntCounterVec::new(
            Opts::new(
                "weir_mirror_comparisons_total",
                "Shadow answers compared with stable answers, by comparator and result",
            ),
            &["route", "version", "comparator", "result"],
        )
        .expect("valid metric");
        let agreement = GaugeVec::new(
            Opts::new(
                "weir_mirror_agreement_ratio",
                "Rolling shadow agreement (0..1) as the canary's min_agreement gate and /v1/routes see it: the share of the last comparisons where every comparator agreed; absent until the first comparison",
            ),
            &["route", "version"],
        )
        .expect("valid metric");
        let agreement_window = IntGaugeVec::new(
            Opts::new(
                "weir_mirror_agreement_comparisons",
                "How many shadow comparisons weir_mirror_agreement_ratio covers (at most the rolling window)",
            ),
            &["route", "version"],
        )
        .expect("valid metric");
        let canary = IntCounterVec::new(
            Opts::new(
                "weir_canary_decisions_total",
                "Canary controller decisions: advance, hold, promote, rollback",
            ),
            &["route", "decision"],
        )
        .expect("valid metric");
        let eval_cases = IntCounterVec::new(
            Opts::new(
                "weir_eval_cases_total",
                "Held-out evaluation cases the canary ran, by category and result (pass, fail)",
            ),
            &["route", "version", "category", "result"],
        )
        .expect("valid metric");
        let eval_bound = GaugeVec::new(
            Opts::new(
                "weir_eval_pass_rate_lower_bound",
                "Lower confidence bound of the last comparative evaluation's pass rate, by category",
            ),
            &["route", "version", "category"],
        )
        .expect("valid metric");
        let grpc_errors = IntCounterVec::new(
            Opts::new(
                "weir_grpc_errors_total",
                "Responses whose gRPC status (in the headers or the trailers) is not OK, by code; they count as server errors of their version",
            ),
            &["route", "version", "role", "code"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(errors.clone()),
            Box::new(duration.clone()),
            Box::new(ttfb.clone()),
            Box::new(in_flight.clone()),
            Box::new(weight.clone()),
            Box::new(generation.clone()),
            Box::new(pinned.clone()),
            Box::new(mismatch.clone()),
            Box::new(mirror.clone()),
            Box::new(comparisons.clone()),
            Box::new(agreement.clone()),
            Box::new(agreement_window.clone()),
            Box::new(canary.clone()),
            Box::new(eval_cases.clone()),
            Box::new(eval_bound.clone()),
            Box::new(grpc_errors.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        let fleet_leader = IntGauge::new(
            "weir_fleet_leader",
            "Fleet mode: 1 on the replica that runs the canary controller (holds the etcd election)",
        )
        .expect("valid metric");
        let fleet_etcd_up = IntGauge::new(
            "weir_fleet_etcd_up",
            "Fleet mode: 1 while etcd answers; 0 means routing changes are refused and the last table serves",
        )
        .expect("valid metric");
        let fleet_state_applied = IntGauge::new(
            "weir_fleet_state_applied",
            "Fleet mode: 1 while this replica routes by the fleet's current state; 0 when it cannot apply it (its config lacks a version the fleet routes to, say) and still routes by an older generation",
        )
        .expect("valid metric");
        fleet_state_applied.set(1);
        Metrics {
            registry,
            mlflow: MlflowMetrics::new(),
            fleet_leader,
            fleet_etcd_up,
            fleet_state_applied,
            requests,
            errors,
            duration,
            ttfb,
            in_flight,
            weight,
            generation,
            pinned,
            mismatch,
            mirror,
            comparisons,
            agreement,
            agreement_window,
            canary,
            eval_cases,
            eval_bound,
            grpc_errors,
        }
    }

    /// Exports every canary decision of `route` at zero (a no-op for the ones already counted).
    pub fn canary_route(&self, route: &str) {
        for decision in CanaryDecision::ALL {
            self.canary.with_label_values(&[route, decision.as_str()]);
        }
    }

    /// One comparative evaluation's result for `version` of `route`, per category: cases
    /// passed and failed, and the lower bound of the pass rate.
    pub fn record_eval(
        &self,
        route: &str,
        version: &str,
        category: &str,
        passed: u64,
        failed: u64,
        lower_bound: f64,
    ) {
        for (result, n) in [("pass", passed), ("fail", failed)] {
            self.eval_cases
                .with_label_values(&[route, version, category, result])
                .inc_by(n);
        }
        self.eval_bound
            .with_label_values(&[route, version, category])
            .set(lower_bound);
    }

    pub fn count_canary_decision(&self, route: &str, decision: CanaryDecision) {
        self.canary
            .with_label_values(&[route, decision.as_str()])
            .inc();
    }

    /// Handles for shadowing `candidate` in `route`.
    pub fn shadow(&self, route: &str, candidate: &str) -> crate::shadow::tee::ShadowStats {
        use crate::config::Comparator;
        use crate::shadow::tee::{AgreementGauges, MirrorOutcome};
        let outcomes = MirrorOutcome::ALL.map(|o| {
            self.mirror
                .with_label_values(&[route, candidate, o.as_str()])
        });
        let comparisons = Comparator::ALL.map(|c| {
            ["agree", "disagree", "error"].map(|r| {
                self.comparisons
                    .with_label_values(&[route, candidate, c.as_str(), r])
            })
        });
        let gauges = AgreementGauges::new(
            self.agreement.clone(),
            self.agreement_window.clone(),
            route,
            candidate,
        );
        crate::shadow::tee::ShadowStats::new(outcomes, comparisons, gauges)
    }

    /// Registers the MLflow source's gauges (a weir without one does not export them) and
    /// hands them to it; a second call is harmless.
    pub fn enable_mlflow(&self) -> MlflowMetrics {
        let m = &self.mlflow;
        for collector in [
            Box::new(m.up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.refused.clone()),
            Box::new(m.refusals.clone()),
        ] {
            let _ = self.registry.register(collector);
        }
        m.clone()
    }

    /// Registers the fleet gauges (a single weir does not export them).
    pub fn enable_fleet(&self) {
        for gauge in [
            &self.fleet_leader,
            &self.fleet_etcd_up,
            &self.fleet_state_applied,
        ] {
            // Registered once per registry; a second call is harmless.
            let _ = self.registry.register(Box::new(gauge.clone()));
        }
    }

    pub fn set_fleet(&self, leader: bool, etcd_up: bool) {
        self.fleet_leader.set(i64::from(leader));
        self.fleet_etcd_up.set(i64::from(etcd_up));
    }

    pub fn set_fleet_state_applied(&self, applied: bool) {
        self.fleet_state_applied.set(i64::from(applied));
    }

    pub fn set_pinned(&self, pinned: bool) {
        self.pinned.set(i64::from(pinned));
    }

    pub fn set_mismatch(&self, route: &str, version: &str, backend: &str, mismatched: bool) {
        self.mismatch
            .with_label_values(&[route, version, backend])
            .set(i64::from(mismatched));
    }

    /// Resolves every handle one (route, version, role) needs.
    pub fn target(&self, route: &str, version: &str, role: Role) -> Arc<TargetStats> {
        let class = |c: &str| {
            self.requests
                .with_label_values(&[route, version, role.as_str(), c])
        };
        Arc::new(TargetStats {
            requests: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            errors: ProxyFailure::ALL
                .map(|k| self.errors.with_label_values(&[route, version, k.as_str()])),
            duration: self.duration.with_label_values(&[route, version]),
            ttfb: self.ttfb.with_label_values(&[route, version]),
            in_flight: self.in_flight.with_label_values(&[route, version]),
            grpc: GrpcErrors {
                family: self.grpc_errors.clone(),
                labels: [route.into(), version.into(), role.as_str().into()],
                codes: Default::default(),
                total: AtomicU64::new(0),
            },
        })
    }

    pub fn set_weight(&self, route: &str, basis_points: u16) {
        self.weight
            .with_label_values(&[route])
            .set(i64::from(basis_points));
    }

    pub fn set_generation(&self, generation: u64) {
        self.generation.set(generation as i64);
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The handles one (route, version, role) updates on the hot path.
#[derive(Debug)]
pub struct TargetStats {
    requests: [IntCounter; 5],
    errors: [IntCounter; ProxyFailure::ALL.len()],
    pub duration: prometheus::Histogram,
    pub ttfb: prometheus::Histogram,
    pub in_flight: IntGauge,
    grpc: GrpcErrors,
}

/// The gRPC status codes by number (OK is never counted as an error).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// One target's gRPC error counters. A series is resolved the first time its code is seen, so
/// HTTP-only versions export none, and the hot path never formats a label.
#[derive(Debug)]
struct GrpcErrors {
    family: IntCounterVec,
    labels: [String; 3],
    codes: [OnceLock<IntCounter>; 17],
    total: AtomicU64,
}

impl TargetStats {
    pub fn count_response(&self, status: http::StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
    }

    pub fn count_error(&self, kind: ProxyFailure) {
        self.errors[kind.index()].inc();
    }

    /// Responses counted so far (every status class).
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().map(|c| c.get()).sum()
    }

    /// A response whose gRPC status (`grpc-status`, in its headers or its trailers) is `code`,
    /// not OK: an error of this version like a 5xx. An unknown code counts as UNKNOWN.
    pub fn count_grpc_error(&self, code: u32) {
        let code = match code {
            1..=16 => code as usize,
            _ => 2,
        };
        let g = &self.grpc;
        let counter = g.codes[code].get_or_init(|| {
            let [route, version, role] = &g.labels;
            g.family
                .with_label_values(&[route, version, role, GRPC_CODES[code]])
        });
        counter.inc();
        g.total.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Responses with a 5xx status counted so far, whether weir or the backend chose it, and
    /// responses with a gRPC status other than OK.
    pub fn server_errors_total(&self) -> u64 {
        self.requests[4].get() + self.grpc.total.load(std::sync::atomic::Ordering::Relaxed)
    }
}
