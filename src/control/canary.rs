//! The canary controller: steps a route's candidate up through its policy's weights, judging each
//! window of traffic against stable, and promotes or rolls back.
//!
//! Invariant: the controller never edits the table; every change is a command through the one
//! [`Writer`] with actor `canary`, and every decision (advance, hold, promote, rollback) is an
//! audit record with its evidence. Not enough data is a hold, never a pass. Paused routes are
//! left alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::core::Metric as _;
use serde_json::{json, Value};
use tokio::sync::watch;
// tokio's clock: the same as the system's in production, and one a test can pause.
use tokio::time::Instant;

use crate::shutdown::stopped;

use super::pins::load_registry;
use super::writer::{Actor, Change, Command, CommandError};
use super::Writer;
use crate::config::units::format_percent;
use crate::config::{CanaryPolicy, Config, EvalGate};
use crate::data::table::{Route, Target};
use crate::eval::{EvalSet, EvalTarget};
use crate::metrics::{CanaryDecision, TargetStats};

// === gates ===

/// One gate's verdict with its evidence.
#[derive(Clone, Debug, PartialEq)]
pub struct Gate {
    pub name: &'static str,
    pub passed: bool,
    pub observed: Option<f64>,
    pub threshold: f64,
    pub stable_samples: u64,
    pub candidate_samples: u64,
    pub p_value: Option<f64>,
    pub note: String,
}

impl Gate {
    fn json(&self) -> Value {
        json!({
            "gate": self.name, "passed": self.passed, "observed": self.observed, "threshold": self.threshold,
            "stable_samples": self.stable_samples, "candidate_samples": self.candidate_samples,
            "p_value": self.p_value, "note": self.note,
        })
    }
}

