//! Bodies on the way through. Nothing here buffers: each frame is passed on as it arrives.
//!
//! - [`LimitedBody`] passes a client's request body to the backend and fails once it exceeds the
//!   configured limit.
//! - [`MeteredBody`] passes a backend's response body to the client, records time to first byte
//!   and total duration, enforces the idle timeout between frames, and turns a backend failure
//!   mid-stream into an error the client sees (never a clean-looking end).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::decide::backend_failure;
use crate::metrics::{ProxyFailure, TargetStats};
use crate::shadow::tee::{RequestTee, ResponseTee};
use crate::upstream::BackendGuard;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body exceeded `listener.max_request_body`.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// A client's request body as a front end hands it over: hyper's (HTTP/2) on the left, decoded by
/// weir's HTTP/1 server ([`WireBody`]) on the right.
pub type RequestBody = http_body_util::Either<Incoming, WireBody>;

/// A request body weir's HTTP/1 server decodes from the client's connection as it is asked for:
/// the first poll tells the reader to start (and to send `100 Continue` if it was expected), and
/// each run of content arrives over a small channel, so a backend that reads slowly slows the
/// client down. A broken body arrives as an error, never as a clean end: a body of unknown length
/// ends only at its reader's `Ok(None)`, and a reader that goes away first cuts it off.
#[derive(Debug)]
pub struct WireBody {
    frames: tokio::sync::mpsc::Receiver<Result<Option<Frame<Bytes>>, BoxError>>,
    start: Option<tokio::sync::oneshot::Sender<()>>,
    /// What is left of a body of known length.
    left: Option<u64>,
    ended: bool,
}

/// The reading side of a [`WireBody`].
#[derive(Debug)]
pub struct WireBodySender {
    /// Content (and a chunked body's trailers), then `Ok(None)` at the end of a body of unknown
    /// length (one of known length ends with its last byte), or an error.
    pub frames: tokio::sync::mpsc::Sender<Result<Option<Frame<Bytes>>, BoxError>>,
    /// Resolves when the body is first asked for; fails if it is dropped unasked.
    pub start: tokio::sync::oneshot::Receiver<()>,
}

impl WireBody {
    /// A body of `length` bytes (`None`: chunked), and the side that fills it.
    pub fn channel(length: Option<u64>) -> (WireBody, WireBodySender) {
        let (frames_tx, frames) = tokio::sync::mpsc::channel(2);
        let (start_tx, start) = tokio::sync::oneshot::channel();
        let body = WireBody {
            frames,
            start: Some(start_tx),
            left: length,
            ended: false,
        };
        let sender = WireBodySender {
            frames: frames_tx,
            start,
        };
        (body, sender)
    }

    /// A request without a body.
    pub fn empty() -> WireBody {
        let (body, _) = WireBody::channel(Some(0));
        body
    }
}

impl Body for WireBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.is_end_stream() {
            return Poll::Ready(None);
        }
        if let Some(start) = self.start.take() {
            let _ = start.send(());
        }
        match ready!(self.frames.poll_recv(cx)) {
            Some(Ok(Some(frame))) => {
                if let (Some(left), Some(data)) = (self.left.as_mut(), frame.data_ref()) {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Ok(None)) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                self.ended = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                self.ended = true;
                Poll::Ready(Some(Err(
                    "the request body was cut off before its end".into()
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.left {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}

/// A client's request body, cut off with [`BodyTooLarge`] past the limit.
#[derive(Debug)]
pub struct LimitedBody {
    inner: RequestBody,
    /// Bytes read from `inner` before it was handed over (to route by the body's fields),
    /// sent first; and trailers that came with them.
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    remaining: u64,
    limit: u64,
    /// A copy for the shadow request, when this request is mirrored.
    tee: Option<RequestTee>,
}

impl LimitedBody {
    pub fn new(inner: RequestBody, limit: u64, tee: Option<RequestTee>) -> LimitedBody {
        LimitedBody::with_prefix(Bytes::new(), None, inner, limit, tee)
    }

    /// A body whose first bytes, `prefix` (and its trailers, if the body ended with them while
    /// it was read), were already read from `inner`.
    pub fn with_prefix(
        prefix: Bytes,
        trailers: Option<http::HeaderMap>,
        inner: RequestBody,
        limit: u64,
        mut tee: Option<RequestTee>,
    ) -> LimitedBody {
        let prefix_len = prefix.len() as u64;
        let ended = inner.is_end_stream() && trailers.is_none();
        if let Some(tee) = tee.as_mut() {
            if !prefix.is_empty() {
                tee.push(&prefix);
            }
            // No more body to stream: the backend may never poll it, so the tee is complete.
            if ended {
                tee.finish();
            }
        }
        LimitedBody {
            inner,
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers,
            remaining: limit.saturating_sub(prefix_len),
            limit,
            tee,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(trailers) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    if len > self.remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: self.limit,
                        }))));
                    }
                    self.remaining -= len;
                    let ended = self.inner.is_end_stream();
                    if let Some(tee) = self.tee.as_mut() {
                        tee.push(data);
                        // A sender may stop polling once the length is reached, before `None`.
                        if ended {
                            tee.finish();
                        }
                    }
                }
                Some(Ok(frame))
            }
            Some(Err(e)) => Some(Err(e)),
            None => {
                if let Some(tee) = self.tee.as_mut() {
                    tee.finish();
                }
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.trailers.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let held = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = SizeHint::new();
        // Upper bound first: setting a lower bound above the upper one panics.
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint.set_lower(inner.lower() + held);
        hint
    }
}

