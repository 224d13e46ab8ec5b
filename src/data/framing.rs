//! HTTP/1.1 framing and the header rules that go with it, for both front ends and for backend
//! responses: where a message body ends (RFC 9112 §6, RFC 9110 §8.6), which headers are
//! hop-by-hop (RFC 9110 §7.6.1), what a request's Host must be (RFC 9112 §3.2).
//!
//! Invariant: weir frames every message exactly as a strict parser would, or refuses it. A head
//! two parsers could read differently (a Content-Length that is not digits, two that differ, a
//! Transfer-Encoding beside one, chunked twice, a `Connection` header naming a framing header,
//! two Hosts) is never forwarded: requests get 400 (501 for a coding weir does not decode) and
//! their connection closes; responses get 502.

use std::ops::Range;

use http::StatusCode;

/// Why a message head cannot be framed or forwarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A Content-Length that is not `1*DIGIT`, or several that differ.
    ContentLength,
    /// Transfer-Encoding with `chunked` twice, or not last.
    TransferEncoding,
    /// A transfer coding weir does not decode (anything but `chunked`).
    UnknownCoding,
    /// Transfer-Encoding and Content-Length in one request.
    LengthAndChunked,
    /// Transfer-Encoding in an HTTP/1.0 message.
    ChunkedHttp10,
    /// Two Host fields, or one that is not a valid authority.
    Host,
    /// An HTTP/1.1 request without Host.
    NoHost,
    /// A case variant of a standard method (`head`, `Get`): some servers would read it as the
    /// standard one and frame its response differently.
    Method,
    /// A 1xx status as a final response (weir asks for no upgrade).
    Informational,
}

impl Malformed {
    /// What a request with this head is answered.
    pub fn request_status(self) -> StatusCode {
        match self {
            Malformed::UnknownCoding => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Malformed::ContentLength => {
                "Content-Length must be one decimal number (RFC 9110 §8.6); several must agree"
            }
            Malformed::TransferEncoding => {
                "Transfer-Encoding must name chunked once, as the last coding (RFC 9112 §6.1)"
            }
            Malformed::UnknownCoding => {
                "weir decodes no transfer coding but chunked (RFC 9112 §6.1: 501)"
            }
            Malformed::LengthAndChunked => {
                "a request with both Transfer-Encoding and Content-Length is refused (RFC 9112 §6.3)"
            }
            Malformed::ChunkedHttp10 => "HTTP/1.0 has no Transfer-Encoding (RFC 9112 §6.1)",
            Malformed::Host => {
                "a request carries exactly one Host, a valid host[:port] (RFC 9112 §3.2)"
            }
            Malformed::NoHost => "an HTTP/1.1 request must carry Host (RFC 9112 §3.2)",
            Malformed::Method => {
                "methods are case-sensitive: send the standard method in upper case (RFC 9110 §9.1)"
            }
            Malformed::Informational => "a 1xx status cannot end an exchange weir asked no upgrade for",
        }
    }

    /// weir's own answer to a request with this head (`kind` "bad_request").
    pub fn json(self) -> serde_json::Value {
        serde_json::json!({"error": self.message(), "kind": "bad_request"})
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the older proxy ones), never forwarded.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub fn is_hop_by_hop(name: &[u8]) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Whether a `Connection` option may remove the header it names. Framing headers and Host are
/// end-to-end (RFC 9110 §7.6.1: a sender must not name them); a hostile sender that does gets
/// them forwarded anyway, as nginx and HAProxy do, so the message stays framed.
pub fn connection_may_name(name: &[u8]) -> bool {
    !(name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"host"))
}

/// The comma-separated tokens of a list header, trimmed of whitespace.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(|t| t.trim_ascii())
        .filter(|t| !t.is_empty())
}

