//! The canary controller through the real proxy: a healthy candidate steps up and is promoted; a
//! candidate that errs, slows down or answers differently is rolled back naming its gate; too
//! little data holds until the progress deadline; eval sets gate the first step and promotion;
//! a paused route is left alone. Every decision is checked in the audit log, on `/v1/routes` and
//! in `weir_canary_decisions_total`.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;

const ROUTE: &str = "chat";
const STABLE: &str = "chat@v1";
const CANDIDATE: &str = "chat@v2";

/// How long a whole canary (a few 300 ms windows) may take on a busy 2-core machine.
const CANARY_DEADLINE: Duration = Duration::from_secs(25);

/// The registry digest of the candidate in [`registry`].
const CANDIDATE_DIGEST: &str = "2222222222222222222222222222222222222222222222222222222222222222";

const PARIS: &str = "The capital of France is Paris.";
const BANANAS: &str = "Bananas are a yellow fruit rich in potassium.";

// === config ===

/// `chat@v1` stable and `chat@v2` candidate at weight 0 on one route, with `route_keys` on the
/// route, `canary` under `[routes.canary]` (nothing when empty) and `top` (tables such as
/// `[registry]`) in front. Backends are `{v1}` and `{v2}`.
fn config(top: &str, route_keys: &str, canary: &str) -> String {
    let canary = if canary.is_empty() {
        String::new()
    } else {
        format!("[routes.canary]\n{canary}")
    };
    format!(
        r#"
{top}

[[versions]]
model = "chat"
version = "v1"
backends = ["{{v1}}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{{v2}}"]

[[routes]]
name = "chat"
stable = "chat@v1"
candidate = "chat@v2"
{route_keys}

{canary}
"#
    )
}

/// A canary policy with short windows; `extra` adds keys or overrides the defaults here. The
/// latency gate has its own test; elsewhere its cap is high, so scheduling jitter on a busy
/// machine cannot fail a healthy candidate.
fn policy(steps: &str, extra: &str) -> String {
    let defaults: String = [
        ("interval", "\"300ms\""),
        ("min_requests", "20"),
        ("max_p99_ratio", "50.0"),
        ("progress_deadline", "\"10s\""),
    ]
    .iter()
    .filter(|(key, _)| !extra.contains(key))
    .map(|(key, value)| format!("{key} = {value}\n"))
    .collect();
    format!("steps = {steps}\n{defaults}{extra}\n")
}

async fn start(config: &str, v1: &Backend, v2: &Backend) -> Weir {
    Weir::start(config, &[("v1", &v1.url()), ("v2", &v2.url())]).await
}

/// A registry where the stable is in production and the candidate a candidate, with known
/// digests and no approval rules (so the test needs no artifacts).
fn registry(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("registry.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[policy]
approval_roles = []
require_provenance = false
require_sbom = false

[[versions]]
model = "chat"
version = "v1"
digest = "{}"
stage = "production"

[[versions]]
model = "chat"
version = "v2"
digest = "{CANDIDATE_DIGEST}"
stage = "candidate"
"#,
            "1".repeat(64)
        ),
    )
    .unwrap();
    path
}

// === backends ===

/// Answers every request with `content` as an OpenAI-style chat completion, after `delay`;
/// `fail(n)` (n counts requests from 0) makes the n-th answer a 500. Chat completion requests
/// are counted in `chats`.
async fn model_backend(
    content: &'static str,
    delay: Duration,
    fail: fn(usize) -> bool,
) -> (Backend, Arc<AtomicUsize>) {
    let seen = Arc::new(AtomicUsize::new(0));
    let chats = Arc::new(AtomicUsize::new(0));
    let chat_count = chats.clone();
    let backend = Backend::start(move |req| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        if req.uri().path() == "/v1/chat/completions" {
            chat_count.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let _ = req.into_body().collect().await;
            let status = if fail(n) { 500 } else { 200 };
            let body = json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
            });
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(full(body.to_string()))
                .unwrap()
        }
    })
    .await;
    (backend, chats)
}

fn never(_: usize) -> bool {
    false
}

async fn healthy(content: &'static str) -> (Backend, Arc<AtomicUsize>) {
    model_backend(content, Duration::ZERO, never).await
}

// === load ===

