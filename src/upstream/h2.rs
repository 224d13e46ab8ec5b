//! A backend's HTTP/2 connections (`protocol = "http2"`): a bounded number per backend, each
//! carrying as many streams as the backend's `SETTINGS_MAX_CONCURRENT_STREAMS` allows.
//!
//! A request takes the first connection with a free stream; when every connection is full and
//! fewer than `proxy.http2_max_connections_per_backend` are open, it opens another; at the
//! bound, it joins the least loaded one, where the stream waits for the backend to allow it.
//! A connection the backend sent GOAWAY on takes no new streams, and the streams it accepted
//! finish on it. PINGs (`proxy.http2_keepalive_interval`) keep idle connections alive and find
//! dead ones.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::Backend;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body on its way to an HTTP/2 backend.
pub type Http2Body = UnsyncBoxBody<Bytes, BoxError>;

/// Streams a new connection is assumed to allow until the backend's SETTINGS say otherwise
/// (RFC 9113 §6.5.2 recommends servers allow no fewer).
const INITIAL_STREAMS: usize = 100;

/// A connection whose PING goes unanswered this long is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// A request the backend did not take is sent at most this many times.
const MAX_ATTEMPTS: usize = 3;

/// Whether `error` says the request was not processed by the backend: the connection closed
/// before it was sent, or the backend's GOAWAY excluded its stream.
fn unprocessed(error: &hyper::Error) -> bool {
    if error.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        source = e.source();
    }
    false
}

/// The longest request body kept to be sent again if the backend's GOAWAY shows it did not
/// take the request (as Envoy's retry buffer): gRPC calls are mostly far smaller.
const REPLAY_LIMIT: usize = 64 * 1024;

/// What was read of a request body, and the rest of it.
struct Replay {
    frames: std::collections::VecDeque<Frame<Bytes>>,
    rest: Option<Http2Body>,
}

/// A request body that keeps a copy of what it passed on, up to [`REPLAY_LIMIT`], and gives the
/// copy and the unread rest back when it is dropped, so that a request the backend did not take
/// can be sent again whole.
struct Rescuable {
    body: Replay,
    copied: Vec<Frame<Bytes>>,
    copied_len: usize,
    /// Too long to keep, or broken: it cannot be sent again.
    lost: bool,
    rescue: Option<tokio::sync::oneshot::Sender<Replay>>,
}

fn copy(frame: &Frame<Bytes>) -> Option<Frame<Bytes>> {
    match (frame.data_ref(), frame.trailers_ref()) {
        (Some(data), _) => Some(Frame::data(data.clone())),
        (_, Some(trailers)) => Some(Frame::trailers(trailers.clone())),
        _ => None,
    }
}

impl Body for Rescuable {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match this.body.frames.pop_front() {
            Some(frame) => Poll::Ready(Some(Ok(frame))),
            None => match this.body.rest.as_mut() {
                Some(rest) => Pin::new(rest).poll_frame(cx),
                None => Poll::Ready(None),
            },
        };
        // Once the answer has come (nobody waits for the copy), it is no longer kept.
        if this.rescue.as_ref().is_none_or(|r| r.is_closed()) {
            this.lost = true;
        }
        match &polled {
            Poll::Ready(Some(Ok(frame))) if !this.lost => {
                this.copied_len += frame.data_ref().map_or(0, |d| d.len());
                match copy(frame) {
                    Some(copy) if this.copied_len <= REPLAY_LIMIT => this.copied.push(copy),
                    _ => this.lost = true,
                }
            }
            Poll::Ready(Some(Err(_))) => this.lost = true,
            _ => {}
        }
        if this.lost {
            this.copied = Vec::new();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.frames.is_empty() && self.body.rest.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let queued: usize = self
            .body
            .frames
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len())
            .sum();
        let rest = self
            .body
            .rest
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint());
        shifted(&rest, queued as u64)
    }
}

/// `hint` with `more` bytes in front (upper bound first: a lower bound above it panics).
fn shifted(hint: &SizeHint, more: u64) -> SizeHint {
    let mut shifted = SizeHint::new();
    if let Some(upper) = hint.upper() {
        shifted.set_upper(upper + more);
    }
    shifted.set_lower(hint.lower() + more);
    shifted
}

