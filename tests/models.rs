//! Routing by the requested model: `[[routes]] model`, `served_model` rewriting, stickiness by
//! the body's `user`, `GET /v1/models`, and weir's errors in OpenAI's shape — on both front ends
//! (the HTTP/1 relay, and the general path that chunked bodies and `http1_fast_path = false`
//! take).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use http::{Method, StatusCode};
use serde_json::{json, Value};

use common::*;

/// Two models on one path, each split 50/50 between its own versions; chat@v2 knows its model
/// by another name.
const TWO_MODELS: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{c1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{c2}"]
served_model = "chat-2024-07-15"

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
prefix = "/v1"
model = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "50%"
allow_override = true

[[routes]]
name = "embed"
prefix = "/v1"
model = ["embed", "embed-large"]
model_header = "x-model"
stable = "embed@e1"
candidate = "embed@e2"
weight = "50%"
"#;

struct Setup {
    weir: Weir,
    _backends: Vec<Backend>,
}

/// weir with [`TWO_MODELS`] over echo backends; `relay` false turns the HTTP/1 relay off.
async fn two_models(relay: bool) -> Setup {
    let backends = vec![
        Backend::echo("c1").await,
        Backend::echo("c2").await,
        Backend::echo("e1").await,
        Backend::echo("e2").await,
    ];
    let urls: Vec<String> = backends.iter().map(Backend::url).collect();
    let listener =
        format!("[listener]\naddr = \"127.0.0.1:0\"\nhttp1_fast_path = {relay}\n{TWO_MODELS}");
    let weir = Weir::start(
        &listener,
        &[
            ("c1", &urls[0]),
            ("c2", &urls[1]),
            ("e1", &urls[2]),
            ("e2", &urls[3]),
        ],
    )
    .await;
    Setup {
        weir,
        _backends: backends,
    }
}

/// POSTs `body` to `path`: with Content-Length, or chunked (which the general path serves).
async fn post(
    weir: &Weir,
    path: &str,
    body: &str,
    chunked: bool,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = request(Method::POST, &weir.url(path)).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let text = body.to_string();
    let body = if chunked {
        let (tx, body) = channel_body(4);
        let bytes = bytes::Bytes::from(text);
        tokio::spawn(async move {
            // Two chunks: the model may straddle them.
            let mid = bytes.len() / 2;
            let _ = tx.send(bytes.slice(..mid)).await;
            let _ = tx.send(bytes.slice(mid..)).await;
        });
        body
    } else {
        full(text)
    };
    send(&http1(), req.body(body).unwrap()).await
}

/// The body the echo backend received, as JSON.
fn received(reply: &Reply) -> Value {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let echo = reply.json();
    serde_json::from_str(echo["body"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("the backend got a body that is not JSON ({e}): {echo}"))
}

fn chat(model: &str, content: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": content}]}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_on_one_path_are_each_split_between_their_own_versions() {
    for (relay, chunked) in [(true, false), (true, true), (false, false)] {
        let setup = two_models(relay).await;
        let mut served: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for i in 0..80 {
            let model = ["chat", "embed", "embed-large"][i % 3];
            let reply = post(
                &setup.weir,
                "/v1/chat/completions",
                &chat(model, &format!("hello {i}")),
                chunked,
                &[],
            )
            .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            let family = if model == "chat" { "chat" } else { "embed" };
            served
                .entry(family)
                .or_default()
                .insert(reply.served_by().to_string());
        }
        assert_eq!(
            served["chat"],
            BTreeSet::from(["chat@v1".to_string(), "chat@v2".to_string()]),
            "relay {relay}, chunked {chunked}: chat is split between its versions only"
        );
        assert_eq!(
            served["embed"],
            BTreeSet::from(["embed@e1".to_string(), "embed@e2".to_string()]),
            "relay {relay}, chunked {chunked}: embed is split between its versions only"
        );
        // The model header names the model without the body.
        let reply = post(
            &setup.weir,
            "/v1/embeddings",
            "not json at all",
            chunked,
            &[("x-model", "embed")],
        )
        .await;
        assert!(reply.served_by().starts_with("embed@"), "{}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_naming_no_served_model_get_errors_an_openai_sdk_can_read() {
    for (relay, chunked) in [(true, false), (true, true), (false, false)] {
        let setup = two_models(relay).await;
        let weir = &setup.weir;
        let cases: [(&str, u16, &str, &str); 7] = [
            (
                &chat("gpt-4o", "hi"),
                404,
                "model_not_found",
                "\"chat\", \"embed\", \"embed-large\"",
            ),
            (
                r#"{"messages": []}"#,
                400,
                "missing_model",
                "names no \"model\"",
            ),
            (
                r#"{"meta": {"model": "chat"}}"#,
                400,
                "missing_model",
                "names no \"model\"",
            ),
            ("model=chat", 400, "bad_body", "not a JSON object"),
            (
                r#"{"model": "chat", "model": "embed"}"#,
                400,
                "bad_body",
                "twice",
            ),
            (r#"{"model": ["chat"]}"#, 400, "bad_body", "not a string"),
            (r#"{"model": "chat""#, 400, "bad_body", "ends before"),
        ];
        for (body, status, code, says) in cases {
            let reply = post(weir, "/v1/chat/completions", body, chunked, &[]).await;
            let what = format!("relay {relay}, chunked {chunked}, body {body}");
            assert_eq!(reply.status.as_u16(), status, "{what}: {}", reply.text());
            let error = &reply.json()["error"];
            assert_eq!(error["code"], code, "{what}: {}", reply.text());
            assert_eq!(error["param"], "model", "{what}: {}", reply.text());
            let expected_type = if status == 404 {
                "not_found_error"
            } else {
                "invalid_request_error"
            };
            assert_eq!(error["type"], expected_type, "{what}");
            let message = error["message"].as_str().unwrap_or_default();
            assert!(message.contains(says), "{what}: {message}");
            assert_eq!(
                reply.json()["kind"],
                code,
                "weir's kind is kept beside the error"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_model_replaces_the_model_the_backend_sees_wherever_the_body_names_it() {
    let bodies = [
        // First key, plain.
        chat("chat", "one"),
        // Not the first key, with a nested "model" that must stay as it is.
        r#"{"messages": [{"role": "user", "content": "two", "model": "chat"}], "temperature": 0.5, "model": "chat", "stream": false}"#.to_string(),
        // An escaped key and value.
        r#"{"m\u006fdel": "ch\u0061t", "messages": []}"#.to_string(),
    ];
    for (relay, chunked) in [(true, false), (true, true), (false, false)] {
        let setup = two_models(relay).await;
        for body in &bodies {
            let what = format!("relay {relay}, chunked {chunked}, body {body}");
            let candidate = post(
                &setup.weir,
                "/v1/chat/completions",
                body,
                chunked,
                &[("x-weir-version", "candidate")],
            )
            .await;
            assert_eq!(candidate.served_by(), "chat@v2", "{what}");
            let seen = received(&candidate);
            assert_eq!(seen["model"], "chat-2024-07-15", "{what}: {seen}");
            let mut sent: Value = serde_json::from_str(body).unwrap();
            sent["model"] = json!("chat-2024-07-15");
            assert_eq!(seen, sent, "{what}: only the model changed");
            let echo = candidate.json();
            let raw = echo["body"].as_str().unwrap();
            if !chunked {
                assert_eq!(
                    echoed_header(&echo, "content-length"),
                    [raw.len().to_string()],
                    "{what}: Content-Length is the new body's"
                );
            }
            // Stable has no served_model: its body is the client's, byte for byte.
            let stable = post(
                &setup.weir,
                "/v1/chat/completions",
                body,
                chunked,
                &[("x-weir-version", "stable")],
            )
            .await;
            assert_eq!(stable.served_by(), "chat@v1");
            assert_eq!(stable.json()["body"], body.as_str(), "{what}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_passes_through_a_route_by_model() {
    // Streams its answer as SSE events, each naming the model the request body asked for.
    let sse = Backend::start(|req: http::Request<hyper::body::Incoming>| async move {
        use http_body_util::BodyExt;
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let asked: Value = serde_json::from_slice(&body).unwrap();
        let model = asked["model"].as_str().unwrap_or_default().to_string();
        let (tx, body) = channel_body(8);
        tokio::spawn(async move {
            for i in 0..5 {
                let event = format!(
                    "data: {{\"model\": {model:?}, \"choices\": [{{\"delta\": {{\"content\": \"t{i}\"}}}}]}}\n\n"
                );
                if tx.send(bytes::Bytes::from(event)).await.is_err() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let _ = tx
                .send(bytes::Bytes::from_static(b"data: [DONE]\n\n"))
                .await;
        });
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap()
    })
    .await;
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{b}"]
served_model = "chat-2024-07-15"

[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
"#;
    let weir = Weir::start(config, &[("b", &sse.url())]).await;
    let req = request(Method::POST, &weir.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(full(r#"{"model": "chat", "stream": true, "messages": []}"#))
        .unwrap();
    let response = http1().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = EventReader::new(response.into_body());
    let mut got = Vec::new();
    while let Some(event) = events.next(DEADLINE).await {
        got.push(event);
    }
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got[5].contains("[DONE]"), "{got:?}");
    assert!(
        got[..5]
            .iter()
            .all(|e| e.contains("\"model\": \"chat-2024-07-15\"")),
        "the streamed request reached the backend under its served name: {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirrored_request_reaches_the_candidate_under_its_own_model_name() {
    let stable = RecordingBackend::start(|_seen| async { http::Response::new(full("{}")) }).await;
    let shadow = RecordingBackend::start(|_seen| async { http::Response::new(full("{}")) }).await;
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{s}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{c}"]
served_model = "chat-2024-07-15"

[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = 0
mirror = "100%"
"#;
    let weir = Weir::start(config, &[("s", &stable.url()), ("c", &shadow.url())]).await;
    let body = r#"{"messages": [], "model": "chat", "n": 1}"#;
    for chunked in [false, true] {
        let reply = post(&weir, "/v1/chat/completions", body, chunked, &[]).await;
        assert_eq!(reply.served_by(), "chat@v1");
    }
    assert_eventually!(within DEADLINE, shadow.count() == 2, "the shadows never arrived");
    for seen in stable.seen() {
        assert_eq!(seen.body, body.as_bytes(), "stable gets the client's body");
    }
    for seen in shadow.seen() {
        assert_eq!(seen.header("x-weir-shadow"), Some("1"));
        let got: Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(
            got,
            json!({"messages": [], "model": "chat-2024-07-15", "n": 1})
        );
        assert_eq!(
            seen.header("content-length"),
            Some(seen.body.len().to_string().as_str())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_upload_is_routed_from_its_first_bytes_and_forwarded_intact() {
    let hasher = Backend::start(|req: http::Request<hyper::body::Incoming>| async move {
        let (len, digest) = hash_body(req.into_body()).await;
        http::Response::new(full(format!("{len} {digest}")))
    })
    .await;
    let config = r#"
[listener]
addr = "127.0.0.1:0"
max_request_body = "64MiB"

[[versions]]
model = "chat"
version = "v1"
backends = ["{b}"]

[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
"#;
    let weir = Weir::start(config, &[("b", &hasher.url())]).await;
    // 16 MiB: the model first, then a long string; sent in 64 KiB chunks.
    let mut body = br#"{"model": "chat", "input": ""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', 16 * 1024 * 1024));
    body.extend_from_slice(br#""}"#);
    let expected = format!("{} {}", body.len(), sha256(&body));
    let body = bytes::Bytes::from(body);
    for chunked in [false, true] {
        let (tx, stream) = channel_body(4);
        let chunks = body.clone();
        tokio::spawn(async move {
            let mut at = 0;
            while at < chunks.len() {
                let end = (at + 65536).min(chunks.len());
                if tx.send(chunks.slice(at..end)).await.is_err() {
                    return;
                }
                at = end;
            }
        });
        let mut req = request(Method::POST, &weir.url("/v1/embeddings"));
        if !chunked {
            req = req.header("content-length", body.len());
        }
        let reply = send(&http1(), req.body(stream).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.text(), expected, "chunked {chunked}");
    }
    // The model past the bound is not looked for.
    let mut late = br#"{"input": ""#.to_vec();
    late.extend(std::iter::repeat_n(b'x', 70 * 1024));
    late.extend_from_slice(br#"", "model": "chat"}"#);
    let reply = post(
        &weir,
        "/v1/embeddings",
        std::str::from_utf8(&late).unwrap(),
        false,
        &[],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(reply.text().contains("max_body_scan"), "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_user_keeps_its_version_across_requests_and_replicas() {
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "50%"
sticky_field = "user"
"#;
    let backends = [("v1", v1.url()), ("v2", v2.url())];
    let backends: Vec<(&str, &str)> = backends.iter().map(|(n, u)| (*n, u.as_str())).collect();
    let replicas = [
        Weir::start(config, &backends).await,
        Weir::start(config, &backends).await,
    ];
    let mut versions = BTreeSet::new();
    for user in 0..24 {
        let body =
            json!({"model": "chat", "user": format!("user-{user}"), "messages": []}).to_string();
        let mut seen = BTreeSet::new();
        for i in 0..6 {
            let reply = post(
                &replicas[i % 2],
                "/v1/chat/completions",
                &body,
                i % 3 == 0,
                &[],
            )
            .await;
            seen.insert(reply.served_by().to_string());
        }
        assert_eq!(
            seen.len(),
            1,
            "user-{user} moved between versions: {seen:?}"
        );
        versions.extend(seen);
    }
    assert_eq!(
        versions.len(),
        2,
        "both versions serve some users: {versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_list_comes_from_weir_or_from_stable_never_from_a_random_version() {
    let setup = two_models(true).await;
    let reply = get(&http1(), &setup.weir.url("/v1/models")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let list = reply.json();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["chat", "embed", "embed-large"]);
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["object"] == "model"));

    // Without routes by model (quick mode's one route), stable answers: never split.
    let (v1, v2) = (Backend::named("v1").await, Backend::named("v2").await);
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{v2}"]

[[routes]]
name = "default"
prefix = "/"
stable = "chat@v1"
candidate = "chat@v2"
weight = "50%"
"#;
    let weir = Weir::start(config, &[("v1", &v1.url()), ("v2", &v2.url())]).await;
    for _ in 0..30 {
        let reply = get(&http1(), &weir.url("/v1/models")).await;
        assert_eq!(reply.served_by(), "chat@v1");
    }
    assert_eq!(v2.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_without_a_model_keep_the_plain_error_shape_and_can_opt_in() {
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{dead}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{dead}"]

[[routes]]
name = "plain"
prefix = "/plain"
stable = "chat@v1"

[[routes]]
name = "openai"
prefix = "/v1"
api = "openai"
stable = "chat@v2"
"#;
    let weir = Weir::start(config, &[("dead", &refused_url())]).await;
    let plain = get(&http1(), &weir.url("/plain/x")).await;
    assert_weir_error(&plain, 502, "connect", Some("chat@v1"));
    let openai = get(&http1(), &weir.url("/v1/chat/completions")).await;
    assert_eq!(openai.status, StatusCode::BAD_GATEWAY);
    let body = openai.json();
    assert_eq!(body["error"]["code"], "connect", "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chat@v2"),
        "{body}"
    );
    assert_eq!(body["version"], "chat@v2");
}

#[test]
fn bad_model_routing_config_is_refused_with_the_key() {
    let text = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["http://127.0.0.1:9"]

[[routes]]
name = "a"
prefix = "/v1"
model = ["chat", "chat"]
stable = "chat@v1"
sticky_field = "model"

[[routes]]
name = "b"
prefix = "/v1"
model = "chat"
api = "grpc"
stable = "chat@v1"

[[routes]]
name = "c"
prefix = "/c"
model_header = "x-model"
stable = "chat@v1"
"#;
    let e = weir::Config::from_toml_str(text, "t.toml")
        .unwrap_err()
        .to_string();
    for wanted in [
        "routes[0].model: \"chat\" is listed twice",
        "routes[0].sticky_field",
        "routes[1].model: route \"a\" serves \"chat\" on the same path already",
        "routes[1].api: expected \"openai\" or \"plain\"",
        "routes[2].model_header: only used with model",
    ] {
        assert!(e.contains(wanted), "missing {wanted:?} in:\n{e}");
    }
}

/// The Python that has the official `openai` SDK: `WEIR_PYTHON`, or the venv `.ci/run` makes.
fn sdk_python() -> std::path::PathBuf {
    let python = std::env::var_os("WEIR_PYTHON").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ci-venv/bin/python"),
        std::path::PathBuf::from,
    );
    assert!(
        python.exists(),
        "{} is missing: run .ci/run once (it installs the openai SDK into target/ci-venv), or set WEIR_PYTHON",
        python.display()
    );
    python
}

/// What the SDK script reports: per model the versions that answered, plainly and streamed, the
/// error of an unknown model and the models list.
const SDK_SCRIPT: &str = r#"
import json, sys
from openai import OpenAI, NotFoundError
client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
out = {}
for model in ["chat", "embed"]:
    served = set()
    for i in range(24):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"hello {i}"}])
        served.add(r.model)
        assert r.choices[0].message.content, r
    out[model] = sorted(served)
    streamed, text = set(), ""
    for chunk in client.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "tell me"}]):
        streamed.add(chunk.model)
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    out[model + "_stream"] = {"models": sorted(streamed), "text": text}
try:
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    out["unknown"] = None
except NotFoundError as e:
    out["unknown"] = {"status": e.status_code, "code": e.code, "param": e.param, "message": e.body["message"]}
out["models"] = [m.id for m in client.models.list().data]
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_sdk_reaches_two_models_through_one_path() {
    let python = sdk_python();
    let chat1 = DemoBackend::spawn(&["--model", "chat", "--version", "v1"]);
    let chat2 = DemoBackend::spawn(&["--model", "chat", "--version", "v2", "--token-delay", "5ms"]);
    let embed = DemoBackend::spawn(&["--model", "embed", "--version", "e1"]);
    let config = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{c1}"]

[[versions]]
model = "chat"
version = "v2"
backends = ["{c2}"]
served_model = "chat-2024-07-15"

[[versions]]
model = "embed"
version = "e1"
backends = ["{e1}"]

[[routes]]
name = "chat"
prefix = "/v1"
model = "chat"
stable = "chat@v1"
candidate = "chat@v2"
weight = "50%"

[[routes]]
name = "embed"
prefix = "/v1"
model = "embed"
stable = "embed@e1"
"#;
    let weir = Weir::start(
        config,
        &[("c1", &chat1.url), ("c2", &chat2.url), ("e1", &embed.url)],
    )
    .await;
    let base = weir.url("");
    let base = base.trim_end_matches('/').to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .args(["-c", SDK_SCRIPT, &base])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the SDK script failed:\n{stderr}");
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["chat"], json!(["chat@v1", "chat@v2"]), "{got}");
    assert_eq!(got["embed"], json!(["embed@e1"]), "{got}");
    for model in ["chat", "embed"] {
        let stream = &got[format!("{model}_stream")];
        assert_eq!(
            stream["models"].as_array().unwrap().len(),
            1,
            "one version per stream: {got}"
        );
        assert!(!stream["text"].as_str().unwrap().is_empty(), "{got}");
    }
    let unknown = &got["unknown"];
    assert_eq!(unknown["status"], 404, "{got}");
    assert_eq!(unknown["code"], "model_not_found", "{got}");
    assert_eq!(unknown["param"], "model", "{got}");
    assert!(
        unknown["message"]
            .as_str()
            .unwrap()
            .contains("\"gpt-4o\" is not served"),
        "{got}"
    );
    assert_eq!(got["models"], json!(["chat", "embed"]), "{got}");
}
