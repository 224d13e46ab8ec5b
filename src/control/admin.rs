//! The admin listener: metrics, health, readiness, the live routing table, the dashboard and
//! what it reads (recent history, the audit log), and the mutating calls that move the split.
//!
//! Read-only endpoints are open (the listener binds loopback by default); every mutating call
//! needs the bearer token and goes through the one [`Writer`]. Everything here is cold.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, IF_MATCH, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::audit::ChainWatch;
use super::auth::AdminToken;
use super::canary::Board;
use super::dashboard;
use super::history::History;
use super::mlflow::SourceError;
use super::pins::runtime_registry;
use super::state::ApplyError;
use super::state::RoutingState;
use super::writer::{Actor, Live};
use super::writer::{Change, Command, CommandError, Outcome, RuntimeStages, Writer};
use crate::config::units::{format_percent, parse_percent};
use crate::data::table::{Route, Target};
use crate::registry::Registry;

/// Largest admin request body.
pub const MAX_ADMIN_BODY: usize = 64 * 1024;

/// What the admin endpoints work with.
#[derive(Debug)]
pub struct AdminState {
    pub writer: Arc<Writer>,
    /// The canary controller's last decision per route.
    pub canary: Arc<Board>,
    /// The last 15 minutes of every version's traffic, for the dashboard.
    pub history: Arc<History>,
    /// The dashboard's view of the audit chain.
    pub audit: Arc<ChainWatch>,
    pub token: AdminToken,
    /// False while starting and while draining: `/readyz` tells load balancers to stay away.
    pub ready: AtomicBool,
}

type AdminResponse = Response<Full<Bytes>>;

/// A refused admin call: status, message, structured detail.
struct Refused {
    status: StatusCode,
    message: String,
    detail: Value,
    /// Whether the change may be live anyway (a writer's refusal); none for calls refused
    /// before they reached the writer.
    outcome: Option<Outcome>,
}

impl Refused {
    fn new(status: StatusCode, message: impl Into<String>) -> Refused {
        Refused::with_detail(status, message, Value::Null)
    }

    fn with_detail(status: StatusCode, message: impl Into<String>, detail: Value) -> Refused {
        Refused {
            status,
            message: message.into(),
            detail,
            outcome: None,
        }
    }

    fn into_response(self) -> AdminResponse {
        let mut body = json!({"error": self.message, "detail": self.detail});
        if let Some(outcome) = self.outcome {
            body["outcome"] = json!(outcome.as_str());
        }
        json_response(self.status, body)
    }
}

impl From<CommandError> for Refused {
    fn from(e: CommandError) -> Refused {
        Refused {
            status: status_of(&e),
            message: e.to_string(),
            detail: e.detail(),
            outcome: Some(e.outcome()),
        }
    }
}

