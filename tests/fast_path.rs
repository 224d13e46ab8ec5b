//! The HTTP/1.1 fast path on the wire: pipelined requests, pooled upstream connections (reused,
//! and a stale one replaced), response bodies passed through or re-framed as they arrive, requests
//! handed to hyper mid-connection, hop-by-hop headers both ways and backend failures.
//!
//! Both ends are raw sockets on 127.0.0.1, so the bytes under test are exactly the bytes written.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wire::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// [`ONE_VERSION`] behind `extra` (tables such as `[proxy]`), served by `backend`.
async fn weir_with(extra: &str, backend: &str) -> Weir {
    Weir::start(&format!("{extra}\n{ONE_VERSION}"), &[("v1", backend)]).await
}

// === answers ===

/// `{"len", "sha256", "content_length", "transfer_encoding"}` of the request body.
fn hash_answer(req: &RawRequest) -> Vec<u8> {
    let json = serde_json::json!({
        "len": req.body.len(),
        "sha256": sha256(&req.body),
        "content_length": req.headers.get("content-length"),
        "transfer_encoding": req.headers.get("transfer-encoding"),
    });
    ok(json.to_string())
}

// === pipelining and keep-alive ===

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_the_connection_stays_open() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;

    client
        .write(get_request("/v1/a") + &get_request("/v1/b"))
        .await;
    for expected in ["GET /v1/a", "GET /v1/b"] {
        let reply = client.response().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), expected);
        assert_eq!(reply.served_by(), "chat@v1");
    }

    // Three in one write, the middle one with a body.
    let three = [
        get_request("/v1/c"),
        post_request("/v1/d", "body of d"),
        get_request("/v1/e?x=1"),
    ]
    .concat();
    client.write(three).await;
    for expected in ["GET /v1/c", "POST /v1/d body of d", "GET /v1/e?x=1"] {
        let reply = client.response().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), expected);
        assert_eq!(reply.served_by(), "chat@v1");
    }
    assert!(
        client.buf.is_empty(),
        "bytes after the last answer: {:?}",
        String::from_utf8_lossy(&client.buf)
    );

    // The connection still carries a request after the pipeline has drained.
    client.write(get_request("/v1/f")).await;
    assert_eq!(client.response().await.text(), "GET /v1/f");

    let seen: Vec<String> = requests.all().iter().map(describe).collect();
    assert_eq!(
        seen,
        [
            "GET /v1/a",
            "GET /v1/b",
            "GET /v1/c",
            "POST /v1/d body of d",
            "GET /v1/e?x=1",
            "GET /v1/f"
        ]
    );
}

#[tokio::test]
async fn sequential_requests_share_pooled_upstream_connections() {
    const REQUESTS: usize = 20;
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;

    let mut client = Wire::connect(weir.proxy).await;
    for i in 0..REQUESTS {
        client.write(get_request(&format!("/v1/one/{i}"))).await;
        let reply = client.response().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.text(), format!("GET /v1/one/{i}"));
    }
    assert_eq!(
        backend.accepted(),
        1,
        "{REQUESTS} requests in a row on one client connection opened several upstream connections"
    );

    // Separate client connections draw from the same pool.
    for i in 0..REQUESTS {
        let mut other = Wire::connect(weir.proxy).await;
        other.write(get_request(&format!("/v1/many/{i}"))).await;
        let reply = other.response().await;
        assert_eq!(reply.text(), format!("GET /v1/many/{i}"));
    }
    assert_eq!(requests.all().len(), 2 * REQUESTS);
    assert!(
        backend.accepted() <= 3,
        "{} upstream connections for {} sequential requests",
        backend.accepted(),
        2 * REQUESTS
    );
}

