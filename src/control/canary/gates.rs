//! The canary's gates: each compares the candidate's window with stable's and says, with its
//! evidence, whether the candidate passes. Not enough evidence to fail is a pass here; not enough
//! data to judge at all is the step's concern ([`super::step`]).

use serde_json::{json, Value};

use super::counts::Counts;
use crate::config::CanaryPolicy;
use crate::stats::normal_cdf;

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
    pub(super) fn json(&self) -> Value {
        json!({
            "gate": self.name, "passed": self.passed, "observed": self.observed, "threshold": self.threshold,
            "stable_samples": self.stable_samples, "candidate_samples": self.candidate_samples,
            "p_value": self.p_value, "note": self.note,
        })
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
pub(super) fn p99_gate(
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

#[cfg(test)]
mod tests {
    use super::*;

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
