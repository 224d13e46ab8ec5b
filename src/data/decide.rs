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
use crate::config::Api;
pub use crate::fields::BodyFields;
use crate::metrics::ProxyFailure;
use crate::shadow::tee::ShadowPlan;
use crate::upstream::{BackendGuard, Version};

/// What the decision looks at: the request's head, already framed and normalized, and the
/// fields of its body when its route reads them.
#[derive(Debug)]
pub struct Ask<'a, H: ?Sized> {
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub headers: &'a H,
    pub content_length: Option<u64>,
    pub started: Instant,
    /// `None`: the body was not read (the route does not read it).
    pub body: Option<&'a Result<BodyFields, String>>,
}

/// Where the `model` OpenAI lists are at.
pub const MODELS_PATH: &str = "/v1/models";

/// A request to forward: its version, the backend picked, its count and its shadow.
#[derive(Debug)]
pub struct Decision {
    pub api: Api,
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
    match route_for(table, table.find(ask.host, ask.path), ask) {
        Ok(route) => decide_on(route, ask, max_request_body),
        Err(local) => Decided::Local(local),
    }
}

/// Whether `ask` must have its body's fields read before [`route_for`] can route it: `first`,
/// its first matching route, routes by model (and no model header names it) or is sticky by a
/// body field.
#[inline]
pub fn reads_body<H: RequestHeaders + ?Sized>(
    table: &RoutingTable,
    first: &Route,
    ask: &Ask<'_, H>,
) -> bool {
    if !first.reads_body() || models_request(table, ask) {
        return false;
    }
    first.sticky_field().is_some() || model_named_by_header(table, ask).is_none()
}

/// The model a request header names, where a route on its path reads one (`model_header`).
fn model_named_by_header<'a, H: RequestHeaders + ?Sized>(
    table: &RoutingTable,
    ask: &Ask<'a, H>,
) -> Option<&'a [u8]> {
    table
        .routes
        .iter()
        .filter(|r| r.matches(ask.host, ask.path))
        .find_map(|r| r.model_header.as_ref().and_then(|h| ask.headers.first(h)))
}

/// `GET /v1/models` that weir answers itself.
fn models_request<H: ?Sized>(table: &RoutingTable, ask: &Ask<'_, H>) -> bool {
    table.models_list.is_some() && ask.path == MODELS_PATH && ask.method == "GET"
}

/// The route that serves `ask`: `first`, the first that matches its host and path, or — where
/// routes route by model — the first of those that serves the model the request names. Weir's
/// own answer when there is none, or for `GET /v1/models`.
#[inline]
pub fn route_for<'t, H: RequestHeaders + ?Sized>(
    table: &'t RoutingTable,
    first: Option<&'t Route>,
    ask: &Ask<'_, H>,
) -> Result<&'t Route, Local> {
    let Some(first) = first else {
        if models_request(table, ask) {
            return Err(Local::models(table));
        }
        return Err(Local::no_route(ask));
    };
    if first.models.is_empty() && table.models_list.is_none() {
        return Ok(first);
    }
    if models_request(table, ask) {
        return Err(Local::models(table));
    }
    if first.models.is_empty() {
        return Ok(first);
    }
    let model = match (model_named_by_header(table, ask), ask.body) {
        (Some(value), _) => match std::str::from_utf8(value) {
            Ok(model) => model,
            Err(_) => {
                return Err(local_error(
                    first.api,
                    StatusCode::BAD_REQUEST,
                    "bad_model",
                    "the model header is not UTF-8".into(),
                    Some("model"),
                ))
            }
        },
        (None, Some(Ok(fields))) => match &fields.model {
            Some(field) => field.value.as_str(),
            None => {
                return Err(local_error(
                    first.api,
                    StatusCode::BAD_REQUEST,
                    "missing_model",
                    "the request body names no \"model\" (a top-level string field, within listener.max_body_scan bytes); this path serves models by name".into(),
                    Some("model"),
                ))
            }
        },
        (None, Some(Err(why))) => {
            return Err(local_error(
                first.api,
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("{why}; this path routes by the body's \"model\""),
                Some("model"),
            ))
        }
        (None, None) => {
            return Err(local_error(
                first.api,
                StatusCode::BAD_REQUEST,
                "missing_model",
                "the request names no model; this path serves models by name".into(),
                Some("model"),
            ))
        }
    };
    table.find_model(ask.host, ask.path, model).ok_or_else(|| {
        let served = table.models_on(ask.host, ask.path);
        local_error(
            first.api,
            StatusCode::NOT_FOUND,
            "model_not_found",
            format!(
                "the model {model:?} is not served here; {} serves {}",
                ask.path,
                served
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Some("model"),
        )
    })
}

