//! HTTP/1 requests the fast path does not relay byte for byte: chunked or `Expect` bodies,
//! HTTP/1.0, absolute-form targets, routes with an https version, heads with many headers, and
//! every request when `listener.http1_fast_path = false`. They are parsed and framed by the same
//! rules ([`super::framing`]), their bodies decoded here as they arrive, answered through
//! [`Proxy::handle`] (the path HTTP/2 requests take) and written back here, so one HTTP/1 parser
//! decides where every request on a connection ends.
//!
//! Invariant: a request whose head or body cannot be framed exactly is answered with 400 (431
//! for a head over the limits) and the connection closes; a request whose body was not read to
//! its end closes the connection after its answer.

use std::io::Write as _;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Response, StatusCode};
use http_body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::body::{ProxyBody, RequestBody, WireBody, WireBodySender};
use super::framing::{self, Framing};
use super::h1::{local, push_header, trailer_fields, write_out, Answer, Exchange, MAX_TRAILER};
use super::proxy::{ConnInfo, Proxy};

const READ_CHUNK: usize = 8 * 1024;

/// Serves the request at the front of `buf` (a complete head is there); on return `buf` holds
/// what follows it on the connection.
pub(super) async fn serve_request<S: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    client: &mut S,
    buf: &mut BytesMut,
    info: &ConnInfo,
    max_headers: usize,
    draining: bool,
) -> Exchange {
    let head = match parse(buf, max_headers) {
        Ok(head) => head,
        Err(refusal) => return refuse(client, refusal, buf.starts_with(b"HEAD ")).await,
    };
    buf.advance(head.len);
    let Head {
        request,
        framing: body_framing,
        mut keep_alive,
        expect,
        http10,
        ..
    } = head;
    keep_alive &= !draining;
    let head_request = request.method() == http::Method::HEAD;
    let (body, sender) = match body_framing {
        Framing::Ended => (WireBody::empty(), None),
        Framing::Length(n) => {
            let (body, sender) = WireBody::channel(Some(n));
            (body, Some(sender))
        }
        _ => {
            let (body, sender) = WireBody::channel(None);
            (body, Some(sender))
        }
    };
    let request = request.map(|()| RequestBody::Right(body));

    // The answer, with the body read alongside as the backend asks for it.
    let started = AtomicBool::new(false);
    let (response, body_read) = {
        let mut handling = pin!(proxy.handle(request, info));
        match sender {
            None => (handling.await, true),
            Some(sender) => {
                let timeout = proxy.settings.idle_timeout;
                let mut reading = pin!(read_body(
                    client,
                    buf,
                    body_framing,
                    sender,
                    expect && !http10,
                    timeout,
                    &started,
                ));
                let mut read = None;
                loop {
                    tokio::select! {
                        response = &mut handling => break (response, read == Some(true)),
                        done = &mut reading, if read.is_none() => read = Some(done),
                    }
                }
            }
        }
    };
    let Ok(response) = response;
    // Answered without the body being asked for (no route, a refused override): a body already
    // read whole off the connection is passed over, and the connection carries the next request.
    let body_read =
        body_read || (!started.load(Ordering::Relaxed) && skip_buffered(buf, body_framing));
    keep_alive &= body_read;
    match write_response(client, response, head_request, http10, keep_alive).await {
        Some(true) => Exchange::Done { consumed: 0 },
        _ => {
            let _ = client.shutdown().await;
            Exchange::Close
        }
    }
}

/// A parsed request head, as hyper types.
struct Head {
    request: http::Request<()>,
    len: usize,
    framing: Framing,
    keep_alive: bool,
    expect: bool,
    http10: bool,
}

/// Why a head is refused before anything is decided.
enum HeadRefusal {
    Malformed(framing::Malformed),
    /// Not an HTTP/1.x request head at all.
    Unparsable,
    TooManyHeaders(usize),
    /// A tunnel: weir is a reverse proxy and opens none.
    Connect,
    /// An `Expect` other than `100-continue` (RFC 9110 §10.1.1: 417).
    Expectation,
}

