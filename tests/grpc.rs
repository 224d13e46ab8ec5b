//! gRPC through the split (issue 19): versions with `protocol = "http2"` are spoken to over HTTP/2
//! (h2c with prior knowledge), so a real gRPC server and client — tonic and its standard health
//! service, which nobody here wrote — talk through weir as they would directly: unary and
//! server-streaming calls, each answered entirely by one version, statuses unchanged.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// The service each version reports on: `chat@v1` says SERVING, `chat@v2` NOT_SERVING, so every
/// answer says which version gave it.
const SERVICE: &str = "inference.Chat";

/// A gRPC health server on loopback reporting `status` for [`SERVICE`].
async fn health_server(serving: bool) -> SocketAddr {
    let (reporter, service) = tonic_health::server::health_reporter();
    let status = if serving {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    reporter.set_service_status(SERVICE, status).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let _keep = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await
    });
    addr
}

/// Quick mode with `chat@v1` at `stable` over HTTP/2, on loopback ports of its own.
fn http2_quick(stable: &str, state: &std::path::Path) -> weir::QuickMode {
    weir::QuickMode {
        stable: format!("chat@v1={stable}"),
        backend_protocol: Some("http2".into()),
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        state_dir: Some(state.to_path_buf()),
        ..Default::default()
    }
}

async fn start(quick: weir::QuickMode) -> weir::Running {
    let config = quick.into_config().expect("a valid quick-mode spec");
    weir::Server::start(config).await.expect("weir starts")
}

/// weir in quick mode, 50/50 between two HTTP/2 backends, sticky on the `x-user` metadata.
async fn weir_over_http2(v1: SocketAddr, v2: SocketAddr, state: &std::path::Path) -> weir::Running {
    start(weir::QuickMode {
        candidate: Some(format!("chat@v2=http://{v2}")),
        weight: Some("50%".into()),
        sticky_header: Some("x-user".into()),
        ..http2_quick(&format!("http://{v1}"), state)
    })
    .await
}

async fn client(running: &weir::Running) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{}", running.proxy_addr()))
        .unwrap()
        .connect()
        .await
        .expect("the gRPC client connects to weir");
    HealthClient::new(channel)
}

fn check(service: &str, user: Option<&str>) -> tonic::Request<HealthCheckRequest> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.into(),
    });
    if let Some(user) = user {
        request
            .metadata_mut()
            .insert("x-user", user.parse().unwrap());
    }
    request
}

fn served_by<T>(response: &tonic::Response<T>) -> String {
    response
        .metadata()
        .get("x-weir-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_string()
}

fn expected_status(version: &str) -> ServingStatus {
    match version {
        "chat@v1" => ServingStatus::Serving,
        "chat@v2" => ServingStatus::NotServing,
        other => panic!("answered by {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_calls_pass_through_the_split_each_answered_by_one_version() {
    let v1 = health_server(true).await;
    let v2 = health_server(false).await;
    let state = temp_dir("grpc-split");
    let running = weir_over_http2(v1, v2, state.path()).await;
    let mut health = client(&running).await;

    // Unary: every call is answered whole by the version the header names.
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..60 {
        let response = health
            .check(check(SERVICE, None))
            .await
            .expect("the call succeeds");
        let version = served_by(&response);
        assert_eq!(
            response.get_ref().status(),
            expected_status(&version),
            "{version} answered"
        );
        *seen.entry(version).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "a 50/50 split reaches both versions: {seen:?}"
    );
    assert!(seen.values().all(|n| *n >= 10), "{seen:?}");

    // Sticky on gRPC metadata: one user keeps one version.
    let mut versions = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let response = health.check(check(SERVICE, Some("alice"))).await.unwrap();
        versions.insert(served_by(&response));
    }
    assert_eq!(versions.len(), 1, "alice changed version: {versions:?}");

    // Server streaming: the first message of a watch comes from the version the header names.
    for _ in 0..6 {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: SERVICE.into(),
        });
        request
            .metadata_mut()
            .insert("x-user", "bob".parse().unwrap());
        let response = health.watch(request).await.expect("the watch starts");
        let version = served_by(&response);
        let mut stream = response.into_inner();
        let first = stream
            .message()
            .await
            .expect("the stream carries a message")
            .expect("one message");
        assert_eq!(
            first.status(),
            expected_status(&version),
            "{version} streamed"
        );
    }
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_error_status_reaches_the_client_unchanged() {
    let v1 = health_server(true).await;
    let v2 = health_server(true).await;
    let state = temp_dir("grpc-status");
    let running = weir_over_http2(v1, v2, state.path()).await;
    let mut health = client(&running).await;
    // The health service answers NOT_FOUND for a service it does not know: in the trailers of
    // an HTTP 200 response (or a trailers-only response), which must pass through as sent.
    for _ in 0..10 {
        let status = health
            .check(check("no.such.Service", None))
            .await
            .expect_err("an unknown service is an error");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }
    running.shutdown();
}

/// A gRPC health server that fails `share` of its calls with INTERNAL (trailers-only, HTTP 200).
async fn failing_health_server(share: f64) -> SocketAddr {
    wrapped_health_server(share, std::time::Duration::ZERO).await
}

/// A gRPC health server served by hyper alone (no tonic middleware, so no deadline of its own)
/// that waits `delay` before each answer and fails `share` of its calls with INTERNAL.
async fn wrapped_health_server(share: f64, delay: std::time::Duration) -> SocketAddr {
    use tonic::codegen::Service as _;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    serve_http2(move |req| {
        let (mut service, _keep) = (service.clone(), reporter.clone());
        async move {
            tokio::time::sleep(delay).await;
            if rand::random::<f64>() < share {
                let failed = tonic::Status::internal("injected failure");
                return Ok(failed.into_http::<tonic::body::Body>());
            }
            service.call(req).await
        }
    })
    .await
}

/// Serves `handle` over HTTP/2 with prior knowledge on loopback, by hyper alone; returns where.
async fn serve_http2<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
        > + Send
        + 'static,
{
    serve_http2_with(Http2Serving::default(), handle).await.addr
}

/// How [`serve_http2_with`] serves each connection.
#[derive(Clone, Copy, Debug, Default)]
struct Http2Serving {
    /// SETTINGS_MAX_CONCURRENT_STREAMS (hyper's default: 200).
    max_streams: Option<u32>,
    /// After this many requests on a connection, it is shut down gracefully: GOAWAY, the
    /// requests already accepted finish, then it closes (as gRPC servers' max connection age).
    requests_per_connection: Option<usize>,
}

/// A server of [`serve_http2_with`]: where it listens, and what it has seen so far.
struct Http2Server {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// PING frames received (not counting acknowledgements).
    pings: Arc<AtomicUsize>,
}

/// [`serve_http2`] as `serving` says.
async fn serve_http2_with<F, Fut>(serving: Http2Serving, handle: F) -> Http2Server
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
        > + Send
        + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Http2Server {
        addr: listener.local_addr().unwrap(),
        connections: Arc::default(),
        pings: Arc::default(),
    };
    let (accepted, pings) = (Arc::clone(&server.connections), Arc::clone(&server.pings));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            let stream = PingCounting {
                io: stream,
                frames: FrameHeaders::default(),
                pings: Arc::clone(&pings),
            };
            let enough = Arc::new(tokio::sync::Notify::new());
            let served = Arc::new(AtomicUsize::new(0));
            let handler = {
                let (handle, enough) = (handle.clone(), Arc::clone(&enough));
                hyper::service::service_fn(move |req| {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    if Some(n) == serving.requests_per_connection {
                        enough.notify_one();
                    }
                    handle(req)
                })
            };
            tokio::spawn(async move {
                let mut builder =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                builder.max_concurrent_streams(serving.max_streams);
                let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), handler);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = enough.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    server
}

