//! Streaming both ways without buffering: SSE events in lockstep with the client, 16 MiB bodies
//! byte-identical in both directions (content-length and chunked), the request body limit, and a
//! client that goes away cancelling the upstream request.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const SIXTEEN_MIB: usize = 16 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

// === server-sent events ===

async fn sse_in_lockstep(client: HttpClient, expected_version: http::Version) {
    const EVENTS: usize = 8;
    let (backend, ack) = lockstep_sse_backend(EVENTS).await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;
    let (head, mut events) = open_stream(&client, &weir.url("/v1/stream")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.version, expected_version);
    assert_eq!(
        head.headers.get("content-type").unwrap(),
        "text/event-stream"
    );
    assert_eq!(head.headers.get("x-weir-version").unwrap(), "chat@v1");
    for k in 0..EVENTS {
        // The backend writes event k+1 only after this acknowledgement, so a proxy that holds
        // back event k (buffering) times out here instead of hanging.
        let event = events.next(Duration::from_secs(5)).await;
        assert_eq!(event.as_deref(), Some(format!("data: {k}").as_str()));
        let _ = ack.send(k);
    }
    assert_eq!(events.next(Duration::from_secs(5)).await, None);
}

#[tokio::test]
async fn sse_events_arrive_as_they_are_written() {
    sse_in_lockstep(http1(), http::Version::HTTP_11).await;
}

#[tokio::test]
async fn sse_events_arrive_as_they_are_written_over_http2() {
    sse_in_lockstep(http2(), http::Version::HTTP_2).await;
}

// === large bodies ===

/// Answers with `{"len": N, "sha256": "..."}` of the request body, read as a stream.
async fn hashing_backend() -> Backend {
    Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let chunked = req.headers().contains_key("transfer-encoding");
        let length = req
            .headers()
            .get("content-length")
            .map(|v| v.to_str().unwrap().to_string());
        let (len, sha) = hash_body(req.into_body()).await;
        let json = serde_json::json!({
            "len": len, "sha256": sha, "chunked": chunked, "content_length": length,
        });
        Response::new(full(json.to_string()))
    })
    .await
}

/// Answers with 16 MiB of `pattern(_, 7)`, with a content-length for `/length` and chunked
/// (no length, 64 KiB frames) otherwise.
async fn big_response_backend() -> Backend {
    Backend::start(|req: Request<hyper::body::Incoming>| async move {
        let data = pattern(SIXTEEN_MIB, 7);
        if req.uri().path().ends_with("/length") {
            return Response::new(full(data));
        }
        let (tx, body) = channel_body(4);
        tokio::spawn(async move {
            for start in (0..data.len()).step_by(CHUNK) {
                let end = (start + CHUNK).min(data.len());
                if tx.send(data.slice(start..end)).await.is_err() {
                    return;
                }
            }
        });
        Response::new(body)
    })
    .await
}

fn chunked_body(data: Bytes) -> Body {
    let (tx, body) = channel_body(4);
    tokio::spawn(async move {
        for start in (0..data.len()).step_by(CHUNK) {
            let end = (start + CHUNK).min(data.len());
            if tx.send(data.slice(start..end)).await.is_err() {
                return;
            }
        }
    });
    body
}

async fn big_request(chunked: bool) {
    let backend = hashing_backend().await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;
    let data = pattern(SIXTEEN_MIB, 3);
    let expected = sha256(&data);
    let body = if chunked {
        chunked_body(data)
    } else {
        full(data)
    };
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url("/v1/upload"))
            .body(body)
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["len"], SIXTEEN_MIB, "{seen}");
    assert_eq!(seen["sha256"], expected.as_str(), "{seen}");
    if !chunked {
        assert_eq!(
            seen["content_length"],
            SIXTEEN_MIB.to_string(),
            "content-length was not forwarded: {seen}"
        );
    }
}

#[tokio::test]
async fn request_body_16_mib_with_content_length_is_byte_identical() {
    big_request(false).await;
}

#[tokio::test]
async fn request_body_16_mib_chunked_is_byte_identical() {
    big_request(true).await;
}

async fn big_response(path: &str) {
    let backend = big_response_backend().await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;
    let req = request(Method::GET, &weir.url(path)).body(empty()).unwrap();
    let response = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .expect("response head within the deadline")
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-weir-version").unwrap(), "chat@v1");
    if path.ends_with("/length") {
        assert_eq!(
            response.headers().get("content-length").unwrap(),
            &SIXTEEN_MIB.to_string()
        );
    }
    let (len, sha) = hash_body(response.into_body()).await;
    assert_eq!(len, SIXTEEN_MIB);
    assert_eq!(sha, sha256(&pattern(SIXTEEN_MIB, 7)));
}

