//! HTTP/1 framing on the wire (issue 16): every hostile or ambiguous request and response, sent
//! as raw bytes through both front ends (the fast path's byte-for-byte relay, and the general path
//! every request takes with `http1_fast_path = false`)
//! to a raw recording backend whose strict parser is the test's own.
//!
//! For each request: the backend receives exactly the requests the client sent, or none (the
//! client then gets 400 or 501 with `Connection: close`, and the connection ends); a request
//! sent afterwards on a fresh connection is the only other one it sees. For each response: the
//! client gets it correctly framed or a 502, never an unframed body on a kept-alive connection.
//! Both front ends must give the same status to every case.

mod common;

use std::future::Future;

use common::wire::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A request whose body is itself a whole request: what a smuggler sends.
const SMUGGLED: &str = "GET /v1/smuggled HTTP/1.1\r\nHost: weir.test\r\n\r\n";

// === both front ends ===

#[derive(Clone, Copy, Debug, PartialEq)]
enum FrontEnd {
    FastPath,
    General,
}

impl FrontEnd {
    const BOTH: [FrontEnd; 2] = [FrontEnd::FastPath, FrontEnd::General];

    fn listener(self) -> &'static str {
        match self {
            FrontEnd::FastPath => "[listener]\naddr = \"127.0.0.1:0\"\n",
            FrontEnd::General => "[listener]\naddr = \"127.0.0.1:0\"\nhttp1_fast_path = false\n",
        }
    }
}

