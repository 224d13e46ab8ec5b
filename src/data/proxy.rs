//! The proxy service: route, split, forward, stream back.
//!
//! Per request: one lock-free table load, a route match, a split decision, a backend pick, and
//! the forward. No body is parsed, no label is formatted, no lock is shared with other requests.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue, CONTENT_LENGTH, HOST};
use http::{HeaderMap, Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::{BodyTooLarge, InFlight, LimitedBody, MeteredBody, ProxyBody, RequestBody};
use super::decide::{backend_failure, decide, reads_body, Ask, Decided, Decision, Local, Refusal};
use super::framing;
use super::h1::ForwardError;
use super::split::OVERRIDE_HEADER;
use super::table::RoutingTable;
use crate::config::{Api, BackendProtocol, ProxyConfig};
use crate::fields::{BodyFields, FieldReader};
use crate::metrics::ProxyFailure;
use crate::shadow::task::{ShadowStart, Shadower};
use crate::upstream::h2::{Http2Connector, Http2Error};
use crate::upstream::{BackendGuard, Version};

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, LimitedBody>;

/// Settings of the data path, fixed for the life of the process.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub max_request_body: u64,
    pub response_header_timeout: Duration,
    pub idle_timeout: Duration,
    pub backend_eject: Duration,
    pub version_header: Option<HeaderName>,
    /// The HTTP/1.1 fast path's own upstream connections (hyper's client has its own settings).
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle: usize,
    /// `listener.http1_fast_path`: HTTP/1 requests that can be relayed byte for byte are; off,
    /// every one goes through [`Proxy::handle`].
    pub http1_relay: bool,
    /// `listener.max_body_scan`: how much of a body routing by its fields reads.
    pub max_body_scan: usize,
}

/// Shared state of the proxy service.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) table: Arc<ArcSwap<RoutingTable>>,
    clients: UpstreamClients,
    pub(crate) settings: ProxySettings,
    pub(crate) shadower: Arc<Shadower>,
}

/// What the proxy knows about the client connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The peer's IP, for `X-Forwarded-For`.
    pub client_ip: HeaderValue,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    pub proto: HeaderValue,
}

impl ConnInfo {
    /// A connection from `ip`, over TLS or not.
    pub fn new(ip: std::net::IpAddr, tls: bool) -> ConnInfo {
        ConnInfo {
            client_ip: HeaderValue::from_str(&ip.to_string())
                .expect("an IP address is a valid header value"),
            proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// [`framing::HOP_BY_HOP`] as header names, for removal from a parsed map.
static HOP_BY_HOP: [&HeaderName; 9] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHENTICATE,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// The upstream HTTP clients, one per [`BackendProtocol`]: pooled keep-alive connections per
/// backend origin, plain or TLS.
#[derive(Clone, Debug)]
pub struct UpstreamClients {
    /// HTTP/1.1 (TLS backends; plain ones take the fast path's connections).
    http1: UpstreamClient,
    /// HTTP/2 only: h2c with prior knowledge over `http://`, ALPN `h2` over `https://`, on each
    /// backend's own bounded set of connections.
    http2: Http2Connector,
    /// ALPN offers `h2` and `http/1.1`; plain backends speak HTTP/1.1.
    auto: UpstreamClient,
}

impl UpstreamClients {
    /// hyper's pooled client for `protocol` (`http2` backends have their own connections).
    fn of(&self, protocol: BackendProtocol) -> &UpstreamClient {
        match protocol {
            BackendProtocol::Http2 | BackendProtocol::Http1 => &self.http1,
            BackendProtocol::Auto => &self.auto,
        }
    }
}

/// The upstream HTTP clients: pooled keep-alive connections per backend origin, plain or TLS.
pub fn upstream_client(config: &ProxyConfig) -> Result<UpstreamClients, crate::tls::TlsError> {
    let tls = crate::tls::backend_client_config(&config.backend_tls)?;
    let client = |protocol: BackendProtocol| {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        connector.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http();
        let connector = match protocol {
            BackendProtocol::Http1 | BackendProtocol::Http2 => {
                builder.enable_http1().wrap_connector(connector)
            }
            BackendProtocol::Auto => builder.enable_all_versions().wrap_connector(connector),
        };
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_backend)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector)
    };
    Ok(UpstreamClients {
        http1: client(BackendProtocol::Http1),
        http2: Http2Connector::new(
            tls.clone(),
            config.connect_timeout,
            config.http2_max_connections_per_backend,
            config.http2_keepalive_interval,
        ),
        auto: client(BackendProtocol::Auto),
    })
}

impl Proxy {
    pub fn new(
        table: Arc<ArcSwap<RoutingTable>>,
        clients: UpstreamClients,
        settings: ProxySettings,
        shadower: Arc<Shadower>,
    ) -> Proxy {
        Proxy {
            table,
            clients,
            settings,
            shadower,
        }
    }

