//! Shadow traffic through the real proxy: stable-routed requests copied to the candidate with
//! `x-weir-shadow: 1`, answers compared (text, plain and streamed; vector; exact; json) into
//! counters and a rolling agreement rate, the bounds (in-flight permits, body cap, timeout) that
//! keep a shadow from ever costing a client anything, disagreement samples, and config checks.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::watch;

const ROUTE: &str = "chat";
const STABLE: &str = "chat@v1";
const CANDIDATE: &str = "chat@v2";

/// A prompt containing this word makes the candidate answer differently from the stable.
const DIVERGE: &str = "DIVERGE";

/// One route, `chat@v1` stable, `chat@v2` candidate at weight 0 mirrored 100%, plus
/// `route_keys` on the route and `shadow` (a `[shadow]` table or "") in front.
fn config(route_keys: &str, shadow: &str) -> String {
    format!(
        r#"
{shadow}

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
mirror = "100%"
{route_keys}
"#
    )
}

async fn start(config: &str, v1: &str, v2: &str) -> Weir {
    Weir::start(config, &[("v1", v1), ("v2", v2)]).await
}

// === metrics and routes ===

/// Every non-zero `weir_mirror_requests_total` outcome of (route, candidate).
async fn outcomes(weir: &Weir, route: &str, candidate: &str) -> BTreeMap<String, u64> {
    let scrape = weir.metrics().await;
    let mut found = BTreeMap::new();
    for outcome in ["sent", "dropped", "too_large", "failed", "timeout"] {
        let labels = [
            ("route", route),
            ("version", candidate),
            ("outcome", outcome),
        ];
        let n = metric(&scrape, "weir_mirror_requests_total", &labels).unwrap_or(0.0) as u64;
        if n > 0 {
            found.insert(outcome.to_string(), n);
        }
    }
    found
}

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

/// Every non-zero `weir_mirror_comparisons_total` of (route, candidate), as
/// `"comparator/result" -> count`.
async fn comparisons(weir: &Weir, route: &str, candidate: &str) -> BTreeMap<String, u64> {
    let scrape = weir.metrics().await;
    let mut found = BTreeMap::new();
    for comparator in ["status", "exact", "json", "text", "vector"] {
        for result in ["agree", "disagree", "error"] {
            let labels = [
                ("route", route),
                ("version", candidate),
                ("comparator", comparator),
                ("result", result),
            ];
            let n = metric(&scrape, "weir_mirror_comparisons_total", &labels).unwrap_or(0.0) as u64;
            if n > 0 {
                found.insert(format!("{comparator}/{result}"), n);
            }
        }
    }
    found
}

/// `(agreement, compared)` of the route's `shadow` object in `GET /v1/routes`.
async fn agreement(weir: &Weir, route: &str) -> (Option<f64>, u64) {
    let shadow = weir.route(route).await["shadow"].clone();
    assert!(shadow.is_object(), "route {route} has no shadow: {shadow}");
    (
        shadow["agreement"].as_f64(),
        shadow["compared"].as_u64().expect("shadow.compared"),
    )
}

// === model backends ===

fn chat_request(prompt: &str, stream: bool) -> String {
    json!({
        "model": "chat",
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
    })
    .to_string()
}

fn chat_answer(version: &str, content: &str) -> Response<Body> {
    let body = json!({
        "id": format!("chatcmpl-{version}"),
        "object": "chat.completion",
        "model": format!("chat@{version}"),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": "stop",
        }],
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-backend", version)
        .body(full(body.to_string()))
        .unwrap()
}

/// The answer streamed as OpenAI chat chunks, one `data:` event per word, each in its own
/// body frame, then `data: [DONE]`.
fn chat_stream(version: &str, content: &str) -> Response<Body> {
    let mut events: Vec<String> = content
        .split_inclusive(' ')
        .map(|piece| {
            let chunk = json!({
                "id": format!("chatcmpl-{version}"),
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": piece}}],
            });
            format!("data: {chunk}\n\n")
        })
        .collect();
    events.push("data: [DONE]\n\n".to_string());
    let (tx, body) = channel_body(events.len());
    for event in events {
        tx.try_send(Bytes::from(event))
            .expect("the channel holds every event");
    }
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("x-backend", version)
        .body(body)
        .unwrap()
}

/// What the stable model says to `prompt`; the candidate says the same unless the prompt
/// contains [`DIVERGE`].
fn stable_text(prompt: &str) -> String {
    format!("You asked about {prompt}; the answer is forty two, as always.")
}

fn candidate_text(prompt: &str) -> String {
    if prompt.contains(DIVERGE) {
        "Bananas are yellow and grow in bunches on tall plants.".to_string()
    } else {
        stable_text(prompt)
    }
}

/// A chat backend for `version`: answers `text(prompt)`, streamed when the request asks.
async fn chat_backend(version: &'static str, text: fn(&str) -> String) -> RecordingBackend {
    RecordingBackend::start(move |seen| async move {
        let request: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
        if request["stream"] == true {
            chat_stream(version, &text(prompt))
        } else {
            chat_answer(version, &text(prompt))
        }
    })
    .await
}