/// Runs `case` for every row on both front ends, each run in its own task and against its own
/// weir, so that every failing row of either front end is reported at once; then asserts that
/// both front ends had the same outcome (the status they answered) for each row.
async fn each_on_both<R, T, F, Fut>(rows: Vec<R>, case: F)
where
    R: Clone + std::fmt::Debug,
    F: Fn(FrontEnd, R) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: std::fmt::Debug + PartialEq + Send + 'static,
{
    let mut failures = Vec::new();
    for row in rows {
        let mut outcomes = Vec::new();
        for front in FrontEnd::BOTH {
            match tokio::spawn(case(front, row.clone())).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => failures.push(format!("{front:?}, row {row:?}:\n    {}", panic_text(e))),
            }
        }
        if let [fast, general] = outcomes.as_slice() {
            if fast != general {
                failures.push(format!(
                    "row {row:?}: the fast path answers {fast:?}, the general path {general:?}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// [`each_on_both`] with one row.
async fn on_both<T, F, Fut>(case: F)
where
    F: Fn(FrontEnd) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: std::fmt::Debug + PartialEq + Send + 'static,
{
    each_on_both(vec![()], |front, ()| case(front)).await;
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".to_string()),
        Err(e) => e.to_string(),
    }
}

/// A weir on one front end, in front of a recording wire backend.
struct Rig {
    front: FrontEnd,
    weir: Weir,
    requests: Requests,
    _backend: WireBackend,
}

impl Rig {
    /// `config` (tables other than `[listener]`) and [`ONE_VERSION`], the backend answering
    /// every request with `answer`.
    async fn start<F>(front: FrontEnd, config: &str, answer: F) -> Rig
    where
        F: Fn(&RawRequest) -> Vec<u8> + Send + Sync + 'static,
    {
        let (backend, requests) = WireBackend::answering(answer).await;
        let template = format!("{}{config}\n{ONE_VERSION}", front.listener());
        let weir = Weir::start(&template, &[("v1", &backend.url())]).await;
        Rig {
            front,
            weir,
            requests,
            _backend: backend,
        }
    }

    /// A backend answering `200` with `METHOD target body`.
    async fn echoing(front: FrontEnd) -> Rig {
        Rig::start(front, "", |req| ok(describe(req))).await
    }

    async fn connect(&self) -> Wire<TcpStream> {
        Wire::connect(self.weir.proxy).await
    }

    /// Sends `request` alone on a new connection and reads one answer.
    async fn exchange(
        &self,
        what: &str,
        request: impl AsRef<[u8]>,
    ) -> (RawResponse, Wire<TcpStream>) {
        let mut client = self.connect().await;
        client.write(request).await;
        let reply = within(&format!("{what}: the answer"), client.read_response("POST")).await;
        (reply, client)
    }

    /// Sends `request` on a new connection and asserts weir refuses it: `status`, `Connection:
    /// close`, the connection ended, nothing forwarded (every problem reported at once).
    async fn assert_refused(&self, what: &str, request: impl AsRef<[u8]>, status: u16) -> u16 {
        let (reply, mut client) = self.exchange(what, request).await;
        let mut problems = refusal_problems(&reply, status);
        if let Err(why) = client.ends().await {
            problems.push(why);
        }
        problems.extend(self.forwarded_problems(&[]).await);
        assert!(problems.is_empty(), "{what}: {}", problems.join("; "));
        reply.status
    }

    /// Asserts the backend received exactly `expected` (as [`describe`]d), and nothing it could
    /// not parse.
    async fn assert_forwarded(&self, what: &str, expected: &[&str]) {
        let problems = self.forwarded_problems(expected).await;
        assert!(problems.is_empty(), "{what}: {}", problems.join("; "));
    }

    /// How what the backend received differs from exactly `expected` and nothing unparsable. A
    /// request sent on a fresh connection last must be the next one it sees: whatever weir
    /// forwarded before has arrived by then.
    async fn forwarded_problems(&self, expected: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        let mut probe = self.connect().await;
        probe.write(get_request("/v1/probe")).await;
        let reply = probe.response().await;
        if (reply.status, reply.text().as_str()) != (200, "GET /v1/probe") {
            problems.push(format!("the probe after the case got {reply:?}"));
        }
        let seen: Vec<String> = self.requests.all().iter().map(describe).collect();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.push("GET /v1/probe".to_string());
        if seen != want {
            problems.push(format!("the backend received {seen:?}, not {want:?}"));
        }
        let garbage = self.requests.garbage();
        if !garbage.is_empty() {
            problems.push(format!("the backend could not parse {garbage:?}"));
        }
        problems
    }

    /// Asserts a `200` answer with `text`, showing what the backend could not parse otherwise.
    fn assert_answer(&self, reply: &RawResponse, what: &str, text: &str) {
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, text),
            "{what}: the backend could not parse {:?}",
            self.requests.garbage()
        );
    }

    /// weir's error counter for `kind` on the one route.
    async fn assert_errors(&self, kind: &str, count: f64) {
        let labels = [("route", "chat"), ("version", "chat@v1"), ("kind", kind)];
        assert_eventually_eq!(
            self.weir.metric("weir_request_errors_total", &labels).await,
            Some(count),
            "{:?}: weir_request_errors_total{labels:?}",
            self.front
        );
    }
}

/// How a refusal differs from `status` with `Connection: close`. weir's own answers carry a
/// JSON body with a message.
fn refusal_problems(reply: &RawResponse, status: u16) -> Vec<String> {
    let mut problems = Vec::new();
    if reply.status != status {
        problems.push(format!(
            "answered {} {:?}, not {status}",
            reply.status,
            reply.text()
        ));
    }
    if !reply.headers.closes() {
        problems.push(format!(
            "a refusal without Connection: close: {:?}",
            reply.headers
        ));
    }
    if reply.headers.get("content-type") == Some("application/json")
        && reply.json()["error"].as_str().is_none_or(str::is_empty)
    {
        problems.push(format!(
            "an error answer without a message: {}",
            reply.text()
        ));
    }
    problems
}

fn assert_refusal(reply: &RawResponse, what: &str, status: u16) {
    let problems = refusal_problems(reply, status);
    assert!(problems.is_empty(), "{what}: {}", problems.join("; "));
}

/// Header lines on one line, for messages.
fn one_line(headers: &str) -> String {
    headers.trim_end().replace("\r\n", " / ")
}

fn post_with(extra_headers: &str, body: &str) -> String {
    format!("POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\n{extra_headers}\r\n{body}")
}

/// Each `(what, request, status)` row is refused with `status` on both front ends.
async fn assert_each_refused(rows: Vec<(String, String, u16)>) {
    each_on_both(rows, |front, (what, request, status)| async move {
        let rig = Rig::echoing(front).await;
        rig.assert_refused(&what, request, status).await
    })
    .await;
}

// === requests: Connection, Content-Length, Transfer-Encoding ===

#[tokio::test]
async fn a_connection_header_naming_a_framing_header_or_host_never_smuggles_the_body_as_a_request()
{
    let chunked = format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len());
    let length = format!("Content-Length: {}\r\n", SMUGGLED.len());
    let rows = vec![
        ("content-length", length.clone(), SMUGGLED.to_string()),
        ("transfer-encoding", length.clone(), SMUGGLED.to_string()),
        ("host", length.clone(), SMUGGLED.to_string()),
        (
            "keep-alive, Content-Length, Host",
            length,
            SMUGGLED.to_string(),
        ),
        (
            "transfer-encoding",
            "Transfer-Encoding: chunked\r\n".to_string(),
            chunked,
        ),
    ];
    each_on_both(rows, |front, (named, framing, body)| async move {
        let what = format!("Connection: {named} with {framing:?}");
        let rig = Rig::echoing(front).await;
        let mut client = rig.connect().await;
        client
            .write(post_with(
                &format!("Connection: {named}\r\n{framing}"),
                &body,
            ))
            .await;
        let reply = client.response_to("POST").await;
        let post = format!("POST /v1/upload {SMUGGLED}");
        rig.assert_answer(&reply, &what, &post);
        // The next request on this connection gets its own answer.
        client.write(get_request("/v1/next")).await;
        assert_eq!(client.response().await.text(), "GET /v1/next", "{what}");
        rig.assert_forwarded(&what, &[&post, "GET /v1/next"]).await;
        let forwarded = &rig.requests.all()[0];
        assert_eq!(forwarded.headers.all("host"), ["weir.test"], "{what}");
        reply.status
    })
    .await;
}

#[tokio::test]
async fn a_content_length_that_is_not_digits_is_refused_with_400_and_nothing_is_forwarded() {
    let values = [
        "+5",
        "-1",
        " 5x",
        "0x5",
        "5 5",
        "5;5",
        "99999999999999999999999",
        "5\u{a0}",
        "\u{a0}5",
        "5\u{85}",
        "",
    ];
    let rows = values
        .iter()
        .map(|value| {
            let request = post_with(&format!("Content-Length: {value}\r\n"), "hello");
            (format!("Content-Length: {value:?}"), request, 400)
        })
        .collect();
    assert_each_refused(rows).await;
}

#[tokio::test]
async fn identical_content_length_lines_are_forwarded_as_one() {
    let rows = vec![
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\ncontent-length: 5\r\nContent-Length: 5\r\n",
    ];
    each_on_both(rows, |front, lengths| async move {
        let what = one_line(lengths);
        let rig = Rig::echoing(front).await;
        let (reply, _client) = rig.exchange(&what, post_with(lengths, "hello")).await;
        rig.assert_answer(&reply, &what, "POST /v1/upload hello");
        rig.assert_forwarded(&what, &["POST /v1/upload hello"])
            .await;
        let forwarded = &rig.requests.all()[0];
        assert_eq!(
            forwarded.headers.all("content-length"),
            ["5"],
            "{what}: forwarded as one line"
        );
        reply.status
    })
    .await;
}

/// RFC 9110 §8.6 lets a recipient take a list of identical lengths (`5, 5`) as one, or refuse
/// it. Both front ends must agree, and hyper refuses it: so weir does.
#[tokio::test]
async fn a_content_length_list_or_differing_lengths_are_refused() {
    let rows = [
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5\r\ncontent-length: 5,5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 6\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 6\r\n",
    ]
    .iter()
    .map(|lengths| (one_line(lengths), post_with(lengths, "hello!"), 400))
    .collect();
    assert_each_refused(rows).await;
}

#[tokio::test]
async fn a_chunked_request_body_reaches_the_backend_whole() {
    let rows = vec![
        (
            "POST",
            "chunked",
            "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
        ),
        (
            "POST",
            "Chunked",
            "b\r\nhello world\r\n0\r\nx-trailer: 1\r\n\r\n",
        ),
        (
            "POST",
            "chunked",
            "3 ;a=b\r\nhel\r\n8\r\nlo world\r\n0\r\n\r\n",
        ),
        ("POST", "chunked", "B;a=\"q;x\"\r\nhello world\r\n0\r\n\r\n"),
        // Content in a GET or OPTIONS has no defined meaning, but it is the client's to send.
        ("GET", "chunked", "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        ("OPTIONS", "chunked", "b\r\nhello world\r\n0\r\n\r\n"),
    ];
    each_on_both(rows, |front, (method, coding, body)| async move {
        let what = format!("{method} with Transfer-Encoding: {coding} and {body:?}");
        let rig = Rig::echoing(front).await;
        let mut client = rig.connect().await;
        client
            .write(format!(
                "{method} /v1/upload HTTP/1.1\r\nHost: weir.test\r\nTransfer-Encoding: {coding}\r\n\r\n{body}"
            ))
            .await;
        let reply = client.response_to(method).await;
        let forwarded = format!("{method} /v1/upload hello world");
        rig.assert_answer(&reply, &what, &forwarded);
        // The body ended where its framing says: the connection carries the next request.
        client.write(get_request("/v1/next")).await;
        assert_eq!(client.response().await.text(), "GET /v1/next", "{what}");
        rig.assert_forwarded(&what, &[&forwarded, "GET /v1/next"])
            .await;
        reply.status
    })
    .await;
}

/// RFC 9112 §6.3: a request whose Transfer-Encoding does not end in chunked cannot be framed: it
/// is 400 and the connection closes (hyper answers so). §6.1: one whose final chunked follows a
/// coding weir does not decode is framed but not understood: 501.
#[tokio::test]
async fn transfer_codings_other_than_one_final_chunked_are_refused() {
    let rows = [
        ("Transfer-Encoding: chunked, chunked\r\n", 400),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            400,
        ),
        ("Transfer-Encoding: chunked, identity\r\n", 400),
        ("Transfer-Encoding: gzip\r\n", 400),
        (
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n",
            400,
        ),
        ("Transfer-Encoding: identity, chunked\r\n", 501),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        (
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            501,
        ),
    ]
    .iter()
    .map(|(codings, status)| {
        let request = post_with(codings, "5\r\nhello\r\n0\r\n\r\n");
        (one_line(codings), request, *status)
    })
    .collect();
    assert_each_refused(rows).await;
}

/// The body is checked as it is read: a chunked body whose framing breaks is refused, and the
/// backend never sees the request (nor a part of it that a lenient parser would complete).
#[tokio::test]
async fn a_chunked_request_body_with_broken_framing_is_refused_and_never_reaches_the_backend() {
    let rows = [
        "zz\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX\r\n0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5;a\nb\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\nx-t: 1\n\r\n",
        "11111111111111111\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
    ]
    .iter()
    .map(|body| {
        let request = post_with("Transfer-Encoding: chunked\r\n", body);
        (format!("chunked body {body:?}"), request, 400)
    })
    .collect();
    assert_each_refused(rows).await;
}

#[tokio::test]
async fn transfer_encoding_beside_content_length_is_refused() {
    let rows = [
        "Transfer-Encoding: chunked\r\nContent-Length: 15\r\n",
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
    ]
    .iter()
    .map(|framing| {
        let request = post_with(framing, "5\r\nhello\r\n0\r\n\r\n");
        (one_line(framing), request, 400)
    })
    .collect();
    assert_each_refused(rows).await;
}

#[tokio::test]
async fn an_http_1_0_request_with_transfer_encoding_is_refused() {
    let request = "POST /v1/upload HTTP/1.0\r\nHost: weir.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    assert_each_refused(vec![(
        "HTTP/1.0 chunked".to_string(),
        request.to_string(),
        400,
    )])
    .await;
}