    /// Serves one request. Never fails: every problem becomes a JSON error response.
    pub async fn handle(
        &self,
        req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let grpc = is_grpc(req.headers());
        let response = self.serve(req, conn).await?;
        Ok(if grpc {
            grpc_shaped(response).await
        } else {
            response
        })
    }

    async fn serve(
        &self,
        mut req: Request<RequestBody>,
        conn: &ConnInfo,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        // The same framing and Host rules as the fast path, before anything is decided.
        if let Err(malformed) = normalize_head(&mut req) {
            return Ok(malformed_answer(malformed, req.version()));
        }
        // Decide from one table snapshot, then let it go: the request keeps its version and
        // handles even if the table is swapped meanwhile.
        let mut request_length = content_length(req.headers());
        let table = self.table.load_full();
        // A route that routes by the body's fields: its first bytes are read before deciding.
        let reads = {
            let ask = ask_of(&req, request_length, started, None);
            let first = table.find(ask.host, ask.path);
            first
                .filter(|r| reads_body(&table, r, &ask))
                .map(|r| (r.sticky_field().map(str::to_string), r.api))
        };
        let mut prefix = None;
        if let Some((sticky, api)) = reads {
            match self.read_prefix(req.body_mut(), sticky.as_deref()).await {
                Ok(read) => prefix = Some(read),
                Err(refusal) => {
                    let (status, body) = refusal.unrouted(api);
                    return Ok(closing(json_error(status, body), req.version()));
                }
            }
        }
        let decided = {
            let read = prefix.as_ref().map(|p| &p.read);
            let ask = ask_of(&req, request_length, started, read);
            decide(&table, &ask, self.settings.max_request_body)
        };
        drop(table);
        let Decision {
            api,
            version,
            backend,
            in_flight,
            shadow_plan,
        } = match decided {
            Decided::Forward(decision) => decision,
            Decided::Local(local) => return Ok(self.local(local)),
        };
        let version_value = &version.label_header;
        let refuse = |refusal| self.refuse(refusal, &version.label, version_value, &in_flight, api);
        let shadow_plan = shadow_plan.map(|mut plan| {
            if let Some(Prefix {
                bytes,
                read: Ok(BodyFields { model: Some(f), .. }),
                ..
            }) = &prefix
            {
                plan.name_model(&bytes[f.start..f.end]);
            }
            plan
        });
        // The version's name for the model, in place of the client's.
        if let (Some(prefix), Some(token)) = (prefix.as_mut(), &version.served_model) {
            if let Some(length) = prefix.rename(token, request_length) {
                request_length = Some(length);
                req.headers_mut()
                    .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
            }
        }

        let (mut parts, body) = req.into_parts();
        let client_version = parts.version;
        let b = backend.backend();
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(b.scheme.clone());
        uri.authority = Some(b.authority.clone());
        if uri.path_and_query.is_none() {
            uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        parts.uri = Uri::from_parts(uri).expect("scheme, authority and path are set");
        parts.version = http::Version::HTTP_11;
        // `te: trailers` is the one TE an HTTP/2 request may carry, and gRPC servers need it.
        let trailers = version.protocol != BackendProtocol::Http1
            && parts
                .headers
                .get_all(header::TE)
                .iter()
                .flat_map(|v| framing::tokens(v.as_bytes()))
                .any(|t| t.eq_ignore_ascii_case(b"trailers"));
        strip_hop_by_hop(&mut parts.headers);
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        parts.headers.remove(&OVERRIDE_HEADER);
        forwarded_headers(&mut parts.headers, conn);
        // A mirrored request starts its shadow now; the shadow gets the body as it streams.
        let mut shadow = shadow_plan.and_then(|plan| {
            self.shadower.begin(
                plan,
                &parts.method,
                &parts.uri,
                &parts.headers,
                request_length,
            )
        });
        let request_tee = shadow.as_mut().map(|s| s.take_request_tee());
        let body = match prefix {
            Some(p) => LimitedBody::with_prefix(
                Bytes::from(p.bytes),
                p.trailers,
                body,
                self.settings.max_request_body,
                request_tee,
            ),
            None => LimitedBody::new(body, self.settings.max_request_body, request_tee),
        };

        // A plain-HTTP backend: the fast path's upstream connections and its framing rules,
        // with no client connection task or pool lock in between.
        if b.scheme == http::uri::Scheme::HTTP && version.protocol != BackendProtocol::Http2 {
            // `forward` bounds the connect, each write and the wait for the head itself.
            let (response, body) = match super::h1::forward(self, b, &parts, body).await {
                Ok(sent) => sent,
                Err(ForwardError::Body(e)) => {
                    let refusal = match e.downcast_ref::<BodyTooLarge>() {
                        Some(too_large) => Refusal::TooLarge(too_large.limit),
                        None => Refusal::ClientBody,
                    };
                    let answer = refuse(refusal);
                    return Ok(closing(answer, client_version));
                }
                Err(ForwardError::Backend(kind)) => {
                    if kind.is_connect() {
                        b.refused(self.settings.backend_eject, &version.label, kind.as_str());
                    } else {
                        b.failed(&version.label, kind, backend_failure(kind));
                    }
                    return Ok(refuse(Refusal::Backend(kind)));
                }
                // Part of the body is still unread: the client's connection cannot carry another
                // request.
                Err(ForwardError::Sending(kind)) => {
                    b.failed(
                        &version.label,
                        kind,
                        "stopped taking the request before it was sent",
                    );
                    let refusal = Refusal::Backend(kind);
                    let answer = refuse(refusal);
                    return Ok(closing(answer, client_version));
                }
            };
            let answer = (client_version, in_flight, None);
            let (parts, body) = self.respond(response, body, answer, &version, backend, shadow);
            return Ok(Response::from_parts(parts, ProxyBody::Raw { body }));
        }

        // A gRPC deadline shorter than weir's own wait is weir's wait: the backend's answer
        // would come too late for the client anyway.
        // The deadline bounds the whole call too: a response still streaming at it is ended
        // with DEADLINE_EXCEEDED and the backend's stream dropped.
        let timeout = is_grpc(&parts.headers)
            .then(|| grpc_timeout(&parts.headers))
            .flatten();
        let wait = timeout.map_or(self.settings.response_header_timeout, |deadline| {
            deadline.min(self.settings.response_header_timeout)
        });
        let deadline = timeout.and_then(|t| tokio::time::Instant::from_std(started).checked_add(t));
        if version.protocol == BackendProtocol::Http2 {
            use http_body_util::BodyExt;
            let upstream = Request::from_parts(parts, body.boxed_unsync());
            let sent = self.clients.http2.send(b, upstream);
            let response = match self
                .head(b, &version.label, wait, sent, classify_http2)
                .await
            {
                Ok(response) => response,
                Err(refusal) => return Ok(refuse(refusal)),
            };
            let (parts, body) = response.into_parts();
            let answer = (client_version, in_flight, deadline);
            let (parts, body) = self.respond(parts, body, answer, &version, backend, shadow);
            return Ok(Response::from_parts(parts, ProxyBody::Http2 { body }));
        }
        let upstream = Request::from_parts(parts, body);
        let sent = self.clients.of(version.protocol).request(upstream);
        let response = match self.head(b, &version.label, wait, sent, classify).await {
            Ok(response) => response,
            Err(refusal) => return Ok(refuse(refusal)),
        };

        let (mut parts, body) = response.into_parts();
        // hyper's client decoded the body; its head is held to the fast path's rules.
        if reframe_response(&mut parts).is_err() {
            let kind = ProxyFailure::Protocol;
            b.failed(&version.label, kind, backend_failure(kind));
            return Ok(refuse(Refusal::Backend(kind)));
        }
        let answer = (client_version, in_flight, deadline);
        let (parts, body) = self.respond(parts, body, answer, &version, backend, shadow);
        Ok(Response::from_parts(parts, ProxyBody::Upstream { body }))
    }

    /// Waits up to `wait` for the backend's response head; a failure is counted and logged for
    /// the backend `b` (a refused connection ejects it) and becomes the refusal the client gets.
    async fn head<T, E>(
        &self,
        b: &crate::upstream::Backend,
        label: &str,
        wait: Duration,
        sent: impl std::future::Future<Output = Result<T, E>>,
        classify: fn(&E) -> Refusal,
    ) -> Result<T, Refusal>
    where
        E: StdError + 'static,
    {
        match tokio::time::timeout(wait, sent).await {
            Err(_elapsed) => {
                let kind = ProxyFailure::Timeout;
                b.failed(label, kind, backend_failure(kind));
                Err(Refusal::Backend(kind))
            }
            Ok(Err(e)) => {
                let refusal = classify(&e);
                match refusal {
                    Refusal::Backend(ProxyFailure::Connect | ProxyFailure::ConnectTimeout) => {
                        b.refused(self.settings.backend_eject, label, crate::error_chain(&e));
                    }
                    Refusal::Backend(kind) => {
                        let what = format!("{}: {}", backend_failure(kind), crate::error_chain(&e));
                        b.failed(label, kind, &what);
                    }
                    _ => {}
                }
                Err(refusal)
            }
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// The client's response from the backend's: in the client's protocol, hop-by-hop headers
    /// gone, the version header set, counted, and the body metered (and teed for a shadow),
    /// ending at the call's gRPC deadline if it has one.
    fn respond<B>(
        &self,
        mut parts: http::response::Parts,
        body: B,
        (client_version, in_flight, deadline): (
            http::Version,
            InFlight,
            Option<tokio::time::Instant>,
        ),
        version: &Version,
        backend: BackendGuard,
        shadow: Option<ShadowStart>,
    ) -> (http::response::Parts, MeteredBody<B>)
    where
        B: http_body::Body,
    {
        parts.version = client_version;
        strip_hop_by_hop(&mut parts.headers);
        if let Some(name) = &self.settings.version_header {
            parts
                .headers
                .insert(name.clone(), version.label_header.clone());
        }
        in_flight.stats().count_response(parts.status);
        // A trailers-only gRPC answer carries its status in the head (only HTTP/2 speaks gRPC).
        if version.protocol != BackendProtocol::Http1 && parts.status.is_success() {
            if let Some(code) = super::body::grpc_status(&parts.headers).filter(|c| *c != 0) {
                in_flight.stats().count_grpc_error(code);
            }
        }
        let response_tee = shadow.map(|s| s.response_tee(parts.status.as_u16(), &parts.headers));
        let body = MeteredBody::new(
            body,
            in_flight,
            Arc::clone(&version.label),
            self.settings.idle_timeout,
            Some(backend),
            response_tee,
        )
        .with_deadline(deadline);
        (parts, body)
    }

    /// Weir's own answer to a request it decided not to forward.
    fn local(&self, local: Local) -> Response<ProxyBody> {
        let mut response = json_error(local.status, local.body);
        if let (Some(name), Some((version, _))) = (&self.settings.version_header, &local.version) {
            response
                .headers_mut()
                .insert(name.clone(), version.label_header.clone());
        }
        response
    }

    /// Reads a body's first bytes, up to `listener.max_body_scan` or its end, for the fields
    /// routing reads (`model`, and `sticky` when the route is sticky by a body field).
    async fn read_prefix(
        &self,
        body: &mut RequestBody,
        sticky: Option<&str>,
    ) -> Result<Prefix, Refusal> {
        use http_body_util::BodyExt;
        let wanted = ["model", sticky.unwrap_or("")];
        let wanted = &wanted[..if sticky.is_some() { 2 } else { 1 }];
        let mut reader = FieldReader::new(wanted, self.settings.max_body_scan);
        let mut bytes = Vec::new();
        let mut trailers = None;
        let read = loop {
            let frame = tokio::time::timeout(self.settings.idle_timeout, body.frame())
                .await
                .map_err(|_| Refusal::ClientBody)?;
            match frame {
                None => break reader.finish(),
                Some(Err(_)) => return Err(Refusal::ClientBody),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if bytes.len() as u64 + data.len() as u64 > self.settings.max_request_body {
                            return Err(Refusal::TooLarge(self.settings.max_request_body));
                        }
                        bytes.extend_from_slice(&data);
                        if let Some(read) = reader.feed(&data) {
                            break read;
                        }
                    }
                    Err(frame) => {
                        trailers = frame.into_trailers().ok();
                        break reader.finish();
                    }
                },
            }
        };
        Ok(Prefix {
            bytes,
            trailers,
            read,
        })
    }

    /// Answers a request that weir could not forward, and counts it.
    fn refuse(
        &self,
        refusal: Refusal,
        label: &str,
        version_value: &HeaderValue,
        in_flight: &InFlight,
        api: Api,
    ) -> Response<ProxyBody> {
        let (status, body) = refusal.answer(label, in_flight, api);
        let mut response = json_error(status, body);
        if let Some(name) = &self.settings.version_header {
            response
                .headers_mut()
                .insert(name.clone(), version_value.clone());
        }
        response
    }
}

/// Sorts a failure of an HTTP/2 backend into what the client is told.
/// The body bytes read to route a request, and what they said.
struct Prefix {
    bytes: Vec<u8>,
    trailers: Option<HeaderMap>,
    read: crate::fields::Read,
}

impl Prefix {
    /// Replaces the body's `model` value with `token` (a JSON string); the new Content-Length
    /// of a body that had one.
    fn rename(&mut self, token: &[u8], length: Option<u64>) -> Option<u64> {
        let Ok(BodyFields {
            model: Some(field), ..
        }) = &self.read
        else {
            return None;
        };
        let mut out =
            Vec::with_capacity(field.renamed_len(self.bytes.len() as u64, token) as usize);
        field.splice_into(&mut out, &self.bytes, token);
        self.bytes = out;
        length.map(|n| field.renamed_len(n, token))
    }
}

/// The decision's view of a request.
fn ask_of<'a, B>(
    req: &'a Request<B>,
    content_length: Option<u64>,
    started: Instant,
    body: Option<&'a crate::fields::Read>,
) -> Ask<'a, HeaderMap> {
    Ask {
        method: req.method().as_str(),
        host: request_host(req),
        path: req.uri().path(),
        headers: req.headers(),
        content_length,
        started,
        body,
    }
}

