//! Property (issue 16): for generated sequences of requests — valid and invalid heads, Content-
//! Length and Transfer-Encoding combinations, chunk sizes and extensions — pipelined in one
//! stream that reaches weir in pieces cut at random points, through both front ends:
//!
//! - weir answers each request in order, and stops at the first one it must refuse (a local
//!   4xx/5xx with `Connection: close`, then the end of the connection); every valid request
//!   before it is answered by the backend, with that request's own answer;
//! - what the backend receives parses, with the test's own strict parser, as exactly the requests
//!   the backend answered, in order, each as the client sent it;
//! - what the client receives parses as exactly one response per answered request, in order,
//!   whatever framing the backend chose (Content-Length, chunked with extensions, close);
//! - both front ends answer every sequence with the same statuses.
//!
//! One weir per front end and one backend serve every case; 32 cases (`PROPTEST_CASES=N` for more).

mod common;

use std::time::Duration;

use common::wire::*;
use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// How long one sequence may take on one front end before the case fails.
const CASE_DEADLINE: Duration = Duration::from_secs(5);

// === generated requests ===

#[derive(Clone, Debug)]
enum Body {
    None,
    Length(Vec<u8>),
    /// Chunks with their extension (`""` for none), and whether a trailer follows.
    Chunked(Vec<(Vec<u8>, &'static str)>, bool),
}

impl Body {
    /// The body's content, as the backend must receive it.
    fn payload(&self) -> Vec<u8> {
        match self {
            Body::None => Vec::new(),
            Body::Length(data) => data.clone(),
            Body::Chunked(chunks, _) => chunks.iter().flat_map(|(c, _)| c.clone()).collect(),
        }
    }

    fn chunked(chunks: &[(Vec<u8>, &str)], trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for (data, ext) in chunks {
            out.extend_from_slice(format!("{:x}{ext}\r\n", data.len()).as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n");
        if trailer {
            out.extend_from_slice(b"x-trailer: 1\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

/// What makes a request unusual: variations weir must forward, and flaws it must refuse.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Flaw {
    None,
    /// `Connection: content-length, transfer-encoding, host` (forwarded, framing intact).
    ConnectionNamesFraming,
    /// The Content-Length line twice (forwarded with one).
    SameLengthTwice,
    /// A Content-Length that is not `1*DIGIT`.
    BadLength(&'static str),
    DifferingLengths,
    LengthAndChunked,
    ChunkedTwice,
    /// `gzip, chunked`.
    UnknownCoding,
    TwoHosts,
    NoHost,
    BadHost,
    /// A case variant of a standard method.
    MethodCase,
    /// A chunk-size line that is not hex, after `at` valid chunks.
    BadChunkSize(usize),
    /// A bare LF ending a chunk-size line, after `at` valid chunks.
    BareLfChunkLine(usize),
}

impl Flaw {
    fn refused(self) -> bool {
        !matches!(
            self,
            Flaw::None | Flaw::ConnectionNamesFraming | Flaw::SameLengthTwice
        )
    }
}

#[derive(Clone, Debug)]
struct Generated {
    method: &'static str,
    body: Body,
    flaw: Flaw,
    /// How the backend frames its answer: one of [`ANSWERS`].
    answer: &'static str,
}

fn body() -> impl Strategy<Value = Body> {
    let data = || proptest::collection::vec(any::<u8>(), 1..24);
    let ext = prop_oneof![
        Just(""),
        Just(";a=b"),
        Just(";x"),
        Just(" ;q=\"v;w\""),
        Just(";n=1;m")
    ];
    prop_oneof![
        Just(Body::None),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Body::Length),
        (
            proptest::collection::vec((data(), ext), 0..4),
            any::<bool>()
        )
            .prop_map(|(chunks, trailer)| Body::Chunked(chunks, trailer)),
    ]
}

fn flaw() -> impl Strategy<Value = Flaw> {
    let bad_length = prop_oneof![
        Just("+5"),
        Just("-1"),
        Just("5x"),
        Just("0x5"),
        Just("5 5"),
        Just("5, 5"),
        Just("99999999999999999999999"),
        Just("5\u{a0}"),
    ];
    prop_oneof![
        8 => Just(Flaw::None),
        2 => Just(Flaw::ConnectionNamesFraming),
        1 => Just(Flaw::SameLengthTwice),
        1 => bad_length.prop_map(Flaw::BadLength),
        1 => Just(Flaw::DifferingLengths),
        1 => Just(Flaw::LengthAndChunked),
        1 => Just(Flaw::ChunkedTwice),
        1 => Just(Flaw::UnknownCoding),
        1 => Just(Flaw::TwoHosts),
        1 => Just(Flaw::NoHost),
        1 => Just(Flaw::BadHost),
        1 => Just(Flaw::MethodCase),
        1 => (0usize..3).prop_map(Flaw::BadChunkSize),
        1 => (0usize..3).prop_map(Flaw::BareLfChunkLine),
    ]
}

fn generated() -> impl Strategy<Value = Generated> {
    (
        prop_oneof![
            Just("GET"),
            Just("POST"),
            Just("PUT"),
            Just("HEAD"),
            Just("DELETE"),
            Just("PURGE")
        ],
        body(),
        flaw(),
        proptest::sample::select(ANSWERS),
    )
        .prop_map(|(method, body, flaw, answer)| Generated {
            method,
            body,
            flaw,
            answer,
        })
}

/// A few requests, and where the stream of their bytes is cut into writes.
fn sequence() -> impl Strategy<Value = (Vec<Generated>, Vec<Index>)> {
    (
        proptest::collection::vec(generated(), 1..5),
        proptest::collection::vec(any::<Index>(), 0..5),
    )
}

impl Generated {
    /// The method as sent.
    fn wire_method(&self) -> String {
        match (self.flaw, self.method) {
            (Flaw::MethodCase, "PURGE") => "Get".to_string(),
            (Flaw::MethodCase, m) => m.to_ascii_lowercase(),
            (_, m) => m.to_string(),
        }
    }

    /// The request as bytes: `seq` numbers it, in its target and in `x-seq`.
    fn render(&self, seq: usize) -> Vec<u8> {
        let payload = self.body.payload();
        let chunked_flaw = matches!(
            self.flaw,
            Flaw::LengthAndChunked
                | Flaw::ChunkedTwice
                | Flaw::UnknownCoding
                | Flaw::BadChunkSize(_)
                | Flaw::BareLfChunkLine(_)
        );
        if chunked_flaw && !matches!(self.body, Body::Chunked(..)) {
            // A flaw of chunked framing: the body goes chunked.
            let chunks = if payload.is_empty() {
                Vec::new()
            } else {
                vec![(payload, "")]
            };
            let as_chunked = Generated {
                body: Body::Chunked(chunks, false),
                ..self.clone()
            };
            return as_chunked.render(seq);
        }
        let mut head = format!("{} /v1/p{seq} HTTP/1.1\r\n", self.wire_method());
        match self.flaw {
            Flaw::NoHost => {}
            Flaw::TwoHosts => head.push_str("Host: weir.test\r\nHost: evil.test\r\n"),
            Flaw::BadHost => head.push_str("Host: evil@weir.test\r\n"),
            _ => head.push_str("Host: weir.test\r\n"),
        }
        head.push_str(&format!("x-seq: {seq}\r\nx-answer: {}\r\n", self.answer));
        if self.flaw == Flaw::ConnectionNamesFraming {
            head.push_str("Connection: content-length, transfer-encoding, host\r\n");
        }
        let (framing, body) = match (&self.body, self.flaw) {
            (_, Flaw::BadLength(value)) => (format!("Content-Length: {value}\r\n"), payload),
            (_, Flaw::DifferingLengths) => (
                format!(
                    "Content-Length: {}\r\nContent-Length: {}\r\n",
                    payload.len(),
                    payload.len() + 1
                ),
                payload,
            ),
            (_, Flaw::SameLengthTwice) => (
                format!(
                    "Content-Length: {0}\r\nContent-Length: {0}\r\n",
                    payload.len()
                ),
                payload,
            ),
            (Body::Chunked(chunks, trailer), flaw) => {
                let te = match flaw {
                    Flaw::ChunkedTwice => "chunked, chunked",
                    Flaw::UnknownCoding => "gzip, chunked",
                    _ => "chunked",
                };
                let body = match flaw {
                    Flaw::BadChunkSize(at) | Flaw::BareLfChunkLine(at) => {
                        let mut body = Body::chunked(&chunks[..at.min(chunks.len())], false);
                        body.truncate(body.len() - b"0\r\n\r\n".len());
                        body.extend_from_slice(if matches!(flaw, Flaw::BadChunkSize(_)) {
                            b"zz\r\nhello\r\n0\r\n\r\n"
                        } else {
                            b"5\nhello\r\n0\r\n\r\n"
                        });
                        body
                    }
                    _ => Body::chunked(chunks, *trailer),
                };
                let mut framing = format!("Transfer-Encoding: {te}\r\n");
                if flaw == Flaw::LengthAndChunked {
                    framing.push_str(&format!("Content-Length: {}\r\n", body.len()));
                }
                (framing, body)
            }
            (Body::Length(_), _) => (format!("Content-Length: {}\r\n", payload.len()), payload),
            (Body::None, _) => (String::new(), Vec::new()),
        };
        let mut out = head.into_bytes();
        out.extend_from_slice(framing.as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        out
    }

    /// What the backend answers this request with, as text.
    fn answer_text(&self, seq: usize) -> String {
        format!(
            "{} /v1/p{seq} {}",
            self.method,
            sha256(&self.body.payload())
        )
    }
}

// === the backend ===

/// How the backend frames an answer: by Content-Length, chunked (with an extension), by closing
/// the connection, with the Content-Length line twice, with Transfer-Encoding beside a wrong
/// Content-Length, with `Connection: content-length`; and with a malformed Content-Length, which
/// weir answers with its own 502.
const ANSWERS: &[&str] = &[
    "cl", "chunked", "close", "dup-cl", "te-cl", "conn-cl", "bad-cl",
];

/// Answers each request with `METHOD target sha256(body)`, framed as its `x-answer` asks, and
/// `x-seq` copied; records the requests, and closes after a close-delimited answer.
async fn backend() -> (WireBackend, Requests) {
    let requests = Requests::default();
    let log = requests.clone();
    let backend = WireBackend::start(move |mut wire, _| {
        let log = log.clone();
        async move {
            loop {
                let request = match wire.next_request().await {
                    Ok(Some(request)) => request,
                    Ok(None) => return,
                    Err(why) => {
                        log.push_garbage(format!(
                            "{why}; unparsed {:?}",
                            String::from_utf8_lossy(&wire.buf)
                        ));
                        return;
                    }
                };
                let text = format!(
                    "{} {} {}",
                    request.method,
                    request.target,
                    sha256(&request.body)
                );
                let seq = request.headers.get("x-seq").unwrap_or("none").to_string();
                let framing = request.headers.get("x-answer").unwrap_or("cl").to_string();
                let head_only = request.method == "HEAD";
                log.push(request);
                let mut out = format!("HTTP/1.1 200 OK\r\nx-seq: {seq}\r\n");
                let chunked = |text: &str| {
                    let (a, b) = text.split_at(text.len() / 2);
                    format!(
                        "{:x};part=1\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                };
                let length = text.len();
                let body = match framing.as_str() {
                    "chunked" => {
                        out.push_str("Transfer-Encoding: chunked\r\n");
                        chunked(&text)
                    }
                    "te-cl" => {
                        out.push_str("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n");
                        chunked(&text)
                    }
                    "close" => text,
                    "dup-cl" => {
                        out.push_str(&format!(
                            "Content-Length: {length}\r\nContent-Length: {length}\r\n"
                        ));
                        text
                    }
                    "conn-cl" => {
                        out.push_str(&format!(
                            "Connection: content-length\r\nContent-Length: {length}\r\n"
                        ));
                        text
                    }
                    "bad-cl" => {
                        out.push_str(&format!("Content-Length: +{length}\r\n"));
                        text
                    }
                    _ => {
                        out.push_str(&format!("Content-Length: {length}\r\n"));
                        text
                    }
                };
                out.push_str("\r\n");
                if !head_only {
                    out.push_str(&body);
                }
                if wire.send(out).await.is_err() || framing == "close" {
                    return;
                }
            }
        }
    })
    .await;
    (backend, requests)
}

// === one case ===

/// A response for a message: status, headers and body as text.
fn show(response: &RawResponse) -> String {
    format!(
        "{} {:?} {:?}",
        response.status,
        response.headers.0,
        response.text()
    )
}

/// What one front end answered a sequence: each response's status.
type Statuses = Vec<u16>;

/// Sends the sequence (and a last `Connection: close` request) to weir at `addr` in pieces,
/// checks the answers and what the backend received; returns the statuses.
async fn run_sequence(
    addr: std::net::SocketAddr,
    requests: &Requests,
    sequence: &[Generated],
    cuts: &[Index],
) -> Result<Statuses, String> {
    let mut all: Vec<Generated> = sequence.to_vec();
    all.push(Generated {
        method: "GET",
        body: Body::None,
        flaw: Flaw::None,
        answer: "cl",
    });
    let mut bytes = Vec::new();
    for (seq, request) in all.iter().enumerate() {
        let mut rendered = request.render(seq);
        if seq == all.len() - 1 {
            // The last request ends the connection once answered.
            let at = rendered.len() - 2;
            rendered.splice(at..at, b"Connection: close\r\n".iter().copied());
        }
        bytes.extend(rendered);
    }
    let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len())).collect();
    cuts.push(bytes.len());
    cuts.sort_unstable();

    let before = requests.count();
    let garbage_before = requests.garbage().len();
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut from = 0;
        for to in cuts {
            if write.write_all(&bytes[from..to]).await.is_err() {
                return; // weir closed: the rest is not read
            }
            from = to;
            tokio::task::yield_now().await;
        }
        let _ = write.flush().await;
        // Keep the write half open until weir closes: a half-close is not part of the case.
        std::future::pending::<()>().await;
    });
    let mut client = Wire::new(read);
    let mut responses = Vec::new();
    let read_all = async {
        for request in &all {
            match client.next_response(&request.wire_method()).await {
                Ok(Some(response)) => responses.push(response),
                Ok(None) => return Ok(()),
                Err(why) => return Err(why),
            }
        }
        client.ends().await
    };
    let read = tokio::time::timeout(CASE_DEADLINE, read_all).await;
    writer.abort();
    match read {
        Err(_) => {
            return Err(format!(
                "weir had answered {} of {} requests after {CASE_DEADLINE:?}",
                responses.len(),
                all.len()
            ))
        }
        Ok(Err(why)) => {
            return Err(format!(
                "after {} responses the client's stream is broken: {why}",
                responses.len()
            ))
        }
        Ok(Ok(())) => {}
    }

    // Answered in order up to the first refused request, which ends the connection.
    let expected = all
        .iter()
        .position(|r| r.flaw.refused())
        .map_or(all.len(), |i| i + 1);
    if responses.len() != expected {
        return Err(format!(
            "{} responses ({:?}), expected {expected}",
            responses.len(),
            responses.iter().map(|r| r.status).collect::<Vec<_>>()
        ));
    }
    for (seq, (request, response)) in all.iter().zip(&responses).enumerate() {
        if request.flaw.refused() {
            let local = response.headers.get("x-seq").is_none()
                && (400..600).contains(&response.status)
                && response.headers.closes();
            if !local {
                return Err(format!(
                    "request {seq} ({:?}) got {}, not a refusal with Connection: close",
                    request.flaw,
                    show(response)
                ));
            }
        } else if request.answer == "bad-cl" {
            // weir's answer to a HEAD request has no body to name the kind in.
            let protocol = response.status == 502
                && response.headers.get("x-seq").is_none()
                && (request.method == "HEAD" && response.body.is_empty()
                    || serde_json::from_slice::<serde_json::Value>(&response.body)
                        .is_ok_and(|json| json["kind"] == "protocol"));
            if !protocol {
                return Err(format!(
                    "request {seq} answered with a malformed Content-Length got {}, not 502 protocol",
                    show(response)
                ));
            }
        } else {
            let want = if request.method == "HEAD" {
                String::new()
            } else {
                request.answer_text(seq)
            };
            let got = (
                response.status,
                response.headers.get("x-seq"),
                response.text(),
            );
            if got != (200, Some(seq.to_string().as_str()), want.clone()) {
                return Err(format!(
                    "request {seq} got {}, not its own answer {want:?}",
                    show(response)
                ));
            }
        }
    }

    // The backend received exactly the answered requests, as sent.
    let forwarded: Vec<&Generated> = all.iter().take_while(|r| !r.flaw.refused()).collect();
    let seen = requests.since(before);
    let described = |r: &RawRequest| {
        (
            r.method.clone(),
            r.target.clone(),
            r.headers.get("x-seq").map(str::to_string),
            r.headers.all("host").join(","),
            sha256(&r.body),
        )
    };
    let want: Vec<_> = forwarded
        .iter()
        .enumerate()
        .map(|(seq, r)| {
            (
                r.method.to_string(),
                format!("/v1/p{seq}"),
                Some(seq.to_string()),
                "weir.test".to_string(),
                sha256(&r.body.payload()),
            )
        })
        .collect();
    let got: Vec<_> = seen.iter().map(described).collect();
    if got != want {
        return Err(format!("the backend received {got:?}, expected {want:?}"));
    }
    let garbage = requests.garbage();
    if garbage.len() != garbage_before {
        return Err(format!(
            "the backend could not parse {:?}",
            &garbage[garbage_before..]
        ));
    }
    Ok(responses.iter().map(|r| r.status).collect())
}

#[test]
fn every_pipelined_sequence_reaches_the_backend_exactly_as_weir_answered_it() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (backend, requests, weirs) = runtime.block_on(async {
        let (backend, requests) = backend().await;
        let mut weirs = Vec::new();
        for switch in ["", "http1_fast_path = false\n"] {
            let template = format!("[listener]\naddr = \"127.0.0.1:0\"\n{switch}{ONE_VERSION}");
            weirs.push(Weir::start(&template, &[("v1", &backend.url())]).await);
        }
        (backend, requests, weirs)
    });
    let mut runner = TestRunner::new(Config {
        // PROPTEST_CASES=N runs more (CI runs 32).
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(32),
        failure_persistence: None,
        max_shrink_iters: 256,
        max_shrink_time: 60_000,
        ..Config::default()
    });
    let result = runner.run(&sequence(), |(sequence, cuts)| {
        runtime.block_on(async {
            let mut statuses = Vec::new();
            let mut failures = Vec::new();
            for (front, weir) in ["fast path", "general path"].iter().zip(&weirs) {
                match run_sequence(weir.proxy, &requests, &sequence, &cuts).await {
                    Ok(answered) => statuses.push(answered),
                    Err(why) => failures.push(format!("{front}: {why}")),
                }
            }
            if !failures.is_empty() {
                return Err(TestCaseError::fail(failures.join("\n")));
            }
            prop_assert_eq!(
                &statuses[0],
                &statuses[1],
                "the fast path (left) and the general path (right) answer differently"
            );
            Ok(())
        })
    });
    drop(weirs);
    drop(backend);
    if let Err(e) = result {
        panic!("{e}");
    }
}
