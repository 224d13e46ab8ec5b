//! Measurements of generated traffic, per version: counts, error kinds and latency histograms.
//!
//! Every number comes from a response the traffic generator saw. Histograms are log-linear with
//! 64 buckets per power of two (at most ~1.6% relative error) and a fixed upper size, so memory
//! stays bounded however long the run.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;

/// Responses without an `x-weir-version` header are counted under this label.
pub const NO_HEADER: &str = "(no header)";
/// Requests that got no response at all (connection refused or reset, timeout).
pub const NO_RESPONSE: &str = "(no response)";

/// Sub-buckets per power of two: 2^6 = 64, so a bucket is at most 1/64 of its value wide.
const SUB_BITS: u32 = 6;
/// Values are clamped to 2^40 µs (about 12 days): 35 doublings above the exact range.
const MAX_MICROS: u64 = 1 << 40;

/// A latency histogram in microseconds with bounded memory.
#[derive(Clone, Debug, Default)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    count: u64,
    sum_micros: u64,
    min_micros: u64,
    max_micros: u64,
}

// === impl LatencyHistogram ===

impl LatencyHistogram {
    #[cfg(test)]
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros())
            .unwrap_or(MAX_MICROS)
            .min(MAX_MICROS);
        let index = bucket_index(micros);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        if self.count == 0 || micros < self.min_micros {
            self.min_micros = micros;
        }
        self.max_micros = self.max_micros.max(micros);
        self.count += 1;
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    #[cfg(test)]
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The `q` quantile (0.0 to 1.0), `None` when nothing was recorded. Exact below 128µs, within
    /// ~1.6% above, and never outside the observed minimum and maximum.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        if rank == 1 {
            return Some(Duration::from_micros(self.min_micros));
        }
        if rank >= self.count {
            return Some(Duration::from_micros(self.max_micros));
        }
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                let middle = low + (high - low) / 2;
                let micros = middle.clamp(self.min_micros, self.max_micros);
                return Some(Duration::from_micros(micros));
            }
        }
        Some(Duration::from_micros(self.max_micros))
    }

    #[cfg(test)]
    pub fn mean(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.sum_micros / self.count))
    }

    pub fn max(&self) -> Option<Duration> {
        (self.count > 0).then(|| Duration::from_micros(self.max_micros))
    }

    #[cfg(test)]
    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if other.count == 0 {
            return;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.min_micros = if self.count == 0 {
            other.min_micros
        } else {
            self.min_micros.min(other.min_micros)
        };
        self.max_micros = self.max_micros.max(other.max_micros);
        self.count += other.count;
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
    }
}

/// Values below 128 get their own bucket; above, each power of two is cut into 64 buckets.
fn bucket_index(micros: u64) -> usize {
    if micros < 1 << (SUB_BITS + 1) {
        return micros as usize;
    }
    let shift = 63 - micros.leading_zeros() - SUB_BITS;
    let sub = (micros >> shift) as usize; // in 64..128
    ((shift as usize) << SUB_BITS) + sub
}

/// The smallest and largest value that land in bucket `index`.
fn bucket_bounds(index: usize) -> (u64, u64) {
    if index < 1 << (SUB_BITS + 1) {
        return (index as u64, index as u64);
    }
    let shift = (index >> SUB_BITS) as u32 - 1;
    let sub = (index & ((1 << SUB_BITS) - 1)) as u64 + (1 << SUB_BITS);
    (sub << shift, ((sub + 1) << shift) - 1)
}

/// Why a request counts as failed. A closed set: these end up as column names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// A 5xx response.
    ServerError,
    /// Any other non-2xx response.
    ClientError,
    /// A response body that broke off, or a stream that ended without `data: [DONE]`.
    BrokenStream,
    /// A 2xx response whose body is not a well-formed chat completion.
    BadBody,
    /// No response: connection refused or reset before the response head.
    NoResponse,
    /// No complete response within the request timeout.
    Timeout,
}

impl FailureKind {
    pub const ALL: [FailureKind; 6] = [
        FailureKind::ServerError,
        FailureKind::ClientError,
        FailureKind::BrokenStream,
        FailureKind::BadBody,
        FailureKind::NoResponse,
        FailureKind::Timeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::ServerError => "5xx",
            FailureKind::ClientError => "4xx/other status",
            FailureKind::BrokenStream => "broken stream",
            FailureKind::BadBody => "malformed body",
            FailureKind::NoResponse => "no response",
            FailureKind::Timeout => "timeout",
        }
    }
}

