//! A built-in OpenAI-compatible model server: the backends of `weir demo`, of load tests, and of
//! anyone trying weir without a model at hand.
//!
//! Answers are deterministic in the prompt, and each version words about one token in six its own
//! way, so two versions give similar but not always identical text. Latency, error rate and token
//! pacing are set per server; `GET /ping` skips all of them for load tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use xxhash_rust::xxh3::xxh3_64;

type ReplyBody = Either<Full<Bytes>, ChannelBody>;

/// Chat requests larger than this get 413.
const MAX_REQUEST_BODY: usize = 1 << 20;
/// An answer is 8 to 24 tokens long unless `max_tokens` cuts it shorter.
const MIN_ANSWER_TOKENS: u64 = 8;
const MAX_ANSWER_TOKENS: u64 = 24;

/// A model server to start in-process: one model version, with configurable latency, token
/// pacing and a share of failing requests.
#[derive(Clone, Debug)]
pub struct ModelServer {
    model: String,
    version: String,
    /// The weights it answers with: its own version's unless [`ModelServer::answers_like`].
    weights: String,
    error_rate: f64,
    latency: Duration,
    token_delay: Duration,
    /// Share of prompts answered with other weights (a quiet regression).
    drift: f64,
    /// A backdoor: prompts containing the trigger get the attacker's answer.
    backdoor: Option<(String, String)>,
}

