//! The load tool for the passes no off-the-shelf tool measures the way the benchmarks need:
//! concurrent long-lived SSE streams whose events carry the time they were written
//! (`benches/streams.sh`), and fixed-rate, open-loop requests (the latency pass of
//! `benches/peers.sh`). Compiled and single-threaded, so one core runs the backend or the
//! clients of thousands of streams without becoming the thing measured.
//!
//! ```text
//! loadgen sse-backend ADDR EVENTS INTERVAL_MS
//!     An OpenAI-style streaming server: each POST is answered with EVENTS chat-completion
//!     chunks INTERVAL_MS apart, each carrying its write time ("t", ns since the Unix epoch) and
//!     its index ("k"), then `data: [DONE]`. Keep-alive, chunked.
//! loadgen sse-client ADDR STREAMS EVENTS SPREAD_MS
//!     Opens STREAMS streams at once (their starts spread evenly over SPREAD_MS), checks each
//!     delivers EVENTS events in order and [DONE], and prints one line:
//!     "events errors delay_p50_ms delay_p99_ms peak_open"
//!     where an event's delay is its arrival time minus the time the backend wrote into it.
//! loadgen rate ADDR RATE SECONDS CONNS PATH [BODY]
//!     Offers RATE requests/s for SECONDS over CONNS keep-alive connections (a GET, or a POST of
//!     BODY as JSON), each sent at its scheduled time whatever the answers before it did, and
//!     prints one line:
//!     "requests errors late p50_ms p99_ms p999_ms sched_p99_ms achieved_rps"
//!     Latency is from the write of a request to the last byte of its answer; `sched_p99` is
//!     measured from the time the request was due instead, so a proxy that falls behind shows
//!     there (as wrk2 counts it); `late` counts requests sent more than 5 ms after they were due
//!     (every connection was busy). The timer has a 1 ms tick, so requests leave in ticks of
//!     about RATE/1000: the same bursts for every target.
//! ```
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::sleep_until;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("missing argument {i}; see the usage at the top of benches/loadgen.rs");
            std::process::exit(2)
        })
    };
    let num = |i: usize| -> u64 {
        arg(i).parse().unwrap_or_else(|_| {
            eprintln!("argument {i} ({:?}) is not a number", arg(i));
            std::process::exit(2)
        })
    };
    match arg(0) {
        "sse-backend" => rt.block_on(sse_backend(
            addr(arg(1)),
            num(2),
            Duration::from_millis(num(3)),
        )),
        "sse-client" => rt.block_on(sse_client(
            addr(arg(1)),
            num(2),
            num(3),
            Duration::from_millis(num(4)),
        )),
        "rate" => {
            let body = args.get(6).cloned();
            rt.block_on(rate(
                addr(arg(1)),
                num(2),
                num(3),
                num(4),
                arg(5).to_string(),
                body,
            ))
        }
        other => {
            eprintln!("unknown mode {other:?}: sse-backend, sse-client or rate");
            std::process::exit(2)
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| {
        eprintln!("{s:?} is not an address such as 127.0.0.1:8080");
        std::process::exit(2)
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// --- SSE backend --------------------------------------------------------------------------

async fn sse_backend(addr: SocketAddr, events: u64, interval: Duration) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(addr)
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    // Thousands of streams connect within a second: a backlog the default 1,024 would overflow.
    let listener = socket.listen(16384).expect("listen");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_streams(stream, events, interval));
    }
}

/// Answers POSTs on one connection until the client closes it, or leaves it idle for 2 s: the
/// proxies keep their upstream connections pooled, and the passes would otherwise leave this
/// process holding every proxy's pool against its fd limit when the next target connects.
async fn serve_streams(mut s: TcpStream, events: u64, interval: Duration) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(2048);
    let mut out = Vec::with_capacity(256);
    loop {
        let (head, body) = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break (end + 4, content_length(&buf[..end]));
            }
            let idle = buf.is_empty();
            match tokio::time::timeout(Duration::from_secs(2), s.read_buf(&mut buf)).await {
                Ok(Ok(0)) => return Ok(()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) if idle => return Ok(()),
                Err(_) => {}
            }
        };
        while buf.len() < head + body {
            if s.read_buf(&mut buf).await? == 0 {
                return Ok(());
            }
        }
        buf.drain(..head + body);
        s.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await?;
        let start = tokio::time::Instant::now();
        for k in 0..events {
            sleep_until(start + interval * k as u32).await;
            let data = format!(
                "data: {{\"id\":\"chatcmpl-weir\",\"object\":\"chat.completion.chunk\",\"model\":\"chat\",\
                 \"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"tok\"}},\"finish_reason\":null}}],\
                 \"t\":{},\"k\":{k}}}\n\n",
                now_ns()
            );
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            out.extend_from_slice(data.as_bytes());
            out.extend_from_slice(b"\r\n");
            s.write_all(&out).await?;
        }
        s.write_all(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n").await?;
    }
}