async fn stable_and_candidate() -> (RecordingBackend, RecordingBackend) {
    (
        chat_backend("v1", stable_text).await,
        chat_backend("v2", candidate_text).await,
    )
}

/// A backend answering every request `200 {body}` with `x-backend: version`.
async fn fixed_backend(version: &'static str, body: fn(&Seen) -> Vec<u8>) -> RecordingBackend {
    RecordingBackend::start(move |seen| async move {
        Response::builder()
            .header("content-type", "application/json")
            .header("x-backend", version)
            .body(full(body(&seen)))
            .unwrap()
    })
    .await
}

/// POSTs `body` to `path` and returns the full reply, asserting it is the stable's 200.
async fn post_stable(weir: &Weir, path: &str, body: String) -> Reply {
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url(path))
            .header("content-type", "application/json")
            .body(full(body))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "POST {path}: {}", reply.text());
    assert_eq!(reply.served_by(), STABLE, "POST {path}");
    assert_eq!(reply.header("x-backend"), Some("v1"), "POST {path}");
    reply
}

async fn chat(weir: &Weir, prompt: &str, stream: bool) -> Reply {
    post_stable(weir, "/v1/chat/completions", chat_request(prompt, stream)).await
}

// === comparisons ===

async fn text_agreement(stream: bool) {
    let (v1, v2) = stable_and_candidate().await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    let shadow = weir.route(ROUTE).await["shadow"].clone();
    assert_eq!(shadow["mirror"], 10000, "{shadow}");
    assert_eq!(shadow["mirror_percent"], "100%", "{shadow}");
    assert_eq!(agreement(&weir, ROUTE).await, (None, 0));

    let reply = chat(&weir, "the meaning of life", stream).await;
    if stream {
        assert_eq!(reply.header("content-type"), Some("text/event-stream"));
        assert!(
            reply.text().ends_with("data: [DONE]\n\n"),
            "{}",
            reply.text()
        );
    } else {
        let content = &reply.json()["choices"][0]["message"]["content"];
        assert_eq!(content, &stable_text("the meaning of life"));
    }
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("text/agree", 1)]),
        "equal answers (stream: {stream})"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(1.0), 1));

    chat(&weir, &format!("the meaning of life {DIVERGE}"), stream).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 2), ("text/agree", 1), ("text/disagree", 1)]),
        "different answers (stream: {stream})"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(0.5), 2));
    assert_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 2)])
    );
    // Each request reached the candidate once, as a shadow: it serves no live traffic here.
    let shadows = v2.seen();
    assert_eq!(shadows.len(), 2);
    assert!(shadows
        .iter()
        .all(|s| s.header("x-weir-shadow") == Some("1")));
    assert!(v1
        .seen()
        .iter()
        .all(|s| s.header("x-weir-shadow").is_none()));

    // A weight change rebuilds the table; the rolling agreement is kept.
    let generation = weir.generation().await;
    let reply = weir
        .admin(
            Method::PUT,
            "/v1/routes/chat/weight",
            Some(r#"{"basis_points": 1}"#),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eventually!(weir.generation().await > generation);
    assert_eq!(agreement(&weir, ROUTE).await, (Some(0.5), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_chat_answers_agree_and_different_ones_disagree() {
    text_agreement(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_streamed_chat_answers_agree_and_different_ones_disagree() {
    text_agreement(true).await;
}

/// `weir_mirror_agreement_ratio` and `weir_mirror_agreement_comparisons` of (route, candidate).
async fn agreement_gauges(weir: &Weir, route: &str, candidate: &str) -> (Option<f64>, Option<f64>) {
    let scrape = weir.metrics().await;
    let labels = [("route", route), ("version", candidate)];
    (
        metric(&scrape, "weir_mirror_agreement_ratio", &labels),
        metric(&scrape, "weir_mirror_agreement_comparisons", &labels),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agreement_gauge_shows_what_routes_and_the_gate_see() {
    let (v1, v2) = stable_and_candidate().await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    // No comparison yet: no ratio either (0 would read as "nothing agrees").
    assert_eq!(
        agreement_gauges(&weir, ROUTE, CANDIDATE).await,
        (None, None)
    );

    // Status agrees, text does not: the answer disagrees as a whole. A per-comparator average
    // would show 50% here.
    chat(&weir, &format!("a question {DIVERGE}"), false).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("text/disagree", 1)]),
        "one diverging answer"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(0.0), 1));
    assert_eq!(
        agreement_gauges(&weir, ROUTE, CANDIDATE).await,
        (Some(0.0), Some(1.0))
    );

    chat(&weir, "a question", false).await;
    assert_eventually_eq!(
        agreement(&weir, ROUTE).await,
        (Some(0.5), 2),
        "one agreeing answer more"
    );
    assert_eq!(
        agreement_gauges(&weir, ROUTE, CANDIDATE).await,
        (Some(0.5), Some(2.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_sent_chunked_is_compared_by_its_content_not_its_framing() {
    // The stable's answer reaches weir chunked, split mid-JSON across frames; the candidate's
    // has a Content-Length. Only the content counts.
    let v1 = RecordingBackend::start(|seen| async move {
        let request: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
        let whole =
            http_body_util::BodyExt::collect(chat_answer("v1", &stable_text(prompt)).into_body())
                .await;
        let text = String::from_utf8(whole.unwrap().to_bytes().to_vec()).unwrap();
        let (tx, body) = channel_body(3);
        let third = text.len() / 3;
        for piece in [&text[..third], &text[third..2 * third], &text[2 * third..]] {
            tx.try_send(Bytes::from(piece.to_string())).unwrap();
        }
        Response::builder()
            .header("content-type", "application/json")
            .header("x-backend", "v1")
            .body(body)
            .unwrap()
    })
    .await;
    let v2 = chat_backend("v2", candidate_text).await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    let reply = chat(&weir, "the meaning of life", false).await;
    assert_eq!(
        reply.json()["choices"][0]["message"]["content"],
        stable_text("the meaning of life")
    );
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("text/agree", 1)]),
        "the same answer, chunked on one side"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_compared_with_a_plain_one_by_its_text() {
    // The stable streams, the candidate answers in one JSON body: same text, so they agree.
    let v1 = RecordingBackend::start(|seen| async move {
        let request: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        chat_stream(
            "v1",
            &stable_text(request["messages"][0]["content"].as_str().unwrap_or("")),
        )
    })
    .await;
    let v2 = RecordingBackend::start(|seen| async move {
        let request: Value = serde_json::from_slice(&seen.body).unwrap_or(Value::Null);
        let prompt = request["messages"][0]["content"].as_str().unwrap_or("");
        chat_answer("v2", &candidate_text(prompt))
    })
    .await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    chat(&weir, "tea", true).await;
    chat(&weir, &format!("tea {DIVERGE}"), true).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 2), ("text/agree", 1), ("text/disagree", 1)]),
        "stream against plain JSON"
    );
}

fn embedding_of(seen: &Seen, diverge: bool) -> Vec<u8> {
    let vector = if diverge && String::from_utf8_lossy(&seen.body).contains(DIVERGE) {
        [0.3, -0.2, 0.1, 0.0]
    } else if diverge {
        // Not byte-identical, but pointing the same way (cosine ≈ 0.99999).
        [0.1001, 0.2, 0.3, 0.4]
    } else {
        [0.1, 0.2, 0.3, 0.4]
    };
    json!({"object": "list", "data": [{"index": 0, "embedding": vector}]})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_compared_by_cosine_similarity() {
    let v1 = fixed_backend("v1", |seen| embedding_of(seen, false)).await;
    let v2 = fixed_backend("v2", |seen| embedding_of(seen, true)).await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    let input = |text: &str| json!({"model": "chat", "input": text}).to_string();

    let reply = post_stable(&weir, "/v1/embeddings", input("hello")).await;
    assert_eq!(reply.json()["data"][0]["embedding"][0], 0.1);
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("vector/agree", 1)]),
        "nearly equal embeddings"
    );
    post_stable(&weir, "/v1/embeddings", input(DIVERGE)).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[
            ("status/agree", 2),
            ("vector/agree", 1),
            ("vector/disagree", 1)
        ]),
        "orthogonal-ish embeddings"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(0.5), 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_exact_comparator_replaces_the_path_default() {
    // A completions path would get status + text by default; the route asks for exact only.
    let body = |seen: &Seen| {
        let request = String::from_utf8_lossy(&seen.body).into_owned();
        format!("{{\"echo\":{request:?}}}").into_bytes()
    };
    let v1 = fixed_backend("v1", body).await;
    let v2 = fixed_backend("v2", |seen| {
        if String::from_utf8_lossy(&seen.body).contains(DIVERGE) {
            b"{\"echo\":\"something else\"}".to_vec()
        } else {
            let request = String::from_utf8_lossy(&seen.body).into_owned();
            format!("{{\"echo\":{request:?}}}").into_bytes()
        }
    })
    .await;
    let weir = start(
        &config(r#"comparators = ["exact"]"#, ""),
        &v1.url(),
        &v2.url(),
    )
    .await;
    post_stable(&weir, "/v1/completions", "same".into()).await;
    post_stable(&weir, "/v1/completions", DIVERGE.into()).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("exact/agree", 1), ("exact/disagree", 1)]),
        "exact comparator"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(0.5), 2));
}