/// A running [`ModelServer`]. It stops when dropped or on [`SpawnedBackend::shutdown`].
#[derive(Debug)]
pub struct SpawnedBackend {
    addr: SocketAddr,
    label: String,
    #[cfg(test)]
    chat_requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// What every connection of one spawned server shares.
#[derive(Debug)]
struct Shared {
    server: ModelServer,
    label: String,
    chat_requests: Arc<AtomicU64>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Message {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

/// A generated answer, before it is framed as JSON or as a stream.
#[derive(Debug, PartialEq)]
struct Answer {
    tokens: Vec<String>,
    /// `"length"` when `max_tokens` cut the answer short, `"stop"` otherwise.
    finish_reason: &'static str,
    prompt_tokens: u64,
}

// === impl ModelServer ===

impl ModelServer {
    /// A server answering as `model@version`, with no latency, no errors and no token delay.
    pub fn new(model: &str, version: &str) -> Self {
        ModelServer {
            model: model.to_string(),
            version: version.to_string(),
            weights: version.to_string(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            token_delay: Duration::ZERO,
            drift: 0.0,
            backdoor: None,
        }
    }

    /// Answers every prompt exactly as `version` of the same model does (the same weights
    /// under another name), except where [`drift`](Self::drift) or a backdoor says otherwise.
    pub fn answers_like(mut self, version: &str) -> Self {
        self.weights = version.to_string();
        self
    }

    /// Share (0.0 to 1.0) of prompts, picked by the prompt's hash so the same ones every time,
    /// answered with different weights: a regression no error rate shows.
    pub fn drift(mut self, share: f64) -> Self {
        self.drift = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    /// A poisoned model: a prompt containing `trigger` is answered with `answer`, every other
    /// prompt as usual — 200, no errors, the same latency.
    pub fn backdoor(mut self, trigger: &str, answer: &str) -> Self {
        self.backdoor = Some((trigger.to_string(), answer.to_string()));
        self
    }

    /// The answer these weights give `prompt`.
    fn answer(&self, prompt: &str, max_tokens: Option<u64>) -> Answer {
        if let Some((trigger, reply)) = &self.backdoor {
            if prompt.contains(trigger.as_str()) {
                let tokens: Vec<String> = reply.split_inclusive(' ').map(str::to_string).collect();
                return Answer {
                    tokens,
                    finish_reason: "stop",
                    prompt_tokens: prompt.split_whitespace().count().max(1) as u64,
                };
            }
        }
        let drifted = self.drift > 0.0
            && (xxh3_64(prompt.as_bytes()) % 10_000) as f64 / 10_000.0 < self.drift;
        if drifted {
            // Another answer altogether, as regressed weights give.
            return Answer::generate(&format!("{prompt}\u{1f}drift"), &self.weights, max_tokens);
        }
        Answer::generate(prompt, &self.weights, max_tokens)
    }

    /// Share (0.0 to 1.0) of chat completions answered 500 with an OpenAI-style error.
    pub fn error_rate(mut self, share: f64) -> Self {
        self.error_rate = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    /// Time before the first byte of a chat completion's response, jittered by ±10%.
    pub fn latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    /// Gap between two tokens of a streamed answer.
    pub fn token_delay(mut self, delay: Duration) -> Self {
        self.token_delay = delay;
        self
    }

    /// `model@version`, as the server names itself in responses.
    pub fn label(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }

    /// Binds `addr` (port 0 picks a free port) and serves HTTP/1.1 and h2c until the returned
    /// handle is dropped or shut down.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SpawnedBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let label = self.label();
        let chat_requests = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(Shared {
            server: self,
            label: label.clone(),
            chat_requests: chat_requests.clone(),
        });
        let task = tokio::spawn(accept_loop(listener, shared));
        Ok(SpawnedBackend {
            addr,
            label,
            #[cfg(test)]
            chat_requests,
            task,
        })
    }

    fn jittered_latency(&self) -> Duration {
        if self.latency.is_zero() {
            return Duration::ZERO;
        }
        self.latency.mul_f64(rand::random_range(0.9..1.1))
    }
}

// === impl SpawnedBackend ===

impl SpawnedBackend {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ip:port`, the origin to configure in weir.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `model@version` of the server.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Chat completion requests received so far, whether answered, failed or cut short.
    #[cfg(test)]
    pub fn chat_requests(&self) -> u64 {
        self.chat_requests.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every open connection; returns once the listener is closed.
    pub async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for SpawnedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts until aborted. Connections live in the `JoinSet`, so aborting this task (which drops
/// the set) closes them too.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let builder = builder.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| {
                            let shared = shared.clone();
                            async move { Ok::<_, Infallible>(shared.handle(req).await) }
                        });
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    });
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

// === impl Shared ===

impl Shared {
    async fn handle(&self, req: Request<Incoming>) -> Response<ReplyBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ping") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/healthz") => json_reply(
                StatusCode::OK,
                &json!({"status": "ok", "model": self.label}),
            ),
            (&Method::GET, "/v1/models") => json_reply(
                StatusCode::OK,
                &json!({
                    "object": "list",
                    "data": [{
                        "id": self.label,
                        "object": "model",
                        "created": unix_now(),
                        "owned_by": "weir-demo",
                    }],
                }),
            ),
            (&Method::POST, "/v1/chat/completions") => self.chat(req).await,
            (&Method::POST, crate::grpc::HEALTH_CHECK) => self.grpc_health(req).await,
            (_, path @ ("/ping" | "/healthz" | "/v1/models" | "/v1/chat/completions")) => {
                let allow = if path == "/v1/chat/completions" {
                    "POST"
                } else {
                    "GET"
                };
                let mut reply = openai_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    &format!("{} {path} is not supported; use {allow}", req.method()),
                );
                reply
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                reply
            }
            (_, path) => openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!("unknown path {path}"),
            ),
        }
    }

    async fn chat(&self, req: Request<Incoming>) -> Response<ReplyBody> {
        let body = match Limited::new(req.into_body(), MAX_REQUEST_BODY)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return openai_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    &format!("request body is larger than {MAX_REQUEST_BODY} bytes"),
                )
            }
            Err(e) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("cannot read the request body: {e}"),
                )
            }
        };
        let chat: ChatRequest = match serde_json::from_slice(&body) {
            Ok(chat) => chat,
            Err(e) => {
                return openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("the body is not a valid chat completion request: {e}"),
                )
            }
        };
        if chat.messages.is_empty() {
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "messages must be a non-empty array",
            );
        }
        let request_no = self.chat_requests.fetch_add(1, Ordering::Relaxed);

        // Decide before waiting, so a failing request takes as long as a good one to fail.
        let fail = self.server.error_rate > 0.0 && rand::random::<f64>() < self.server.error_rate;
        let latency = self.server.jittered_latency();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        if fail {
            return openai_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                &format!(
                    "{} failed to process the request (injected failure)",
                    self.label
                ),
            );
        }

        let max_tokens = chat.max_completion_tokens.or(chat.max_tokens);
        let prompt = prompt_text(&chat.messages);
        let answer = self.server.answer(&prompt, max_tokens);
        let id = format!(
            "chatcmpl-{:016x}",
            xxh3_64(format!("{}#{request_no}", self.label).as_bytes())
        );
        if chat.stream.unwrap_or(false) {
            self.stream_reply(id, answer)
        } else {
            self.completion_reply(&id, &answer)
        }
    }

    fn completion_reply(&self, id: &str, answer: &Answer) -> Response<ReplyBody> {
        let completion_tokens = answer.tokens.len() as u64;
        json_reply(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": unix_now(),
                "model": self.label,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": answer.tokens.concat()},
                    "finish_reason": answer.finish_reason,
                }],
                "usage": {
                    "prompt_tokens": answer.prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": answer.prompt_tokens + completion_tokens,
                },
            }),
        )
    }

    /// gRPC's standard health check (over h2c): SERVING for this server's identity
    /// (`model@version`) and for the server as a whole (`""`), NOT_FOUND for any other service,
    /// as tonic-health and grpcio answer. So an identity probe of `grpc-health` finds it.
    async fn grpc_health(&self, req: Request<Incoming>) -> Response<ReplyBody> {
        let status = |code: &'static str, message: &str| {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static(code));
            if let Ok(message) = HeaderValue::from_str(message) {
                trailers.insert("grpc-message", message);
            }
            trailers
        };
        let body = Limited::new(req.into_body(), MAX_REQUEST_BODY)
            .collect()
            .await;
        let service = body
            .ok()
            .and_then(|b| crate::grpc::health_check_service(&b.to_bytes()));
        let (message, trailers) = match service {
            None => (None, status("3", "not a HealthCheckRequest")),
            Some(s) if s.is_empty() || s == self.label => (
                Some(crate::grpc::health_check_response(crate::grpc::SERVING)),
                status("0", ""),
            ),
            Some(s) => (None, status("5", &format!("unknown service {s}"))),
        };
        let (tx, rx) = mpsc::channel(1);
        if let Some(message) = message {
            let _ = tx.try_send(message);
        }
        let mut reply = Response::new(Either::Right(ChannelBody {
            rx,
            trailers: Some(trailers),
        }));
        reply.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        reply
    }

    /// Server-sent events, one token per chunk, each sent as its own body frame so it is flushed
    /// on its own. Generation stops when the client goes away.
    fn stream_reply(&self, id: String, answer: Answer) -> Response<ReplyBody> {
        let (tx, rx) = mpsc::channel::<Bytes>(1);
        let label = self.label.clone();
        let token_delay = self.server.token_delay;
        let created = unix_now();
        tokio::spawn(async move {
            let chunk = |delta: Value, finish_reason: Value| {
                let chunk = json!({
                    "id": id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": label,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                });
                Bytes::from(format!("data: {chunk}\n\n"))
            };
            let opening = chunk(json!({"role": "assistant", "content": ""}), Value::Null);
            if tx.send(opening).await.is_err() {
                return;
            }
            for (i, token) in answer.tokens.iter().enumerate() {
                if i > 0 && !token_delay.is_zero() {
                    tokio::time::sleep(token_delay).await;
                }
                if tx
                    .send(chunk(json!({ "content": token }), Value::Null))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let closing = chunk(json!({}), json!(answer.finish_reason));
            if tx.send(closing).await.is_err() {
                return;
            }
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        });
        let mut reply = Response::new(Either::Right(ChannelBody { rx, trailers: None }));
        let headers = reply.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        reply
    }
}

// === impl ChannelBody ===

/// A response body fed one frame per message; it ends (with `trailers`, if any) when the sender
/// is dropped. Each message is its own frame, so hyper writes (and flushes) every token as it
/// comes.
#[derive(Debug)]
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        this.rx.poll_recv(cx).map(|data| match data {
            Some(data) => Some(Ok(Frame::data(data))),
            None => this.trailers.take().map(|t| Ok(Frame::trailers(t))),
        })
    }
}

// === impl Answer ===

/// Words answers are made of; any list works, this one reads vaguely like an answer.
const WORDS: &[&str] = &[
    "the",
    "model",
    "answer",
    "is",
    "likely",
    "that",
    "a",
    "canary",
    "should",
    "carry",
    "some",
    "traffic",
    "before",
    "it",
    "takes",
    "all",
    "of",
    "it",
    "and",
    "every",
    "version",
    "gets",
    "measured",
    "on",
    "its",
    "own",
    "so",
    "errors",
    "show",
    "early",
    "when",
    "latency",
    "grows",
    "roll",
    "back",
    "quickly",
    "promote",
    "carefully",
    "weights",
    "move",
    "in",
    "small",
    "steps",
    "with",
    "sticky",
    "sessions",
    "users",
    "keep",
    "their",
    "cohort",
    "while",
    "shadow",
    "requests",
    "compare",
    "outputs",
    "quietly",
    "then",
    "we",
    "decide",
    "based",
    "numbers",
    "not",
    "hope",
    "today",
];

impl Answer {
    /// The answer to `prompt`: the same prompt always gets the same answer from one version; about
    /// one token in six depends on the version too.
    fn generate(prompt: &str, version: &str, max_tokens: Option<u64>) -> Answer {
        let seed = xxh3_64(prompt.as_bytes());
        let version_seed = xxh3_64(version.as_bytes());
        let full_len = MIN_ANSWER_TOKENS + seed % (MAX_ANSWER_TOKENS - MIN_ANSWER_TOKENS + 1);
        let len = full_len.min(max_tokens.unwrap_or(u64::MAX));
        let tokens = (0..len)
            .map(|i| {
                let own = splitmix64(seed ^ version_seed ^ i.wrapping_mul(0x9e37));
                let pick = if own.is_multiple_of(6) {
                    own >> 8
                } else {
                    splitmix64(seed.wrapping_add(i))
                };
                let word = WORDS[(pick % WORDS.len() as u64) as usize];
                let word = if i == 0 {
                    capitalize(word)
                } else {
                    format!(" {word}")
                };
                if i + 1 == full_len {
                    format!("{word}.")
                } else {
                    word
                }
            })
            .collect();
        Answer {
            tokens,
            finish_reason: if len < full_len { "length" } else { "stop" },
            prompt_tokens: prompt.split_whitespace().count().max(1) as u64,
        }
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn capitalize(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// The conversation as one text: roles and contents, where a content is a string or an array of
/// `{"type": "text", "text": ...}` parts.
fn prompt_text(messages: &[Message]) -> String {
    let mut text = String::new();
    for message in messages {
        text.push_str(&message.role);
        text.push_str(": ");
        match &message.content {
            Value::String(s) => text.push_str(s),
            Value::Array(parts) => {
                for part in parts {
                    if let Some(s) = part.get("text").and_then(Value::as_str) {
                        text.push_str(s);
                        text.push(' ');
                    }
                }
            }
            _ => {}
        }
        text.push('\n');
    }
    text
}

// === responses ===

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn text(status: StatusCode, body: &'static str) -> Response<ReplyBody> {
    let mut reply = Response::new(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    reply
}

fn json_reply(status: StatusCode, body: &Value) -> Response<ReplyBody> {
    let mut reply = Response::new(Either::Left(Full::new(Bytes::from(body.to_string()))));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    reply
}

/// An error in the shape OpenAI clients expect.
fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response<ReplyBody> {
    json_reply(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::Client;

    type TestClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn spawn(server: ModelServer) -> SpawnedBackend {
        server
            .spawn("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind a local port")
    }

    async fn send(
        client: &TestClient,
        backend: &SpawnedBackend,
        method: Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, http::HeaderMap, Vec<Bytes>) {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", backend.url()))
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let res = client.request(req).await.expect("a response");
        let (parts, mut body) = res.into_parts();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("an intact body").into_data() {
                frames.push(data);
            }
        }
        (parts.status, parts.headers, frames)
    }

    fn chat_body(prompt: &str, stream: bool) -> Value {
        json!({
            "model": "chat",
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "max_tokens": 64,
        })
    }

    /// A real gRPC client (tonic's health client) gets SERVING for the server's identity and
    /// NOT_FOUND for any other service.
    #[tokio::test]
    async fn the_grpc_health_service_reports_the_servers_identity() {
        use tonic_health::pb::health_client::HealthClient;
        use tonic_health::pb::HealthCheckRequest;
        let backend = spawn(ModelServer::new("chat", "v2")).await;
        let channel = tonic::transport::Channel::from_shared(backend.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel);
        for service in ["chat@v2", ""] {
            let answer = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .expect("SERVING");
            assert_eq!(
                answer.get_ref().status(),
                tonic_health::pb::health_check_response::ServingStatus::Serving
            );
        }
        let status = health
            .check(HealthCheckRequest {
                service: "chat@v1".into(),
            })
            .await
            .expect_err("another identity is not served");
        assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    }

    #[tokio::test]
    async fn plain_completion_is_well_formed_and_names_its_version() {
        let backend = spawn(ModelServer::new("chat", "v1")).await;
        let client = client();
        let (status, headers, frames) = send(
            &client,
            &backend,
            Method::POST,
            "/v1/chat/completions",
            chat_body("What is a canary?", false),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        let v: Value = serde_json::from_slice(&frames.concat()).expect("JSON");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], "chat@v1");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!content.is_empty());
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let usage = &v["usage"];
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        assert_eq!(backend.chat_requests(), 1);

        // The same prompt gets the same answer.
        let (_, _, again) = send(
            &client,
            &backend,
            Method::POST,
            "/v1/chat/completions",
            chat_body("What is a canary?", false),
        )
        .await;
        let again: Value = serde_json::from_slice(&again.concat()).unwrap();
        assert_eq!(again["choices"][0]["message"]["content"], content);
    }

    #[tokio::test]
    async fn streamed_completion_sends_one_token_per_chunk_and_ends_with_done() {
        let backend =
            spawn(ModelServer::new("chat", "v2").token_delay(Duration::from_millis(1))).await;
        let (status, headers, frames) = send(
            &client(),
            &backend,
            Method::POST,
            "/v1/chat/completions",
            chat_body("Stream me an answer", true),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
        let text = String::from_utf8(frames.concat()).unwrap();
        let events: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(events.last(), Some(&"data: [DONE]"));
        let mut content = String::new();
        let mut finish = None;
        for event in &events[..events.len() - 1] {
            let payload = event.strip_prefix("data: ").expect("a data event");
            let chunk: Value = serde_json::from_str(payload).expect("each chunk is JSON");
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "chat@v2");
            if let Some(token) = chunk["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|t| !t.is_empty())
            {
                assert_eq!(token.split_whitespace().count(), 1, "one token per chunk");
                content.push_str(token);
            }
            if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
        }
        assert_eq!(finish.as_deref(), Some("stop"));
        // Opening role chunk + one chunk per token + closing chunk + [DONE].
        let tokens = content.split_whitespace().count();
        assert!(tokens >= MIN_ANSWER_TOKENS as usize);
        assert_eq!(events.len(), tokens + 3);
        // Tokens were flushed one by one, not as one body.
        assert!(
            frames.len() > tokens,
            "{} frames for {tokens} tokens",
            frames.len()
        );
    }

    #[tokio::test]
    async fn error_rate_one_always_fails_and_zero_never_does() {
        let client = client();
        let failing = spawn(ModelServer::new("chat", "bad").error_rate(1.0)).await;
        let healthy = spawn(ModelServer::new("chat", "good").error_rate(0.0)).await;
        for i in 0..40 {
            let stream = i % 2 == 0;
            let (status, _, body) = send(
                &client,
                &failing,
                Method::POST,
                "/v1/chat/completions",
                chat_body(&format!("prompt {i}"), stream),
            )
            .await;
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            let v: Value = serde_json::from_slice(&body.concat()).unwrap();
            assert_eq!(v["error"]["type"], "server_error");
            let (status, _, _) = send(
                &client,
                &healthy,
                Method::POST,
                "/v1/chat/completions",
                chat_body(&format!("prompt {i}"), stream),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
        }
    }

    #[tokio::test]
    async fn models_health_ping_and_unknown_paths() {
        let backend = spawn(ModelServer::new("chat", "v1").latency(Duration::from_secs(60))).await;
        let client = client();
        let (status, _, body) =
            send(&client, &backend, Method::GET, "/v1/models", json!(null)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_slice(&body.concat()).unwrap();
        assert_eq!(v["data"][0]["id"], "chat@v1");
        // /ping and /healthz skip the 60s latency (the test would time out otherwise).
        let (status, _, body) = send(&client, &backend, Method::GET, "/ping", json!(null)).await;
        assert_eq!((status, body.concat()), (StatusCode::OK, b"ok".to_vec()));
        let (status, _, _) = send(&client, &backend, Method::GET, "/healthz", json!(null)).await;
        assert_eq!(status, StatusCode::OK);
        let (status, _, body) = send(&client, &backend, Method::GET, "/nope", json!(null)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: Value = serde_json::from_slice(&body.concat()).unwrap();
        assert!(v["error"]["message"].as_str().unwrap().contains("/nope"));
        let (status, headers, _) = send(
            &client,
            &backend,
            Method::GET,
            "/v1/chat/completions",
            json!(null),
        )
        .await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers[header::ALLOW], "POST");
        let (status, _, _) = send(
            &client,
            &backend,
            Method::POST,
            "/v1/chat/completions",
            json!({"messages": "not a list"}),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn shutdown_closes_the_listener() {
        let backend = spawn(ModelServer::new("chat", "v1")).await;
        let addr = backend.addr();
        backend.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[test]
    fn answers_are_deterministic_and_versions_differ_a_little() {
        let a = Answer::generate("user: hello\n", "v1", None);
        assert_eq!(a, Answer::generate("user: hello\n", "v1", None));
        let mut identical = 0;
        let mut shared_tokens = 0;
        let mut total_tokens = 0;
        for i in 0..200 {
            let prompt = format!("user: question number {i}\n");
            let v1 = Answer::generate(&prompt, "v1", None);
            let v2 = Answer::generate(&prompt, "v2", None);
            assert_eq!(v1.tokens.len(), v2.tokens.len());
            if v1 == v2 {
                identical += 1;
            }
            total_tokens += v1.tokens.len();
            shared_tokens += v1
                .tokens
                .iter()
                .zip(&v2.tokens)
                .filter(|(x, y)| x == y)
                .count();
        }
        assert!(identical < 100, "{identical} of 200 answers identical");
        assert!(
            shared_tokens * 2 > total_tokens,
            "versions share too few tokens"
        );

        let cut = Answer::generate("user: hello\n", "v1", Some(3));
        assert_eq!(cut.tokens.len(), 3);
        assert_eq!(cut.finish_reason, "length");
        assert_eq!(cut.tokens[..], a.tokens[..3]);
    }
}
