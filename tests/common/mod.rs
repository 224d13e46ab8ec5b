//! Shared helpers for the integration tests: in-process mock backends, a weir started from a TOML
//! template, HTTP/1.1 and HTTP/2 clients, polling with a deadline and a Prometheus scrape reader.
//!
//! Everything listens on 127.0.0.1 port 0; nothing here sleeps to wait for a result.
#![allow(dead_code)]

pub mod browser;
pub mod etcd;
pub mod pki;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_parse::{Scrape, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every request and response the helpers build.
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = Client<HttpConnector, Body>;

/// How long a test waits for something that should happen promptly.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Polls `$cond` (which may `.await`) every 25 ms until it is true, or panics with the message
/// once [`DEADLINE`] (or the `within` duration given first) has passed. The message is formatted
/// after the last poll, so it can show the last observed value.
#[macro_export]
macro_rules! assert_eventually {
    (within $within:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = ::std::time::Instant::now() + $within;
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!($($msg)+);
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(25)).await;
        }
    }};
    ($cond:expr) => {
        $crate::assert_eventually!($cond, "never became true: {}", stringify!($cond))
    };
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(within $crate::common::DEADLINE, $cond, $($msg)+)
    };
}

/// Polls `$actual` (which may `.await`) every 25 ms until it equals `$expected`, or panics with
/// the message and the last value seen once [`DEADLINE`] has passed.
#[macro_export]
macro_rules! assert_eventually_eq {
    ($actual:expr, $expected:expr, $($msg:tt)+) => {{
        let expected = $expected;
        let deadline = ::std::time::Instant::now() + $crate::common::DEADLINE;
        loop {
            let actual = $actual;
            if actual == expected {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!(
                    "{}: still {:?} after {:?}, expected {:?}",
                    format!($($msg)+),
                    actual,
                    $crate::common::DEADLINE,
                    expected
                );
            }
            ::tokio::time::sleep(::std::time::Duration::from_millis(25)).await;
        }
    }};
}

// === bodies ===

/// One version, `chat@v1` on the backend `{v1}`, and one route to it for every path.
pub const ONE_VERSION: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
stable = "chat@v1"
"#;

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// A body fed chunk by chunk through a channel; it has no size hint, so HTTP/1.1 sends it
/// chunked. Dropping the sender ends the body; the sender's `send` fails (and `closed()`
/// resolves) once whoever reads the body has dropped it.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody { rx }.boxed())
}

/// Deterministic pseudo-random bytes (xorshift), so large bodies are not trivially compressible
/// or repetitive.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams a body (with a per-frame deadline) and returns its length and SHA-256.
pub async fn hash_body<B>(mut body: B) -> (usize, String)
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut len = 0;
    loop {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("no body frame within the deadline");
        match frame {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    hasher.update(&data);
                }
            }
            Some(Err(e)) => panic!("body failed after {len} bytes: {e:?}"),
        }
    }
    (len, hex(&hasher.finalize()))
}

// === mock backends ===

/// An HTTP server (HTTP/1.1 and h2c) on 127.0.0.1:0 that answers every request with a handler.
/// Dropping it stops accepting; connections already open finish on their own.
pub struct Backend {
    pub addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Backend {
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let counter = hits.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let response = (*handler)(req);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { addr, hits, accept }
    }

    /// Answers every request with its own name in the body and in `x-backend`.
    pub async fn named(name: &str) -> Backend {
        let name = name.to_string();
        Backend::start(move |_req| {
            let name = name.clone();
            async move {
                Response::builder()
                    .header("x-backend", name.as_str())
                    .body(full(name))
                    .unwrap()
            }
        })
        .await
    }

    /// Answers with a JSON description of the request it saw (see [`echo_response`]).
    pub async fn echo(name: &str) -> Backend {
        let name = name.to_string();
        Backend::start(move |req| {
            let name = name.clone();
            async move { echo_response(&name, req).await }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests this backend has received.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `{"name", "method", "path", "query", "http_version", "headers": [[name, value], ...], "body"}`
/// with `x-backend: name`. A `status=NNN` query parameter sets the response status.
pub async fn echo_response(name: &str, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(full(format!("echo backend could not read the body: {e}")))
                .unwrap()
        }
    };
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let status = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("status=")))
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or(200);
    let json = serde_json::json!({
        "name": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "http_version": format!("{:?}", parts.version),
        "headers": headers,
        "body": String::from_utf8_lossy(&body),
    });
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-backend", name)
        .body(full(json.to_string()))
        .unwrap()
}

