//! Persisted routing state and the audit log: acknowledged changes survive kill -9, a damaged
//! state file is refused rather than replaced by the config, a restart keeps admin changes unless
//! the route's config changed, `weir audit verify` catches every kind of tampering, and the
//! serving windows in the log add up to the traffic each version served.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use http::{Method, StatusCode};
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

[[versions]]
model = "embed"
version = "e2"
backends = ["{e2}"]

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
candidate = "embed@e2"
weight = "0%"
"#;

/// Named backends for every version of [`CONFIG`].
struct Backends {
    _servers: Vec<Backend>,
    urls: Vec<(&'static str, String)>,
}

impl Backends {
    async fn start() -> Backends {
        let mut servers = Vec::new();
        let mut urls = Vec::new();
        for (name, label) in [
            ("v1", "chat@v1"),
            ("v2", "chat@v2"),
            ("e1", "embed@e1"),
            ("e2", "embed@e2"),
        ] {
            let backend = Backend::named(label).await;
            urls.push((name, backend.url()));
            servers.push(backend);
        }
        Backends {
            _servers: servers,
            urls,
        }
    }

    fn pairs(&self) -> Vec<(&str, &str)> {
        self.urls.iter().map(|(n, u)| (*n, u.as_str())).collect()
    }

    fn config(&self, template: &str, state_dir: &Path) -> weir::Config {
        let text = config_text(template, &self.pairs(), state_dir);
        weir::Config::from_toml_str(&text, "test.toml")
            .unwrap_or_else(|e| panic!("test config is invalid: {e}\n{text}"))
    }