impl Drop for Rescuable {
    fn drop(&mut self) {
        if self.lost {
            return;
        }
        if let Some(rescue) = self.rescue.take() {
            let mut frames: std::collections::VecDeque<_> = std::mem::take(&mut self.copied).into();
            frames.extend(self.body.frames.drain(..));
            let _ = rescue.send(Replay {
                frames,
                rest: self.body.rest.take(),
            });
        }
    }
}

/// How HTTP/2 connections to backends are opened; one per process.
#[derive(Clone)]
pub struct Http2Connector {
    connect_timeout: Duration,
    max_connections: usize,
    /// PING every connection this often; one unanswered for [`KEEPALIVE_TIMEOUT`] is closed.
    keepalive: Duration,
    /// TLS with ALPN `h2` only, for `https://` backends.
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for Http2Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Connector")
            .field("connect_timeout", &self.connect_timeout)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Why a request could not be sent to an HTTP/2 backend.
#[derive(Debug, thiserror::Error)]
pub enum Http2Error {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("connect: timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("the backend does not offer HTTP/2 (ALPN h2) over TLS")]
    NoH2,
    #[error("HTTP/2 handshake: {0}")]
    Handshake(hyper::Error),
    #[error(transparent)]
    Request(hyper::Error),
}

/// One backend's HTTP/2 connections.
#[derive(Debug, Default)]
pub struct Connections {
    state: Mutex<State>,
    /// A connection was opened, or an attempt to open one ended.
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    live: Vec<Arc<Conn>>,
    connecting: usize,
}

/// One HTTP/2 connection, and the streams weir has on it.
#[derive(Debug)]
struct Conn {
    send: SendRequest<Http2Body>,
    streams: AtomicUsize,
    peer: Arc<Peer>,
}

/// What the connection's reader learnt of the backend.
#[derive(Debug)]
struct Peer {
    /// The backend's `SETTINGS_MAX_CONCURRENT_STREAMS`, as hyper applies it.
    max_streams: AtomicUsize,
    /// The backend sent GOAWAY: no new streams.
    goaway: AtomicBool,
    /// The connection task ended.
    closed: AtomicBool,
}

impl Conn {
    fn open(&self) -> bool {
        !self.peer.goaway.load(Ordering::Relaxed)
            && !self.peer.closed.load(Ordering::Relaxed)
            && !self.send.is_closed()
    }