/// Trims optional whitespace (SP, HTAB) only: `trim_ascii` would also take form feeds and the
/// like, and `str::trim` Unicode spaces, that a strict parser keeps.
fn trim_ows(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// One Content-Length field value: `1*DIGIT`, or a list of identical ones (RFC 9110 §8.6 lets a
/// recipient take `5, 5` as 5).
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut found = None;
    for part in value.split(|b| *b == b',') {
        let digits = trim_ows(part);
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = digits.iter().try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// Methods whose case variants are refused (RFC 9110 §9 and PATCH).
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Refuses `head`, `Get` and the like; the standard methods and upper-case extension methods
/// pass.
pub fn check_method(method: &str) -> Result<(), Malformed> {
    match STANDARD_METHODS
        .iter()
        .find(|m| m.eq_ignore_ascii_case(method))
    {
        Some(m) if *m != method => Err(Malformed::Method),
        _ => Ok(()),
    }
}

/// Whether a Host value is `host[:port]` with nothing else (no user info, no path, no spaces).
pub fn valid_host(value: &[u8]) -> bool {
    !value.is_empty()
        && !value.contains(&b'@')
        && http::uri::Authority::try_from(value).is_ok_and(|a| a.as_str().len() == value.len())
}

/// What the framing and connection headers of a head say.
#[derive(Debug, Default)]
pub struct Fields<'a> {
    /// Content-Length, every field and list member agreeing.
    pub content_length: Option<u64>,
    /// A Content-Length value was a list (`5, 5`): a response may carry one, a request may not.
    pub length_list: bool,
    /// Transfer-Encoding is exactly `chunked`.
    pub chunked: bool,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (what keeps an HTTP/1.0 message's connection open).
    pub keep_alive: bool,
    /// `Connection: upgrade` or an Upgrade header.
    pub upgrade: bool,
    /// An Expect header.
    pub expect: bool,
    /// The one Host value.
    pub host: Option<&'a [u8]>,
    /// `Connection` options naming headers to drop (never framing headers or Host).
    pub connection_named: Vec<&'a [u8]>,
}

impl Fields<'_> {
    /// Whether `name` is hop-by-hop or named by `Connection`: not to be forwarded.
    pub fn drops(&self, name: &[u8]) -> bool {
        is_hop_by_hop(name)
            || self
                .connection_named
                .iter()
                .any(|n| name.eq_ignore_ascii_case(n))
    }
}

/// Reads a head's framing and connection headers, refusing what cannot be framed exactly.
/// Rules common to both directions; [`request`] and [`response`] add their own.
pub fn read<'a>(
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Fields<'a>, Malformed> {
    let mut fields = Fields::default();
    let mut hosts = 0;
    let mut codings = 0;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = content_length(value).ok_or(Malformed::ContentLength)?;
            fields.length_list |= value.contains(&b',');
            if fields.content_length.is_some_and(|l| l != n) {
                return Err(Malformed::ContentLength);
            }
            fields.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            for coding in tokens(value) {
                codings += 1;
                if fields.chunked {
                    // Anything after chunked (chunked again included).
                    return Err(Malformed::TransferEncoding);
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    fields.chunked = true;
                } else if !coding
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~!#$%&'*+^`|".contains(b))
                {
                    return Err(Malformed::TransferEncoding);
                }
            }
            if codings == 0 {
                return Err(Malformed::TransferEncoding);
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            let value = trim_ows(value);
            if hosts > 1 || !valid_host(value) {
                return Err(Malformed::Host);
            }
            fields.host = Some(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in tokens(value) {
                if token.eq_ignore_ascii_case(b"close") {
                    fields.close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    fields.keep_alive = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    fields.upgrade = true;
                } else if connection_may_name(token) {
                    fields.connection_named.push(token);
                }
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            fields.upgrade = true;
        } else if name.eq_ignore_ascii_case(b"expect") {
            fields.expect = true;
        }
    }
    if codings > 0 && !fields.chunked {
        // No final chunked: the length cannot be known (RFC 9112 §6.3: a request gets 400).
        return Err(Malformed::TransferEncoding);
    }
    if codings > 1 {
        // `gzip, chunked`: framed, but weir would hand on a body still coded.
        return Err(Malformed::UnknownCoding);
    }
    Ok(fields)
}

/// A request head's fields, with the request rules: one valid Host (required in HTTP/1.1), no
/// Transfer-Encoding in HTTP/1.0 or beside Content-Length, a Content-Length that is one number
/// (hyper's server refuses `5, 5`, so both front ends do), a method in its standard case.
pub fn request<'a>(
    http10: bool,
    method: &str,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Fields<'a>, Malformed> {
    check_method(method)?;
    let fields = read(headers)?;
    if fields.chunked && http10 {
        return Err(Malformed::ChunkedHttp10);
    }
    if fields.chunked && fields.content_length.is_some() {
        return Err(Malformed::LengthAndChunked);
    }
    if fields.length_list {
        return Err(Malformed::ContentLength);
    }
    if fields.host.is_none() && !http10 {
        return Err(Malformed::NoHost);
    }
    Ok(fields)
}