/// Standard normal CDF (Abramowitz–Stegun 7.1.26 erf, |error| < 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let poly = t
        * (0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Error rate: fails when the candidate's rate is higher than stable's with one-sided
/// two-proportion z-test significance (and by more than the tolerance), or by more than the cap.
pub fn error_gate(policy: &CanaryPolicy, stable: (u64, u64), candidate: (u64, u64)) -> Gate {
    let (n_s, e_s) = stable;
    let (n_c, e_c) = candidate;
    let p_s = e_s as f64 / n_s.max(1) as f64;
    let p_c = e_c as f64 / n_c.max(1) as f64;
    let increase = p_c - p_s;
    let pooled = (e_s + e_c) as f64 / (n_s + n_c).max(1) as f64;
    let se = (pooled * (1.0 - pooled) * (1.0 / n_s.max(1) as f64 + 1.0 / n_c.max(1) as f64)).sqrt();
    let p_value = if se > 0.0 {
        Some(1.0 - normal_cdf(increase / se))
    } else {
        None
    };
    let significant =
        p_value.is_some_and(|p| p < policy.significance) && increase > policy.error_rate_tolerance;
    let over_cap = increase > policy.max_error_rate_increase;
    Gate {
        name: "error_rate",
        passed: !significant && !over_cap,
        observed: Some(increase),
        threshold: policy.max_error_rate_increase,
        stable_samples: n_s,
        candidate_samples: n_c,
        p_value,
        note: format!(
            "candidate {:.2}% vs stable {:.2}% errors{}",
            p_c * 100.0,
            p_s * 100.0,
            if significant {
                " (significantly higher)"
            } else if over_cap {
                " (above the cap)"
            } else {
                ""
            }
        ),
    }
}

/// A latency quantile of a window's cumulative buckets (see [`Counts::since`]), interpolated
/// within the bucket it falls in.
pub fn quantile(window: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = window.last().map(|(_, c)| *c)?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for (bound, cumulative) in window {
        if *cumulative as f64 >= rank {
            if bound.is_infinite() {
                return Some(lower);
            }
            let inside = (*cumulative - below).max(1) as f64;
            return Some(
                lower + (bound - lower) * ((rank - below as f64) / inside).clamp(0.0, 1.0),
            );
        }
        lower = *bound;
        below = *cumulative;
    }
    Some(lower)
}

/// Responses counted above `bound` in a window's cumulative buckets (interpolated within the
/// bucket `bound` falls in; none are counted above the last finite bound).
fn count_above(window: &[(f64, u64)], bound: f64) -> f64 {
    let total = window.last().map_or(0, |(_, c)| *c) as f64;
    let mut lower = 0.0;
    let mut below = 0u64;
    for (upper, cumulative) in window {
        if bound < *upper {
            let inside = cumulative.saturating_sub(below) as f64;
            let share = if upper.is_infinite() {
                0.0
            } else {
                ((bound - lower) / (upper - lower)).clamp(0.0, 1.0)
            };
            return total - (below as f64 + inside * share);
        }
        lower = *upper;
        below = *cumulative;
    }
    0.0
}

/// P(X >= k) for X ~ Binomial(n, p): the chance of `k` or more slow responses out of `n` when
/// each is slow with probability `p`.
fn binomial_tail(n: u64, k: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    // Terms kept in log space, so large windows do not underflow. Below the mean sum
    // P(X < k) and take the rest; above it sum the tail itself, which stays precise when small.
    let (ln_p, ln_q) = (p.ln(), (1.0 - p).ln());
    let step =
        |ln_term: f64, i: u64| ln_term + ((n - i) as f64 / (i + 1) as f64).ln() + ln_p - ln_q;
    let mut ln_term = n as f64 * ln_q;
    if (k as f64) <= n as f64 * p {
        let mut below = 0.0;
        for i in 0..k {
            below += ln_term.exp();
            ln_term = step(ln_term, i);
        }
        return (1.0 - below).clamp(0.0, 1.0);
    }
    for i in 0..k {
        ln_term = step(ln_term, i);
    }
    let mut tail = 0.0;
    for i in k..=n {
        let term = ln_term.exp();
        tail += term;
        if term < tail * 1e-17 {
            break;
        }
        if i < n {
            ln_term = step(ln_term, i);
        }
    }
    tail.clamp(0.0, 1.0)
}

/// A p99 ratio gate (latency or time to first byte). The ratio alone is not evidence on a small
/// window: the p99 of 40 responses is their maximum, so one slow response would fail a healthy
/// candidate. The gate fails when the candidate's p99 is above `cap` × stable's p99 *and* the
/// candidate responses slower than that bound are significantly more than the 1% a p99 allows
/// (one-sided exact binomial test at the policy's significance).
fn p99_gate(
    name: &'static str,
    cap: f64,
    significance: f64,
    stable: &Counts,
    candidate: &Counts,
    histogram: fn(&Counts) -> &[(f64, u64)],
) -> Gate {
    let (s, c) = (
        quantile(histogram(stable), 0.99),
        quantile(histogram(candidate), 0.99),
    );
    let observed = match (s, c) {
        (Some(s), Some(c)) if s > 0.0 => Some(c / s),
        _ => None,
    };
    // (slow responses, responses, the bound they are slower than)
    let slow = match (s, histogram(candidate).last()) {
        (Some(s), Some((_, n))) if c.is_some() => {
            let k = count_above(histogram(candidate), cap * s).round() as u64;
            Some((k, *n, cap * s))
        }
        _ => None,
    };
    let p_value = slow.map(|(k, n, _)| binomial_tail(n, k, 0.01));
    let over = observed.is_some_and(|r| r > cap);
    let significant = p_value.is_some_and(|p| p < significance);
    Gate {
        name,
        passed: !(over && significant),
        observed,
        threshold: cap,
        stable_samples: stable.requests,
        candidate_samples: candidate.requests,
        p_value,
        note: format!(
            "p99 candidate {} vs stable {}{}{}",
            c.map_or("-".into(), |c| format!("{:.1}ms", c * 1000.0)),
            s.map_or("-".into(), |s| format!("{:.1}ms", s * 1000.0)),
            slow.map_or(String::new(), |(k, n, bound)| format!(
                "; {k} of {n} candidate responses slower than {:.1}ms",
                bound * 1000.0
            )),
            if over && !significant {
                " (over the cap on too few slow responses to be evidence)"
            } else {
                ""
            }
        ),
    }
}

// === windows ===

/// One version's cumulative counters as one process saw them.
#[derive(Clone, Debug)]
struct Counts {
    requests: u64,
    errors: u64,
    latency: Vec<(f64, u64)>,
    ttfb: Vec<(f64, u64)>,
}

impl Counts {
    /// What was counted since `start` (a source's earlier reading; none: since it started).
    fn since(&self, start: Option<&Counts>) -> Counts {
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
#[derive(Clone, Debug, Default)]
struct Tally(HashMap<String, Counts>);

impl Tally {
    /// Everything counted since `start`, over all sources. A source that appeared since counts
    /// from zero; one that went away (a dead replica's lease ended) no longer counts.
    fn since(&self, start: &Tally) -> Counts {
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
struct Sources {
    remote: Vec<(String, Published)>,
}

impl Sources {
    fn tally(&self, route: &Route, target: &Target) -> Tally {
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
    fn agreement(&self, route: &Route) -> (Option<f64>, usize) {
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

fn counts(stats: &TargetStats) -> Counts {
    Counts {
        requests: stats.requests_total(),
        errors: stats.server_errors_total(),
        latency: buckets(&stats.duration),
        ttfb: buckets(&stats.ttfb),
    }
}

/// The controller's memory of one route's canary.
#[derive(Debug)]
struct Run {
    candidate: String,
    generation: u64,
    /// When the last analysis ran (the next one is due an interval later).
    window_start: Instant,
    step_start: Instant,
    stable_at_start: Tally,
    candidate_at_start: Tally,
    failures: u32,
    evaluated_first: bool,
    /// After a rollback decision with `rollback_steps`: the weights still to ramp down through.
    ramp: Option<Vec<u16>>,
    /// The writer refused this run's promotion at this generation: the controller holds until
    /// the table moves (an admin promotes, rolls back or sets a weight) instead of deciding to
    /// promote again every interval.
    promotion_refused: Option<u64>,
}

/// What one analysis concluded.
#[derive(Debug, PartialEq)]
enum Outcome {
    Pass,
    Hold(String),
    Fail,
}

fn analyse(
    policy: &CanaryPolicy,
    route: &Route,
    candidate: &Target,
    run: &Run,
    sources: &Sources,
) -> (Outcome, Vec<Gate>) {
    let stable = sources
        .tally(route, &route.stable)
        .since(&run.stable_at_start);
    let cand = sources
        .tally(route, candidate)
        .since(&run.candidate_at_start);
    let (n_s, n_c, e_s, e_c) = (stable.requests, cand.requests, stable.errors, cand.errors);
    // At 100% stable takes no traffic: judge the candidate against the cap alone.
    let stable_needed = if route.weight >= 10_000 {
        0
    } else {
        policy.min_requests
    };
    if n_c < policy.min_requests || n_s < stable_needed {
        return (
            Outcome::Hold(format!(
                "not enough data: candidate {n_c}/{}, stable {n_s}/{stable_needed} responses this window",
                policy.min_requests
            )),
            Vec::new(),
        );
    }
    let mut gates = vec![error_gate(policy, (n_s, e_s), (n_c, e_c))];
    gates.push(p99_gate(
        "latency_p99_ratio",
        policy.max_p99_ratio,
        policy.significance,
        &stable,
        &cand,
        |c| &c.latency,
    ));
    if let Some(cap) = policy.max_ttfb_p99_ratio {
        gates.push(p99_gate(
            "ttfb_p99_ratio",
            cap,
            policy.significance,
            &stable,
            &cand,
            |c| &c.ttfb,
        ));
    }
    if let (Some(min), Some(_)) = (policy.min_agreement, &route.shadow) {
        let (agreement, compared) = sources.agreement(route);
        if compared < policy.min_comparisons {
            // A gate that already failed is not held back for want of comparisons.
            if gates.iter().any(|g| !g.passed) {
                return (Outcome::Fail, gates);
            }
            return (
                Outcome::Hold(format!(
                    "not enough shadow comparisons: {compared}/{}",
                    policy.min_comparisons
                )),
                gates,
            );
        }
        gates.push(Gate {
            name: "agreement",
            passed: agreement.is_some_and(|a| a >= min),
            observed: agreement,
            threshold: min,
            stable_samples: compared as u64,
            candidate_samples: compared as u64,
            p_value: None,
            note: format!("rolling agreement over the last {compared} shadow comparisons"),
        });
    }
    let outcome = if gates.iter().all(|g| g.passed) {
        Outcome::Pass
    } else {
        Outcome::Fail
    };
    (outcome, gates)
}

// === impl Controller ===

/// Runs the canary controller until `stop`. In fleet mode it acts only while this replica holds
/// the election, and judges on the counts every replica publishes.
pub async fn run(writer: Arc<Writer>, mut stop: watch::Receiver<bool>) {
    let mut runs: HashMap<String, Run> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stopped(&mut stop) => return,
        }
        let mut sources = Sources::default();
        if let Some(fleet) = writer.fleet() {
            if !fleet.is_leader() {
                // Whoever leads keeps the runs; taking over starts fresh windows on the
                // persisted step (the route's weight), so no step is repeated or skipped.
                runs.clear();
                continue;
            }
            match fleet.counters().await {
                Ok(all) => {
                    for (replica, value) in all {
                        if replica == fleet.replica() {
                            continue;
                        }
                        match serde_json::from_str::<Published>(&value) {
                            Ok(p) => sources.remote.push((replica, p)),
                            Err(e) => {
                                tracing::warn!(%replica, error = %e, "unreadable counters in etcd; left out")
                            }
                        }
                    }
                }
                // Judging on this replica alone would not be fleet-wide: wait for etcd.
                Err(_) => continue,
            }
        }
        let config = writer.config().await;
        tick(&writer, &config, &mut runs, &sources).await;
    }
}

async fn tick(
    writer: &Writer,
    config: &Config,
    runs: &mut HashMap<String, Run>,
    sources: &Sources,
) {
    let live = writer.live();
    let table = &live.table;
    for rc in &config.routes {
        let Some(policy) = &rc.canary else { continue };
        let Some(route) = table.routes.iter().find(|r| *r.name == rc.name) else {
            continue;
        };
        let Some(candidate) = &route.candidate else {
            // Promoted or rolled back: forget the run, keep the last decision on show.
            runs.remove(&rc.name);
            continue;
        };
        if live.route(&rc.name).is_some_and(|s| s.paused) {
            // The deadline is for progress the controller may make: a pause stops its clock.
            if let Some(run) = runs.get_mut(&rc.name) {
                run.step_start = Instant::now();
            }
            continue;
        }
        let label = candidate.version.label.to_string();
        let fresh = runs.get(&rc.name).is_none_or(|r| r.candidate != label);
        if fresh {
            let now = Instant::now();
            runs.insert(
                rc.name.clone(),
                Run {
                    candidate: label.clone(),
                    generation: table.generation,
                    window_start: now,
                    step_start: now,
                    stable_at_start: sources.tally(route, &route.stable),
                    candidate_at_start: sources.tally(route, candidate),
                    failures: 0,
                    evaluated_first: false,
                    ramp: None,
                    promotion_refused: None,
                },
            );
        }
        let run = runs.get_mut(&rc.name).expect("inserted above");
        if run.generation != table.generation {
            // The table moved (a step, an admin): the window starts again on the new weights.
            run.generation = table.generation;
            run.window_start = Instant::now();
            run.stable_at_start = sources.tally(route, &route.stable);
            run.candidate_at_start = sources.tally(route, candidate);
        }

        if run.promotion_refused == Some(table.generation) {
            continue;
        }

        // Ramping down after a rollback decision: one step per interval, then the rollback.
        if let Some(ramp) = run.ramp.as_mut() {
            if run.window_start.elapsed() < policy.interval {
                continue;
            }
            run.window_start = Instant::now();
            let (command, reason) = match ramp.first().copied() {
                Some(weight) => {
                    ramp.remove(0);
                    let reason = format!(
                        "ramping down before the rollback: {}",
                        format_percent(weight)
                    );
                    (
                        Command::SetWeight {
                            route: rc.name.clone(),
                            basis_points: weight,
                        },
                        reason,
                    )
                }
                None => {
                    run.ramp = None;
                    (
                        Command::Rollback {
                            route: rc.name.clone(),
                        },
                        "ramp-down done: rolling back".to_string(),
                    )
                }
            };
            let change = Change {
                command,
                actor: Actor::Canary,
                reason: Some(reason),
                if_match: Some(run.generation),
            };
            if let Err(e) = writer.apply(change).await {
                tracing::error!(route = %rc.name, error = %e, "canary ramp-down step refused");
            }
            continue;
        }

        // Not started yet: the first step (after the eval, when the policy wants one).
        if route.weight < policy.steps[0] && !run.evaluated_first {
            run.evaluated_first = true;
            let mut evidence = Vec::new();
            if let Some(gate) = policy.eval.as_ref().filter(|e| e.before_first_step) {
                match eval_gate(gate, candidate).await {
                    Ok(passed) => evidence.push(passed),
                    Err(failed) => {
                        let why = "the held-out evaluation failed before the first step";
                        decide(
                            writer,
                            config,
                            route,
                            run,
                            CanaryDecision::Rollback,
                            vec![failed],
                            why,
                        )
                        .await;
                        run.ramp = ramp_down(policy, route.weight);
                        continue;
                    }
                }
            }
            let step = policy.steps[0];
            decide_step(writer, config, route, run, step, evidence, "first step").await;
            run.step_start = Instant::now();
            continue;
        }
        if run.window_start.elapsed() < policy.interval {
            continue;
        }
        let (outcome, gates) = analyse(policy, route, candidate, run, sources);
        run.window_start = Instant::now();
        if !matches!(outcome, Outcome::Hold(_)) || !gates.is_empty() {
            // A judged window is closed; a window short of data keeps accumulating.
            run.stable_at_start = sources.tally(route, &route.stable);
            run.candidate_at_start = sources.tally(route, candidate);
        }
        let evidence: Vec<Value> = gates.iter().map(Gate::json).collect();
        match outcome {
            Outcome::Hold(why) => {
                if run.step_start.elapsed() > policy.progress_deadline {
                    let reason = format!(
                        "progress deadline of {:?} passed: {why}",
                        policy.progress_deadline
                    );
                    decide(
                        writer,
                        config,
                        route,
                        run,
                        CanaryDecision::Rollback,
                        evidence,
                        &reason,
                    )
                    .await;
                    run.ramp = ramp_down(policy, route.weight);
                } else {
                    decide(
                        writer,
                        config,
                        route,
                        run,
                        CanaryDecision::Hold,
                        evidence,
                        &why,
                    )
                    .await;
                }
            }
            Outcome::Fail => {
                run.failures += 1;
                let failing: Vec<String> = gates
                    .iter()
                    .filter(|g| !g.passed)
                    .map(|g| {
                        format!(
                            "{} {} (threshold {}; {})",
                            g.name,
                            g.observed.map_or("-".into(), |o| format!("{o:.4}")),
                            g.threshold,
                            g.note
                        )
                    })
                    .collect();
                let reason = format!("failed gate: {}", failing.join("; "));
                if run.failures >= policy.failure_limit {
                    decide(
                        writer,
                        config,
                        route,
                        run,
                        CanaryDecision::Rollback,
                        evidence,
                        &reason,
                    )
                    .await;
                    run.ramp = ramp_down(policy, route.weight);
                } else {
                    let reason = format!(
                        "{reason} ({} of {} failures allowed)",
                        run.failures, policy.failure_limit
                    );
                    decide(
                        writer,
                        config,
                        route,
                        run,
                        CanaryDecision::Hold,
                        evidence,
                        &reason,
                    )
                    .await;
                }
            }
            Outcome::Pass => {
                run.failures = 0;
                match policy.steps.iter().find(|s| **s > route.weight) {
                    Some(next) => {
                        decide_step(
                            writer,
                            config,
                            route,
                            run,
                            *next,
                            evidence,
                            "every gate passed",
                        )
                        .await;
                        run.step_start = Instant::now();
                    }
                    None if policy.confirm_promotion => {
                        decide(
                            writer,
                            config,
                            route,
                            run,
                            CanaryDecision::Hold,
                            evidence,
                            "every step passed; awaiting an admin's promotion (confirm_promotion)",
                        )
                        .await;
                    }
                    None => {
                        let mut evidence = evidence;
                        if let Some(gate) = policy.eval.as_ref().filter(|e| e.before_promotion) {
                            match eval_gate(gate, candidate).await {
                                Ok(passed) => evidence.push(passed),
                                Err(failed) => {
                                    evidence.push(failed);
                                    decide(
                                        writer,
                                        config,
                                        route,
                                        run,
                                        CanaryDecision::Rollback,
                                        evidence,
                                        "the held-out evaluation failed before promotion",
                                    )
                                    .await;
                                    run.ramp = ramp_down(policy, route.weight);
                                    continue;
                                }
                            }
                        }
                        decide(
                            writer,
                            config,
                            route,
                            run,
                            CanaryDecision::Promote,
                            evidence,
                            "every step passed",
                        )
                        .await;
                    }
                }
            }
        }
    }
}

/// The weights a rollback ramps down through from `weight` (`None`: roll back at once).
fn ramp_down(policy: &CanaryPolicy, weight: u16) -> Option<Vec<u16>> {
    let steps: Vec<u16> = policy
        .rollback_steps
        .iter()
        .copied()
        .filter(|s| *s < weight)
        .collect();
    (!steps.is_empty()).then_some(steps)
}

/// Runs the eval set against one of the candidate's backends; the evidence either way.
async fn eval_gate(gate: &EvalGate, candidate: &Target) -> Result<Value, Value> {
    let set = match EvalSet::load(&gate.file) {
        Ok(set) => set,
        Err(e) => return Err(json!({"gate": "eval", "passed": false, "note": e.to_string()})),
    };
    let Some(backend) = candidate.version.backends.iter().find(|b| b.is_verified()) else {
        return Err(
            json!({"gate": "eval", "passed": false, "note": "no verified backend to evaluate"}),
        );
    };
    let target = EvalTarget {
        base_url: format!("{}://{}", backend.scheme, backend.authority),
        version: None,
        timeout: Duration::from_secs(30),
    };
    let report = crate::eval::run(&set, &target, gate.threshold).await;
    let evidence = json!({
        "gate": "eval", "passed": report.ok, "observed": report.pass_rate, "threshold": gate.threshold,
        "file": report.file, "sha256": report.sha256, "passed_cases": report.passed, "cases": report.total,
    });
    if report.ok {
        Ok(evidence)
    } else {
        Err(evidence)
    }
}

async fn decide_step(
    writer: &Writer,
    config: &Config,
    route: &Route,
    run: &mut Run,
    step: u16,
    evidence: Vec<Value>,
    why: &str,
) {
    let reason = format!("{why}: step to {}", format_percent(step));
    if decide(
        writer,
        config,
        route,
        run,
        CanaryDecision::Advance,
        evidence,
        &reason,
    )
    .await
    {
        let change = Change {
            command: Command::SetWeight {
                route: route.name.to_string(),
                basis_points: step,
            },
            actor: Actor::Canary,
            reason: Some(reason),
            if_match: Some(run.generation),
        };
        if let Err(e) = writer.apply(change).await {
            tracing::error!(route = %route.name, error = %e, "canary step refused");
        }
    }
}

/// Records a decision (audit, metric, status) and carries out promote and rollback. Returns
/// whether the decision was recorded.
async fn decide(
    writer: &Writer,
    config: &Config,
    route: &Route,
    run: &mut Run,
    decision: CanaryDecision,
    gates: Vec<Value>,
    reason: &str,
) -> bool {
    let label = run.candidate.as_str();
    let digest = load_registry(config)
        .ok()
        .flatten()
        .and_then(|r| r.find(label).map(|v| v.digest.clone()));
    let detail = json!({
        "decision": decision.as_str(), "version": label, "digest": digest, "weight": route.weight,
        "weight_percent": format_percent(route.weight), "gates": gates,
    });
    writer.set_canary_status(
        &route.name,
        Some(json!({"last_decision": decision.as_str(), "reason": reason, "evidence": detail.clone()})),
    );
    let name = decision.as_str();
    match decision {
        CanaryDecision::Hold => {
            tracing::info!(route = %route.name, version = label, "canary hold: {reason}")
        }
        // Routine progress is not a warning; a rollback is what an operator must look at.
        CanaryDecision::Rollback => {
            tracing::warn!(route = %route.name, version = label, decision = name, "canary: {reason}")
        }
        _ => {
            tracing::info!(route = %route.name, version = label, decision = name, "canary: {reason}")
        }
    }
    if let Err(e) = writer
        .record(
            Actor::Canary.as_str(),
            "canary_decision",
            Some(&route.name),
            detail,
            reason,
        )
        .await
    {
        tracing::error!(error = %e, "cannot record the canary decision; not acting on it");
        return false;
    }
    // Counted once recorded: a decision the audit log does not have was not taken.
    writer
        .metrics()
        .count_canary_decision(&route.name, decision);
    let ramps = config
        .routes
        .iter()
        .find(|r| *r.name == *route.name)
        .and_then(|r| r.canary.as_ref())
        .and_then(|p| ramp_down(p, route.weight))
        .is_some();
    let command = match decision {
        CanaryDecision::Rollback if ramps => return true,
        CanaryDecision::Promote => Command::Promote {
            route: route.name.to_string(),
        },
        CanaryDecision::Rollback => Command::Rollback {
            route: route.name.to_string(),
        },
        CanaryDecision::Advance | CanaryDecision::Hold => return true,
    };
    let change = Change {
        command,
        actor: Actor::Canary,
        reason: Some(reason.to_string()),
        if_match: Some(run.generation),
    };
    match writer.apply(change).await {
        Err(e) if decision == CanaryDecision::Promote => {
            promotion_refused(writer, route, run, &e).await
        }
        Err(e) => tracing::error!(route = %route.name, error = %e, "canary {decision} refused"),
        Ok(_) => {}
    }
    true
}

/// The writer refused the promotion (it could not be recorded, or the registry's rules refuse
/// it): the controller holds at the current weight, says why once — log, status, audit — and
/// waits for an admin instead of deciding to promote again every interval.
async fn promotion_refused(writer: &Writer, route: &Route, run: &mut Run, error: &CommandError) {
    run.promotion_refused = Some(run.generation);
    let label = run.candidate.as_str();
    let reason = format!(
        "the promotion of {label} was refused ({error}); holding at {} until an admin promotes, rolls back or sets a weight",
        format_percent(route.weight)
    );
    tracing::error!(route = %route.name, version = label, "canary: {reason}");
    let detail = json!({
        "decision": CanaryDecision::Hold.as_str(), "version": label, "weight": route.weight,
        "weight_percent": format_percent(route.weight), "refused": error.to_string(),
    });
    writer.set_canary_status(
        &route.name,
        Some(json!({"last_decision": CanaryDecision::Hold.as_str(), "reason": reason, "evidence": detail.clone()})),
    );
    let recorded = writer
        .record(
            Actor::Canary.as_str(),
            "canary_decision",
            Some(&route.name),
            detail,
            &reason,
        )
        .await;
    match recorded {
        Ok(()) => writer
            .metrics()
            .count_canary_decision(&route.name, CanaryDecision::Hold),
        Err(e) => tracing::error!(error = %e, "cannot record the canary's hold either"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.96) - 0.975).abs() < 1e-3);
        assert!((normal_cdf(-2.326) - 0.01).abs() < 1e-3);
    }

    #[test]
    fn error_gate_fails_a_worse_candidate_and_passes_an_equal_one() {
        let policy = CanaryPolicy::with_steps(vec![1000]);
        let bad = error_gate(&policy, (1000, 10), (200, 60));
        assert!(!bad.passed, "{bad:?}");
        assert!(bad.p_value.unwrap() < 0.001);
        let equal = error_gate(&policy, (1000, 10), (200, 2));
        assert!(equal.passed, "{equal:?}");
        let clean = error_gate(&policy, (1000, 0), (200, 0));
        assert!(clean.passed && clean.p_value.is_none());
        // A small but significant increase under the tolerance passes; over the cap fails.
        let capped = error_gate(
            &CanaryPolicy {
                max_error_rate_increase: 0.01,
                ..policy.clone()
            },
            (100_000, 0),
            (100_000, 1_500),
        );
        assert!(!capped.passed);
    }

    #[test]
    fn binomial_tail_matches_known_values() {
        assert_eq!(binomial_tail(40, 0, 0.01), 1.0);
        assert!((binomial_tail(40, 1, 0.01) - (1.0 - 0.99f64.powi(40))).abs() < 1e-9);
        // P(X >= 3 | n=40, p=0.01) = 0.00749
        assert!((binomial_tail(40, 3, 0.01) - 0.00749).abs() < 1e-4);
        // Large windows do not underflow: 2,000 slow of 100,000 is far above 1%.
        assert!(binomial_tail(100_000, 2_000, 0.01) < 1e-12);
        assert!(binomial_tail(100_000, 1_000, 0.01) > 0.4);
        assert_eq!(binomial_tail(5, 6, 0.01), 0.0);
    }

    /// One version's window: `fast` responses in the 10–25 ms bucket, `slow` in 50–100 ms.
    fn window(fast: u64, slow: u64) -> Counts {
        let latency = vec![
            (0.01, 0),
            (0.025, fast),
            (0.05, fast),
            (0.1, fast + slow),
            (f64::INFINITY, fast + slow),
        ];
        Counts {
            requests: fast + slow,
            errors: 0,
            latency: latency.clone(),
            ttfb: latency,
        }
    }

    #[test]
    fn p99_gate_needs_evidence_not_one_slow_response() {
        let gate = |stable: &Counts, cand: &Counts| {
            p99_gate("latency_p99_ratio", 1.5, 0.01, stable, cand, |c| &c.latency)
        };
        let stable = window(400, 0);
        // One slow response in 40 puts the p99 of 40 at the slow one, over the cap, but one in
        // 40 is what a healthy p99 looks like on a window this small.
        let one_slow = gate(&stable, &window(39, 1));
        assert!(one_slow.observed.unwrap() > 1.5, "{one_slow:?}");
        assert!(one_slow.passed, "{one_slow:?}");
        assert!(one_slow.note.contains("1 of 40"), "{}", one_slow.note);
        // A slow candidate fails.
        let slow = gate(&stable, &window(0, 40));
        assert!(!slow.passed, "{slow:?}");
        assert!(slow.p_value.unwrap() < 1e-20, "{slow:?}");
        // On a big window 3% slow is evidence; 0.5% slow is under a p99 (and under the cap).
        let three_percent = gate(&window(10_000, 0), &window(9_700, 300));
        assert!(!three_percent.passed, "{three_percent:?}");
        let half_percent = gate(&window(10_000, 0), &window(9_950, 50));
        assert!(half_percent.passed, "{half_percent:?}");
        // Under the cap passes whatever the count; no stable responses pass (nothing to compare).
        assert!(gate(&stable, &window(400, 0)).passed);
        let alone = gate(&window(0, 0), &window(0, 40));
        assert!(alone.passed && alone.observed.is_none(), "{alone:?}");
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let start = [(0.01, 0), (0.1, 0), (f64::INFINITY, 0)];
        let end = [(0.01, 50), (0.1, 100), (f64::INFINITY, 100)];
        let p50 = quantile(&end, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p99 = quantile(&end, 0.99).unwrap();
        assert!(p99 > 0.09 && p99 <= 0.1, "{p99}");
        assert_eq!(quantile(&start, 0.99), None);
    }
}