/// The frame headers in what a client sends after its 24-byte preface (RFC 9113 §3.4, §4.1).
#[derive(Default)]
struct FrameHeaders {
    preface_left: usize,
    started: bool,
    header: Vec<u8>,
    skip: usize,
}

impl FrameHeaders {
    /// Reads `bytes` on; returns how many PING frames (not acknowledgements) began in them.
    fn pings(&mut self, mut bytes: &[u8]) -> usize {
        if !self.started {
            self.started = true;
            self.preface_left = 24;
        }
        let mut pings = 0;
        while !bytes.is_empty() {
            let skip = if self.preface_left > 0 {
                &mut self.preface_left
            } else {
                &mut self.skip
            };
            if *skip > 0 {
                let n = (*skip).min(bytes.len());
                *skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.header.len() == 9 {
                let h = std::mem::take(&mut self.header);
                self.skip =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                if h[3] == 0x6 && h[4] & 0x1 == 0 {
                    pings += 1;
                }
            }
        }
        pings
    }
}

/// A server connection counting the PINGs its client sends.
struct PingCounting {
    io: tokio::net::TcpStream,
    frames: FrameHeaders,
    pings: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for PingCounting {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let this = &mut *self;
        let pings = this.frames.pings(&buf.filled()[before..]);
        this.pings.fetch_add(pings, Ordering::SeqCst);
        polled
    }
}

impl tokio::io::AsyncWrite for PingCounting {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type Handler = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// A gRPC health service for [`serve_http2_with`] reporting SERVING, answering after `delay`.
async fn slow_health(
    delay: std::time::Duration,
) -> impl Fn(http::Request<hyper::body::Incoming>) -> Handler + Clone + Send + Sync + 'static {
    use tonic::codegen::Service as _;
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(SERVICE, tonic_health::ServingStatus::Serving)
        .await;
    move |req| -> Handler {
        let (mut service, _keep) = (service.clone(), reporter.clone());
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            service.call(req).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_statuses_count_as_errors_of_their_version_and_roll_a_canary_back() {
    let stable = health_server(true).await;
    let failing = failing_health_server(0.3).await;
    let state = temp_dir("grpc-canary");
    let running = start(weir::QuickMode {
        candidate: Some(format!("chat@v2=http://{failing}")),
        canary: Some("50%,100%".into()),
        canary_interval: Some("500ms".into()),
        canary_min_requests: Some(30),
        ..http2_quick(&format!("http://{stable}"), state.path())
    })
    .await;
    let mut health = client(&running).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut failed_calls = 0;
    let status = loop {
        // Every call is answered HTTP 200; the failures are gRPC statuses only.
        if let Err(status) = health.check(check(SERVICE, None)).await {
            assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
            failed_calls += 1;
        }
        if let Some(status) = running.canary().status("default") {
            if status["last_decision"] == "rollback" {
                break status;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no rollback");
    };
    assert!(failed_calls > 0);
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.starts_with("failed gate: error_rate"), "{reason}");
    let scrape = String::from_utf8(running.writer().metrics().encode()).unwrap();
    let internal = scrape
        .lines()
        .find(|l| {
            l.starts_with("weir_grpc_errors_total{")
                && l.contains("code=\"INTERNAL\"")
                && l.contains("version=\"chat@v2\"")
        })
        .unwrap_or_else(|| panic!("no INTERNAL count for chat@v2:\n{scrape}"));
    let counted: u64 = internal.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        counted >= 1 && counted <= failed_calls,
        "{internal} vs {failed_calls} failed calls"
    );
    assert!(
        !scrape.contains("weir_grpc_errors_total{code=\"INTERNAL\",role=\"stable\""),
        "stable answered no error"
    );
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_gives_the_grpc_client_a_grpc_status_not_a_json_502() {
    let refused = refused_url();
    let state = temp_dir("grpc-dead");
    let running = start(http2_quick(&refused, state.path())).await;
    let mut health = client(&running).await;
    let status = health
        .check(check(SERVICE, None))
        .await
        .expect_err("nothing listens there");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("chat@v1"),
        "weir's message names the version: {status:?}"
    );
    assert_eq!(
        status
            .metadata()
            .get("x-weir-version")
            .and_then(|v| v.to_str().ok()),
        Some("chat@v1")
    );
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_only_backend_behind_an_http1_version_is_logged_with_the_fix() {
    let backend = health_server(true).await;
    let dir = temp_dir("grpc-hint");
    let stable = format!("chat@v1=http://{backend}");
    let state = dir.path().display().to_string();
    let weir = WeirProcess::spawn(
        &[
            "serve",
            "--stable",
            &stable,
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--state-dir",
            &state,
        ],
        dir.path(),
    );
    let channel = Channel::from_shared(format!("http://{}", weir.proxy))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let status = HealthClient::new(channel)
        .check(check(SERVICE, None))
        .await
        .expect_err("weir speaks HTTP/1.1 to a version without protocol = \"http2\"");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eventually!(
        within std::time::Duration::from_secs(10),
        weir.log().contains("answered an HTTP/1.1 request in HTTP/2")
            && weir.log().contains("protocol = \"http2\""),
        "no hint in the log:\n{}",
        weir.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_honours_the_calls_grpc_timeout() {
    use http_body_util::BodyExt;
    // The backend answers after 5 s and enforces no deadline; the call allows 300 ms. A raw
    // HTTP/2 client sends it, so no client-side deadline races weir's.
    let slow = wrapped_health_server(0.0, std::time::Duration::from_secs(5)).await;
    let state = temp_dir("grpc-deadline");
    let running = start(http2_quick(&format!("http://{slow}"), state.path())).await;
    // HealthCheckRequest { service: SERVICE } in a gRPC frame: no compression, length, message.
    let mut message = vec![0x0a, SERVICE.len() as u8];
    message.extend_from_slice(SERVICE.as_bytes());
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = http::Request::post(format!(
        "http://{}/grpc.health.v1.Health/Check",
        running.proxy_addr()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "300m")
    .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
    .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = client.request(request).await.expect("weir answers");
    let (parts, body) = response.into_parts();
    let trailers = body.collect().await.unwrap().trailers().cloned();
    let status = parts
        .headers
        .get("grpc-status")
        .or(trailers.as_ref().and_then(|t| t.get("grpc-status")))
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    assert_eq!(parts.status, http::StatusCode::OK);
    assert_eq!(status.as_deref(), Some("4"), "DEADLINE_EXCEEDED: {parts:?}");
    assert_eq!(
        parts.headers["x-weir-version"], "chat@v1",
        "weir answered, not the backend"
    );
    running.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_succeed_over_a_backend_that_takes_a_hundred_streams() {
    // Each call holds its stream for 50 ms, so the calls overlap far past 100 streams.
    let serving = Http2Serving {
        max_streams: Some(100),
        ..Default::default()
    };
    let slow = slow_health(std::time::Duration::from_millis(50)).await;
    let Http2Server {
        addr: backend,
        connections,
        ..
    } = serve_http2_with(serving, slow).await;
    let state = temp_dir("grpc-streams");
    let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
    let health = client(&running).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let mut health = health.clone();
        calls.spawn(async move {
            health
                .check(check(SERVICE, None))
                .await
                .map(|r| r.into_inner())
        });
    }
    let mut served = 0;
    while let Some(done) = calls.join_next().await {
        let answer = done.unwrap().expect("every call succeeds");
        assert_eq!(answer.status(), ServingStatus::Serving);
        served += 1;
    }
    assert_eq!(served, 1000);
    // Full connections make weir open more, up to `http2_max_connections_per_backend` (4).
    let opened = connections.load(Ordering::SeqCst);
    assert!(
        (2..=4).contains(&opened),
        "a backend taking 100 streams at once got {opened} connections for 1,000 calls"
    );
    running.shutdown();
}

/// A backend that shuts each connection down gracefully after 10 calls (GOAWAY, as gRPC servers
/// do at their max connection age): the calls it accepted finish on the old connection, new
/// ones go to a new connection, and no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_survive_a_backend_that_sends_goaway_every_ten_calls() {
    let serving = Http2Serving {
        requests_per_connection: Some(10),
        ..Default::default()
    };
    let slow = slow_health(std::time::Duration::from_millis(30)).await;
    let Http2Server {
        addr: backend,
        connections,
        ..
    } = serve_http2_with(serving, slow).await;
    let state = temp_dir("grpc-goaway");
    let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
    let health = client(&running).await;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut health = health.clone();
        workers.spawn(async move {
            for _ in 0..25 {
                let answer = health.check(check(SERVICE, None)).await?;
                assert_eq!(answer.get_ref().status(), ServingStatus::Serving);
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap()
            .expect("no call fails while connections are drained");
    }
    let opened = connections.load(Ordering::SeqCst);
    assert!(
        opened >= 10,
        "200 calls, 10 per connection, on {opened} connections"
    );
    running.shutdown();
}

/// A gRPC service written on tonic's server machinery with a codec of raw bytes (no generated
/// code): `/test.Echo/Collect` (client streaming) joins every message it gets, `/test.Echo/Chat`
/// (bidirectional) echoes each message as it comes.
mod echo {
    use std::pin::Pin;

    use bytes::{Buf, BufMut};
    use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::codegen::tokio_stream::{wrappers::ReceiverStream, Stream};
    use tonic::codegen::Future;
    use tonic::{Status, Streaming};

    #[derive(Clone, Copy, Debug, Default)]
    pub struct Raw;

    impl tonic::codec::Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }

    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Raw {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let n = src.remaining();
            Ok(Some(src.copy_to_bytes(n).to_vec()))
        }
    }

    type Boxed<T> = Pin<Box<dyn Future<Output = Result<tonic::Response<T>, Status>> + Send>>;
    type Echoes = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Status>> + Send>>;

    /// Client streaming: the server's name, then every message joined.
    struct Collect {
        name: &'static str,
    }

    impl tonic::server::ClientStreamingService<Vec<u8>> for Collect {
        type Response = Vec<u8>;
        type Future = Boxed<Vec<u8>>;
        fn call(&mut self, request: tonic::Request<Streaming<Vec<u8>>>) -> Self::Future {
            let name = self.name;
            Box::pin(async move {
                let mut messages = request.into_inner();
                let mut all = format!("{name}:").into_bytes();
                while let Some(message) = messages.message().await? {
                    all.extend(message);
                }
                Ok(tonic::Response::new(all))
            })
        }
    }

    /// Bidirectional: each message echoed as it comes, after the server's name.
    struct Chat {
        name: &'static str,
    }

    impl tonic::server::StreamingService<Vec<u8>> for Chat {
        type Response = Vec<u8>;
        type ResponseStream = Echoes;
        type Future = Boxed<Echoes>;
        fn call(&mut self, request: tonic::Request<Streaming<Vec<u8>>>) -> Self::Future {
            let name = self.name;
            Box::pin(async move {
                let mut messages = request.into_inner();
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tokio::spawn(async move {
                    while let Ok(Some(message)) = messages.message().await {
                        let echo = [format!("{name}:").as_bytes(), &message].concat();
                        if tx.send(Ok(echo)).await.is_err() {
                            return;
                        }
                    }
                });
                Ok(tonic::Response::new(
                    Box::pin(ReceiverStream::new(rx)) as Echoes
                ))
            })
        }
    }

    /// Server streaming, without end: a tick every 20 ms until the call goes away, which it
    /// reports on `gone`.
    struct Ticks {
        gone: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl tonic::server::ServerStreamingService<Vec<u8>> for Ticks {
        type Response = Vec<u8>;
        type ResponseStream = Echoes;
        type Future = Boxed<Echoes>;
        fn call(&mut self, _request: tonic::Request<Vec<u8>>) -> Self::Future {
            let gone = self.gone.clone();
            Box::pin(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    loop {
                        if tx.send(Ok(b"tick".to_vec())).await.is_err() {
                            let _ = gone.send(());
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                });
                Ok(tonic::Response::new(
                    Box::pin(ReceiverStream::new(rx)) as Echoes
                ))
            })
        }
    }

    /// Server streaming: 16 KiB messages as fast as the call takes them, counting the bytes
    /// handed to the transport in `sent`.
    struct Flood {
        sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tonic::server::ServerStreamingService<Vec<u8>> for Flood {
        type Response = Vec<u8>;
        type ResponseStream = Echoes;
        type Future = Boxed<Echoes>;
        fn call(&mut self, _request: tonic::Request<Vec<u8>>) -> Self::Future {
            let sent = std::sync::Arc::clone(&self.sent);
            Box::pin(async move {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                tokio::spawn(async move {
                    let message = vec![b'x'; 16 * 1024];
                    while tx.send(Ok(message.clone())).await.is_ok() {
                        sent.fetch_add(message.len(), std::sync::atomic::Ordering::SeqCst);
                    }
                });
                Ok(tonic::Response::new(
                    Box::pin(ReceiverStream::new(rx)) as Echoes
                ))
            })
        }
    }

    /// What the echo server reports of its streaming calls.
    #[derive(Clone)]
    pub struct Reports {
        /// What `/test.Echo/Collect` and `/test.Echo/Chat` put before their answers.
        pub name: &'static str,
        /// One message per `/test.Echo/Ticks` call that went away.
        pub gone: tokio::sync::mpsc::UnboundedSender<()>,
        /// Bytes `/test.Echo/Flood` calls have handed to the transport.
        pub flooded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    }

    /// Serves the echo service over HTTP/2 on loopback.
    pub async fn server(name: &'static str) -> std::net::SocketAddr {
        server_reporting(Reports {
            name,
            gone: tokio::sync::mpsc::unbounded_channel().0,
            flooded: Default::default(),
        })
        .await
    }

    /// [`server`], telling `reports` what its streaming calls did.
    pub async fn server_reporting(reports: Reports) -> std::net::SocketAddr {
        super::serve_http2(move |req: http::Request<hyper::body::Incoming>| {
            let reports = reports.clone();
            async move {
                let mut grpc = tonic::server::Grpc::new(Raw);
                let response = match req.uri().path() {
                    "/test.Echo/Collect" => {
                        let collect = Collect { name: reports.name };
                        grpc.client_streaming(collect, req).await
                    }
                    "/test.Echo/Chat" => grpc.streaming(Chat { name: reports.name }, req).await,
                    "/test.Echo/Ticks" => {
                        let ticks = Ticks { gone: reports.gone };
                        grpc.server_streaming(ticks, req).await
                    }
                    "/test.Echo/Flood" => {
                        let flood = Flood {
                            sent: reports.flooded,
                        };
                        grpc.server_streaming(flood, req).await
                    }
                    _ => Status::unimplemented("no such method").into_http(),
                };
                Ok(response)
            }
        })
        .await
    }
}

/// Client-streaming and bidirectional calls through a 50/50 split: every message of a call comes
/// from the one version that weir names for it, and both versions serve calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_streaming_and_bidirectional_calls_stream_through_weir() {
    use tonic::codegen::http::uri::PathAndQuery;
    use tonic::codegen::tokio_stream::{self, wrappers::ReceiverStream};
    let v1 = echo::server("chat@v1").await;
    let v2 = echo::server("chat@v2").await;
    let state = temp_dir("grpc-echo");
    let running = weir_over_http2(v1, v2, state.path()).await;
    let channel = Channel::from_shared(format!("http://{}", running.proxy_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut seen = BTreeMap::<String, usize>::new();
    for _ in 0..16 {
        // Client streaming: three messages in, one joined answer out.
        grpc.ready().await.unwrap();
        let parts = vec![b"canary ".to_vec(), b"through ".to_vec(), b"weir".to_vec()];
        let joined = grpc
            .client_streaming(
                tonic::Request::new(tokio_stream::iter(parts)),
                PathAndQuery::from_static("/test.Echo/Collect"),
                echo::Raw,
            )
            .await
            .expect("the client-streaming call succeeds");
        let version = served_by(&joined);
        let expected = format!("{version}:canary through weir");
        assert_eq!(joined.into_inner(), expected.as_bytes());
        *seen.entry(format!("collect {version}")).or_default() += 1;

        // Bidirectional: each message is echoed before the next is sent, so nothing waits for
        // the request to end.
        grpc.ready().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(1);
        let response = grpc.streaming(
            tonic::Request::new(ReceiverStream::new(rx)),
            PathAndQuery::from_static("/test.Echo/Chat"),
            echo::Raw,
        );
        tx.send(b"first".to_vec()).await.unwrap();
        let response = response.await.expect("the bidi call starts");
        let version = served_by(&response);
        let mut echoes = response.into_inner();
        for word in ["first", "second", "third"] {
            if word != "first" {
                tx.send(word.as_bytes().to_vec()).await.unwrap();
            }
            let echo = tokio::time::timeout(std::time::Duration::from_secs(10), echoes.message())
                .await
                .expect("the echo comes while the request is still open")
                .unwrap()
                .unwrap();
            assert_eq!(echo, format!("{version}:{word}").as_bytes());
        }
        drop(tx);
        assert!(
            echoes.message().await.unwrap().is_none(),
            "the call ends with OK"
        );
        *seen.entry(format!("chat {version}")).or_default() += 1;
    }
    assert_eq!(
        seen.len(),
        4,
        "both kinds of call reach both versions: {seen:?}"
    );
    running.shutdown();
}

/// weir over an echo server that tells `reports`, and a raw-bytes gRPC client of weir.
async fn echo_through_weir(
    reports: echo::Reports,
    tag: &str,
) -> (weir::Running, tonic::client::Grpc<Channel>, TempDir) {
    let backend = echo::server_reporting(reports).await;
    let state = temp_dir(tag);
    let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
    let channel = Channel::from_shared(format!("http://{}", running.proxy_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (running, tonic::client::Grpc::new(channel), state)
}

/// A client that stops reading a server-streaming call (tonic resets the stream) stops it at
/// the backend too; and a call's `grpc-timeout` bounds the whole call, not just its first
/// answer: the stream is ended with DEADLINE_EXCEEDED by weir and stopped at the backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_overdue_streaming_call_is_stopped_at_the_backend() {
    use tonic::codegen::http::uri::PathAndQuery;
    let (gone_tx, mut gone) = tokio::sync::mpsc::unbounded_channel();
    let reports = echo::Reports {
        name: "echo",
        gone: gone_tx,
        flooded: Default::default(),
    };
    let (running, mut grpc, _state) = echo_through_weir(reports, "grpc-cancel").await;
    let ticks = PathAndQuery::from_static("/test.Echo/Ticks");
    let wait = std::time::Duration::from_secs(10);

    // Cancelled: read three ticks, then drop the call.
    grpc.ready().await.unwrap();
    let response = grpc
        .server_streaming(tonic::Request::new(Vec::new()), ticks.clone(), echo::Raw)
        .await
        .expect("the call starts");
    let mut stream = response.into_inner();
    for _ in 0..3 {
        assert_eq!(stream.message().await.unwrap().unwrap(), b"tick");
    }
    drop(stream);
    tokio::time::timeout(wait, gone.recv())
        .await
        .expect("the backend's stream is stopped when the client cancels");

    // Overdue: 300 ms allowed; ticks flow until then, then weir ends the call.
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(Vec::new());
    request
        .metadata_mut()
        .insert("grpc-timeout", "300m".parse().unwrap());
    let started = std::time::Instant::now();
    let mut stream = grpc
        .server_streaming(request, ticks, echo::Raw)
        .await
        .expect("the call starts")
        .into_inner();
    let mut received = 0;
    let status = loop {
        match tokio::time::timeout(wait, stream.message())
            .await
            .expect("the call ends")
        {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("the call ended with OK after {received} ticks"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("chat@v1"), "{status:?}");
    assert!(received >= 3, "ticks flowed until the deadline: {received}");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "not before the deadline"
    );
    tokio::time::timeout(wait, gone.recv())
        .await
        .expect("the backend's stream is stopped at the deadline");
    let scrape = String::from_utf8(running.writer().metrics().encode()).unwrap();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("weir_grpc_errors_total{")
                && l.contains("code=\"DEADLINE_EXCEEDED\"")),
        "the overdue call counts as an error of its version"
    );
    running.shutdown();
}

/// A call that gives up while weir is still connecting for it (its deadline passed) ends that
/// attempt: the next call tries again instead of waiting on attempts nobody is waiting for. The
/// backend here takes TCP connections and never answers the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_give_up_while_connecting_leave_no_attempt_behind() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });
    let state = temp_dir("grpc-stalled-connect");
    let mut config = http2_quick(&format!("https://{addr}"), state.path())
        .into_config()
        .unwrap();
    config.proxy.connect_timeout = std::time::Duration::from_secs(2);
    let running = weir::Server::start(config).await.expect("weir starts");
    let after_start = accepted.load(Ordering::SeqCst);
    let mut health = client(&running).await;
    for i in 0..8 {
        let mut request = check(SERVICE, None);
        request
            .metadata_mut()
            .insert("grpc-timeout", "150m".parse().unwrap());
        // tonic's client keeps the deadline too: whichever side gives up first ends the call.
        let status = health.check(request).await.expect_err("nothing answers");
        assert!(
            matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "call {i}: {status:?}"
        );
    }
    let attempts = accepted.load(Ordering::SeqCst) - after_start;
    assert_eq!(attempts, 8, "each call made its own connection attempt");
    running.shutdown();
}

/// An idle HTTP/2 backend connection is kept alive by PINGs, every
/// `proxy.http2_keepalive_interval`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_backend_connections_are_pinged() {
    let slow = slow_health(std::time::Duration::ZERO).await;
    let server = serve_http2_with(Http2Serving::default(), slow).await;
    let state = temp_dir("grpc-ping");
    let mut config = http2_quick(&format!("http://{}", server.addr), state.path())
        .into_config()
        .unwrap();
    config.proxy.http2_keepalive_interval = std::time::Duration::from_millis(100);
    let running = weir::Server::start(config).await.expect("weir starts");
    let mut health = client(&running).await;
    health.check(check(SERVICE, None)).await.expect("answered");
    let before = server.pings.load(Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let pinged = server.pings.load(Ordering::SeqCst) - before;
    assert!(
        pinged >= 3,
        "{pinged} PINGs in 800 ms of idleness at a 100 ms interval"
    );
    assert_eq!(
        server.connections.load(Ordering::SeqCst),
        1,
        "one connection, kept"
    );
    running.shutdown();
}

/// Flow control end to end: a backend streaming as fast as it can to a client that stops
/// reading is held back by HTTP/2 windows, so weir buffers a bounded amount, not the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_grpc_reader_holds_the_backend_back_instead_of_weir_buffering() {
    use tonic::codegen::http::uri::PathAndQuery;
    let flooded = Arc::new(AtomicUsize::new(0));
    let reports = echo::Reports {
        name: "echo",
        gone: tokio::sync::mpsc::unbounded_channel().0,
        flooded: Arc::clone(&flooded),
    };
    let (running, mut grpc, _state) = echo_through_weir(reports, "grpc-flow").await;
    grpc.ready().await.unwrap();
    let mut stream = grpc
        .server_streaming(
            tonic::Request::new(Vec::new()),
            PathAndQuery::from_static("/test.Echo/Flood"),
            echo::Raw,
        )
        .await
        .expect("the call starts")
        .into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().len(), 16 * 1024);
    // The client reads nothing more for a second; loopback would carry gigabytes meanwhile.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let held = flooded.load(Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let later = flooded.load(Ordering::SeqCst);
    assert_eq!(
        held, later,
        "the backend is stalled while the client does not read"
    );
    assert!(
        held < 16 * 1024 * 1024,
        "{held} bytes left the backend for a client that read 16 KiB"
    );
    // Reading again lets it go on.
    for _ in 0..200 {
        stream.message().await.unwrap().unwrap();
    }
    assert!(flooded.load(Ordering::SeqCst) > later);
    drop(stream);
    running.shutdown();
}

/// The identity probe asks a gRPC backend's standard health service: a backend that does not
/// report the version's identity SERVING takes no calls, and takes them once it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_identity_probe_checks_grpc_backends_by_their_health_service() {
    use tonic_health::ServingStatus as Status;
    // Each backend also reports on "which", so an answer shows which backend gave it.
    let backend = |statuses: Vec<(&'static str, Status)>| async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        for (name, status) in statuses {
            reporter.set_service_status(name, status).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        (addr, reporter)
    };
    let (right, _keep) = backend(vec![
        ("chat@v1", Status::Serving),
        ("which", Status::Serving),
    ])
    .await;
    // Loaded with other weights: it knows chat@v0, not chat@v1.
    let (wrong, reporter) = backend(vec![
        ("chat@v0", Status::Serving),
        ("which", Status::NotServing),
    ])
    .await;
    let state = temp_dir("grpc-identity");
    let running = start(weir::QuickMode {
        identity_probe: Some("grpc-health".into()),
        identity_interval: Some("150ms".into()),
        ..http2_quick(&format!("http://{right},http://{wrong}"), state.path())
    })
    .await;
    let mut health = client(&running).await;
    let answers = |health: &mut HealthClient<Channel>| {
        let mut health = health.clone();
        async move {
            let mut serving = (0, 0);
            for _ in 0..20 {
                let answer = health.check(check("which", None)).await.expect("answered");
                match answer.get_ref().status() {
                    ServingStatus::Serving => serving.0 += 1,
                    _ => serving.1 += 1,
                }
            }
            serving
        }
    };
    assert_eq!(
        answers(&mut health).await,
        (20, 0),
        "only the right backend serves"
    );
    let scrape = String::from_utf8(running.writer().metrics().encode()).unwrap();
    let flagged = scrape
        .lines()
        .find(|l| l.starts_with("weir_backend_version_mismatch{") && l.contains(&wrong.to_string()))
        .unwrap_or_else(|| panic!("no mismatch gauge for {wrong}:\n{scrape}"));
    assert!(flagged.ends_with(" 1"), "{flagged}");

    // The backend loads chat@v1: within a probe interval it is back in rotation.
    reporter
        .set_service_status("chat@v1", Status::Serving)
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if answers(&mut health).await.1 > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backend never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    running.shutdown();
}

/// Trailers for every client: an HTTP/1.1 backend's chunked trailers reach an HTTP/2 client as
/// trailing HEADERS, without the fields no trailer may carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_chunked_trailers_reach_an_http2_client() {
    use http_body_util::BodyExt;
    let (backend, _requests) = common::wire::WireBackend::answering(|_| {
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
          5\r\nhello\r\n0\r\nx-checksum: sha256:abc\r\ncontent-length: 99\r\n\r\n"
            .to_vec()
    })
    .await;
    let state = temp_dir("h1-trailers");
    let running = start(weir::QuickMode {
        backend_protocol: None,
        ..http2_quick(&format!("http://{}", backend.addr), state.path())
    })
    .await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    for _ in 0..3 {
        let uri: http::Uri = format!("http://{}/v1/x", running.proxy_addr())
            .parse()
            .unwrap();
        let response = client.get(uri).await.expect("weir answers");
        assert_eq!(response.status(), http::StatusCode::OK);
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().expect("the trailers arrive");
        assert_eq!(trailers["x-checksum"], "sha256:abc");
        assert!(trailers.get("content-length").is_none(), "{trailers:?}");
        assert_eq!(collected.to_bytes(), "hello");
    }
    running.shutdown();
}

/// And the reverse: an HTTP/1.1 client's chunked request trailers reach an HTTP/2 backend as
/// trailing HEADERS, without the fields no trailer may carry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_trailers_reach_an_http2_backend() {
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = serve_http2(|req: http::Request<hyper::body::Incoming>| async move {
        let collected = req.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let seen: Vec<String> = trailers
            .iter()
            .map(|(name, value)| format!("{name}={}", value.to_str().unwrap()))
            .collect();
        let mut response = http::Response::new(tonic::body::Body::empty());
        response.headers_mut().insert(
            "x-body",
            String::from_utf8(collected.to_bytes().to_vec())
                .unwrap()
                .parse()
                .unwrap(),
        );
        response
            .headers_mut()
            .insert("x-trailers", seen.join(";").parse().unwrap());
        Ok(response)
    })
    .await;
    let state = temp_dir("h1-request-trailers");
    let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
    let mut client = tokio::net::TcpStream::connect(running.proxy_addr())
        .await
        .unwrap();
    client
        .write_all(
            b"POST /v1/upload HTTP/1.1\r\nhost: weir\r\ntransfer-encoding: chunked\r\n\
              trailer: x-checksum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\
              x-checksum: sha256:abc\r\ncontent-length: 99\r\nx-forwarded-for: 6.6.6.6\r\n\
              proxy-connection: keep-alive\r\nx-weir-version: chat@v9\r\n\r\n",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), client.read(&mut buf))
            .await
            .expect("weir answers")
            .unwrap();
        assert!(n > 0, "weir closed without answering");
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("x-body: hello world\r\n"), "{answer}");
    assert!(
        answer.contains("x-trailers: x-checksum=sha256:abc\r\n"),
        "the trailer arrives, without content-length, a spoofed x-forwarded-for, a \
         proxy-connection or weir's override: {answer}"
    );
    running.shutdown();
}