/// A classifier's answer: score 0.5 from the stable; 0.5004 from the candidate, or 0.9 when the
/// request contains [`DIVERGE`].
fn score_answer(seen: &Seen, candidate: bool) -> Vec<u8> {
    let score = match (
        candidate,
        String::from_utf8_lossy(&seen.body).contains(DIVERGE),
    ) {
        (false, _) => 0.5,
        (true, false) => 0.5004,
        (true, true) => 0.9,
    };
    json!({"label": "positive", "score": score})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_paths_default_to_exact_and_json_compares_pointers_within_tolerance() {
    let v1 = fixed_backend("v1", |seen| score_answer(seen, false)).await;
    let v2 = fixed_backend("v2", |seen| score_answer(seen, true)).await;

    // No comparators configured: /v1/classify gets status + exact, and 0.5 vs 0.5004 differ.
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    post_stable(&weir, "/v1/classify", "a".into()).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("exact/disagree", 1)]),
        "default comparators of another path"
    );

    let keys = r#"
comparators = ["status", "json"]
json_pointers = ["/label", "/score"]
number_tolerance = 0.01
"#;
    let weir = start(&config(keys, ""), &v1.url(), &v2.url()).await;
    post_stable(&weir, "/v1/classify", "a".into()).await;
    post_stable(&weir, "/v1/classify", DIVERGE.into()).await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 2), ("json/agree", 1), ("json/disagree", 1)]),
        "json pointers with a tolerance"
    );
}