fn classify_http2(e: &Http2Error) -> Refusal {
    match e {
        Http2Error::ConnectTimeout(_) => Refusal::Backend(ProxyFailure::ConnectTimeout),
        Http2Error::Request(e) => classify_request(e),
        _ => Refusal::Backend(ProxyFailure::Connect),
    }
}

/// Sorts an upstream failure into what the client is told.
fn classify(e: &hyper_util::client::legacy::Error) -> Refusal {
    if e.is_connect() {
        let timed_out = chain(e).any(|e| {
            e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        });
        return Refusal::Backend(if timed_out {
            ProxyFailure::ConnectTimeout
        } else {
            ProxyFailure::Connect
        });
    }
    classify_request(e)
}

/// `e` and its sources.
fn chain<'e>(
    e: &'e (dyn StdError + 'static),
) -> impl Iterator<Item = &'e (dyn StdError + 'static)> {
    std::iter::successors(Some(e), |e: &&(dyn StdError + 'static)| (*e).source())
}

/// Sorts a failure after the connection was made into what the client is told.
fn classify_request(e: &(dyn StdError + 'static)) -> Refusal {
    let chain = || chain(e);
    if chain().any(|e| e.is::<BodyTooLarge>()) {
        return Refusal::TooLarge(
            chain()
                .find_map(|e| e.downcast_ref::<BodyTooLarge>())
                .map_or(0, |b| b.limit),
        );
    }
    for err in chain() {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() {
                return Refusal::Backend(ProxyFailure::Protocol);
            }
            if h.is_user() {
                return Refusal::ClientBody;
            }
        }
    }
    Refusal::Backend(ProxyFailure::Reset)
}

/// Applies the framing rules (one valid Content-Length or chunked, see [`framing`]) and makes the
/// Host the backend sees the authority weir routes by: an absolute-form target's authority
/// replaces Host (RFC 9112 §3.2.2); an HTTP/2 `:authority` becomes Host, and a Host that differs
/// from it is refused (RFC 9113 §8.3.1).
fn normalize_head<B>(req: &mut Request<B>) -> Result<(), framing::Malformed> {
    let http2 = req.version() == http::Version::HTTP_2;
    let headers = req
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    let fields = if http2 {
        framing::check_method(req.method().as_str())?;
        framing::read(headers)?
    } else {
        let http10 = req.version() <= http::Version::HTTP_10;
        framing::request(http10, req.method().as_str(), headers)?
    };
    let length = fields.content_length;
    let host = fields.host.map(<[u8]>::to_vec);
    if let Some(authority) = req.uri().authority() {
        if !framing::valid_host(authority.as_str().as_bytes()) {
            return Err(framing::Malformed::Host);
        }
        if http2 && host.is_some_and(|h| !h.eq_ignore_ascii_case(authority.as_str().as_bytes())) {
            return Err(framing::Malformed::Host);
        }
        let value =
            HeaderValue::from_str(authority.as_str()).map_err(|_| framing::Malformed::Host)?;
        req.headers_mut().insert(HOST, value);
    }
    // Identical Content-Length lines go on as one.
    if let Some(length) = length {
        req.headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
    }
    // An HTTP/1.0 request may come without Host; the HTTP/1.1 request weir sends on carries one,
    // empty as for a target without authority (RFC 9112 §3.2).
    if !http2 && !req.headers().contains_key(HOST) {
        req.headers_mut().insert(HOST, HeaderValue::from_static(""));
    }
    Ok(())
}

/// Applies the response framing rules to a head hyper's client parsed: one valid Content-Length
/// or a single final chunked (which hyper has decoded; a Content-Length beside it describes
/// nothing and goes), anything else is the backend's protocol error.
fn reframe_response(parts: &mut http::response::Parts) -> Result<(), framing::Malformed> {
    // weir asks for no upgrade: a 101 (or another 1xx) as the answer would switch the client's
    // connection to whatever follows.
    if parts.status.is_informational() {
        return Err(framing::Malformed::Informational);
    }
    let http10 = parts.version <= http::Version::HTTP_10;
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
    let fields = framing::response(http10, headers)?;
    let (chunked, length) = (fields.chunked, fields.content_length);
    match length {
        Some(_) if chunked => {
            parts.headers.remove(CONTENT_LENGTH);
        }
        Some(length) => {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(length));
        }
        None => {}
    }
    Ok(())
}

/// weir's answer to a request whose head it refuses; an HTTP/1 connection closes after it.
fn malformed_answer(malformed: framing::Malformed, version: http::Version) -> Response<ProxyBody> {
    closing(
        json_error(malformed.request_status(), malformed.json()),
        version,
    )
}

/// `response` as the last on an HTTP/1 connection (one whose request was not read to its end);
/// an HTTP/2 stream ends by itself.
fn closing(mut response: Response<ProxyBody>, version: http::Version) -> Response<ProxyBody> {
    if version < http::Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The request's host: the URI authority (HTTP/2, absolute form) or the Host header.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .host()
        .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass of cheap name comparisons instead of a hashed removal
    // per hop-by-hop name.
    if !headers.keys().any(|name| HOP_BY_HOP.contains(&name)) {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| framing::tokens(v.as_bytes()))
            .filter(|token| framing::connection_may_name(token))
            .filter_map(|token| HeaderName::from_bytes(token).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn forwarded_headers(headers: &mut HeaderMap, conn: &ConnInfo) {
    // Earlier hops may have sent several X-Forwarded-For lines; keep them all, in order.
    let mut prior = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
    let xff = if prior.peek().is_none() {
        conn.client_ip.clone()
    } else {
        let mut joined = Vec::with_capacity(64);
        for value in prior {
            joined.extend_from_slice(value.as_bytes());
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(conn.client_ip.as_bytes());
        HeaderValue::from_bytes(&joined).unwrap_or_else(|_| conn.client_ip.clone())
    };
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(X_FORWARDED_PROTO.clone(), conn.proto.clone());
}

/// A gRPC call's deadline (`grpc-timeout`: at most 8 digits and a unit, H M S m u n).
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Whether a request is a gRPC call (`content-type: application/grpc…`).
fn is_grpc(headers: &HeaderMap) -> bool {
    // `application/grpc`, `application/grpc+proto`, `application/grpc;…` — not gRPC-Web, whose
    // trailers travel in the body.
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
}

/// weir's own refusal of a gRPC call, as gRPC clients understand one: HTTP 200, trailers-only,
/// with a `grpc-status` for what happened and weir's message as `grpc-message`. A backend's
/// answer passes as it came.
async fn grpc_shaped(response: Response<ProxyBody>) -> Response<ProxyBody> {
    if response.status().is_success() || !matches!(response.body(), ProxyBody::Local { .. }) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let bytes = http_body_util::BodyExt::collect(body)
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let message = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| parts.status.to_string());
    // After gRPC's HTTP-to-status mapping, with weir's own causes made precise.
    let code = match parts.status.as_u16() {
        400 => 13,       // INTERNAL
        401 => 16,       // UNAUTHENTICATED
        403 => 7,        // PERMISSION_DENIED
        404 => 12,       // UNIMPLEMENTED
        413 | 429 => 8,  // RESOURCE_EXHAUSTED
        504 => 4,        // DEADLINE_EXCEEDED
        502 | 503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    };
    parts.status = StatusCode::OK;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    parts
        .headers
        .insert("grpc-status", HeaderValue::from(code as u32));
    if let Ok(value) = HeaderValue::from_str(&grpc_message(&message)) {
        parts.headers.insert("grpc-message", value);
    }
    Response::from_parts(parts, ProxyBody::local(Bytes::new()))
}

/// `grpc-message`'s percent-encoding: printable ASCII except `%` as is, every other byte `%XX`.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn json_error(status: StatusCode, body: serde_json::Value) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::local(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_spec_writes_them() {
        let with = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_static(value));
            grpc_timeout(&h)
        };
        assert_eq!(with("300m"), Some(Duration::from_millis(300)));
        assert_eq!(with("2S"), Some(Duration::from_secs(2)));
        assert_eq!(with("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(with("5u"), Some(Duration::from_micros(5)));
        for bad in ["", "m", "123456789m", "12x", "-1S", "1.5S"] {
            assert_eq!(with(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_calls_are_told_apart_from_grpc_web_and_messages_are_percent_encoded() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc") && with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web") && !with("application/json"));
        assert_eq!(
            grpc_message("50% of chat@v1 — down"),
            "50%25 of chat@v1 %E2%80%94 down"
        );
    }

    #[tokio::test]
    async fn weirs_own_refusal_of_a_grpc_call_is_a_grpc_status() {
        let refused = json_error(
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({"error": "chat@v2 did not answer in time", "kind": "timeout"}),
        );
        let shaped = grpc_shaped(refused).await;
        assert_eq!(shaped.status(), StatusCode::OK);
        assert_eq!(shaped.headers()["grpc-status"], "4");
        assert_eq!(
            shaped.headers()["grpc-message"],
            "chat@v2 did not answer in time"
        );
        assert_eq!(shaped.headers()[header::CONTENT_TYPE], "application/grpc");
        for (status, code) in [
            (413, "8"),
            (429, "8"),
            (502, "14"),
            (503, "14"),
            (404, "12"),
        ] {
            let answer = json_error(
                StatusCode::from_u16(status).unwrap(),
                serde_json::json!({"error": "x"}),
            );
            assert_eq!(
                grpc_shaped(answer).await.headers()["grpc-status"],
                code,
                "{status}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn hop_by_hop_names_are_the_framing_module_s() {
        let names: Vec<&str> = HOP_BY_HOP.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, framing::HOP_BY_HOP);
    }

    #[test]
    fn connection_cannot_remove_framing_headers_or_host() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("content-length, host, transfer-encoding, x-drop"),
        );
        h.insert("content-length", HeaderValue::from_static("5"));
        h.insert("host", HeaderValue::from_static("a.example"));
        h.insert("x-drop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "host"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let conn = ConnInfo {
            client_ip: HeaderValue::from_static("10.0.0.2"),
            proto: HeaderValue::from_static("http"),
        };
        let mut h = HeaderMap::new();
        forwarded_headers(&mut h, &conn);
        assert_eq!(h["x-forwarded-for"], "10.0.0.2");
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        forwarded_headers(&mut h, &conn);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