/// Every value of a header in an echo backend's JSON, in order (names compared lowercase).
pub fn echoed_header(echo: &serde_json::Value, name: &str) -> Vec<String> {
    echo["headers"]
        .as_array()
        .expect("echo JSON has headers")
        .iter()
        .filter(|pair| pair[0].as_str() == Some(&name.to_ascii_lowercase()))
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A URL whose connections are refused: a socket bound to a port but never listening. The
/// socket stays bound for the life of the test process, so no other listener (another test's
/// weir, say) can take the port and answer instead.
pub fn refused_url() -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    format!("http://{addr}")
}

// === weir ===

/// A weir started in-process from a TOML template.
pub struct Weir {
    pub running: Option<weir::Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub state_dir: TempDir,
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "weir-test-{}-{tag}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

impl Weir {
    /// Starts weir from `template` with every `{name}` replaced by the URL of the backend given
    /// for it. Unless the template has its own `[listener]`, `[admin]` or `[state]` table, both
    /// listeners go on 127.0.0.1:0 and the state goes to a fresh temporary directory.
    pub async fn start(template: &str, backends: &[(&str, &str)]) -> Weir {
        let mut text = template.to_string();
        for (name, url) in backends {
            text = text.replace(&format!("{{{name}}}"), url);
        }
        let state_dir = temp_dir("state");
        let mut prelude = String::new();
        if !text.contains("[listener]") {
            prelude.push_str("[listener]\naddr = \"127.0.0.1:0\"\n");
        }
        if !text.contains("[admin]") {
            prelude.push_str("[admin]\naddr = \"127.0.0.1:0\"\n");
        }
        if !text.contains("[state]") {
            prelude.push_str(&format!(
                "[state]\ndir = {:?}\n",
                state_dir.path().display().to_string()
            ));
        }
        let text = format!("{prelude}\n{text}");
        let config = match weir::Config::from_toml_str(&text, "test.toml") {
            Ok(config) => config,
            Err(e) => panic!("test config is invalid: {e}\n{text}"),
        };
        let running = weir::Server::start(config).await.expect("weir starts");
        Weir {
            proxy: running.proxy_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            state_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub async fn metrics_text(&self) -> String {
        let reply = get(&http1(), &self.admin_url("/metrics")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "GET /metrics: {}",
            reply.text()
        );
        reply.text()
    }

    pub async fn metrics(&self) -> Scrape {
        parse_metrics(&self.metrics_text().await)
    }

    /// Sum of the samples of `name` whose labels include `labels` (None when none match).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric(&self.metrics().await, name, labels)
    }

    pub async fn routes(&self) -> serde_json::Value {
        let reply = get(&http1(), &self.admin_url("/v1/routes")).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "GET /v1/routes: {}",
            reply.text()
        );
        reply.json()
    }
}

// === clients ===

pub fn http1() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// HTTP/2 with prior knowledge (h2c) over plain TCP.
pub fn http2() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// A response read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_slice(&self.body) {
            Ok(v) => v,
            Err(e) => panic!(
                "expected a JSON body ({e}); status {} body {:?}",
                self.status,
                self.text()
            ),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `x-weir-version` response header, or "" when it is missing.
    pub fn served_by(&self) -> &str {
        self.header("x-weir-version").unwrap_or("")
    }
}

pub fn request(method: Method, url: &str) -> http::request::Builder {
    Request::builder().method(method).uri(url)
}

