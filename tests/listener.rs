//! The client-facing listener: slow-header clients are cut off, keep-alive connections carry
//! several requests, and backend connections are pooled.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SLOW_HEADERS: &str = r#"
[listener]
addr = "127.0.0.1:0"
header_read_timeout = "300ms"

[[versions]]
model = "m"
version = "v1"
backends = ["{stable}"]

[[routes]]
name = "default"
stable = "m@v1"
"#;

/// Reads until the peer closes; returns what it sent, or `None` if it is still open at the deadline.
async fn read_until_closed(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut out))
        .await
        .ok()
        .map(|_| out)
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let backend = Backend::named("v1").await;
    let weir = Weir::start(SLOW_HEADERS, &[("stable", &backend.url())]).await;

    let mut slow = TcpStream::connect(weir.proxy).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Partial: ")
        .await
        .unwrap();
    let closed = read_until_closed(&mut slow).await;
    assert!(
        closed.is_some(),
        "a connection with an unfinished request head is still open after {DEADLINE:?}"
    );
    assert_eq!(
        backend.hits(),
        0,
        "the partial request must not reach a backend"
    );

    // Other clients are unaffected.
    let reply = get(&http1(), &weir.url("/")).await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn one_keep_alive_connection_carries_several_requests() {
    let backend = Backend::named("v1").await;
    let weir = Weir::start(SLOW_HEADERS, &[("stable", &backend.url())]).await;

    let mut conn = TcpStream::connect(weir.proxy).await.unwrap();
    for i in 0..3 {
        conn.write_all(format!("GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // The backend answers "v1" with a content length; read until the whole answer is in.
        while !(seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.ends_with(b"v1")) {
            let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
                .await
                .expect("an answer before the deadline")
                .unwrap();
            assert!(
                n > 0,
                "weir closed a keep-alive connection after {i} requests"
            );
            seen.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&seen).to_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(head.contains("x-weir-version: m@v1"), "{head}");
    }
}

#[tokio::test]
async fn backend_connections_are_pooled_and_reused() {
    // A backend that counts the TCP connections it accepts.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(full("pooled")))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let weir = Weir::start(SLOW_HEADERS, &[("stable", &format!("http://{addr}"))]).await;
    let client = http1();
    for _ in 0..20 {
        let reply = get(&client, &weir.url("/")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "pooled");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "20 sequential requests should share one pooled backend connection"
    );
}
