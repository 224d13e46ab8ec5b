//! HTTP/1.1 on raw sockets, for tests that must see exactly the bytes on the wire: a strict
//! message parser of its own (no `httparse`, which weir uses), a connection end that reads and
//! writes whole messages, and a recording backend that answers with raw bytes.
//!
//! The parser is the strict recipient RFC 9112 describes: CRLF line ends only, `1*DIGIT`
//! Content-Length (identical duplicates taken as one), Transfer-Encoding only as a single
//! `chunked` and never beside Content-Length, one Host on HTTP/1.1 requests, strict chunk lines.
//! Anything else is an error, never a guess, so a message two parsers could read differently
//! shows up as an error in the test.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::DEADLINE;

// === messages ===

/// Header lines as they were on the wire; names compare case-insensitively.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.all(name).first().copied()
    }

    /// Every comma-separated element over all the lines of `name`.
    pub fn list(&self, name: &str) -> Vec<String> {
        self.all(name)
            .iter()
            .flat_map(|v| v.split(','))
            .map(|v| v.trim_matches([' ', '\t']).to_string())
            .filter(|v| !v.is_empty())
            .collect()
    }

    /// Whether `Connection` has the `close` option.
    pub fn closes(&self) -> bool {
        self.list("connection")
            .iter()
            .any(|t| t.eq_ignore_ascii_case("close"))
    }

    /// Content-Length, strictly (RFC 9110 §8.6): every line and list member `1*DIGIT`, all
    /// agreeing.
    pub fn content_length(&self) -> Result<Option<usize>, String> {
        let mut found = None;
        for value in self.all("content-length") {
            for member in value.split(',') {
                let digits = member.trim_matches([' ', '\t']);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("Content-Length {value:?} is not 1*DIGIT"));
                }
                let n: usize = digits
                    .parse()
                    .map_err(|_| format!("Content-Length {value:?} overflows"))?;
                if found.is_some_and(|f| f != n) {
                    return Err(format!("Content-Lengths disagree: {:?}", self.0));
                }
                found = Some(n);
            }
        }
        Ok(found)
    }

    /// Whether the body is chunked: Transfer-Encoding, when present, must be exactly one
    /// `chunked` (this parser decodes nothing else) and stand without Content-Length (RFC 9112
    /// §6.2: a sender must not send both).
    pub fn chunked(&self) -> Result<bool, String> {
        let codings = self.list("transfer-encoding");
        if self.all("transfer-encoding").is_empty() {
            return Ok(false);
        }
        if codings.len() != 1 || !codings[0].eq_ignore_ascii_case("chunked") {
            return Err(format!("Transfer-Encoding {codings:?} is not one chunked"));
        }
        if !self.all("content-length").is_empty() {
            return Err(format!(
                "Transfer-Encoding beside Content-Length: {:?}",
                self.0
            ));
        }
        Ok(true)
    }
}

/// How a message body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// A request as a wire backend received it, body decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct RawRequest {
    pub method: String,
    pub target: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    pub headers: Fields,
    pub body: Vec<u8>,
}

impl RawRequest {
    /// How this request's body ends, or why a strict server would refuse its head.
    pub fn framing(&self) -> Result<Framing, String> {
        let hosts = self.headers.all("host");
        match (self.version.as_str(), hosts.as_slice()) {
            (_, [host]) if !valid_host(host) => return Err(format!("invalid Host {host:?}")),
            ("HTTP/1.1", []) => return Err("an HTTP/1.1 request without Host".to_string()),
            (_, [_, _, ..]) => return Err(format!("several Host lines: {hosts:?}")),
            _ => {}
        }
        let chunked = self.headers.chunked()?;
        if chunked && self.version == "HTTP/1.0" {
            return Err("Transfer-Encoding in an HTTP/1.0 request".to_string());
        }
        Ok(if chunked {
            Framing::Chunked
        } else {
            match self.headers.content_length()? {
                Some(len) => Framing::Length(len),
                None => Framing::Empty,
            }
        })
    }
}