/// A backend that resets every connection at once, or answers the HTTP/2 preface with GOAWAY
/// (taking no stream): each gives the gRPC client UNAVAILABLE from weir, not a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_and_goaway_backends_give_the_client_unavailable() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let serve = |goaway: bool| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if goaway {
                        let mut preface = [0u8; 24];
                        let _ = stream.read_exact(&mut preface).await;
                        // SETTINGS (empty), then GOAWAY: last stream 0, NO_ERROR.
                        let mut frames = vec![0, 0, 0, 4, 0, 0, 0, 0, 0];
                        frames.extend_from_slice(&[0, 0, 8, 7, 0, 0, 0, 0, 0]);
                        frames.extend_from_slice(&[0; 8]);
                        let _ = stream.write_all(&frames).await;
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    drop(stream);
                });
            }
        });
        addr
    };
    for (what, goaway) in [("reset", false), ("goaway", true)] {
        let backend = serve(goaway).await;
        let state = temp_dir("grpc-broken");
        let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
        let mut health = client(&running).await;
        let status = health
            .check(check(SERVICE, None))
            .await
            .expect_err("the backend answers nothing");
        assert_eq!(
            status.code(),
            tonic::Code::Unavailable,
            "{what}: {status:?}"
        );
        assert!(status.message().contains("chat@v1"), "{what}: {status:?}");
        running.shutdown();
    }
}

