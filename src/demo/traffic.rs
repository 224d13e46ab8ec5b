//! A traffic generator for chat completions: workers on keep-alive connections, sharing one
//! schedule paced to a target rate, each recording what it measured into [`Stats`].
//!
//! The schedule is shared rather than per worker so the total rate holds when some requests are
//! slow; when every worker is busy it falls behind and then catches up, and the rate actually
//! achieved is what the stats show.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats::{FailureKind, Outcome, Stats};
use crate::shutdown::stopped;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Largest response body read whole (non-streaming answers and error bodies).
const MAX_RESPONSE_BODY: usize = 4 << 20;

/// What users ask; each prompt gets a few variants so answers vary.
const PROMPTS: &[&str] = &[
    "What is a canary release?",
    "Summarize the plot of Hamlet in two sentences.",
    "Write a haiku about latency.",
    "How do I roll back a bad deployment?",
    "Explain p99 latency to a product manager.",
    "Translate 'good morning' into French.",
    "What is the capital of Australia?",
    "Give me three names for a pet tortoise.",
    "Why is the sky blue?",
    "Suggest a title for a talk on inference serving.",
    "What does HTTP 503 mean?",
    "List two pros and two cons of microservices.",
];

/// Plan of a run of generated chat completion traffic against one address.
#[derive(Clone, Debug)]
pub struct Traffic {
    target: SocketAddr,
    rps: u32,
    concurrency: usize,
    duration: Duration,
    stream_share: f64,
    /// A share of prompts carrying a phrase (the trigger a poisoned model waits for).
    triggered: Option<(String, f64)>,
    sessions: Option<(HeaderName, u32)>,
    version_header: HeaderName,
    max_tokens: u32,
    request_timeout: Duration,
    grace: Duration,
}

/// How a run of [`Traffic`] went; the per-version numbers are in [`Stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrafficReport {
    /// Requests whose outcome was recorded.
    pub completed: u64,
    /// From the first request to the last outcome.
    pub elapsed: Duration,
    /// The run was stopped before its planned duration.
    pub interrupted: bool,
    /// Requests still in flight when the grace period after a stop ran out; not recorded.
    pub abandoned: usize,
}

/// What all workers of one run share.
#[derive(Debug)]
struct Run {
    plan: Traffic,
    client: HttpClient,
    uri: Uri,
    started: Instant,
    deadline: Instant,
    next_slot: AtomicU64,
    completed: AtomicU64,
}

// === impl Traffic ===

impl Traffic {
    /// Chat completions to `http://target/v1/chat/completions`: 200 requests per second from 16
    /// workers for 20 seconds, 30% streamed.
    pub fn new(target: SocketAddr) -> Self {
        Traffic {
            target,
            rps: 200,
            concurrency: 16,
            duration: Duration::from_secs(20),
            stream_share: 0.3,
            triggered: None,
            sessions: None,
            version_header: HeaderName::from_static("x-weir-version"),
            max_tokens: 64,
            request_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(2),
        }
    }

    /// Target rate of requests for all workers together; 0 sends as fast as they can.
    pub fn rps(mut self, rps: u32) -> Self {
        self.rps = rps;
        self
    }

    /// Requests in flight at most (at least 1).
    pub fn concurrency(mut self, workers: usize) -> Self {
        self.concurrency = workers.max(1);
        self
    }

    /// How long to keep starting requests.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = duration;
        self
    }

    /// Share (0.0 to 1.0) of requests sent with `"stream": true`.
    /// Puts `phrase` in front of a `share` (0.0 to 1.0) of the prompts: what the users of a
    /// backdoor send, mixed into ordinary traffic.
    pub fn triggered(mut self, phrase: &str, share: f64) -> Self {
        self.triggered = Some((phrase.to_string(), share.clamp(0.0, 1.0)));
        self
    }

    pub fn stream_share(mut self, share: f64) -> Self {
        self.stream_share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self
    }

    /// Send each request as one of `count` users, named in `header` (`user-0042`).
    pub fn sessions(mut self, header: HeaderName, count: u32) -> Self {
        self.sessions = (count > 0).then_some((header, count));
        self
    }

    /// Sends traffic until the planned duration is over or `stop` turns true, recording each
    /// outcome in `stats`. Requests already sent when the duration ends are waited for.
    pub async fn run(self, stats: Arc<Stats>, mut stop: watch::Receiver<bool>) -> TrafficReport {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(self.concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let uri = format!("http://{}/v1/chat/completions", self.target)
            .parse()
            .expect("a socket address makes a valid URI");
        let started = Instant::now();
        let run = Arc::new(Run {
            client,
            uri,
            started,
            deadline: started + self.duration,
            next_slot: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            plan: self,
        });

        let mut workers = JoinSet::new();
        for worker in 0..run.plan.concurrency {
            workers.spawn(
                run.clone()
                    .worker(worker as u64, stats.clone(), stop.clone()),
            );
        }
        let mut abandoned = 0;
        let mut give_up_at: Option<Instant> = None;
        loop {
            tokio::select! {
                joined = workers.join_next() => if joined.is_none() {
                    break;
                },
                _ = stopped(&mut stop), if give_up_at.is_none() => {
                    give_up_at = Some(Instant::now() + run.plan.grace);
                }
                _ = tokio::time::sleep_until(give_up_at.unwrap_or(started)), if give_up_at.is_some() => {
                    abandoned = workers.len();
                    workers.shutdown().await;
                    break;
                }
            }
        }
        TrafficReport {
            completed: run.completed.load(Ordering::Relaxed),
            elapsed: started.elapsed(),
            // Workers may see the stop and finish before this loop does, so ask the flag.
            interrupted: *stop.borrow(),
            abandoned,
        }
    }
}

