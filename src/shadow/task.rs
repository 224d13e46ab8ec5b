//! The shadow task: sends a mirrored request to the candidate, reads its answer, waits for the
//! stable answer, compares them, and records the verdicts — all off the client's path.
//!
//! Invariant: at most `max_in_flight` shadow exchanges run at once (a permit per exchange); a
//! request that finds no permit is counted `dropped`, never queued.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde_json::json;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::compare::{compare, default_comparators, Answer, Verdict};
use crate::config::{BackendProtocol, ShadowConfig};
use crate::shadow::tee::{MirrorOutcome, RequestTee, ResponseTee, ShadowPlan};

static SHADOW_HEADER: HeaderName = HeaderName::from_static("x-weir-shadow");
static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Shadow bounds and the client shadows go out on (its own pool, apart from live traffic).
#[derive(Debug)]
pub struct Shadower {
    permits: Arc<Semaphore>,
    client: Client<HttpConnector, Full<Bytes>>,
    http2: Client<HttpConnector, Full<Bytes>>,
    max_body: u64,
    timeout: Duration,
    samples: Option<SampleLog>,
    next_id: AtomicU64,
}

/// The hot path's ends of one shadow: feed the request tee into the stable request body, and
/// call [`ShadowStart::response_tee`] with the stable response head.
#[derive(Debug)]
pub struct ShadowStart {
    request_tee: Option<RequestTee>,
    stable_done: oneshot::Sender<Option<Answer>>,
    cap: u64,
}

impl ShadowStart {
    /// The tee for the request body (taken once).
    pub fn take_request_tee(&mut self) -> RequestTee {
        self.request_tee
            .take()
            .expect("the request tee is taken once")
    }

    pub fn response_tee(self, status: u16, headers: &HeaderMap) -> ResponseTee {
        let event_stream = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let mut tee = ResponseTee::new(status, event_stream, self.cap, self.stable_done);
        if let Some(code) = super::compare::grpc_status(headers) {
            tee.set_grpc_status(code);
        }
        tee
    }
}