fn parse(buf: &[u8], max_headers: usize) -> Result<Head, HeadRefusal> {
    let mut storage = vec![httparse::EMPTY_HEADER; max_headers];
    let mut req = httparse::Request::new(&mut storage);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadRefusal::TooManyHeaders(max_headers))
        }
        _ => return Err(HeadRefusal::Unparsable),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HeadRefusal::Unparsable);
    };
    let http10 = version == 0;
    if method == "CONNECT" {
        return Err(HeadRefusal::Connect);
    }
    let expectation = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("expect"))
        .map(|h| h.value);
    if expectation.is_some_and(|v| !v.eq_ignore_ascii_case(b"100-continue")) {
        return Err(HeadRefusal::Expectation);
    }
    let headers = req.headers.iter().map(|h| (h.name.as_bytes(), h.value));
    let fields = framing::request(http10, method, headers).map_err(HeadRefusal::Malformed)?;
    let framing = if fields.chunked {
        Framing::Chunked(framing::Chunked::start())
    } else {
        match fields.content_length {
            None | Some(0) => Framing::Ended,
            Some(n) => Framing::Length(n),
        }
    };
    let keep_alive = if http10 {
        fields.keep_alive && !fields.close
    } else {
        !fields.close
    };
    let expect = fields.expect;
    let mut request = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).map_err(|_| HeadRefusal::Unparsable)?)
        .uri(
            target
                .parse::<http::Uri>()
                .map_err(|_| HeadRefusal::Unparsable)?,
        )
        .version(if http10 {
            http::Version::HTTP_10
        } else {
            http::Version::HTTP_11
        })
        .body(())
        .map_err(|_| HeadRefusal::Unparsable)?;
    let map = request.headers_mut();
    map.reserve(req.headers.len());
    for h in req.headers.iter() {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadRefusal::Unparsable)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadRefusal::Unparsable)?;
        map.append(name, value);
    }
    Ok(Head {
        request,
        len,
        framing,
        keep_alive,
        expect,
        http10,
    })
}

/// Answers a refused head and closes the connection.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    refusal: HeadRefusal,
    head_request: bool,
) -> Exchange {
    let (status, body) = match refusal {
        HeadRefusal::Malformed(malformed) => (malformed.request_status(), malformed.json()),
        HeadRefusal::Unparsable => (
            StatusCode::BAD_REQUEST,
            serde_json::json!({
                "error": "not a valid HTTP/1.1 request head (RFC 9112 §2-§5)",
                "kind": "bad_request",
            }),
        ),
        HeadRefusal::Connect => (
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({
                "error": "weir is a reverse proxy and opens no CONNECT tunnels",
                "kind": "bad_request",
            }),
        ),
        HeadRefusal::Expectation => (
            StatusCode::EXPECTATION_FAILED,
            serde_json::json!({
                "error": "the only expectation weir meets is Expect: 100-continue (RFC 9110 §10.1.1)",
                "kind": "bad_request",
            }),
        ),
        HeadRefusal::TooManyHeaders(max) => (
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            serde_json::json!({
                "error": format!("the request has more than listener.max_headers = {max} header fields"),
                "kind": "bad_request",
            }),
        ),
    };
    let answer = Answer {
        status,
        body: &body,
        head_request,
    };
    local(client, answer, None, false, None).await
}

