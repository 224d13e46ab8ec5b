//! The mutating admin API: the bearer token guards every call, bad input is refused with its own
//! status and changes nothing, each accepted weight form lands as the right basis points, the
//! documented promote / rollback / pause semantics move traffic, reload re-reads the file (and
//! SIGHUP does the same for the binary), and hundreds of changes under load fail no request.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

const CONFIG: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[versions]]
model = "embed"
version = "e1"
backends = ["{e1}"]

[[routes]]
name = "chat"
prefix = "/v1/chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "0%"

[[routes]]
name = "embed"
prefix = "/v1/embeddings"
stable = "embed@e1"
"#;

/// A weir started from a config file (so reload has something to re-read) and its backends.
struct Setup {
    weir: Weir,
    config_path: std::path::PathBuf,
    backends: Vec<(String, String)>,
    _config_dir: TempDir,
    _servers: Vec<Backend>,
}

impl Setup {
    fn rewrite_config(&self, template: &str) {
        let backends: Vec<(&str, &str)> = self
            .backends
            .iter()
            .map(|(n, u)| (n.as_str(), u.as_str()))
            .collect();
        write_config(
            &self.config_path,
            template,
            &backends,
            self.weir.state_dir.path(),
        );
    }
}

async fn setup() -> Setup {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let e1 = Backend::named("embed@e1").await;
    let backends = vec![
        ("v1".to_string(), v1.url()),
        ("v2".to_string(), v2.url()),
        ("e1".to_string(), e1.url()),
    ];
    let config_dir = temp_dir("admin-config");
    let state_dir = temp_dir("admin-state");
    let config_path = config_dir.path().join("weir.toml");
    let pairs: Vec<(&str, &str)> = backends
        .iter()
        .map(|(n, u)| (n.as_str(), u.as_str()))
        .collect();
    write_config(&config_path, CONFIG, &pairs, state_dir.path());
    let weir = Weir::start_file(&config_path, state_dir).await;
    Setup {
        weir,
        config_path,
        backends,
        _config_dir: config_dir,
        _servers: vec![v1, v2, e1],
    }
}

/// `admin:` and the first 8 hex digits of the token's SHA-256, as audit records name the actor.
fn actor_of(token: &str) -> String {
    format!("admin:{}", &sha256(token.as_bytes())[..8])
}

fn assert_admin_error(reply: &Reply, status: u16, what: &str) {
    assert_eq!(
        reply.status.as_u16(),
        status,
        "{what}: expected {status}, got {} {}",
        reply.status,
        reply.text()
    );
    let json = reply.json();
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: error body has no message: {json}"
    );
    assert!(
        json.get("detail").is_some(),
        "{what}: error body has no detail: {json}"
    );
}