/// A backend that answers one request per connection, `connection N: LEN bytes, sha256 HASH`
/// (N counting connections from 0), then closes the connection without having announced it
/// (no `Connection: close`). Also returns how many connections it has closed.
async fn closing_backend() -> (WireBackend, Arc<AtomicUsize>) {
    let closed = Arc::new(AtomicUsize::new(0));
    let counter = closed.clone();
    let backend = WireBackend::start(move |mut wire, index| {
        let closed = counter.clone();
        async move {
            if let Ok(req) = wire.request().await {
                let answer = format!(
                    "connection {index}: {} bytes, sha256 {}",
                    req.body.len(),
                    sha256(&req.body)
                );
                let _ = wire.send(ok(answer)).await;
            }
            drop(wire);
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    (backend, closed)
}

/// A pooled upstream connection idle longer than `pool_idle_timeout` is closed by weir even
/// when no request comes to take it (a backend that gets no more traffic, such as a rolled-back
/// candidate's), instead of staying open for as long as weir runs.
#[tokio::test]
async fn idle_pooled_connections_are_closed_after_the_pool_idle_timeout_without_traffic() {
    let closed_by_weir = Arc::new(AtomicUsize::new(0));
    let counter = closed_by_weir.clone();
    let backend = WireBackend::start(move |mut wire, index| {
        let closed = counter.clone();
        async move {
            // Keep-alive: answer every request until weir closes the connection.
            while let Ok(req) = wire.request().await {
                let answer = format!("connection {index}: {} bytes", req.body.len());
                if wire.send(ok(answer)).await.is_err() {
                    return;
                }
            }
            closed.fetch_add(1, Ordering::SeqCst);
        }
    })
    .await;
    let weir = weir_with("[proxy]\npool_idle_timeout = \"300ms\"\n", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    assert_eq!(client.response().await.text(), "connection 0: 0 bytes");
    assert_eventually!(closed_by_weir.load(Ordering::SeqCst) == 1);
    client.write(get_request("/v1/x")).await;
    assert_eq!(
        client.response().await.text(),
        "connection 1: 0 bytes",
        "the next request opens a new connection"
    );
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
    let (backend, closed) = closing_backend().await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    let empty = sha256(b"");
    for round in 0..3 {
        client.write(get_request("/v1/x")).await;
        let reply = client.response().await;
        assert_eq!(
            reply.status,
            200,
            "round {round}: a stale pooled connection surfaced as {:?}",
            reply.text()
        );
        assert_eq!(
            reply.text(),
            format!("connection {round}: 0 bytes, sha256 {empty}")
        );
        // The backend has closed its side before the next request is sent.
        assert_eventually!(closed.load(Ordering::SeqCst) == round + 1);
    }
    assert_eq!(backend.accepted(), 3);
    assert_eq!(
        weir.metric("weir_request_errors_total", &[])
            .await
            .unwrap_or(0.0),
        0.0,
        "a replaced stale connection was counted as an error"
    );
}

/// A backend that closes a kept-alive connection only when the next request arrives on it (its
/// idle close racing weir's reuse: weir sees the connection open until it sends) fails every
/// pooled connection it holds the same way. The request is sent again once, on a new connection,
/// not on the next pooled one.
#[tokio::test]
async fn a_request_failed_by_a_stale_pooled_connection_is_sent_again_on_a_new_one() {
    let backend = WireBackend::start(|mut wire, index| async move {
        if wire.request().await.is_ok() {
            // Slow enough that two concurrent requests need two connections.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _ = wire.send(ok(format!("connection {index}"))).await;
        }
        // The next request is read, then the connection closes unanswered.
        let _ = wire.request().await;
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let (mut a, mut b) = (
        Wire::connect(weir.proxy).await,
        Wire::connect(weir.proxy).await,
    );
    a.write(get_request("/v1/a")).await;
    b.write(get_request("/v1/b")).await;
    assert_eq!(a.response().await.status, 200);
    assert_eq!(b.response().await.status, 200);
    assert_eq!(
        backend.accepted(),
        2,
        "two pooled connections to start from"
    );

    a.write(get_request("/v1/c")).await;
    let reply = a.response().await;
    assert_eq!(
        reply.status,
        200,
        "the retry took another stale pooled connection: {:?}",
        reply.text()
    );
    assert_eq!(reply.text(), "connection 2");
    assert_eq!(backend.accepted(), 3);
}

#[tokio::test]
async fn a_pooled_connection_the_backend_closed_is_replaced_for_a_body_still_arriving() {
    let (backend, closed) = closing_backend().await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    assert_eq!(client.response().await.status, 200);
    assert_eventually!(closed.load(Ordering::SeqCst) == 1);

    // A body far larger than what weir reads with the head: it streams to the backend as it
    // arrives, so it cannot be replayed on another connection once sent.
    let body = pattern(256 * 1024, 21);
    client
        .write(format!(
            "POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\nContent-Length: {}\r\n\r\n",
            body.len()
        ))
        .await;
    for piece in body.chunks(16 * 1024) {
        if client.send(piece).await.is_err() {
            break; // weir answered early; the answer says why
        }
    }
    let reply = client.response().await;
    assert_eq!(
        reply.status,
        200,
        "a request whose body was still arriving met the stale pooled connection: {:?}",
        reply.text()
    );
    assert_eq!(
        reply.text(),
        format!(
            "connection 1: {} bytes, sha256 {}",
            body.len(),
            sha256(&body)
        )
    );
}

// === response framing ===

#[tokio::test]
async fn a_close_delimited_upstream_body_reaches_the_client_chunked() {
    let body = pattern(200 * 1024, 5);
    let data = body.clone();
    let backend = WireBackend::start(move |mut wire, _| {
        let data = data.clone();
        async move {
            if wire.request().await.is_err() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n";
            let _ = wire.send(head).await;
            for piece in data.chunks(50 * 1024) {
                let _ = wire.send(piece).await;
            }
            // Closing the connection is what ends the body.
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    for round in 0..2 {
        client.write(get_request("/v1/download")).await;
        let reply = client.response().await;
        assert_eq!(reply.status, 200, "round {round}");
        assert_eq!(
            reply.headers.get("transfer-encoding"),
            Some("chunked"),
            "round {round}: a close-delimited body must reach the client chunked: {:?}",
            reply.headers
        );
        assert_eq!(reply.headers.get("content-length"), None);
        assert_eq!(reply.headers.get("connection"), None, "round {round}");
        assert_eq!(reply.served_by(), "chat@v1");
        assert_eq!(reply.body.len(), body.len(), "round {round}");
        assert_eq!(sha256(&reply.body), sha256(&body), "round {round}");
    }
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test]
async fn a_chunked_upstream_body_passes_through_as_it_is_written() {
    // Chunk extensions, a chunk split across writes, and a trailer.
    const PIECES: [&[u8]; 5] = [
        b"5;ext=1\r\nhello\r\n",
        b"6;name=\"quoted value\"\r\n world\r\n",
        b"A\r\n0123",
        b"456789\r\n",
        b"0\r\nx-checksum: abc\r\n\r\n",
    ];
    let (release, released) = mpsc::unbounded_channel::<&'static [u8]>();
    let released = Arc::new(tokio::sync::Mutex::new(released));
    let backend = WireBackend::start(move |mut wire, _| {
        let released = released.clone();
        async move {
            let mut streamed = false;
            while wire.request().await.is_ok() {
                if streamed {
                    let _ = wire.send(ok("after")).await;
                    continue;
                }
                streamed = true;
                let head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n";
                let _ = wire.send(head).await;
                let mut released = released.lock().await;
                for _ in 0..PIECES.len() {
                    let Some(piece) = released.recv().await else {
                        return;
                    };
                    let _ = wire.send(piece).await;
                }
            }
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client
        .write("GET /v1/stream HTTP/1.1\r\nHost: weir.test\r\nTE: trailers\r\n\r\n")
        .await;
    // The head arrives before any of the body has been written.
    let head = within("the response head", client.response_head("GET")).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.framing, Framing::Chunked, "{:?}", head.headers);
    assert_eq!(head.headers.get("x-weir-version"), Some("chat@v1"));
    assert_eq!(head.headers.get("trailer"), None);

    // Each piece reaches the client before the backend writes the next one.
    let mut body = Vec::new();
    for (pieces, so_far) in [
        (&PIECES[0..1], "hello"),
        (&PIECES[1..2], "hello world"),
        (&PIECES[2..4], "hello world0123456789"),
    ] {
        for piece in pieces {
            release.send(*piece).unwrap();
        }
        within(
            &format!("the body up to {so_far:?}"),
            client.chunks_to(&mut body, so_far.len()),
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&body), so_far);
    }
    release.send(PIECES[4]).unwrap();
    let mut trailers = Fields::default();
    let last = within("the last chunk", client.chunk(&mut trailers)).await;
    assert_eq!(last, None, "data after the end of the body");
    assert_eq!(trailers.get("x-checksum"), Some("abc"));
    assert!(client.buf.is_empty(), "{:?}", client.buf);

    // The body ended exactly where its framing says: both connections carry the next request.
    client.write(get_request("/v1/after")).await;
    assert_eq!(client.response().await.text(), "after");
    assert_eq!(backend.accepted(), 1);
}

#[tokio::test]
async fn a_head_response_has_no_body_and_the_connection_stays_usable() {
    let (backend, _) = WireBackend::answering(|req| {
        if req.method == "HEAD" {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n".to_vec()
        } else {
            ok("hello")
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    let head_request = "HEAD /v1/h HTTP/1.1\r\nHost: weir.test\r\n\r\n";

    client.write(head_request).await;
    let reply = client.response_to("HEAD").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.headers.get("content-length"), Some("5"));
    assert_eq!(reply.served_by(), "chat@v1");
    client.write(get_request("/v1/h")).await;
    let reply = client.response().await;
    assert_eq!(reply.text(), "hello", "the HEAD answer left bytes behind");

    // Pipelined too.
    client
        .write(format!("{head_request}{}", get_request("/v1/h")))
        .await;
    assert!(client.response_to("HEAD").await.body.is_empty());
    assert_eq!(client.response().await.text(), "hello");
    assert!(client.buf.is_empty(), "{:?}", client.buf);
    assert_eq!(
        backend.accepted(),
        1,
        "the upstream connection was not reused after a HEAD answer"
    );
}

#[tokio::test]
async fn informational_responses_are_skipped_and_the_final_one_delivered() {
    let backend = WireBackend::start(|mut wire, _| async move {
        while let Ok(req) = wire.request().await {
            let interim: &[u8] = if req.method == "POST" {
                b"HTTP/1.1 100 Continue\r\n\r\n"
            } else {
                b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            };
            if wire.send(interim).await.is_err() || wire.send(ok(describe(&req))).await.is_err() {
                return;
            }
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/hints")).await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "GET /v1/hints");
    assert_eq!(reply.served_by(), "chat@v1");

    client.write(post_request("/v1/post", "data")).await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "POST /v1/post data");
    assert!(client.buf.is_empty(), "{:?}", client.buf);
}

#[tokio::test]
async fn a_response_with_70_headers_reaches_the_client() {
    // hyper's client reads up to 100 response headers; the fast path must not refuse fewer.
    let (backend, _) = WireBackend::answering(|_| {
        let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
        for i in 0..70 {
            head.push_str(&format!("X-Resp-{i:02}: value {i}\r\n"));
        }
        head.push_str("\r\nok");
        head.into_bytes()
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/many")).await;
    let reply = client.response().await;
    assert_eq!(
        reply.status,
        200,
        "a response with 70 headers: {:?}",
        reply.text()
    );
    assert_eq!(reply.text(), "ok");
    for i in 0..70 {
        assert_eq!(
            reply.headers.get(&format!("x-resp-{i:02}")),
            Some(format!("value {i}").as_str())
        );
    }
}

// === requests the fast path hands to hyper ===

#[tokio::test]
async fn a_chunked_request_body_is_handed_over_mid_connection() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/first")).await;
    assert_eq!(client.response().await.text(), "GET /v1/first");

    // A chunked body and a plain request behind it, in one write: hyper gets every byte.
    let chunked =
        "POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\nTransfer-Encoding: chunked\r\n\r\n\
                   4\r\nwiki\r\n5;note=x\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
    client
        .write(format!("{chunked}{}", get_request("/v1/after")))
        .await;
    let expected_body = "wikipedia in\r\n\r\nchunks.";
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), format!("POST /v1/upload {expected_body}"));
    assert_eq!(reply.served_by(), "chat@v1");
    let reply = client.response().await;
    assert_eq!(reply.text(), "GET /v1/after");
    assert_eq!(reply.served_by(), "chat@v1");

    client.write(get_request("/v1/last")).await;
    assert_eq!(client.response().await.text(), "GET /v1/last");
    let seen = requests.all();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[1].body, expected_body.as_bytes());
}

#[tokio::test]
async fn an_expect_100_continue_request_is_handed_over() {
    let (backend, _) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client
        .write("POST /v1/expect HTTP/1.1\r\nHost: weir.test\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(within("100 Continue", client.interim()).await, 100);
    client.write("hello there").await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "POST /v1/expect hello there");
    assert_eq!(reply.served_by(), "chat@v1");

    client.write(get_request("/v1/next")).await;
    assert_eq!(client.response().await.text(), "GET /v1/next");
}

#[tokio::test]
async fn an_http_1_0_request_is_handed_over() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client
        .write("GET /v1/old HTTP/1.0\r\nHost: weir.test\r\n\r\n")
        .await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "GET /v1/old");
    assert_eq!(reply.served_by(), "chat@v1");
    // HTTP/1.0 without keep-alive: the connection ends with the answer.
    client.assert_closed().await;
    assert_eq!(requests.all().len(), 1);
}

#[tokio::test]
async fn a_request_with_70_headers_is_handed_over() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    let mut head = String::from("GET /v1/many HTTP/1.1\r\nHost: weir.test\r\n");
    for i in 0..70 {
        head.push_str(&format!("X-Extra-{i:02}: value {i}\r\n"));
    }
    head.push_str("\r\n");
    client.write(head).await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "GET /v1/many");
    assert_eq!(reply.served_by(), "chat@v1");

    client.write(get_request("/v1/next")).await;
    assert_eq!(client.response().await.text(), "GET /v1/next");
    let seen = requests.all();
    for i in 0..70 {
        assert_eq!(
            seen[0].headers.all(&format!("x-extra-{i:02}")),
            [format!("value {i}")]
        );
    }
}

#[tokio::test]
async fn a_request_head_with_bare_lf_line_ends_is_answered() {
    // RFC 9112 §2.2 lets a recipient accept LF alone as a line end, and hyper does: a client that
    // sends such heads must get an answer, not a silent timeout.
    let (backend, _) = WireBackend::answering(|req| ok(describe(req))).await;
    let config = "[listener]\naddr = \"127.0.0.1:0\"\nheader_read_timeout = \"2s\"";
    let weir = weir_with(config, &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client
        .write("GET /v1/lf HTTP/1.1\nHost: weir.test\n\n")
        .await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "GET /v1/lf");
}

// === connection management ===

#[tokio::test]
async fn connection_close_from_the_client_closes_after_the_answer() {
    let (backend, _) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/a")).await;
    let reply = client.response().await;
    assert_eq!(reply.text(), "GET /v1/a");
    assert_eq!(reply.headers.get("connection"), None);

    client
        .write("GET /v1/b HTTP/1.1\r\nHost: weir.test\r\nConnection: close\r\n\r\n")
        .await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "GET /v1/b");
    assert!(
        reply
            .headers
            .list("connection")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("close")),
        "no `connection: close` on the last answer: {:?}",
        reply.headers
    );
    client.assert_closed().await;
}

#[tokio::test]
async fn a_client_trickling_its_head_is_cut_off_at_the_header_read_timeout() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let config = "[listener]\naddr = \"127.0.0.1:0\"\nheader_read_timeout = \"500ms\"";
    let weir = weir_with(config, &backend.url()).await;
    let (read, mut write) = TcpStream::connect(weir.proxy).await.unwrap().into_split();
    write
        .write_all(b"GET /v1/slow HTTP/1.1\r\nHost: weir.test\r\nX-Slow: ")
        .await
        .unwrap();
    // One byte every 100 ms: the head is never complete, but the connection is never silent.
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if write.write_all(b"a").await.is_err() {
                return;
            }
        }
    });
    let mut reader = Wire::new(read);
    let closed = tokio::time::timeout(Duration::from_secs(3), reader.fill()).await;
    trickle.abort();
    assert!(
        closed.is_ok(),
        "a client sending its head one byte per 100 ms is still connected after 3s \
         (header_read_timeout is 500ms)"
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(requests.all().is_empty());
}

// === hop-by-hop and forwarded headers ===

#[tokio::test]
async fn hop_by_hop_headers_stop_at_weir_in_both_directions() {
    let (backend, requests) = WireBackend::answering(|_| {
        b"HTTP/1.1 200 OK\r\nConnection: x-resp\r\nX-Resp: 1\r\nKeep-Alive: timeout=5\r\n\
          Proxy-Connection: keep-alive\r\nX-Other: kept\r\nContent-Length: 2\r\n\r\nok"
            .to_vec()
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    let request = "GET /v1/hop HTTP/1.1\r\n\
                   Host: weir.test\r\n\
                   Connection: keep-alive, X-Secret\r\n\
                   X-Secret: 1\r\n\
                   Keep-Alive: 5\r\n\
                   TE: trailers\r\n\
                   Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
                   X-Weir-Version: stable\r\n\
                   X-Kept: yes\r\n\
                   X-Multi: one\r\n\
                   X-Multi: two\r\n\
                   Authorization: Bearer end-to-end\r\n\
                   X-Forwarded-For: 10.0.0.1\r\n\
                   X-Forwarded-Proto: https\r\n\
                   \r\n";
    for round in 0..2 {
        client.write(request).await;
        let reply = client.response().await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        assert_eq!(reply.text(), "ok");
        assert_eq!(reply.served_by(), "chat@v1");
        assert_eq!(reply.headers.get("x-other"), Some("kept"));
        for name in ["x-resp", "keep-alive", "proxy-connection"] {
            assert_eq!(
                reply.headers.get(name),
                None,
                "round {round}: {name} reached the client: {:?}",
                reply.headers
            );
        }
        for token in reply.headers.list("connection") {
            assert!(
                !token.eq_ignore_ascii_case("x-resp"),
                "the backend's Connection header reached the client: {:?}",
                reply.headers
            );
        }
    }

    let seen = requests.all();
    assert_eq!(seen.len(), 2);
    for req in &seen {
        let h = &req.headers;
        for name in [
            "x-secret",
            "keep-alive",
            "te",
            "proxy-authorization",
            "x-weir-version",
        ] {
            assert_eq!(h.get(name), None, "{name} reached the backend: {h:?}");
        }
        for token in h.list("connection") {
            assert!(
                !token.eq_ignore_ascii_case("x-secret"),
                "the client's Connection header reached the backend: {h:?}"
            );
        }
        assert_eq!(h.get("host"), Some("weir.test"));
        assert_eq!(h.all("x-kept"), ["yes"]);
        assert_eq!(h.all("x-multi"), ["one", "two"]);
        assert_eq!(h.all("authorization"), ["Bearer end-to-end"]);
        assert_eq!(h.list("x-forwarded-for"), ["10.0.0.1", "127.0.0.1"]);
        assert_eq!(h.all("x-forwarded-proto"), ["http"]);
        assert_eq!(req.target, "/v1/hop");
    }
}

// === request bodies ===

const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_request_body_larger_than_one_read_arrives_byte_identical() {
    let (backend, requests) = WireBackend::answering(hash_answer).await;
    let weir = weir_with("", &backend.url()).await;
    let body = pattern(MIB, 13);
    let mut client = Wire::connect(weir.proxy).await;
    client
        .write(format!(
            "PUT /v1/upload HTTP/1.1\r\nHost: weir.test\r\nContent-Type: application/octet-stream\r\nContent-Length: {MIB}\r\n\r\n"
        ))
        .await;
    for piece in body.chunks(64 * 1024) {
        client.write(piece).await;
    }
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = reply.json();
    assert_eq!(seen["len"], MIB, "{seen}");
    assert_eq!(seen["sha256"], sha256(&body).as_str(), "{seen}");
    assert_eq!(seen["content_length"], MIB.to_string(), "{seen}");
    assert_eq!(seen["transfer_encoding"], serde_json::Value::Null, "{seen}");

    // The body was consumed exactly: the connection carries the next request.
    client.write(post_request("/v1/small", "tail")).await;
    let reply = client.response().await;
    assert_eq!(reply.json()["sha256"], sha256(b"tail").as_str());
    assert_eq!(requests.all().len(), 2);
}

#[tokio::test]
async fn a_request_body_over_the_limit_gets_413() {
    let (backend, requests) = WireBackend::answering(hash_answer).await;
    let config = "[listener]\naddr = \"127.0.0.1:0\"\nmax_request_body = \"64KiB\"";
    let weir = weir_with(config, &backend.url()).await;
    let limit = 64 * 1024;
    let head = |len: usize| {
        format!("POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\nContent-Length: {len}\r\n\r\n")
    };

    // At the limit: forwarded.
    let body = pattern(limit, 3);
    let mut client = Wire::connect(weir.proxy).await;
    client.write(head(limit)).await;
    client.write(&body).await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["sha256"], sha256(&body).as_str());

    // One byte over: refused before anything reaches the backend.
    let mut client = Wire::connect(weir.proxy).await;
    client.write(head(limit + 1)).await;
    let _ = client.send(&pattern(16 * 1024, 4)).await;
    let reply = client.response().await;
    assert_error(&reply, 413, "request_too_large", Some("chat@v1"));
    assert_eq!(
        requests.all().len(),
        1,
        "a request known to be too large was forwarded"
    );
}

// === weir's own answers ===

const OVERRIDABLE: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
prefix = "/v1"
stable = "chat@v1"
allow_override = true
"#;

#[tokio::test]
async fn local_answers_keep_the_connection_open() {
    let (backend, requests) = WireBackend::answering(|req| ok(describe(req))).await;
    let weir = Weir::start(OVERRIDABLE, &[("v1", &backend.url())]).await;
    let mut client = Wire::connect(weir.proxy).await;

    client.write(get_request("/elsewhere")).await;
    assert_error(&client.response().await, 404, "no_route", None);

    client
        .write("GET /v1/x HTTP/1.1\r\nHost: weir.test\r\nX-Weir-Version: chat@v9\r\n\r\n")
        .await;
    assert_error(&client.response().await, 400, "bad_override", None);

    client
        .write("GET /v1/x HTTP/1.1\r\nHost: weir.test\r\nX-Weir-Version: chat@v1\r\n\r\n")
        .await;
    let reply = client.response().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.served_by(), "chat@v1");

    let seen = requests.all();
    assert_eq!(
        seen.len(),
        1,
        "only the routable request reaches the backend"
    );
    assert_eq!(seen[0].headers.get("x-weir-version"), None);
}

#[tokio::test]
async fn fast_path_requests_are_counted() {
    let (backend, _) = WireBackend::answering(|req| {
        if req.target.ends_with("/fail") {
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy".to_vec()
        } else {
            ok("fine")
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    for (target, times, status) in [("/v1/ok", 5, 200), ("/v1/fail", 3, 503)] {
        for _ in 0..times {
            client.write(get_request(target)).await;
            assert_eq!(client.response().await.status, status);
        }
    }
    let labels = |class: &'static str| {
        [
            ("route", "chat"),
            ("version", "chat@v1"),
            ("role", "stable"),
            ("status_class", class),
        ]
    };
    assert_eventually_eq!(
        weir.metric("weir_requests_total", &[]).await,
        Some(8.0),
        "weir_requests_total"
    );
    let scrape = weir.metrics().await;
    assert_eq!(
        metric(&scrape, "weir_requests_total", &labels("2xx")),
        Some(5.0)
    );
    assert_eq!(
        metric(&scrape, "weir_requests_total", &labels("5xx")),
        Some(3.0)
    );
    let version = [("route", "chat"), ("version", "chat@v1")];
    assert_eq!(
        metric(&scrape, "weir_request_duration_seconds_count", &version),
        Some(8.0)
    );
    assert!(has_histogram(
        &scrape,
        "weir_time_to_first_byte_seconds",
        &version
    ));
    assert_eq!(
        metric(&scrape, "weir_in_flight_requests", &version),
        Some(0.0)
    );
    assert_eq!(
        metric(&scrape, "weir_request_errors_total", &[]).unwrap_or(0.0),
        0.0,
        "backend 5xx answers are not proxy errors"
    );
}

// === backend failures ===

async fn assert_error_counted(weir: &Weir, kind: &str) {
    let labels = [("route", "chat"), ("version", "chat@v1"), ("kind", kind)];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(1.0),
        "weir_request_errors_total{labels:?}"
    );
}

#[tokio::test]
async fn a_backend_answering_garbage_is_502_protocol() {
    let backend = RawBackend::start(b"SMTP ready\r\n\r\n").await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    let reply = client.response().await;
    assert_error(&reply, 502, "protocol", Some("chat@v1"));
    assert_eq!(reply.served_by(), "chat@v1");
    assert_error_counted(&weir, "protocol").await;
}

#[tokio::test]
async fn a_backend_closing_without_an_answer_is_502_reset() {
    let backend = RawBackend::start(b"").await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    let reply = client.response().await;
    assert_error(&reply, 502, "reset", Some("chat@v1"));
    assert_error_counted(&weir, "reset").await;
}

/// A backend that takes a request and never answers, behind a weir that waits 300 ms for a head.
async fn silent_backend_behind_weir() -> (WireBackend, Weir) {
    let backend = WireBackend::start(|mut wire, _| async move {
        if wire.request().await.is_ok() {
            std::future::pending::<()>().await; // holds the connection, says nothing
        }
    })
    .await;
    let weir = weir_with(
        "[proxy]\nresponse_header_timeout = \"300ms\"",
        &backend.url(),
    )
    .await;
    (backend, weir)
}

#[tokio::test]
async fn a_backend_silent_before_its_head_is_504_timeout() {
    let (_backend, weir) = silent_backend_behind_weir().await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    let reply = client.response().await;
    assert_error(&reply, 504, "timeout", Some("chat@v1"));
    assert_error_counted(&weir, "timeout").await;
}

#[tokio::test]
async fn a_backend_stalling_mid_body_cuts_the_client_connection() {
    let backend = WireBackend::start(|mut wire, _| async move {
        let Ok(req) = wire.request().await else {
            return;
        };
        let answer: &[u8] = if req.target.ends_with("/chunked") {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"
        };
        if wire.send(answer).await.is_ok() {
            std::future::pending::<()>().await; // then silence, connection held open
        }
    })
    .await;
    let weir = weir_with("[proxy]\nidle_timeout = \"300ms\"", &backend.url()).await;
    for target in ["/v1/chunked", "/v1/length"] {
        let started = Instant::now();
        let mut client = Wire::connect(weir.proxy).await;
        client.write(get_request(target)).await;
        let head = within("the response head", client.response_head("GET")).await;
        assert_eq!(head.status, 200, "{target}");
        let body = tokio::time::timeout(DEADLINE, client.body(head.framing))
            .await
            .unwrap_or_else(|_| panic!("{target}: the stalled body was never cut"));
        let cut = match body {
            Ok(body) => panic!(
                "{target}: a body the backend never finished ended cleanly for the client: {:?}",
                String::from_utf8_lossy(&body)
            ),
            Err(cut) => cut,
        };
        assert_eq!(cut.body, b"hello", "{target}: {}", cut.why);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{target}: cut after {:?}, idle_timeout is 300ms",
            started.elapsed()
        );
    }
    let labels = [
        ("route", "chat"),
        ("version", "chat@v1"),
        ("kind", "idle_timeout"),
    ];
    assert_eventually_eq!(
        weir.metric("weir_request_errors_total", &labels).await,
        Some(2.0),
        "weir_request_errors_total{labels:?}"
    );
}

// === requests hyper serves, on the fast path's upstream connections ===

type H2Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// An HTTP/2 (prior knowledge) client.
fn h2_client() -> H2Client {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Sends `method target` with `body` over HTTP/2; (status, headers, body or the body's error).
async fn h2_send(
    client: &H2Client,
    weir: &Weir,
    method: &str,
    target: &str,
    body: &str,
) -> (u16, http::HeaderMap, Result<String, String>) {
    use http_body_util::BodyExt;
    let request = http::Request::builder()
        .method(method)
        .uri(format!("http://{}{target}", weir.proxy))
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, client.request(request))
        .await
        .expect("a response head in time")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the body in time")
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .map_err(|e| format!("{e:?}"));
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test]
async fn http2_requests_share_pooled_upstream_connections_and_get_decoded_bodies() {
    let json = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let (backend, requests) = WireBackend::answering(|req| match req.target.as_str() {
        // Extensions, several chunks in one write, and a trailer.
        "/v1/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\nA\r\n0123456789\r\n0\r\nx-checksum: abc\r\n\r\n".to_vec(),
        _ => ok(describe(req)),
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let client = h2_client();
    for _ in 0..5 {
        let (status, headers, body) = h2_send(&client, &weir, "GET", "/v1/models", "").await;
        assert_eq!(status, 200);
        assert_eq!(body.unwrap(), "GET /v1/models");
        assert_eq!(headers["x-weir-version"], "chat@v1");
    }
    let (status, _, body) = h2_send(&client, &weir, "POST", "/v1/chat/completions", json).await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), format!("POST /v1/chat/completions {json}"));
    let (status, headers, body) = h2_send(&client, &weir, "GET", "/v1/chunked", "").await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), "hello world0123456789");
    assert!(headers.get("transfer-encoding").is_none(), "{headers:?}");
    // One after another, the requests took turns on one upstream connection.
    assert_eq!(backend.accepted(), 1);
    // The backend saw HTTP/1.1 heads framed by Content-Length, and the forwarded headers.
    let all = requests.all();
    let post = all.iter().find(|r| r.method == "POST").unwrap();
    assert_eq!(post.headers.all("content-length"), [json.len().to_string()]);
    assert_eq!(post.headers.get("x-forwarded-proto"), Some("http"));
    assert_eq!(post.headers.get("host"), Some(&*weir.proxy.to_string()));
    let get = all.iter().find(|r| r.method == "GET").unwrap();
    assert!(
        get.headers.get("content-length").is_none(),
        "{:?}",
        get.headers
    );
}

#[tokio::test]
async fn http2_requests_get_close_delimited_bodies_whole_and_broken_framing_as_an_error() {
    let backend = WireBackend::start(|mut wire, _| async move {
        while let Ok(req) = wire.request().await {
            let reply: &[u8] = match req.target.as_str() {
                "/v1/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
                "/v1/bad" => {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
                }
                _ => b"HTTP/1.1 204 No Content\r\n\r\n",
            };
            if wire.send(reply).await.is_err() || req.target == "/v1/close" {
                return; // the end of a close-delimited body is the close
            }
        }
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let client = h2_client();
    let (status, _, body) = h2_send(&client, &weir, "GET", "/v1/close", "").await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap(), "until the end");
    // The client sees the stream reset: with the head, or once the head has arrived.
    let request = http::Request::get(format!("http://{}/v1/bad", weir.proxy))
        .body(http_body_util::Full::default())
        .unwrap();
    let outcome = match tokio::time::timeout(DEADLINE, client.request(request)).await {
        Err(_) => panic!("no answer to /v1/bad in time"),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Ok(Ok(response)) => {
            use http_body_util::BodyExt;
            response
                .into_body()
                .collect()
                .await
                .map(|_| ())
                .map_err(|e| format!("{e:?}"))
        }
    };
    assert!(outcome.is_err(), "a body with broken framing ended cleanly");
    assert_error_counted(&weir, "body").await;
    // Neither connection is reused: the next request opens a third one.
    let (status, _, body) = h2_send(&client, &weir, "GET", "/v1/empty", "").await;
    assert_eq!((status, body.unwrap().as_str()), (204, ""));
    assert_eq!(backend.accepted(), 3);
}

#[tokio::test]
async fn broken_chunked_framing_from_the_backend_closes_the_client_connection() {
    let (backend, _) = WireBackend::answering(|_| {
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec()
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    let head = within("the response head", client.response_head("GET")).await;
    assert_eq!(head.status, 200);
    // What was valid arrives; then the connection ends instead of waiting for framing that
    // can never finish.
    let cut = tokio::time::timeout(DEADLINE, client.body(head.framing))
        .await
        .expect("weir gave up on the broken body in time");
    let cut = cut.expect_err("a body with broken framing ended cleanly");
    assert_eq!(cut.body, b"hello");
    assert_error_counted(&weir, "body").await;
}

#[tokio::test]
async fn a_version_header_from_the_backend_is_replaced_by_weirs() {
    let (backend, _) = WireBackend::answering(|_| {
        b"HTTP/1.1 200 OK\r\nX-Weir-Version: other@v9\r\nContent-Length: 2\r\n\r\nok".to_vec()
    })
    .await;
    let weir = weir_with("", &backend.url()).await;
    let mut client = Wire::connect(weir.proxy).await;
    client.write(get_request("/v1/x")).await;
    let reply = client.response().await;
    assert_eq!(reply.headers.all("x-weir-version"), ["chat@v1"]);
}

#[tokio::test]
async fn an_http2_request_to_a_backend_silent_before_its_head_is_504_timeout() {
    let (_backend, weir) = silent_backend_behind_weir().await;
    let (status, headers, body) = h2_send(&h2_client(), &weir, "GET", "/v1/x", "").await;
    assert_eq!(status, 504, "{body:?}");
    assert_eq!(headers["x-weir-version"], "chat@v1");
    assert!(body.unwrap().contains("\"kind\":\"timeout\""));
    assert_error_counted(&weir, "timeout").await;
}