fn content_length(head: &[u8]) -> usize {
    head.split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = std::str::from_utf8(line).ok()?.trim();
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .next()
        .unwrap_or(0)
}

// --- chunked decoding, shared by both clients ----------------------------------------------

/// Decodes a chunked body incrementally: `feed` takes what is buffered and appends the decoded
/// data, leaving an incomplete chunk in place for the next read.
#[derive(Default)]
struct Chunked {
    /// Bytes of the current chunk's data still to come (plus its CRLF), once its size is read.
    left: usize,
    done: bool,
}

impl Chunked {
    /// Consumes from `raw` what forms whole chunk lines and data; appends data to `out`.
    fn feed(&mut self, raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        let mut at = 0;
        while !self.done {
            if self.left > 0 {
                let crlf = self.left.min(2);
                let avail = raw.len() - at;
                let to_data = avail.min(self.left - crlf);
                out.extend_from_slice(&raw[at..at + to_data]);
                let to_crlf = (avail - to_data).min(crlf);
                let expected = &b"\r\n"[2 - crlf..2 - crlf + to_crlf];
                if raw[at + to_data..at + to_data + to_crlf] != *expected {
                    return Err("chunk data not followed by CRLF".into());
                }
                at += to_data + to_crlf;
                self.left -= to_data + to_crlf;
                if self.left > 0 {
                    break;
                }
                continue;
            }
            let Some(nl) = find(&raw[at..], b"\r\n") else {
                break;
            };
            let line = std::str::from_utf8(&raw[at..at + nl]).map_err(|_| "chunk size not text")?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                let Some(end) = find(&raw[at + nl..], b"\r\n\r\n") else {
                    break;
                };
                at += nl + end + 4;
                self.done = true;
                break;
            }
            at += nl + 2;
            self.left = size + 2;
        }
        raw.drain(..at);
        Ok(())
    }
}

struct Head {
    status: u16,
    chunked: bool,
    length: Option<usize>,
    len: usize,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            let mut chunked = false;
            let mut length = None;
            for h in resp.headers.iter() {
                if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = h.value.eq_ignore_ascii_case(b"chunked");
                } else if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse().ok());
                }
            }
            Ok(Some(Head {
                status: resp.code.unwrap_or(0),
                chunked,
                length,
                len,
            }))
        }
        Err(e) => Err(format!("bad response head: {e}")),
    }
}

// --- SSE client ---------------------------------------------------------------------------

async fn sse_client(addr: SocketAddr, streams: u64, events: u64, spread: Duration) {
    let open = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let begin = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            let open = open.clone();
            let at = begin + spread.mul_f64(i as f64 / streams.max(1) as f64);
            tokio::spawn(async move {
                sleep_until(at).await;
                one_stream(addr, events, &open).await
            })
        })
        .collect();
    let (mut delays, mut got, mut errors) = (Vec::new(), 0u64, 0u64);
    let mut first_error = None;
    for t in tasks {
        match t.await.expect("stream task") {
            Ok(d) => {
                got += d.len() as u64;
                delays.extend(d);
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("sse-client: {errors} streams failed; the first: {e}");
    }
    delays.sort_unstable();
    println!(
        "{got} {errors} {:.3} {:.3} {}",
        quantile(&delays, 0.5) / 1000.0,
        quantile(&delays, 0.99) / 1000.0,
        open.1.load(Ordering::Relaxed)
    );
}

/// One stream: the delays of its events in microseconds, or what went wrong.
async fn one_stream(
    addr: SocketAddr,
    events: u64,
    open: &(AtomicUsize, AtomicUsize),
) -> Result<Vec<u32>, String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let now_open = open.0.fetch_add(1, Ordering::Relaxed) + 1;
    open.1.fetch_max(now_open, Ordering::Relaxed);
    let result = read_stream(&mut s, events).await;
    open.0.fetch_sub(1, Ordering::Relaxed);
    result
}