    async fn weir(&self, template: &str, state_dir: TempDir) -> Weir {
        Weir::start_config(self.config(template, state_dir.path()), state_dir).await
    }
}

async fn set_weight(weir: &Weir, route: &str, weight: &str) -> u64 {
    let body = format!(r#"{{"weight": "{weight}"}}"#);
    let path = format!("/v1/routes/{route}/weight");
    let reply = weir.admin(Method::PUT, &path, Some(&body)).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "{path} {weight}: {}",
        reply.text()
    );
    reply.json()["generation"].as_u64().unwrap()
}

async fn post(weir: &Weir, route: &str, action: &str) -> u64 {
    let path = format!("/v1/routes/{route}/{action}");
    let reply = weir.admin(Method::POST, &path, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    reply.json()["generation"].as_u64().unwrap()
}

fn route_of(routes: &Value, name: &str) -> Value {
    routes["routes"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no route {name} in {routes}"))
}

/// The fields of a route that are its routing state.
fn state_of(route: &Value) -> Value {
    serde_json::json!({
        "stable": route["stable"],
        "candidate": route["candidate"],
        "weight": route["weight"],
        "state": route["state"],
        "paused": route["paused"],
        "rollback_target": route["rollback_target"],
    })
}

fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// === kill -9 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_kill_9_and_the_log_still_verifies() {
    let backends = Backends::start().await;
    let dir = temp_dir("kill9");
    let state = dir.path().join("state");
    let config = dir.path().join("weir.toml");
    write_config(&config, CONFIG, &backends.pairs(), &state);
    let args = [
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    let mut weir = WeirProcess::spawn(&args, dir.path());
    let token = admin_token(&state);
    let mut last = None;
    for percent in 1..=20 {
        let body = format!(r#"{{"weight": "{percent}%"}}"#);
        let reply = admin_call(
            &weir.admin_url("/v1/routes/chat/weight"),
            Method::PUT,
            Some(&token),
            Some(&body),
            &[],
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        last = Some(reply.json());
    }
    let reply = admin_call(
        &weir.admin_url("/v1/routes/chat/pause"),
        Method::POST,
        Some(&token),
        None,
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    weir.child.kill().expect("SIGKILL");
    let acknowledged = reply.json();
    assert!(last.is_some());
    let status = weir.exit_status(DEADLINE).await;
    assert_eq!(
        status.code(),
        None,
        "weir should have died of SIGKILL: {status:?}"
    );
    let generation = acknowledged["generation"].as_u64().unwrap();
    assert_eq!(acknowledged["route"]["weight"], 2000, "{acknowledged}");
    assert_eq!(acknowledged["route"]["paused"], true, "{acknowledged}");

    let log = state.join("audit.jsonl");
    let verify = run_weir(
        &["audit", "verify", log.to_str().unwrap()],
        dir.path(),
        DEADLINE,
    )
    .await;
    assert!(
        verify.status.success(),
        "after kill -9: {}",
        output_text(&verify)
    );
    let records = audit_records(&state);
    assert_eq!(records.len(), 22, "start, 20 weights, pause");
    assert_eq!(records.last().unwrap()["action"], "pause");
    assert!(
        records.iter().all(|r| r["action"] != "stop"),
        "a killed weir wrote no stop record"
    );

    let restarted = WeirProcess::spawn(&args, dir.path());
    let routes = get(&http1(), &restarted.admin_url("/v1/routes"))
        .await
        .json();
    assert_eq!(
        routes["generation"],
        generation + 1,
        "the restart is one generation after the last acknowledged change: {routes}"
    );
    assert_eq!(
        state_of(&route_of(&routes, "chat")),
        state_of(&acknowledged["route"]),
        "after the restart: {routes}"
    );
    assert_eq!(route_of(&routes, "chat")["weight_percent"], "20%");
    let start = audit_records(&state).pop().unwrap();
    assert_eq!(start["action"], "start", "{start}");
    assert_eq!(start["generation"], generation + 1, "{start}");
    let verify = run_weir(
        &["audit", "verify", log.to_str().unwrap()],
        dir.path(),
        DEADLINE,
    )
    .await;
    assert!(
        verify.status.success(),
        "after the restart: {}",
        output_text(&verify)
    );
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("23 records"),
        "{}",
        output_text(&verify)
    );
}

// === a damaged state file ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_edited_state_file_is_refused_not_replaced() {
    let backends = Backends::start().await;
    let weir = backends.weir(CONFIG, temp_dir("corrupt")).await;
    set_weight(&weir, "chat", "30%").await;
    let dir = weir.stop().await;
    let path = dir.path().join("routing-state.json");
    let good = std::fs::read(&path).unwrap();
    let good_text = String::from_utf8(good.clone()).unwrap();
    let (body, checksum) = good_text.split_once('\n').unwrap();
    assert!(body.contains(r#""weight":3000"#), "{body}");
    let edited = format!(
        "{}\n{checksum}",
        body.replace(r#""weight":3000"#, r#""weight":9000"#)
    );
    let audit = audit_lines(dir.path());
    let config = backends.config(CONFIG, dir.path());
    let config_path = dir.path().join("weir.toml");
    write_config(&config_path, CONFIG, &backends.pairs(), dir.path());

    let damaged: [(&str, Vec<u8>); 3] = [
        ("truncated", good[..good.len() / 2].to_vec()),
        ("emptied", Vec::new()),
        ("edited", edited.into_bytes()),
    ];
    for (what, bytes) in &damaged {
        std::fs::write(&path, bytes).unwrap();
        let message = match weir::Server::start(config.clone()).await {
            Ok(running) => panic!(
                "weir started on a {what} state file, at generation {}",
                running.table().generation
            ),
            Err(e) => format!("{e:#}"),
        };
        assert!(
            message.contains(&path.display().to_string()) && message.contains("corrupt"),
            "{what}: the error should name the file and say corrupt: {message}"
        );
        assert_eq!(
            &std::fs::read(&path).unwrap(),
            bytes,
            "{what}: the file was rewritten"
        );
        assert_eq!(
            audit_lines(dir.path()),
            audit,
            "{what}: the audit log changed"
        );

        let output = run_weir(
            &[
                "serve",
                "--config",
                config_path.to_str().unwrap(),
                "--state-dir",
                dir.path().to_str().unwrap(),
            ],
            dir.path(),
            DEADLINE,
        )
        .await;
        let text = output_text(&output);
        assert!(
            !output.status.success(),
            "{what}: the binary served: {text}"
        );
        assert!(
            text.contains(&path.display().to_string()) && text.contains("corrupt"),
            "{what}: the binary should name the file and say corrupt: {text}"
        );
        assert_eq!(
            &std::fs::read(&path).unwrap(),
            bytes,
            "{what}: the binary rewrote it"
        );
    }

    // The intact file starts again, with the admin's weight: the refusals were about the damage.
    std::fs::write(&path, &good).unwrap();
    let weir = Weir::start_config(config, dir).await;
    assert_eq!(weir.route("chat").await["weight"], 3000);
}

// === restart precedence ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_admin_state_unless_the_routes_config_definition_changed() {
    let backends = Backends::start().await;
    let weir = backends.weir(CONFIG, temp_dir("restart")).await;
    set_weight(&weir, "chat", "30%").await;
    post(&weir, "chat", "pause").await;
    set_weight(&weir, "embed", "100%").await;
    let generation = post(&weir, "embed", "promote").await;
    let before = weir.routes().await;
    let dir = weir.stop().await;

    // Unchanged config: the persisted state wins for every route.
    let weir = backends.weir(CONFIG, dir).await;
    let routes = weir.routes().await;
    assert_eq!(routes["generation"], generation + 1, "{routes}");
    for name in ["chat", "embed"] {
        assert_eq!(
            state_of(&route_of(&routes, name)),
            state_of(&route_of(&before, name)),
            "{name} after a restart with the same config"
        );
    }
    assert_eq!(route_of(&routes, "chat")["weight"], 3000);
    assert_eq!(route_of(&routes, "chat")["state"], "paused");
    assert_eq!(route_of(&routes, "embed")["stable"], "embed@e2");
    assert_eq!(route_of(&routes, "embed")["rollback_target"], "embed@e1");
    for _ in 0..10 {
        let reply = get(&http1(), &weir.url("/v1/embeddings")).await;
        assert_eq!(reply.served_by(), "embed@e2", "the promotion was lost");
    }
    let start = weir.audit().pop().unwrap();
    assert_eq!(start["action"], "start", "{start}");
    assert_eq!(start["reason"], Value::Null, "{start}");
    let dir = weir.stop().await;

    // chat's definition changed (its weight in the file): the config wins for chat only.
    let changed = CONFIG.replacen(r#"weight = "0%""#, r#"weight = "20%""#, 1);
    let weir = backends.weir(&changed, dir).await;
    let routes = weir.routes().await;
    let chat = route_of(&routes, "chat");
    assert_eq!(chat["weight"], 2000, "{chat}");
    assert_eq!(chat["paused"], false, "{chat}");
    assert_eq!(chat["state"], "canary", "{chat}");
    assert_eq!(
        state_of(&route_of(&routes, "embed")),
        state_of(&route_of(&before, "embed")),
        "embed's definition did not change, so its state stays"
    );
    let start = weir.audit().pop().unwrap();
    let reason = start["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("chat: config_changed"), "{start}");
    assert!(!reason.contains("embed"), "{start}");
    assert_eq!(
        route_state_in(&start["after"], "chat")["weight"],
        2000,
        "{start}"
    );
    assert_eq!(
        route_state_in(&start["before"], "chat")["weight"],
        3000,
        "{start}"
    );
}

/// A route in a `RoutingState` as audit records carry it.
fn route_state_in(state: &Value, name: &str) -> Value {
    state["routes"]
        .as_array()
        .and_then(|all| all.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no route {name} in {state}"))
}

// === weir audit verify ===

/// Recomputes a record's own hash after an edit, as a forger who knows the format would.
fn rehash(line: &str) -> String {
    let at = line.rfind(",\"hash\":\"").expect("a hash field");
    let canonical = format!("{}}}", &line[..at]);
    format!(
        "{},\"hash\":\"{}\"}}",
        &line[..at],
        sha256(canonical.as_bytes())
    )
}

async fn verify(lines: &[String], state_file: &[u8], tag: &str) -> (Option<i32>, String) {
    let dir = temp_dir(tag);
    let log = dir.path().join("audit.jsonl");
    std::fs::write(
        &log,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
    std::fs::write(dir.path().join("routing-state.json"), state_file).unwrap();
    let output = run_weir(
        &["audit", "verify", log.to_str().unwrap()],
        dir.path(),
        DEADLINE,
    )
    .await;
    (output.status.code(), output_text(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_an_intact_log_and_names_the_first_bad_line() {
    let backends = Backends::start().await;
    let weir = backends.weir(CONFIG, temp_dir("verify")).await;
    set_weight(&weir, "chat", "10%").await;
    post(&weir, "chat", "pause").await;
    post(&weir, "chat", "resume").await;
    set_weight(&weir, "chat", "20%").await;
    post(&weir, "chat", "promote").await;
    post(&weir, "chat", "rollback").await;
    let dir = weir.stop().await;
    let lines = audit_lines(dir.path());
    let actions: Vec<Value> = audit_records(dir.path())
        .iter()
        .map(|r| r["action"].clone())
        .collect();
    assert_eq!(
        actions,
        [
            "start",
            "set_weight",
            "pause",
            "resume",
            "set_weight",
            "promote",
            "rollback",
            "stop"
        ]
    );
    let state_file = std::fs::read(dir.path().join("routing-state.json")).unwrap();

    let (code, text) = verify(&lines, &state_file, "verify-intact").await;
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("8 records"), "{text}");

    let mut edited = lines.clone();
    assert!(edited[1].contains(r#""weight":1000"#), "{}", edited[1]);
    edited[1] = edited[1].replace(r#""weight":1000"#, r#""weight":100"#);
    let mut forged = edited.clone();
    forged[1] = rehash(&forged[1]);
    let mut deleted = lines.clone();
    deleted.remove(3);
    let mut inserted = lines.clone();
    inserted.insert(3, lines[2].clone());
    let mut reordered = lines.clone();
    reordered.swap(3, 4);
    let cut_one = lines[..7].to_vec();
    let cut_two = lines[..6].to_vec();

    let cases: [(&str, &[String], usize); 7] = [
        ("an edited record", &edited, 2),
        ("an edited record with its hash recomputed", &forged, 3),
        ("a deleted record", &deleted, 4),
        ("an inserted record", &inserted, 4),
        ("a reordered pair", &reordered, 4),
        ("a cut-off stop record", &cut_one, 7),
        ("a cut-off tail of two records", &cut_two, 6),
    ];
    for (what, tampered, line) in cases {
        let (code, text) = verify(tampered, &state_file, "verify-tampered").await;
        assert_eq!(code, Some(1), "{what}: {text}");
        assert!(
            text.contains(&format!(": line {line}: ")),
            "{what}: the output should name line {line}: {text}"
        );
    }
    let (_, text) = verify(&cut_one, &state_file, "verify-cut").await;
    assert!(text.contains("cut off"), "{text}");
}

// === serving windows ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_windows_add_up_to_the_requests_each_version_served() {
    let backends = Backends::start().await;
    let weir = backends.weir(CONFIG, temp_dir("windows")).await;
    let clients = [http1(), http2()];
    // generation -> version -> responses the test saw
    let mut observed: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
    let generation = weir.generation().await;
    let phase1 = send_chat(&weir, &clients, 40).await;
    let g2 = set_weight(&weir, "chat", "50%").await;
    let phase2 = send_chat(&weir, &clients, 60).await;
    let g3 = post(&weir, "chat", "promote").await;
    let phase3 = send_chat(&weir, &clients, 30).await;
    observed.insert(generation, phase1);
    observed.insert(g2, phase2);
    observed.insert(g3, phase3);
    assert!(
        observed[&g2].len() == 2,
        "at 50% both versions should serve some of 60 requests: {:?}",
        observed[&g2]
    );
    let dir = weir.stop().await;

    let records = audit_records(dir.path());
    assert_eq!(records.last().unwrap()["action"], "stop");
    let mut windows: BTreeMap<u64, BTreeMap<String, u64>> = BTreeMap::new();
    let mut totals: BTreeMap<String, u64> = BTreeMap::new();
    for record in &records {
        let window = &record["window"];
        if window.is_null() {
            assert_eq!(
                record["action"], "start",
                "only the start record has no window: {record}"
            );
            continue;
        }
        let generation = window["generation"].as_u64().expect("window generation");
        let counts = windows.entry(generation).or_default();
        for served in window["served"].as_array().expect("served") {
            assert_eq!(served["errors"], 0, "{served}");
            let requests = served["requests"].as_u64().expect("requests");
            if requests > 0 {
                let version = served["version"].as_str().unwrap().to_string();
                *counts.entry(version.clone()).or_insert(0) += requests;
                *totals.entry(version).or_insert(0) += requests;
            }
        }
    }
    assert_eq!(
        windows, observed,
        "per window (generation -> version -> requests)"
    );
    let mut expected: BTreeMap<String, u64> = BTreeMap::new();
    for seen in observed.values() {
        for (version, n) in seen {
            *expected.entry(version.clone()).or_insert(0) += n;
        }
    }
    assert_eq!(totals, expected, "per version over the whole run");
    assert_eq!(expected.values().sum::<u64>(), 130);
}

/// Sends `n` requests to the chat route, alternating HTTP/1.1 and HTTP/2, and counts the
/// versions that served them.
async fn send_chat(weir: &Weir, clients: &[HttpClient; 2], n: usize) -> BTreeMap<String, u64> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let reply = get(&clients[i % 2], &weir.url("/v1/chat/completions")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        *seen.entry(reply.served_by().to_string()).or_insert(0) += 1;
    }
    seen
}

/// A response whose head is sent after a change counts in the window that change opened, even
/// when the change took its version out of the table (a promotion replaces the stable version).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_sent_after_a_change_counts_in_the_window_the_change_opened() {
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    let held = gate.clone();
    let v1 = Backend::start(move |_req| {
        let held = held.clone();
        async move {
            held.notified().await;
            http::Response::builder().body(full("chat@v1")).unwrap()
        }
    })
    .await;
    let backends = Backends::start().await;
    let mut pairs = backends.pairs();
    let v1_url = v1.url();
    pairs.retain(|(n, _)| *n != "v1");
    pairs.push(("v1", &v1_url));
    let dir = temp_dir("window-crossing");
    let text = config_text(CONFIG, &pairs, dir.path());
    let config = weir::Config::from_toml_str(&text, "test.toml").unwrap();
    let weir = Weir::start_config(config, dir).await;

    let url = weir.url("/v1/chat/completions");
    let in_flight = tokio::spawn(async move { get(&http1(), &url).await });
    assert_eventually!(v1.hits() == 1, "the request never reached chat@v1");
    let promoted = post(&weir, "chat", "promote").await;
    gate.notify_one();
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.served_by(), "chat@v1");
    let dir = weir.stop().await;

    let records = audit_records(dir.path());
    let served_by_v1: Vec<(u64, u64)> = records
        .iter()
        .filter(|r| !r["window"].is_null())
        .flat_map(|r| {
            let generation = r["window"]["generation"].as_u64().unwrap();
            r["window"]["served"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["version"] == "chat@v1")
                .map(move |s| (generation, s["requests"].as_u64().unwrap()))
                .collect::<Vec<_>>()
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        served_by_v1,
        [(promoted, 1)],
        "the chat@v1 response sent after the promotion should count once, in window {promoted}; \
         windows: {:#}",
        Value::Array(records.iter().map(|r| r["window"].clone()).collect())
    );
}

// === crash between the state file and the log ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_one_record_short_of_the_state_is_repaired_and_two_short_is_refused() {
    let backends = Backends::start().await;
    let weir = backends.weir(CONFIG, temp_dir("repair")).await;
    set_weight(&weir, "chat", "10%").await;
    set_weight(&weir, "chat", "20%").await;
    let dir = weir.stop().await;
    let lines = audit_lines(dir.path());
    let log = dir.path().join("audit.jsonl");
    let write_lines = |lines: &[String]| {
        std::fs::write(
            &log,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap()
    };
    let config = backends.config(CONFIG, dir.path());

    // Two records short: not a crash weir can explain, so it refuses to start.
    write_lines(&lines[..lines.len() - 2]);
    match weir::Server::start(config.clone()).await {
        Ok(_) => panic!("weir started on an audit log two records short of its state"),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(
                message.contains(&log.display().to_string())
                    && message.contains("weir audit verify"),
                "{message}"
            );
        }
    }
    assert_eq!(
        audit_lines(dir.path()).len(),
        lines.len() - 2,
        "the refused start wrote to the log"
    );

    // One record short (the state was written, the append was not): repaired from the state file.
    write_lines(&lines[..lines.len() - 1]);
    let weir = Weir::start_config(config, dir).await;
    assert_eq!(weir.route("chat").await["weight"], 2000);
    let repaired = audit_lines(weir.state_dir.path());
    assert_eq!(
        repaired[..lines.len()],
        lines[..],
        "the missing record is restored exactly"
    );
    assert_eq!(repaired.len(), lines.len() + 1, "then the start record");
    let output = run_weir(
        &[
            "audit",
            "verify",
            weir.state_dir.path().join("audit.jsonl").to_str().unwrap(),
        ],
        weir.state_dir.path(),
        DEADLINE,
    )
    .await;
    assert!(output.status.success(), "{}", output_text(&output));
}