/// Sends `n` requests to `path` and returns how many each version served.
async fn served_by(weir: &Weir, path: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    let client = http1();
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let reply = get(&client, &weir.url(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        *counts.entry(reply.served_by().to_string()).or_insert(0) += 1;
    }
    counts
}

fn only(version: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
    [(version.to_string(), n)].into_iter().collect()
}

// === authentication ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_call_needs_the_token_and_a_refused_one_changes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup().await;
    let weir = &s.weir;
    let token_path = weir.state_dir.path().join("admin.token");
    let mode = std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the generated token file has mode {mode:o}");
    let token = weir.token();
    assert!(token.len() >= 32, "a short generated token: {token:?}");

    let routes_before = weir.routes().await;
    let audit_before = audit_lines(weir.state_dir.path());
    let state_before = std::fs::read(weir.state_dir.path().join("routing-state.json")).unwrap();

    let calls: &[(Method, &str, Option<&str>)] = &[
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "50%"}"#),
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": 10000}"#),
        ),
        (Method::POST, "/v1/routes/chat/promote", None),
        (Method::POST, "/v1/routes/chat/rollback", None),
        (
            Method::POST,
            "/v1/routes/chat/pause",
            Some(r#"{"reason": "x"}"#),
        ),
        (Method::POST, "/v1/routes/chat/resume", None),
        (Method::POST, "/v1/reload", None),
        // The token is checked before anything else: no 404, no 400 for these.
        (
            Method::PUT,
            "/v1/routes/nope/weight",
            Some(r#"{"weight": "5%"}"#),
        ),
        (Method::PUT, "/v1/routes/chat/weight", Some("{not json")),
    ];
    let wrong_token = format!("{token}0");
    let prefix_of_token = &token[..token.len() - 1];
    let bad_headers: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong".to_string()),
        Some(format!("Bearer {wrong_token}")),
        Some(format!("Bearer {prefix_of_token}")),
        Some("Bearer ".to_string()),
        Some(token.clone()),
        Some(format!("Basic {token}")),
    ];
    for (method, path, body) in calls {
        for authorization in &bad_headers {
            let headers: Vec<(&str, &str)> = authorization
                .iter()
                .map(|v| ("authorization", v.as_str()))
                .collect();
            let reply =
                admin_call(&weir.admin_url(path), method.clone(), None, *body, &headers).await;
            let what = format!("{method} {path} with Authorization {authorization:?}");
            assert_admin_error(&reply, 401, &what);
            assert_eq!(
                reply.header("www-authenticate"),
                Some("Bearer"),
                "{what}: no WWW-Authenticate"
            );
            assert!(
                !reply.text().contains(&token),
                "{what}: the reply shows the token"
            );
        }
        // If-Match is not even looked at before the token.
        let reply = admin_call(
            &weir.admin_url(path),
            method.clone(),
            None,
            *body,
            &[("if-match", "not-a-number")],
        )
        .await;
        assert_admin_error(&reply, 401, &format!("{method} {path} with a bad If-Match"));
    }

    assert_eq!(
        weir.routes().await,
        routes_before,
        "a refused call changed the routes"
    );
    assert_eq!(
        audit_lines(weir.state_dir.path()),
        audit_before,
        "a refused call was audited"
    );
    assert_eq!(
        std::fs::read(weir.state_dir.path().join("routing-state.json")).unwrap(),
        state_before,
        "a refused call rewrote the state file"
    );
    let all_v1 = served_by(weir, "/v1/chat/completions", 20).await;
    assert_eq!(
        all_v1,
        only("chat@v1", 20),
        "traffic moved after refused calls"
    );

    // The same calls with the token go through, and each is audited under the token's actor.
    let accepted: &[(Method, &str, Option<&str>, &str)] = &[
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "50%"}"#),
            "set_weight",
        ),
        (Method::POST, "/v1/routes/chat/pause", None, "pause"),
        (Method::POST, "/v1/routes/chat/resume", None, "resume"),
        (Method::POST, "/v1/routes/chat/promote", None, "promote"),
        (Method::POST, "/v1/routes/chat/rollback", None, "rollback"),
        (Method::POST, "/v1/reload", None, "reload"),
    ];
    let mut generation = routes_before["generation"].as_u64().unwrap();
    for (method, path, body, action) in accepted {
        let reply = weir.admin(method.clone(), path, *body).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {}",
            reply.text()
        );
        generation += 1;
        assert_eq!(
            reply.json()["generation"],
            generation,
            "{method} {path}: {}",
            reply.text()
        );
        let last = weir.audit().pop().unwrap();
        assert_eq!(last["action"], *action, "{last}");
        assert_eq!(last["actor"], actor_of(&token), "{last}");
        assert_eq!(last["generation"], generation, "{last}");
    }
    assert_eq!(weir.audit().len(), audit_before.len() + accepted.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    // RFC 9110 §11.1: the authentication scheme is a case-insensitive token.
    let s = setup().await;
    let weir = &s.weir;
    let token = weir.token();
    for (scheme, action) in [
        ("bearer", "pause"),
        ("BEARER", "resume"),
        ("bEaReR", "pause"),
    ] {
        let authorization = format!("{scheme} {token}");
        let reply = admin_call(
            &weir.admin_url(&format!("/v1/routes/chat/{action}")),
            Method::POST,
            None,
            None,
            &[("authorization", &authorization)],
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{action} with scheme {scheme:?}: {}",
            reply.text()
        );
        let last = weir.audit().pop().unwrap();
        assert_eq!(last["action"], action, "{last}");
        assert_eq!(last["actor"], actor_of(&token), "{last}");
    }
    let reply = admin_call(
        &weir.admin_url("/v1/routes/chat/resume"),
        Method::POST,
        None,
        None,
        &[("authorization", &format!("bearer {token}0"))],
    )
    .await;
    assert_admin_error(&reply, 401, "a wrong token under a lowercase scheme");
}