/// The HTTP status an admin call that the writer refused with `e` is answered with (the writer
/// itself speaks no HTTP).
pub fn status_of(e: &CommandError) -> StatusCode {
    match e {
        CommandError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
        CommandError::Refused(ApplyError::OutOfRange(_)) => StatusCode::UNPROCESSABLE_ENTITY,
        CommandError::Refused(ApplyError::NoCandidate { .. } | ApplyError::Conflict(_))
        | CommandError::NothingToReload
        | CommandError::NotLeader(_)
        | CommandError::GenerationMoved { .. }
        | CommandError::Pins(_)
        | CommandError::Promotion { .. }
        | CommandError::CannotApply(_)
        | CommandError::Stale => StatusCode::CONFLICT,
        CommandError::Unavailable(_) | CommandError::Unconfirmed(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        CommandError::InvalidConfig(_) | CommandError::Registry(_) | CommandError::Build(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        CommandError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
        CommandError::Mlflow(e) => match e {
            SourceError::Mlflow(e) if e.is_outage() => StatusCode::SERVICE_UNAVAILABLE,
            SourceError::NoPins(_) => StatusCode::SERVICE_UNAVAILABLE,
            SourceError::Mlflow(_) => StatusCode::BAD_GATEWAY,
            SourceError::Refused(_) => StatusCode::CONFLICT,
            SourceError::Registry(_) | SourceError::Cache { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        },
    }
}

pub async fn handle(
    state: Arc<AdminState>,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if let Some(page) = dashboard::serve(req.method(), &segments) {
        return Ok(page);
    }
    let response = match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["metrics"]) => {
            let mut r = Response::new(Full::new(Bytes::from(state.writer.metrics().encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::GET, ["healthz"]) => json_response(StatusCode::OK, json!({"status": "ok"})),
        (Method::GET, ["readyz"]) => match readiness(&state, req.uri().query()) {
            Ok(response) => response,
            Err(refused) => refused.into_response(),
        },
        (Method::GET, ["v1", "routes"]) => {
            let mut all = routes_json(&state.writer.live());
            all["fleet"] = match state.writer.fleet() {
                None => Value::Null,
                Some(fleet) => json!({
                    "replica": fleet.replica(),
                    "prefix": fleet.config().prefix,
                    "etcd": if fleet.is_up() { "connected" } else { "unreachable" },
                    "state": fleet.apply_problem().map_or("current".to_string(), |why| format!("cannot apply: {why}")),
                    "leader": fleet.is_leader(),
                }),
            };
            let stages = state.writer.stages();
            let registry = load_stages(&stages);
            for route in all["routes"].as_array_mut().into_iter().flatten() {
                let name = route["name"].as_str().unwrap_or_default().to_string();
                route["canary"] = state.canary.status(&name).unwrap_or(Value::Null);
                route["registry"] = route_stages(&registry, &stages, route);
                route["plan"] = state.canary.plan(&name).unwrap_or(Value::Null);
            }
            all["production"] = json!(stages.production);
            json_response(StatusCode::OK, all)
        }
        (Method::GET, ["v1", "routes", name]) => {
            let live = state.writer.live();
            let table = &live.table;
            match table.routes.iter().find(|r| &*r.name == *name) {
                Some(route) => {
                    let mut route = route_json(route, &live);
                    let stages = state.writer.stages();
                    route["canary"] = state.canary.status(name).unwrap_or(Value::Null);
                    route["registry"] = route_stages(&load_stages(&stages), &stages, &route);
                    route["plan"] = state.canary.plan(name).unwrap_or(Value::Null);
                    json_response(StatusCode::OK, json!({"generation": table.generation, "route": route}))
                }
                None => Refused::new(StatusCode::NOT_FOUND, format!("no route named {name:?}")).into_response(),
            }
        }
        (Method::GET, ["v1", "fleet"]) => fleet_replicas(&state).await,
        (Method::GET, ["v1", "history"]) => json_response(StatusCode::OK, state.history.json()),
        (Method::GET, ["v1", "audit"]) => match audit_limit(req.uri().query()) {
            Ok(limit) => audit_report(&state, limit).await,
            Err(refused) => refused.into_response(),
        },
        (Method::GET, ["v1", "auth"]) => match unauthorised(&state, &req) {
            None => json_response(StatusCode::OK, json!({"actor": state.token.actor()})),
            Some(refused) => refused,
        },
        (Method::PUT, ["v1", "routes", _, "weight"])
        | (Method::POST, ["v1", "routes", _, "promote" | "rollback" | "pause" | "resume"])
        | (Method::POST, ["v1", "reload"]) => match mutate(&state, req).await {
            Ok(r) => r,
            Err(refused) => refused.into_response(),
        },
        (_, ["metrics" | "healthz" | "readyz"] | ["v1", "routes" | "fleet" | "history" | "audit" | "auth"] | ["v1", "routes", _]) => {
            Refused::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} {path} is not supported; use GET", req.method()))
                .into_response()
        }
        (_, ["v1", "routes", _, "weight"]) => {
            Refused::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} {path} is not supported; use PUT", req.method()))
                .into_response()
        }
        (_, ["v1", "routes", _, "promote" | "rollback" | "pause" | "resume"] | ["v1", "reload"]) => {
            Refused::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} {path} is not supported; use POST", req.method()))
                .into_response()
        }
        _ => Refused::with_detail(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {path}"),
            json!({"endpoints": [
                "GET /", "GET /metrics", "GET /healthz", "GET /readyz", "GET /v1/routes", "GET /v1/routes/{route}",
                "GET /v1/fleet", "GET /v1/history", "GET /v1/audit", "GET /v1/auth",
                "PUT /v1/routes/{route}/weight", "POST /v1/routes/{route}/promote",
                "POST /v1/routes/{route}/rollback", "POST /v1/routes/{route}/pause",
                "POST /v1/routes/{route}/resume", "POST /v1/reload",
            ]}),
        )
        .into_response(),
    };
    Ok(response)
}

/// Body of `PUT /v1/routes/{route}/weight`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: Option<Value>,
    basis_points: Option<Value>,
    reason: Option<String>,
}