    fn has_room(&self) -> bool {
        self.streams.load(Ordering::Relaxed) < self.peer.max_streams.load(Ordering::Relaxed)
    }
}

/// A backend's response body; its stream counts against its connection until the body is done
/// or dropped (dropping it early resets the stream at the backend).
#[derive(Debug)]
pub struct Http2Response {
    body: Incoming,
    stream: Option<Stream>,
}

#[derive(Debug)]
struct Stream(Arc<Conn>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for Http2Response {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if frame.is_none() || self.body.is_end_stream() {
            self.stream.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Http2Connector {
    /// Opens connections within `connect_timeout`, at most `max_connections` per backend, each
    /// PINGed every `keepalive`, TLS ones with `tls` (its ALPN is set here).
    pub fn new(
        mut tls: rustls::ClientConfig,
        connect_timeout: Duration,
        max_connections: usize,
        keepalive: Duration,
    ) -> Http2Connector {
        tls.alpn_protocols = vec![b"h2".to_vec()];
        Http2Connector {
            connect_timeout,
            max_connections: max_connections.max(1),
            keepalive,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        }
    }

    /// Sends `req` to `backend` on one of its connections. A request the backend never took
    /// (the connection closed, or GOAWAY came, before its body was read) goes again on another
    /// connection: RFC 9113 §6.8 says streams above GOAWAY's last stream ID were not processed.
    pub async fn send(
        &self,
        backend: &Backend,
        req: Request<Http2Body>,
    ) -> Result<Response<Http2Response>, Http2Error> {
        let (head, body) = req.into_parts();
        let mut body = Replay {
            frames: Default::default(),
            rest: Some(body),
        };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let conn = self.checkout(backend).await?;
            let stream = Stream(Arc::clone(&conn));
            let (rescue_tx, rescue) = tokio::sync::oneshot::channel();
            let mut req = Request::new(Http2Body::new(Rescuable {
                body,
                copied: Vec::new(),
                copied_len: 0,
                lost: false,
                rescue: Some(rescue_tx),
            }));
            *req.method_mut() = head.method.clone();
            *req.uri_mut() = head.uri.clone();
            *req.version_mut() = head.version;
            *req.headers_mut() = head.headers.clone();
            let mut send = conn.send.clone();
            let error = match send.try_send_request(req).await {
                Ok(response) => {
                    return Ok(response.map(|body| Http2Response {
                        body,
                        stream: Some(stream),
                    }))
                }
                Err(e) => e.into_error(),
            };
            let unsent = unprocessed(&error);
            if unsent {
                // No new stream goes on this connection.
                conn.peer.goaway.store(true, Ordering::Relaxed);
            }
            if !(unsent && attempts < MAX_ATTEMPTS) {
                return Err(Http2Error::Request(error));
            }
            // hyper drops the refused request just after it reports the error.
            match tokio::time::timeout(Duration::from_secs(1), rescue).await {
                Ok(Ok(unread)) => body = unread,
                _ => return Err(Http2Error::Request(error)),
            }
        }
    }

    /// A connection with a stream counted for the caller.
    async fn checkout(&self, backend: &Backend) -> Result<Arc<Conn>, Http2Error> {
        let conns = &backend.h2;
        loop {
            let changed = {
                let mut state = conns.state.lock().unwrap_or_else(|e| e.into_inner());
                // Connections that take no new streams leave the list; their streams keep them.
                state.live.retain(|c| c.open());
                if let Some(conn) = state.live.iter().find(|c| c.has_room()) {
                    conn.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(Arc::clone(conn));
                }
                if state.live.len() + state.connecting < self.max_connections {
                    state.connecting += 1;
                    None
                } else if state.connecting == 0 {
                    // At the bound and all full: the least loaded connection queues the stream.
                    let conn = state
                        .live
                        .iter()
                        .min_by_key(|c| c.streams.load(Ordering::Relaxed))
                        .expect("at the bound there is a live connection");
                    conn.streams.fetch_add(1, Ordering::Relaxed);
                    return Ok(Arc::clone(conn));
                } else {
                    // Wait for the connection being opened, then look again.
                    let mut changed = Box::pin(conns.changed.notified());
                    changed.as_mut().enable();
                    Some(changed)
                }
            };
            match changed {
                Some(changed) => changed.await,
                None => {
                    // Counted as connecting until this attempt ends, even if the request is
                    // dropped meanwhile (its client went away, its deadline passed).
                    let attempt = Connecting(conns);
                    let opened = self.connect(backend).await;
                    let opened = opened.inspect(|conn| {
                        conn.streams.fetch_add(1, Ordering::Relaxed);
                        let mut state = conns.state.lock().unwrap_or_else(|e| e.into_inner());
                        state.live.push(Arc::clone(conn));
                    });
                    drop(attempt);
                    return opened;
                }
            }
        }
    }

    async fn connect(&self, backend: &Backend) -> Result<Arc<Conn>, Http2Error> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect(backend.address.as_str()),
        )
        .await
        .map_err(|_| Http2Error::ConnectTimeout(self.connect_timeout))?
        .map_err(Http2Error::Connect)?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if backend.scheme == http::uri::Scheme::HTTPS {
            let host = backend.authority.host();
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|e| Http2Error::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let tls = tokio::time::timeout(self.connect_timeout, self.tls.connect(name, tcp))
                .await
                .map_err(|_| Http2Error::ConnectTimeout(self.connect_timeout))?
                .map_err(Http2Error::Tls)?;
            if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                return Err(Http2Error::NoH2);
            }
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let peer = Arc::new(Peer {
            max_streams: AtomicUsize::new(INITIAL_STREAMS),
            goaway: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        });
        let io = Watched {
            io,
            frames: FrameScan::default(),
            peer: Arc::clone(&peer),
        };
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_max_send_streams(INITIAL_STREAMS)
            .keep_alive_interval(self.keepalive)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(io))
            .await
            .map_err(Http2Error::Handshake)?;
        let task_peer = Arc::clone(&peer);
        let address = backend.address.clone();
        tokio::spawn(async move {
            let mut conn = Box::pin(conn);
            let ended = std::future::poll_fn(|cx| {
                let polled = conn.as_mut().poll(cx);
                let max = conn.current_max_send_streams();
                task_peer.max_streams.store(max, Ordering::Relaxed);
                polled
            })
            .await;
            task_peer.closed.store(true, Ordering::Relaxed);
            if let Err(e) = ended {
                tracing::debug!(backend = %address, error = %e, "HTTP/2 connection to the backend ended");
            }
        });
        Ok(Arc::new(Conn {
            send,
            streams: AtomicUsize::new(0),
            peer,
        }))
    }
}

/// A connection attempt in progress: ends, and wakes the requests waiting for it, when dropped.
struct Connecting<'a>(&'a Connections);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.connecting -= 1;
        drop(state);
        self.0.changed.notify_waiters();
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection whose incoming frame headers are watched for GOAWAY, so that no new stream is
/// put on a connection the backend is closing (hyper does not say when one arrives).
struct Watched {
    io: Box<dyn Io>,
    frames: FrameScan,
    peer: Arc<Peer>,
}