// === requests: Host, target, method ===

#[tokio::test]
async fn a_request_without_exactly_one_valid_host_is_refused() {
    let rows = [
        ("two Hosts", "Host: weir.test\r\nHost: other.test\r\n"),
        (
            "the same Host twice",
            "Host: weir.test\r\nHost: weir.test\r\n",
        ),
        ("no Host", "Accept: */*\r\n"),
        ("Host a@b", "Host: a@b\r\n"),
        ("Host with a space", "Host: a b\r\n"),
        ("empty Host", "Host:\r\n"),
        ("Host with a path", "Host: a/b\r\n"),
    ]
    .iter()
    .map(|(what, host)| {
        let request = format!("GET /v1/x HTTP/1.1\r\n{host}\r\n");
        (what.to_string(), request, 400)
    })
    .collect();
    assert_each_refused(rows).await;
}

/// HTTP/1.0 has no Host requirement; the backend gets an HTTP/1.1 request, which must carry
/// one (RFC 9112 §3.2: empty when the target has no authority).
#[tokio::test]
async fn an_http_1_0_request_without_host_is_forwarded() {
    on_both(|front| async move {
        let what = "HTTP/1.0 without Host";
        let rig = Rig::echoing(front).await;
        let (reply, mut client) = rig
            .exchange(what, "GET /v1/old HTTP/1.0\r\nAccept: */*\r\n\r\n")
            .await;
        rig.assert_answer(&reply, what, "GET /v1/old");
        client.assert_ends(what).await;
        rig.assert_forwarded(what, &["GET /v1/old"]).await;
        reply.status
    })
    .await;
}

