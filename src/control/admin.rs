//! The admin listener: metrics, health, readiness and the live routing table.
//!
//! Read-only endpoints are open (the listener binds loopback by default). Everything here is
//! cold: it may allocate and format freely, and never touches a request's hot path.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;

use crate::config::units::format_percent;
use crate::data::table::{RoutingTable, Target};
use crate::metrics::Metrics;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub table: Arc<ArcSwap<RoutingTable>>,
    pub metrics: Metrics,
    /// False while starting and while draining: `/readyz` tells load balancers to stay away.
    pub ready: AtomicBool,
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Relaxed) {
                json_response(StatusCode::OK, json!({"status": "ready"}))
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "not ready", "detail": "starting or draining"}),
                )
            }
        }
        (&Method::GET, "/v1/routes") => {
            json_response(StatusCode::OK, routes_json(&state.table.load()))
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/v1/routes") => json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": format!("{} {} is not supported; use GET", req.method(), req.uri().path()), "detail": null}),
        ),
        (_, path) => json_response(
            StatusCode::NOT_FOUND,
            json!({
                "error": format!("no admin endpoint at {path}"),
                "detail": {"endpoints": ["GET /metrics", "GET /healthz", "GET /readyz", "GET /v1/routes"]},
            }),
        ),
    };
    Ok(response)
}

/// The live table as `GET /v1/routes` shows it.
pub fn routes_json(table: &RoutingTable) -> serde_json::Value {
    let target = |t: &Target| {
        json!({
            "version": &*t.version.label,
            "backends": t.version.backends.iter().map(|b| json!({
                "url": format!("{}://{}", b.scheme, b.authority),
                "in_flight": b.in_flight(),
            })).collect::<Vec<_>>(),
        })
    };
    let routes: Vec<_> = table
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "prefix": r.prefix,
                "host": r.host,
                "stable": &*r.stable.version.label,
                "candidate": r.candidate.as_ref().map(|c| &*c.version.label),
                "weight": r.weight,
                "weight_percent": format_percent(r.weight),
                "state": if r.candidate.is_some() { "canary" } else { "stable" },
                "sticky": r.sticky.as_ref().map(|s| match s {
                    crate::config::StickyKey::Header(h) => json!({"header": h.as_str()}),
                    crate::config::StickyKey::Cookie(c) => json!({"cookie": c}),
                }),
                "allow_override": r.allow_override,
                "targets": {
                    "stable": target(&r.stable),
                    "candidate": r.candidate.as_ref().map(target),
                },
            })
        })
        .collect();
    json!({"generation": table.generation, "routes": routes})
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