/// Reads the body at the front of `buf` (and then from the client) to its end as the backend
/// asks for it; true when it was read whole. A body that breaks, stalls for `timeout` or is
/// cut off reaches the backend as an error.
async fn read_body<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    mut framing: Framing,
    sender: WireBodySender,
    send_continue: bool,
    timeout: Duration,
    started: &AtomicBool,
) -> bool {
    let WireBodySender { frames, start } = sender;
    if start.await.is_err() {
        return false; // answered without the body
    }
    started.store(true, Ordering::Relaxed);
    if send_continue
        && buf.is_empty()
        && write_out(client, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return false;
    }
    let mut runs = Vec::new();
    // A chunked body's trailer section, passed on (as trailers) when it is whole and small.
    let mut trailer = Vec::new();
    loop {
        if !buf.is_empty() {
            runs.clear();
            let (n, done) = framing.take_with_trailer(
                buf,
                |run| runs.push(run),
                |run| {
                    if trailer.len() < MAX_TRAILER {
                        trailer.extend_from_slice(&buf[run]);
                    }
                },
            );
            let taken = buf.split_to(n).freeze();
            for run in runs.drain(..).filter(|run| !run.is_empty()) {
                let data = Frame::data(taken.slice(run));
                if frames.send(Ok(Some(data))).await.is_err() {
                    return false;
                }
            }
            if done {
                if let Some(fields) = (trailer.len() < MAX_TRAILER)
                    .then(|| trailer_fields(&trailer))
                    .flatten()
                {
                    if frames
                        .send(Ok(Some(Frame::trailers(fields))))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                // A body of known length ends with its last byte; a chunked one is told.
                return matches!(framing, Framing::Length(_))
                    || frames.send(Ok(None)).await.is_ok();
            }
            if framing.is_invalid() {
                let _ = frames
                    .send(Err(
                        "the request body's chunked framing is invalid (RFC 9112 §7.1)".into(),
                    ))
                    .await;
                return false;
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match tokio::time::timeout(timeout, client.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                let _ = frames
                    .send(Err("the client closed its connection mid-body".into()))
                    .await;
                return false;
            }
            Err(_) => {
                let _ = frames.send(Err("the client's body stalled".into())).await;
                return false;
            }
        }
    }
}

/// Passes over a body that is whole in `buf`; false when part of it is still on the connection
/// (or its framing is broken).
fn skip_buffered(buf: &mut BytesMut, mut framing: Framing) -> bool {
    let (n, done) = framing.take_with(buf, |_| {});
    if done {
        buf.advance(n);
    }
    done
}

/// How the client's response body is framed.
#[derive(Clone, Copy, PartialEq)]
enum Out {
    None,
    Length,
    Chunked,
    UntilClose,
}

/// Writes `response` as HTTP/1.1; `Some(true)` when the connection can carry another request.
async fn write_response<S: AsyncWrite + Unpin>(
    client: &mut S,
    response: Response<ProxyBody>,
    head_request: bool,
    http10: bool,
    mut keep_alive: bool,
) -> Option<bool> {
    let (parts, body) = response.into_parts();
    let mut body = pin!(body);
    let status = parts.status;
    if parts
        .headers
        .get_all(CONNECTION)
        .iter()
        .any(|v| framing::tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")))
    {
        keep_alive = false;
    }
    let bodiless = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let exact = body.size_hint().exact();
    let out = match exact {
        _ if bodiless => Out::None,
        Some(_) => Out::Length,
        None if http10 => Out::UntilClose,
        None => Out::Chunked,
    };
    if out == Out::UntilClose {
        keep_alive = false;
    }
    let mut pending = Vec::with_capacity(256);
    pending.extend_from_slice(b"HTTP/1.1 ");
    pending.extend_from_slice(status.as_str().as_bytes());
    pending.push(b' ');
    pending.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    pending.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        if name == CONNECTION
            || name == TRANSFER_ENCODING
            || (name == CONTENT_LENGTH && !head_request)
        {
            continue;
        }
        push_header(&mut pending, name.as_str().as_bytes(), value.as_bytes());
    }
    // weir's own answers, and a backend's without one, get a Date (RFC 9110 §6.6.1).
    if !parts.headers.contains_key(http::header::DATE) {
        super::date::push_header(&mut pending);
    }
    match (out, exact) {
        (Out::Length, Some(length)) => {
            let _ = write!(pending, "content-length: {length}\r\n");
        }
        (Out::Chunked, _) => pending.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !keep_alive {
        pending.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        pending.extend_from_slice(b"connection: keep-alive\r\n");
    }
    pending.extend_from_slice(b"\r\n");
    if out == Out::None {
        write_out(client, &pending).await.ok()?;
        return Some(keep_alive);
    }
    let mut trailers = None;
    // What a body of announced length has sent: one that runs long or ends short would leave the
    // client reading another response's bytes as this one's, so it ends the connection instead.
    let mut sent: u64 = 0;
    loop {
        // Frames that are ready go out together; the buffer is flushed before waiting.
        let next = std::future::poll_fn(|cx| std::task::Poll::Ready(body.as_mut().poll_frame(cx)));
        let frame = match next.await {
            std::task::Poll::Ready(frame) => frame,
            std::task::Poll::Pending => {
                if !pending.is_empty() {
                    write_out(client, &pending).await.ok()?;
                    pending.clear();
                }
                std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
            }
        };
        match frame {
            None => break,
            // The backend broke off: the client sees a cut body, never a clean end.
            Some(Err(_)) => {
                let _ = write_out(client, &pending).await;
                return None;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    sent += data.len() as u64;
                    if out == Out::Length && exact.is_some_and(|length| sent > length) {
                        let _ = write_out(client, &pending).await;
                        return None;
                    }
                    if out == Out::Chunked {
                        let _ = write!(pending, "{:x}\r\n", data.len());
                        pending.extend_from_slice(&data);
                        pending.extend_from_slice(b"\r\n");
                    } else {
                        pending.extend_from_slice(&data);
                    }
                    if pending.len() >= 64 * 1024 {
                        write_out(client, &pending).await.ok()?;
                        pending.clear();
                    }
                }
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
        }
    }
    if out == Out::Length && exact != Some(sent) {
        let _ = write_out(client, &pending).await;
        return None;
    }
    if out == Out::Chunked {
        pending.extend_from_slice(b"0\r\n");
        for (name, value) in trailers.iter().flatten() {
            push_header(&mut pending, name.as_str().as_bytes(), value.as_bytes());
        }
        pending.extend_from_slice(b"\r\n");
    }
    write_out(client, &pending).await.ok()?;
    Some(keep_alive)
}