impl Shadower {
    pub fn new(config: &ShadowConfig, state_dir: &std::path::Path) -> Shadower {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.timeout));
        Shadower {
            permits: Arc::new(Semaphore::new(config.max_in_flight)),
            client: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .build(connector.clone()),
            // Candidates with protocol = "http2" (gRPC servers): h2c with prior knowledge.
            http2: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .http2_only(true)
                .build(connector),
            max_body: config.max_body,
            timeout: config.timeout,
            samples: config.samples.then(|| SampleLog {
                path: state_dir.join("disagreements.jsonl"),
                max_bytes: config.samples_max_bytes,
                lock: Mutex::new(()),
            }),
            next_id: AtomicU64::new(1),
        }
    }

    /// Starts mirroring one request whose headers are ready to forward. Returns `None` (and
    /// counts why) when it is not mirrored.
    pub fn begin(
        self: &Arc<Self>,
        plan: ShadowPlan,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        content_length: Option<u64>,
    ) -> Option<ShadowStart> {
        let stats = &plan.shadow.stats;
        if content_length.is_some_and(|len| len > self.max_body) {
            stats.count(MirrorOutcome::TooLarge);
            return None;
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            stats.count(MirrorOutcome::Dropped);
            return None;
        };
        let (body_done, body) = oneshot::channel();
        let (stable_done, stable) = oneshot::channel();
        let request = ShadowRequest {
            method: method.clone(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
            headers: headers.clone(),
        };
        tokio::spawn(Arc::clone(self).run(permit, plan, request, body, stable));
        Some(ShadowStart {
            request_tee: Some(RequestTee::new(self.max_body, body_done)),
            stable_done,
            cap: self.max_body,
        })
    }

    async fn run(
        self: Arc<Self>,
        permit: OwnedSemaphorePermit,
        plan: ShadowPlan,
        request: ShadowRequest,
        body: oneshot::Receiver<Option<Bytes>>,
        stable: oneshot::Receiver<Option<Answer>>,
    ) {
        let stats = Arc::clone(&plan.shadow.stats);
        let body = match body.await {
            Ok(Some(body)) => body,
            Ok(None) => return stats.count(MirrorOutcome::TooLarge),
            Err(_) => return stats.count(MirrorOutcome::Dropped),
        };
        let exchange =
            tokio::time::timeout(self.timeout, self.exchange(&plan, &request, body)).await;
        drop(permit);
        let shadow = match exchange {
            Err(_) => return stats.count(MirrorOutcome::Timeout),
            Ok(Err(())) => return stats.count(MirrorOutcome::Failed),
            Ok(Ok(answer)) => answer,
        };
        stats.count(MirrorOutcome::Sent);
        // The stable answer streams to its client meanwhile; compare once it is complete.
        let stable = match tokio::time::timeout(self.timeout, stable).await {
            Ok(Ok(answer)) => answer,
            _ => return,
        };
        let comparators = plan
            .shadow
            .compare
            .comparators
            .clone()
            .unwrap_or_else(|| default_comparators(&request.path).to_vec());
        let mut disagreements = Vec::new();
        let mut judged = false;
        for comparator in comparators {
            let (verdict, note) = match (&stable, &shadow) {
                (Some(stable), Some(shadow)) => {
                    compare(comparator, &plan.shadow.compare, stable, shadow)
                }
                _ => (
                    Verdict::Error,
                    "an answer is larger than the shadow body cap".into(),
                ),
            };
            stats.count_comparison(comparator, verdict);
            match verdict {
                Verdict::Agree => judged = true,
                Verdict::Disagree => {
                    judged = true;
                    disagreements.push(json!({"comparator": comparator.as_str(), "note": note}));
                }
                Verdict::Error => {}
            }
        }
        if judged {
            stats.record_agreement(disagreements.is_empty());
        }
        if let (Some(samples), false) = (&self.samples, disagreements.is_empty()) {
            let id = request
                .headers
                .get(&REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| {
                    format!("weir-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
                });
            samples.write(&json!({
                "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                "request_id": id,
                "route": &*plan.route,
                "path": request.path,
                "stable": &*plan.stable,
                "candidate": &*plan.candidate.label,
                "disagreements": disagreements,
            }));
        }
    }

    /// Sends the shadow and reads its answer (up to the cap; `None` past it).
    async fn exchange(
        &self,
        plan: &ShadowPlan,
        request: &ShadowRequest,
        body: Bytes,
    ) -> Result<Option<Answer>, ()> {
        let backend = plan.candidate.pick().ok_or(())?;
        let b = backend.backend();
        let uri: Uri = format!("{}://{}{}", b.scheme, b.authority, request.path)
            .parse()
            .map_err(|_| ())?;
        // The candidate's name for the model, where the route routes by it.
        let body = match &plan.model {
            Some(token) => crate::fields::replace_model(&body, token).map_or(body, Bytes::from),
            None => body,
        };
        let mut builder = Request::builder().method(request.method.clone()).uri(uri);
        if let Some(headers) = builder.headers_mut() {
            *headers = request.headers.clone();
            headers.insert(SHADOW_HEADER.clone(), HeaderValue::from_static("1"));
            // The body is whole: its length is what it is, whatever the forwarded head said.
            let had_length = headers.remove(CONTENT_LENGTH).is_some();
            headers.remove(TRANSFER_ENCODING);
            if had_length || !body.is_empty() {
                headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
        }
        let req = builder.body(Full::new(body)).map_err(|_| ())?;
        let client = match plan.candidate.protocol {
            BackendProtocol::Http2 => &self.http2,
            BackendProtocol::Http1 | BackendProtocol::Auto => &self.client,
        };
        let response = client.request(req).await.map_err(|_| ())?;
        let status = response.status().as_u16();
        let head_status = super::compare::grpc_status(response.headers());
        let event_stream = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        match Limited::new(response.into_body(), self.max_body as usize)
            .collect()
            .await
        {
            Ok(collected) => {
                let grpc_status = collected
                    .trailers()
                    .and_then(super::compare::grpc_status)
                    .or(head_status);
                Ok(Some(Answer {
                    status,
                    event_stream,
                    body: collected.to_bytes().to_vec(),
                    grpc_status,
                }))
            }
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Ok(None),
            Err(_) => Err(()),
        }
    }
}

#[derive(Debug)]
struct ShadowRequest {
    method: Method,
    path: String,
    headers: HeaderMap,
}

/// Disagreement samples: a JSONL file in the state dir, rotated to `.1` past its size limit.
#[derive(Debug)]
struct SampleLog {
    path: PathBuf,
    max_bytes: u64,
    lock: Mutex<()>,
}

impl SampleLog {
    fn write(&self, sample: &serde_json::Value) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size >= self.max_bytes {
            let _ = std::fs::rename(&self.path, self.path.with_extension("jsonl.1"));
        }
        // One write per line, so a reader never sees half a sample.
        let line = format!("{sample}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write a disagreement sample");
        }
    }
}