/// Requests sent by background tasks over keep-alive connections until stopped, counted by the
/// `x-weir-version` and status that answered them.
struct Load {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    served: Arc<Mutex<HashMap<(String, u16), usize>>>,
    failed: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
enum Kind {
    /// `GET /v1/info` (not `/v1/models`, which weir never splits).
    Get,
    /// `POST /v1/chat/completions` with a JSON body.
    Chat,
}

impl Load {
    fn start(weir: &Weir, workers: usize, kind: Kind) -> Load {
        let (stop, stopped) = watch::channel(false);
        let served = Arc::new(Mutex::new(HashMap::new()));
        let failed = Arc::new(AtomicUsize::new(0));
        let client = http1();
        let tasks = (0..workers)
            .map(|worker| {
                let (client, stopped) = (client.clone(), stopped.clone());
                let (served, failed) = (served.clone(), failed.clone());
                let models = weir.url("/v1/info");
                let chat = weir.url("/v1/chat/completions");
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !*stopped.borrow() {
                        i += 1;
                        let req = match kind {
                            Kind::Get => request(Method::GET, &models).body(empty()).unwrap(),
                            Kind::Chat => request(Method::POST, &chat)
                                .header("content-type", "application/json")
                                .body(full(
                                    json!({
                                        "model": "chat",
                                        "messages": [{"role": "user", "content": format!("What is the capital of France? ({worker}/{i})")}],
                                    })
                                    .to_string(),
                                ))
                                .unwrap(),
                        };
                        let answered = tokio::time::timeout(DEADLINE, async {
                            let response = client.request(req).await.ok()?;
                            let status = response.status().as_u16();
                            let version = response
                                .headers()
                                .get("x-weir-version")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            response.into_body().collect().await.ok()?;
                            Some((version, status))
                        })
                        .await;
                        match answered {
                            Ok(Some(key)) => *served.lock().unwrap().entry(key).or_default() += 1,
                            _ => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            tasks,
            served,
            failed,
        }
    }

    /// Responses so far.
    fn total(&self) -> usize {
        self.served.lock().unwrap().values().sum()
    }

    /// Responses so far from `version` (any status).
    fn served_by(&self, version: &str) -> usize {
        self.served
            .lock()
            .unwrap()
            .iter()
            .filter(|((v, _), _)| v == version)
            .map(|(_, n)| n)
            .sum()
    }

    /// Stops every worker and waits for the requests in flight.
    async fn stop(self) -> HashMap<(String, u16), usize> {
        let _ = self.stop.send(true);
        for task in self.tasks {
            tokio::time::timeout(DEADLINE, task)
                .await
                .expect("load workers stop")
                .expect("load worker panicked");
        }
        let failed = self.failed.load(Ordering::SeqCst);
        assert_eq!(failed, 0, "{failed} load requests got no response");
        Arc::try_unwrap(self.served)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

// === audit and metrics ===

/// The route's `canary_decision` records, in order.
fn decisions(weir: &Weir) -> Vec<Value> {
    weir.audit()
        .into_iter()
        .filter(|r| r["action"] == "canary_decision" && r["route"] == ROUTE)
        .collect()
}

/// The decisions other than holds, by name.
fn acts(decisions: &[Value]) -> Vec<String> {
    decisions
        .iter()
        .map(|d| d["after"]["decision"].as_str().unwrap_or("?").to_string())
        .filter(|d| d != "hold")
        .collect()
}

fn of_kind<'a>(decisions: &'a [Value], kind: &str) -> Vec<&'a Value> {
    decisions
        .iter()
        .filter(|d| d["after"]["decision"] == kind)
        .collect()
}

/// One line per decision, for failure messages.
fn summary(weir: &Weir) -> String {
    decisions(weir)
        .iter()
        .map(|d| {
            format!(
                "\n  {} at {}: {}",
                d["after"]["decision"], d["after"]["weight_percent"], d["reason"]
            )
        })
        .collect()
}

/// The evidence of gate `name` in a decision record.
fn gate<'a>(decision: &'a Value, name: &str) -> &'a Value {
    decision["after"]["gates"]
        .as_array()
        .and_then(|gates| gates.iter().find(|g| g["gate"] == name))
        .unwrap_or_else(|| panic!("no {name} gate in {decision}"))
}

/// Records of routing changes made by the canary controller (`set_weight`, `promote`, …).
fn canary_changes(weir: &Weir) -> Vec<Value> {
    weir.audit()
        .into_iter()
        .filter(|r| r["actor"] == "canary" && r["action"] != "canary_decision")
        .collect()
}

async fn decision_count(weir: &Weir, decision: &str) -> u64 {
    weir.metric(
        "weir_canary_decisions_total",
        &[("route", ROUTE), ("decision", decision)],
    )
    .await
    .unwrap_or(0.0) as u64
}

/// The metric agrees with the audit log, decision by decision.
async fn assert_metric_matches_audit(weir: &Weir) {
    let records = decisions(weir);
    for kind in ["advance", "hold", "promote", "rollback"] {
        assert_eq!(
            decision_count(weir, kind).await,
            of_kind(&records, kind).len() as u64,
            "weir_canary_decisions_total{{decision={kind:?}}} vs the audit log:{}",
            summary(weir)
        );
    }
}

fn seconds_between(earlier: &Value, later: &Value) -> f64 {
    let time = |r: &Value| {
        humantime::parse_rfc3339(r["time"].as_str().expect("audit records have a time"))
            .expect("audit times are RFC 3339")
    };
    time(later)
        .duration_since(time(earlier))
        .unwrap_or_default()
        .as_secs_f64()
}

/// Checks a passed gate and that it judged at least `min` candidate samples.
fn assert_passed(decision: &Value, name: &str, min: u64) {
    let g = gate(decision, name);
    assert_eq!(g["passed"], true, "{name} gate: {g}");
    assert!(
        g["candidate_samples"].as_u64().unwrap_or(0) >= min,
        "{name} gate judged too few samples: {g}"
    );
    assert!(g["threshold"].is_number(), "{name} gate: {g}");
}

// === promotion ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_candidate_steps_through_every_step_and_is_promoted() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config("", "", &policy(r#"["10%", "50%", "100%"]"#, "")),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["stable"] == CANDIDATE,
        "the candidate was never promoted: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    let served = load.stop().await;
    assert!(
        served.keys().any(|(v, _)| v == CANDIDATE) && served.keys().any(|(v, _)| v == STABLE),
        "both versions served: {served:?}"
    );
    assert!(
        served.keys().all(|(_, status)| *status == 200),
        "{served:?}"
    );

    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], CANDIDATE, "{route}");
    assert_eq!(route["candidate"], Value::Null, "{route}");
    assert_eq!(route["rollback_target"], STABLE, "{route}");
    assert_eq!(route["state"], "stable", "{route}");
    let reply = get(&http1(), &weir.url("/v1/info")).await;
    assert_eq!(reply.served_by(), CANDIDATE);

    // Decisions: the first step, two judged steps, the promotion; holds only for want of data.
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "advance", "advance", "promote"],
        "{}",
        summary(&weir)
    );
    for hold in of_kind(&records, "hold") {
        assert!(
            hold["reason"].as_str().unwrap().contains("not enough data"),
            "a healthy candidate is only held for data: {hold}"
        );
    }
    let moves: Vec<&Value> = records
        .iter()
        .filter(|d| d["after"]["decision"] != "hold")
        .collect();
    let weights: Vec<u64> = moves
        .iter()
        .map(|d| d["after"]["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [0, 1000, 5000, 10000], "weights when decided");
    for d in &moves {
        assert_eq!(d["actor"], "canary", "{d}");
        assert_eq!(d["after"]["version"], CANDIDATE, "{d}");
        assert!(
            d["after"].get("digest").is_some(),
            "decisions carry a digest key: {d}"
        );
    }
    assert!(
        moves[0]["reason"].as_str().unwrap().contains("first step"),
        "{}",
        moves[0]
    );
    for d in &moves[1..] {
        assert_passed(d, "error_rate", 20);
        assert_passed(d, "latency_p99_ratio", 20);
        let error = gate(d, "error_rate");
        assert_eq!(error["observed"].as_f64(), Some(0.0), "{error}");
    }
    // Below 100% stable is judged too.
    for d in &moves[1..3] {
        let g = gate(d, "error_rate");
        assert!(g["stable_samples"].as_u64().unwrap() >= 20, "{g}");
    }

    // The changes themselves, by the canary actor, each after its decision.
    let changes = canary_changes(&weir);
    let summary_of: Vec<(String, u64)> = changes
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["after"]["weight"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        summary_of,
        [
            ("set_weight".to_string(), 1000),
            ("set_weight".to_string(), 5000),
            ("set_weight".to_string(), 10000),
            ("promote".to_string(), 0),
        ],
        "{changes:#?}"
    );
    assert_eq!(changes[3]["after"]["stable"], CANDIDATE);
    for (decision, change) in moves.iter().zip(&changes) {
        assert!(
            change["seq"].as_u64() > decision["seq"].as_u64(),
            "a change follows its decision: {decision} / {change}"
        );
    }

    assert_eq!(decision_count(&weir, "advance").await, 3);
    assert_eq!(decision_count(&weir, "promote").await, 1);
    assert_eq!(decision_count(&weir, "rollback").await, 0);
    assert_metric_matches_audit(&weir).await;
}

// === rollbacks ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_failing_30_percent_is_rolled_back_at_the_first_step() {
    let dir = temp_dir("canary-registry");
    let registry = registry(dir.path());
    let (v1, _) = healthy(PARIS).await;
    // Three answers in ten are 500s.
    let (v2, _) = model_backend(PARIS, Duration::ZERO, |n| n % 10 < 3).await;
    let weir = start(
        &config(
            &format!("[registry]\nfile = {:?}", registry.display().to_string()),
            "",
            &policy(r#"["10%", "50%", "100%"]"#, "min_requests = 30"),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the candidate was never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;

    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "rollback"],
        "{}",
        summary(&weir)
    );
    let rollback = of_kind(&records, "rollback")[0];
    let after = &rollback["after"];
    assert_eq!(after["version"], CANDIDATE, "{rollback}");
    assert_eq!(after["digest"], CANDIDATE_DIGEST, "{rollback}");
    assert_eq!(
        after["weight"], 1000,
        "rolled back at the first step: {rollback}"
    );
    let error = gate(rollback, "error_rate");
    assert_eq!(error["passed"], false, "{error}");
    let observed = error["observed"].as_f64().expect("observed error increase");
    assert!(
        (0.15..0.45).contains(&observed),
        "the increase is about 30 points: {error}"
    );
    let p = error["p_value"].as_f64().expect("a p-value");
    assert!(p < 0.01, "{error}");
    assert!(
        error["candidate_samples"].as_u64().unwrap() >= 30,
        "{error}"
    );
    assert!(error["stable_samples"].as_u64().unwrap() >= 30, "{error}");
    assert!(
        rollback["reason"].as_str().unwrap().contains("error_rate"),
        "{rollback}"
    );

    let changes = canary_changes(&weir);
    let actions: Vec<&str> = changes
        .iter()
        .map(|c| c["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["set_weight", "rollback"], "{changes:#?}");
    assert_eq!(changes[1]["after"]["rolled_back"], true);

    // Only the prior version serves now; the candidate gets nothing more.
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], STABLE, "{route}");
    assert_eq!(route["weight"], 0, "{route}");
    let before = v2.hits();
    let client = http1();
    for i in 0..100 {
        let reply = get(&client, &weir.url("/v1/info")).await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.served_by(), STABLE, "request {i}");
    }
    assert_eq!(v2.hits(), before, "the rolled-back candidate got traffic");

    assert_eq!(decision_count(&weir, "rollback").await, 1);
    assert_metric_matches_audit(&weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_little_data_holds_until_the_progress_deadline_rolls_back() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &policy(r#"["10%", "100%"]"#, "progress_deadline = \"2s\""),
        ),
        &v1,
        &v2,
    )
    .await;
    assert_eventually_eq!(
        weir.route(ROUTE).await["weight"].clone(),
        json!(1000),
        "the first step"
    );
    // A trickle: a candidate share of 20 requests is far short of min_requests.
    let client = http1();
    for _ in 0..20 {
        let reply = get(&client, &weir.url("/v1/info")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["canary"]["last_decision"] == "hold",
        "no hold on /v1/routes: {}",
        weir.route(ROUTE).await
    );
    let route = weir.route(ROUTE).await;
    let status = &route["canary"];
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not enough data")),
        "{route}"
    );
    assert_eq!(status["evidence"]["version"], CANDIDATE, "{route}");
    assert_eq!(route["weight"], 1000, "a hold does not step: {route}");
    assert_eq!(route["state"], "canary", "{route}");

    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the progress deadline never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "rollback"],
        "{}",
        summary(&weir)
    );
    let holds = of_kind(&records, "hold");
    assert!(holds.len() >= 3, "held each window: {}", summary(&weir));
    for hold in &holds {
        assert!(
            hold["reason"].as_str().unwrap().contains("not enough data"),
            "{hold}"
        );
        assert_eq!(hold["after"]["gates"], json!([]), "{hold}");
        assert_eq!(hold["after"]["weight"], 1000, "{hold}");
    }
    let advance = of_kind(&records, "advance")[0];
    let rollback = of_kind(&records, "rollback")[0];
    let reason = rollback["reason"].as_str().unwrap();
    assert!(
        reason.contains("progress deadline") && reason.contains("not enough data"),
        "{rollback}"
    );
    let waited = seconds_between(advance, rollback);
    assert!(
        waited >= 2.0,
        "rolled back {waited:.2}s after the step, before the 2s deadline"
    );
    let weights: Vec<u64> = canary_changes(&weir)
        .iter()
        .filter(|c| c["action"] == "set_weight")
        .map(|c| c["after"]["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [1000], "nothing advanced past the first step");
    assert_metric_matches_audit(&weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_latency_regression_is_rolled_back_naming_the_p99_gate() {
    let (v1, _) = model_backend(PARIS, Duration::from_millis(2), never).await;
    let (v2, _) = model_backend(PARIS, Duration::from_millis(60), never).await;
    let weir = start(
        &config("", "", &policy(r#"["10%", "100%"]"#, "max_p99_ratio = 1.5")),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 6, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the slow candidate was never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "rollback"],
        "{}",
        summary(&weir)
    );
    let rollback = of_kind(&records, "rollback")[0];
    let latency = gate(rollback, "latency_p99_ratio");
    assert_eq!(latency["passed"], false, "{latency}");
    assert_eq!(latency["threshold"], 1.5, "{latency}");
    let ratio = latency["observed"].as_f64().expect("an observed ratio");
    assert!(ratio > 1.5, "{latency}");
    assert_eq!(gate(rollback, "error_rate")["passed"], true, "{rollback}");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("latency_p99_ratio"),
        "{rollback}"
    );
    assert_eq!(weir.route(ROUTE).await["weight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_regression_is_rolled_back_naming_the_agreement_gate() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, v2_chats) = healthy(BANANAS).await;
    let weir = start(
        &config(
            "",
            r#"mirror = "100%""#,
            &policy(
                r#"["10%", "100%"]"#,
                "min_agreement = 0.9\nmin_comparisons = 20",
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Chat);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the disagreeing candidate was never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "rollback"],
        "{}",
        summary(&weir)
    );
    let rollback = of_kind(&records, "rollback")[0];
    let agreement = gate(rollback, "agreement");
    assert_eq!(agreement["passed"], false, "{agreement}");
    assert_eq!(agreement["threshold"], 0.9, "{agreement}");
    let observed = agreement["observed"]
        .as_f64()
        .expect("an observed agreement");
    assert!(observed < 0.5, "the answers never agree: {agreement}");
    assert!(
        agreement["candidate_samples"].as_u64().unwrap() >= 20,
        "judged on at least min_comparisons: {agreement}"
    );
    assert!(
        rollback["reason"].as_str().unwrap().contains("agreement"),
        "{rollback}"
    );
    // The candidate saw shadows of stable-routed requests besides its own share.
    assert!(
        v2_chats.load(Ordering::SeqCst) >= 40,
        "{}",
        v2_chats.load(Ordering::SeqCst)
    );
}

// === eval gates ===

/// Eval cases that ask the capital of France and expect Paris.
fn paris_cases(n: usize) -> String {
    (0..n)
        .map(|i| {
            json!({
                "name": format!("capital {i}"),
                "request": {"path": "/v1/chat/completions", "body": {"model": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}]}},
                "expect": {"status": 200, "contains": "Paris"},
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Writes an eval set and returns its path and SHA-256.
fn eval_set(dir: &std::path::Path, name: &str, text: &str) -> (String, String) {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    (path.display().to_string(), sha256(text.as_bytes()))
}

fn eval_table(file: &str, extra: &str) -> String {
    format!("[routes.canary.eval]\nfile = {file:?}\nthreshold = 1.0\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_eval_set_blocks_the_first_step() {
    let dir = temp_dir("canary-eval");
    let (file, digest) = eval_set(dir.path(), "capitals.jsonl", &paris_cases(2));
    let (v1, _) = healthy(PARIS).await;
    let (v2, v2_chats) = healthy(BANANAS).await;
    let weir = start(
        &config(
            "",
            "",
            &format!(
                "{}{}",
                policy(r#"["10%", "100%"]"#, ""),
                eval_table(&file, "")
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 2, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the failing eval never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    let served = load.stop().await;
    assert!(
        served.keys().all(|(v, _)| v == STABLE),
        "the candidate never served: {served:?}"
    );

    let records = decisions(&weir);
    assert_eq!(acts(&records), ["rollback"], "{}", summary(&weir));
    let rollback = &records[0];
    assert_eq!(rollback["after"]["weight"], 0, "{rollback}");
    assert_eq!(rollback["after"]["version"], CANDIDATE, "{rollback}");
    let eval = gate(rollback, "eval");
    assert_eq!(eval["passed"], false, "{eval}");
    assert_eq!(eval["sha256"], digest, "{eval}");
    assert_eq!(eval["cases"], 2, "{eval}");
    assert_eq!(eval["passed_cases"], 0, "{eval}");
    assert_eq!(eval["file"], file, "{eval}");
    assert!(
        rollback["reason"].as_str().unwrap().contains("evaluation"),
        "{rollback}"
    );
    assert_eq!(v2_chats.load(Ordering::SeqCst), 2, "each case ran once");
    let actions: Vec<Value> = canary_changes(&weir)
        .iter()
        .map(|c| c["action"].clone())
        .collect();
    assert_eq!(actions, [json!("rollback")], "no weight was ever set");
    assert_eq!(weir.route(ROUTE).await["weight"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_eval_set_is_refused_and_blocks_the_first_step() {
    let dir = temp_dir("canary-eval");
    let (file, _) = eval_set(dir.path(), "empty.jsonl", "\n\n");
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &format!(
                "{}{}",
                policy(r#"["10%", "100%"]"#, ""),
                eval_table(&file, "")
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the empty eval set never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    let records = decisions(&weir);
    assert_eq!(acts(&records), ["rollback"], "{}", summary(&weir));
    let eval = gate(&records[0], "eval");
    assert_eq!(eval["passed"], false, "{eval}");
    let note = eval["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("refused") && note.contains("empty.jsonl"),
        "the note says the set is refused: {eval}"
    );
    assert_eq!(records[0]["after"]["weight"], 0);
    assert!(
        canary_changes(&weir)
            .iter()
            .all(|c| c["action"] != "set_weight"),
        "no weight was ever set"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_eval_set_lets_the_candidate_step_and_be_promoted() {
    let dir = temp_dir("canary-eval");
    let (file, digest) = eval_set(dir.path(), "capitals.jsonl", &paris_cases(3));
    let (v1, _) = healthy(PARIS).await;
    let (v2, v2_chats) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &format!(
                "{}{}",
                policy(r#"["50%", "100%"]"#, ""),
                eval_table(&file, "")
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["stable"] == CANDIDATE,
        "the candidate that passed its eval was never promoted: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "advance", "promote"],
        "{}",
        summary(&weir)
    );
    let promote = of_kind(&records, "promote")[0];
    let eval = gate(promote, "eval");
    assert_eq!(eval["passed"], true, "{eval}");
    assert_eq!(eval["sha256"], digest, "{eval}");
    assert_eq!(eval["cases"], 3, "{eval}");
    assert_eq!(eval["observed"], 1.0, "{eval}");
    assert_passed(promote, "error_rate", 20);
    // Once before the first step, once before promotion.
    assert_eq!(v2_chats.load(Ordering::SeqCst), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_step_records_the_eval_it_passed() {
    let dir = temp_dir("canary-eval");
    let (file, digest) = eval_set(dir.path(), "capitals.jsonl", &paris_cases(1));
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &format!(
                "{}{}",
                policy(r#"["10%", "100%"]"#, ""),
                eval_table(&file, "")
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    assert_eventually_eq!(
        weir.route(ROUTE).await["weight"].clone(),
        json!(1000),
        "the first step"
    );
    let records = decisions(&weir);
    let advance = of_kind(&records, "advance")[0];
    // Every decision carries its evidence: the set that let the candidate in is named.
    let eval = gate(advance, "eval");
    assert_eq!(eval["passed"], true, "{eval}");
    assert_eq!(eval["sha256"], digest, "{eval}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eval_set_failing_at_promotion_rolls_back_instead_of_promoting() {
    let dir = temp_dir("canary-eval");
    let (file, digest) = eval_set(dir.path(), "capitals.jsonl", &paris_cases(2));
    let (v1, _) = healthy(PARIS).await;
    // Serves traffic without an error, but answers the eval wrongly.
    let (v2, v2_chats) = healthy(BANANAS).await;
    let weir = start(
        &config(
            "",
            "",
            &format!(
                "{}{}",
                policy(r#"["50%", "100%"]"#, ""),
                eval_table(&file, "before_first_step = false\nbefore_promotion = true")
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the candidate was never rolled back at promotion: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "advance", "rollback"],
        "{}",
        summary(&weir)
    );
    let rollback = of_kind(&records, "rollback")[0];
    assert_eq!(rollback["after"]["weight"], 10000, "{rollback}");
    assert!(
        rollback["reason"]
            .as_str()
            .unwrap()
            .contains("before promotion"),
        "{rollback}"
    );
    let eval = gate(rollback, "eval");
    assert_eq!(eval["passed"], false, "{eval}");
    assert_eq!(eval["sha256"], digest, "{eval}");
    // The traffic gates passed; only the eval held promotion back.
    assert_passed(rollback, "error_rate", 20);
    assert_eq!(
        v2_chats.load(Ordering::SeqCst),
        2,
        "no eval before the first step"
    );
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], STABLE, "{route}");
    assert!(
        canary_changes(&weir)
            .iter()
            .all(|c| c["action"] != "promote"),
        "never promoted"
    );
    assert_eq!(decision_count(&weir, "promote").await, 0);
}

// === pause ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_route_is_left_alone_until_resumed() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let backends = [("v1", v1.url()), ("v2", v2.url())];
    let backends: Vec<(&str, &str)> = backends.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let dir = temp_dir("canary-pause");
    let state = temp_dir("state");
    let path = dir.path().join("weir.toml");
    // Paused before the policy exists, so the controller can never act first; then the policy
    // arrives by reload.
    write_config(&path, &config("", "", ""), &backends, state.path());
    let weir = Weir::start_file(&path, state).await;
    let paused = weir
        .admin(Method::POST, "/v1/routes/chat/pause", None)
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
    write_config(
        &path,
        &config("", "", &policy(r#"["50%", "100%"]"#, "")),
        &backends,
        weir.state_dir.path(),
    );
    let reloaded = weir.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(reloaded.status, StatusCode::OK, "{}", reloaded.text());
    assert_eq!(weir.route(ROUTE).await["state"], "paused");

    let load = Load::start(&weir, 4, Kind::Get);
    // Several intervals' worth of traffic, far more than min_requests.
    let since = Instant::now();
    assert_eventually!(
        within CANARY_DEADLINE,
        load.total() >= 400 && since.elapsed() >= Duration::from_millis(1500),
        "the load never got going: {} responses",
        load.total()
    );
    let route = weir.route(ROUTE).await;
    assert_eq!(route["weight"], 0, "{route}");
    assert_eq!(route["state"], "paused", "{route}");
    assert_eq!(route["canary"], Value::Null, "{route}");
    assert!(
        decisions(&weir).is_empty(),
        "decisions on a paused route:{}",
        summary(&weir)
    );
    assert!(
        canary_changes(&weir).is_empty(),
        "{:#?}",
        canary_changes(&weir)
    );
    for kind in ["advance", "hold", "promote", "rollback"] {
        assert_eq!(decision_count(&weir, kind).await, 0, "{kind}");
    }
    assert_eq!(load.served_by(CANDIDATE), 0);

    let resumed = weir
        .admin(Method::POST, "/v1/routes/chat/resume", None)
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["stable"] == CANDIDATE,
        "the resumed canary never finished: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    assert_eq!(
        acts(&decisions(&weir)),
        ["advance", "advance", "promote"],
        "{}",
        summary(&weir)
    );
    assert_metric_matches_audit(&weir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_promotion_holds_after_the_last_step_for_an_admin() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &policy(r#"["50%", "100%"]"#, "confirm_promotion = true"),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    let awaiting = |d: &Value| {
        d["after"]["decision"] == "hold"
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("confirm_promotion"))
    };
    assert_eventually!(
        within CANARY_DEADLINE,
        decisions(&weir).iter().filter(|d| awaiting(d)).count() >= 2,
        "never held for confirmation: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], STABLE, "not promoted by itself: {route}");
    assert_eq!(route["weight"], 10000, "{route}");
    assert_eq!(route["canary"]["last_decision"], "hold", "{route}");
    let records = decisions(&weir);
    assert_eq!(acts(&records), ["advance", "advance"], "{}", summary(&weir));
    for hold in records.iter().filter(|d| awaiting(d)) {
        assert_passed(hold, "error_rate", 20);
    }
    let promoted = weir
        .admin(Method::POST, "/v1/routes/chat/promote", None)
        .await;
    assert_eq!(promoted.status, StatusCode::OK, "{}", promoted.text());
    assert_eq!(weir.route(ROUTE).await["stable"], CANDIDATE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_spent_paused_does_not_count_against_the_progress_deadline() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let weir = start(
        &config(
            "",
            "",
            &policy(r#"["10%", "100%"]"#, "progress_deadline = \"2s\""),
        ),
        &v1,
        &v2,
    )
    .await;
    assert_eventually_eq!(
        weir.route(ROUTE).await["weight"].clone(),
        json!(1000),
        "the first step"
    );
    let paused = weir
        .admin(Method::POST, "/v1/routes/chat/pause", None)
        .await;
    assert_eq!(paused.status, StatusCode::OK, "{}", paused.text());
    // A quiet pause longer than the deadline: nothing may happen meanwhile.
    let since = Instant::now();
    let decided = decisions(&weir).len();
    assert_eventually!(
        within CANARY_DEADLINE,
        since.elapsed() >= Duration::from_millis(2500),
        "unreachable"
    );
    assert_eq!(
        decisions(&weir).len(),
        decided,
        "decisions while paused:{}",
        summary(&weir)
    );
    let resumed = weir
        .admin(Method::POST, "/v1/routes/chat/resume", None)
        .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text());
    // The first window after the resume is still short of data: the step has its deadline ahead
    // of it (the pause froze it), so that is a hold, not a rollback.
    assert_eventually!(
        within CANARY_DEADLINE,
        decisions(&weir).len() > decided,
        "no decision after the resume:{}",
        summary(&weir)
    );
    let after_resume = decisions(&weir)[decided].clone();
    assert_eq!(
        after_resume["after"]["decision"], "hold",
        "rolled back on resume for a deadline that ran out while paused: {after_resume}"
    );
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] != "canary",
        "the canary never finished: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], CANDIDATE, "{route}{}", summary(&weir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_error_gate_is_not_held_for_want_of_shadow_comparisons() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = model_backend(PARIS, Duration::ZERO, |n| n % 10 < 3).await;
    let weir = start(
        &config(
            "",
            // Few shadows: the agreement gate gathers its comparisons slowly.
            r#"mirror = "5%""#,
            &policy(
                r#"["10%", "100%"]"#,
                "min_requests = 30\nmin_agreement = 0.9\nmin_comparisons = 1000\nprogress_deadline = \"3s\"",
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Chat);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the failing candidate was never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let records = decisions(&weir);
    let rollback = of_kind(&records, "rollback")[0];
    assert!(
        rollback["reason"].as_str().unwrap().contains("error_rate"),
        "a candidate failing 30% of requests is rolled back for its errors at the first judged \
         window, not held for shadow comparisons until the deadline:{}",
        summary(&weir)
    );
    assert!(
        of_kind(&records, "hold").is_empty()
            || of_kind(&records, "hold")
                .iter()
                .all(|h| h["after"]["gates"] == json!([])),
        "held with failing gates:{}",
        summary(&weir)
    );
}

#[test]
fn min_comparisons_beyond_the_agreement_window_is_refused() {
    // The agreement is rolling over the last 1000 comparisons, so a larger minimum can never be
    // met and would hold every step until its deadline.
    let text = config(
        "",
        r#"mirror = "10%""#,
        &policy(
            r#"["10%", "100%"]"#,
            "min_agreement = 0.9\nmin_comparisons = 5000",
        ),
    )
    .replace("{v1}", "http://127.0.0.1:1")
    .replace("{v2}", "http://127.0.0.1:2");
    let err = weir::Config::from_toml_str(&text, "weir.toml")
        .expect_err("min_comparisons = 5000 can never be reached")
        .to_string();
    assert!(err.contains("routes[0].canary.min_comparisons"), "{err}");
}

#[tokio::test]
async fn a_rollback_can_ramp_down_through_its_steps_first() {
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = model_backend(PARIS, Duration::ZERO, |n| n % 10 < 3).await;
    // Rollback steps must fall.
    let rising = config(
        "",
        "",
        &policy(r#"["20%", "100%"]"#, "rollback_steps = [\"5%\", \"10%\"]"),
    )
    .replace("{v1}", &v1.url())
    .replace("{v2}", &v2.url());
    let err = weir::Config::from_toml_str(&rising, "rising.toml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("canary.rollback_steps"), "{err}");
    // Rollback steps must fall: the config above is refused, this one is used.
    let weir = start(
        &config(
            "",
            "",
            &policy(
                r#"["20%", "100%"]"#,
                "min_requests = 30\nrollback_steps = [\"10%\", \"5%\"]",
            ),
        ),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    assert_eventually!(
        within CANARY_DEADLINE,
        weir.route(ROUTE).await["state"] == "rolled_back",
        "the candidate was never rolled back: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    load.stop().await;
    let changes = canary_changes(&weir);
    let steps: Vec<(String, Value)> = changes
        .iter()
        .map(|c| {
            (
                c["action"].as_str().unwrap().to_string(),
                c["after"]["weight"].clone(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("set_weight".to_string(), Value::from(2000)),
            ("set_weight".to_string(), Value::from(1000)),
            ("set_weight".to_string(), Value::from(500)),
            ("rollback".to_string(), Value::from(0)),
        ],
        "{changes:#?}"
    );
    assert_eq!(
        acts(&decisions(&weir)),
        ["advance", "rollback"],
        "one decision, carried out in steps"
    );
}

// === a promotion the writer refuses ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_promotion_is_decided_once_and_the_canary_holds() {
    let dir = temp_dir("canary-refused");
    // Production needs a security approval the candidate does not have: the writer refuses it.
    let path = registry(dir.path());
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("approval_roles = []", "approval_roles = [\"security\"]");
    std::fs::write(&path, text).unwrap();
    let (v1, _) = healthy(PARIS).await;
    let (v2, _) = healthy(PARIS).await;
    let top = format!("[registry]\nfile = {:?}", path.display().to_string());
    let weir = start(
        &config(&top, "", &policy(r#"["50%", "100%"]"#, "")),
        &v1,
        &v2,
    )
    .await;
    let load = Load::start(&weir, 4, Kind::Get);
    let refused = |d: &Value| {
        d["after"]["decision"] == "hold"
            && d["reason"]
                .as_str()
                .is_some_and(|r| r.contains("promotion of chat@v2 was refused"))
    };
    assert_eventually!(
        within CANARY_DEADLINE,
        decisions(&weir).iter().any(refused),
        "the refused promotion was never recorded as a hold: {}{}",
        weir.route(ROUTE).await,
        summary(&weir)
    );
    // Ten more intervals of passing traffic: the controller must not decide to promote again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    load.stop().await;
    let records = decisions(&weir);
    assert_eq!(
        acts(&records),
        ["advance", "advance", "promote"],
        "one promotion decision, then holding: {}",
        summary(&weir)
    );
    assert_eq!(
        records.iter().filter(|d| refused(d)).count(),
        1,
        "{}",
        summary(&weir)
    );
    let hold = records.iter().find(|d| refused(d)).unwrap();
    assert!(
        hold["reason"].as_str().unwrap().contains("role security"),
        "the hold names the cause: {hold}"
    );
    assert_eq!(decision_count(&weir, "promote").await, 1);
    assert_metric_matches_audit(&weir).await;
    let route = weir.route(ROUTE).await;
    assert_eq!(route["stable"], STABLE, "{route}");
    assert_eq!(route["weight"], 10000, "held where it was: {route}");
    assert_eq!(route["canary"]["last_decision"], "hold", "{route}");
    assert!(
        route["canary"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("until an admin")),
        "{route}"
    );
    assert!(
        !canary_changes(&weir)
            .iter()
            .any(|c| c["action"] == "promote"),
        "nothing was promoted"
    );
}