/// Weir's own error answer, in the route's API shape.
fn local_error(
    api: Api,
    status: StatusCode,
    kind: &str,
    message: String,
    param: Option<&str>,
) -> Local {
    let body = serde_json::json!({"error": message, "kind": kind});
    Local {
        status,
        body: shaped(api, status, body, param),
        version: None,
    }
}

/// `body` (`{"error": "<message>", "kind", "version"}`) in `api`'s shape: for OpenAI routes
/// `{"error": {"message", "type", "code", "param"}, "kind", "version"}`, which OpenAI's SDKs read.
pub fn shaped(
    api: Api,
    status: StatusCode,
    mut body: serde_json::Value,
    param: Option<&str>,
) -> serde_json::Value {
    if api == Api::Plain {
        return body;
    }
    let message = body["error"].take();
    let kind = body["kind"].clone();
    let kind_of = match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    body["error"] = serde_json::json!({
        "message": message,
        "type": kind_of,
        "code": kind,
        "param": param,
    });
    body
}

impl Local {
    /// `GET /v1/models`: the models weir's routes serve.
    pub fn models(table: &RoutingTable) -> Local {
        Local {
            status: StatusCode::OK,
            body: table.models_list.clone().unwrap_or_default(),
            version: None,
        }
    }

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
    let sticky = match ask.body {
        Some(Ok(fields)) => fields.sticky.as_ref().map(|f| f.value.as_bytes()),
        _ => None,
    };
    // `GET /v1/models` passed to a version: stable's list, never a random one.
    let chosen = if ask.path == MODELS_PATH && ask.method == "GET" {
        Ok(&route.stable)
    } else {
        route.choose_with(ask.headers, sticky)
    };
    let target = match chosen {
        Ok(target) => target,
        Err(BadOverride) => {
            let wanted = ask
                .headers
                .first(&OVERRIDE_HEADER)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            let status = StatusCode::BAD_REQUEST;
            return Decided::Local(Local {
                status,
                body: shaped(route.api, status, bad_override_json(&wanted, route), None),
                version: None,
            });
        }
    };
    let shadow_plan = route.shadow_plan(target);
    let version = Arc::clone(&target.version);
    let in_flight = InFlight::start(Arc::clone(&target.stats), ask.started);
    let api = route.api;
    let refused = |refusal: Refusal, version: Arc<Version>, in_flight: InFlight| {
        let (status, body) = refusal.answer(&version.label, &in_flight, api);
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
        api,
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
    pub fn answer(
        &self,
        label: &str,
        in_flight: &InFlight,
        api: Api,
    ) -> (StatusCode, serde_json::Value) {
        if let Refusal::Backend(kind) = *self {
            in_flight.stats().count_error(kind);
        }
        let (status, kind, message) = self.what(label);
        in_flight.stats().count_response(status);
        let body = serde_json::json!({"error": message, "version": label, "kind": kind});
        (status, shaped(api, status, body, None))
    }

    /// The answer to a request refused before it was routed (its body could not be read for
    /// routing): no version, nothing to count it on yet.
    pub fn unrouted(&self, api: Api) -> (StatusCode, serde_json::Value) {
        let (status, kind, message) = self.what("the version");
        let body = serde_json::json!({"error": message, "kind": kind});
        (status, shaped(api, status, body, None))
    }

    /// Status, kind and message, for `label`'s request.
    fn what(&self, label: &str) -> (StatusCode, &'static str, String) {
        match *self {
            Refusal::Backend(kind) => (kind.status(), kind.as_str(), backend_message(kind, label)),
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
        }
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
