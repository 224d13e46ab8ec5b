//! weir's HTTP/1.1 server and its fast path: HTTP/1 client connections (plain TCP, or TLS that
//! did not negotiate h2) are served by one task that parses heads with `httparse` and frames
//! every request by [`super::framing`]. Requests it can relay byte for byte it writes straight
//! from the parsed slices onto a pooled backend socket it owns for the exchange, passing the
//! response bytes through as they arrive (chunked framing is tracked, not re-encoded); the rest
//! are served by [`super::general`]. Requests from other front ends reach plain-HTTP backends
//! over the same pools through [`forward`].
//!
//! Invariant: the relay serves only what it can serve exactly like the general path: origin-form
//! HTTP/1.1 requests with no body or a `Content-Length` body, to plain-HTTP backends (mirrored
//! requests included: their bodies and answers are teed as they pass). Any other request goes to
//! the general path before anything was counted or sent. Only an HTTP/2 preface (or a TLS
//! handshake on the plain port) hands the connection to hyper, with every unconsumed byte.

use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderName;
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::decide::{
    backend_failure, decide_on, reads_body, route_for, Ask, Decided, Decision, Refusal,
};
use super::framing::{self, Framing};
use super::listener::ConnSettings;
use super::proxy::{ConnInfo, Proxy};
use crate::fields::{BodyFields, FieldReader};

use super::body::BoxError;
use crate::metrics::ProxyFailure;
use crate::upstream::pool::{Connection, Pool};
use crate::upstream::Backend;

/// Headers the fast path parses per message; a request with more goes to hyper (which applies
/// `listener.max_headers`).
const MAX_HEADERS: usize = 64;
/// Response headers accepted from a backend (hyper's client allows as many).
const MAX_RESPONSE_HEADERS: usize = 100;
/// A response head larger than this is a protocol error (hyper's default limit is similar).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 8 * 1024;

/// How a connection left the fast path.
#[derive(Debug)]
pub enum Served<S> {
    /// Closed (by either side, a timeout or the drain).
    Closed,
    /// Hyper serves the rest of the connection, starting with these unconsumed bytes.
    HandOff(Rewind<S>),
}

/// What the client connection is: plain TCP or TLS (terminated by weir).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientTransport {
    Plain,
    Tls,
}

/// Serves a client connection until it closes or needs hyper.
pub async fn serve<S>(
    proxy: &Proxy,
    mut client: S,
    peer: SocketAddr,
    transport: ClientTransport,
    settings: &ConnSettings,
    stop: &mut watch::Receiver<bool>,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let client_ip = peer.ip().to_string();
    let tls = transport == ClientTransport::Tls;
    let max_head = settings.limits.max_header_bytes.max(1024);
    // Empty (unallocated) while the connection is idle: an idle keep-alive connection costs its
    // task and socket, not a buffer.
    let mut buf = BytesMut::new();
    loop {
        // Wait for a complete request head; like hyper's, the header read timeout bounds the
        // whole head (a client dribbling bytes does not keep restarting it).
        let deadline = tokio::time::Instant::now() + settings.header_read_timeout;
        loop {
            if buf.starts_with(b"PRI * HTTP/2.0")
                || (!tls && buf.first().is_some_and(|b| *b == 0x16))
            {
                return Served::HandOff(Rewind::new(buf, client)); // h2 prior knowledge, or TLS
            }
            // A head ends at an empty line; like hyper, accept bare LF line ends too. One that
            // arrived whole in a large read is held to the limit as well.
            let end = memchr::memmem::find(&buf, b"\r\n\r\n")
                .or_else(|| memchr::memmem::find(&buf, b"\n\n"));
            if end.is_some_and(|end| end < max_head) {
                break;
            }
            if end.is_some() || buf.len() >= max_head {
                let body = serde_json::json!({
                    "error": format!("the request head is larger than listener.max_header_bytes = {max_head}"),
                    "kind": "bad_request",
                });
                let answer = Answer {
                    status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    body: &body,
                    head_request: false,
                };
                local(&mut client, answer, None, false, None).await;
                return Served::Closed;
            }
            if buf.is_empty() && *stop.borrow() {
                return Served::Closed;
            }
            // Idle, the connection waits with no buffer: the first bytes are read onto the stack
            // and only then copied into one.
            let idle = buf.is_empty();
            let reading = async {
                if idle {
                    return read_via_stack(&mut client, &mut buf).await;
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK);
                }
                client.read_buf(&mut buf).await
            };
            let read = tokio::select! {
                read = tokio::time::timeout_at(deadline, reading) => read,
                _ = crate::shutdown::stopped(stop), if idle => return Served::Closed,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Served::Closed,
                Ok(Ok(_)) => {}
            }
        }
        let draining = *stop.borrow();
        let outcome = Box::pin(exchange(
            proxy,
            &mut client,
            &buf,
            &client_ip,
            tls,
            draining,
        ))
        .await;
        match outcome {
            Exchange::General => {
                let info = ConnInfo::new(peer.ip(), tls);
                let max_headers = settings.limits.max_headers;
                let served = super::general::serve_request(
                    proxy,
                    &mut client,
                    &mut buf,
                    &info,
                    max_headers,
                    draining,
                );
                if let Exchange::Close = Box::pin(served).await {
                    return Served::Closed;
                }
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                if *stop.borrow() {
                    return Served::Closed;
                }
            }
            Exchange::Close => return Served::Closed,
            Exchange::Done { consumed } => {
                buf.advance(consumed);
                if buf.is_empty() {
                    buf = BytesMut::new();
                }
                if *stop.borrow() {
                    return Served::Closed;
                }
            }
        }
    }
}

/// Reads what the peer sends next into `buf`, which is empty, through a buffer on the stack of
/// each poll: when the read has to wait, `buf`'s allocation (if any) is freed first, so an idle
/// client connection, or a stream between two events, holds no buffer while it waits. A
/// `Pending` read has taken no bytes, so none are lost when the stack buffer goes; bytes that are
/// already there go into `buf` as it is (no reallocation).
async fn read_via_stack<S: AsyncRead + Unpin>(io: &mut S, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut stack);
        match Pin::new(&mut *io).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if buf.capacity() > 0 {
                    *buf = BytesMut::new();
                }
                Poll::Pending
            }
        }
    })
    .await
}

pub(super) enum Exchange {
    /// Answered; the request took `consumed` bytes of the buffer; the connection stays open.
    Done { consumed: usize },
    /// Answered (or failed) in a way that ends the connection.
    Close,
    /// Not relayed byte for byte: served by [`super::general`]; nothing was sent or counted.
    General,
}

