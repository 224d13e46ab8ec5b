//! Graceful shutdown: open streams finish, new connections are refused, and the drain reports how
//! it ended; the binary does the same on SIGTERM and exits 0.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Whether a new request to `addr` gets no response: the connection is refused, closed, or not
/// served within a second.
async fn new_request_gets_no_response(addr: SocketAddr) -> bool {
    let Ok(stream) = TcpStream::connect(addr).await else {
        return true;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await
    else {
        return true;
    };
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/v1/new")
        .header("host", "weir.test")
        .body(empty())
        .unwrap();
    !matches!(
        tokio::time::timeout(Duration::from_secs(1), sender.send_request(req)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_streams_finish_and_refuses_new_connections() {
    const EVENTS: usize = 6;
    let (backend, ack) = lockstep_sse_backend(EVENTS).await;
    let mut weir = Weir::start(ONE_VERSION, &[("v1", &backend.url())]).await;
    let (head, mut events) = open_stream(&http1(), &weir.url("/v1/stream")).await;
    assert_eq!(head.status, 200);
    assert_eq!(events.next(DEADLINE).await.as_deref(), Some("data: 0"));
    ack.send(0).unwrap();
    assert_eq!(events.next(DEADLINE).await.as_deref(), Some("data: 1"));

    let running = weir.running.take().unwrap();
    running.shutdown();
    let drained = tokio::spawn(async move { running.wait().await });

    assert_eventually!(
        new_request_gets_no_response(weir.proxy).await,
        "weir still serves new connections after shutdown()"
    );
    assert!(
        !drained.is_finished(),
        "wait() returned while a stream was still open"
    );

    for k in 1..EVENTS {
        if k > 1 {
            assert_eq!(
                events.next(DEADLINE).await.as_deref(),
                Some(format!("data: {k}").as_str()),
                "the open stream was cut during the drain"
            );
        }
        let _ = ack.send(k);
    }
    assert_eq!(events.next(DEADLINE).await, None);

    let drained = tokio::time::timeout(DEADLINE, drained)
        .await
        .expect("wait() returns once the last stream has finished")
        .unwrap();
    assert_eq!(format!("{drained:?}"), "Clean");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_times_out_when_a_stream_does_not_finish() {
    // The backend writes the first event and then waits for an acknowledgement that never comes.
    let (backend, _ack) = lockstep_sse_backend(3).await;
    let config = format!("[proxy]\ndrain_timeout = \"500ms\"\n{ONE_VERSION}");
    let mut weir = Weir::start(&config, &[("v1", &backend.url())]).await;
    let (_head, mut events) = open_stream(&http1(), &weir.url("/v1/stream")).await;
    assert_eq!(events.next(DEADLINE).await.as_deref(), Some("data: 0"));

    let running = weir.running.take().unwrap();
    running.shutdown();
    let started = std::time::Instant::now();
    let drained = tokio::time::timeout(DEADLINE, running.wait())
        .await
        .expect("wait() returns after the drain timeout");
    assert_eq!(format!("{drained:?}"), "TimedOut");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "gave up after {:?}, drain_timeout is 500ms",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_drains_open_streams_on_sigterm_and_exits_0() {
    const EVENTS: usize = 5;
    let (backend, ack) = lockstep_sse_backend(EVENTS).await;
    let candidate = Backend::named("chat@v2").await;
    let cwd = temp_dir("sigterm");
    let stable = format!("chat@v1={}", backend.url());
    let candidate_spec = format!("chat@v2={}", candidate.url());
    let mut weir = WeirProcess::spawn(
        &[
            "serve",
            "--stable",
            &stable,
            "--candidate",
            &candidate_spec,
            "--weight",
            "0%",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        cwd.path(),
    );
    let (head, mut events) = open_stream(&http1(), &weir.url("/v1/stream")).await;
    assert_eq!(head.status, 200, "{}", weir.log());
    assert_eq!(head.headers.get("x-weir-version").unwrap(), "chat@v1");
    assert_eq!(events.next(DEADLINE).await.as_deref(), Some("data: 0"));

    weir.sigterm();
    for k in 0..EVENTS {
        if k > 0 {
            assert_eq!(
                events.next(DEADLINE).await.as_deref(),
                Some(format!("data: {k}").as_str()),
                "the open stream was cut after SIGTERM; output:\n{}",
                weir.log()
            );
        }
        let _ = ack.send(k);
    }
    assert_eq!(events.next(DEADLINE).await, None);

    let status = weir.exit_status(DEADLINE).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}; output:\n{}",
        weir.log()
    );
}