#[tokio::test]
async fn response_body_16_mib_with_content_length_is_byte_identical() {
    big_response("/v1/download/length").await;
}

#[tokio::test]
async fn response_body_16_mib_chunked_is_byte_identical() {
    big_response("/v1/download/chunked").await;
}

// === request body limit ===

const LIMITED: &str = r#"
[listener]
addr = "127.0.0.1:0"
max_request_body = "1MiB"

[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;

const MIB: usize = 1024 * 1024;

/// Writes `head` and then `body` on a raw connection (ignoring write errors: the proxy may
/// answer and close early) and returns the status code of the response.
async fn raw_status(addr: SocketAddr, head: String, body: Vec<Vec<u8>>) -> u16 {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for piece in body {
            if write.write_all(&piece).await.is_err() {
                return;
            }
        }
        // Keep the write half (and so the connection) open until the test is over.
        std::future::pending::<()>().await;
    });
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, read.read(&mut chunk))
            .await
            .expect("response head within the deadline")
            .unwrap_or_else(|e| panic!("connection failed before a response head: {e}"));
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status_line = head.lines().next().unwrap_or_default();
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"))
}

#[tokio::test]
async fn request_over_the_body_limit_with_content_length_is_413() {
    let backend = hashing_backend().await;
    let weir = Weir::start(LIMITED, &[("v1", &backend.url())]).await;
    let len = 2 * MIB;
    let head = format!(
        "POST /v1/upload HTTP/1.1\r\nhost: weir.test\r\ncontent-type: application/octet-stream\r\ncontent-length: {len}\r\n\r\n"
    );
    let body = pattern(len, 5).chunks(CHUNK).map(<[u8]>::to_vec).collect();
    assert_eq!(raw_status(weir.proxy, head, body).await, 413);
    assert_eq!(
        backend.hits(),
        0,
        "a request known to be too large was forwarded"
    );
}

#[tokio::test]
async fn chunked_request_over_the_body_limit_is_413() {
    let backend = hashing_backend().await;
    let weir = Weir::start(LIMITED, &[("v1", &backend.url())]).await;
    let head = "POST /v1/upload HTTP/1.1\r\nhost: weir.test\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_string();
    let mut body: Vec<Vec<u8>> = pattern(2 * MIB, 5)
        .chunks(CHUNK)
        .map(|c| {
            let mut piece = format!("{:x}\r\n", c.len()).into_bytes();
            piece.extend_from_slice(c);
            piece.extend_from_slice(b"\r\n");
            piece
        })
        .collect();
    body.push(b"0\r\n\r\n".to_vec());
    assert_eq!(raw_status(weir.proxy, head, body).await, 413);
}

#[tokio::test]
async fn request_at_the_body_limit_passes() {
    let backend = hashing_backend().await;
    let weir = Weir::start(LIMITED, &[("v1", &backend.url())]).await;
    let data = pattern(MIB, 9);
    let expected = sha256(&data);
    let reply = send(
        &http1(),
        request(Method::POST, &weir.url("/v1/upload"))
            .body(full(data))
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["sha256"], expected.as_str());
}

// === backend failures mid-body ===

/// A raw TCP backend that, on every connection, reads the request, writes `response` and then
/// closes the socket (`hold == false`) or keeps it open and silent (`hold == true`).
async fn scripted_backend(response: &'static [u8], hold: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            let _ = socket.write_all(response).await;
            if hold {
                held.push(socket);
            } else {
                let _ = socket.shutdown().await;
            }
        }
    });
    format!("http://{addr}")
}

/// Reads a response body to its end; returns the bytes read before it ended and whether it
/// ended with an error.
async fn read_to_end(mut body: hyper::body::Incoming) -> (Vec<u8>, bool) {
    let mut data = Vec::new();
    loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the body neither continued nor ended within the deadline");
        match frame {
            None => return (data, false),
            Some(Ok(frame)) => {
                if let Ok(chunk) = frame.into_data() {
                    data.extend_from_slice(&chunk);
                }
            }
            Some(Err(_)) => return (data, true),
        }
    }
}

async fn assert_broken_body(response: &'static [u8], hold: bool, config: &str, kind: &str) {
    let backend = scripted_backend(response, hold).await;
    let weir = Weir::start(config, &[("v1", &backend)]).await;
    let req = request(Method::GET, &weir.url("/v1/stream"))
        .body(empty())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .expect("response head within the deadline")
        .expect("request");
    assert_eq!(response.status(), 200);
    let (data, failed) = read_to_end(response.into_body()).await;
    assert!(
        failed,
        "a body the backend broke off ended cleanly for the client after {:?}",
        String::from_utf8_lossy(&data)
    );
    assert!(
        data.starts_with(b"hello"),
        "{:?}",
        String::from_utf8_lossy(&data)
    );
    let labels = [("route", "chat"), ("version", "chat@v1"), ("kind", kind)];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(1.0),
        "weir_request_errors_total{labels:?}"
    );
}