/// One request and its response.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    client: &mut S,
    buf: &[u8],
    client_ip: &str,
    tls: bool,
    draining: bool,
) -> Exchange {
    if !proxy.settings.http1_relay {
        return Exchange::General;
    }
    let started = Instant::now();
    // On the heap, and freed once the upstream head is written: kept in this future, the array
    // would be held for as long as the answer streams (2 KiB of every open stream).
    let mut storage = Box::new([httparse::EMPTY_HEADER; MAX_HEADERS]);
    let mut req = httparse::Request::new(&mut storage[..]);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Exchange::General,
    };
    let (Some(method), Some(request_target), Some(1)) = (req.method, req.path, req.version) else {
        return Exchange::General;
    };
    if method == "CONNECT" || !request_target.starts_with('/') {
        return Exchange::General;
    }
    let headers: &[httparse::Header<'_>] = req.headers;
    let fields = match framing::request(
        false,
        method,
        headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    ) {
        Ok(fields) => fields,
        Err(malformed) => {
            let body = malformed.json();
            let answer = Answer {
                status: malformed.request_status(),
                body: &body,
                head_request: method == "HEAD",
            };
            return local(client, answer, None, false, None).await;
        }
    };
    // Bodies hyper frames (chunked, Expect) and upgrades go to hyper, which checks the same rules.
    if fields.chunked || fields.expect || fields.upgrade {
        return Exchange::General;
    }
    let Some(host) = fields.host.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Exchange::General;
    };
    let path = request_target
        .split_once('?')
        .map_or(request_target, |(p, _)| p);
    let body_len = fields.content_length.unwrap_or(0);
    let buffered_body = (buf.len() - head_len).min(body_len as usize);
    let consumed = head_len + buffered_body;
    let body_complete = buffered_body as u64 == body_len;
    // Where a local answer leaves the connection: reusable only when the whole request is read.
    let reuse = body_complete.then_some(consumed);
    let keep_alive = !fields.close && !draining;
    let settings = &proxy.settings;

    // Decide from one table snapshot, then let it go. A route with a version the fast path
    // cannot send to goes to hyper before the split draws, so the split draws once.
    let mut ask = Ask {
        method,
        host: Some(host),
        path,
        headers,
        content_length: fields.content_length,
        started,
        body: None,
    };
    let table = proxy.table.load();
    // A route that routes by the body's fields reads them here when the body is in hand (or
    // its first max_body_scan bytes are); otherwise the general path reads them.
    let first = table.find(ask.host, ask.path);
    let read;
    if first.is_some_and(|first| reads_body(&table, first, &ask)) {
        let body = &buf[head_len..consumed];
        let max = settings.max_body_scan;
        if !body_complete && body.len() < max {
            return Exchange::General;
        }
        let sticky = first.and_then(|r| r.sticky_field());
        let wanted = ["model", sticky.unwrap_or("")];
        let wanted = &wanted[..if sticky.is_some() { 2 } else { 1 }];
        let mut reader = FieldReader::new(wanted, max);
        read = match reader.feed(body) {
            Some(read) => read,
            None => reader.finish(),
        };
        ask.body = Some(&read);
    }
    let decided = match route_for(&table, first, &ask) {
        Err(local) => Decided::Local(local),
        Ok(route) if !route.plain_http() => return Exchange::General,
        Ok(route) => decide_on(route, &ask, settings.max_request_body),
    };
    drop(table);
    let Decision {
        api,
        version,
        backend: picked,
        in_flight,
        shadow_plan,
    } = match decided {
        Decided::Forward(decision) => decision,
        Decided::Local(answer) => {
            let label_header = match (&settings.version_header, &answer.version) {
                (Some(name), Some((version, _))) => Some((name, version.label_header.as_bytes())),
                _ => None,
            };
            let head_request = method == "HEAD";
            return local(
                client,
                Answer {
                    status: answer.status,
                    body: &answer.body,
                    head_request,
                },
                label_header,
                keep_alive,
                reuse,
            )
            .await;
        }
    };
    let label_header = settings
        .version_header
        .as_ref()
        .map(|name| (name, version.label_header.as_bytes()));
    let refuse = |kind: ProxyFailure| {
        Refusal::Backend(kind)
            .answer(&version.label, &in_flight, api)
            .1
    };
    let backend = picked.backend();

    // The version's name for the model replaces the client's: its span in the bytes read.
    let model = match ask.body {
        Some(Ok(BodyFields { model: Some(f), .. })) => Some(f),
        _ => None,
    };
    let rename = model.zip(version.served_model.as_deref());
    let shadow_plan = shadow_plan.map(|mut plan| {
        if let Some(f) = model {
            plan.name_model(&buf[head_len + f.start..head_len + f.end]);
        }
        plan
    });
    let length = fields.content_length.map(|n| match rename {
        Some((field, token)) => field.renamed_len(n, token),
        None => n,
    });

    // The upstream request: the client's head minus hop-by-hop headers and the override, its
    // length once, plus X-Forwarded-For / -Proto; then the body bytes already read.
    let mut out = Vec::with_capacity(head_len + buffered_body + 64);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(request_target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    for h in headers {
        let name = h.name.as_bytes();
        if fields.drops(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(super::split::OVERRIDE_HEADER.as_str().as_bytes())
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            forwarded_for.push(h.value);
            continue;
        }
        push_header(&mut out, name, h.value);
    }
    if let Some(length) = length {
        let _ = write!(out, "content-length: {length}\r\n");
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    for prior in &forwarded_for {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client_ip.as_bytes());
    out.extend_from_slice(if tls {
        b"\r\nx-forwarded-proto: https\r\n\r\n".as_slice()
    } else {
        b"\r\nx-forwarded-proto: http\r\n\r\n"
    });
    let body = &buf[head_len..consumed];
    match rename {
        Some((field, token)) => field.splice_into(&mut out, body, token),
        None => out.extend_from_slice(body),
    }
    drop(storage);
    // A mirrored request starts its shadow now, with the head as forwarded; the tees get the
    // bodies as they pass.
    let mut shadow = shadow_plan.and_then(|plan| {
        let head = forwarded_head(&out)?;
        let length = head.content_length();
        proxy
            .shadower
            .begin(plan, &head.method, &head.uri, &head.headers, length)
    });
    let mut request_tee = shadow.as_mut().map(|s| s.take_request_tee());
    if let Some(tee) = request_tee.as_mut() {
        tee.push(&Bytes::copy_from_slice(&buf[head_len..consumed]));
        if body_complete {
            tee.finish();
        }
    }

    let sent = send(
        proxy,
        client,
        backend,
        ConnectionRequest {
            method,
            out: &out,
            body_complete,
            body_left: body_len - buffered_body as u64,
            request_tee: request_tee.as_mut(),
        },
    )
    .await;
    drop(out); // not held while the answer streams
    let (mut conn, response) = match sent {
        Ok(sent) => sent,
        Err(failure) => {
            if let Failure::Backend(kind @ (ProxyFailure::Connect | ProxyFailure::ConnectTimeout)) =
                failure
            {
                backend.refused(settings.backend_eject, &version.label, kind.as_str());
            }
            match failure {
                Failure::Sending(kind) => backend.failed(
                    &version.label,
                    kind,
                    "stopped taking the request before it was sent",
                ),
                Failure::Backend(kind) if !kind.is_connect() => {
                    backend.failed(&version.label, kind, backend_failure(kind));
                }
                _ => {}
            }
            let (status, body, reusable) = match failure {
                Failure::ClientBody => {
                    let (status, body) =
                        Refusal::ClientBody.answer(&version.label, &in_flight, api);
                    (status, body, None)
                }
                // Refused before anything was sent: the connection is as reusable as the
                // request is read.
                Failure::Backend(kind @ (ProxyFailure::Connect | ProxyFailure::ConnectTimeout)) => {
                    (kind.status(), refuse(kind), reuse)
                }
                // Failed while sending: part of the body may still be unread.
                Failure::Sending(kind) => (kind.status(), refuse(kind), None),
                // Failed after the whole request was sent: the client's connection stays usable.
                Failure::Backend(kind) => (kind.status(), refuse(kind), Some(consumed)),
            };
            let answer = Answer {
                status,
                body: &body,
                head_request: method == "HEAD",
            };
            return local(client, answer, label_header, keep_alive, reusable).await;
        }
    };

    // A request whose body the backend answered before reading it all ends the connection.
    let keep_alive = keep_alive && !response.request_unread;
    // The client's response head.
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::BAD_GATEWAY);
    in_flight.stats().count_response(status);
    // Close-delimited upstream bodies reach the client chunked: a close would lose the
    // difference between the end and a failure.
    let encode_chunks = matches!(response.framing, Framing::UntilClose);
    let mut head_out = Vec::with_capacity(response.len + 96);
    response.write_status_line(&conn.buf, &mut head_out);
    let dated =
        response.write_headers(&conn.buf, &mut head_out, label_header.map(|(name, _)| name));
    // A response forwarded without a Date gets one (RFC 9110 §6.6.1).
    if !dated {
        super::date::push_header(&mut head_out);
    }
    if let Some((name, value)) = label_header {
        push_header(&mut head_out, name.as_str().as_bytes(), value);
    }
    if !keep_alive {
        head_out.extend_from_slice(b"connection: close\r\n");
    }
    head_out.extend_from_slice(b"\r\n");
    let mut response_tee = shadow.take().map(|s| {
        let mut headers = http::HeaderMap::new();
        if let Some(value) = response.content_type(&conn.buf) {
            headers.insert(http::header::CONTENT_TYPE, value);
        }
        s.response_tee(response.status, &headers)
    });
    conn.buf.advance(response.len);

    // The body, as it arrives.
    let mut framing = response.framing;
    let mut first_byte = false;
    let mut pending = head_out;
    // A stream of small reads (SSE events, tokens) waits for each with no buffer held: once a
    // read is small, the next one goes through the stack (as an idle client connection's does)
    // and the buffers are freed between reads. The read that brought the head counts: a
    // stream's first event usually comes with it, and every stream would otherwise hold a full
    // buffer until its second. One idle timer for the whole answer, moved only when it fires
    // early, instead of one inserted and removed per read.
    let mut small_reads = response.len + conn.buf.len() < SMALL_READ;
    let idle = tokio::time::sleep(settings.idle_timeout);
    tokio::pin!(idle);
    loop {
        // The copy for comparison gets the content, as the candidate's decoded answer has it.
        let mut tee = response_tee.as_mut().filter(|t| t.is_open());
        let buffered = &conn.buf[..];
        let (pass, done) = framing.take_with(buffered, |run| {
            if let Some(tee) = tee.as_mut() {
                tee.push(&Bytes::copy_from_slice(&buffered[run]));
            }
        });
        // What passes is written straight from the read buffer, unless it joins the head or
        // the end (which is written after the connection went back to the pool).
        let mut direct = 0;
        if pass > 0 {
            if !first_byte {
                first_byte = true;
                in_flight
                    .stats()
                    .ttfb
                    .observe(started.elapsed().as_secs_f64());
            }
            if encode_chunks {
                let _ = write!(pending, "{pass:x}\r\n");
                pending.extend_from_slice(&conn.buf[..pass]);
                pending.extend_from_slice(b"\r\n");
                conn.buf.advance(pass);
            } else if done || !pending.is_empty() {
                pending.extend_from_slice(&conn.buf[..pass]);
                conn.buf.advance(pass);
            } else {
                direct = pass;
            }
        }
        if done {
            if encode_chunks {
                pending.extend_from_slice(b"0\r\n\r\n");
            }
            if !first_byte {
                in_flight
                    .stats()
                    .ttfb
                    .observe(started.elapsed().as_secs_f64());
            }
            if let Some(tee) = response_tee.as_mut() {
                tee.finish();
            }
            // The backend's part is over: it stops counting as in flight (and its connection
            // goes back to the pool) before the client can see the end, so whoever reads the
            // gauges after an answer never finds it still open.
            drop(in_flight);
            let reusable = response.keep_alive && conn.buf.is_empty() && !encode_chunks;
            if reusable {
                backend.pool.put(conn, settings.pool_max_idle);
            }
            drop(picked);
            if write_out(client, &pending).await.is_err() {
                return Exchange::Close;
            }
            if !keep_alive {
                let _ = client.shutdown().await;
                return Exchange::Close;
            }
            return Exchange::Done { consumed };
        }
        if !pending.is_empty() {
            if write_out(client, &pending).await.is_err() {
                return Exchange::Close; // the client left: the upstream connection goes too
            }
            // A stream frees it between its small writes; a large body reuses it.
            if small_reads {
                pending = Vec::new();
            } else {
                pending.clear();
            }
        }
        if direct > 0 {
            if write_out(client, &conn.buf[..direct]).await.is_err() {
                return Exchange::Close;
            }
            conn.buf.advance(direct);
        }
        // Framing that can never end: what was valid has gone out, the rest is cut off.
        if framing.is_invalid() {
            in_flight.stats().count_error(ProxyFailure::Body);
            backend.failed(
                &version.label,
                ProxyFailure::Body,
                "sent invalid chunked framing",
            );
            return Exchange::Close;
        }
        let through_stack = small_reads && conn.buf.is_empty();
        if !through_stack && conn.buf.capacity() - conn.buf.len() < SMALL_READ {
            conn.buf.reserve(READ_CHUNK);
        }
        let offered = if through_stack {
            READ_CHUNK
        } else {
            conn.buf.capacity() - conn.buf.len()
        };
        let read = async {
            if through_stack {
                read_via_stack(&mut conn.stream, &mut conn.buf).await
            } else {
                conn.stream.read_buf(&mut conn.buf).await
            }
        };
        let read = within(read, idle.as_mut(), settings.idle_timeout).await;
        if let Ok(Ok(n)) = read {
            // Small only if the read did not fill what it was offered: a full one says more
            // was waiting, whatever its size.
            small_reads = n < SMALL_READ && n < offered;
        }
        match read {
            Ok(Ok(0)) if matches!(framing, Framing::UntilClose) => framing = Framing::Ended,
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                in_flight.stats().count_error(ProxyFailure::Body);
                backend.failed(
                    &version.label,
                    ProxyFailure::Body,
                    backend_failure(ProxyFailure::Body),
                );
                return Exchange::Close;
            }
            Err(_) => {
                in_flight.stats().count_error(ProxyFailure::IdleTimeout);
                let kind = ProxyFailure::IdleTimeout;
                backend.failed(&version.label, kind, backend_failure(kind));
                return Exchange::Close;
            }
        }
    }
}