// === what the candidate and the client see ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_is_a_marked_copy_and_its_answer_never_reaches_the_client() {
    let v1 = fixed_backend("v1", |_| b"{\"from\":\"stable\"}".to_vec()).await;
    let v2 = RecordingBackend::start(|_| async {
        Response::builder()
            .status(StatusCode::CREATED)
            .header("x-backend", "v2")
            .header("x-candidate-only", "1")
            .body(full("{\"from\":\"candidate\"}"))
            .unwrap()
    })
    .await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;

    let body = chat_request("copy me", false);
    let reply = send(
        &http1(),
        request(
            Method::POST,
            &weir.url("/v1/chat/completions?trace=abc&n=2"),
        )
        .header("content-type", "application/json")
        .header("x-request-id", "req-7")
        .body(full(body.clone()))
        .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), STABLE);
    assert_eq!(reply.text(), "{\"from\":\"stable\"}");
    assert_eq!(reply.header("x-backend"), Some("v1"));
    assert_eq!(reply.header("x-candidate-only"), None);

    // Over HTTP/2 too: a bodiless GET, and a PUT with a body.
    let client = http2();
    let reply = get(&client, &weir.url("/v1/models?limit=3")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), STABLE);
    assert_eq!(reply.text(), "{\"from\":\"stable\"}");
    let put_body = pattern(3000, 5);
    let reply = send(
        &client,
        request(Method::PUT, &weir.url("/v1/files/7"))
            .body(full(put_body.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.served_by(), STABLE);

    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 3)]),
        "all three requests mirrored"
    );
    let stable = v1.seen();
    let shadows = v2.seen();
    assert_eq!(shadows.len(), 3, "{shadows:?}");
    // Shadows run on their own; they may reach the candidate in any order.
    let find = |method: Method| {
        shadows
            .iter()
            .find(|s| s.method == method)
            .unwrap_or_else(|| panic!("no {method} shadow in {shadows:?}"))
    };
    let (post, get, put) = (find(Method::POST), find(Method::GET), find(Method::PUT));
    assert_eq!(put.target, "/v1/files/7");
    assert_eq!(put.body, put_body);
    assert_eq!(put.header("x-weir-shadow"), Some("1"));
    assert_eq!(post.method, Method::POST);
    assert_eq!(post.target, "/v1/chat/completions?trace=abc&n=2");
    assert_eq!(post.body, body.as_bytes());
    assert_eq!(post.header("x-weir-shadow"), Some("1"));
    assert_eq!(post.header("x-request-id"), Some("req-7"));
    assert_eq!(post.header("content-type"), Some("application/json"));
    assert_eq!(get.method, Method::GET);
    assert_eq!(get.target, "/v1/models?limit=3");
    assert!(get.body.is_empty());
    assert_eq!(get.header("x-weir-shadow"), Some("1"));
    // The stable got the same requests, unmarked.
    assert_eq!(stable.len(), 3);
    assert_eq!(stable[0].target, post.target);
    assert_eq!(stable[0].body, post.body);
    assert!(stable.iter().all(|s| s.header("x-weir-shadow").is_none()));
    // 201 vs 200 is the same status class; the bodies differ.
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[
            ("status/agree", 3),
            ("text/error", 1),
            ("exact/disagree", 2)
        ]),
        "comparisons of the two shadows"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_the_candidate_serves_are_not_mirrored() {
    let v1 = Backend::named("v1").await;
    let v2 = RecordingBackend::start(|_| async { Response::new(full("v2")) }).await;
    let weir = start(&config("allow_override = true", ""), &v1.url(), &v2.url()).await;

    let pinned = get_with(&http1(), &weir.url("/x"), &[("x-weir-version", CANDIDATE)]).await;
    assert_eq!(pinned.served_by(), CANDIDATE);
    let reply = get(&http1(), &weir.url("/y")).await;
    assert_eq!(reply.served_by(), STABLE);
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 1)]),
        "only the stable-routed request is mirrored"
    );
    let seen: Vec<_> = v2
        .seen()
        .iter()
        .map(|s| {
            (
                s.target.clone(),
                s.header("x-weir-shadow").map(str::to_string),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/x".to_string(), None),
            ("/y".to_string(), Some("1".to_string()))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_mirror_copies_about_that_share() {
    const REQUESTS: usize = 400;
    const WORKERS: usize = 4;
    let v1 = Backend::named("v1").await;
    let v2 = RecordingBackend::start(|_| async { Response::new(full("v1")) }).await;
    let weir = Arc::new(
        start(
            &config("", "").replace("\"100%\"", "\"25%\""),
            &v1.url(),
            &v2.url(),
        )
        .await,
    );
    let shadow = weir.route(ROUTE).await["shadow"].clone();
    assert_eq!(shadow["mirror"], 2500, "{shadow}");
    assert_eq!(shadow["mirror_percent"], "25%", "{shadow}");

    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let weir = weir.clone();
        workers.push(tokio::spawn(async move {
            let client = http1();
            for _ in (w..REQUESTS).step_by(WORKERS) {
                let reply = get(&client, &weir.url("/v1/x")).await;
                assert_eq!(reply.served_by(), STABLE);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    // Every mirrored request is answered, so `sent` settles at the candidate's count.
    assert_eventually!(
        outcomes(&weir, ROUTE, CANDIDATE).await == counts(&[("sent", v2.count() as u64)]),
        "outcomes {:?} vs {} shadows seen",
        outcomes(&weir, ROUTE, CANDIDATE).await,
        v2.count()
    );
    let mirrored = v2.count() as f64;
    let (expected, sigma) = (
        REQUESTS as f64 * 0.25,
        (REQUESTS as f64 * 0.25 * 0.75).sqrt(),
    );
    assert!(
        (mirrored - expected).abs() <= 5.0 * sigma,
        "{mirrored} of {REQUESTS} mirrored at 25%"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_without_mirror_has_no_shadow() {
    let v1 = Backend::named("v1").await;
    let v2 = RecordingBackend::start(|_| async { Response::new(full("v2")) }).await;
    let weir = start(
        &config("", "").replace("mirror = \"100%\"", ""),
        &v1.url(),
        &v2.url(),
    )
    .await;
    assert_eq!(weir.route(ROUTE).await["shadow"], Value::Null);
    for _ in 0..5 {
        assert_eq!(get(&http1(), &weir.url("/v1/x")).await.served_by(), STABLE);
    }
    // A shadow starts before its stable request is forwarded, so one more round trip is ample
    // time for a stray one to reach the candidate.
    assert_eq!(get(&http1(), &weir.url("/v1/x")).await.served_by(), STABLE);
    assert_eq!(v2.count(), 0);
    assert!(outcomes(&weir, ROUTE, CANDIDATE).await.is_empty());
}

// === failures of the candidate ===

/// Sends `n` chat requests one by one; each must be the stable's 200 within `within`.
async fn chats_answered_promptly(weir: &Weir, path: &str, n: usize, within: Duration) {
    for i in 0..n {
        let started = Instant::now();
        post_stable(weir, path, chat_request(&format!("question {i}"), false)).await;
        let took = started.elapsed();
        assert!(
            took < within,
            "{path} request {i} took {took:?}; a client must not wait for its shadow"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_never_fails_or_delays_a_client() {
    let v1 = chat_backend("v1", stable_text).await;
    let reset = RawBackend::start(b"").await;
    let garbage = RawBackend::start(b"this is not HTTP at all\r\n\r\n").await;
    let erroring = RecordingBackend::start(|_| async {
        Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(full("{\"error\":\"boom\"}"))
            .unwrap()
    })
    .await;
    let mut text = String::from(
        r#"
[shadow]
timeout = "5s"

[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]
"#,
    );
    let candidates = [
        ("refused", refused_url()),
        ("reset", reset.url()),
        ("garbage", garbage.url()),
        ("erroring", erroring.url()),
    ];
    for (name, url) in &candidates {
        text.push_str(&format!(
            r#"
[[versions]]
model = "chat"
version = "{name}"
backends = ["{url}"]

[[routes]]
name = "{name}"
prefix = "/{name}"
stable = "chat@v1"
candidate = "chat@{name}"
mirror = "100%"
"#
        ));
    }
    let weir = Weir::start(&text, &[("v1", &v1.url())]).await;
    const N: usize = 4;
    for (name, _) in &candidates {
        let path = format!("/{name}/v1/chat/completions");
        chats_answered_promptly(&weir, &path, N, Duration::from_secs(1)).await;
    }
    for (name, expected) in [
        ("refused", "failed"),
        ("reset", "failed"),
        ("garbage", "failed"),
        ("erroring", "sent"),
    ] {
        let candidate = format!("chat@{name}");
        assert_eventually_eq!(
            outcomes(&weir, name, &candidate).await,
            counts(&[(expected, N as u64)]),
            "mirror outcomes of route {name}"
        );
    }
    assert!(reset.connections() > 0 && garbage.connections() > 0);
    assert_eq!(erroring.count(), N);
    // A 500 is an answer: it is compared, and its status disagrees with the stable 200.
    assert_eventually_eq!(
        comparisons(&weir, "erroring", "chat@erroring").await,
        counts(&[("status/disagree", N as u64), ("text/error", N as u64)]),
        "comparisons against a 500"
    );
    // A candidate that failed was never compared.
    assert!(comparisons(&weir, "reset", "chat@reset").await.is_empty());
}

/// A backend that receives requests and never answers them.
async fn hanging_backend() -> RecordingBackend {
    RecordingBackend::start(|_| std::future::pending::<Response<Body>>()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_candidate_never_delays_a_client_and_times_out() {
    let v1 = chat_backend("v1", stable_text).await;
    let hanging = hanging_backend().await;
    const N: usize = 3;

    // With a long shadow timeout, the clients are answered long before it could matter.
    let patient = start(
        &config("", "[shadow]\ntimeout = \"5s\""),
        &v1.url(),
        &hanging.url(),
    )
    .await;
    let path = "/v1/chat/completions";
    chats_answered_promptly(&patient, path, N, Duration::from_secs(1)).await;
    assert_eventually_eq!(hanging.active(), N, "shadows held by the candidate");
    assert!(outcomes(&patient, ROUTE, CANDIDATE).await.is_empty());

    // With a short one, every shadow is given up and counted.
    let hasty = start(
        &config("", "[shadow]\ntimeout = \"300ms\""),
        &v1.url(),
        &hanging.url(),
    )
    .await;
    chats_answered_promptly(&hasty, path, N, Duration::from_secs(1)).await;
    assert_eventually_eq!(
        outcomes(&hasty, ROUTE, CANDIDATE).await,
        counts(&[("timeout", N as u64)]),
        "mirror outcomes with a hanging candidate"
    );
    assert!(comparisons(&hasty, ROUTE, CANDIDATE).await.is_empty());
    assert_eq!(agreement(&hasty, ROUTE).await, (None, 0));
}

// === bounds ===

/// A candidate that holds every answer until `release` turns true.
async fn gated_backend(release: watch::Receiver<bool>) -> RecordingBackend {
    RecordingBackend::start(move |_| {
        let mut release = release.clone();
        async move {
            let _ = release.wait_for(|go| *go).await;
            chat_answer("v2", &stable_text("held"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadows_beyond_the_in_flight_limit_are_dropped() {
    const CLIENTS: usize = 10;
    let v1 = chat_backend("v1", stable_text).await;
    let (release, gate) = watch::channel(false);
    let v2 = gated_backend(gate).await;
    let weir = Arc::new(
        start(
            &config("", "[shadow]\nmax_in_flight = 2"),
            &v1.url(),
            &v2.url(),
        )
        .await,
    );

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let weir = weir.clone();
        clients.push(tokio::spawn(async move {
            let started = Instant::now();
            chat(&weir, &format!("client {i}"), false).await;
            started.elapsed()
        }));
    }
    for client in clients {
        let took = client.await.expect("client task");
        assert!(took < Duration::from_secs(2), "a client waited {took:?}");
    }
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("dropped", (CLIENTS - 2) as u64)]),
        "shadows over max_in_flight"
    );
    assert_eventually_eq!(v2.active(), 2, "shadows held by the candidate");
    assert_eq!(
        v2.peak(),
        2,
        "the candidate saw more concurrent shadows than allowed"
    );

    release.send(true).unwrap();
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("dropped", (CLIENTS - 2) as u64), ("sent", 2)]),
        "after the candidate answered"
    );
    // The permits came back.
    chat(&weir, "one more", false).await;
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("dropped", (CLIENTS - 2) as u64), ("sent", 3)]),
        "a shadow after the permits were returned"
    );
    assert_eq!(v2.count(), 3);
    assert!(v2.peak() <= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_body_is_counted_dropped() {
    use tokio::io::AsyncWriteExt;
    let v1 = chat_backend("v1", stable_text).await;
    let v2 = chat_backend("v2", candidate_text).await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;

    let mut conn = tokio::net::TcpStream::connect(weir.proxy).await.unwrap();
    conn.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: weir\r\ncontent-length: 1000\r\n\r\n{\"mod",
    )
    .await
    .unwrap();
    // The stable request is under way once the stable backend has it (waiting for the body).
    assert_eventually_eq!(v1.active(), 1, "stable request started");
    drop(conn);
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("dropped", 1)]),
        "a client gone before its body was complete"
    );
    assert_eq!(v2.count(), 0);
}

/// Answers depend on the path: `/v1/big-answer` gets 4 KiB from both versions, `/v1/big-stable`
/// from the stable only, `/v1/big-shadow` from the candidate only; anything else a small receipt.
fn sized_answer(seen: &Seen, candidate: bool) -> Vec<u8> {
    let big = || pattern(4096, 7).to_vec();
    match (seen.target.as_str(), candidate) {
        ("/v1/big-answer", _) | ("/v1/big-stable", false) | ("/v1/big-shadow", true) => big(),
        _ => format!("{{\"received\":{}}}", seen.body.len()).into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_cap_are_not_mirrored_and_big_answers_are_not_judged() {
    let v1 = fixed_backend("v1", |seen| sized_answer(seen, false)).await;
    let v2 = fixed_backend("v2", |seen| sized_answer(seen, true)).await;
    let weir = start(
        &config("", "[shadow]\nmax_body = \"1KiB\""),
        &v1.url(),
        &v2.url(),
    )
    .await;

    // Under the cap: mirrored whole.
    let small = pattern(512, 1);
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url("/v1/upload"))
            .body(full(small.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.text(), "{\"received\":512}");
    assert_eventually_eq!(v2.count(), 1, "the small request mirrored");
    assert_eq!(v2.seen()[0].body, small);

    // Over the cap by content-length.
    let reply = post_stable(&weir, "/v1/upload", "x".repeat(4096)).await;
    assert_eq!(reply.text(), "{\"received\":4096}");
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 1), ("too_large", 1)]),
        "a 4 KiB request with a content-length"
    );

    // Over the cap while streaming (chunked, no length known up front).
    let (tx, body) = channel_body(4);
    for k in 0..4 {
        tx.send(pattern(1024, 10 + k)).await.unwrap();
    }
    drop(tx);
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url("/v1/upload"))
            .body(body)
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.served_by(), STABLE);
    assert_eq!(reply.text(), "{\"received\":4096}");
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 1), ("too_large", 2)]),
        "a chunked 4 KiB request"
    );
    assert_eq!(v2.count(), 1, "the candidate saw an over-cap request");

    // Answers over the cap: the client gets all of it, the comparison says it cannot judge.
    let reply = get(&http1(), &weir.url("/v1/big-answer")).await;
    assert_eq!(reply.body, pattern(4096, 7));
    let reply = get(&http1(), &weir.url("/v1/big-stable")).await;
    assert_eq!(reply.body, pattern(4096, 7));
    let reply = get(&http1(), &weir.url("/v1/big-shadow")).await;
    assert_eq!(reply.text(), "{\"received\":0}");
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[
            ("status/agree", 1),
            ("exact/agree", 1),
            ("status/error", 3),
            ("exact/error", 3)
        ]),
        "comparisons with over-cap answers"
    );
    assert_eq!(agreement(&weir, ROUTE).await, (Some(1.0), 1));
    assert_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 4), ("too_large", 2)])
    );
}

