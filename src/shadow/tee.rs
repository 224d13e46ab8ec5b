//! The hot-path side of shadowing: deciding to mirror a request, and teeing its request and
//! response bodies as they stream, without waiting and without unbounded buffering.
//!
//! Invariant: a client never waits for a shadow. Tees copy `Bytes` handles (no byte copies) up to
//! the cap and give up beyond it; the shadow itself runs in its own task
//! ([`super::task`]), holding one of a fixed number of permits.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use prometheus::{Gauge, GaugeVec, IntCounter, IntGauge, IntGaugeVec};
use tokio::sync::oneshot;

use crate::config::{Comparator, CompareConfig, AGREEMENT_WINDOW};
use crate::shadow::compare::{Answer, Verdict};
use crate::upstream::Version;

/// What a mirrored request needs from the routing decision.
#[derive(Debug)]
pub struct ShadowPlan {
    pub route: Arc<str>,
    pub stable: Arc<str>,
    pub candidate: Arc<Version>,
    pub shadow: Arc<ShadowRoute>,
    /// On routes that route by model: the JSON string token the shadow body's `model` gets
    /// (the candidate's `served_model`, else what the client sent), whatever stable was sent.
    pub model: Option<Bytes>,
}

impl ShadowPlan {
    /// On a route by model: the shadow body's `model` becomes the candidate's `served_model`,
    /// else `client`'s token (what the client sent), whatever stable was sent.
    pub fn name_model(&mut self, client: &[u8]) {
        let token = self.candidate.served_model.as_deref().unwrap_or(client);
        self.model = Some(Bytes::copy_from_slice(token));
    }
}

/// What happened to one mirror decision: exactly one outcome is counted per decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MirrorOutcome {
    /// The shadow request was sent and answered.
    Sent,
    /// Not mirrored: the in-flight shadow limit was reached, or the client went away first.
    Dropped,
    /// Not mirrored: the request body is larger than the cap.
    TooLarge,
    /// Sent, but the candidate refused, reset or answered garbage.
    Failed,
    /// Sent, but no complete answer within the shadow timeout.
    Timeout,
}

impl MirrorOutcome {
    pub const ALL: [MirrorOutcome; 5] = [
        MirrorOutcome::Sent,
        MirrorOutcome::Dropped,
        MirrorOutcome::TooLarge,
        MirrorOutcome::Failed,
        MirrorOutcome::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MirrorOutcome::Sent => "sent",
            MirrorOutcome::Dropped => "dropped",
            MirrorOutcome::TooLarge => "too_large",
            MirrorOutcome::Failed => "failed",
            MirrorOutcome::Timeout => "timeout",
        }
    }
}

/// Counters of one (route, candidate), kept across table rebuilds so the rolling agreement
/// survives weight changes.
#[derive(Debug)]
pub struct ShadowStats {
    pub outcomes: [IntCounter; 5],
    /// Indexed by comparator (`Comparator::ALL` order), then verdict (agree, disagree, error).
    pub comparisons: [[IntCounter; 3]; 5],
    /// Overall verdicts of the last comparisons; cold, touched by shadow tasks only.
    rolling: Mutex<Rolling>,
}

/// The last [`AGREEMENT_WINDOW`] overall verdicts (true: every comparator agreed), and their
/// export as gauges.
#[derive(Debug)]
struct Rolling {
    verdicts: VecDeque<bool>,
    agreed: usize,
    gauges: AgreementGauges,
}

/// `weir_mirror_agreement_ratio` and `weir_mirror_agreement_comparisons` of one (route,
/// candidate). The series are created at the first comparison: before it there is no agreement
/// to show (a ratio exported at 0 would read as "nothing agrees").
#[derive(Debug)]
pub struct AgreementGauges {
    families: (GaugeVec, IntGaugeVec),
    labels: [String; 2],
    series: Option<(Gauge, IntGauge)>,
}

impl AgreementGauges {
    pub fn new(ratio: GaugeVec, window: IntGaugeVec, route: &str, version: &str) -> Self {
        AgreementGauges {
            families: (ratio, window),
            labels: [route.to_string(), version.to_string()],
            series: None,
        }
    }

    fn set(&mut self, agreed: usize, n: usize) {
        let (ratio, window) = self.series.get_or_insert_with(|| {
            let labels = [self.labels[0].as_str(), self.labels[1].as_str()];
            (
                self.families.0.with_label_values(&labels),
                self.families.1.with_label_values(&labels),
            )
        });
        ratio.set(agreed as f64 / n as f64);
        window.set(n as i64);
    }
}

impl ShadowStats {
    pub fn new(
        outcomes: [IntCounter; 5],
        comparisons: [[IntCounter; 3]; 5],
        gauges: AgreementGauges,
    ) -> ShadowStats {
        ShadowStats {
            outcomes,
            comparisons,
            rolling: Mutex::new(Rolling {
                verdicts: VecDeque::with_capacity(AGREEMENT_WINDOW),
                agreed: 0,
                gauges,
            }),
        }
    }

    pub fn count(&self, outcome: MirrorOutcome) {
        self.outcomes[MirrorOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(0)]
        .inc();
    }