/// A read shorter than this marks a stream of small writes (see the relay loop).
const SMALL_READ: usize = 2048;

/// `read`, or `Err(Elapsed)`-like `Err(())` once `timeout` has passed with no answer. `timer` is
/// shared by every read of an answer: it is reset here only when it fires before the read's own
/// deadline, so a read that completes costs no timer insertion or removal.
async fn within<F: Future<Output = io::Result<usize>>>(
    read: F,
    mut timer: Pin<&mut tokio::time::Sleep>,
    timeout: Duration,
) -> Result<io::Result<usize>, ()> {
    let now = tokio::time::Instant::now();
    // Saturating, as tokio::time::timeout does, for a timeout no clock can add.
    let deadline = now
        .checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
    let mut read = std::pin::pin!(read);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Ok(r));
        }
        loop {
            match timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) if tokio::time::Instant::now() >= deadline => {
                    return Poll::Ready(Err(()))
                }
                Poll::Ready(()) => timer.as_mut().reset(deadline),
            }
        }
    })
    .await
}

/// The method, target and headers of a forwarded head, as hyper types, for the shadow (built only
/// for mirrored requests).
struct ForwardedHead {
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
}

impl ForwardedHead {
    fn content_length(&self) -> Option<u64> {
        self.headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    }
}