// === disagreement samples ===

fn samples(weir: &Weir) -> Option<Vec<Value>> {
    let path = weir.state_dir.path().join("disagreements.jsonl");
    match std::fs::read_to_string(&path) {
        // Only complete lines: the file may be read while a sample is being appended.
        Ok(text) => Some(
            text.split_inclusive('\n')
                .filter(|l| l.ends_with('\n'))
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
                .collect(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

async fn chat_with_id(weir: &Weir, prompt: &str, id: &str) {
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url("/v1/chat/completions"))
            .header("x-request-id", id)
            .body(full(chat_request(prompt, false)))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.served_by(), STABLE, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreement_samples_are_off_by_default() {
    let (v1, v2) = stable_and_candidate().await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    chat_with_id(&weir, DIVERGE, "first").await;
    chat_with_id(&weir, DIVERGE, "second").await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 2), ("text/disagree", 2)]),
        "two disagreements"
    );
    assert_eq!(samples(&weir), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreement_samples_name_the_request_versions_and_comparator() {
    let (v1, v2) = stable_and_candidate().await;
    let weir = start(
        &config("", "[shadow]\nsamples = true"),
        &v1.url(),
        &v2.url(),
    )
    .await;
    chat_with_id(&weir, "agreeable", "agree-1").await;
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("text/agree", 1)]),
        "an agreement"
    );
    chat_with_id(&weir, DIVERGE, "disagree-1").await;
    assert_eventually!(
        samples(&weir).is_some_and(|s| !s.is_empty()),
        "no disagreement sample was written"
    );
    let lines = samples(&weir).unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let sample = &lines[0];
    assert_eq!(sample["request_id"], "disagree-1", "{sample}");
    assert_eq!(sample["route"], ROUTE, "{sample}");
    assert_eq!(sample["stable"], STABLE, "{sample}");
    assert_eq!(sample["candidate"], CANDIDATE, "{sample}");
    let disagreements = sample["disagreements"].as_array().expect("disagreements");
    assert_eq!(disagreements.len(), 1, "{sample}");
    assert_eq!(disagreements[0]["comparator"], "text", "{sample}");
    assert!(
        disagreements[0]["note"]
            .as_str()
            .is_some_and(|n| n.contains("similarity")),
        "{sample}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disagreement_samples_rotate_past_their_size_limit() {
    let (v1, v2) = stable_and_candidate().await;
    let weir = start(
        &config("", "[shadow]\nsamples = true\nsamples_max_bytes = 1"),
        &v1.url(),
        &v2.url(),
    )
    .await;
    let rotated = weir.state_dir.path().join("disagreements.jsonl.1");
    chat_with_id(&weir, DIVERGE, "one").await;
    assert_eventually!(samples(&weir).is_some(), "no first sample");
    chat_with_id(&weir, DIVERGE, "two").await;
    assert_eventually!(rotated.exists(), "the sample file was not rotated");
    assert_eventually!(
        samples(&weir).is_some_and(|s| s.len() == 1 && s[0]["request_id"] == "two"),
        "the new file does not hold just the second sample: {:?}",
        samples(&weir)
    );
    let old: Value =
        serde_json::from_str(std::fs::read_to_string(&rotated).unwrap().trim()).unwrap();
    assert_eq!(old["request_id"], "one");
}