/// An HTTP/1.0 connection stays open only when asked to, and never when `close` is asked too.
#[tokio::test]
async fn an_http_1_0_request_asking_keep_alive_and_close_gets_its_connection_closed() {
    on_both(|front| async move {
        let what = "HTTP/1.0 with Connection: keep-alive, close";
        let rig = Rig::echoing(front).await;
        let request =
            "GET /v1/old HTTP/1.0\r\nHost: weir.test\r\nConnection: keep-alive, close\r\n\r\n";
        let (reply, mut client) = rig.exchange(what, request).await;
        rig.assert_answer(&reply, what, "GET /v1/old");
        client.assert_ends(what).await;
        reply.status
    })
    .await;
}

/// What weir does not serve is refused before anything is forwarded: a CONNECT tunnel (405), an
/// expectation other than `100-continue` (417, RFC 9110 §10.1.1), a head over
/// `listener.max_header_bytes` even when it arrives in one piece (431).
#[tokio::test]
async fn tunnels_unknown_expectations_and_oversized_heads_are_refused() {
    let oversized = format!(
        "GET /v1/x HTTP/1.1\r\nHost: weir.test\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let rows = vec![
        (
            "CONNECT".to_string(),
            "CONNECT weir.test:443 HTTP/1.1\r\nHost: weir.test:443\r\n\r\n".to_string(),
            405,
        ),
        (
            "Expect: something".to_string(),
            post_with("Expect: something\r\nContent-Length: 5\r\n", "hello"),
            417,
        ),
        ("a 100 KiB head in one write".to_string(), oversized, 431),
    ];
    assert_each_refused(rows).await;
}