fn forwarded_head(out: &[u8]) -> Option<ForwardedHead> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
    let mut req = httparse::Request::new(&mut storage);
    req.parse(out).ok()?;
    let method = http::Method::from_bytes(req.method?.as_bytes()).ok()?;
    let uri: http::Uri = req.path?.parse().ok()?;
    let mut headers = http::HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        headers.append(
            HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            http::HeaderValue::from_bytes(h.value).ok()?,
        );
    }
    Some(ForwardedHead {
        method,
        uri,
        headers,
    })
}

/// An upstream request ready to go: its head and the body bytes already read, the rest still
/// on the client's socket.
struct ConnectionRequest<'a> {
    method: &'a str,
    out: &'a [u8],
    body_complete: bool,
    body_left: u64,
    request_tee: Option<&'a mut crate::shadow::tee::RequestTee>,
}

/// Why an upstream exchange produced no response head.
enum Failure {
    /// Connect, timeout, reset or protocol, after the whole request was sent (or before any of
    /// it was).
    Backend(ProxyFailure),
    /// The backend went away (`Reset`) or stopped reading for longer than the idle timeout
    /// (`Timeout`) while the request body was still being sent.
    Sending(ProxyFailure),
    /// The client stopped sending its body.
    ClientBody,
}

/// Sends the request on a pooled (or new) connection and reads the response head. A pooled
/// connection that turns out closed is replaced once, by a new connection, when the whole request
/// is in hand and sending it again is safe: the pool's other connections are as old as the one
/// that failed, and a backend that closes idle connections may have closed them all.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    client: &mut S,
    backend: &Backend,
    mut request: ConnectionRequest<'_>,
) -> Result<(Connection, ResponseHead), Failure> {
    let settings = &proxy.settings;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (mut conn, reused) = open(proxy, backend, attempt)
            .await
            .map_err(Failure::Backend)?;
        let retry = reused && request.body_complete && attempt < 2;
        match write_upstream(&mut conn, request.out, settings.idle_timeout).await {
            Ok(()) => {}
            Err(ProxyFailure::Reset) if retry => continue,
            Err(kind) if request.body_complete => return Err(Failure::Backend(kind)),
            Err(kind) => return Err(Failure::Sending(kind)),
        }
        // The rest of the body, from the client as it arrives.
        let mut left = request.body_left;
        let mut chunk = vec![0u8; READ_CHUNK.min(left as usize)];
        while left > 0 {
            let want = chunk.len().min(left as usize);
            let read = tokio::time::timeout(settings.idle_timeout, client.read(&mut chunk[..want]));
            let n = match read.await {
                Ok(Ok(n)) if n > 0 => n,
                _ => return Err(Failure::ClientBody),
            };
            if let Some(tee) = request.request_tee.as_mut().filter(|t| t.is_open()) {
                tee.push(&Bytes::copy_from_slice(&chunk[..n]));
            }
            let sent = write_body(&mut conn, &chunk[..n], settings.idle_timeout).await;
            left -= n as u64;
            // The backend answered before reading the whole body (413, 401): the rest stays
            // unread, and neither connection carries another request.
            if sent.map_err(Failure::Sending)? == Sent::Answered && left > 0 {
                break;
            }
        }
        if request.body_left > 0 && left == 0 {
            if let Some(tee) = request.request_tee.as_mut() {
                tee.finish();
            }
        }
        match await_response(proxy, &mut conn, request.method).await {
            // Closed before any answer on a reused connection: sent again only when that is safe
            // (the backend may have acted on a request it then did not answer).
            Err(HeadError::Closed) if retry && idempotent(request.method) => continue,
            Err(error) => return Err(Failure::Backend(error.kind())),
            Ok(mut response) => {
                response.request_unread = left > 0;
                response.keep_alive &= left == 0;
                return Ok((conn, response));
            }
        }
    }
}

/// For a request's first attempt a pooled connection to `backend` (and `true`), or a new one;
/// for a retry always a new one (the pooled ones are as old as the one that failed).
async fn open(
    proxy: &Proxy,
    backend: &Backend,
    attempt: u32,
) -> Result<(Connection, bool), ProxyFailure> {
    let settings = &proxy.settings;
    let pooled = if attempt == 1 {
        backend.pool.checkout(settings.pool_idle_timeout)
    } else {
        None
    };
    match pooled {
        Some(conn) => Ok((conn, true)),
        None => Ok((connect(backend, settings.connect_timeout).await?, false)),
    }
}

/// The response head to a request that has been sent, within `proxy.response_header_timeout`.
async fn await_response(
    proxy: &Proxy,
    conn: &mut Connection,
    method: &str,
) -> Result<ResponseHead, HeadError> {
    let head = read_response_head(conn, method == "HEAD");
    match tokio::time::timeout(proxy.settings.response_header_timeout, head).await {
        Err(_) => Err(HeadError::TimedOut),
        Ok(result) => result,
    }
}

/// Writes to a backend; one that takes nothing for `timeout` (it stopped reading) is cut off.
async fn write_upstream(
    conn: &mut Connection,
    data: &[u8],
    timeout: Duration,
) -> Result<(), ProxyFailure> {
    match tokio::time::timeout(timeout, conn.stream.write_all(data)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(ProxyFailure::Reset),
        Err(_) => Err(ProxyFailure::Timeout),
    }
}

fn idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
    )
}