/// What one request measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The version the proxy says served it (`x-weir-version`), if it said.
    pub version: Option<String>,
    /// `None` when no response head arrived.
    pub status: Option<StatusCode>,
    pub stream: bool,
    /// From sending the request to the last byte of the response (or the failure).
    pub latency: Duration,
    /// Streams only: from sending the request to the first byte of the body.
    pub first_byte: Option<Duration>,
    pub error: Option<FailureKind>,
    /// The model the response body names, to check the version header against.
    pub body_model: Option<String>,
    /// The sticky session the request carried.
    pub session: Option<u32>,
}

/// Everything measured for one version.
#[derive(Clone, Debug, Default)]
pub struct VersionStats {
    pub requests: u64,
    pub errors: u64,
    errors_by_kind: [u64; FailureKind::ALL.len()],
    /// Non-2xx responses by status code.
    error_statuses: BTreeMap<u16, u64>,
    pub streams: u64,
    /// Successful non-streaming requests, to the last byte.
    pub latency: LatencyHistogram,
    /// Successful streams, to the first body byte.
    pub first_byte: LatencyHistogram,
    /// Successful streams, to the last byte.
    pub stream_latency: LatencyHistogram,
    /// Responses that named their version both in the header and in the body...
    pub version_checked: u64,
    /// ...and of those, the ones where the two disagree.
    pub version_mismatches: u64,
}

// === impl VersionStats ===

impl VersionStats {
    pub fn record(&mut self, outcome: &Outcome) {
        self.requests += 1;
        if outcome.stream {
            self.streams += 1;
        }
        if let (Some(header), Some(body)) = (&outcome.version, &outcome.body_model) {
            self.version_checked += 1;
            if header != body {
                self.version_mismatches += 1;
            }
        }
        match outcome.error {
            Some(kind) => {
                self.errors += 1;
                self.errors_by_kind[kind as usize] += 1;
                if let Some(status) = outcome.status.filter(|s| !s.is_success()) {
                    *self.error_statuses.entry(status.as_u16()).or_default() += 1;
                }
            }
            None if outcome.stream => {
                self.stream_latency.record(outcome.latency);
                if let Some(first_byte) = outcome.first_byte {
                    self.first_byte.record(first_byte);
                }
            }
            None => self.latency.record(outcome.latency),
        }
    }

    pub fn errors_of(&self, kind: FailureKind) -> u64 {
        self.errors_by_kind[kind as usize]
    }

    /// Non-2xx responses as `(status, count)`, by status.
    pub fn error_statuses(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.error_statuses.iter().map(|(&s, &n)| (s, n))
    }

    /// Share of requests that failed, 0.0 when there were none.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

/// Sticky sessions that were served by more than one version. With a fixed weight this should
/// be zero; raising the weight may legitimately move sessions from stable to candidate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StickyReport {
    pub sessions: u64,
    /// Sessions by the version of their first response: the cohorts.
    pub first_versions: BTreeMap<String, u64>,
    /// Sessions that were served by a version other than their first.
    pub moved_sessions: u64,
    /// Responses from a version other than the session's first.
    pub moved_responses: u64,
}

/// Stats shared by all traffic workers and read by the view.
#[derive(Debug, Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    versions: BTreeMap<String, VersionStats>,
    /// Per sticky session: the version of its first response, and whether it ever moved.
    sessions: HashMap<u32, (String, bool)>,
    sticky: StickyReport,
}

/// A copy of the stats at one moment.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// By label; [`NO_HEADER`] and [`NO_RESPONSE`] for requests no version claimed.
    pub versions: BTreeMap<String, VersionStats>,
    /// `None` when no request carried a session.
    pub sticky: Option<StickyReport>,
}