/// Optional body of the POST calls.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    reason: Option<String>,
}

/// The 401 every mutating call answers when `req` does not carry the admin token; `None` when
/// it does.
fn unauthorised<B>(state: &AdminState, req: &Request<B>) -> Option<AdminResponse> {
    if state.token.allows(req.headers().get(AUTHORIZATION)) {
        return None;
    }
    let mut r = Refused::new(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token: send `Authorization: Bearer <token>` (the token is in WEIR_ADMIN_TOKEN, \
         the --admin-token-file, [admin] token_file, or <state-dir>/admin.token)",
    )
    .into_response();
    r.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

/// Records `GET /v1/audit` shows unless `?limit=` says otherwise, and at most.
const AUDIT_RECENT: usize = 50;
const AUDIT_MAX: usize = 1000;

fn audit_limit(query: Option<&str>) -> Result<usize, Refused> {
    let mut limit = AUDIT_RECENT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match (&*key, value.parse::<usize>()) {
            ("limit", Ok(n)) if n <= AUDIT_MAX => limit = n,
            _ => {
                return Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    format!("/v1/audit takes only ?limit=<0..={AUDIT_MAX}>, not {key}={value}"),
                ))
            }
        }
    }
    Ok(limit)
}

/// `GET /v1/fleet`: every replica whose lease is alive in etcd (each publishes its counters on
/// it), the generation it serves and whether it can apply the fleet's state, and which one leads.
/// `{"fleet": null}` outside fleet mode; 503 while etcd does not answer.
async fn fleet_replicas(state: &AdminState) -> AdminResponse {
    let Some(fleet) = state.writer.fleet() else {
        return json_response(StatusCode::OK, json!({"fleet": null}));
    };
    let read = async {
        Ok::<_, super::fleet::FleetError>((fleet.counters().await?, fleet.leader_name().await?))
    };
    let (published, leader) = match read.await {
        Ok(both) => both,
        Err(e) => {
            return Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot read the fleet from etcd: {e}"),
            )
            .into_response()
        }
    };
    let replicas: Vec<Value> = published
        .iter()
        .map(|(name, value)| {
            let health = match serde_json::from_str::<super::canary::Published>(value) {
                Ok(p) => json!({
                    "generation": p.generation,
                    "state": p.apply_problem.map_or("current".to_string(), |why| format!("cannot apply: {why}")),
                }),
                Err(e) => json!({"generation": null, "state": format!("unreadable counters: {e}")}),
            };
            json!({
                "replica": name,
                "this": name == fleet.replica(),
                "leader": leader.as_deref() == Some(name.as_str()),
                "generation": health["generation"],
                "state": health["state"],
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        json!({"fleet": {"replica": fleet.replica(), "leader": leader, "replicas": replicas}}),
    )
}

/// `GET /v1/audit`: the chain up to where it ends now, checked off the async workers.
async fn audit_report(state: &Arc<AdminState>, limit: usize) -> AdminResponse {
    let (path, len, head) = state.writer.audit_end().await;
    let watch = Arc::clone(&state.audit);
    let now = tokio::time::Instant::now();
    let report =
        tokio::task::spawn_blocking(move || watch.report(&path, len, head.as_ref(), limit, now))
            .await;
    match report {
        Ok(report) => json_response(StatusCode::OK, json!(report)),
        Err(e) => Refused::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the audit log: {e}"),
        )
        .into_response(),
    }
}

async fn mutate(state: &AdminState, req: Request<Incoming>) -> Result<AdminResponse, Refused> {
    if let Some(refused) = unauthorised(state, &req) {
        return Ok(refused);
    }
    let if_match = match req.headers().get(IF_MATCH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|s| s.trim().trim_matches('"'))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    Refused::new(
                        StatusCode::BAD_REQUEST,
                        "If-Match must be a routing generation number, such as 12",
                    )
                })?,
        ),
    };
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let body = read_body(req).await?;
    let (command, reason) = match segments.as_slice() {
        ["v1", "routes", route, "weight"] => {
            let body: WeightBody =
                parse_json(&body, r#"{"weight": "5%"} or {"basis_points": 500}"#)?;
            let basis_points = match (&body.weight, &body.basis_points) {
                (Some(w), None) => weight_from_json(w)?,
                (None, Some(bp)) => basis_points_from_json(bp)?,
                _ => {
                    return Err(Refused::new(
                        StatusCode::BAD_REQUEST,
                        r#"give exactly one of "weight" (a percentage: "5%", "0.5%", 5) or "basis_points" (0..=10000)"#,
                    ))
                }
            };
            (
                Command::SetWeight {
                    route: route.to_string(),
                    basis_points,
                },
                body.reason,
            )
        }
        ["v1", "routes", route, action] => {
            let body: ReasonBody = if body.iter().all(u8::is_ascii_whitespace) {
                ReasonBody::default()
            } else {
                parse_json(&body, r#"no body, or {"reason": "..."}"#)?
            };
            let route = route.to_string();
            let command = match *action {
                "promote" => Command::Promote { route },
                "rollback" => Command::Rollback { route },
                "pause" => Command::Pause { route },
                _ => Command::Resume { route },
            };
            (command, body.reason)
        }
        _ => {
            let body: ReasonBody = if body.iter().all(u8::is_ascii_whitespace) {
                ReasonBody::default()
            } else {
                parse_json(&body, r#"no body, or {"reason": "..."}"#)?
            };
            (Command::Reload, body.reason)
        }
    };
    let applied = state
        .writer
        .apply(Change {
            command,
            actor: Actor::Operator(state.token.actor().to_string()),
            reason,
            if_match,
        })
        .await?;
    let live = state.writer.live();
    let route = applied
        .route
        .as_ref()
        .and_then(|r| live.table.routes.iter().find(|t| *t.name == r.name))
        .map(|r| route_json(r, &live));
    Ok(json_response(
        StatusCode::OK,
        json!({
            "generation": applied.generation,
            "changed": applied.changed,
            "route": route,
            "notes": applied.notes,
        }),
    ))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refused> {
    match Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refused::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("admin request bodies are limited to {MAX_ADMIN_BODY} bytes"),
        )),
        Err(e) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("cannot read the request body: {e}"),
        )),
    }
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8], expected: &str) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| {
        Refused::with_detail(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON body: {e}"),
            json!({"expected": expected}),
        )
    })
}