/// How a response body ends, from its status, the request's method and its fields.
pub fn response_body(status: u16, head_request: bool, fields: &Fields<'_>) -> Framing {
    if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        Framing::Ended
    } else if fields.chunked {
        Framing::Chunked(Chunked::start())
    } else {
        match fields.content_length {
            Some(0) => Framing::Ended,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }
}

/// A response head's fields, with the response rules: no Transfer-Encoding in HTTP/1.0. (Both
/// Transfer-Encoding and Content-Length: chunked wins and Content-Length is dropped, RFC 9112
/// §6.3; the caller must not reuse that connection.)
pub fn response<'a>(
    http10: bool,
    headers: impl Iterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Fields<'a>, Malformed> {
    let fields = read(headers)?;
    if fields.chunked && http10 {
        return Err(Malformed::ChunkedHttp10);
    }
    Ok(fields)
}

// === bodies ===

/// How a body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Ended,
}

impl Framing {
    /// How many bytes at the front of `data` belong to the body, and whether the body ends there;
    /// `payload` is told where the body's content lies in them (chunked framing excluded).
    pub fn take_with(&mut self, data: &[u8], payload: impl FnMut(Range<usize>)) -> (usize, bool) {
        self.take_with_trailer(data, payload, |_| {})
    }

    /// [`Framing::take_with`], also telling `trailer` where the bytes of a chunked body's
    /// trailer section lie in `data` (its field lines and the empty line that ends it).
    pub fn take_with_trailer(
        &mut self,
        data: &[u8],
        mut payload: impl FnMut(Range<usize>),
        trailer: impl FnMut(Range<usize>),
    ) -> (usize, bool) {
        let (n, done) = match self {
            Framing::Length(left) => {
                let n = (*left).min(data.len() as u64);
                *left -= n;
                (n as usize, *left == 0)
            }
            Framing::Chunked(state) => return state.scan_trailer(data, payload, trailer),
            Framing::UntilClose => (data.len(), false),
            Framing::Ended => (0, true),
        };
        if n > 0 {
            payload(0..n);
        }
        (n, done)
    }

    /// Chunked framing the sender broke: the body can neither end nor go on.
    pub fn is_invalid(&self) -> bool {
        *self == Framing::Chunked(Chunked::Invalid)
    }
}

/// Where a chunked body stands (RFC 9112 §7.1); the bytes pass through untouched, so every byte
/// is checked: a bare LF, a control character or stray text anywhere ends it as invalid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Chunked {
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size (BWS before an extension).
    SizeSpace {
        size: u64,
    },
    Extension {
        size: u64,
    },
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// After the last chunk: trailer lines until an empty one. `empty`: the line so far is empty.
    Trailer {
        empty: bool,
    },
    TrailerLf {
        empty: bool,
    },
    Done,
    Invalid,
}

/// A byte that may stand in a chunk extension or a trailer line: visible ASCII, obs-text,
/// SP and HTAB; never CR, LF or another control.
fn field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

impl Chunked {
    pub fn start() -> Chunked {
        Chunked::Size { size: 0, digits: 0 }
    }

    /// Consumes `data` up to the end of the body; returns the bytes taken and whether it ended,
    /// telling `payload` where each run of chunk data lies in `data`. Invalid framing stops the
    /// scan in [`Chunked::Invalid`] (the body never ends, so it fails).
    #[cfg(test)]
    pub fn scan_with(&mut self, data: &[u8], payload: impl FnMut(Range<usize>)) -> (usize, bool) {
        self.scan_trailer(data, payload, |_| {})
    }