// === impl Stats ===

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, outcome: &Outcome) {
        let label = match (&outcome.version, outcome.status) {
            (Some(v), _) => v.as_str(),
            (None, Some(_)) => NO_HEADER,
            (None, None) => NO_RESPONSE,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner
            .versions
            .entry(label.to_string())
            .or_default()
            .record(outcome);
        if let (Some(session), Some(version)) = (outcome.session, &outcome.version) {
            inner.record_session(session, version);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Snapshot {
            versions: inner.versions.clone(),
            sticky: (inner.sticky.sessions > 0).then(|| inner.sticky.clone()),
        }
    }
}

impl Inner {
    fn record_session(&mut self, session: u32, version: &str) {
        match self.sessions.get_mut(&session) {
            None => {
                self.sessions.insert(session, (version.to_string(), false));
                self.sticky.sessions += 1;
                *self
                    .sticky
                    .first_versions
                    .entry(version.to_string())
                    .or_default() += 1;
            }
            Some((first, moved)) if first != version => {
                self.sticky.moved_responses += 1;
                if !*moved {
                    *moved = true;
                    self.sticky.moved_sessions += 1;
                }
            }
            Some(_) => {}
        }
    }
}

// === impl Snapshot ===

impl Snapshot {
    pub fn requests(&self) -> u64 {
        self.versions.values().map(|v| v.requests).sum()
    }

    pub fn get(&self, label: &str) -> Option<&VersionStats> {
        self.versions.get(label)
    }

    /// Share of all requests that `label` got, 0.0 before any request.
    pub fn share(&self, label: &str) -> f64 {
        let total = self.requests();
        match (self.versions.get(label), total) {
            (Some(v), 1..) => v.requests as f64 / total as f64,
            _ => 0.0,
        }
    }
}

/// What clients saw of candidate and stable, on error rate and p99 latency, for the demo's
/// summary line (the canary controller is the judge).
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    pub stable_error_rate: f64,
    pub candidate_error_rate: f64,
    /// Which latency was compared: `"p99"` (whole non-streaming responses) or `"ttfb p99"`
    /// (streams, when either side had no non-streaming responses).
    pub latency_measure: &'static str,
    pub stable_p99: Option<Duration>,
    pub candidate_p99: Option<Duration>,
}

impl Comparison {
    pub fn new(stable: &VersionStats, candidate: &VersionStats) -> Comparison {
        let plain = !stable.latency.is_empty() && !candidate.latency.is_empty();
        let (latency_measure, stable_hist, candidate_hist) = if plain {
            ("p99", &stable.latency, &candidate.latency)
        } else {
            ("ttfb p99", &stable.first_byte, &candidate.first_byte)
        };
        Comparison {
            stable_error_rate: stable.error_rate(),
            candidate_error_rate: candidate.error_rate(),
            latency_measure,
            stable_p99: stable_hist.quantile(0.99),
            candidate_p99: candidate_hist.quantile(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut previous_high = None;
        for index in 0..bucket_index(MAX_MICROS) {
            let (low, high) = bucket_bounds(index);
            if let Some(previous) = previous_high {
                assert_eq!(low, previous + 1, "gap before bucket {index}");
            }
            assert_eq!(bucket_index(low), index);
            assert_eq!(bucket_index(high), index);
            assert!(
                (high - low) as f64 <= low as f64 / 64.0,
                "bucket {index} too wide"
            );
            previous_high = Some(high);
        }
    }

    #[test]
    fn quantiles_of_a_uniform_run_are_within_two_percent() {
        let mut h = LatencyHistogram::new();
        for i in 1..=1000 {
            h.record(ms(i));
        }
        let close = |got: Duration, want: Duration| {
            let error = (got.as_secs_f64() - want.as_secs_f64()).abs() / want.as_secs_f64();
            assert!(error < 0.02, "got {got:?}, want about {want:?}");
        };
        close(h.quantile(0.5).unwrap(), ms(500));
        close(h.quantile(0.99).unwrap(), ms(990));
        assert_eq!(h.quantile(0.0), Some(ms(1)));
        assert_eq!(h.quantile(1.0), Some(ms(1000)));
        assert_eq!(h.max(), Some(ms(1000)));
        close(h.mean().unwrap(), Duration::from_micros(500_500));
        assert_eq!(h.count(), 1000);
    }

    #[test]
    fn quantiles_stay_within_observed_values() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.quantile(0.5), None);
        h.record(Duration::from_micros(10_007));
        assert_eq!(h.quantile(0.5), Some(Duration::from_micros(10_007)));
        assert_eq!(h.quantile(0.99), Some(Duration::from_micros(10_007)));
        h.record(Duration::from_secs(100 * 86_400)); // clamped, not a panic
        assert!(h.max().unwrap() >= Duration::from_secs(12 * 86_400));
    }

    #[test]
    fn a_slow_tail_shows_in_p99_not_p50() {
        let mut h = LatencyHistogram::new();
        for _ in 0..980 {
            h.record(ms(10));
        }
        for _ in 0..20 {
            h.record(ms(200));
        }
        assert!(h.quantile(0.5).unwrap() < ms(11));
        assert!(h.quantile(0.99).unwrap() > ms(190));

        let mut merged = LatencyHistogram::new();
        merged.merge(&h);
        merged.merge(&h);
        assert_eq!(merged.count(), 2000);
        assert_eq!(merged.quantile(0.99), h.quantile(0.99));
    }