#[tokio::test]
async fn chunked_body_broken_off_by_the_backend_fails_for_the_client() {
    assert_broken_body(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        false,
        ONE_VERSION,
        "body",
    )
    .await;
}

#[tokio::test]
async fn body_shorter_than_its_content_length_fails_for_the_client() {
    assert_broken_body(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello",
        false,
        ONE_VERSION,
        "body",
    )
    .await;
}

#[tokio::test]
async fn backend_silent_mid_body_is_cut_after_the_idle_timeout() {
    let config = format!("[proxy]\nidle_timeout = \"300ms\"\n{ONE_VERSION}");
    let started = std::time::Instant::now();
    assert_broken_body(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        true,
        &config,
        "idle_timeout",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut after {:?}, idle_timeout is 300ms",
        started.elapsed()
    );
}

/// A backend answering one request with `events` SSE chunks `gap` apart, then the chunked end,
/// or, with `stall`, nothing more while it keeps the connection open.
async fn paced_backend(events: usize, gap: Duration, stall: bool) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await.unwrap() == 0 {
                return;
            }
            head.push(b[0]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        for k in 0..events {
            tokio::time::sleep(gap).await;
            let event = format!("data: {k}\n\n");
            s.write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
                .await
                .unwrap();
        }
        if !stall {
            s.write_all(b"0\r\n\r\n").await.unwrap();
        }
        let _ = s.read(&mut [0u8; 1]).await;
    });
    url
}

/// weir with a 300 ms idle timeout in front of [`paced_backend`] sending `events` 100 ms apart,
/// and the 200 response head to one `GET /v1/stream` through it.
async fn paced_through_weir(events: usize, stall: bool) -> (Weir, Response<Incoming>) {
    let backend = paced_backend(events, Duration::from_millis(100), stall).await;
    let config = format!("[proxy]\nidle_timeout = \"300ms\"\n{ONE_VERSION}");
    let weir = Weir::start(&config, &[("v1", &backend)]).await;
    let req = request(Method::GET, &weir.url("/v1/stream"))
        .body(empty())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, http1().request(req))
        .await
        .expect("response head within the deadline")
        .expect("request");
    assert_eq!(response.status(), 200);
    (weir, response)
}

fn events(n: usize) -> String {
    (0..n).map(|k| format!("data: {k}\n\n")).collect()
}

#[tokio::test]
async fn an_answer_longer_than_the_idle_timeout_streams_whole_while_each_gap_is_shorter() {
    // 12 events 100 ms apart (1.2 s) under a 300 ms idle timeout: the relay's one idle timer
    // fires several times during the answer and must move on each time, never cut it.
    let (_weir, response) = paced_through_weir(12, false).await;
    let (data, failed) = read_to_end(response.into_body()).await;
    assert!(!failed, "cut after {:?}", String::from_utf8_lossy(&data));
    assert_eq!(String::from_utf8_lossy(&data), events(12));
}