/// Two routes limited to hosts, two versions: an absolute-form target is routed by its
/// authority, and the backend sees that authority as Host (RFC 9112 §3.2.2).
#[tokio::test]
async fn an_absolute_form_target_replaces_host_for_routing_and_for_the_backend() {
    const BY_HOST: &str = r#"
[[versions]]
model = "chat"
version = "a"
backends = ["{a}"]

[[versions]]
model = "chat"
version = "b"
backends = ["{b}"]

[[routes]]
name = "a"
host = "a.example"
stable = "chat@a"

[[routes]]
name = "b"
host = "b.example"
stable = "chat@b"
"#;
    let rows = vec![
        ("http://a.example/p?q=1", "b.example", "a.example", "chat@a"),
        (
            "http://b.example:80/p?q=1",
            "a.example",
            "b.example:80",
            "chat@b",
        ),
        ("http://A.Example/p?q=1", "b.example", "A.Example", "chat@a"),
    ];
    each_on_both(
        rows,
        |front, (target, host, authority, version)| async move {
            let what = format!("GET {target} with Host: {host}");
            let (a, seen_a) = WireBackend::answering(|req| ok(describe(req))).await;
            let (b, seen_b) = WireBackend::answering(|req| ok(describe(req))).await;
            let template = format!("{}{BY_HOST}", front.listener());
            let weir = Weir::start(&template, &[("a", &a.url()), ("b", &b.url())]).await;
            let (seen, other) = if version == "chat@a" {
                (seen_a, seen_b)
            } else {
                (seen_b, seen_a)
            };
            let mut client = Wire::connect(weir.proxy).await;
            client
                .write(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
                .await;
            let reply = client.response().await;
            assert_eq!(reply.status, 200, "{what}: {}", reply.text());
            assert_eq!(reply.served_by(), version, "{what}: routed by the target");
            assert_eq!(reply.text(), "GET /p?q=1", "{what}");
            let forwarded = seen.all();
            assert_eq!(forwarded.len(), 1, "{what}");
            assert_eq!(
                forwarded[0].headers.all("host"),
                [authority],
                "{what}: the backend's Host"
            );
            assert_eq!(other.count(), 0, "{what}: the other route's backend");
            assert!(seen.garbage().is_empty() && other.garbage().is_empty());
            reply.status
        },
    )
    .await;
}

#[tokio::test]
async fn case_variants_of_standard_methods_are_refused() {
    let rows = ["head", "Get", "pOST", "delete", "Options"]
        .iter()
        .map(|method| {
            let request = format!("{method} /v1/x HTTP/1.1\r\nHost: weir.test\r\n\r\n");
            (method.to_string(), request, 400)
        })
        .collect();
    assert_each_refused(rows).await;
}

#[tokio::test]
async fn extension_methods_are_forwarded() {
    each_on_both(
        vec!["PURGE", "PROPFIND", "M-SEARCH"],
        |front, method| async move {
            let rig = Rig::echoing(front).await;
            let request = format!("{method} /v1/x HTTP/1.1\r\nHost: weir.test\r\n\r\n");
            let (reply, _client) = rig.exchange(method, request).await;
            let expected = format!("{method} /v1/x");
            rig.assert_answer(&reply, method, &expected);
            rig.assert_forwarded(method, &[&expected]).await;
            reply.status
        },
    )
    .await;
}

/// weir's own answers (a refusal, no route, a backend failure) to a HEAD request are heads only
/// (RFC 9110 §9.3.2): a body after one would be read as the start of the next response.
#[tokio::test]
async fn weirs_own_answer_to_a_head_request_has_no_body() {
    const PREFIXED: &str = r#"
[[versions]]
model = "chat"
version = "v1"
backends = ["{v1}"]

[[routes]]
name = "chat"
prefix = "/v1"
stable = "chat@v1"
"#;
    // (what, request, status, whether the connection stays open)
    let rows = vec![
        (
            "no route",
            "HEAD /elsewhere HTTP/1.1\r\nHost: weir.test\r\n\r\n",
            404,
            true,
        ),
        (
            "a backend answering garbage",
            "HEAD /v1/garbage HTTP/1.1\r\nHost: weir.test\r\n\r\n",
            502,
            true,
        ),
        (
            "a malformed head",
            "HEAD /v1/x HTTP/1.1\r\nHost: weir.test\r\nHost: evil.test\r\n\r\n",
            400,
            false,
        ),
    ];
    each_on_both(rows, |front, (what, request, status, open)| async move {
        let (backend, _requests) = WireBackend::answering(|req| {
            if req.target == "/v1/garbage" {
                b"SMTP ready\r\n\r\n".to_vec()
            } else {
                ok(describe(req))
            }
        })
        .await;
        let template = format!("{}{PREFIXED}", front.listener());
        let weir = Weir::start(&template, &[("v1", &backend.url())]).await;
        let mut client = Wire::connect(weir.proxy).await;
        client.write(request).await;
        let reply = client.response_to("HEAD").await;
        assert_eq!(reply.status, status, "{what}");
        if open {
            client.write(get_request("/v1/next")).await;
            let next = client.response().await;
            assert_eq!(
                (next.status, next.text().as_str()),
                (200, "GET /v1/next"),
                "{what}: the answer after weir's own answer to HEAD"
            );
        } else {
            client.assert_ends(what).await;
        }
        reply.status
    })
    .await;
}

// === requests: pipelining, a backend that stops reading ===

#[tokio::test]
async fn a_refused_request_in_a_pipeline_ends_the_connection_after_the_answers_before_it() {
    let rows = vec![
        "GET /v1/bad HTTP/1.1\r\nHost: weir.test\r\nHost: evil.test\r\n\r\n",
        "POST /v1/bad HTTP/1.1\r\nHost: weir.test\r\nContent-Length: +5\r\n\r\nhello",
        "GET /v1/bad HTTP/1.1\r\nHost: weir.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "get /v1/bad HTTP/1.1\r\nHost: weir.test\r\n\r\n",
    ];
    each_on_both(rows, |front, bad| async move {
        let what = format!("pipelined good, {bad:?}, good");
        let rig = Rig::echoing(front).await;
        let mut client = rig.connect().await;
        let pipeline = [&get_request("/v1/first"), bad, &get_request("/v1/third")].concat();
        client.write(pipeline).await;
        let first = client.response().await;
        rig.assert_answer(&first, &what, "GET /v1/first");
        let refusal = client.response().await;
        assert_refusal(&refusal, &what, 400);
        client.assert_ends(&what).await;
        rig.assert_forwarded(&what, &["GET /v1/first"]).await;
        (first.status, refusal.status)
    })
    .await;
}

/// RFC 9110 §6.6.1: weir's own answers carry a Date, and so does a backend's response that came
/// without one; a backend's own Date passes unchanged, once.
#[tokio::test]
async fn every_response_reaches_the_client_with_one_date() {
    const BACKEND_DATE: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
    on_both(|front| async move {
        let rig = Rig::start(front, "", |request| {
            let date = if request.target.contains("dated") {
                format!("Date: {BACKEND_DATE}\r\n")
            } else {
                String::new()
            };
            format!("HTTP/1.1 200 OK\r\n{date}Content-Length: 2\r\n\r\nok").into_bytes()
        })
        .await;
        let mut client = rig.connect().await;
        client.write(get_request("/v1/undated")).await;
        let undated = client.response().await;
        let dates = undated.headers.all("date");
        assert_eq!(dates.len(), 1, "{front:?}: {:?}", undated.headers);
        assert!(httpdate::parse_http_date(dates[0]).is_ok(), "{dates:?}");
        client.write(get_request("/v1/dated")).await;
        let dated = client.response().await;
        assert_eq!(dated.headers.all("date"), [BACKEND_DATE], "{front:?}");
        let (refused, _) = rig
            .exchange("two Hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            .await;
        assert_eq!(refused.status, 400);
        assert_eq!(
            refused.headers.all("date").len(),
            1,
            "{front:?}: {:?}",
            refused.headers
        );
        undated.status
    })
    .await;
}

/// A backend that answers before it has read the whole body (a 413 from a size limit, a 401)
/// and stops reading: its answer reaches the client, not a 504 after the idle timeout, and the
/// connection closes (the rest of the body is unread), for a body of known length and a chunked one.
#[tokio::test]
async fn a_backend_answering_before_it_read_the_body_has_its_answer_reach_the_client() {
    const BODY: usize = 16 * 1024 * 1024;
    let rows = vec![("Content-Length", false), ("chunked", true)];
    each_on_both(rows, |front, (_, chunked)| async move {
        // Reads the head, answers at once, and never reads the body.
        let backend = WireBackend::start(|mut wire, _| async move {
            if wire.head().await.is_ok() {
                let answer = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!";
                let _ = wire.io.write_all(answer).await;
            }
            std::future::pending::<()>().await;
        })
        .await;
        let template = format!(
            "{}[proxy]\nidle_timeout = \"5s\"\n{ONE_VERSION}",
            front.listener()
        );
        let weir = Weir::start(&template, &[("v1", &backend.url())]).await;
        let stream = TcpStream::connect(weir.proxy).await.unwrap();
        let (read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            let framing = if chunked {
                "Transfer-Encoding: chunked".to_string()
            } else {
                format!("Content-Length: {BODY}")
            };
            let head = format!("POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\n{framing}\r\n\r\n");
            write.write_all(head.as_bytes()).await?;
            let piece = vec![b'x'; 64 * 1024];
            for _ in 0..BODY / piece.len() {
                if chunked {
                    write
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .await?;
                }
                write.write_all(&piece).await?;
                if chunked {
                    write.write_all(b"\r\n").await?;
                }
            }
            Ok::<_, std::io::Error>(write)
        });
        let mut client = Wire::new(read);
        let started = std::time::Instant::now();
        let reply = client.response_to("POST").await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (413, "too big!"),
            "{front:?}, chunked {chunked}, after {:?}",
            started.elapsed()
        );
        assert!(
            reply.headers.closes(),
            "an answer with the body unread keeps the connection: {:?}",
            reply.headers
        );
        sender.abort();
        reply.status
    })
    .await;
}