// === bad input ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_bad_input_gets_its_status_and_changes_nothing() {
    let s = setup().await;
    let weir = &s.weir;
    let token = weir.token();
    let generation = weir.generation().await;
    let stale = (generation - 1).to_string();
    let oversized = format!(
        r#"{{"weight": "5%", "reason": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let routes_before = weir.routes().await;
    let audit_before = weir.audit().len();

    type Case<'a> = (
        Method,
        &'a str,
        Option<&'a str>,
        Vec<(&'a str, &'a str)>,
        u16,
    );
    let cases: Vec<Case<'_>> = vec![
        // 400: malformed JSON, unknown fields, both or neither of weight and basis_points.
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%""#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some("weight=5%"),
            vec![],
            400,
        ),
        (Method::PUT, "/v1/routes/chat/weight", None, vec![], 400),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%", "percent": 5}"#),
            vec![],
            400,
        ),
        (
            Method::POST,
            "/v1/routes/chat/pause",
            Some(r#"{"why": "load test"}"#),
            vec![],
            400,
        ),
        (
            Method::POST,
            "/v1/reload",
            Some(r#"{"reason": 7}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%", "basis_points": 500}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some("{}"),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"reason": "no weight"}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": true}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "five"}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": "50"}"#),
            vec![],
            400,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%"}"#),
            vec![("if-match", "latest")],
            400,
        ),
        // 404: unknown route.
        (
            Method::PUT,
            "/v1/routes/nope/weight",
            Some(r#"{"weight": "5%"}"#),
            vec![],
            404,
        ),
        (Method::POST, "/v1/routes/nope/promote", None, vec![], 404),
        (Method::POST, "/v1/routes/nope/pause", None, vec![], 404),
        // 409: no candidate, nothing to roll back, stale If-Match.
        (
            Method::PUT,
            "/v1/routes/embed/weight",
            Some(r#"{"weight": "5%"}"#),
            vec![],
            409,
        ),
        (Method::POST, "/v1/routes/embed/promote", None, vec![], 409),
        (Method::POST, "/v1/routes/embed/rollback", None, vec![], 409),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%"}"#),
            vec![("if-match", &stale)],
            409,
        ),
        (
            Method::POST,
            "/v1/routes/chat/promote",
            None,
            vec![("if-match", "0")],
            409,
        ),
        // 422: out of range or finer than a basis point.
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "150%"}"#),
            vec![],
            422,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": 150}"#),
            vec![],
            422,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "-1%"}"#),
            vec![],
            422,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "0.001%"}"#),
            vec![],
            422,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": 10001}"#),
            vec![],
            422,
        ),
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": 12.5}"#),
            vec![],
            422,
        ),
        // 413: body over 64 KiB.
        (
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(&oversized),
            vec![],
            413,
        ),
        // 405: a known path with the wrong method.
        (Method::GET, "/v1/routes/chat/weight", None, vec![], 405),
        (
            Method::POST,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "5%"}"#),
            vec![],
            405,
        ),
        (Method::GET, "/v1/routes/chat/promote", None, vec![], 405),
        (Method::PUT, "/v1/routes/chat/rollback", None, vec![], 405),
        (Method::GET, "/v1/reload", None, vec![], 405),
        (Method::DELETE, "/v1/routes/chat", None, vec![], 405),
        (Method::POST, "/v1/routes", Some("{}"), vec![], 405),
    ];
    for (method, path, body, headers, status) in &cases {
        let reply = admin_call(
            &weir.admin_url(path),
            method.clone(),
            Some(&token),
            *body,
            headers,
        )
        .await;
        let shown_body = body.map(|b| &b[..b.len().min(80)]);
        let what = format!("{method} {path} {shown_body:?} {headers:?}");
        assert_admin_error(&reply, *status, &what);
        if *status == 409 && headers.iter().any(|(n, _)| *n == "if-match") {
            let detail = &reply.json()["detail"];
            assert_eq!(detail["current"], generation, "{what}: {detail}");
        }
        assert_eq!(
            weir.generation().await,
            generation,
            "{what} moved the generation"
        );
        assert_eq!(weir.audit().len(), audit_before, "{what} was audited");
    }
    assert_eq!(
        weir.routes().await,
        routes_before,
        "a refused call changed the routes"
    );
    assert_eq!(
        served_by(weir, "/v1/chat/completions", 20).await,
        only("chat@v1", 20),
        "traffic moved after refused calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_config_file_is_a_conflict() {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let e1 = Backend::named("embed@e1").await;
    let weir = Weir::start(
        CONFIG,
        &[("v1", &v1.url()), ("v2", &v2.url()), ("e1", &e1.url())],
    )
    .await;
    let generation = weir.generation().await;
    let audit = weir.audit().len();
    let reply = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_admin_error(&reply, 409, "POST /v1/reload without a config file");
    assert_eq!(weir.generation().await, generation);
    assert_eq!(weir.audit().len(), audit);
}