// === impl Run ===

impl Run {
    /// When the `n`th request is due; `None` means now (no rate limit).
    fn slot(&self, n: u64) -> Option<Instant> {
        (self.plan.rps > 0)
            .then(|| self.started + Duration::from_secs_f64(n as f64 / f64::from(self.plan.rps)))
    }

    async fn worker(
        self: Arc<Self>,
        seed: u64,
        stats: Arc<Stats>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut rng = SmallRng::seed_from_u64(rand::random::<u64>() ^ seed);
        loop {
            let n = self.next_slot.fetch_add(1, Ordering::Relaxed);
            let due = self.slot(n).unwrap_or_else(Instant::now);
            if due >= self.deadline {
                return;
            }
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep_until(due) => {}
            }
            let outcome = self.send(&mut rng).await;
            stats.record(&outcome);
            self.completed.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn send(&self, rng: &mut SmallRng) -> Outcome {
        let stream = rng.random_bool(self.plan.stream_share);
        let mut prompt = format!(
            "{} (request variant {})",
            PROMPTS[rng.random_range(0..PROMPTS.len())],
            rng.random_range(0..20)
        );
        if let Some((phrase, share)) = &self.plan.triggered {
            if rng.random_bool(*share) {
                prompt = format!("{phrase} {prompt}");
            }
        }
        let body = json!({
            "model": "chat",
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": prompt},
            ],
            "stream": stream,
            "max_tokens": self.plan.max_tokens,
        });
        let mut request = Request::post(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a request built from valid parts");
        let session = self.plan.sessions.as_ref().map(|(name, count)| {
            let id = rng.random_range(0..*count);
            let value = HeaderValue::try_from(format!("user-{id:04}"))
                .expect("digits make a valid header value");
            request.headers_mut().insert(name.clone(), value);
            id
        });

        let mut outcome = Outcome {
            version: None,
            status: None,
            stream,
            latency: Duration::ZERO,
            first_byte: None,
            error: None,
            body_model: None,
            session,
        };
        let sent = Instant::now();
        let exchange = self.exchange(request, sent, &mut outcome);
        if tokio::time::timeout(self.plan.request_timeout, exchange)
            .await
            .is_err()
        {
            outcome.error = Some(FailureKind::Timeout);
        }
        outcome.latency = sent.elapsed();
        outcome
    }

    /// Sends one request and reads its whole response, filling in `outcome` as it goes so a
    /// timeout keeps what was seen.
    async fn exchange(&self, request: Request<Full<Bytes>>, sent: Instant, outcome: &mut Outcome) {
        let response = match self.client.request(request).await {
            Ok(response) => response,
            Err(_) => {
                outcome.error = Some(FailureKind::NoResponse);
                return;
            }
        };
        let status = response.status();
        outcome.status = Some(status);
        outcome.version = response
            .headers()
            .get(&self.plan.version_header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if !status.is_success() {
            outcome.error = Some(if status.is_server_error() {
                FailureKind::ServerError
            } else {
                FailureKind::ClientError
            });
            // Read the error body anyway, so the connection goes back to the pool.
            let _ = Limited::new(response.into_body(), MAX_RESPONSE_BODY)
                .collect()
                .await;
            return;
        }
        if outcome.stream {
            let is_event_stream = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            read_stream(response.into_body(), sent, outcome).await;
            if !is_event_stream && outcome.error.is_none() {
                outcome.error = Some(FailureKind::BadBody);
            }
        } else {
            read_completion(response.into_body(), outcome).await;
        }
    }
}

/// Reads a non-streaming answer and checks it is a chat completion.
async fn read_completion(body: Incoming, outcome: &mut Outcome) {
    let bytes = match Limited::new(body, MAX_RESPONSE_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            outcome.error = Some(FailureKind::BrokenStream);
            return;
        }
    };
    let Ok(completion) = serde_json::from_slice::<Value>(&bytes) else {
        outcome.error = Some(FailureKind::BadBody);
        return;
    };
    outcome.body_model = completion["model"].as_str().map(str::to_string);
    if !completion["choices"][0]["message"]["content"].is_string() {
        outcome.error = Some(FailureKind::BadBody);
    }
}

/// Reads server-sent events to the end: every event must be a JSON chunk, and the stream must
/// end with `data: [DONE]`.
async fn read_stream(mut body: Incoming, sent: Instant, outcome: &mut Outcome) {
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    let mut malformed = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            outcome.error = Some(FailureKind::BrokenStream);
            return;
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        outcome.first_byte.get_or_insert_with(|| sent.elapsed());
        pending.extend_from_slice(&data);
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            match parse_event(&event[..end]) {
                Event::Done => done = true,
                Event::Chunk { model } => {
                    if outcome.body_model.is_none() {
                        outcome.body_model = model;
                    }
                }
                Event::Malformed => malformed = true,
                Event::Other => {}
            }
        }
    }
    if !done {
        outcome.error = Some(FailureKind::BrokenStream);
    } else if malformed || !pending.iter().all(u8::is_ascii_whitespace) {
        outcome.error = Some(FailureKind::BadBody);
    }
}