    pub fn count_comparison(&self, comparator: Comparator, verdict: Verdict) {
        let c = Comparator::ALL
            .iter()
            .position(|x| *x == comparator)
            .unwrap_or(0);
        let v = match verdict {
            Verdict::Agree => 0,
            Verdict::Disagree => 1,
            Verdict::Error => 2,
        };
        self.comparisons[c][v].inc();
    }

    /// Records one comparison's overall verdict: agreed when every comparator agreed.
    pub fn record_agreement(&self, agreed: bool) {
        let mut rolling = self.rolling.lock().unwrap_or_else(|p| p.into_inner());
        if rolling.verdicts.len() == AGREEMENT_WINDOW && rolling.verdicts.pop_front() == Some(true)
        {
            rolling.agreed -= 1;
        }
        rolling.verdicts.push_back(agreed);
        rolling.agreed += usize::from(agreed);
        let (agreed, n) = (rolling.agreed, rolling.verdicts.len());
        rolling.gauges.set(agreed, n);
    }

    /// Agreement rate over the last comparisons, and how many it covers.
    pub fn agreement(&self) -> (Option<f64>, usize) {
        let rolling = self.rolling.lock().unwrap_or_else(|p| p.into_inner());
        let n = rolling.verdicts.len();
        ((n > 0).then(|| rolling.agreed as f64 / n as f64), n)
    }
}

/// A route's shadowing, resolved when the table is built.
#[derive(Debug)]
pub struct ShadowRoute {
    /// Share of stable-routed requests mirrored, in basis points.
    pub mirror: u16,
    pub compare: Arc<CompareConfig>,
    pub stats: Arc<ShadowStats>,
}

// === impl Capped ===

/// Handles to the chunks of one body, up to a cap.
#[derive(Debug)]
struct Capped {
    chunks: Vec<Bytes>,
    size: u64,
    cap: u64,
}

impl Capped {
    fn new(cap: u64) -> Capped {
        Capped {
            chunks: Vec::new(),
            size: 0,
            cap,
        }
    }

    /// Keeps a handle to `chunk`; false (and nothing kept) once the body outgrows the cap.
    fn push(&mut self, chunk: &Bytes) -> bool {
        self.size += chunk.len() as u64;
        if self.size > self.cap {
            self.chunks.clear();
            return false;
        }
        self.chunks.push(chunk.clone());
        true
    }

    fn take(&mut self) -> Bytes {
        concat(std::mem::take(&mut self.chunks))
    }
}

// === impl RequestTee ===

/// Collects a request body as it streams to the stable backend, for the shadow.
#[derive(Debug)]
pub struct RequestTee {
    body: Capped,
    /// `Some(body)` at the end, `None` when the body outgrew the cap; dropped if the client left.
    done: Option<oneshot::Sender<Option<Bytes>>>,
}

impl RequestTee {
    pub fn new(cap: u64, done: oneshot::Sender<Option<Bytes>>) -> RequestTee {
        RequestTee {
            body: Capped::new(cap),
            done: Some(done),
        }
    }

    /// Still collecting (not finished, not over the cap): worth handing chunks to.
    pub fn is_open(&self) -> bool {
        self.done.is_some()
    }

    /// Keeps a handle to one chunk; gives up (and says so) past the cap.
    pub fn push(&mut self, chunk: &Bytes) {
        if self.done.is_some() && !self.body.push(chunk) {
            if let Some(done) = self.done.take() {
                let _ = done.send(None);
            }
        }
    }

    pub fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Some(self.body.take()));
        }
    }
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                all.extend_from_slice(&c);
            }
            all.freeze()
        }
    }
}

// === impl ResponseTee ===

/// Collects the stable response for comparison as it streams to the client.
#[derive(Debug)]
pub struct ResponseTee {
    status: u16,
    grpc_status: Option<u32>,
    event_stream: bool,
    body: Capped,
    done: Option<oneshot::Sender<Option<Answer>>>,
}

impl ResponseTee {
    pub fn new(
        status: u16,
        event_stream: bool,
        cap: u64,
        done: oneshot::Sender<Option<Answer>>,
    ) -> ResponseTee {
        ResponseTee {
            status,
            grpc_status: None,
            event_stream,
            body: Capped::new(cap),
            done: Some(done),
        }
    }

    /// Still collecting (not finished, not over the cap): worth handing chunks to.
    pub fn is_open(&self) -> bool {
        self.done.is_some()
    }

    pub fn push(&mut self, chunk: &Bytes) {
        if self.done.is_some() && !self.body.push(chunk) {
            if let Some(done) = self.done.take() {
                let _ = done.send(None);
            }
        }
    }

    /// The answer's gRPC status, from its head (trailers-only) or its trailers.
    pub fn set_grpc_status(&mut self, code: u32) {
        self.grpc_status = Some(code);
    }

    pub fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(Some(Answer {
                status: self.status,
                event_stream: self.event_stream,
                body: self.body.take().to_vec(),
                grpc_status: self.grpc_status,
            }));
        }
    }
}