/// Tracks a bug: an empty stable answer is never compared (see the report).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_answers_are_compared() {
    let empty_answer = |_: Seen| async {
        Response::builder()
            .header("x-backend", "any")
            .body(empty())
            .unwrap()
    };
    let v1 = RecordingBackend::start(empty_answer).await;
    let v2 = RecordingBackend::start(empty_answer).await;
    let weir = start(&config("", ""), &v1.url(), &v2.url()).await;
    let reply = get(&http1(), &weir.url("/v1/nothing")).await;
    assert_eq!(reply.served_by(), STABLE);
    assert!(reply.body.is_empty());
    assert_eventually_eq!(
        outcomes(&weir, ROUTE, CANDIDATE).await,
        counts(&[("sent", 1)]),
        "the shadow was answered"
    );
    assert_eventually_eq!(
        comparisons(&weir, ROUTE, CANDIDATE).await,
        counts(&[("status/agree", 1), ("exact/agree", 1)]),
        "two empty 200 answers"
    );
}

// === configuration ===

fn problems(text: &str) -> Vec<(String, String)> {
    match weir::Config::from_toml_str(text, "test.toml") {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e
            .problems
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect(),
    }
}

const ONE_VERSION_ROUTE: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9001"]

[[versions]]
model = "chat"
version = "v2"
backends = ["http://127.0.0.1:9002"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;

#[test]
fn mirror_without_a_candidate_is_rejected() {
    let found = problems(&format!("{ONE_VERSION_ROUTE}mirror = \"10%\"\n"));
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0, "routes[0].mirror");
    assert!(found[0].1.contains("candidate"), "{found:?}");
}