/// A change the writer refused says whether it may be live anyway (`outcome`); a call refused
/// before it reached the writer (bad JSON) has no outcome to tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_says_it_was_not_applied() {
    let s = setup().await;
    let weir = &s.weir;
    let no_candidate = weir
        .admin(Method::POST, "/v1/routes/embed/promote", None)
        .await;
    assert_admin_error(&no_candidate, 409, "promote a route without a candidate");
    assert_eq!(no_candidate.json()["outcome"], "not_applied");
    let unknown = weir
        .admin(Method::POST, "/v1/routes/nope/promote", None)
        .await;
    assert_admin_error(&unknown, 404, "promote an unknown route");
    assert_eq!(unknown.json()["outcome"], "not_applied");
    let malformed = weir
        .admin(Method::PUT, "/v1/routes/chat/weight", Some("weight=5%"))
        .await;
    assert_admin_error(&malformed, 400, "a body that is not JSON");
    assert!(
        malformed.json().get("outcome").is_none(),
        "{:?}",
        malformed.json()
    );
}

// === accepted changes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_weight_form_lands_as_basis_points_and_if_match_guards_the_generation() {
    let s = setup().await;
    let weir = &s.weir;
    let mut generation = weir.generation().await;
    let forms: &[(&str, u64, &str)] = &[
        (r#"{"weight": "5%"}"#, 500, "5%"),
        (r#"{"weight": "0.5%"}"#, 50, "0.5%"),
        (r#"{"weight": 5}"#, 500, "5%"),
        (r#"{"basis_points": 50}"#, 50, "0.5%"),
        (r#"{"weight": 0.25}"#, 25, "0.25%"),
        (
            r#"{"weight": "12.34%", "reason": "ramp step 3"}"#,
            1234,
            "12.34%",
        ),
        (r#"{"weight": "7"}"#, 700, "7%"),
        (r#"{"basis_points": 10000}"#, 10000, "100%"),
    ];
    for (body, basis_points, percent) in forms {
        let reply = weir
            .admin(Method::PUT, "/v1/routes/chat/weight", Some(body))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{body}: {}", reply.text());
        generation += 1;
        let json = reply.json();
        assert_eq!(json["generation"], generation, "{body}: {json}");
        assert_eq!(json["changed"], true, "{body}: {json}");
        assert_eq!(json["route"]["name"], "chat", "{body}: {json}");
        assert_eq!(json["route"]["weight"], *basis_points, "{body}: {json}");
        assert_eq!(json["route"]["weight_percent"], *percent, "{body}: {json}");
        assert_eq!(json["route"]["state"], "canary", "{body}: {json}");

        let live = weir.route("chat").await;
        assert_eq!(
            live["weight"], *basis_points,
            "{body}: /v1/routes shows {live}"
        );
        assert_eq!(weir.generation().await, generation);
        let last = weir.audit().pop().unwrap();
        assert_eq!(last["action"], "set_weight", "{last}");
        assert_eq!(last["route"], "chat", "{last}");
        assert_eq!(last["generation"], generation, "{last}");
        assert_eq!(last["after"]["weight"], *basis_points, "{last}");
    }
    let reasons: Vec<_> = weir.audit().iter().map(|r| r["reason"].clone()).collect();
    assert!(
        reasons.contains(&serde_json::json!("ramp step 3")),
        "the reason is not in the audit log: {reasons:?}"
    );
    // At 100% every request goes to the candidate.
    assert_eq!(
        served_by(weir, "/v1/chat/completions", 20).await,
        only("chat@v2", 20)
    );

    // The same weight again is accepted but changes nothing and writes nothing.
    let audit = weir.audit().len();
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "100%"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["changed"], false, "{}", reply.text());
    assert_eq!(reply.json()["generation"], generation);
    assert_eq!(weir.audit().len(), audit);

    // If-Match with the current generation (bare or quoted) applies.
    let token = weir.token();
    for if_match in [generation.to_string(), format!("\"{}\"", generation + 1)] {
        let body = if generation % 2 == 0 {
            r#"{"weight": "0%"}"#
        } else {
            r#"{"weight": "1%"}"#
        };
        let reply = admin_call(
            &weir.admin_url("/v1/routes/chat/weight"),
            Method::PUT,
            Some(&token),
            Some(body),
            &[("if-match", &if_match)],
        )
        .await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "If-Match {if_match}: {}",
            reply.text()
        );
        generation += 1;
        assert_eq!(reply.json()["generation"], generation);
    }
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "0%"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        served_by(weir, "/v1/chat/completions", 20).await,
        only("chat@v1", 20),
        "at 0% every request stays on the stable version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_rollback_pause_and_resume_move_the_route_as_documented() {
    let s = setup().await;
    let weir = &s.weir;
    let chat = "/v1/chat/completions";
    let post = |action: &'static str| {
        let path = format!("/v1/routes/chat/{action}");
        async move { weir.admin(Method::POST, &path, None).await }
    };
    let weight = |w: &'static str| async move {
        let body = format!(r#"{{"weight": "{w}"}}"#);
        weir.admin(Method::PUT, "/v1/routes/chat/weight", Some(&body))
            .await
    };
    let ok = |reply: Reply, what: &str| -> serde_json::Value {
        assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
        reply.json()["route"].clone()
    };

    ok(weight("30%").await, "weight 30%");
    let route = ok(post("pause").await, "pause");
    assert_eq!(
        (route["paused"].clone(), route["state"].clone()),
        (true.into(), "paused".into()),
        "{route}"
    );
    // Admins may still change the weight of a paused route.
    let route = ok(weight("100%").await, "weight while paused");
    assert_eq!(route["weight"], 10000, "{route}");
    assert_eq!(route["paused"], true, "{route}");
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v2", 10));
    let route = ok(post("resume").await, "resume");
    assert_eq!(
        (route["paused"].clone(), route["state"].clone()),
        (false.into(), "canary".into()),
        "{route}"
    );

    // Rollback during a canary: weight 0, candidate kept but takes no traffic.
    let route = ok(post("rollback").await, "rollback during a canary");
    assert_eq!(route["state"], "rolled_back", "{route}");
    assert_eq!(route["weight"], 0, "{route}");
    assert_eq!(route["candidate"], "chat@v2", "{route}");
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v1", 10));
    assert_admin_error(
        &post("promote").await,
        409,
        "promote of a rolled-back candidate",
    );
    assert_admin_error(
        &post("rollback").await,
        409,
        "rollback with nothing to roll back",
    );

    // A weight from an admin brings the candidate back.
    let route = ok(weight("100%").await, "weight after rollback");
    assert_eq!(route["state"], "canary", "{route}");
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v2", 10));

    // Promote: the candidate becomes stable, the prior stable is the rollback target.
    let route = ok(post("promote").await, "promote");
    assert_eq!(route["stable"], "chat@v2", "{route}");
    assert_eq!(route["candidate"], serde_json::Value::Null, "{route}");
    assert_eq!(route["rollback_target"], "chat@v1", "{route}");
    assert_eq!(route["weight"], 0, "{route}");
    assert_eq!(route["state"], "stable", "{route}");
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v2", 10));
    assert_admin_error(&weight("5%").await, 409, "weight without a candidate");

    // Rollback after a promotion: the prior stable returns, the demoted one is a rolled-back candidate.
    let route = ok(post("rollback").await, "rollback after a promotion");
    assert_eq!(route["stable"], "chat@v1", "{route}");
    assert_eq!(route["candidate"], "chat@v2", "{route}");
    assert_eq!(route["state"], "rolled_back", "{route}");
    assert_eq!(route["rollback_target"], serde_json::Value::Null, "{route}");
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v1", 10));
    assert_admin_error(&post("rollback").await, 409, "a second rollback");

    let actions: Vec<String> = weir
        .audit()
        .iter()
        .map(|r| r["action"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        actions,
        [
            "start",
            "set_weight",
            "pause",
            "set_weight",
            "resume",
            "rollback",
            "set_weight",
            "promote",
            "rollback"
        ],
        "refused calls must not be audited"
    );
}

// === reload ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rereads_the_file_a_changed_route_takes_the_config_and_an_invalid_file_changes_nothing(
) {
    let s = setup().await;
    let weir = &s.weir;
    let chat = "/v1/chat/completions";
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"weight": "100%"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // The file is unchanged: the admin-set weight stays.
    let reply = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(weir.route("chat").await["weight"], 10000);
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v2", 10));

    // The route's definition changed in the file: the config wins, live at once.
    s.rewrite_config(&CONFIG.replace(r#"weight = "0%""#, r#"weight = "0.5%""#));
    let reply = weir
        .admin(
            Method::POST,
            "/v1/reload",
            Some(r#"{"reason": "ship new split"}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let notes = reply.json()["notes"].to_string();
    assert!(notes.contains("chat: config_changed"), "notes: {notes}");
    assert_eq!(weir.route("chat").await["weight"], 50);
    // Back to 0%: again a changed definition (from 0.5%), so again the config wins.
    s.rewrite_config(CONFIG);
    let reply = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(weir.route("chat").await["weight"], 0);
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v1", 10));
    let last = weir.audit().pop().unwrap();
    assert_eq!(last["action"], "reload", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .is_some_and(|r| r.contains("config_changed")),
        "{last}"
    );

    // An invalid file: 422 with every problem, nothing changes.
    let generation = weir.generation().await;
    let audit = weir.audit().len();
    let routes = weir.routes().await;
    let invalid = CONFIG
        .replace(r#"weight = "0%""#, r#"weight = "150%""#)
        .replace(r#"stable = "embed@e1""#, r#"stable = "embed@e9""#);
    s.rewrite_config(&invalid);
    let reply = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_admin_error(&reply, 422, "reload of an invalid file");
    let problems = reply.json()["detail"]["problems"].clone();
    let list = problems
        .as_array()
        .unwrap_or_else(|| panic!("no detail.problems: {}", reply.text()));
    assert!(list.len() >= 2, "both problems are reported: {problems}");
    assert!(problems.to_string().contains("weight"), "{problems}");
    assert!(problems.to_string().contains("embed@e9"), "{problems}");
    assert_eq!(weir.generation().await, generation);
    assert_eq!(weir.audit().len(), audit);
    assert_eq!(weir.routes().await, routes);
    assert_eq!(served_by(weir, chat, 10).await, only("chat@v1", 10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_a_bad_file_on_sighup_changes_nothing() {
    let v1 = Backend::named("chat@v1").await;
    let v2 = Backend::named("chat@v2").await;
    let e1 = Backend::named("embed@e1").await;
    let backends = [("v1", v1.url()), ("v2", v2.url()), ("e1", e1.url())];
    let backends: Vec<(&str, &str)> = backends.iter().map(|(n, u)| (*n, u.as_str())).collect();
    let dir = temp_dir("sighup");
    let state = dir.path().join("state");
    let config = dir.path().join("weir.toml");
    write_config(&config, CONFIG, &backends, &state);
    let mut weir = WeirProcess::spawn(
        &[
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
    );
    let client = http1();
    let routes_url = weir.admin_url("/v1/routes");
    let routes = || async { get(&client, &routes_url).await.json() };
    let chat_weight = |routes: serde_json::Value| {
        routes["routes"]
            .as_array()
            .and_then(|all| all.iter().find(|r| r["name"] == "chat"))
            .map(|r| r["weight"].clone())
    };
    let generation = routes().await["generation"].as_u64().unwrap();

    write_config(
        &config,
        &CONFIG.replace(r#"weight = "0%""#, r#"weight = "100%""#),
        &backends,
        &state,
    );
    weir.signal("HUP");
    assert_eventually_eq!(
        chat_weight(routes().await),
        Some(serde_json::json!(10000)),
        "SIGHUP did not reload the file; output:\n{}",
        weir.log()
    );
    assert_eq!(routes().await["generation"], generation + 1);
    for _ in 0..10 {
        let reply = get(&client, &weir.url("/v1/chat/completions")).await;
        assert_eq!(reply.served_by(), "chat@v2");
    }
    let last = audit_records(&state).pop().unwrap();
    assert_eq!(last["action"], "reload", "{last}");
    assert_eq!(last["actor"], "signal:SIGHUP", "{last}");

    // A broken file on SIGHUP: refused, logged, nothing changes, weir keeps running.
    let audit = audit_lines(&state);
    std::fs::write(&config, "[[routes]]\nname = \n").unwrap();
    weir.signal("HUP");
    assert_eventually!(
        weir.log().contains("reload refused"),
        "no refusal logged for a broken file on SIGHUP; output:\n{}",
        weir.log()
    );
    assert!(
        weir.child.try_wait().unwrap().is_none(),
        "weir exited on a bad SIGHUP reload"
    );
    assert_eq!(routes().await["generation"], generation + 1);
    assert_eq!(audit_lines(&state), audit);
    let reply = get(&client, &weir.url("/v1/chat/completions")).await;
    assert_eq!(reply.served_by(), "chat@v2");

    weir.sigterm();
    let status = weir.exit_status(DEADLINE).await;
    assert_eq!(status.code(), Some(0), "output:\n{}", weir.log());
    assert_eq!(audit_records(&state).pop().unwrap()["action"], "stop");
}

// === changes under load ===

const EVENTS: usize = 5;

/// Answers with its label; on `/stream` paths, streams EVENTS events that each name it.
async fn versioned_backend(label: &'static str) -> Backend {
    Backend::start(move |req| async move {
        if !req.uri().path().ends_with("/stream") {
            return Response::builder().body(full(label)).unwrap();
        }
        let (tx, body) = channel_body(EVENTS);
        tokio::spawn(async move {
            for k in 0..EVENTS {
                if tx
                    .send(Bytes::from(format!("data: {label} {k}\n\n")))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    })
    .await
}

#[derive(Default)]
struct Tally {
    requests: std::sync::atomic::AtomicUsize,
    streams: std::sync::atomic::AtomicUsize,
    served: Mutex<std::collections::BTreeMap<String, usize>>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

async fn plain_worker(client: HttpClient, url: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let req = request(Method::GET, &url).body(empty()).unwrap();
        let response = match tokio::time::timeout(DEADLINE, client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tally.fail(format!("request failed: {e:?}")),
            Err(_) => return tally.fail("no response within the deadline".into()),
        };
        let status = response.status();
        let version = response
            .headers()
            .get("x-weir-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = match tokio::time::timeout(DEADLINE, response.into_body().collect()).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return tally.fail(format!("body failed: {e:?}")),
            Err(_) => return tally.fail("body not finished within the deadline".into()),
        };
        if status != StatusCode::OK || body != version.as_bytes() {
            return tally.fail(format!("{status} from {version:?}: {body:?}"));
        }
        tally.requests.fetch_add(1, Ordering::Relaxed);
        *tally.served.lock().unwrap().entry(version).or_insert(0) += 1;
    }
}

async fn stream_worker(client: HttpClient, url: String, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::Relaxed) {
        let req = request(Method::GET, &url)
            .header("accept", "text/event-stream")
            .body(empty())
            .unwrap();
        let response = match tokio::time::timeout(DEADLINE, client.request(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tally.fail(format!("stream request failed: {e:?}")),
            Err(_) => return tally.fail("no stream head within the deadline".into()),
        };
        let status = response.status();
        let version = response
            .headers()
            .get("x-weir-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = match tokio::time::timeout(DEADLINE, response.into_body().collect()).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Ok(Err(e)) => return tally.fail(format!("stream from {version} cut: {e:?}")),
            Err(_) => return tally.fail(format!("stream from {version} not finished")),
        };
        let expected: String = (0..EVENTS)
            .map(|k| format!("data: {version} {k}\n\n"))
            .collect();
        if status != StatusCode::OK || body != expected {
            return tally.fail(format!(
                "stream {status} with x-weir-version {version:?} carried {body:?}"
            ));
        }
        tally.streams.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_changes_under_load_fail_no_request_and_split_no_stream() {
    let v1 = versioned_backend("chat@v1").await;
    let v2 = versioned_backend("chat@v2").await;
    let e1 = Backend::named("embed@e1").await;
    let weir = Weir::start(
        &CONFIG.replace(r#"weight = "0%""#, r#"weight = "50%""#),
        &[("v1", &v1.url()), ("v2", &v2.url()), ("e1", &e1.url())],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut workers = Vec::new();
    for client in [http1(), http2()] {
        for _ in 0..2 {
            workers.push(tokio::spawn(plain_worker(
                client.clone(),
                weir.url("/v1/chat/completions"),
                stop.clone(),
                tally.clone(),
            )));
        }
        workers.push(tokio::spawn(stream_worker(
            client.clone(),
            weir.url("/v1/chat/stream"),
            stop.clone(),
            tally.clone(),
        )));
    }

    let token = weir.token();
    let url = |path: &str| weir.admin_url(path);
    let mut calls = 0u64;
    let mut call = |method: Method, path: &'static str, body: Option<String>| {
        calls += 1;
        let url = url(path);
        let token = token.clone();
        async move {
            let reply = admin_call(&url, method.clone(), Some(&token), body.as_deref(), &[]).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{method} {path} {body:?}: {}",
                reply.text()
            );
            assert_eq!(
                reply.json()["changed"],
                true,
                "{method} {path}: {}",
                reply.text()
            );
        }
    };
    let start_generation = weir.generation().await;
    let mut weights = 0;
    for i in 0..300u32 {
        // 1..=10000 basis points, never the same twice in a row.
        let bp = (i * 7919) % 10000 + 1;
        call(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(format!(r#"{{"basis_points": {bp}}}"#)),
        )
        .await;
        weights += 1;
        match i % 50 {
            // Promote, then roll the promotion back; the next weight brings the candidate back.
            20 => {
                call(Method::POST, "/v1/routes/chat/promote", None).await;
                call(Method::POST, "/v1/routes/chat/rollback", None).await;
            }
            // Roll back during the canary; again the next weight brings the candidate back.
            35 => {
                call(Method::POST, "/v1/routes/chat/rollback", None).await;
            }
            45 => {
                call(Method::POST, "/v1/routes/chat/pause", None).await;
                call(Method::POST, "/v1/routes/chat/resume", None).await;
            }
            _ => {}
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        tokio::time::timeout(DEADLINE, worker)
            .await
            .expect("workers stop")
            .expect("worker did not panic");
    }

    let failures = tally.failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(weights, 300);
    assert_eq!(
        weir.generation().await,
        start_generation + calls,
        "every acknowledged change is one generation"
    );
    let served = tally.served.lock().unwrap().clone();
    let requests = tally.requests.load(Ordering::Relaxed);
    let streams = tally.streams.load(Ordering::Relaxed);
    assert!(
        requests >= 100,
        "only {requests} requests ran during the changes"
    );
    assert!(
        streams >= 10,
        "only {streams} streams ran during the changes"
    );
    assert!(
        served.get("chat@v1").is_some_and(|n| *n > 0)
            && served.get("chat@v2").is_some_and(|n| *n > 0),
        "both versions should have served during the changes: {served:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_the_same_if_match_let_exactly_one_through() {
    let s = setup().await;
    let weir = &s.weir;
    let token = weir.token();
    let generation = weir.generation().await;
    let audit = weir.audit().len();
    let calls: Vec<_> = (1..=8)
        .map(|percent| {
            let url = weir.admin_url("/v1/routes/chat/weight");
            let token = token.clone();
            let if_match = generation.to_string();
            tokio::spawn(async move {
                let body = format!(r#"{{"weight": "{percent}%"}}"#);
                let reply = admin_call(
                    &url,
                    Method::PUT,
                    Some(&token),
                    Some(&body),
                    &[("if-match", &if_match)],
                )
                .await;
                (percent, reply)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for call in calls {
        let (percent, reply) = call.await.unwrap();
        match reply.status.as_u16() {
            200 => winners.push(percent * 100),
            409 => assert_eq!(reply.json()["detail"]["current"], generation + 1),
            _ => panic!("{percent}%: {} {}", reply.status, reply.text()),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one call may apply at generation {generation}"
    );
    assert_eq!(weir.generation().await, generation + 1);
    assert_eq!(weir.route("chat").await["weight"], winners[0]);
    assert_eq!(weir.audit().len(), audit + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_of_exactly_64_kib_is_accepted_and_one_byte_more_is_413() {
    let s = setup().await;
    let weir = &s.weir;
    let body_of = |len: usize| {
        let frame = r#"{"weight": "5%", "reason": ""}"#;
        let body = format!(
            r#"{{"weight": "5%", "reason": "{}"}}"#,
            "r".repeat(len - frame.len())
        );
        assert_eq!(body.len(), len);
        body
    };
    let generation = weir.generation().await;
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(&body_of(64 * 1024 + 1)),
        )
        .await;
    assert_admin_error(&reply, 413, "a 64 KiB + 1 byte body");
    assert_eq!(weir.generation().await, generation);
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(&body_of(64 * 1024)),
        )
        .await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "a 64 KiB body: {}",
        &reply.text()[..200.min(reply.text().len())]
    );
    assert_eq!(weir.generation().await, generation + 1);
    let last = weir.audit().pop().unwrap();
    assert_eq!(last["reason"].as_str().map(str::len), Some(64 * 1024 - 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_route_holds_off_the_canary_controller_but_not_an_admin() {
    use weir::{Actor, Change, Command};
    let s = setup().await;
    let weir = &s.weir;
    let writer = weir.running.as_ref().unwrap().writer().clone();
    let canary = |basis_points: u16| Change {
        command: Command::SetWeight {
            route: "chat".into(),
            basis_points,
        },
        actor: Actor::Canary,
        reason: Some("step".into()),
        if_match: None,
    };
    writer
        .apply(canary(100))
        .await
        .expect("the controller may move an unpaused route");
    assert_eq!(weir.route("chat").await["weight"], 100);
    let reply = weir
        .admin(Method::POST, "/v1/routes/chat/pause", None)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let generation = weir.generation().await;
    let refused = writer
        .apply(canary(200))
        .await
        .expect_err("a paused route refuses the controller");
    assert_eq!(weir::status_of(&refused), StatusCode::CONFLICT, "{refused}");
    assert_eq!(weir.generation().await, generation);
    assert_eq!(weir.route("chat").await["weight"], 100);
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": 300}"#),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["route"]["paused"], true);
    let actors: Vec<Value> = weir.audit().iter().map(|r| r["actor"].clone()).collect();
    assert_eq!(actors[1], "canary", "{actors:?}");
}