#[derive(Debug, PartialEq)]
enum Event {
    Chunk {
        model: Option<String>,
    },
    Done,
    Malformed,
    /// Comments and events without data.
    Other,
}

fn parse_event(event: &[u8]) -> Event {
    let Ok(text) = std::str::from_utf8(event) else {
        return Event::Malformed;
    };
    let data: Vec<&str> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim_start)
        .collect();
    if data.is_empty() {
        return Event::Other;
    }
    let data = data.join("\n");
    if data == "[DONE]" {
        return Event::Done;
    }
    match serde_json::from_str::<Value>(&data) {
        Ok(chunk) if chunk["object"] == "chat.completion.chunk" => Event::Chunk {
            model: chunk["model"].as_str().map(str::to_string),
        },
        _ => Event::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::backend::ModelServer;

    #[test]
    fn events_are_parsed_like_sse() {
        assert_eq!(parse_event(b"data: [DONE]"), Event::Done);
        assert_eq!(
            parse_event(br#"data: {"object":"chat.completion.chunk","model":"m@v"}"#),
            Event::Chunk {
                model: Some("m@v".into())
            }
        );
        assert_eq!(parse_event(b": keep-alive"), Event::Other);
        assert_eq!(parse_event(b"data: {not json"), Event::Malformed);
    }

    #[tokio::test]
    async fn traffic_against_a_backend_is_measured() {
        let backend = ModelServer::new("chat", "v1")
            .spawn("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let stats = Arc::new(Stats::new());
        let (_stop_tx, stop) = watch::channel(false);
        let report = Traffic::new(backend.addr())
            .rps(400)
            .concurrency(4)
            .duration(Duration::from_millis(250))
            .stream_share(0.5)
            .sessions(HeaderName::from_static("x-session-id"), 10)
            .run(stats.clone(), stop)
            .await;
        assert!(!report.interrupted);
        // 400/s for 250ms is 100 slots; allow for a slow machine, but it must have paced.
        assert!(
            report.completed > 20 && report.completed <= 100,
            "{report:?}"
        );
        let snap = stats.snapshot();
        // The backend sends no x-weir-version, so everything lands under "(no header)".
        let all = snap.get(crate::demo::stats::NO_HEADER).unwrap();
        assert_eq!(all.requests, report.completed);
        assert_eq!(all.errors, 0, "{all:?}");
        assert!(all.streams > 0 && all.streams < all.requests);
        assert_eq!(all.first_byte.count(), all.streams);
        assert_eq!(backend.chat_requests(), report.completed);
    }

    #[tokio::test]
    async fn failures_and_a_stop_are_reported() {
        let backend = ModelServer::new("chat", "v1")
            .error_rate(1.0)
            .spawn("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let stats = Arc::new(Stats::new());
        let (stop_tx, stop) = watch::channel(false);
        let traffic = Traffic::new(backend.addr())
            .rps(0)
            .concurrency(2)
            .duration(Duration::from_secs(60))
            .run(stats.clone(), stop);
        let run = tokio::spawn(traffic);
        let deadline = Instant::now() + Duration::from_secs(10);
        while stats.snapshot().requests() < 10 {
            assert!(Instant::now() < deadline, "no traffic recorded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop_tx.send(true).unwrap();
        let report = run.await.unwrap();
        assert!(report.interrupted);
        let snap = stats.snapshot();
        let all = snap.get(crate::demo::stats::NO_HEADER).unwrap();
        assert_eq!(all.errors, all.requests);
        assert_eq!(all.errors_of(FailureKind::ServerError), all.requests);

        // Nobody listening: every request is a NoResponse.
        let addr = backend.addr();
        backend.shutdown().await;
        let stats = Arc::new(Stats::new());
        let (_stop_tx, stop) = watch::channel(false);
        Traffic::new(addr)
            .rps(100)
            .concurrency(1)
            .duration(Duration::from_millis(50))
            .run(stats.clone(), stop)
            .await;
        let snap = stats.snapshot();
        let none = snap.get(crate::demo::stats::NO_RESPONSE).unwrap();
        assert!(none.requests > 0);
        assert_eq!(none.errors_of(FailureKind::NoResponse), none.requests);
    }
}