    fn outcome(version: Option<&str>, status: Option<u16>, latency: Duration) -> Outcome {
        let status = status.map(|s| StatusCode::from_u16(s).unwrap());
        let error = match status {
            None => Some(FailureKind::NoResponse),
            Some(s) if s.is_server_error() => Some(FailureKind::ServerError),
            Some(s) if !s.is_success() => Some(FailureKind::ClientError),
            Some(_) => None,
        };
        Outcome {
            version: version.map(str::to_string),
            status,
            stream: false,
            latency,
            first_byte: None,
            error,
            body_model: version.map(str::to_string),
            session: None,
        }
    }

    #[test]
    fn stats_count_per_version_and_attribute_unclaimed_requests() {
        let stats = Stats::new();
        for _ in 0..9 {
            stats.record(&outcome(Some("chat@v1"), Some(200), ms(10)));
        }
        stats.record(&outcome(Some("chat@v2"), Some(500), ms(30)));
        stats.record(&outcome(None, Some(502), ms(1)));
        stats.record(&outcome(None, None, ms(1)));
        let mut mismatched = outcome(Some("chat@v1"), Some(200), ms(10));
        mismatched.body_model = Some("chat@v2".into());
        stats.record(&mismatched);

        let snap = stats.snapshot();
        assert_eq!(snap.requests(), 13);
        let v1 = snap.get("chat@v1").unwrap();
        assert_eq!((v1.requests, v1.errors), (10, 0));
        assert_eq!((v1.version_checked, v1.version_mismatches), (10, 1));
        assert_eq!(v1.latency.count(), 10);
        let v2 = snap.get("chat@v2").unwrap();
        assert_eq!(
            (v2.requests, v2.errors_of(FailureKind::ServerError)),
            (1, 1)
        );
        assert_eq!(v2.error_statuses().collect::<Vec<_>>(), [(500, 1)]);
        assert!(
            v2.latency.is_empty(),
            "failed requests do not count toward latency"
        );
        assert_eq!(
            snap.get(NO_HEADER)
                .unwrap()
                .errors_of(FailureKind::ClientError),
            0
        );
        assert_eq!(
            snap.get(NO_HEADER)
                .unwrap()
                .errors_of(FailureKind::ServerError),
            1
        );
        assert_eq!(
            snap.get(NO_RESPONSE)
                .unwrap()
                .errors_of(FailureKind::NoResponse),
            1
        );
        assert!((snap.share("chat@v1") - 10.0 / 13.0).abs() < 1e-9);
        assert_eq!(snap.sticky, None);
    }

    #[test]
    fn sessions_that_change_version_are_counted_once() {
        let stats = Stats::new();
        let with_session = |version: &str, session| Outcome {
            session: Some(session),
            ..outcome(Some(version), Some(200), ms(10))
        };
        stats.record(&with_session("chat@v1", 1));
        stats.record(&with_session("chat@v1", 1));
        stats.record(&with_session("chat@v2", 2));
        stats.record(&with_session("chat@v2", 1));
        stats.record(&with_session("chat@v1", 1));
        stats.record(&with_session("chat@v2", 1));
        assert_eq!(
            stats.snapshot().sticky,
            Some(StickyReport {
                sessions: 2,
                first_versions: [("chat@v1".to_string(), 1), ("chat@v2".to_string(), 1)].into(),
                moved_sessions: 1,
                moved_responses: 2,
            })
        );
    }

    fn version(requests: u64, errors: u64, latency: Duration) -> VersionStats {
        let mut v = VersionStats::default();
        for i in 0..requests {
            let status = if i < errors { 500 } else { 200 };
            v.record(&outcome(Some("x@y"), Some(status), latency));
        }
        v
    }

    #[test]
    fn comparison_reports_error_rates_and_the_latency_it_compared() {
        let stable = version(1000, 0, ms(10));
        let c = Comparison::new(&stable, &version(100, 5, ms(30)));
        assert_eq!(c.latency_measure, "p99");
        assert!((c.candidate_error_rate - 0.05).abs() < 1e-9);
        assert_eq!(c.stable_error_rate, 0.0);
        let (stable_p99, candidate_p99) = (c.stable_p99.unwrap(), c.candidate_p99.unwrap());
        assert!(
            stable_p99 < candidate_p99,
            "{stable_p99:?} < {candidate_p99:?}"
        );
        let c = Comparison::new(&VersionStats::default(), &stable);
        assert_eq!(
            c.latency_measure, "ttfb p99",
            "no whole responses on one side"
        );
    }
}