/// Unary gRPC calls can be mirrored: the candidate's answers are compared with stable's by status
/// (its grpc-status, behind HTTP 200) and exact bytes, and its agreement counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_grpc_calls_are_mirrored_and_compared_by_grpc_status() {
    let agreement = |scrape: &str| -> Option<f64> {
        scrape
            .lines()
            .find(|l| l.starts_with("weir_mirror_agreement_ratio{") && l.contains("chat@v2"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    for (serving, expected) in [(true, 1.0), (false, 0.0)] {
        let stable = health_server(true).await;
        // Registered: the same answer. Not registered: NOT_FOUND, in a grpc-status behind 200.
        let candidate = if serving {
            health_server(true).await
        } else {
            let (_reporter, service) = tonic_health::server::health_reporter();
            serve_http2(move |req| {
                let mut service = service.clone();
                async move { tonic::codegen::Service::call(&mut service, req).await }
            })
            .await
        };
        let state = temp_dir("grpc-mirror");
        let running = start(weir::QuickMode {
            candidate: Some(format!("chat@v2=http://{candidate}")),
            mirror: Some("100%".into()),
            ..http2_quick(&format!("http://{stable}"), state.path())
        })
        .await;
        let mut health = client(&running).await;
        for _ in 0..20 {
            let answer = health
                .check(check(SERVICE, None))
                .await
                .expect("stable answers");
            assert_eq!(served_by(&answer), "chat@v1", "weight 0: stable serves");
        }
        let metrics = running.writer().metrics();
        assert_eventually!(
            within std::time::Duration::from_secs(10),
            agreement(&String::from_utf8(metrics.encode()).unwrap()) == Some(expected),
            "agreement is not {expected}:\n{}",
            String::from_utf8(metrics.encode()).unwrap()
        );
        running.shutdown();
    }
}

/// HTTP/1.1 clients may be sent to HTTP/2 backends too: weir serves them through its general path
/// and speaks h2c upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_reaches_an_http2_backend() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = serve_http2(|req: http::Request<hyper::body::Incoming>| async move {
        let said = format!("{:?} {} over h2", req.version(), req.uri().path());
        let body = http_body_util::Full::new(bytes::Bytes::from(said));
        Ok(http::Response::new(tonic::body::Body::new(body)))
    })
    .await;
    let state = temp_dir("h1-to-h2");
    let running = start(http2_quick(&format!("http://{backend}"), state.path())).await;
    let mut stream = tokio::net::TcpStream::connect(running.proxy_addr())
        .await
        .unwrap();
    stream
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: weir\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("x-weir-version: chat@v1\r\n"), "{answer}");
    assert!(answer.ends_with("HTTP/2.0 /v1/models over h2"), "{answer}");
    running.shutdown();
}
