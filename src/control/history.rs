//! The dashboard's recent history: every few seconds, what each version of each route served
//! since the sample before (responses, server errors, p99 latency and time to first byte) and
//! each mirrored route's rolling shadow agreement, kept in memory for 15 minutes.
//!
//! Invariant: bounded — at most [`KEPT`] samples per series, and a series whose version left the
//! table is dropped once it has been absent for as long as the window. It reads the counters the
//! canary controller judges on, this process's only: in fleet mode each replica keeps its own.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::watch;
// tokio's clock: the intervals between samples, paused in tests.
use tokio::time::Instant;

use super::canary::{counts, quantile, Counts};
use super::Writer;
use crate::data::RoutingTable;
use crate::shutdown::stopped;

/// Time between samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept per series: 15 minutes of them.
pub const KEPT: usize = 180;

/// What one version of one route served between two samples.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When the sample was taken, Unix milliseconds.
    pub at: u64,
    /// Seconds since the sample before.
    pub seconds: f64,
    pub requests: u64,
    /// 5xx answers and gRPC errors, as the canary's error gate counts them.
    pub errors: u64,
    /// None when no response completed in the interval.
    pub p99_ms: Option<f64>,
    pub ttfb_p99_ms: Option<f64>,
}

/// One mirrored route's rolling agreement when a sample was taken.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgreementSample {
    pub at: u64,
    /// None until the first comparison.
    pub ratio: Option<f64>,
    pub compared: usize,
}