#[tokio::test]
async fn a_stream_that_stalls_after_the_idle_timer_moved_is_cut_one_idle_timeout_later() {
    // 6 events 100 ms apart move the 300 ms timer at least once; then the backend goes silent
    // with the connection open. The client gets every event, then a broken body, one idle
    // timeout after the last event (not never, not at once).
    let (weir, response) = paced_through_weir(6, true).await;
    let mut body = response.into_body();
    let (mut data, mut last_event) = (Vec::new(), std::time::Instant::now());
    let failed = loop {
        match tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the stall is cut")
        {
            Some(Ok(frame)) => {
                if let Ok(bytes) = frame.into_data() {
                    data.extend_from_slice(&bytes);
                    last_event = std::time::Instant::now();
                }
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    let after = last_event.elapsed();
    assert!(failed, "a stalled stream ended cleanly");
    assert_eq!(String::from_utf8_lossy(&data), events(6));
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_millis(2000),
        "cut {after:?} after the last event; idle_timeout is 300ms"
    );
    let labels = [
        ("route", "chat"),
        ("version", "chat@v1"),
        ("kind", "idle_timeout"),
    ];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(1.0),
        "weir_request_errors_total{labels:?}"
    );
}

// === cancellation ===

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_request() {
    let (cancelled_tx, cancelled_rx) = oneshot::channel::<usize>();
    let cancelled_tx = Arc::new(Mutex::new(Some(cancelled_tx)));
    let backend = Backend::start(move |_req| {
        let cancelled_tx = cancelled_tx.clone();
        async move {
            let (tx, body) = channel_body(1);
            tokio::spawn(async move {
                // Endless in practice: stops only when nobody reads the body any more.
                for sent in 0..100_000usize {
                    let chunk = Bytes::from(format!("data: {sent}\n\n"));
                    let failed = tokio::select! {
                        result = tx.send(chunk) => result.is_err(),
                        _ = tx.closed() => true,
                    };
                    if failed {
                        if let Some(signal) = cancelled_tx.lock().unwrap().take() {
                            let _ = signal.send(sent);
                        }
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    let weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;

    let stream = TcpStream::connect(weir.proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::builder()
        .uri("/v1/stream")
        .header("host", "weir.test")
        .body(empty())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("response head")
        .expect("request");
    let mut body = response.into_body();
    let first = tokio::time::timeout(DEADLINE, body.frame())
        .await
        .expect("first chunk within the deadline");
    assert!(matches!(first, Some(Ok(_))), "first chunk: {first:?}");

    // Hang up: drop the body and the sender and stop the connection task, closing the socket.
    drop(body);
    drop(sender);
    conn.abort();
    let _ = conn.await;

    let sent = tokio::time::timeout(DEADLINE, cancelled_rx)
        .await
        .expect("the backend still streams long after the client went away")
        .unwrap();
    assert!(sent >= 1);
    assert_eventually!(
        weir.metric("weir_in_flight_requests", &[("version", "chat@v1")])
            .await
            .unwrap_or(0.0)
            == 0.0,
        "weir_in_flight_requests did not return to 0 after the client left"
    );
}

/// Inference at scale: 2,000 streams open through weir at once (the backend holds every one
/// until all have arrived), each receiving its own 20 events in order and its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_streams_all_complete_intact() {
    const STREAMS: usize = 2000;
    const EVENTS: usize = 20;
    let arrived = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let all_here = Arc::new(tokio::sync::Notify::new());
    let (count, notify) = (arrived.clone(), all_here.clone());
    let backend = Backend::start(move |req: Request<hyper::body::Incoming>| {
        let (count, notify) = (count.clone(), notify.clone());
        async move {
            let id = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("stream="))
                .unwrap_or("?")
                .to_string();
            let (tx, body) = channel_body(2);
            tokio::spawn(async move {
                // Streams start together: every one is open at once.
                let wait = notify.notified();
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == STREAMS {
                    notify.notify_waiters();
                } else {
                    wait.await;
                }
                for k in 0..EVENTS {
                    let event = format!(
                        "data: {{\"stream\": {id}, \"seq\": {k}, \"text\": \"token\"}}\n\n"
                    );
                    if tx.send(Bytes::from(event)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap()
        }
    })
    .await;
    // Generous connects: 2,000 connections opened within a second can overflow a listen backlog
    // on a loaded machine, and a dropped SYN is retried after a second.
    let config = format!("[proxy]\nconnect_timeout = \"20s\"\n{ONE_VERSION}");
    let weir = Weir::start(&config, &[("v1", &backend.url())]).await;
    let client = http1();
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (client, url) = (
                client.clone(),
                weir.url(&format!("/v1/chat/completions?stream={i}")),
            );
            tokio::spawn(async move {
                // Opened over a second, not in one burst; they are all open at once all the
                // same, since the backend holds every one until the last has arrived.
                tokio::time::sleep(Duration::from_micros(500 * i as u64)).await;
                let req = Request::builder()
                    .method(Method::POST)
                    .uri(url)
                    .header("content-type", "application/json")
                    .body(full(r#"{"model": "chat", "stream": true, "messages": []}"#))
                    .unwrap();
                let response = client
                    .request(req)
                    .await
                    .map_err(|e| format!("stream {i}: {e}"))?;
                if response.status() != http::StatusCode::OK {
                    let body = response.into_body().collect().await.map(|b| b.to_bytes());
                    return Err(format!("stream {i}: {body:?}"));
                }
                let mut events = EventReader::new(response.into_body());
                let mut got = Vec::new();
                while let Some(event) = events.next(Duration::from_secs(60)).await {
                    got.push(event);
                }
                let expected: Vec<String> = (0..EVENTS)
                    .map(|k| {
                        format!("data: {{\"stream\": {i}, \"seq\": {k}, \"text\": \"token\"}}")
                    })
                    .chain(["data: [DONE]".to_string()])
                    .collect();
                if got != expected {
                    return Err(format!(
                        "stream {i} got {} events, first differing: {:?}",
                        got.len(),
                        got.iter().zip(&expected).find(|(a, b)| a != b)
                    ));
                }
                Ok(())
            })
        })
        .collect();
    let mut failed = Vec::new();
    for stream in streams {
        if let Err(e) = tokio::time::timeout(Duration::from_secs(120), stream)
            .await
            .expect("every stream ends within 120 s")
            .unwrap()
        {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {STREAMS} streams failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_eq!(arrived.load(std::sync::atomic::Ordering::SeqCst), STREAMS);
}
