//! The request decision both front ends make, and weir's own answers.
//!
//! From one table snapshot: the route, the version (split, sticky key or override), the shadow
//! plan, the size limit and the backend. The HTTP/1 fast path and the hyper path call the same
//! [`decide`], so a request is split once, by the same rules, whichever front end reads it.

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;

use super::body::InFlight;
use super::split::{BadOverride, RequestHeaders, OVERRIDE_HEADER};
use super::table::{Route, RoutingTable};
use crate::metrics::ProxyFailure;
use crate::shadow::tee::ShadowPlan;
use crate::upstream::{BackendGuard, Version};

/// What the decision looks at: the request's head, already framed and normalized.
#[derive(Debug)]
pub struct Ask<'a, H: ?Sized> {
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub headers: &'a H,
    pub content_length: Option<u64>,
    pub started: Instant,
}

/// A request to forward: its version, the backend picked, its count and its shadow.
#[derive(Debug)]
pub struct Decision {
    pub version: Arc<Version>,
    pub backend: BackendGuard,
    pub in_flight: InFlight,
    pub shadow_plan: Option<ShadowPlan>,
}

/// A request weir answers itself.
#[derive(Debug)]
pub struct Local {
    pub status: StatusCode,
    pub body: serde_json::Value,
    /// The version it was split to, when it got that far (for the version header); its count
    /// lasts until the answer is dropped.
    pub version: Option<(Arc<Version>, InFlight)>,
}

#[derive(Debug)]
pub enum Decided {
    Forward(Decision),
    Local(Local),
}

/// Decides `ask` on `table`.
#[inline]
pub fn decide<H: RequestHeaders + ?Sized>(
    table: &RoutingTable,
    ask: &Ask<'_, H>,
    max_request_body: u64,
) -> Decided {
    match table.find(ask.host, ask.path) {
        Some(route) => decide_on(route, ask, max_request_body),
        None => Decided::Local(Local::no_route(ask)),
    }
}

impl Local {
    /// The answer to a request no route matches.
    pub fn no_route<H: ?Sized>(ask: &Ask<'_, H>) -> Local {
        Local {
            status: StatusCode::NOT_FOUND,
            body: no_route_json(ask.path, ask.host.unwrap_or("")),
            version: None,
        }
    }
}

/// Decides `ask` on `route`, the route the table matched for it: the split draws here, once.
#[inline]
pub fn decide_on<H: RequestHeaders + ?Sized>(
    route: &Route,
    ask: &Ask<'_, H>,
    max_request_body: u64,
) -> Decided {
    let target = match route.choose(ask.headers) {
        Ok(target) => target,
        Err(BadOverride) => {
            let wanted = ask
                .headers
                .first(&OVERRIDE_HEADER)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            return Decided::Local(Local {
                status: StatusCode::BAD_REQUEST,
                body: bad_override_json(&wanted, route),
                version: None,
            });
        }
    };
    let shadow_plan = route.shadow_plan(target);
    let version = Arc::clone(&target.version);
    let in_flight = InFlight::start(Arc::clone(&target.stats), ask.started);
    let refused = |refusal: Refusal, version: Arc<Version>, in_flight: InFlight| {
        let (status, body) = refusal.answer(&version.label, &in_flight);
        Decided::Local(Local {
            status,
            body,
            version: Some((version, in_flight)),
        })
    };
    if ask.content_length.is_some_and(|n| n > max_request_body) {
        return refused(Refusal::TooLarge(max_request_body), version, in_flight);
    }
    let Some(backend) = version.pick() else {
        let kind = if version.any_verified() {
            ProxyFailure::NoBackend
        } else {
            ProxyFailure::Unverified
        };
        return refused(Refusal::Backend(kind), version, in_flight);
    };
    Decided::Forward(Decision {
        version,
        backend,
        in_flight,
        shadow_plan,
    })
}

/// Why a request got an answer from weir rather than from a backend.
#[derive(Debug)]
pub enum Refusal {
    Backend(ProxyFailure),
    TooLarge(u64),
    ClientBody,
}

impl Refusal {
    /// The status and JSON body weir answers with for `label`'s request, counted on its stats.
    pub fn answer(&self, label: &str, in_flight: &InFlight) -> (StatusCode, serde_json::Value) {
        let (status, kind, message) = match *self {
            Refusal::Backend(kind) => {
                in_flight.stats().count_error(kind);
                (kind.status(), kind.as_str(), backend_message(kind, label))
            }
            Refusal::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("request body is larger than the limit of {limit} bytes (listener.max_request_body)"),
            ),
            Refusal::ClientBody => (
                StatusCode::BAD_REQUEST,
                "client_body",
                "the request body could not be read from the client".to_string(),
            ),
        };
        in_flight.stats().count_response(status);
        (
            status,
            serde_json::json!({"error": message, "version": label, "kind": kind}),
        )
    }
}

fn backend_message(kind: ProxyFailure, label: &str) -> String {
    match kind {
        ProxyFailure::NoBackend => {
            format!("every backend of {label} is failing; none is usable right now")
        }
        ProxyFailure::Unverified => format!(
            "no backend of {label} reports the identity the registry expects; weir will not serve an unverified model"
        ),
        kind => format!("a backend of {label} {}", backend_failure(kind)),
    }
}

/// What a backend did, for a failure of `kind`: "a backend of chat@v2 {this}".
pub fn backend_failure(kind: ProxyFailure) -> &'static str {
    match kind {
        ProxyFailure::Connect => "refused the connection",
        ProxyFailure::ConnectTimeout => "did not accept a connection within proxy.connect_timeout",
        ProxyFailure::Reset => "closed the connection before answering",
        ProxyFailure::Timeout => "sent no response within proxy.response_header_timeout",
        ProxyFailure::Protocol => "answered with something that is not valid HTTP",
        ProxyFailure::Body => "broke off the response mid-body",
        ProxyFailure::IdleTimeout => "went silent mid-body for longer than the idle timeout",
        ProxyFailure::NoBackend | ProxyFailure::Unverified => "is not usable",
    }
}

fn no_route_json(path: &str, host: &str) -> serde_json::Value {
    serde_json::json!({
        "error": format!("no route matches {path} (host {host:?})"),
        "kind": "no_route",
    })
}

fn bad_override_json(wanted: &str, route: &Route) -> serde_json::Value {
    serde_json::json!({
        "error": format!(
            "x-weir-version: {wanted:?} is not served by route {}; it serves {}",
            route.name, route.override_choices()
        ),
        "kind": "bad_override",
    })
}