#[tokio::test]
async fn a_backend_that_stops_reading_the_request_body_is_cut_off_with_504_timeout() {
    const BODY: usize = 8 * 1024 * 1024;
    on_both(|front| async move {
        // Takes the connection and never reads from it.
        let backend = WireBackend::start(|wire, _| async move {
            let _held = wire;
            std::future::pending::<()>().await;
        })
        .await;
        let template = format!(
            "{}[proxy]\nidle_timeout = \"300ms\"\n{ONE_VERSION}",
            front.listener()
        );
        let weir = Weir::start(&template, &[("v1", &backend.url())]).await;
        let stream = TcpStream::connect(weir.proxy).await.unwrap();
        let (read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move {
            let head = format!(
                "POST /v1/upload HTTP/1.1\r\nHost: weir.test\r\nContent-Length: {BODY}\r\n\r\n"
            );
            write.write_all(head.as_bytes()).await?;
            let piece = vec![b'x'; 64 * 1024];
            for _ in 0..BODY / piece.len() {
                write.write_all(&piece).await?;
            }
            Ok::<_, std::io::Error>(write)
        });
        let mut client = Wire::new(read);
        let reply = client.response_to("POST").await;
        assert_error(&reply, 504, "timeout", Some("chat@v1"));
        assert!(
            reply.headers.closes(),
            "a 504 with the body unread keeps the connection: {:?}",
            reply.headers
        );
        let labels = [
            ("route", "chat"),
            ("version", "chat@v1"),
            ("kind", "timeout"),
        ];
        assert_eventually_eq!(
            weir.metric("weir_request_errors_total", &labels).await,
            Some(1.0),
            "weir_request_errors_total{labels:?}"
        );
        sender.abort();
        reply.status
    })
    .await;
}

// === responses ===

/// How the request the backend answers travels upstream: a GET is sent whole (by the fast path's
/// own exchange, or by `h1::forward` on the general path); a chunked POST streams, on both front
/// ends. Each response case runs over both.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Upstream {
    Whole,
    Streamed,
}

impl Upstream {
    /// The request for the case's answer.
    fn request(self) -> String {
        self.request_to("/v1/case")
    }

    fn request_to(self, target: &str) -> String {
        match self {
            Upstream::Whole => get_request(target),
            Upstream::Streamed => {
                post_with("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n")
                    .replace("/v1/upload", target)
            }
        }
    }

    /// What the echoing backend answers [`Upstream::request_to`] with.
    fn echoed(self, target: &str) -> String {
        match self {
            Upstream::Whole => format!("GET {target}"),
            Upstream::Streamed => format!("POST {target} hello"),
        }
    }
}

/// Every row once per [`Upstream`].
fn over_upstreams<R: Clone>(rows: Vec<R>) -> Vec<(R, Upstream)> {
    rows.into_iter()
        .flat_map(|row| [(row.clone(), Upstream::Whole), (row, Upstream::Streamed)])
        .collect()
}

/// A backend answering `/v1/case` with `answer` and anything else with `ok(describe)`.
async fn answering(front: FrontEnd, answer: &'static [u8]) -> Rig {
    Rig::start(front, "", move |req| {
        if req.target == "/v1/case" {
            answer.to_vec()
        } else {
            ok(describe(req))
        }
    })
    .await
}

