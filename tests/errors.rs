//! Backend failures become documented JSON errors with the right status and kind, are counted in
//! `weir_request_errors_total`, and a backend that refuses connections is ejected.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a misbehaving backend does with each connection.
#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Reads some of the request, then closes the socket.
    Reset,
    /// Reads the request and never answers.
    Stall,
    /// Reads the request and answers with something that is not HTTP.
    Garbage,
}

/// A raw TCP backend that misbehaves on every connection; returns its URL.
async fn misbehaving_backend(how: Misbehaviour) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut stalled = Vec::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            match how {
                Misbehaviour::Reset => drop(socket),
                Misbehaviour::Stall => stalled.push(socket),
                Misbehaviour::Garbage => {
                    let _ = socket.write_all(b"hello\r\n\r\n").await;
                    let _ = socket.shutdown().await;
                }
            }
        }
    });
    format!("http://{addr}")
}

const FAILURES: &str = r#"
[proxy]
response_header_timeout = "300ms"
backend_eject = "0s"

[[versions]]
model = "chat"
version = "refuse"
backends = ["{refuse}"]

[[versions]]
model = "chat"
version = "reset"
backends = ["{reset}"]

[[versions]]
model = "chat"
version = "stall"
backends = ["{stall}"]

[[versions]]
model = "chat"
version = "garbage"
backends = ["{garbage}"]

[[routes]]
name = "refuse"
prefix = "/refuse"
stable = "chat@refuse"

[[routes]]
name = "reset"
prefix = "/reset"
stable = "chat@reset"

[[routes]]
name = "stall"
prefix = "/stall"
stable = "chat@stall"

[[routes]]
name = "garbage"
prefix = "/garbage"
stable = "chat@garbage"
"#;

async fn failures() -> Weir {
    let refuse = refused_url();
    let reset = misbehaving_backend(Misbehaviour::Reset).await;
    let stall = misbehaving_backend(Misbehaviour::Stall).await;
    let garbage = misbehaving_backend(Misbehaviour::Garbage).await;
    Weir::start(
        FAILURES,
        &[
            ("refuse", &refuse),
            ("reset", &reset),
            ("stall", &stall),
            ("garbage", &garbage),
        ],
    )
    .await
}

/// Sends `times` requests to `/{route}/x` and checks each error, then the error counter.
async fn assert_failure(route: &str, status: u16, kind: &str, times: usize) {
    let weir = failures().await;
    let version = format!("chat@{route}");
    let client = http1();
    for _ in 0..times {
        let reply = get(&client, &weir.url(&format!("/{route}/x"))).await;
        assert_weir_error(&reply, status, kind, Some(&version));
    }
    let labels = [
        ("route", route),
        ("version", version.as_str()),
        ("kind", kind),
    ];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(times as f64),
        "weir_request_errors_total{labels:?}"
    );
}

#[tokio::test]
async fn refused_connection_is_502_connect() {
    assert_failure("refuse", 502, "connect", 3).await;
}

#[tokio::test]
async fn connection_closed_before_response_is_502_reset() {
    assert_failure("reset", 502, "reset", 3).await;
}

#[tokio::test]
async fn garbage_instead_of_http_is_502_protocol() {
    assert_failure("garbage", 502, "protocol", 3).await;
}

#[tokio::test]
async fn stalled_backend_is_504_timeout_after_response_header_timeout() {
    let weir = failures().await;
    let started = Instant::now();
    let reply = get(&http1(), &weir.url("/stall/x")).await;
    let elapsed = started.elapsed();
    assert_weir_error(&reply, 504, "timeout", Some("chat@stall"));
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(5),
        "timed out after {elapsed:?}, configured 300ms"
    );
    let labels = [
        ("route", "stall"),
        ("version", "chat@stall"),
        ("kind", "timeout"),
    ];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(1.0),
        "weir_request_errors_total{labels:?}"
    );
}

#[tokio::test]
async fn unmatched_path_is_404_no_route() {
    let weir = failures().await;
    let reply = get(&http1(), &weir.url("/elsewhere")).await;
    assert_weir_error(&reply, 404, "no_route", None);
    // Prefixes match whole segments only.
    let reply = get(&http1(), &weir.url("/refusex")).await;
    assert_weir_error(&reply, 404, "no_route", None);
}