    /// [`Chunked::scan_with`], also telling `trailer` where the trailer section's bytes lie.
    pub fn scan_trailer(
        &mut self,
        data: &[u8],
        mut payload: impl FnMut(Range<usize>),
        mut trailer: impl FnMut(Range<usize>),
    ) -> (usize, bool) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if matches!(*self, Chunked::Trailer { .. } | Chunked::TrailerLf { .. }) {
                trailer(i..i + 1);
            }
            *self = match *self {
                Chunked::Size { size, digits } => match (b as char).to_digit(16) {
                    Some(d) if digits < 16 => Chunked::Size {
                        size: size * 16 + u64::from(d),
                        digits: digits + 1,
                    },
                    None if digits > 0 && b == b';' => Chunked::Extension { size },
                    None if digits > 0 && (b == b' ' || b == b'\t') => Chunked::SizeSpace { size },
                    None if digits > 0 && b == b'\r' => Chunked::SizeLf { size },
                    _ => Chunked::Invalid,
                },
                Chunked::SizeSpace { size } => match b {
                    b' ' | b'\t' => Chunked::SizeSpace { size },
                    b';' => Chunked::Extension { size },
                    b'\r' => Chunked::SizeLf { size },
                    _ => Chunked::Invalid,
                },
                Chunked::Extension { size } => match b {
                    b'\r' => Chunked::SizeLf { size },
                    b if field_byte(b) => Chunked::Extension { size },
                    _ => Chunked::Invalid,
                },
                Chunked::SizeLf { size } => match (b, size) {
                    (b'\n', 0) => Chunked::Trailer { empty: true },
                    (b'\n', size) => Chunked::Data { left: size },
                    _ => Chunked::Invalid,
                },
                Chunked::Data { left } => {
                    let n = (left as usize).min(data.len() - i);
                    payload(i..i + n);
                    i += n;
                    let left = left - n as u64;
                    *self = if left == 0 {
                        Chunked::DataCr
                    } else {
                        Chunked::Data { left }
                    };
                    continue;
                }
                Chunked::DataCr if b == b'\r' => Chunked::DataLf,
                Chunked::DataLf if b == b'\n' => Chunked::start(),
                Chunked::Trailer { empty } => match b {
                    b'\r' => Chunked::TrailerLf { empty },
                    b if field_byte(b) => Chunked::Trailer { empty: false },
                    _ => Chunked::Invalid,
                },
                Chunked::TrailerLf { empty } => match (b, empty) {
                    (b'\n', true) => Chunked::Done,
                    (b'\n', false) => Chunked::Trailer { empty: true },
                    _ => Chunked::Invalid,
                },
                Chunked::DataCr | Chunked::DataLf | Chunked::Done | Chunked::Invalid => {
                    Chunked::Invalid
                }
            };
            if *self == Chunked::Invalid {
                return (i, false);
            }
            i += 1;
            if *self == Chunked::Done {
                return (i, true);
            }
        }
        (i, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(headers: &[(&str, &[u8])]) -> Result<Fields<'static>, Malformed> {
        let owned: Vec<(&'static [u8], &'static [u8])> = headers
            .iter()
            .map(|(n, v)| {
                let n: &'static [u8] = Box::leak(n.as_bytes().to_vec().into_boxed_slice());
                let v: &'static [u8] = Box::leak(v.to_vec().into_boxed_slice());
                (n, v)
            })
            .collect();
        request(false, "POST", owned.into_iter())
    }

    #[test]
    fn content_length_is_digits_and_nothing_else() {
        let cases: &[(&[u8], Option<u64>)] = &[
            (b"0", Some(0)),
            (b"35", Some(35)),
            (b" 35\t", Some(35)),
            (b"5, 5", Some(5)),
            (b"5,5,5", Some(5)),
            (b"18446744073709551615", Some(u64::MAX)),
            (b"", None),
            (b" ", None),
            (b"+5", None),
            (b"-1", None),
            (b"0x23", None),
            (b"3 5", None),
            (b"5, 6", None),
            (b"5,", None),
            (b",5", None),
            ("35\u{a0}".as_bytes(), None),
            ("\u{a0}35".as_bytes(), None),
            ("35\u{85}".as_bytes(), None),
            (b"35\x0c", None),
            (b"99999999999999999999", None),
            (b"1e3", None),
        ];
        for (value, expected) in cases {
            assert_eq!(
                content_length(value),
                *expected,
                "{:?}",
                String::from_utf8_lossy(value)
            );
        }
    }

    #[test]
    fn request_heads_are_framed_once_or_refused() {
        let host: (&str, &[u8]) = ("Host", b"a.example");
        type Case<'a> = (
            &'a [(&'a str, &'a [u8])],
            Result<(Option<u64>, bool), Malformed>,
        );
        let cases: &[Case<'_>] = &[
            (&[host, ("Content-Length", b"5")], Ok((Some(5), false))),
            (
                &[host, ("Content-Length", b"5"), ("content-length", b"5")],
                Ok((Some(5), false)),
            ),
            (
                &[host, ("Content-Length", b"5"), ("Content-Length", b"6")],
                Err(Malformed::ContentLength),
            ),
            (&[host, ("Transfer-Encoding", b"chunked")], Ok((None, true))),
            (&[host, ("Transfer-Encoding", b"Chunked")], Ok((None, true))),
            (
                &[host, ("Transfer-Encoding", b"chunked, chunked")],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[
                    host,
                    ("Transfer-Encoding", b"chunked"),
                    ("Transfer-Encoding", b"chunked"),
                ],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[host, ("Transfer-Encoding", b"chunked, identity")],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[host, ("Transfer-Encoding", b"identity, chunked")],
                Err(Malformed::UnknownCoding),
            ),
            (
                &[host, ("Transfer-Encoding", b"gzip, chunked")],
                Err(Malformed::UnknownCoding),
            ),
            (
                &[host, ("Transfer-Encoding", b"gzip")],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[host, ("Content-Length", b"5, 5")],
                Err(Malformed::ContentLength),
            ),
            (
                &[host, ("Transfer-Encoding", b"")],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[host, ("Transfer-Encoding", b"chunked\x0b")],
                Err(Malformed::TransferEncoding),
            ),
            (
                &[
                    host,
                    ("Transfer-Encoding", b"chunked"),
                    ("Content-Length", b"5"),
                ],
                Err(Malformed::LengthAndChunked),
            ),
            (&[host, host], Err(Malformed::Host)),
            (&[("Host", b"a b")], Err(Malformed::Host)),
            (&[("Host", b"user@a.example")], Err(Malformed::Host)),
            (&[("Host", b"")], Err(Malformed::Host)),
            (&[("Host", b"a.example/p")], Err(Malformed::Host)),
            (&[("Host", b"a.example:8080")], Ok((None, false))),
            (&[("Host", b"[::1]:8080")], Ok((None, false))),
            (&[("Content-Length", b"5")], Err(Malformed::NoHost)),
        ];
        for (headers, expected) in cases {
            let got = fields(headers).map(|f| (f.content_length, f.chunked));
            assert_eq!(&got, expected, "{headers:?}");
        }
    }

    #[test]
    fn connection_never_names_framing_headers_or_host() {
        let got = fields(&[
            ("Host", b"a"),
            (
                "Connection",
                b"close, content-length, Host, transfer-encoding, X-Drop",
            ),
            ("Content-Length", b"12"),
        ])
        .unwrap();
        assert!(got.close);
        assert_eq!(got.content_length, Some(12));
        assert_eq!(got.connection_named, [b"X-Drop".as_slice()]);
        assert!(!got.drops(b"content-length"));
        assert!(!got.drops(b"host"));
        assert!(got.drops(b"x-drop"));
        assert!(got.drops(b"Keep-Alive"));
    }

    #[test]
    fn http10_and_methods() {
        let te: [(&[u8], &[u8]); 1] = [(b"Transfer-Encoding", b"chunked")];
        assert_eq!(
            request(true, "POST", te.into_iter()).unwrap_err(),
            Malformed::ChunkedHttp10
        );
        assert!(
            request(true, "GET", std::iter::empty()).is_ok(),
            "HTTP/1.0 needs no Host"
        );
        for bad in ["head", "Get", "post", "dElEtE", "patch"] {
            assert_eq!(check_method(bad), Err(Malformed::Method), "{bad}");
        }
        for good in ["GET", "HEAD", "PURGE", "M-SEARCH", "propfind"] {
            assert_eq!(check_method(good), Ok(()), "{good}");
        }
    }

    #[test]
    fn response_bodies_end_where_their_head_says() {
        let parse = |headers: &'static [(&'static [u8], &'static [u8])]| {
            response(false, headers.iter().copied()).map(|f| response_body(200, false, &f))
        };
        assert_eq!(parse(&[(b"Content-Length", b"5")]), Ok(Framing::Length(5)));
        assert_eq!(parse(&[(b"Content-Length", b"0")]), Ok(Framing::Ended));
        assert_eq!(parse(&[]), Ok(Framing::UntilClose));
        assert_eq!(
            parse(&[
                (b"Transfer-Encoding", b"chunked"),
                (b"Content-Length", b"100")
            ]),
            Ok(Framing::Chunked(Chunked::start()))
        );
        assert_eq!(
            parse(&[(b"Content-Length", b"+5")]),
            Err(Malformed::ContentLength)
        );
        assert_eq!(
            parse(&[(b"Transfer-Encoding", b"gzip")]),
            Err(Malformed::TransferEncoding)
        );
        let none: Fields<'_> = Fields::default();
        assert_eq!(response_body(200, true, &none), Framing::Ended);
        assert_eq!(response_body(204, false, &none), Framing::Ended);
        assert_eq!(response_body(304, false, &none), Framing::Ended);
    }

    fn scan_all(parts: &[&[u8]]) -> (usize, bool) {
        let mut state = Chunked::start();
        let mut total = 0;
        for part in parts {
            let (n, done) = state.scan_with(part, |_| {});
            total += n;
            if done || state == Chunked::Invalid {
                return (total, done);
            }
        }
        (total, false)
    }

    #[test]
    fn chunked_bodies_end_exactly_where_their_framing_says() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\nNEXT";
        let (n, done) = scan_all(&[body]);
        assert!(done);
        assert_eq!(&body[..n], b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n");
        // Split at every byte boundary.
        for cut in 1..body.len() - 4 {
            let (n, done) = scan_all(&[&body[..cut], &body[cut..]]);
            assert!(done, "cut {cut}");
            assert_eq!(n, body.len() - 4, "cut {cut}");
        }
    }

    #[test]
    fn chunked_framing_is_strict() {
        // (body, ends as valid)
        let cases: &[(&[u8], bool)] = &[
            (b"0\r\n\r\n", true),
            (b"0\r\nx-t: 1\r\n\r\n", true),
            (b"5 ;a=b\r\nhello\r\n0\r\n\r\n", true),
            (b"5\t\r\nhello\r\n0\r\n\r\n", true),
            (b"A\r\n0123456789\r\n0\r\n\r\n", true),
            (b"zz\r\n", false),
            (b"\r\n", false),
            (b"3\r\nabcX\r\n0\r\n\r\n", false),
            (b"5\nhello\r\n0\r\n\r\n", false),
            (b"5;a\nb\r\nhello\r\n0\r\n\r\n", false),
            (b"5;a\x00\r\nhello\r\n0\r\n\r\n", false),
            (b"5 x\r\nhello\r\n0\r\n\r\n", false),
            (b"5\r\nhello\n0\r\n\r\n", false),
            (b"0\r\nx: y\n\r\n", false),
            (b"0\r\nx: y\r\n\n", false),
            (b"0\n\n", false),
            (b"0\r\n\r\r", false),
            (b"11111111111111111\r\n", false),
        ];
        for (body, valid) in cases {
            let (_, done) = scan_all(&[body]);
            assert_eq!(done, *valid, "{:?}", String::from_utf8_lossy(body));
            let mut state = Chunked::start();
            state.scan_with(body, |_| {});
            assert_eq!(
                state == Chunked::Invalid,
                !*valid,
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
