//! The canary's counters: each version's cumulative counts per source (this process, and in
//! fleet mode each other replica's run), what a replica publishes of them, and the window
//! arithmetic the gates judge on.

use std::collections::HashMap;

use prometheus::core::Metric as _;

use crate::data::table::{Route, Target};
use crate::metrics::TargetStats;

/// One version's cumulative counters as one process saw them.
#[derive(Clone, Debug, PartialEq)]
pub(in crate::control) struct Counts {
    pub(in crate::control) requests: u64,
    pub(in crate::control) errors: u64,
    pub(in crate::control) latency: Vec<(f64, u64)>,
    pub(in crate::control) ttfb: Vec<(f64, u64)>,
}

impl Counts {
    /// What was counted since `start` (a source's earlier reading; none: since it started).
    pub(in crate::control) fn since(&self, start: Option<&Counts>) -> Counts {
        let minus = |now: &[(f64, u64)], then: Option<&Vec<(f64, u64)>>| -> Vec<(f64, u64)> {
            now.iter()
                .enumerate()
                .map(|(i, (bound, n))| {
                    let before = then.and_then(|t| t.get(i)).map_or(0, |(_, c)| *c);
                    (*bound, n.saturating_sub(before))
                })
                .collect()
        };
        Counts {
            requests: self
                .requests
                .saturating_sub(start.map_or(0, |s| s.requests)),
            errors: self.errors.saturating_sub(start.map_or(0, |s| s.errors)),
            latency: minus(&self.latency, start.map(|s| &s.latency)),
            ttfb: minus(&self.ttfb, start.map(|s| &s.ttfb)),
        }
    }

    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (mine, theirs) in [
            (&mut self.latency, &other.latency),
            (&mut self.ttfb, &other.ttfb),
        ] {
            for ((_, n), (_, m)) in mine.iter_mut().zip(theirs) {
                *n += m;
            }
        }
    }

    /// Counts a replica published (bucket counts only), on this process's bucket bounds.
    fn from_published(p: &PublishedCounts, bounds: &Counts) -> Option<Counts> {
        let rebound = |counts: &[u64], like: &[(f64, u64)]| -> Option<Vec<(f64, u64)>> {
            (counts.len() == like.len()).then(|| {
                like.iter()
                    .zip(counts)
                    .map(|((b, _), n)| (*b, *n))
                    .collect()
            })
        };
        Some(Counts {
            requests: p.requests,
            errors: p.errors,
            latency: rebound(&p.latency, &bounds.latency)?,
            ttfb: rebound(&p.ttfb, &bounds.ttfb)?,
        })
    }
}

/// One version's counters per source (this process, and in fleet mode each other replica's
/// run), so a window's counts are the sum of each source's own change.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Tally(pub(super) HashMap<String, Counts>);

impl Tally {
    /// Everything counted since `start`, over all sources. A source that appeared since counts
    /// from zero; one that went away (a dead replica's lease ended) no longer counts.
    pub(super) fn since(&self, start: &Tally) -> Counts {
        let mut sources = self.0.iter();
        let Some((key, first)) = sources.next() else {
            return Counts {
                requests: 0,
                errors: 0,
                latency: Vec::new(),
                ttfb: Vec::new(),
            };
        };
        let mut total = first.since(start.0.get(key));
        for (key, counts) in sources {
            total.add(&counts.since(start.0.get(key)));
        }
        total
    }
}

/// What each replica publishes to etcd for the fleet-wide judgement.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// Changes on every start: counters of two runs of one replica are two sources.
    pub incarnation: String,
    /// By `route\u{1f}version\u{1f}role`.
    pub targets: HashMap<String, PublishedCounts>,
    /// Rolling shadow agreement and the comparisons it rests on, by route.
    pub agreement: HashMap<String, (Option<f64>, usize)>,
    /// The routing generation the replica serves, and why it cannot apply the fleet's state when
    /// it cannot: its health, as other replicas' dashboards show it (absent from older replicas).
    #[serde(default)]
    pub generation: u64,
    #[serde(default)]
    pub apply_problem: Option<String>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PublishedCounts {
    pub requests: u64,
    pub errors: u64,
    /// Cumulative bucket counts, the last one is +Inf (the sample count).
    pub latency: Vec<u64>,
    pub ttfb: Vec<u64>,
}

fn target_key(route: &str, target: &Target) -> String {
    format!(
        "{route}\u{1f}{}\u{1f}{}",
        target.version.label,
        target.role.as_str()
    )
}

/// This process's counters for every version of `table`, as published to the fleet.
pub fn published(table: &crate::data::RoutingTable, incarnation: &str) -> Published {
    let mut out = Published {
        incarnation: incarnation.to_string(),
        generation: table.generation,
        ..Published::default()
    };
    for route in &table.routes {
        for target in std::iter::once(&route.stable).chain(&route.candidate) {
            let c = counts(&target.stats);
            out.targets.insert(
                target_key(&route.name, target),
                PublishedCounts {
                    requests: c.requests,
                    errors: c.errors,
                    latency: c.latency.iter().map(|(_, n)| *n).collect(),
                    ttfb: c.ttfb.iter().map(|(_, n)| *n).collect(),
                },
            );
        }
        if let Some(shadow) = &route.shadow {
            out.agreement
                .insert(route.name.to_string(), shadow.stats.agreement());
        }
    }
    out
}

/// Where the controller reads counts: this process, plus (fleet mode) what the other replicas
/// published.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) remote: Vec<(String, Published)>,
}

impl Counters {
    pub(super) fn tally(&self, route: &Route, target: &Target) -> Tally {
        let local = counts(&target.stats);
        let key = target_key(&route.name, target);
        let mut all = HashMap::new();
        for (replica, published) in &self.remote {
            if let Some(c) = published
                .targets
                .get(&key)
                .and_then(|p| Counts::from_published(p, &local))
            {
                all.insert(format!("{replica}/{}", published.incarnation), c);
            }
        }
        all.insert(String::new(), local);
        Tally(all)
    }

    /// Rolling agreement over this process's and the other replicas' recent comparisons.
    pub(super) fn agreement(&self, route: &Route) -> (Option<f64>, usize) {
        let local = route.shadow.as_ref().map(|s| s.stats.agreement());
        let mut agreed = 0.0;
        let mut compared = 0usize;
        let remote = self
            .remote
            .iter()
            .filter_map(|(_, p)| p.agreement.get(&*route.name).copied());
        for (share, n) in local.into_iter().chain(remote) {
            agreed += share.unwrap_or(0.0) * n as f64;
            compared += n;
        }
        ((compared > 0).then(|| agreed / compared as f64), compared)
    }
}

fn buckets(h: &prometheus::Histogram) -> Vec<(f64, u64)> {
    let metric = h.metric();
    let histogram = metric.get_histogram();
    let mut out: Vec<(f64, u64)> = histogram
        .get_bucket()
        .iter()
        .map(|b| (b.upper_bound(), b.cumulative_count()))
        .collect();
    out.push((f64::INFINITY, histogram.get_sample_count()));
    out
}

/// This process's cumulative counters of one target (the dashboard's history samples them too).
pub(in crate::control) fn counts(stats: &TargetStats) -> Counts {
    Counts {
        requests: stats.requests_total(),
        errors: stats.server_errors_total(),
        latency: buckets(&stats.duration),
        ttfb: buckets(&stats.ttfb),
    }
}