/// Sends a request and reads the whole response, failing the test after [`DEADLINE`].
pub async fn send(client: &HttpClient, req: Request<Body>) -> Reply {
    let what = format!("{} {}", req.method(), req.uri());
    let response = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .unwrap_or_else(|_| panic!("{what}: no response head within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("{what}: request failed: {e:?}"));
    let (parts, body) = response.into_parts();
    let body = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .unwrap_or_else(|_| panic!("{what}: body not finished within {DEADLINE:?}"))
        .unwrap_or_else(|e| panic!("{what}: body failed: {e:?}"))
        .to_bytes();
    Reply {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, request(Method::GET, url).body(empty()).unwrap()).await
}

pub async fn get_with(client: &HttpClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut builder = request(Method::GET, url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    send(client, builder.body(empty()).unwrap()).await
}

/// Asserts an error response of weir: status, JSON body with `kind` and (when given) `version`.
pub fn assert_weir_error(reply: &Reply, status: u16, kind: &str, version: Option<&str>) {
    assert_eq!(
        reply.status.as_u16(),
        status,
        "expected {status} {kind}, got {} {:?}",
        reply.status,
        reply.text()
    );
    let json = reply.json();
    assert_eq!(json["kind"], kind, "error body {json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "error body has no message: {json}"
    );
    if let Some(version) = version {
        assert_eq!(json["version"], version, "error body {json}");
    }
}

// === Server-sent events ===

/// Reads `\n\n`-separated events from a streaming response body.
pub struct EventReader {
    body: Incoming,
    buffer: String,
}

impl EventReader {
    pub fn new(body: Incoming) -> EventReader {
        EventReader {
            body,
            buffer: String::new(),
        }
    }

    /// The next complete event (without its blank line), `None` at the end of the body. Panics
    /// if none arrives within `wait`, so a proxy that buffers fails the test instead of hanging.
    pub async fn next(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event = self.buffer[..end].to_string();
                self.buffer.drain(..end + 2);
                return Some(event);
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no complete event within {wait:?} (buffered so far: {:?}); is the proxy buffering the stream?",
                        self.buffer
                    )
                });
            match frame {
                None => {
                    assert!(
                        self.buffer.is_empty(),
                        "stream ended inside an event: {:?}",
                        self.buffer
                    );
                    return None;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buffer.push_str(&String::from_utf8_lossy(&data));
                    }
                }
                Some(Err(e)) => panic!("stream failed: {e:?} (buffered: {:?})", self.buffer),
            }
        }
    }
}