/// `host[:port]`, or empty (what a client sends when the target has no authority, RFC 9112
/// §3.2).
fn valid_host(host: &str) -> bool {
    host.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~:[]".contains(&b))
}

/// A final response head and how its body is framed.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub headers: Fields,
    pub framing: Framing,
}

/// A response read to its end.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Fields,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body ({e}); status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn served_by(&self) -> &str {
        self.headers.get("x-weir-version").unwrap_or("")
    }
}

/// A body that stopped before its framing said it ends: what had arrived, and why it stopped.
#[derive(Debug)]
pub struct Cut {
    pub body: Vec<u8>,
    pub why: String,
}

/// `token` (RFC 9110 §5.6.2).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A byte that may stand in a field value, a reason phrase or a chunk extension: visible ASCII,
/// obs-text, SP and HTAB.
fn field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

/// One `name: value` line (RFC 9112 §5): no space before the colon, no obs-fold, no controls.
fn parse_field(line: &[u8]) -> Result<(String, String), String> {
    let text = String::from_utf8_lossy(line);
    if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
        return Err(format!("obs-fold line {text:?}"));
    }
    let colon = line
        .iter()
        .position(|b| *b == b':')
        .ok_or_else(|| format!("field line without a colon {text:?}"))?;
    let name = String::from_utf8_lossy(&line[..colon]).into_owned();
    if !is_token(&name) {
        return Err(format!("bad field name in {text:?}"));
    }
    let value = &line[colon + 1..];
    if !value.iter().all(|b| field_byte(*b)) {
        return Err(format!("control byte in field {text:?}"));
    }
    let value = String::from_utf8_lossy(value)
        .trim_matches([' ', '\t'])
        .to_string();
    Ok((name, value))
}

/// A head's start line and fields; `head` ends with its blank line.
fn parse_head(head: &[u8]) -> Result<(String, Fields), String> {
    let body = head
        .strip_suffix(b"\r\n\r\n")
        .ok_or_else(|| "a head without its blank line".to_string())?;
    let lines: Vec<&[u8]> = split_crlf(body).collect();
    if lines
        .iter()
        .any(|line| line.contains(&b'\r') || line.contains(&b'\n'))
    {
        return Err(format!(
            "bare CR or LF in the head {:?}",
            String::from_utf8_lossy(head)
        ));
    }
    let start = lines[0];
    if !start.iter().all(|b| field_byte(*b)) {
        return Err(format!(
            "control byte in the start line {:?}",
            String::from_utf8_lossy(start)
        ));
    }
    let mut fields = Fields::default();
    for line in &lines[1..] {
        fields.0.push(parse_field(line)?);
    }
    Ok((String::from_utf8_lossy(start).into_owned(), fields))
}

fn split_crlf(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let data = rest?;
        match find(data, b"\r\n") {
            Some(at) => {
                rest = Some(&data[at + 2..]);
                Some(&data[..at])
            }
            None => {
                rest = None;
                Some(data)
            }
        }
    })
}

/// A request head: `method SP target SP HTTP/1.x`, then fields (body left empty).
pub fn parse_request_head(head: &[u8]) -> Result<RawRequest, String> {
    let (start, headers) = parse_head(head)?;
    let parts: Vec<&str> = start.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(format!("not a request line {start:?}"));
    };
    if !is_token(method)
        || target.is_empty()
        || !target.bytes().all(|b| b.is_ascii_graphic())
        || !matches!(*version, "HTTP/1.1" | "HTTP/1.0")
    {
        return Err(format!("not a request line {start:?}"));
    }
    Ok(RawRequest {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
        body: Vec::new(),
    })
}

/// A response head: `HTTP/1.x SP 3DIGIT SP reason`, then fields.
pub fn parse_response_head(head: &[u8]) -> Result<(u16, Fields), String> {
    let (start, headers) = parse_head(head)?;
    let bad = || format!("not a status line {start:?}");
    let rest = start
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| start.strip_prefix("HTTP/1.0 "))
        .ok_or_else(bad)?;
    let (code, reason) = rest.split_at_checked(3).ok_or_else(bad)?;
    if !code.bytes().all(|b| b.is_ascii_digit()) || !(reason.is_empty() || reason.starts_with(' '))
    {
        return Err(bad());
    }
    Ok((code.parse().map_err(|_| bad())?, headers))
}