/// `"5%"`, `"0.5%"`, `"5"` or `5` / `0.5` (a bare number is a percentage).
fn weight_from_json(value: &Value) -> Result<u16, Refused> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                format!("\"weight\" must be a percentage such as \"5%\" or 5, got {other}"),
            ))
        }
    };
    let number = text.trim().trim_end_matches('%').trim();
    match number.parse::<f64>() {
        Err(_) => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("\"weight\" must be a percentage such as \"5%\" or \"0.5%\", got {text:?}"),
        )),
        Ok(n) if !(0.0..=100.0).contains(&n) => Err(Refused::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("\"weight\" must be between 0% and 100%, got {text:?}"),
        )),
        Ok(_) => {
            parse_percent(&text).map_err(|e| Refused::new(StatusCode::UNPROCESSABLE_ENTITY, e))
        }
    }
}

fn basis_points_from_json(value: &Value) -> Result<u16, Refused> {
    match value.as_u64() {
        Some(bp) if bp <= 10_000 => Ok(bp as u16),
        Some(bp) => Err(Refused::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("\"basis_points\" must be between 0 and 10000, got {bp}"),
        )),
        None if value.is_number() => Err(Refused::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("\"basis_points\" must be a whole number between 0 and 10000, got {value}"),
        )),
        None => Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("\"basis_points\" must be a whole number between 0 and 10000, got {value}"),
        )),
    }
}