#[tokio::test]
async fn a_response_naming_its_framing_header_in_connection_stays_framed() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nConnection: keep-alive, Content-Length\r\nContent-Length: 5\r\n\r\nhello",
    ];
    each_on_both(over_upstreams(rows), |front, (what, upstream)| async move {
        let rig = answering(front, what.as_bytes()).await;
        let mut client = rig.connect().await;
        // Pipelined: an unframed body would run into the second answer.
        client
            .write(upstream.request() + &get_request("/v1/next"))
            .await;
        let reply = client.response().await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "hello"),
            "{what}"
        );
        let next = client.response().await;
        assert_eq!(next.text(), "GET /v1/next", "{what}: the second answer");
        assert!(client.buf.is_empty(), "{what}: {:?}", client.buf);
        client.write(get_request("/v1/third")).await;
        assert_eq!(client.response().await.text(), "GET /v1/third", "{what}");
        reply.status
    })
    .await;
}

#[tokio::test]
async fn a_response_with_a_malformed_content_length_is_502_protocol() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5\u{a0}\r\n\r\nhello",
    ];
    each_on_both(over_upstreams(rows), |front, (what, upstream)| async move {
        let rig = answering(front, what.as_bytes()).await;
        let mut client = rig.connect().await;
        client.write(upstream.request()).await;
        let reply = client.response().await;
        assert_error(&reply, 502, "protocol", Some("chat@v1"));
        // The client's connection still carries a request, on a fresh upstream connection.
        client.write(get_request("/v1/next")).await;
        assert_eq!(client.response().await.text(), "GET /v1/next", "{what}");
        rig.assert_errors("protocol", 1.0).await;
        reply.status
    })
    .await;
}

#[tokio::test]
async fn identical_content_lengths_in_a_response_reach_the_client_as_one() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
    ];
    each_on_both(over_upstreams(rows), |front, (what, upstream)| async move {
        let rig = answering(front, what.as_bytes()).await;
        let mut client = rig.connect().await;
        client.write(upstream.request()).await;
        let reply = client.response().await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "hello"),
            "{what}"
        );
        assert_eq!(reply.headers.all("content-length"), ["5"], "{what}");
        client.write(get_request("/v1/next")).await;
        assert_eq!(client.response().await.text(), "GET /v1/next", "{what}");
        reply.status
    })
    .await;
}

/// RFC 9112 §6.3: Transfer-Encoding overrides Content-Length; the Content-Length (3 here, which
/// would leave the rest of the chunked body behind as the start of the next response) must not
/// reach the client.
#[tokio::test]
async fn a_response_with_transfer_encoding_and_content_length_is_framed_by_chunked_alone() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    each_on_both(over_upstreams(rows), |front, (what, upstream)| async move {
        let rig = answering(front, what.as_bytes()).await;
        let mut client = rig.connect().await;
        client
            .write(upstream.request() + &get_request("/v1/next"))
            .await;
        let reply = client.response().await;
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (200, "hello"),
            "{what}"
        );
        assert_eq!(
            reply.headers.all("content-length"),
            Vec::<&str>::new(),
            "{what}"
        );
        let next = client.response().await;
        assert_eq!(next.text(), "GET /v1/next", "{what}: leftover bytes");
        assert!(client.buf.is_empty(), "{what}: {:?}", client.buf);
        reply.status
    })
    .await;
}

#[tokio::test]
async fn a_response_with_a_transfer_coding_weir_does_not_decode_is_502_protocol() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    each_on_both(
        over_upstreams(rows),
        |front, (answer, upstream)| async move {
            let rig = answering(front, answer.as_bytes()).await;
            let mut client = rig.connect().await;
            client.write(upstream.request()).await;
            let reply = client.response().await;
            assert_error(&reply, 502, "protocol", Some("chat@v1"));
            rig.assert_errors("protocol", 1.0).await;
            reply.status
        },
    )
    .await;
}

/// The first response as far as it goes: `None` when the connection ended before a head, else
/// its 200 head's body, whole or cut off.
async fn first_response(client: &mut Wire<TcpStream>, what: &str) -> Option<Result<Vec<u8>, Cut>> {
    let head = tokio::time::timeout(DEADLINE, client.next_response_head("GET"))
        .await
        .unwrap_or_else(|_| panic!("{what}: neither a head nor a close within {DEADLINE:?}"))
        .unwrap_or_else(|why| panic!("{what}: the head: {why}"))?;
    assert_eq!(head.status, 200, "{what}");
    Some(
        tokio::time::timeout(DEADLINE, client.body(head.framing))
            .await
            .unwrap_or_else(|_| panic!("{what}: the broken body was never cut off")),
    )
}