const EJECT: &str = r#"
[proxy]
backend_eject = "30s"

[[versions]]
model = "chat"
version = "v1"
backends = ["{first}", "{second}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;

#[tokio::test]
async fn a_refusing_backend_is_ejected_and_the_others_keep_serving() {
    let live = Backend::named("live").await;
    let dead = refused_url();
    let weir = Weir::start(EJECT, &[("first", &dead), ("second", &live.url())]).await;
    let client = http1();
    let mut failures = Vec::new();
    for i in 0..20 {
        let reply = get(&client, &weir.url("/v1/x")).await;
        if reply.status == 200 {
            assert_eq!(reply.text(), "live");
            assert_eq!(reply.served_by(), "chat@v1");
        } else {
            assert_weir_error(&reply, 502, "connect", Some("chat@v1"));
            failures.push(i);
        }
    }
    assert!(
        failures.len() <= 1,
        "the refusing backend was not ejected: requests {failures:?} failed"
    );
    assert_eq!(live.hits(), 20 - failures.len());
}

#[tokio::test]
async fn a_version_with_every_backend_ejected_is_503_no_backend() {
    let dead = refused_url();
    let config = EJECT.replace(r#"["{first}", "{second}"]"#, r#"["{first}"]"#);
    let weir = Weir::start(&config, &[("first", &dead)]).await;
    let client = http1();
    let reply = get(&client, &weir.url("/v1/x")).await;
    assert_weir_error(&reply, 502, "connect", Some("chat@v1"));
    let reply = get(&client, &weir.url("/v1/x")).await;
    assert_weir_error(&reply, 503, "no_backend", Some("chat@v1"));
    for kind in ["connect", "no_backend"] {
        let labels = [("route", "chat"), ("version", "chat@v1"), ("kind", kind)];
        assert_eventually_eq!(
            weir.metric("weir_request_errors_total", &labels).await,
            Some(1.0),
            "weir_request_errors_total{labels:?}"
        );
    }
}

/// A backend that answers every request with a head promising 100 bytes, sends 10, and closes.
async fn breaking_backend() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = socket.read(&mut buf).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// Traffic that fails every request leaves a WARN line per backend and kind at the default log
/// level, not one per request: protocol errors before the head, body errors mid-response.
#[tokio::test]
async fn a_backend_failing_every_request_is_logged_at_warn_once_per_kind() {
    let garbage = format!(
        "chat@v1={}",
        misbehaving_backend(Misbehaviour::Garbage).await
    );
    let breaking = format!("chat@v2={}", breaking_backend().await);
    let cwd = temp_dir("failing-backend-log");
    let weir = WeirProcess::spawn(
        &[
            "serve",
            "--stable",
            &garbage,
            "--candidate",
            &breaking,
            "--weight",
            "0%",
            "--allow-override",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        cwd.path(),
    );
    let client = http1();
    for _ in 0..10 {
        let reply = get(&client, &weir.url("/v1/x")).await;
        assert_weir_error(&reply, 502, "protocol", Some("chat@v1"));
        let req = request(http::Method::GET, &weir.url("/v1/x"))
            .header("x-weir-version", "chat@v2")
            .body(empty())
            .unwrap();
        // The head arrives; the body breaks off.
        let response = client.request(req).await.expect("a response head");
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert!(body.is_err(), "the body breaks off");
    }
    let warnings = |kind: &str| -> Vec<String> {
        weir.log()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(&format!("kind=\"{kind}\"")))
            .map(str::to_string)
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while (warnings("protocol").is_empty() || warnings("body").is_empty())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let protocol = warnings("protocol");
    assert_eq!(protocol.len(), 1, "one protocol warning:\n{}", weir.log());
    assert!(protocol[0].contains("chat@v1"), "{}", protocol[0]);
    assert!(protocol[0].contains("not valid HTTP"), "{}", protocol[0]);
    let body = warnings("body");
    assert_eq!(body.len(), 1, "one body warning:\n{}", weir.log());
    assert!(body[0].contains("chat@v2"), "{}", body[0]);
    assert!(body[0].contains("mid-body"), "{}", body[0]);
}