/// One route as the admin API shows it.
pub fn route_json(r: &Route, live: &Live) -> Value {
    let s = live.route(&r.name);
    let target = |t: &Target| {
        json!({
            "version": &*t.version.label,
            "backends": t.version.backends.iter().map(|b| json!({
                "url": format!("{}://{}", b.scheme, b.authority),
                "in_flight": b.in_flight(),
            })).collect::<Vec<_>>(),
        })
    };
    json!({
        "name": &*r.name,
        "prefix": r.prefix,
        "host": r.host,
        "stable": s.map(|s| &s.stable),
        "candidate": s.and_then(|s| s.candidate.as_ref()),
        "weight": s.map(|s| s.weight),
        "weight_percent": s.map(|s| format_percent(s.weight)),
        "state": s.map(|s| s.status()),
        "paused": s.map(|s| s.paused),
        "rollback_target": s.and_then(|s| s.rollback_target.as_ref()),
        "sticky": r.sticky.as_ref().map(|s| match s {
            crate::config::StickyKey::Header(h) => json!({"header": h.as_str()}),
            crate::config::StickyKey::Cookie(c) => json!({"cookie": c}),
            crate::config::StickyKey::Field(f) => json!({"field": f}),
        }),
        "models": r.models,
        "api": match r.api {
            crate::config::Api::Plain => "plain",
            crate::config::Api::OpenAi => "openai",
        },
        "allow_override": r.allow_override,
        "shadow": r.shadow.as_ref().map(|s| {
            let (agreement, compared) = s.stats.agreement();
            json!({
                "mirror": s.mirror,
                "mirror_percent": format_percent(s.mirror),
                "agreement": agreement,
                "compared": compared,
            })
        }),
        "targets": {
            "stable": target(&r.stable),
            "candidate": r.candidate.as_ref().map(target),
        },
    })
}

/// The registry file and its runtime view (the file overlaid by the state's promotions);
/// `Ok(None)` when weir runs unpinned.
type Stages = Result<Option<(Registry, Registry)>, String>;

fn load_stages(stages: &RuntimeStages) -> Stages {
    let mut file = match (&stages.registry, &stages.mlflow_versions) {
        (Some(path), _) => Registry::load(path).map_err(|e| e.to_string())?,
        (None, Some(_)) => Registry::default(),
        (None, None) => return Ok(None),
    };
    for version in stages.mlflow_versions.iter().flatten() {
        file.versions.retain(|v| v.label() != version.label());
        file.versions.push(version.clone());
    }
    let state = RoutingState {
        generation: 0,
        routes: Vec::new(),
        production: stages.production.clone(),
    };
    Ok(Some((file.clone(), runtime_registry(file, &state))))
}