/// Writes to the client and flushes (a TLS stream may hold records back until flushed; for plain
/// TCP the flush is free).
pub(super) async fn write_out<S: AsyncWrite + Unpin>(
    client: &mut S,
    data: &[u8],
) -> io::Result<()> {
    client.write_all(data).await?;
    client.flush().await
}

pub(super) fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Answers with weir's own JSON, draining a small unread request body so the connection can stay
/// open (a large unread body closes it).
/// weir's own answer to one request; to a HEAD request it has no body.
pub(super) struct Answer<'a> {
    pub status: StatusCode,
    pub body: &'a serde_json::Value,
    pub head_request: bool,
}

pub(super) async fn local<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    answer: Answer<'_>,
    version_header: Option<(&HeaderName, &[u8])>,
    keep_alive: bool,
    consumed: Option<usize>,
) -> Exchange {
    let keep_alive = keep_alive && consumed.is_some();
    let status = answer.status;
    let body = answer.body.to_string();
    let mut out = Vec::with_capacity(body.len() + 160);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\n");
    let _ = write!(out, "content-length: {}\r\n", body.len());
    super::date::push_header(&mut out);
    if let Some((name, value)) = version_header {
        push_header(&mut out, name.as_str().as_bytes(), value);
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !answer.head_request {
        out.extend_from_slice(body.as_bytes());
    }
    match consumed {
        Some(consumed) if keep_alive && write_out(client, &out).await.is_ok() => {
            Exchange::Done { consumed }
        }
        _ => {
            if keep_alive {
                return Exchange::Close;
            }
            let _ = write_out(client, &out).await;
            let _ = client.shutdown().await;
            Exchange::Close
        }
    }
}

// === upstream connections ===

async fn connect(backend: &Backend, timeout: Duration) -> Result<Connection, ProxyFailure> {
    match tokio::time::timeout(timeout, TcpStream::connect(backend.address.as_str())).await {
        Err(_) => Err(ProxyFailure::ConnectTimeout),
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Err(ProxyFailure::ConnectTimeout),
        Ok(Err(_)) => Err(ProxyFailure::Connect),
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(Connection {
                stream,
                buf: BytesMut::with_capacity(READ_CHUNK),
                idle_since: Instant::now(),
            })
        }
    }
}

// === responses ===

#[derive(Clone, Copy, Debug)]
enum HeadError {
    /// The backend closed (or reset) before a complete head.
    Closed,
    /// Not an HTTP/1.x response head.
    Invalid,
    /// No complete head within the response header timeout.
    TimedOut,
}

impl HeadError {
    fn kind(self) -> ProxyFailure {
        match self {
            HeadError::Closed => ProxyFailure::Reset,
            HeadError::Invalid => ProxyFailure::Protocol,
            HeadError::TimedOut => ProxyFailure::Timeout,
        }
    }
}

/// A parsed response head, as offsets into the upstream buffer.
struct ResponseHead {
    status: u16,
    /// The head's length: it is the first `len` bytes of the buffer.
    len: usize,
    reason: std::ops::Range<usize>,
    /// Header lines to pass on, as (name, value) ranges.
    headers: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    /// Content-Length, written once (the backend's lines are not passed on as they were).
    content_length: Option<u64>,
    framing: Framing,
    keep_alive: bool,
    /// The backend answered before the whole request body was sent (the rest is unread).
    request_unread: bool,
}

impl ResponseHead {
    /// `HTTP/1.1 <status> <reason>\r\n`, the backend's reason or the canonical one.
    fn write_status_line(&self, buf: &[u8], out: &mut Vec<u8>) {
        let reason = &buf[self.reason.clone()];
        let reason = if reason.is_empty() {
            StatusCode::from_u16(self.status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .as_bytes()
        } else {
            reason
        };
        out.extend_from_slice(b"HTTP/1.1 ");
        // httparse only accepts three-digit status codes.
        let code = self.status;
        out.extend_from_slice(&[
            b'0' + (code / 100 % 10) as u8,
            b'0' + (code / 10 % 10) as u8,
            b'0' + (code % 10) as u8,
        ]);
        out.push(b' ');
        out.extend_from_slice(reason);
        out.extend_from_slice(b"\r\n");
    }

    fn content_type(&self, buf: &[u8]) -> Option<http::HeaderValue> {
        self.headers
            .iter()
            .find(|(name, _)| buf[name.clone()].eq_ignore_ascii_case(b"content-type"))
            .and_then(|(_, value)| http::HeaderValue::from_bytes(&buf[value.clone()]).ok())
    }

    /// The headers to pass on, less `replaced` (a header weir sets itself); whether `Date` was
    /// among them.
    fn write_headers(&self, buf: &[u8], out: &mut Vec<u8>, replaced: Option<&HeaderName>) -> bool {
        let mut dated = false;
        for (name, value) in &self.headers {
            let name = &buf[name.clone()];
            if replaced.is_some_and(|r| name.eq_ignore_ascii_case(r.as_str().as_bytes())) {
                continue;
            }
            dated |= name.eq_ignore_ascii_case(b"date");
            push_header(out, name, &buf[value.clone()]);
        }
        if let Some(length) = self.content_length {
            let _ = write!(out, "content-length: {length}\r\n");
        }
        if matches!(self.framing, Framing::UntilClose) {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        dated
    }
}

/// Reads until a complete final response head is in `conn.buf` (1xx heads are skipped).
async fn read_response_head(
    conn: &mut Connection,
    head_request: bool,
) -> Result<ResponseHead, HeadError> {
    loop {
        if !conn.buf.is_empty() {
            match parse_response(&conn.buf, head_request)? {
                Some(Parsed::Informational(len)) => {
                    conn.buf.advance(len);
                    continue;
                }
                Some(Parsed::Final(head)) => return Ok(head),
                None if conn.buf.len() > MAX_RESPONSE_HEAD => return Err(HeadError::Invalid),
                None => {}
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(READ_CHUNK);
        }
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(_) => {}
        }
    }
}

enum Parsed {
    Informational(usize),
    Final(ResponseHead),
}

/// Whether a backend's answer starts like an HTTP/2 server's: a SETTINGS frame on stream 0, which
/// an HTTP/2-only server (a gRPC server, typically) sends first on any connection.
fn speaks_http2(buf: &[u8]) -> bool {
    buf.len() >= 9 && buf[3] == 0x04 && buf[5..9] == [0, 0, 0, 0]
}

/// Says, at most once a minute, what to change when a backend answers HTTP/1.1 in HTTP/2.
fn http2_answer_warning() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if (last == 0 || now >= last + 60)
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            "a backend answered an HTTP/1.1 request in HTTP/2: it is an HTTP/2-only server (a gRPC server?); give its version protocol = \"http2\" (quick mode: --backend-protocol http2)"
        );
    }
}

fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<Parsed>, HeadError> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut res = httparse::Response::new(&mut storage);
    let len = match res.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => {
            if speaks_http2(buf) {
                http2_answer_warning();
            }
            return Err(HeadError::Invalid);
        }
    };
    let status = res.code.ok_or(HeadError::Invalid)?;
    if status == 101 {
        return Err(HeadError::Invalid); // weir never asks for an upgrade
    }
    if (100..200).contains(&status) {
        return Ok(Some(Parsed::Informational(len)));
    }
    let offset = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
    let range = |s: &[u8]| offset(s)..offset(s) + s.len();
    let reason = res.reason.map_or(0..0, |r| range(r.as_bytes()));
    let http10 = res.version == Some(0);
    let fields = framing::response(
        http10,
        res.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
    )
    .map_err(|_| HeadError::Invalid)?;
    let framing = framing::response_body(status, head_request, &fields);
    let chunked = matches!(framing, Framing::Chunked(_));
    // HTTP/1.0 stays open only if asked to; a body read until close, or framed by chunked
    // beside a Content-Length (the backend may have meant either), ends the connection.
    let keep_alive = if http10 {
        fields.keep_alive && !fields.close
    } else {
        !fields.close
    } && framing != Framing::UntilClose
        && !(fields.chunked && fields.content_length.is_some());
    let mut headers = Vec::with_capacity(res.headers.len());
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        // Transfer-Encoding stays when the body passes through chunked; Content-Length is
        // written once, and only when it frames the body (or describes a HEAD's).
        let framing_header = name.eq_ignore_ascii_case(b"transfer-encoding") && chunked;
        if (fields.drops(name) && !framing_header) || name.eq_ignore_ascii_case(b"content-length") {
            continue;
        }
        headers.push((range(name), range(h.value)));
    }
    let content_length = fields.content_length.filter(|_| !fields.chunked);
    Ok(Some(Parsed::Final(ResponseHead {
        status,
        len,
        reason,
        headers,
        content_length,
        framing,
        keep_alive,
        request_unread: false,
    })))
}

// === requests hyper serves ===

/// Request bodies known to be at most this size are read whole before they are sent (head and
/// body in one write, and sent again on a fresh connection if a pooled one turns out closed);
/// larger or open-ended ones stream.
pub const FORWARD_BODY_MAX: u64 = 64 * 1024;

/// Why [`forward`] produced no response.
#[derive(Debug)]
pub enum ForwardError {
    /// The backend refused, failed or sent no usable head, with the request body read whole (or
    /// none of it taken).
    Backend(ProxyFailure),
    /// The backend failed or stopped taking the body while it streamed: part of it is unread.
    Sending(ProxyFailure),
    /// The client's body failed (too large, broken framing, gone, stalled): the backend never
    /// got a complete request.
    Body(BoxError),
}

/// Forwards a request hyper parsed (an HTTP/2 stream, or a request on a connection the fast path
/// handed over) to a plain-HTTP backend on the fast path's pooled connections. A small body goes
/// with the head in one write; any other streams as it arrives, framed by its exact length or
/// chunked (trailers included), each write bounded by the idle timeout. The response body is
/// decoded from the socket as it arrives ([`RawBody`]). `parts` is the head as the caller
/// rewrote it (origin form, hop-by-hop headers gone, forwarded headers set).
pub async fn forward<B>(
    proxy: &Proxy,
    backend: &Backend,
    parts: &http::request::Parts,
    mut body: B,
) -> Result<(http::response::Parts, RawBody), ForwardError>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(256 + target.len());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name != http::header::CONTENT_LENGTH && name != http::header::TRANSFER_ENCODING {
            push_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    // A body of unknown length is read up to the small size before anything is sent: if it ends
    // by then it goes as a small one, so a body whose framing breaks early never reaches the
    // backend at all.
    let exact = body.size_hint().exact();
    let mut read = Vec::new();
    let mut read_len = 0;
    let mut trailers = None;
    let mut ended = body.is_end_stream() || exact.is_some_and(|n| n <= FORWARD_BODY_MAX);
    while !ended && exact.is_none() && read_len <= FORWARD_BODY_MAX {
        match next_frame(&mut body, proxy.settings.idle_timeout).await? {
            None => ended = true,
            Some(Frame::Data(data)) => {
                read_len += data.len() as u64;
                read.push(data);
            }
            Some(Frame::Trailers(fields)) => trailers = Some(fields),
        }
    }
    if ended {
        while let Some(frame) = next_frame(&mut body, proxy.settings.idle_timeout).await? {
            match frame {
                Frame::Data(data) => read.push(data),
                Frame::Trailers(fields) => trailers = Some(fields),
            }
        }
    }
    // Trailers go on only in chunked framing (a body of known length has nowhere to put them).
    let (mut conn, head) = if ended && (trailers.is_none() || exact.is_some()) {
        let bodiless = matches!(
            parts.method,
            http::Method::GET | http::Method::HEAD | http::Method::OPTIONS | http::Method::TRACE
        );
        let length: usize = read.iter().map(Bytes::len).sum();
        if length > 0 || !bodiless {
            // Formatted in place: no string per request.
            let _ = write!(out, "content-length: {length}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        for data in &read {
            out.extend_from_slice(data);
        }
        let request = ConnectionRequest {
            method: parts.method.as_str(),
            out: &out,
            body_complete: true,
            body_left: 0,
            request_tee: None,
        };
        match send(proxy, &mut tokio::io::empty(), backend, request).await {
            Ok(sent) => sent,
            // Nothing is read from a client here; a failed write is the backend's doing.
            Err(Failure::Backend(kind) | Failure::Sending(kind)) => {
                return Err(ForwardError::Backend(kind))
            }
            Err(Failure::ClientBody) => return Err(ForwardError::Backend(ProxyFailure::Reset)),
        }
    } else {
        let chunked = match exact {
            Some(length) => {
                let _ = write!(out, "content-length: {length}\r\n");
                false
            }
            None => {
                out.extend_from_slice(b"transfer-encoding: chunked\r\n");
                true
            }
        };
        out.extend_from_slice(b"\r\n");
        let streamed = Streamed {
            head: &out,
            read,
            trailers,
            chunked,
        };
        send_streaming(proxy, backend, parts.method.as_str(), streamed, &mut body).await?
    };
    let protocol = || ForwardError::Backend(ProxyFailure::Protocol);
    let mut response = http::Response::new(());
    *response.status_mut() = StatusCode::from_u16(head.status).map_err(|_| protocol())?;
    let headers = response.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in &head.headers {
        let name = HeaderName::from_bytes(&conn.buf[name.clone()]).map_err(|_| protocol())?;
        // The body is handed on decoded: its framing on the client side is hyper's to choose.
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        let value =
            http::HeaderValue::from_bytes(&conn.buf[value.clone()]).map_err(|_| protocol())?;
        headers.append(name, value);
    }
    if let Some(length) = head.content_length {
        headers.insert(http::header::CONTENT_LENGTH, length.into());
    }
    conn.buf.advance(head.len);
    let (parts, ()) = response.into_parts();
    let mut body = RawBody {
        conn: Some(conn),
        framing: head.framing,
        keep_alive: head.keep_alive,
        pool: Arc::clone(&backend.pool),
        max_idle: proxy.settings.pool_max_idle,
        trailer: Vec::new(),
        trailers: None,
    };
    body.finish_if_ended();
    Ok((parts, body))
}

/// A request whose body streams: its head, the part of the body already read, and how the rest
/// is framed.
struct Streamed<'a> {
    head: &'a [u8],
    read: Vec<Bytes>,
    trailers: Option<http::HeaderMap>,
    chunked: bool,
}