/// Route name, version label, role.
type Key = (String, String, &'static str);

#[derive(Debug)]
struct Series {
    /// The cumulative counters at the last sample, which the next one is taken against.
    last: Counts,
    last_at: Instant,
    samples: VecDeque<Sample>,
    /// Samples taken since this version was last in the table.
    absent: usize,
}

#[derive(Debug, Default)]
struct Inner {
    versions: BTreeMap<Key, Series>,
    agreement: BTreeMap<String, VecDeque<AgreementSample>>,
}

/// The ring buffers of every route and version; the sampler writes, `GET /v1/history` reads.
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<Inner>,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn push_bounded<T>(ring: &mut VecDeque<T>, item: T) {
    if ring.len() == KEPT {
        ring.pop_front();
    }
    ring.push_back(item);
}

impl History {
    /// Takes one sample of every version in `table`.
    pub fn sample(&self, table: &RoutingTable, now: Instant, at: SystemTime) {
        let mut seen = Vec::new();
        let mut agreement = Vec::new();
        for route in &table.routes {
            for target in std::iter::once(&route.stable).chain(&route.candidate) {
                let key = (
                    route.name.to_string(),
                    target.version.label.to_string(),
                    target.role.as_str(),
                );
                seen.push((key, counts(&target.stats)));
            }
            if let Some(shadow) = &route.shadow {
                agreement.push((route.name.to_string(), shadow.stats.agreement()));
            }
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.observe(seen, now, at);
        for (route, (ratio, compared)) in agreement {
            let ring = inner.agreement.entry(route).or_default();
            let sample = AgreementSample {
                at: unix_ms(at),
                ratio,
                compared,
            };
            push_bounded(ring, sample);
        }
    }

    /// The whole history, as `GET /v1/history` answers it.
    pub fn json(&self) -> Value {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes: BTreeMap<&str, Value> = BTreeMap::new();
        for ((route, version, role), series) in &inner.versions {
            let entry = routes
                .entry(route)
                .or_insert_with(|| json!({"route": route, "versions": [], "agreement": []}));
            if let Some(versions) = entry["versions"].as_array_mut() {
                versions.push(json!({
                    "version": version,
                    "role": role,
                    "live": series.absent == 0,
                    "samples": series.samples,
                }));
            }
        }
        for (route, samples) in &inner.agreement {
            let entry = routes
                .entry(route)
                .or_insert_with(|| json!({"route": route, "versions": [], "agreement": []}));
            entry["agreement"] = json!(samples);
        }
        json!({
            "every_seconds": SAMPLE_EVERY.as_secs(),
            "kept": KEPT,
            "scope": "this replica",
            "routes": routes.into_values().collect::<Vec<_>>(),
        })
    }
}

impl Inner {
    /// One sample: the change of each seen series since its last reading. A series seen for the
    /// first time only sets its baseline; one not seen for [`KEPT`] samples is dropped.
    fn observe(&mut self, seen: Vec<(Key, Counts)>, now: Instant, at: SystemTime) {
        for series in self.versions.values_mut() {
            series.absent += 1;
        }
        for (key, counts) in seen {
            let Some(series) = self.versions.get_mut(&key) else {
                let series = Series {
                    last: counts,
                    last_at: now,
                    samples: VecDeque::new(),
                    absent: 0,
                };
                self.versions.insert(key, series);
                continue;
            };
            let window = counts.since(Some(&series.last));
            let ms = |buckets: &[(f64, u64)]| quantile(buckets, 0.99).map(|s| s * 1000.0);
            let sample = Sample {
                at: unix_ms(at),
                seconds: now.duration_since(series.last_at).as_secs_f64(),
                requests: window.requests,
                errors: window.errors,
                p99_ms: ms(&window.latency),
                ttfb_p99_ms: ms(&window.ttfb),
            };
            push_bounded(&mut series.samples, sample);
            series.last = counts;
            series.last_at = now;
            series.absent = 0;
        }
        self.versions.retain(|_, s| s.absent < KEPT);
        self.agreement
            .retain(|route, _| self.versions.keys().any(|(r, _, _)| r == route));
    }
}

/// Samples every [`SAMPLE_EVERY`] until `stop`, from the first tick on.
pub async fn run(writer: Arc<Writer>, history: Arc<History>, mut stop: watch::Receiver<bool>) {
    loop {
        history.sample(&writer.table().load(), Instant::now(), SystemTime::now());
        tokio::select! {
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cumulative counters with every response in the 10 ms bucket (latency) and 2.5 ms (TTFB).
    fn counts(requests: u64, errors: u64) -> Counts {
        let bounds = [0.0025, 0.01, f64::INFINITY];
        let cumulative = |from: usize| -> Vec<(f64, u64)> {
            bounds
                .iter()
                .enumerate()
                .map(|(i, b)| (*b, if i >= from { requests } else { 0 }))
                .collect()
        };
        Counts {
            requests,
            errors,
            latency: cumulative(1),
            ttfb: cumulative(0),
        }
    }

    fn key(version: &str) -> Key {
        ("chat".into(), version.into(), "stable")
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_is_the_change_since_the_one_before_with_its_quantiles() {
        let mut inner = Inner::default();
        let start = Instant::now();
        inner.observe(
            vec![(key("chat@v1"), counts(100, 1))],
            start,
            SystemTime::now(),
        );
        assert!(
            inner.versions[&key("chat@v1")].samples.is_empty(),
            "the first reading is a baseline"
        );
        tokio::time::advance(SAMPLE_EVERY).await;
        inner.observe(
            vec![(key("chat@v1"), counts(150, 4))],
            Instant::now(),
            SystemTime::now(),
        );
        let sample = &inner.versions[&key("chat@v1")].samples[0];
        assert_eq!((sample.requests, sample.errors), (50, 3));
        assert_eq!(sample.seconds, 5.0);
        let p99 = sample.p99_ms.unwrap();
        assert!((2.5..=10.0).contains(&p99), "p99 {p99} ms");
        assert!(sample.ttfb_p99_ms.unwrap() <= 2.5);

        tokio::time::advance(SAMPLE_EVERY).await;
        inner.observe(
            vec![(key("chat@v1"), counts(150, 4))],
            Instant::now(),
            SystemTime::now(),
        );
        let idle = &inner.versions[&key("chat@v1")].samples[1];
        assert_eq!((idle.requests, idle.p99_ms), (0, None));
    }

    #[tokio::test(start_paused = true)]
    async fn series_are_bounded_and_versions_that_left_are_dropped() {
        let mut inner = Inner::default();
        for i in 0..(KEPT as u64 + 20) {
            let mut seen = vec![(key("chat@v1"), counts(i * 10, 0))];
            if i < 3 {
                seen.push((key("chat@v2"), counts(i, 0)));
            }
            inner.observe(seen, Instant::now(), SystemTime::now());
            tokio::time::advance(SAMPLE_EVERY).await;
            if i == 3 {
                assert!(!inner.versions[&key("chat@v2")].samples.is_empty());
            }
        }
        assert_eq!(inner.versions[&key("chat@v1")].samples.len(), KEPT);
        assert!(
            !inner.versions.contains_key(&key("chat@v2")),
            "a version absent for the whole window is dropped"
        );
    }
}