/// What the registry says of a route's stable and candidate: the stage in force (`stage`), the
/// registry file's own (`file_stage`), and the promotion that moved it at runtime, if one did.
fn route_stages(registry: &Stages, stages: &RuntimeStages, route: &Value) -> Value {
    let (file, runtime) = match registry {
        Ok(Some(both)) => both,
        Ok(None) => return Value::Null,
        Err(e) => return json!({"error": e}),
    };
    let version = |label: &Value| {
        let label = label.as_str()?;
        let in_force = runtime.find(label);
        Some(json!({
            "version": label,
            "stage": in_force.map(|v| v.stage),
            "file_stage": file.find(label).map(|v| v.stage),
            "digest": in_force.map(|v| v.digest.clone()),
            "promoted": stages.production.get(label),
        }))
    };
    json!({"stable": version(&route["stable"]), "candidate": version(&route["candidate"])})
}

/// The live table as `GET /v1/routes` shows it.
pub fn routes_json(live: &Live) -> Value {
    json!({
        "generation": live.table.generation,
        "routes": live.table.routes.iter().map(|r| route_json(r, live)).collect::<Vec<_>>(),
    })
}

/// The checks `/readyz` runs, by the names `?exclude=` takes.
const READY_CHECKS: [&str; 4] = ["serving", "etcd", "fleet_state", "mlflow"];

/// `/readyz`: 200 when every check passes, 503 naming the ones that fail. The checks are
/// `serving` (started and not draining) and, in fleet mode, `etcd` (reachable, so changes can be
/// made) and `fleet_state` (this replica routes by the fleet's current state: a replica whose
/// config cannot build it would send traffic where the rest of the fleet no longer does).
/// `?exclude=etcd,fleet_state` leaves checks out, as kube-apiserver's `/readyz` does: a load
/// balancer's probe should not pull every replica out of rotation because etcd is down or a
/// config rollout is under way, while a monitor asking plain `/readyz` sees 503.
fn readiness(state: &AdminState, query: Option<&str>) -> Result<AdminResponse, Refused> {
    let mut excluded = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if key != "exclude" {
            return Err(Refused::new(
                StatusCode::BAD_REQUEST,
                format!("/readyz takes only ?exclude=<check>, not {key:?}"),
            ));
        }
        for name in value.split(',').filter(|n| !n.is_empty()) {
            let Some(known) = READY_CHECKS.iter().find(|c| **c == name) else {
                return Err(Refused::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "/readyz?exclude={name}: no such check; the checks are {}",
                        READY_CHECKS.join(", ")
                    ),
                ));
            };
            excluded.push(*known);
        }
    }
    let mut checks = serde_json::Map::new();
    let mut failed = Vec::new();
    let mut check = |name: &'static str, problem: Option<String>| {
        let verdict = if excluded.contains(&name) {
            "excluded".to_string()
        } else if let Some(problem) = problem {
            failed.push(problem.clone());
            problem
        } else {
            "ok".to_string()
        };
        checks.insert(name.to_string(), Value::String(verdict));
    };
    check(
        "serving",
        (!state.ready.load(Ordering::Relaxed)).then(|| "starting or draining".to_string()),
    );
    if let Some(fleet) = state.writer.fleet() {
        check(
            "etcd",
            fleet.down_reason().map(|why| {
                format!(
                    "etcd unreachable: serving the last routing table, refusing changes ({why})"
                )
            }),
        );
        check(
            "fleet_state",
            fleet.apply_problem().map(|why| {
                format!(
                    "cannot apply the fleet's routing state, still routing by generation {} ({why})",
                    state.writer.table().load().generation
                )
            }),
        );
    }
    if let Some(source) = state.writer.mlflow() {
        check(
            "mlflow",
            source.down_reason().map(|why| {
                format!("MLflow unreachable: serving the last pins, refusing promotions and rollbacks ({why})")
            }),
        );
    }
    Ok(if failed.is_empty() {
        json_response(StatusCode::OK, json!({"status": "ready", "checks": checks}))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "detail": failed.join("; "), "checks": checks}),
        )
    })
}

fn json_response(status: StatusCode, body: Value) -> AdminResponse {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