/// A backend's response failed mid-body; the client's stream ends with this error.
#[derive(Debug, thiserror::Error)]
#[error("backend {version} {what}")]
pub struct UpstreamBodyError {
    version: Arc<str>,
    what: &'static str,
}

/// Counts a request in flight from its start until its response body is done or dropped, and
/// records its duration then.
#[derive(Debug)]
pub struct InFlight {
    stats: Arc<TargetStats>,
    started: Instant,
}

impl InFlight {
    pub fn start(stats: Arc<TargetStats>, started: Instant) -> InFlight {
        stats.in_flight.inc();
        InFlight { stats, started }
    }

    pub fn stats(&self) -> &TargetStats {
        &self.stats
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.dec();
        self.stats
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

pin_project! {
    /// A backend's response body on its way to the client.
    pub struct MeteredBody<B> {
        #[pin]
        inner: B,
        #[pin]
        idle: Sleep,
        idle_timeout: Duration,
        // Whether `idle` counts from the latest progress. Frames that arrive ready never touch
        // the timer (whose driver is shared); it is armed only when the body has to wait.
        idle_armed: bool,
        in_flight: Option<InFlight>,
        version: Arc<str>,
        first_byte: bool,
        // Keeps the backend counted in flight for as long as the body streams.
        backend: Option<BackendGuard>,
        // A copy for comparison with a shadow answer, when this request was mirrored.
        tee: Option<ResponseTee>,
        // A gRPC call's deadline (`grpc-timeout`): past it, the call ends with DEADLINE_EXCEEDED
        // in its trailers and the backend's stream is dropped (reset).
        deadline: Option<tokio::time::Instant>,
    }
}

impl<B> std::fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    pub fn new(
        inner: B,
        in_flight: InFlight,
        version: Arc<str>,
        idle_timeout: Duration,
        backend: Option<BackendGuard>,
        mut tee: Option<ResponseTee>,
    ) -> MeteredBody<B>
    where
        B: Body,
    {
        if inner.is_end_stream() {
            // An empty answer is never polled: its copy for comparison is complete now.
            if let Some(tee) = tee.as_mut() {
                tee.finish();
            }
        }
        MeteredBody {
            inner,
            idle: tokio::time::sleep(idle_timeout),
            idle_timeout,
            idle_armed: false,
            in_flight: Some(in_flight),
            version,
            first_byte: false,
            backend,
            tee,
            deadline: None,
        }
    }

    /// Ends the body with gRPC's DEADLINE_EXCEEDED at `deadline`, if there is one.
    pub fn with_deadline(mut self, deadline: Option<tokio::time::Instant>) -> MeteredBody<B> {
        self.deadline = deadline;
        self
    }
}

/// The trailers of a gRPC call that ran past its deadline.
fn deadline_exceeded(version: &str) -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("4"));
    let message = format!("weir: {version} did not finish the call within its grpc-timeout");
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        trailers.insert("grpc-message", value);
    }
    Frame::trailers(trailers)
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let Some(in_flight) = this.in_flight.as_ref() else {
            return Poll::Ready(None);
        };
        let past_deadline = |deadline: &Option<tokio::time::Instant>| {
            deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
        };
        if past_deadline(this.deadline) {
            in_flight.stats.count_error(ProxyFailure::Timeout);
            in_flight.stats.count_grpc_error(4);
            this.in_flight.take();
            return Poll::Ready(Some(Ok(deadline_exceeded(this.version))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    if code != 0 {
                        in_flight.stats.count_grpc_error(code);
                    }
                    if let Some(tee) = this.tee.as_mut() {
                        tee.set_grpc_status(code);
                        if this.inner.is_end_stream() {
                            tee.finish();
                        }
                    }
                }
                if !*this.first_byte && frame.is_data() {
                    *this.first_byte = true;
                    in_flight
                        .stats
                        .ttfb
                        .observe(in_flight.started.elapsed().as_secs_f64());
                }
                *this.idle_armed = false;
                if let (Some(tee), Some(data)) = (this.tee.as_mut(), frame.data_ref()) {
                    tee.push(data);
                    // The server stops polling once the body says it has ended, before `None`.
                    if this.inner.is_end_stream() {
                        tee.finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(_))) => {
                in_flight.stats.count_error(ProxyFailure::Body);
                if let Some(backend) = this.backend.as_ref() {
                    let kind = ProxyFailure::Body;
                    backend
                        .backend()
                        .failed(this.version, kind, backend_failure(kind));
                }
                // Done: duration is recorded now, and the body ends here.
                this.in_flight.take();
                Poll::Ready(Some(Err(Box::new(UpstreamBodyError {
                    version: this.version.clone(),
                    what: "broke off the response mid-body",
                }))))
            }
            Poll::Ready(None) => {
                if let Some(tee) = this.tee.as_mut() {
                    tee.finish();
                }
                if !*this.first_byte {
                    in_flight
                        .stats
                        .ttfb
                        .observe(in_flight.started.elapsed().as_secs_f64());
                }
                this.in_flight.take();
                Poll::Ready(None)
            }
            Poll::Pending => {
                if !*this.idle_armed {
                    let idle = tokio::time::Instant::now() + *this.idle_timeout;
                    this.idle
                        .as_mut()
                        .reset(this.deadline.map_or(idle, |d| d.min(idle)));
                    *this.idle_armed = true;
                }
                ready!(this.idle.as_mut().poll(cx));
                if past_deadline(this.deadline) {
                    in_flight.stats.count_error(ProxyFailure::Timeout);
                    in_flight.stats.count_grpc_error(4);
                    this.in_flight.take();
                    return Poll::Ready(Some(Ok(deadline_exceeded(this.version))));
                }
                in_flight.stats.count_error(ProxyFailure::IdleTimeout);
                if let Some(backend) = this.backend.as_ref() {
                    let kind = ProxyFailure::IdleTimeout;
                    backend
                        .backend()
                        .failed(this.version, kind, backend_failure(kind));
                }
                this.in_flight.take();
                Poll::Ready(Some(Err(Box::new(UpstreamBodyError {
                    version: this.version.clone(),
                    what: "went silent mid-body for longer than the idle timeout",
                }))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.in_flight.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// Every response weir sends: a backend's streamed body or a small body of its own.
    #[project = ProxyBodyProj]
    pub enum ProxyBody {
        Upstream { #[pin] body: MeteredBody<Incoming> },
        /// From one of an HTTP/2 backend's own connections.
        Http2 { #[pin] body: MeteredBody<crate::upstream::h2::Http2Response> },
        /// From a backend connection of the fast path's pool ([`super::h1::forward`]).
        Raw { #[pin] body: MeteredBody<super::h1::RawBody> },
        Local { #[pin] body: Full<Bytes> },
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxyBody::Upstream { body } => body.fmt(f),
            ProxyBody::Http2 { body } => body.fmt(f),
            ProxyBody::Raw { body } => body.fmt(f),
            ProxyBody::Local { .. } => f.write_str("ProxyBody::Local"),
        }
    }
}

impl ProxyBody {
    pub fn local(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Local {
            body: Full::new(bytes.into()),
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            ProxyBodyProj::Upstream { body } => body.poll_frame(cx),
            ProxyBodyProj::Http2 { body } => body.poll_frame(cx),
            ProxyBodyProj::Raw { body } => body.poll_frame(cx),
            ProxyBodyProj::Local { body } => body.poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream { body } => body.is_end_stream(),
            ProxyBody::Http2 { body } => body.is_end_stream(),
            ProxyBody::Raw { body } => body.is_end_stream(),
            ProxyBody::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream { body } => body.size_hint(),
            ProxyBody::Http2 { body } => body.size_hint(),
            ProxyBody::Raw { body } => body.size_hint(),
            ProxyBody::Local { body } => body.size_hint(),
        }
    }
}

pub use crate::shadow::compare::grpc_status;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body of the given frames.
    struct Frames(std::collections::VecDeque<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    #[tokio::test]
    async fn a_grpc_status_in_the_trailers_counts_as_an_error_of_the_version() {
        let metrics = crate::metrics::Metrics::new();
        for (status, errors) in [("0", 0), ("13", 1)] {
            let stats =
                metrics.target("r", &format!("m@{status}"), crate::metrics::Role::Candidate);
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static(status));
            let inner = Frames(
                [
                    Frame::data(Bytes::from_static(b"\0\0\0\0\0")),
                    Frame::trailers(trailers),
                ]
                .into(),
            );
            let body = MeteredBody::new(
                inner,
                InFlight::start(Arc::clone(&stats), Instant::now()),
                Arc::from("m@v"),
                Duration::from_secs(5),
                None,
                None,
            );
            let collected = body.collect().await.unwrap();
            assert!(collected.trailers().is_some(), "the trailers pass through");
            assert_eq!(stats.server_errors_total(), errors, "grpc-status {status}");
        }
    }

    async fn send(sender: &WireBodySender, data: &'static str) {
        sender
            .frames
            .send(Ok(Some(Frame::data(Bytes::from(data)))))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_wire_body_of_unknown_length_ends_only_when_its_reader_says_so() {
        let (body, sender) = WireBody::channel(None);
        send(&sender, "hel").await;
        sender.frames.send(Ok(None)).await.unwrap();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hel");

        // A reader that goes away mid-body (the request was answered early) cuts it off: the
        // backend must not see a complete body.
        let (body, sender) = WireBody::channel(None);
        send(&sender, "hel").await;
        drop(sender);
        assert!(body.collect().await.is_err());

        let (mut body, sender) = WireBody::channel(Some(3));
        assert_eq!(body.size_hint().exact(), Some(3));
        send(&sender, "abc").await;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.is_end_stream());
    }
}