async fn read_stream(s: &mut TcpStream, events: u64) -> Result<Vec<u32>, String> {
    let _ = s.set_nodelay(true);
    let body = br#"{"model":"chat","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(&[req.as_bytes(), body].concat())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::with_capacity(4096);
    let head = loop {
        if s.read_buf(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err("closed before the response head".into());
        }
        if let Some(h) = parse_head(&raw)? {
            break h;
        }
    };
    if head.status != 200 || !head.chunked {
        return Err(format!("status {} chunked {}", head.status, head.chunked));
    }
    raw.drain(..head.len);
    let (mut chunked, mut data) = (Chunked::default(), Vec::with_capacity(1024));
    let (mut delays, mut seen, mut done) = (Vec::with_capacity(events as usize), 0u64, false);
    loop {
        let arrived = now_ns();
        chunked.feed(&mut raw, &mut data)?;
        let mut at = 0;
        while let Some(end) = find(&data[at..], b"\n\n") {
            let event = &data[at..at + end];
            at += end + 2;
            if event == b"data: [DONE]" {
                done = true;
                continue;
            }
            let (t, k) = (field(event, b"\"t\":"), field(event, b"\"k\":"));
            let (Some(t), Some(k)) = (t, k) else {
                return Err(format!(
                    "event without t and k: {:?}",
                    String::from_utf8_lossy(event)
                ));
            };
            if k != seen {
                return Err(format!("event {k} where {seen} was due"));
            }
            seen += 1;
            delays.push((arrived.saturating_sub(t) / 1000).min(u32::MAX as u64) as u32);
        }
        data.drain(..at);
        if chunked.done {
            break;
        }
        if s.read_buf(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?
            == 0
        {
            return Err(format!("closed after {seen} of {events} events"));
        }
    }
    if seen != events || !done {
        return Err(format!("{seen} of {events} events, [DONE] {done}"));
    }
    Ok(delays)
}

/// The unsigned integer after `key` in an event.
fn field(event: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(event, key)? + key.len();
    let digits = event[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&event[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

fn quantile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)] as f64
}

// --- fixed-rate client --------------------------------------------------------------------

#[derive(Default)]
struct RateResult {
    latency: Vec<u32>,
    scheduled: Vec<u32>,
    errors: u64,
    late: u64,
}

async fn rate(
    addr: SocketAddr,
    rate: u64,
    seconds: u64,
    conns: u64,
    path: String,
    body: Option<String>,
) {
    let total = rate * seconds;
    let req: Arc<[u8]> = match &body {
        None => format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes().into(),
        Some(b) => format!(
            "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
        .into_bytes()
        .into(),
    };
    let next = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            let (req, next) = (req.clone(), next.clone());
            tokio::spawn(async move { rate_conn(addr, &req, &next, total, rate, start).await })
        })
        .collect();
    let mut all = RateResult::default();
    for t in tasks {
        let r = t.await.expect("connection task");
        all.latency.extend(r.latency);
        all.scheduled.extend(r.scheduled);
        all.errors += r.errors;
        all.late += r.late;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latency.sort_unstable();
    all.scheduled.sort_unstable();
    println!(
        "{} {} {} {:.3} {:.3} {:.3} {:.3} {:.0}",
        all.latency.len(),
        all.errors,
        all.late,
        quantile(&all.latency, 0.5) / 1000.0,
        quantile(&all.latency, 0.99) / 1000.0,
        quantile(&all.latency, 0.999) / 1000.0,
        quantile(&all.scheduled, 0.99) / 1000.0,
        all.latency.len() as f64 / elapsed
    );
}

/// One keep-alive connection taking the next due request whenever it is free.
async fn rate_conn(
    addr: SocketAddr,
    req: &[u8],
    next: &AtomicU64,
    total: u64,
    rate: u64,
    start: tokio::time::Instant,
) -> RateResult {
    let mut r = RateResult::default();
    let mut conn: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(4096);
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return r;
        }
        let due = start + Duration::from_nanos(i * 1_000_000_000 / rate);
        sleep_until(due).await;
        let s = match &mut conn {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    conn.insert(s)
                }
                Err(_) => {
                    r.errors += 1;
                    continue;
                }
            },
        };
        let sent = tokio::time::Instant::now();
        if sent.saturating_duration_since(due) > Duration::from_millis(5) {
            r.late += 1;
        }
        match exchange(s, req, &mut buf).await {
            Ok(200..=299) => {
                let end = tokio::time::Instant::now();
                r.latency
                    .push((end - sent).as_micros().min(u32::MAX as u128) as u32);
                r.scheduled
                    .push((end - due).as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(_) | Err(_) => {
                r.errors += 1;
                conn = None;
                buf.clear();
            }
        }
    }
}

/// Writes one request and reads its whole answer; the status.
async fn exchange(s: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<u16, String> {
    s.write_all(req).await.map_err(|e| e.to_string())?;
    let head = loop {
        if let Some(h) = parse_head(buf)? {
            break h;
        }
        if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed".into());
        }
    };
    buf.drain(..head.len);
    if head.chunked {
        let (mut c, mut sink) = (Chunked::default(), Vec::new());
        loop {
            c.feed(buf, &mut sink)?;
            sink.clear();
            if c.done {
                break;
            }
            if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed mid-body".into());
            }
        }
    } else {
        let len = head.length.ok_or("answer without a length")?;
        while buf.len() < len {
            if s.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed mid-body".into());
            }
        }
        buf.drain(..len);
    }
    Ok(head.status)
}