/// A frame of a request body, read within `timeout`.
enum Frame {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

async fn next_frame<B>(body: &mut B, timeout: Duration) -> Result<Option<Frame>, ForwardError>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx));
        let frame = match tokio::time::timeout(timeout, next).await {
            Ok(None) => return Ok(None),
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => return Err(ForwardError::Body(e)),
            Err(_) => return Err(ForwardError::Body("the client's body stalled".into())),
        };
        match frame.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => return Ok(Some(Frame::Data(data))),
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    return Ok(Some(Frame::Trailers(trailers)));
                }
            }
        }
    }
}

/// Sends the head and what was read of the body, then the rest as it arrives (chunk-encoded if
/// so framed), and reads the response head. Only the head is sent again if a pooled connection
/// turns out closed (on a new connection): no more of the body has been taken from the client by
/// then.
async fn send_streaming<B>(
    proxy: &Proxy,
    backend: &Backend,
    method: &str,
    streamed: Streamed<'_>,
    body: &mut B,
) -> Result<(Connection, ResponseHead), ForwardError>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    let timeout = proxy.settings.idle_timeout;
    let mut attempt = 0;
    let mut conn = loop {
        attempt += 1;
        let (mut conn, reused) = open(proxy, backend, attempt)
            .await
            .map_err(ForwardError::Backend)?;
        match write_upstream(&mut conn, streamed.head, timeout).await {
            Ok(()) => break conn,
            Err(ProxyFailure::Reset) if reused && attempt < 2 => continue,
            Err(kind) => return Err(ForwardError::Backend(kind)),
        }
    };
    let chunked = streamed.chunked;
    let mut line = Vec::with_capacity(32);
    // A backend may answer before it has read the whole body (413, 401): then the rest is not
    // sent, the answer goes to the client, and neither connection carries another request.
    let mut answered = false;
    for data in &streamed.read {
        let sent = write_data(&mut conn, data, chunked.then_some(&mut line), timeout).await;
        if sent.map_err(ForwardError::Sending)? == Sent::Answered {
            answered = true;
            break;
        }
    }
    let mut trailers = streamed.trailers;
    while !answered {
        let Some(frame) = next_frame(body, timeout).await? else {
            break;
        };
        match frame {
            Frame::Data(data) => {
                let sent = write_data(&mut conn, &data, chunked.then_some(&mut line), timeout);
                answered = sent.await.map_err(ForwardError::Sending)? == Sent::Answered;
            }
            Frame::Trailers(fields) => trailers = Some(fields),
        }
    }
    if chunked && !answered {
        line.clear();
        line.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            // Trailers never carry framing or routing (RFC 9110 §6.5.1).
            if !framing::is_hop_by_hop(name.as_str().as_bytes())
                && name != http::header::CONTENT_LENGTH
                && name != http::header::HOST
            {
                push_header(&mut line, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        line.extend_from_slice(b"\r\n");
        write_upstream(&mut conn, &line, timeout)
            .await
            .map_err(ForwardError::Sending)?;
    }
    match await_response(proxy, &mut conn, method).await {
        Ok(mut response) => {
            response.keep_alive &= !answered;
            response.request_unread = answered;
            Ok((conn, response))
        }
        Err(error) => Err(ForwardError::Backend(error.kind())),
    }
}

/// How a write of request body data ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Written,
    /// The backend sent a final response head first; the write was abandoned.
    Answered,
}

/// Writes one run of body data, as a chunk when `chunk_line` (scratch space for the size line)
/// is given, unless the backend answers first.
async fn write_data(
    conn: &mut Connection,
    data: &[u8],
    chunk_line: Option<&mut Vec<u8>>,
    timeout: Duration,
) -> Result<Sent, ProxyFailure> {
    let Some(line) = chunk_line else {
        return write_body(conn, data, timeout).await;
    };
    line.clear();
    let _ = write!(line, "{:x}\r\n", data.len());
    for part in [line.as_slice(), data, b"\r\n"] {
        if write_body(conn, part, timeout).await? == Sent::Answered {
            return Ok(Sent::Answered);
        }
    }
    Ok(Sent::Written)
}

/// Writes `data` to the backend within `timeout`, watching for its answer meanwhile: what it
/// sends is read into the connection's buffer, and a complete final response head there ends the
/// write (interim 1xx heads do not).
async fn write_body(
    conn: &mut Connection,
    data: &[u8],
    timeout: Duration,
) -> Result<Sent, ProxyFailure> {
    if answered(&conn.buf) {
        return Ok(Sent::Answered);
    }
    let Connection { stream, buf, .. } = conn;
    let (reader, mut writer) = stream.split();
    let write = tokio::time::timeout(timeout, writer.write_all(data));
    tokio::pin!(write);
    loop {
        tokio::select! {
            written = &mut write => {
                return match written {
                    Ok(Ok(())) => Ok(Sent::Written),
                    Ok(Err(_)) => Err(ProxyFailure::Reset),
                    Err(_) => Err(ProxyFailure::Timeout),
                };
            }
            ready = reader.readable() => {
                if ready.is_err() {
                    return Err(ProxyFailure::Reset);
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_CHUNK);
                }
                match reader.try_read_buf(buf) {
                    // Closed: the write fails next, or the head read says so.
                    Ok(0) => return Ok(Sent::Answered),
                    Ok(_) if answered(buf) => return Ok(Sent::Answered),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(ProxyFailure::Reset),
                }
            }
        }
    }
}

/// Whether `buf` starts with a complete final response head (after any interim ones), or with
/// bytes that are no response at all (which the head read then refuses).
fn answered(buf: &[u8]) -> bool {
    let mut rest = buf;
    loop {
        match parse_response(rest, false) {
            Ok(Some(Parsed::Informational(len))) => rest = &rest[len..],
            Ok(Some(Parsed::Final(_))) | Err(_) => return true,
            Ok(None) => return false,
        }
    }
}

/// A response body read from a backend connection the fast path owns, decoded from its HTTP/1.1
/// framing. When the body ends cleanly the connection goes back to its pool (before the last
/// frame is handed on); dropped before the end, the connection is closed with it.
#[derive(Debug)]
pub struct RawBody {
    conn: Option<Connection>,
    framing: Framing,
    keep_alive: bool,
    pool: Arc<Pool>,
    max_idle: usize,
    /// The trailer section of a chunked body as it is read (at most [`MAX_TRAILER`] bytes).
    trailer: Vec<u8>,
    /// Trailer fields still to be passed on, after the last data.
    trailers: Option<http::HeaderMap>,
}

