//! Backends that fail after the response head: the client's stream must end with an error, never
//! with a clean-looking end, and the failure is counted per version and kind.

mod common;

use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const CONFIG: &str = r#"
[proxy]
idle_timeout = "300ms"

[[versions]]
model = "m"
version = "v1"
backends = ["{stable}"]

[[routes]]
name = "default"
stable = "m@v1"
"#;

/// A raw backend that reads one request head, sends a chunked response head and one chunk, and
/// then either closes the socket (`stall == false`) or goes silent while keeping it open.
async fn half_answering_backend(stall: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n")
                    .await;
                if stall {
                    // Hold the connection open without another byte until the peer leaves.
                    let _ = stream.read(&mut buf).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn body_outcome(weir: &Weir) -> (u16, Result<bytes::Bytes, String>) {
    let response =
        tokio::time::timeout(DEADLINE, http1().get(weir.url("/stream").parse().unwrap()))
            .await
            .expect("a response head before the deadline")
            .expect("the response head arrives");
    let status = response.status().as_u16();
    assert_eq!(response.headers()["x-weir-version"], "m@v1");
    let body = tokio::time::timeout(DEADLINE, response.into_body().collect())
        .await
        .expect("the body ends (cleanly or not) before the deadline")
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    (status, body)
}

#[tokio::test]
async fn a_backend_that_breaks_off_mid_body_breaks_the_clients_stream() {
    let url = half_answering_backend(false).await;
    let weir = Weir::start(CONFIG, &[("stable", &url)]).await;
    let (status, body) = body_outcome(&weir).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the client saw a clean end: {body:?}");
    assert_eventually!(
        weir.metric(
            "weir_request_errors_total",
            &[("version", "m@v1"), ("kind", "body")]
        )
        .await
            == Some(1.0),
        "mid-body failure not counted as kind=body"
    );
}

#[tokio::test]
async fn a_backend_that_goes_silent_mid_body_hits_the_idle_timeout() {
    let url = half_answering_backend(true).await;
    let weir = Weir::start(CONFIG, &[("stable", &url)]).await;
    let (status, body) = body_outcome(&weir).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "the client saw a clean end: {body:?}");
    assert_eventually!(
        weir.metric(
            "weir_request_errors_total",
            &[("version", "m@v1"), ("kind", "idle_timeout")]
        )
        .await
            == Some(1.0),
        "silence not counted as kind=idle_timeout"
    );
}