/// After a cut: what of the body had arrived is (a prefix of) `body_before`, then the connection
/// ends with nothing after it that could be read as another response.
async fn assert_ends_after_cut(
    client: &mut Wire<TcpStream>,
    what: &str,
    cut: &Cut,
    body_before: &[u8],
) {
    assert!(
        body_before.starts_with(&cut.body),
        "{what}: the client got {:?} of the body, then {}",
        String::from_utf8_lossy(&cut.body),
        cut.why
    );
    let rest = tokio::time::timeout(DEADLINE, async {
        while let Ok(n) = client.fill().await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(
        rest.is_ok(),
        "{what}: the connection stays open after the cut"
    );
    let rest = String::from_utf8_lossy(&client.buf);
    assert!(
        !rest.contains("HTTP/1.1") && !rest.contains("smuggled"),
        "{what}: bytes after the cut read as a response: {rest:?}"
    );
}

/// A response cut off for the client: the head and what of the body had arrived (`body_before`,
/// or less of it), then the end of the connection, with nothing after it that could be read as
/// another response. A front end that closes before its head went out (hyper aborts a response
/// whose body fails at once) cuts it off too.
async fn assert_cut_off(client: &mut Wire<TcpStream>, what: &str, body_before: &[u8]) {
    let cut = match first_response(client, what).await {
        None => Cut {
            body: Vec::new(),
            why: "closed before the head".to_string(),
        },
        Some(Err(cut)) => cut,
        Some(Ok(body)) => panic!(
            "{what}: the body ended cleanly for the client: {:?}",
            String::from_utf8_lossy(&body)
        ),
    };
    assert_ends_after_cut(client, what, &cut, body_before).await;
}

/// RFC 9112 §7.1: chunk lines and trailer lines end in CRLF. Past a bare LF, a lenient parser
/// would find the end of the body and then a second response (`smuggled`): weir cuts the response
/// off there (counted as kind `body`), or (hyper's client, which takes a bare LF in a trailer as a
/// line end) ends it after its valid part; either way the bytes after it reach no client, on this
/// connection (a request pipelined behind) or on another (the same request again).
#[tokio::test]
async fn a_bare_lf_in_a_chunked_response_never_lets_the_bytes_after_it_reach_a_client() {
    let rows: Vec<(&str, &str)> = vec![
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a\nb\r\nhello\r\n0\r\n\r\n",
            "",
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
            "hello",
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
            "hello",
        ),
        (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
            "hello",
        ),
    ];
    each_on_both(
        over_upstreams(rows),
        |front, ((what, body_before), upstream)| async move {
            let rig = answering(front, what.as_bytes()).await;
            let mut client = rig.connect().await;
            client
                .write(upstream.request() + &get_request("/v1/next"))
                .await;
            match first_response(&mut client, what).await {
                Some(Ok(body)) => {
                    assert_eq!(
                        String::from_utf8_lossy(&body),
                        body_before,
                        "{what}: the body the client got"
                    );
                    let next = client.response().await;
                    assert_eq!(next.text(), "GET /v1/next", "{what}: the next answer");
                }
                Some(Err(cut)) => {
                    assert_ends_after_cut(&mut client, what, &cut, body_before.as_bytes()).await;
                    rig.assert_errors("body", 1.0).await;
                }
                None => {
                    let cut = Cut {
                        body: Vec::new(),
                        why: "closed before the head".to_string(),
                    };
                    assert_ends_after_cut(&mut client, what, &cut, body_before.as_bytes()).await;
                    rig.assert_errors("body", 1.0).await;
                }
            }
            let mut again = rig.connect().await;
            again.write(upstream.request_to("/v1/again")).await;
            let reply = again.response_to("POST").await;
            assert_eq!(
                (reply.status, reply.text()),
                (200, upstream.echoed("/v1/again")),
                "{what}: the next request on the same upstream path"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn a_backend_breaking_off_mid_body_cuts_the_response_off_and_counts_kind_body() {
    let rows: Vec<&str> = vec![
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello",
    ];
    each_on_both(over_upstreams(rows), |front, (what, upstream)| async move {
        // Answers, then closes the connection.
        let backend = WireBackend::start(move |mut wire, _| async move {
            if wire.request().await.is_ok() {
                let _ = wire.send(what.as_bytes()).await;
            }
        })
        .await;
        let template = format!("{}{ONE_VERSION}", front.listener());
        let weir = Weir::start(&template, &[("v1", &backend.url())]).await;
        let mut client = Wire::connect(weir.proxy).await;
        client.write(upstream.request()).await;
        assert_cut_off(&mut client, what, b"hello").await;
        let labels = [("route", "chat"), ("version", "chat@v1"), ("kind", "body")];
        assert_eventually_eq!(
            weir.metric("weir_request_errors_total", &labels).await,
            Some(1.0),
            "weir_request_errors_total{labels:?}"
        );
    })
    .await;
}

/// weir's own answer to a request it did not forward (here a refused version override) leaves
/// the connection open when the request's body was read whole with it: the pipelined request
/// behind it is served, for a chunked body and one of known length.
#[tokio::test]
async fn a_local_answer_to_a_request_whose_body_arrived_whole_keeps_the_connection() {
    const PINNABLE: &str = r#"
[[routes]]
name = "pinnable"
prefix = "/v1/pin"
stable = "chat@v1"
allow_override = true
"#;
    let rows = vec![
        ("Transfer-Encoding: chunked", "5\r\nhello\r\n0\r\n\r\n"),
        ("Content-Length: 5", "hello"),
    ];
    each_on_both(rows, |front, (framing, body)| async move {
        let rig = Rig::start(front, PINNABLE, |req| ok(describe(req))).await;
        let mut client = rig.connect().await;
        client
            .write(format!(
                "POST /v1/pin HTTP/1.1\r\nHost: weir.test\r\nx-weir-version: chat@v9\r\n{framing}\r\n\r\n{body}{}",
                get_request("/v1/next")
            ))
            .await;
        let refused = client.response_to("POST").await;
        assert_eq!(refused.status, 400, "{front:?} {framing}: {}", refused.text());
        assert_eq!(refused.json()["kind"], "bad_override");
        let next = client.response().await;
        assert_eq!(next.text(), "GET /v1/next", "{front:?} {framing}");
        rig.assert_forwarded(framing, &["GET /v1/next"]).await;
        refused.status
    })
    .await;
}