/// Longest trailer section passed on; a longer one is dropped (its bytes are still checked).
pub(super) const MAX_TRAILER: usize = 16 * 1024;

/// The fields of a trailer section (`name: value` lines and the empty line), without those no
/// trailer may carry: framing, routing and connection fields (RFC 9110 §6.5.1), which HTTP/2
/// also forbids. `None` when there are none, or the section is not valid field syntax.
pub(super) fn trailer_fields(section: &[u8]) -> Option<http::HeaderMap> {
    let mut storage = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let httparse::Status::Complete((_, fields)) =
        httparse::parse_headers(section, &mut storage).ok()?
    else {
        return None;
    };
    let mut map = http::HeaderMap::new();
    for field in fields {
        let Ok(name) = HeaderName::from_bytes(field.name.as_bytes()) else {
            continue;
        };
        let forbidden = [
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
            http::header::HOST,
            http::header::CONNECTION,
            http::header::TE,
            http::header::TRAILER,
            http::header::UPGRADE,
            http::header::CONTENT_TYPE,
            http::header::CONTENT_ENCODING,
        ];
        // Nor those weir sets or removes in a head (forwarding, its override and version
        // headers, hop-by-hop and proxy fields): a trailer must not carry what the head may not.
        let weirs = [
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "proxy-authenticate",
            "x-forwarded-for",
            "x-forwarded-proto",
            "forwarded",
            "x-weir-version",
        ];
        if forbidden.contains(&name) || weirs.contains(&name.as_str()) {
            continue;
        }
        if let Ok(value) = http::HeaderValue::from_bytes(field.value) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

impl RawBody {
    /// Once the body has ended, returns the connection to the pool if it can carry another
    /// request (kept alive, nothing unread).
    fn finish_if_ended(&mut self) {
        if self.framing == Framing::Ended {
            if let Some(conn) = self.conn.take() {
                if self.keep_alive && conn.buf.is_empty() {
                    self.pool.put(conn, self.max_idle);
                }
            }
        }
    }

    /// Decodes what is buffered: (payload, whether the body ended). Err: invalid framing.
    fn take_buffered(&mut self) -> Result<(Bytes, bool), ()> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok((Bytes::new(), true));
        };
        // One run of content is a slice of what was read; only several (small chunks read
        // together) are joined.
        let mut first: Option<std::ops::Range<usize>> = None;
        let mut more: Vec<std::ops::Range<usize>> = Vec::new();
        let trailer = &mut self.trailer;
        let (n, done) = self.framing.take_with_trailer(
            &conn.buf,
            |run| match first {
                None => first = Some(run),
                Some(_) => more.push(run),
            },
            |at| {
                if trailer.len() < MAX_TRAILER {
                    trailer.extend_from_slice(&conn.buf[at]);
                }
            },
        );
        if done && !self.trailer.is_empty() && self.trailer.len() < MAX_TRAILER {
            self.trailers = trailer_fields(&self.trailer);
        }
        if self.framing.is_invalid() {
            return Err(());
        }
        let taken = conn.buf.split_to(n).freeze();
        let data = match first {
            None => Bytes::new(),
            Some(run) if more.is_empty() => taken.slice(run),
            Some(run) => {
                let mut joined = BytesMut::with_capacity(n);
                for run in std::iter::once(run).chain(more) {
                    joined.extend_from_slice(&taken[run]);
                }
                joined.freeze()
            }
        };
        Ok((data, done))
    }
}

impl http_body::Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if this.conn.as_ref().is_none_or(|c| !c.buf.is_empty()) {
                let (data, done) = match this.take_buffered() {
                    Ok(taken) => taken,
                    Err(()) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "backend sent invalid chunked framing",
                        ))));
                    }
                };
                if done {
                    this.framing = Framing::Ended;
                    this.finish_if_ended();
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                if let Some(trailers) = this.trailers.take() {
                    return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
                }
                if done || this.conn.is_none() {
                    return Poll::Ready(None);
                }
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            if conn.buf.capacity() - conn.buf.len() < 1024 {
                conn.buf.reserve(READ_CHUNK);
            }
            match conn.stream.try_read_buf(&mut conn.buf) {
                Ok(0) if this.framing == Framing::UntilClose => {
                    this.framing = Framing::Ended;
                    this.keep_alive = false;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "backend closed the connection mid-body",
                    ))));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = std::task::ready!(conn.stream.poll_read_ready(cx)) {
                        this.conn = None;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Trailers still to pass on are part of the body.
        self.framing == Framing::Ended && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.framing {
            Framing::Length(left) => http_body::SizeHint::with_exact(left),
            Framing::Ended => http_body::SizeHint::with_exact(0),
            _ => http_body::SizeHint::default(),
        }
    }
}

// === impl Rewind ===

/// A connection with bytes already read from it put back in front, for hyper.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    fn new(prefix: BytesMut, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            out.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn final_head(raw: &[u8]) -> ResponseHead {
        match parse_response(raw, false) {
            Ok(Some(Parsed::Final(head))) => head,
            _ => panic!("{:?} parses", String::from_utf8_lossy(raw)),
        }
    }

    fn written(raw: &[u8], head: &ResponseHead) -> String {
        let mut out = Vec::new();
        let _ = head.write_headers(raw, &mut out, None);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn response_heads_keep_framing_and_drop_hop_by_hop_headers() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: 2\r\n\r\nhello";
        let head = final_head(raw);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert_eq!(written(raw, &head), "X-Kept: 2\r\ncontent-length: 5\r\n");

        // Chunked beats Content-Length, which is dropped; the connection is not reused.
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n";
        let head = final_head(raw);
        assert_eq!(written(raw, &head), "Transfer-Encoding: chunked\r\n");
        assert!(!head.keep_alive);

        let raw = b"HTTP/1.0 200 OK\r\n\r\n";
        let head = final_head(raw);
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(!head.keep_alive);
        assert!(matches!(
            parse_response(b"HTTP/1.1 100 Continue\r\n\r\n", false),
            Ok(Some(Parsed::Informational(25)))
        ));
        assert!(parse_response(b"SMTP ready\r\n\r\n", false).is_err());
    }

    #[test]
    fn connection_cannot_strip_a_response_s_framing() {
        let raw =
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length\r\n\r\nhello";
        let head = final_head(raw);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(head.keep_alive);
        assert_eq!(written(raw, &head), "content-length: 5\r\n");

        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: transfer-encoding\r\n\r\n";
        let head = final_head(raw);
        assert!(matches!(head.framing, Framing::Chunked(_)));
        assert_eq!(written(raw, &head), "Transfer-Encoding: chunked\r\n");

        // Identical lengths collapse to one line; differing or malformed ones are refused.
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(written(raw, &final_head(raw)), "content-length: 5\r\n");
        for bad in [
            "Content-Length: +5\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: \r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\n{bad}\r\n");
            assert!(parse_response(raw.as_bytes(), false).is_err(), "{bad:?}");
        }
        let raw = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(parse_response(raw, false).is_err());
    }
}