/// How a response body ends (RFC 9112 §6.3), or why a strict client would refuse its head.
pub fn response_framing(method: &str, status: u16, headers: &Fields) -> Result<Framing, String> {
    let chunked = headers.chunked()?;
    let length = headers.content_length()?;
    Ok(
        if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
            Framing::Empty
        } else if chunked {
            Framing::Chunked
        } else {
            match length {
                Some(len) => Framing::Length(len),
                None => Framing::UntilClose,
            }
        },
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where a chunk-size line is broken, if it is: `1*HEXDIG [ BWS ";" ext ]` (RFC 9112 §7.1).
fn chunk_size(line: &[u8]) -> Result<usize, String> {
    let text = String::from_utf8_lossy(line);
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(format!("bad chunk-size line {text:?}"));
    }
    let ext = &line[digits..];
    let after_bws = ext
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .map_or(&[][..], |i| &ext[i..]);
    if !ext.is_empty() && (after_bws.first() != Some(&b';') || !ext.iter().all(|b| field_byte(*b)))
    {
        return Err(format!("bad chunk extension in {text:?}"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|e| e.to_string())?;
    usize::from_str_radix(hex, 16).map_err(|e| format!("chunk size {text:?}: {e}"))
}

// === one end of a connection ===

/// One end of a raw HTTP/1.1 connection, with what was read but not yet parsed.
pub struct Wire<S> {
    pub io: S,
    pub buf: Vec<u8>,
}

impl<S> Wire<S> {
    pub fn new(io: S) -> Wire<S> {
        Wire {
            io,
            buf: Vec::new(),
        }
    }
}

impl<S: AsyncRead + Unpin> Wire<S> {
    /// Reads what the peer sent next; `Ok(0)` at a clean end of the stream.
    pub async fn fill(&mut self) -> Result<usize, String> {
        let mut chunk = vec![0u8; 16 * 1024];
        let n = self
            .io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read failed: {e}"))?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Like [`Wire::fill`], but more was expected: the end of the stream is an error.
    pub async fn more(&mut self) -> Result<(), String> {
        match self.fill().await? {
            0 => Err("the peer closed the connection".to_string()),
            _ => Ok(()),
        }
    }

    /// The bytes before the next `delimiter`, which is consumed too.
    pub async fn until(&mut self, delimiter: &[u8]) -> Result<Vec<u8>, String> {
        loop {
            if let Some(at) = find(&self.buf, delimiter) {
                let out = self.buf[..at].to_vec();
                self.buf.drain(..at + delimiter.len());
                return Ok(out);
            }
            self.more().await?;
        }
    }

    /// One CRLF-terminated line; a bare CR or LF in it is an error (RFC 9112 §2.2 lets a strict
    /// recipient refuse them, and weir must never pass them on).
    async fn line(&mut self) -> Result<Vec<u8>, String> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                if at == 0 || self.buf[at - 1] != b'\r' || self.buf[..at - 1].contains(&b'\r') {
                    return Err(format!(
                        "bare CR or LF in {:?}",
                        String::from_utf8_lossy(&self.buf[..=at])
                    ));
                }
                let line = self.buf[..at - 1].to_vec();
                self.buf.drain(..=at);
                return Ok(line);
            }
            self.more().await?;
        }
    }

    pub async fn exactly(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            self.more().await?;
        }
        Ok(self.buf.drain(..n).collect())
    }

    /// A message head, with its blank line. A bare LF fails it at once, instead of waiting for
    /// a CRLF CRLF that may never come.
    pub async fn head(&mut self) -> Result<Vec<u8>, String> {
        let mut head = Vec::new();
        loop {
            let line = self.line().await?;
            head.extend_from_slice(&line);
            head.extend_from_slice(b"\r\n");
            if line.is_empty() && head.len() > 2 {
                return Ok(head);
            }
            if line.is_empty() {
                return Err("a head starting with an empty line".to_string());
            }
        }
    }

    /// Whether the peer has closed (or reset) the connection with nothing buffered: the clean
    /// end between two messages.
    async fn at_end(&mut self) -> Result<bool, String> {
        if !self.buf.is_empty() {
            return Ok(false);
        }
        match self.fill().await {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(why) if why.contains("reset") => Ok(true),
            Err(why) => Err(why),
        }
    }

    /// The next chunk's data; `None` after the last chunk, whose trailer fields go to `trailers`.
    pub async fn chunk(&mut self, trailers: &mut Fields) -> Result<Option<Vec<u8>>, String> {
        let line = self.line().await?;
        let size = chunk_size(&line)?;
        if size == 0 {
            loop {
                let field = self.line().await?;
                if field.is_empty() {
                    return Ok(None);
                }
                trailers.0.push(parse_field(&field)?);
            }
        }
        let data = self.exactly(size).await?;
        let end = self.exactly(2).await?;
        if end != b"\r\n" {
            return Err(format!(
                "a chunk of {size} bytes is followed by {:?}, not CRLF",
                String::from_utf8_lossy(&end)
            ));
        }
        Ok(Some(data))
    }

    /// Reads chunks until `body` holds `len` bytes.
    pub async fn chunks_to(&mut self, body: &mut Vec<u8>, len: usize) -> Result<(), String> {
        let mut trailers = Fields::default();
        while body.len() < len {
            match self.chunk(&mut trailers).await? {
                Some(data) => body.extend_from_slice(&data),
                None => return Err(format!("the body ended after {} bytes", body.len())),
            }
        }
        Ok(())
    }

    /// A whole body (trailers dropped).
    pub async fn body(&mut self, framing: Framing) -> Result<Vec<u8>, Cut> {
        let mut body = Vec::new();
        let ended = match framing {
            Framing::Empty => Ok(()),
            Framing::Length(len) => loop {
                if self.buf.len() >= len {
                    body = self.buf.drain(..len).collect();
                    break Ok(());
                }
                if let Err(why) = self.more().await {
                    body = std::mem::take(&mut self.buf);
                    break Err(why);
                }
            },
            Framing::Chunked => {
                let mut trailers = Fields::default();
                loop {
                    match self.chunk(&mut trailers).await {
                        Ok(Some(data)) => body.extend_from_slice(&data),
                        Ok(None) => break Ok(()),
                        Err(why) => break Err(why),
                    }
                }
            }
            Framing::UntilClose => loop {
                match self.fill().await {
                    Ok(0) => {
                        body = std::mem::take(&mut self.buf);
                        break Ok(());
                    }
                    Ok(_) => {}
                    Err(why) => {
                        body = std::mem::take(&mut self.buf);
                        break Err(why);
                    }
                }
            },
        };
        match ended {
            Ok(()) => Ok(body),
            Err(why) => Err(Cut { body, why }),
        }
    }

    /// The next request, body decoded (a backend's view); `None` when the peer closed cleanly
    /// between requests.
    pub async fn next_request(&mut self) -> Result<Option<RawRequest>, String> {
        if self.at_end().await? {
            return Ok(None);
        }
        let head = self.head().await?;
        let mut request = parse_request_head(&head)?;
        let framing = request.framing()?;
        request.body = self.body(framing).await.map_err(|cut| {
            format!(
                "{} {} with a body cut after {:?}: {}",
                request.method,
                request.target,
                String::from_utf8_lossy(&cut.body),
                cut.why
            )
        })?;
        Ok(Some(request))
    }

    /// The next request; the end of the stream is an error.
    pub async fn request(&mut self) -> Result<RawRequest, String> {
        self.next_request()
            .await?
            .ok_or_else(|| "the peer closed the connection".to_string())
    }

    /// The status of an interim (1xx) response head.
    pub async fn interim(&mut self) -> Result<u16, String> {
        let head = self.head().await?;
        let (status, _) = parse_response_head(&head)?;
        if (100..200).contains(&status) {
            Ok(status)
        } else {
            Err(format!(
                "expected a 1xx head, got {:?}",
                String::from_utf8_lossy(&head)
            ))
        }
    }

    /// The final response head to a request with `method` (1xx heads skipped).
    pub async fn response_head(&mut self, method: &str) -> Result<ResponseHead, String> {
        loop {
            let head = self.head().await?;
            let (status, headers) = parse_response_head(&head)?;
            if (100..200).contains(&status) {
                continue;
            }
            let framing = response_framing(method, status, &headers)?;
            return Ok(ResponseHead {
                status,
                headers,
                framing,
            });
        }
    }

    /// The next final response head; `None` when the peer closed (or reset the connection)
    /// before one began.
    pub async fn next_response_head(
        &mut self,
        method: &str,
    ) -> Result<Option<ResponseHead>, String> {
        if self.at_end().await? {
            return Ok(None);
        }
        self.response_head(method).await.map(Some)
    }

    pub async fn read_response(&mut self, method: &str) -> Result<RawResponse, String> {
        let head = self.response_head(method).await?;
        let body = self.body(head.framing).await.map_err(|cut| {
            format!(
                "status {} with a body cut after {:?}: {}",
                head.status,
                String::from_utf8_lossy(&cut.body),
                cut.why
            )
        })?;
        Ok(RawResponse {
            status: head.status,
            headers: head.headers,
            body,
        })
    }

    /// The next whole response to a request with `method`; `None` when the peer closed cleanly
    /// (or reset the connection) between responses.
    pub async fn next_response(&mut self, method: &str) -> Result<Option<RawResponse>, String> {
        if self.at_end().await? {
            return Ok(None);
        }
        self.read_response(method).await.map(Some)
    }

    /// One whole response to a request with `method`, failing the test after [`DEADLINE`].
    pub async fn response_to(&mut self, method: &str) -> RawResponse {
        within("a complete response", self.read_response(method)).await
    }

    pub async fn response(&mut self) -> RawResponse {
        self.response_to("GET").await
    }

    /// Waits for the peer to close the connection cleanly, with nothing more sent.
    pub async fn assert_closed(&mut self) {
        let read = tokio::time::timeout(DEADLINE, self.fill())
            .await
            .unwrap_or_else(|_| panic!("the connection is still open after {DEADLINE:?}"));
        assert_eq!(
            read,
            Ok(0),
            "expected a clean close; unread bytes {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }

    /// Waits for the connection to end, by a close or a reset, with nothing more sent.
    pub async fn ends(&mut self) -> Result<(), String> {
        if !self.buf.is_empty() {
            return Err(format!(
                "bytes after the last response: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        match tokio::time::timeout(DEADLINE, self.at_end()).await {
            Err(_) => Err(format!("the connection is still open after {DEADLINE:?}")),
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(format!(
                "expected the connection to end; then came {:?}",
                String::from_utf8_lossy(&self.buf)
            )),
            Ok(Err(why)) => Err(why),
        }
    }

    /// [`Wire::ends`], failing the test otherwise.
    pub async fn assert_ends(&mut self, what: &str) {
        if let Err(why) = self.ends().await {
            panic!("{what}: {why}");
        }
    }
}

impl<S: AsyncWrite + Unpin> Wire<S> {
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
        self.io.write_all(bytes.as_ref()).await
    }
}

impl Wire<TcpStream> {
    pub async fn connect(addr: SocketAddr) -> Wire<TcpStream> {
        let stream = TcpStream::connect(addr).await.unwrap();
        let _ = stream.set_nodelay(true);
        Wire::new(stream)
    }

    /// Writes `bytes`, failing the test if the connection does not take them.
    pub async fn write(&mut self, bytes: impl AsRef<[u8]>) {
        if let Err(e) = self.send(bytes).await {
            panic!("weir did not take the request bytes: {e}");
        }
    }
}

/// Awaits `step`, failing the test with `what` if it errs or takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, step: impl Future<Output = Result<T, String>>) -> T {
    match tokio::time::timeout(DEADLINE, step).await {
        Ok(Ok(value)) => value,
        Ok(Err(why)) => panic!("{what}: {why}"),
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

// === requests and answers ===

pub fn get_request(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: weir.test\r\n\r\n")
}

pub fn post_request(target: &str, body: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nHost: weir.test\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `200 OK` with a Content-Length body.
pub fn ok(body: impl AsRef<[u8]>) -> Vec<u8> {
    let body = body.as_ref();
    let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// `METHOD target`, then a space and the body when there is one.
pub fn describe(req: &RawRequest) -> String {
    let mut line = format!("{} {}", req.method, req.target);
    if !req.body.is_empty() {
        line.push(' ');
        line.push_str(&String::from_utf8_lossy(&req.body));
    }
    line
}

/// A weir error answer: status, JSON `kind`, a message and (when given) the version.
pub fn assert_error(reply: &RawResponse, status: u16, kind: &str, version: Option<&str>) {
    assert_eq!(
        reply.status,
        status,
        "expected {status} {kind}, got {:?}",
        reply.text()
    );
    assert_eq!(reply.headers.get("content-type"), Some("application/json"));
    let json = reply.json();
    assert_eq!(json["kind"], kind, "{json}");
    assert!(
        json["error"].as_str().is_some_and(|e| !e.is_empty()),
        "no error message: {json}"
    );
    if let Some(version) = version {
        assert_eq!(json["version"], version, "{json}");
    }
}

// === wire backends ===

/// What a wire backend received, in arrival order: whole requests, and the bytes it could not
/// parse as one (with why).
#[derive(Clone, Default)]
pub struct Requests(Arc<Mutex<Received>>);

#[derive(Default)]
struct Received {
    requests: Vec<RawRequest>,
    garbage: Vec<String>,
}

impl Requests {
    pub fn push(&self, request: RawRequest) {
        self.0.lock().unwrap().requests.push(request);
    }

    pub fn all(&self) -> Vec<RawRequest> {
        self.0.lock().unwrap().requests.clone()
    }

    /// The requests received after the first `n`.
    pub fn since(&self, n: usize) -> Vec<RawRequest> {
        self.0.lock().unwrap().requests[n..].to_vec()
    }

    pub fn count(&self) -> usize {
        self.0.lock().unwrap().requests.len()
    }

    /// Records bytes that were not a request a strict server accepts.
    pub fn push_garbage(&self, why: String) {
        self.0.lock().unwrap().garbage.push(why);
    }

    pub fn garbage(&self) -> Vec<String> {
        self.0.lock().unwrap().garbage.clone()
    }
}

/// A TCP server on 127.0.0.1:0 that hands each connection, with its index (from 0), to `serve`
/// and counts them. Stops accepting when dropped.
pub struct WireBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl WireBackend {
    pub async fn start<F, Fut>(serve: F) -> WireBackend
    where
        F: Fn(Wire<TcpStream>, usize) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let index = counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(Wire::new(stream), index));
            }
        });
        WireBackend {
            addr,
            accepted,
            accept,
        }
    }

    /// Answers every request with `answer(request)` and keeps each connection open; records the
    /// requests before answering them, and what it could not parse (then closes).
    pub async fn answering<F>(answer: F) -> (WireBackend, Requests)
    where
        F: Fn(&RawRequest) -> Vec<u8> + Send + Sync + 'static,
    {
        let requests = Requests::default();
        let log = requests.clone();
        let answer = Arc::new(answer);
        let backend = WireBackend::start(move |mut wire, _| {
            let (log, answer) = (log.clone(), answer.clone());
            async move {
                loop {
                    match wire.next_request().await {
                        Ok(Some(request)) => {
                            let reply = answer(&request);
                            log.push(request);
                            if wire.send(reply).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => return,
                        Err(why) => {
                            log.push_garbage(format!(
                                "{why}; unparsed {:?}",
                                String::from_utf8_lossy(&wire.buf)
                            ));
                            return;
                        }
                    }
                }
            }
        })
        .await;
        (backend, requests)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for WireBackend {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
