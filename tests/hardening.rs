//! Hostile clients: malformed requests get 400, oversized heads 431, slow-header floods neither
//! block other clients nor stay open, and the connection limit holds clients back instead of
//! letting them in.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = r#"
[listener]
addr = "127.0.0.1:0"
{extra}
max_header_bytes = "16KiB"
max_headers = 50

[[versions]]
model = "m"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "default"
stable = "m@v1"
"#;

async fn start(extra: &str, backend: &Backend) -> Weir {
    Weir::start(&CONFIG.replace("{extra}", extra), &[("v1", &backend.url())]).await
}

/// Sends raw bytes and returns everything weir answers until it closes the connection.
async fn raw_exchange(weir: &Weir, bytes: &[u8]) -> String {
    let mut conn = TcpStream::connect(weir.proxy).await.unwrap();
    // The peer may close before reading everything it was sent; that is fine here.
    let _ = conn.write_all(bytes).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "weir kept a connection open after {:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
    );
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_malformed_request_line_gets_400_and_the_connection_is_closed() {
    let backend = Backend::named("v1").await;
    let weir = start("header_read_timeout = \"400ms\"", &backend).await;
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02\r\n\r\n",
    ] {
        let answer = raw_exchange(&weir, junk).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{junk:?} → {answer:?}");
    }
    assert_eq!(backend.hits(), 0);
    assert_eq!(
        get(&http1(), &weir.url("/")).await.status,
        200,
        "weir still serves"
    );
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let backend = Backend::named("v1").await;
    let weir = start("header_read_timeout = \"400ms\"", &backend).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let answer = raw_exchange(&weir, big.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "200 KB header → {:?}",
        &answer[..answer.len().min(80)]
    );

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..80 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(&weir, many.as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "80 headers → {:?}",
        &answer[..answer.len().min(80)]
    );
    assert_eq!(backend.hits(), 0);
}

#[tokio::test]
async fn hundreds_of_slow_header_connections_neither_block_others_nor_stay_open() {
    let backend = Backend::named("v1").await;
    let weir = start("header_read_timeout = \"400ms\"", &backend).await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut conn = TcpStream::connect(weir.proxy).await.unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(conn);
    }
    // Others are served meanwhile.
    let client = http1();
    for _ in 0..10 {
        assert_eq!(get(&client, &weir.url("/")).await.status, 200);
    }
    // And every slow connection is closed by the header read timeout.
    for (i, conn) in slow.iter_mut().enumerate() {
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(DEADLINE, conn.read_to_end(&mut buf)).await;
        assert!(
            closed.is_ok(),
            "slow connection {i} still open after {DEADLINE:?}"
        );
    }
}

#[tokio::test]
async fn the_connection_limit_holds_new_clients_back_until_a_slot_frees() {
    let backend = Backend::named("v1").await;
    let weir = start(
        "max_connections = 2\nheader_read_timeout = \"30s\"",
        &backend,
    )
    .await;
    // Two clients hold both slots with unfinished requests.
    let mut first = TcpStream::connect(weir.proxy).await.unwrap();
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut second = TcpStream::connect(weir.proxy).await.unwrap();
    second
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Make sure both were accepted (the second finishes its request and is answered).
    second.write_all(b"\r\n").await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(DEADLINE, second.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");

    let url = weir.url("/");
    let third = tokio::spawn(async move { get(&http1(), &url).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third client was served past max_connections = 2"
    );
    drop(first);
    let reply = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third client gets in once a slot frees")
        .unwrap();
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let backend = Backend::named("v1").await;
    let weir = start("header_read_timeout = \"300ms\"", &backend).await;
    let mut conn = TcpStream::connect(weir.proxy).await.unwrap();
    conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.ends_with(b"v1") {
        let n = tokio::time::timeout(DEADLINE, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    // Now idle: the next request head never comes, so the connection is closed.
    let closed = tokio::time::timeout(DEADLINE, conn.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "an idle keep-alive connection stayed open: {closed:?}"
    );
}