/// A backend that streams `data: k\n\n` for k in 0..events, one every 50 ms, but writes event
/// k+1 only after the test has acknowledged event k on the returned sender. It serves one stream;
/// later requests get 500. The stream ends after the last event.
pub async fn lockstep_sse_backend(events: usize) -> (Backend, mpsc::UnboundedSender<usize>) {
    let (ack_tx, ack_rx) = mpsc::unbounded_channel::<usize>();
    let ack_rx = Arc::new(std::sync::Mutex::new(Some(ack_rx)));
    let backend = Backend::start(move |_req| {
        let ack_rx = ack_rx.lock().unwrap().take();
        async move {
            let Some(mut ack_rx) = ack_rx else {
                return Response::builder()
                    .status(500)
                    .body(full("this backend serves one stream"))
                    .unwrap();
            };
            let (tx, body) = channel_body(4);
            tokio::spawn(async move {
                for k in 0..events {
                    if tx
                        .send(Bytes::from(format!("data: {k}\n\n")))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if k + 1 < events {
                        match ack_rx.recv().await {
                            Some(acked) if acked == k => {}
                            _ => return,
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            });
            Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(body)
                .unwrap()
        }
    })
    .await;
    (backend, ack_tx)
}

/// Opens a streaming GET and returns the response head and an event reader for its body.
pub async fn open_stream(client: &HttpClient, url: &str) -> (http::response::Parts, EventReader) {
    let req = request(Method::GET, url)
        .header("accept", "text/event-stream")
        .body(empty())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, client.request(req))
        .await
        .expect("stream response head within the deadline")
        .expect("stream request");
    let (parts, body) = response.into_parts();
    (parts, EventReader::new(body))
}

// === metrics ===

pub fn parse_metrics(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("/metrics is not Prometheus text ({e}):\n{text}"))
}

fn sample_matches(sample: &prometheus_parse::Sample, name: &str, labels: &[(&str, &str)]) -> bool {
    sample.metric == name && labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

/// Sum of the values of the samples named `name` whose labels include `labels`; None when no
/// sample matches. Histograms are matched by their `_count`/`_sum` series.
pub fn metric(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for sample in scrape
        .samples
        .iter()
        .filter(|s| sample_matches(s, name, labels))
    {
        let value = match &sample.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(_) | Value::Summary(_) => continue,
        };
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Whether a histogram `name` with these labels is in the scrape.
pub fn has_histogram(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> bool {
    scrape
        .samples
        .iter()
        .any(|s| sample_matches(s, name, labels) && matches!(s.value, Value::Histogram(_)))
}

// === the weir binary ===

/// A `weir` child process. It is killed (by its pid) if the test ends while it still runs.
pub struct WeirProcess {
    pub child: std::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    log: Arc<std::sync::Mutex<String>>,
}

/// Removes ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The proxy and admin addresses of a `listening proxy=IP:PORT admin=IP:PORT` log line.
pub fn parse_listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let line = strip_ansi(line);
    if !line.contains("listening") {
        return None;
    }
    let field = |name: &str| -> Option<SocketAddr> {
        line.split_whitespace()
            .find_map(|token| token.strip_prefix(name))
            .and_then(|value| value.trim_matches(|c| c == '"' || c == ',').parse().ok())
    };
    Some((field("proxy=")?, field("admin=")?))
}

impl WeirProcess {
    /// Runs `weir ARGS` in `cwd` and waits for its `listening proxy=… admin=…` line on stderr.
    pub fn spawn(args: &[&str], cwd: &std::path::Path) -> WeirProcess {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .current_dir(cwd)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir binary starts");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel::<(SocketAddr, SocketAddr)>();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                {
                    log.lock().unwrap().push_str(&format!("[stdout] {line}\n"));
                }
            });
        }
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stderr)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Some(addrs) = parse_listening(&line) {
                        let _ = tx.send(addrs);
                    }
                    log.lock().unwrap().push_str(&format!("[stderr] {line}\n"));
                }
            });
        }
        let (proxy, admin) = match rx.recv_timeout(DEADLINE) {
            Ok(addrs) => addrs,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "weir {args:?} printed no `listening proxy=IP:PORT admin=IP:PORT` line on stderr within {DEADLINE:?}; output:\n{}",
                    log.lock().unwrap()
                );
            }
        };
        WeirProcess {
            child,
            proxy,
            admin,
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -TERM {pid} failed");
    }

    /// Polls until the process has exited, failing the test after `wait`.
    pub async fn exit_status(&mut self, wait: Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if std::time::Instant::now() >= deadline {
                panic!("weir did not exit within {wait:?}; output:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// === admin API, routing state and audit log ===

/// The full TOML text [`Weir::start`] would run: the template with its backends filled in, both
/// listeners on 127.0.0.1:0 and the state in `state_dir` (unless the template sets them).
pub fn config_text(
    template: &str,
    backends: &[(&str, &str)],
    state_dir: &std::path::Path,
) -> String {
    let mut text = template.to_string();
    for (name, url) in backends {
        text = text.replace(&format!("{{{name}}}"), url);
    }
    let mut prelude = String::new();
    if !text.contains("[listener]") {
        prelude.push_str("[listener]\naddr = \"127.0.0.1:0\"\n");
    }
    if !text.contains("[admin]") {
        prelude.push_str("[admin]\naddr = \"127.0.0.1:0\"\n");
    }
    if !text.contains("[state]") {
        prelude.push_str(&format!(
            "[state]\ndir = {:?}\n",
            state_dir.display().to_string()
        ));
    }
    format!("{prelude}\n{text}")
}

/// Writes [`config_text`] to `path`.
pub fn write_config(
    path: &std::path::Path,
    template: &str,
    backends: &[(&str, &str)],
    state_dir: &std::path::Path,
) {
    std::fs::write(path, config_text(template, backends, state_dir)).unwrap();
}

impl Weir {
    /// Starts weir from a config file (so `POST /v1/reload` and SIGHUP have a file to re-read),
    /// keeping its state in `state_dir`.
    pub async fn start_file(path: &std::path::Path, state_dir: TempDir) -> Weir {
        let config = match weir::Config::from_file(path) {
            Ok(config) => config,
            Err(e) => panic!("test config {} is invalid: {e}", path.display()),
        };
        Weir::start_config(config, state_dir).await
    }

    /// Starts weir from a validated config whose `state_dir` is `state_dir`.
    pub async fn start_config(config: weir::Config, state_dir: TempDir) -> Weir {
        assert_eq!(
            config.state_dir,
            state_dir.path(),
            "config and state dir disagree"
        );
        let running = weir::Server::start(config).await.expect("weir starts");
        Weir {
            proxy: running.proxy_addr(),
            admin: running.admin_addr(),
            running: Some(running),
            state_dir,
        }
    }

    /// Graceful shutdown (the `stop` audit record closes the last window); hands back the state
    /// directory so a test can restart on it.
    pub async fn stop(mut self) -> TempDir {
        let running = self.running.take().expect("weir is running");
        running.shutdown();
        tokio::time::timeout(DEADLINE, running.wait())
            .await
            .expect("weir stops within the deadline");
        self.state_dir
    }

    /// The admin token weir generated into its state directory.
    pub fn token(&self) -> String {
        admin_token(self.state_dir.path())
    }

    /// `Authorization: Bearer <token>` admin call with an optional JSON body.
    pub async fn admin(&self, method: Method, path: &str, body: Option<&str>) -> Reply {
        admin_call(
            &self.admin_url(path),
            method,
            Some(&self.token()),
            body,
            &[],
        )
        .await
    }

    pub async fn generation(&self) -> u64 {
        self.routes().await["generation"]
            .as_u64()
            .expect("/v1/routes has a generation")
    }

    /// One route of `/v1/routes`.
    pub async fn route(&self, name: &str) -> serde_json::Value {
        let routes = self.routes().await;
        routes["routes"]
            .as_array()
            .expect("/v1/routes has routes")
            .iter()
            .find(|r| r["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no route {name} in {routes}"))
    }

    pub fn audit(&self) -> Vec<serde_json::Value> {
        audit_records(self.state_dir.path())
    }
}

/// The token in `<state_dir>/admin.token`.
pub fn admin_token(state_dir: &std::path::Path) -> String {
    let path = state_dir.join("admin.token");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// An admin call: `token` goes in `Authorization: Bearer`, `body` (when given) is sent as is.
pub async fn admin_call(
    url: &str,
    method: Method,
    token: Option<&str>,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Reply {
    let mut builder = request(method, url);
    if let Some(token) = token {
        builder = builder.header("authorization", format!("Bearer {token}"));
    }
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let body = body.map_or_else(empty, |b| full(b.to_string()));
    send(&http1(), builder.body(body).unwrap()).await
}

/// The raw lines of `<state_dir>/audit.jsonl` ([] when there is none).
pub fn audit_lines(state_dir: &std::path::Path) -> Vec<String> {
    match std::fs::read_to_string(state_dir.join("audit.jsonl")) {
        Ok(text) => text.lines().map(str::to_string).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("cannot read the audit log: {e}"),
    }
}

/// Every record of `<state_dir>/audit.jsonl`, parsed.
pub fn audit_records(state_dir: &std::path::Path) -> Vec<serde_json::Value> {
    audit_lines(state_dir)
        .iter()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// Runs `weir ARGS` to completion, failing the test if it has not exited after `wait`.
pub async fn run_weir(
    args: &[&str],
    cwd: &std::path::Path,
    wait: Duration,
) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .current_dir(cwd)
        .env("NO_COLOR", "1")
        .env_remove("RUST_LOG")
        .env_remove("WEIR_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir binary starts");
    let deadline = std::time::Instant::now() + wait;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "weir {args:?} did not exit within {wait:?}; stderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl WeirProcess {
    /// Sends a signal (`"HUP"`, `"KILL"`, …) to the process by its pid.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid} failed");
    }
}

// === recording and misbehaving backends ===

/// One request as a backend received it, body read to the end.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path and query, as the request line had them.
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A backend that records every request it receives (after reading its body) and answers with
/// `answer(seen)`. It also tracks how many requests its handler holds at once.
pub struct RecordingBackend {
    pub backend: Backend,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl RecordingBackend {
    pub async fn start<F, Fut>(answer: F) -> RecordingBackend
    where
        F: Fn(Seen) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (log, now, most) = (seen.clone(), active.clone(), peak.clone());
        let backend = Backend::start(move |req: Request<Incoming>| {
            let (log, now, most, answer) = (log.clone(), now.clone(), most.clone(), answer.clone());
            async move {
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let seen = Seen {
                    method: parts.method,
                    target: parts
                        .uri
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_string(),
                    headers: parts.headers,
                    body,
                };
                log.lock().unwrap().push(seen.clone());
                let response = (*answer)(seen).await;
                now.fetch_sub(1, Ordering::SeqCst);
                response
            }
        })
        .await;
        RecordingBackend {
            backend,
            seen,
            active,
            peak,
        }
    }

    pub fn url(&self) -> String {
        self.backend.url()
    }

    /// Every request received so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Requests whose answer is being worked on right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// The most requests worked on at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// A TCP server that reads whatever a connection sends first, then writes `reply` (possibly
/// nothing) and closes it: a backend that resets or talks garbage. Stops when dropped.
pub struct RawBackend {
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl RawBackend {
    pub async fn start(reply: &'static [u8]) -> RawBackend {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(reply).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawBackend {
            addr,
            connections,
            accept,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// A `weir demo-backend` with `args`, and its URL once it listens.
pub struct DemoBackend {
    child: std::process::Child,
    pub url: String,
}

impl DemoBackend {
    pub fn spawn(args: &[&str]) -> DemoBackend {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .arg("demo-backend")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("weir binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the demo backend says where it listens");
        DemoBackend { child, url }
    }
}

impl Drop for DemoBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