/// Finds frame boundaries in the bytes a server sends (RFC 9113 §4.1: a 9-byte header whose
/// first 3 bytes are the payload's length, then the payload).
#[derive(Debug, Default)]
struct FrameScan {
    header: [u8; 9],
    have: usize,
    skip: usize,
}

const GOAWAY: u8 = 0x7;

impl FrameScan {
    /// Reads `bytes` on from where the last call stopped; returns whether a GOAWAY header was
    /// among them.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        let mut goaway = false;
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                self.have = 0;
                let h = &self.header;
                self.skip =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                goaway |= h[3] == GOAWAY;
            }
        }
        goaway
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut self.io).poll_read(cx, buf))?;
        let this = &mut *self;
        if this.frames.scan(&buf.filled()[before..]) {
            this.peer.goaway.store(true, Ordering::Relaxed);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            0,
            0,
            0,
            0,
            0,
        ];
        f.resize(9 + payload, 0xAB);
        f
    }

    #[test]
    fn a_replayed_body_of_known_length_says_its_length() {
        // Read whole before a GOAWAY: the rest is an exact 0, the copy 5 bytes.
        let hint = shifted(&SizeHint::with_exact(0), 5);
        assert_eq!(hint.exact(), Some(5));
        let mut open = SizeHint::new();
        open.set_lower(2);
        let hint = shifted(&open, 5);
        assert_eq!((hint.lower(), hint.upper()), (7, None));
    }

    #[test]
    fn goaway_is_found_at_a_frame_boundary_whatever_the_reads_split() {
        let mut bytes = frame(0x4, 18); // SETTINGS
        bytes.extend(frame(0x0, 70_000)); // DATA whose payload holds a GOAWAY-looking byte
        bytes[9 + 9 + 3] = GOAWAY;
        bytes.extend(frame(0x6, 8)); // PING
        let goaway_at = bytes.len();
        bytes.extend(frame(GOAWAY, 8));
        for split in [1, 2, 7, 9, 10, 4096, bytes.len()] {
            let mut scan = FrameScan::default();
            let mut seen_at = None;
            for (i, chunk) in bytes.chunks(split).enumerate() {
                if scan.scan(chunk) && seen_at.is_none() {
                    seen_at = Some((i + 1) * split);
                }
            }
            let seen_at = seen_at.unwrap_or_else(|| panic!("split {split}: no GOAWAY found"));
            assert!(seen_at >= goaway_at + 9, "split {split}: found too early");
        }
        let mut scan = FrameScan::default();
        assert!(!scan.scan(&bytes[..goaway_at]), "no GOAWAY before it");
    }
}