#[test]
fn bad_comparator_settings_are_rejected_with_their_paths() {
    let text = format!(
        r#"{ONE_VERSION_ROUTE}candidate = "chat@v2"
mirror = "150%"
comparators = ["status", "bleu", "json"]
text_threshold = 1.5
"#
    );
    let found = problems(&text);
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths.len(),
        4,
        "expected mirror, comparators[1], json_pointers, text_threshold: {found:?}"
    );
    for expected in [
        "routes[0].mirror",
        "routes[0].comparators[1]",
        "routes[0].json_pointers",
        "routes[0].text_threshold",
    ] {
        assert!(
            paths.contains(&expected),
            "{expected} missing from {found:?}"
        );
    }
    let comparator = found
        .iter()
        .find(|(p, _)| p == "routes[0].comparators[1]")
        .unwrap();
    assert!(comparator.1.contains("\"bleu\""), "{comparator:?}");
}

#[test]
fn mirror_and_shadow_settings_parse() {
    let text = format!(
        r#"
[shadow]
max_in_flight = 2
max_body = "1KiB"
timeout = "300ms"
samples = true
samples_max_bytes = "2KiB"
{ONE_VERSION_ROUTE}candidate = "chat@v2"
mirror = 250
comparators = ["status", "vector"]
vector_threshold = 0.9
"#
    );
    let config = weir::Config::from_toml_str(&text, "test.toml").unwrap();
    let route = &config.routes[0];
    assert_eq!(route.mirror, 250);
    assert_eq!(route.compare.vector_threshold, 0.9);
    assert_eq!(route.compare.text_threshold, 0.8);
    assert_eq!(config.shadow.max_in_flight, 2);
    assert_eq!(config.shadow.max_body, 1024);
    assert_eq!(config.shadow.timeout, Duration::from_millis(300));
    assert!(config.shadow.samples);
    assert_eq!(config.shadow.samples_max_bytes, 2048);
    let percent = text.replace("mirror = 250", "mirror = \"100%\"");
    let config = weir::Config::from_toml_str(&percent, "test.toml").unwrap();
    assert_eq!(config.routes[0].mirror, 10000);
}
