//! The canary's decisions as a pure step: a view of one route (its policy, weight, generation
//! and counters) and the time in, the actions to take out. Nothing here waits, reads a clock or
//! writes; the task in [`super`] gathers the view, carries out the actions, and runs the
//! held-out evaluation an action asks for. So every decision path can be tested by feeding
//! views under a paused clock.

use std::collections::HashMap;

use serde_json::Value;
use tokio::time::Instant;

use super::counts::Tally;
use super::gates::{error_gate, p99_gate, Gate};
use crate::config::units::format_percent;
use crate::config::CanaryPolicy;
use crate::control::command::{Actor, Change, Command};
use crate::metrics::CanaryDecision;

/// What the controller sees of one route with a canary policy, at one tick.
#[derive(Debug)]
pub struct View<'a> {
    pub route: &'a str,
    pub policy: &'a CanaryPolicy,
    /// The live table's generation: every change the step asks for is fenced on it.
    pub generation: u64,
    /// The candidate's weight in basis points.
    pub weight: u16,
    /// The candidate's label (`model@version`); none once promoted or rolled back.
    pub candidate: Option<&'a str>,
    pub paused: bool,
    /// Whether the route mirrors to the candidate (the agreement gate applies).
    pub shadowed: bool,
    /// Cumulative counters now, per source.
    pub stable: Tally,
    pub candidate_counts: Tally,
    /// Rolling shadow agreement and the comparisons it rests on.
    pub agreement: (Option<f64>, usize),
}

/// Where a held-out evaluation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EvalPoint {
    /// Before the first step takes any traffic.
    FirstStep,
    /// After the last step passed, before promoting.
    Promotion,
}

/// What the step asks the task to do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Record a decision (audit, metric, status), then — only once recorded — apply `then`.
    Decide(Decided),
    /// Apply a change that is part of a decision already recorded (a ramp-down step).
    Apply(Change),
    /// Rollout the policy's held-out evaluation against the candidate and hand the result to
    /// [`Controller::evaluated`]; `evidence` is what the gates found so far.
    Evaluate {
        point: EvalPoint,
        evidence: Vec<Value>,
    },
}

/// A decision with its evidence.
#[derive(Debug, PartialEq)]
pub struct Decided {
    pub decision: CanaryDecision,
    pub version: String,
    pub weight: u16,
    pub gates: Vec<Value>,
    pub reason: String,
    pub then: Option<Change>,
}

/// The controller's memory of one route's canary.
#[derive(Debug)]
struct Rollout {
    candidate: String,
    generation: u64,
    /// When the last analysis ran (the next one is due an interval later).
    window_start: Instant,
    step_start: Instant,
    stable_at_start: Tally,
    candidate_at_start: Tally,
    failures: u32,
    evaluated_first: bool,
    /// The last held-out evaluation this run passed: the promotion carries it as evidence.
    eval_passed: Option<Value>,
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

/// Every route's run. In fleet mode only the leader keeps runs.
#[derive(Debug, Default)]
pub struct Controller {
    runs: HashMap<String, Rollout>,
}

impl Controller {
    /// Forgets every run: this replica stopped leading. Whoever leads starts fresh windows on the
    /// persisted step (the route's weight), so no step is repeated or skipped.
    pub fn forget_all(&mut self) {
        self.runs.clear();
    }

    /// One tick for one route.
    pub fn step(&mut self, view: &View<'_>, now: Instant) -> Vec<Action> {
        let Some(label) = view.candidate else {
            // Promoted or rolled back: forget the run, keep the last decision on show.
            self.runs.remove(view.route);
            return Vec::new();
        };
        if view.paused {
            // The deadline is for progress the controller may make: a pause stops its clock.
            if let Some(run) = self.runs.get_mut(view.route) {
                run.step_start = now;
            }
            return Vec::new();
        }
        if self
            .runs
            .get(view.route)
            .is_none_or(|r| r.candidate != label)
        {
            self.runs
                .insert(view.route.to_string(), Rollout::new(label, view, now));
        }
        let run = self.runs.get_mut(view.route).expect("inserted above");
        if run.generation != view.generation {
            // The table moved (a step, an admin): the window starts again on the new weights.
            run.generation = view.generation;
            run.window_start = now;
            run.restart_counts(view);
        }
        if run.promotion_refused == Some(view.generation) {
            return Vec::new();
        }
        if run.ramp.is_some() {
            return run.ramp_down_step(view, now).into_iter().collect();
        }
        let policy = view.policy;
        // Not started yet: the first step (after the eval, when the policy wants one).
        if view.weight < policy.steps[0] && !run.evaluated_first {
            run.evaluated_first = true;
            if policy.eval.as_ref().is_some_and(|e| e.before_first_step) {
                return vec![Action::Evaluate {
                    point: EvalPoint::FirstStep,
                    evidence: Vec::new(),
                }];
            }
            return vec![run.advance(view, policy.steps[0], Vec::new(), "first step", now)];
        }
        if now.saturating_duration_since(run.window_start) < policy.interval {
            return Vec::new();
        }
        let (outcome, gates) = analyse(view, run);
        run.window_start = now;
        if !matches!(outcome, Outcome::Hold(_)) || !gates.is_empty() {
            // A judged window is closed; a window short of data keeps accumulating.
            run.restart_counts(view);
        }
        let evidence: Vec<Value> = gates.iter().map(Gate::json).collect();
        let action = match outcome {
            Outcome::Hold(why) => {
                if now.saturating_duration_since(run.step_start) > policy.progress_deadline {
                    let reason = format!(
                        "progress deadline of {:?} passed: {why}",
                        policy.progress_deadline
                    );
                    run.roll_back(view, evidence, reason)
                } else {
                    run.decide(view, CanaryDecision::Hold, evidence, why, None)
                }
            }
            Outcome::Fail => {
                run.failures += 1;
                let reason = format!("failed gate: {}", failing(&gates));
                if run.failures >= policy.failure_limit {
                    run.roll_back(view, evidence, reason)
                } else {
                    let reason = format!(
                        "{reason} ({} of {} failures allowed)",
                        run.failures, policy.failure_limit
                    );
                    run.decide(view, CanaryDecision::Hold, evidence, reason, None)
                }
            }
            Outcome::Pass => {
                run.failures = 0;
                match policy.steps.iter().find(|s| **s > view.weight) {
                    Some(next) => run.advance(view, *next, evidence, "every gate passed", now),
                    None if policy.confirm_promotion => run.decide(
                        view,
                        CanaryDecision::Hold,
                        evidence,
                        "every step passed; awaiting an admin's promotion (confirm_promotion)"
                            .into(),
                        None,
                    ),
                    None if policy.eval.as_ref().is_some_and(|e| e.before_promotion) => {
                        Action::Evaluate {
                            point: EvalPoint::Promotion,
                            evidence,
                        }
                    }
                    None => run.promote(view, evidence),
                }
            }
        };
        vec![action]
    }

    /// The held-out evaluation an [`Action::Evaluate`] asked for came back: `Ok` with the
    /// evidence of a pass, `Err` with that of a failure.
    pub fn evaluated(
        &mut self,
        view: &View<'_>,
        point: EvalPoint,
        mut evidence: Vec<Value>,
        result: Result<Value, Value>,
        now: Instant,
    ) -> Vec<Action> {
        let Some(run) = self.runs.get_mut(view.route) else {
            return Vec::new();
        };
        let passed = result.is_ok();
        let evaluated = result.unwrap_or_else(|failed| failed);
        if passed {
            run.eval_passed = Some(evaluated.clone());
        }
        // What failed, for the reason: the categories and cases a comparative run names.
        let why = evaluated["note"]
            .as_str()
            .filter(|note| !note.is_empty())
            .map(|note| format!(": {note}"))
            .unwrap_or_default();
        evidence.push(evaluated);
        let action = match (point, passed) {
            (EvalPoint::FirstStep, true) => {
                run.advance(view, view.policy.steps[0], evidence, "first step", now)
            }
            (EvalPoint::FirstStep, false) => run.roll_back(
                view,
                evidence,
                format!("the held-out evaluation failed before the first step{why}"),
            ),
            (EvalPoint::Promotion, true) => run.promote(view, evidence),
            (EvalPoint::Promotion, false) => run.roll_back(
                view,
                evidence,
                format!("the held-out evaluation failed before promotion{why}"),
            ),
        };
        vec![action]
    }

    /// The writer refused the promotion of `route`'s run: hold at this generation until the
    /// table moves.
    pub fn promotion_refused(&mut self, route: &str) {
        if let Some(run) = self.runs.get_mut(route) {
            run.promotion_refused = Some(run.generation);
        }
    }
}

impl Rollout {
    fn new(label: &str, view: &View<'_>, now: Instant) -> Rollout {
        Rollout {
            candidate: label.to_string(),
            generation: view.generation,
            window_start: now,
            step_start: now,
            stable_at_start: view.stable.clone(),
            candidate_at_start: view.candidate_counts.clone(),
            failures: 0,
            evaluated_first: false,
            eval_passed: None,
            ramp: None,
            promotion_refused: None,
        }
    }

    fn restart_counts(&mut self, view: &View<'_>) {
        self.stable_at_start = view.stable.clone();
        self.candidate_at_start = view.candidate_counts.clone();
    }

    /// A change by the canary, fenced on the generation its decision was taken at.
    fn change(&self, command: Command, reason: String) -> Change {
        Change {
            command,
            actor: Actor::Canary,
            reason: Some(reason),
            if_match: Some(self.generation),
        }
    }

    fn decide(
        &self,
        view: &View<'_>,
        decision: CanaryDecision,
        gates: Vec<Value>,
        reason: String,
        then: Option<Command>,
    ) -> Action {
        Action::Decide(Decided {
            decision,
            version: self.candidate.clone(),
            weight: view.weight,
            gates,
            then: then.map(|command| self.change(command, reason.clone())),
            reason,
        })
    }

    fn advance(
        &mut self,
        view: &View<'_>,
        step: u16,
        gates: Vec<Value>,
        why: &str,
        now: Instant,
    ) -> Action {
        self.step_start = now;
        let reason = format!("{why}: step to {}", format_percent(step));
        let command = Command::SetWeight {
            route: view.route.to_string(),
            basis_points: step,
        };
        self.decide(view, CanaryDecision::Advance, gates, reason, Some(command))
    }

    /// Decides to promote. The evidence includes the held-out evaluation this run passed, so
    /// the task can check it still holds for what is promoted.
    fn promote(&self, view: &View<'_>, mut gates: Vec<Value>) -> Action {
        if let Some(eval) = &self.eval_passed {
            if !gates.iter().any(|g| g["gate"] == "eval") {
                gates.push(eval.clone());
            }
        }
        let command = Command::Promote {
            route: view.route.to_string(),
        };
        let reason = "every step passed".to_string();
        self.decide(view, CanaryDecision::Promote, gates, reason, Some(command))
    }

    /// Decides to roll back: at once, or (with `rollback_steps` below the weight) after ramping
    /// down one step per interval.
    fn roll_back(&mut self, view: &View<'_>, gates: Vec<Value>, reason: String) -> Action {
        self.ramp = ramp_down(view.policy, view.weight);
        let now = self.ramp.is_none().then(|| Command::Rollback {
            route: view.route.to_string(),
        });
        self.decide(view, CanaryDecision::Rollback, gates, reason, now)
    }

    /// Ramping down after a rollback decision: one step per interval, then the rollback.
    fn ramp_down_step(&mut self, view: &View<'_>, now: Instant) -> Option<Action> {
        if now.saturating_duration_since(self.window_start) < view.policy.interval {
            return None;
        }
        self.window_start = now;
        let ramp = self.ramp.as_mut()?;
        let (command, reason) = if ramp.is_empty() {
            self.ramp = None;
            let command = Command::Rollback {
                route: view.route.to_string(),
            };
            (command, "ramp-down done: rolling back".to_string())
        } else {
            let weight = ramp.remove(0);
            let command = Command::SetWeight {
                route: view.route.to_string(),
                basis_points: weight,
            };
            let reason = format!(
                "ramping down before the rollback: {}",
                format_percent(weight)
            );
            (command, reason)
        };
        Some(Action::Apply(self.change(command, reason)))
    }
}

/// The failed gates, for a decision's reason.
fn failing(gates: &[Gate]) -> String {
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
    failing.join("; ")
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

/// Judges the window since the run's last judged one.
fn analyse(view: &View<'_>, run: &Rollout) -> (Outcome, Vec<Gate>) {
    let policy = view.policy;
    let stable = view.stable.since(&run.stable_at_start);
    let cand = view.candidate_counts.since(&run.candidate_at_start);
    let (n_s, n_c, e_s, e_c) = (stable.requests, cand.requests, stable.errors, cand.errors);
    // At 100% stable takes no traffic: judge the candidate against the cap alone.
    let stable_needed = if view.weight >= 10_000 {
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
    if let (Some(min), true) = (policy.min_agreement, view.shadowed) {
        let (agreement, compared) = view.agreement;
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::Duration;

    use serde_json::json;
    use tokio::time::advance;

    use super::*;
    use crate::config::EvalGate;
    use crate::control::canary::counts::Counts;

    const ROUTE: &str = "chat";
    const CANDIDATE: &str = "chat@2";
    const INTERVAL: Duration = Duration::from_secs(60);
    /// The task's tick.
    const TICK: Duration = crate::control::canary::TICK;

    /// Responses served in one tick: (fast, errors) of stable, (fast, slow, errors) of the
    /// candidate. 300 ticks make an interval.
    type Traffic = ((u64, u64), (u64, u64, u64));
    const IDLE: Traffic = ((0, 0), (0, 0, 0));
    /// Both answer fast, without errors: 900 stable and 300 candidate responses an interval.
    const HEALTHY: Traffic = ((3, 0), (1, 0, 0));
    /// At 100%: only the candidate takes traffic.
    const ALL_CANDIDATE: Traffic = ((0, 0), (1, 0, 0));
    /// The candidate fails half its requests.
    const FAILING: Traffic = ((3, 0), (2, 0, 1));
    /// The candidate answers every request in 50–100 ms, stable under 10 ms.
    const SLOW: Traffic = ((3, 0), (0, 1, 0));

    /// One version's cumulative counters: `fast` responses under 10 ms, `slow` ones 50–100 ms.
    fn counts(fast: u64, slow: u64, errors: u64) -> Counts {
        let latency = vec![
            (0.01, fast),
            (0.05, fast),
            (0.1, fast + slow),
            (f64::INFINITY, fast + slow),
        ];
        Counts {
            requests: fast + slow,
            errors,
            latency: latency.clone(),
            ttfb: latency,
        }
    }

    /// The route as the task would show it to the step, and a writer that applies what the step
    /// asks for the way weir's does: only while the generation is the one it was fenced on.
    struct Route {
        policy: CanaryPolicy,
        generation: u64,
        weight: u16,
        candidate: Option<&'static str>,
        paused: bool,
        shadowed: bool,
        agreement: (Option<f64>, usize),
        /// Cumulative (fast, slow, errors) for stable and candidate.
        stable: (u64, u64, u64),
        canary: (u64, u64, u64),
        /// Every change the writer applied, and every one it refused as fenced out.
        applied: Vec<Command>,
        fenced_out: Vec<Change>,
    }

    impl Route {
        fn new(policy: CanaryPolicy) -> Route {
            Route {
                policy,
                generation: 1,
                weight: 0,
                candidate: Some(CANDIDATE),
                paused: false,
                shadowed: false,
                agreement: (None, 0),
                stable: (0, 0, 0),
                canary: (0, 0, 0),
                applied: Vec::new(),
                fenced_out: Vec::new(),
            }
        }

        fn view(&self) -> View<'_> {
            let tally = |(fast, slow, errors)| {
                Tally(HashMap::from([(String::new(), counts(fast, slow, errors))]))
            };
            View {
                route: ROUTE,
                policy: &self.policy,
                generation: self.generation,
                weight: self.weight,
                candidate: self.candidate,
                paused: self.paused,
                shadowed: self.shadowed,
                stable: tally(self.stable),
                candidate_counts: tally(self.canary),
                agreement: self.agreement,
            }
        }

        fn serve(&mut self, (stable, canary): Traffic) {
            self.stable.0 += stable.0;
            self.stable.2 += stable.1;
            self.canary.0 += canary.0;
            self.canary.1 += canary.1;
            self.canary.2 += canary.2;
        }

        /// An admin changes the route: the generation moves.
        fn admin_sets_weight(&mut self, weight: u16) {
            self.weight = weight;
            self.generation += 1;
        }

        fn admin_pauses(&mut self, paused: bool) {
            self.paused = paused;
            self.generation += 1;
        }

        fn write(&mut self, change: &Change) {
            assert_eq!(change.actor, Actor::Canary);
            if change.if_match != Some(self.generation) {
                self.fenced_out.push(change.clone());
                return;
            }
            match &change.command {
                Command::SetWeight { basis_points, .. } => self.weight = *basis_points,
                Command::Promote { .. } | Command::Rollback { .. } => self.candidate = None,
                other => panic!("the canary asked for {other:?}"),
            }
            self.applied.push(change.command.clone());
            self.generation += 1;
        }

        /// Carries out actions as the task does (every decision gets recorded); evaluations are
        /// the test's to answer.
        fn carry_out(&mut self, actions: &[Action]) {
            for action in actions {
                match action {
                    Action::Decide(Decided {
                        then: Some(change), ..
                    })
                    | Action::Apply(change) => self.write(change),
                    Action::Decide(_) | Action::Evaluate { .. } => {}
                }
            }
        }
    }

    /// A controller stepping one route on a paused clock, with traffic served every tick.
    struct Rig {
        controller: Controller,
        route: Route,
        traffic: Traffic,
    }

    impl Rig {
        fn new(policy: CanaryPolicy) -> Rig {
            Rig {
                controller: Controller::default(),
                route: Route::new(policy),
                traffic: IDLE,
            }
        }

        /// One tick now: its actions, carried out.
        fn tick(&mut self) -> Vec<Action> {
            let actions = self.controller.step(&self.route.view(), Instant::now());
            self.route.carry_out(&actions);
            actions
        }

        /// Ticks as the task does, serving traffic in between, until a tick acts; returns how
        /// long that took and what it did. Panics if nothing happens within `within`.
        async fn next(&mut self, within: Duration) -> (Duration, Vec<Action>) {
            let start = Instant::now();
            while start.elapsed() < within {
                advance(TICK).await;
                self.route.serve(self.traffic);
                let actions = self.tick();
                if !actions.is_empty() {
                    return (start.elapsed(), actions);
                }
            }
            panic!("the controller did nothing for {within:?}");
        }

        /// The next actions, which must come one interval (and at most a tick or two) on.
        async fn after_an_interval(&mut self) -> Vec<Action> {
            let (took, actions) = self.next(3 * INTERVAL).await;
            assert!(
                took >= INTERVAL && took <= INTERVAL + 2 * TICK,
                "acted after {took:?}: {actions:?}"
            );
            actions
        }

        /// Ticks for `d`, asserting that nothing happens.
        async fn quiet_for(&mut self, d: Duration) {
            let start = Instant::now();
            while start.elapsed() < d {
                advance(TICK).await;
                self.route.serve(self.traffic);
                let actions = self.tick();
                assert!(actions.is_empty(), "at {:?}: {actions:?}", start.elapsed());
            }
        }

        fn evaluated(
            &mut self,
            point: EvalPoint,
            evidence: Vec<Value>,
            result: Result<Value, Value>,
        ) -> Vec<Action> {
            let view = self.route.view();
            let actions = self
                .controller
                .evaluated(&view, point, evidence, result, Instant::now());
            self.route.carry_out(&actions);
            actions
        }
    }

    fn policy(steps: &[u16]) -> CanaryPolicy {
        CanaryPolicy {
            interval: INTERVAL,
            min_requests: 100,
            progress_deadline: Duration::from_secs(600),
            ..CanaryPolicy::with_steps(steps.to_vec())
        }
    }

    /// The one decision among `actions`.
    fn decided(actions: &[Action]) -> &Decided {
        match actions {
            [Action::Decide(d)] => d,
            other => panic!("expected one decision, got {other:?}"),
        }
    }

    fn set_weight(basis_points: u16) -> Command {
        Command::SetWeight {
            route: ROUTE.into(),
            basis_points,
        }
    }

    fn rollback() -> Command {
        Command::Rollback {
            route: ROUTE.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn advances_through_every_step_then_promotes_when_every_gate_passes() {
        let mut rig = Rig::new(policy(&[1000, 5000, 10_000]));
        let first = rig.tick();
        let d = decided(&first);
        assert_eq!(d.decision, CanaryDecision::Advance);
        assert_eq!(d.reason, "first step: step to 10%");
        assert_eq!(d.version, CANDIDATE);
        rig.traffic = HEALTHY;
        let second = rig.after_an_interval().await;
        let d = decided(&second);
        assert_eq!(d.decision, CanaryDecision::Advance, "{d:?}");
        assert_eq!(d.reason, "every gate passed: step to 50%");
        let gates: Vec<&str> = d
            .gates
            .iter()
            .map(|g| g["gate"].as_str().unwrap())
            .collect();
        assert_eq!(gates, ["error_rate", "latency_p99_ratio"]);
        let third = rig.after_an_interval().await;
        assert_eq!(decided(&third).reason, "every gate passed: step to 100%");
        // At 100% stable takes no traffic; the candidate is judged on its own.
        rig.traffic = ALL_CANDIDATE;
        let last = rig.after_an_interval().await;
        let d = decided(&last);
        assert_eq!(d.decision, CanaryDecision::Promote);
        assert_eq!(d.reason, "every step passed");
        assert_eq!(
            rig.route.applied,
            [
                set_weight(1000),
                set_weight(5000),
                set_weight(10_000),
                Command::Promote {
                    route: ROUTE.into()
                }
            ]
        );
        // Promoted: the run is forgotten.
        rig.quiet_for(INTERVAL).await;
        assert!(rig.controller.runs.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn too_little_data_holds_and_the_window_keeps_accumulating() {
        let mut rig = Rig::new(CanaryPolicy {
            min_requests: 500,
            ..policy(&[1000, 10_000])
        });
        rig.tick();
        rig.traffic = HEALTHY;
        let short = rig.after_an_interval().await;
        let d = decided(&short);
        assert_eq!(d.decision, CanaryDecision::Hold);
        assert_eq!(
            d.reason,
            "not enough data: candidate 300/500, stable 900/500 responses this window"
        );
        assert!(d.then.is_none() && d.gates.is_empty());
        // The next 300 make 600 in the same window: judged, and passed.
        let judged = rig.after_an_interval().await;
        assert_eq!(decided(&judged).decision, CanaryDecision::Advance);
        assert_eq!(rig.route.weight, 10_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_not_judged_by_its_progress_deadline_is_rolled_back() {
        let mut rig = Rig::new(CanaryPolicy {
            progress_deadline: Duration::from_secs(150),
            ..policy(&[1000, 10_000])
        });
        rig.tick();
        let held = rig.after_an_interval().await;
        assert_eq!(decided(&held).decision, CanaryDecision::Hold);
        assert_eq!(
            decided(&rig.after_an_interval().await).decision,
            CanaryDecision::Hold
        );
        let late = rig.after_an_interval().await;
        let d = decided(&late);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert!(
            d.reason
                .starts_with("progress deadline of 150s passed: not enough data"),
            "{}",
            d.reason
        );
        assert_eq!(rig.route.applied, [set_weight(1000), rollback()]);
        assert_eq!(rig.route.candidate, None);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_windows_hold_up_to_the_failure_limit_then_roll_back() {
        let mut rig = Rig::new(CanaryPolicy {
            failure_limit: 2,
            ..policy(&[1000, 5000, 10_000])
        });
        rig.tick();
        rig.traffic = FAILING;
        let once = rig.after_an_interval().await;
        let d = decided(&once);
        assert_eq!(d.decision, CanaryDecision::Hold);
        assert!(
            d.reason.starts_with("failed gate: error_rate 0.5000"),
            "{}",
            d.reason
        );
        assert!(
            d.reason.ends_with("(1 of 2 failures allowed)"),
            "{}",
            d.reason
        );
        // A passing window clears the count: the next failure holds again.
        rig.traffic = HEALTHY;
        let passed = rig.after_an_interval().await;
        assert_eq!(decided(&passed).decision, CanaryDecision::Advance);
        rig.traffic = FAILING;
        let again = rig.after_an_interval().await;
        assert!(decided(&again)
            .reason
            .ends_with("(1 of 2 failures allowed)"));
        // Two failures in a row roll back.
        let twice = rig.after_an_interval().await;
        let d = decided(&twice);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert!(
            d.reason.starts_with("failed gate: error_rate"),
            "{}",
            d.reason
        );
        assert_eq!(d.then.as_ref().map(|c| &c.command), Some(&rollback()));
        assert_eq!(rig.route.candidate, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_candidate_fails_the_latency_gate() {
        let mut rig = Rig::new(policy(&[1000, 10_000]));
        rig.tick();
        rig.traffic = SLOW;
        let slow = rig.after_an_interval().await;
        let d = decided(&slow);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert!(
            d.reason.starts_with("failed gate: latency_p99_ratio"),
            "{}",
            d.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollback_with_rollback_steps_ramps_down_one_step_per_interval() {
        let mut rig = Rig::new(CanaryPolicy {
            rollback_steps: vec![500, 100],
            ..policy(&[2000, 10_000])
        });
        rig.tick();
        rig.traffic = FAILING;
        let failed = rig.after_an_interval().await;
        let d = decided(&failed);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert!(
            d.then.is_none(),
            "a ramped rollback waits for its ramp: {d:?}"
        );
        assert_eq!(rig.route.weight, 2000);
        let mut steps = Vec::new();
        for _ in 0..3 {
            for action in rig.after_an_interval().await {
                match action {
                    Action::Apply(change) => steps.push((change.command, change.reason.unwrap())),
                    other => panic!("ramping down, the controller decided {other:?}"),
                }
            }
        }
        let reason = |s: &str| s.to_string();
        assert_eq!(
            steps,
            [
                (
                    set_weight(500),
                    reason("ramping down before the rollback: 5%")
                ),
                (
                    set_weight(100),
                    reason("ramping down before the rollback: 1%")
                ),
                (rollback(), reason("ramp-down done: rolling back")),
            ]
        );
        assert_eq!(rig.route.candidate, None);
        assert!(rig.route.fenced_out.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_route_is_left_alone_and_its_deadline_clock_stops() {
        let mut rig = Rig::new(CanaryPolicy {
            progress_deadline: Duration::from_secs(150),
            ..policy(&[1000, 10_000])
        });
        rig.tick();
        rig.route.admin_pauses(true);
        // Ten minutes paused, failing and past the deadline: the controller does nothing.
        rig.traffic = FAILING;
        rig.quiet_for(10 * INTERVAL).await;
        assert_eq!(rig.route.applied, [set_weight(1000)]);
        // Resumed, the step has its time again: too little data is a hold, not the deadline.
        rig.route.admin_pauses(false);
        rig.traffic = IDLE;
        let resumed = rig.after_an_interval().await;
        let d = decided(&resumed);
        assert_eq!(d.decision, CanaryDecision::Hold, "{d:?}");
        assert!(d.reason.starts_with("not enough data"), "{}", d.reason);
    }

    #[tokio::test(start_paused = true)]
    async fn every_change_is_fenced_on_the_generation_it_was_decided_at() {
        let mut rig = Rig::new(policy(&[1000, 5000, 10_000]));
        let first = rig.controller.step(&rig.route.view(), Instant::now());
        let fenced = decided(&first).then.clone().unwrap();
        assert_eq!(fenced.if_match, Some(1));
        // An admin changes the route before the writer gets the step: it is fenced out.
        rig.route.admin_sets_weight(2000);
        rig.route.carry_out(&first);
        assert_eq!(rig.route.fenced_out, [fenced]);
        assert_eq!(rig.route.weight, 2000);
        // A burst served before the controller saw the move does not count: its window
        // restarts on the new generation.
        rig.route.serve(((900, 0), (300, 0, 0)));
        let fresh = rig.after_an_interval().await;
        assert_eq!(decided(&fresh).decision, CanaryDecision::Hold);
        rig.traffic = HEALTHY;
        let next = rig.after_an_interval().await;
        let d = decided(&next);
        assert_eq!(d.reason, "every gate passed: step to 50%");
        assert_eq!(d.then.as_ref().unwrap().if_match, Some(2));
        assert_eq!(rig.route.weight, 5000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_promotion_holds_until_the_table_moves() {
        let mut rig = Rig::new(policy(&[10_000]));
        rig.tick();
        rig.traffic = ALL_CANDIDATE;
        // The writer refuses the promotion (say the registry's rules do).
        let generation = rig.route.generation;
        let (_, promote) = rig.next(3 * INTERVAL).await;
        let d = decided(&promote);
        assert_eq!(d.decision, CanaryDecision::Promote);
        assert_eq!(rig.route.candidate, None);
        rig.route.candidate = Some(CANDIDATE);
        rig.route.generation = generation;
        rig.controller.promotion_refused(ROUTE);
        rig.quiet_for(5 * INTERVAL).await;
        // An admin sets a weight: the controller judges again (and promotes).
        rig.route.admin_sets_weight(10_000);
        let again = rig.after_an_interval().await;
        assert_eq!(decided(&again).decision, CanaryDecision::Promote);
    }

    #[tokio::test(start_paused = true)]
    async fn the_held_out_evaluation_gates_the_first_step_and_the_promotion() {
        let eval = EvalGate {
            file: "eval.jsonl".into(),
            threshold: 1.0,
            before_first_step: true,
            before_promotion: true,
            compare: false,
            categories: Default::default(),
        };
        let with_eval = CanaryPolicy {
            eval: Some(eval.clone()),
            ..policy(&[10_000])
        };
        let failed = json!({"gate": "eval", "passed": false});
        let passed = json!({"gate": "eval", "passed": true});

        // A failing evaluation before the first step rolls back; nothing took traffic.
        let mut rig = Rig::new(with_eval.clone());
        let asked = rig.tick();
        assert_eq!(
            asked,
            [Action::Evaluate {
                point: EvalPoint::FirstStep,
                evidence: Vec::new()
            }]
        );
        let rolled = rig.evaluated(EvalPoint::FirstStep, Vec::new(), Err(failed.clone()));
        let d = decided(&rolled);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert_eq!(
            d.reason,
            "the held-out evaluation failed before the first step"
        );
        assert_eq!(d.gates, std::slice::from_ref(&failed));
        assert_eq!(rig.route.applied, [rollback()]);

        // A passing one takes the first step; the last step passing asks for it again with the
        // gates' evidence, and its pass promotes.
        let mut rig = Rig::new(with_eval);
        rig.tick();
        let first = rig.evaluated(EvalPoint::FirstStep, Vec::new(), Ok(passed.clone()));
        assert_eq!(decided(&first).gates, std::slice::from_ref(&passed));
        assert_eq!(rig.route.weight, 10_000);
        rig.traffic = ALL_CANDIDATE;
        let asked = rig.after_an_interval().await;
        let [Action::Evaluate {
            point: EvalPoint::Promotion,
            evidence,
        }] = &asked[..]
        else {
            panic!("expected the evaluation before promotion, got {asked:?}");
        };
        assert_eq!(evidence.len(), 2, "{evidence:?}");
        let promoted = rig.evaluated(EvalPoint::Promotion, evidence.clone(), Ok(passed.clone()));
        let d = decided(&promoted);
        assert_eq!(d.decision, CanaryDecision::Promote);
        assert_eq!(d.gates.len(), 3);
        assert_eq!(d.gates.last(), Some(&passed));

        // A failing one before promotion rolls back instead.
        let mut rig = Rig::new(CanaryPolicy {
            eval: Some(EvalGate {
                before_first_step: false,
                ..eval
            }),
            ..policy(&[10_000])
        });
        assert_eq!(decided(&rig.tick()).decision, CanaryDecision::Advance);
        rig.traffic = ALL_CANDIDATE;
        let asked = rig.after_an_interval().await;
        assert!(matches!(
            &asked[..],
            [Action::Evaluate {
                point: EvalPoint::Promotion,
                ..
            }]
        ));
        let refused = rig.evaluated(EvalPoint::Promotion, Vec::new(), Err(failed));
        let d = decided(&refused);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert_eq!(d.reason, "the held-out evaluation failed before promotion");
    }

    #[tokio::test(start_paused = true)]
    async fn confirm_promotion_holds_after_the_last_step_for_an_admin() {
        let mut rig = Rig::new(CanaryPolicy {
            confirm_promotion: true,
            ..policy(&[10_000])
        });
        rig.tick();
        rig.traffic = ALL_CANDIDATE;
        let held = rig.after_an_interval().await;
        let d = decided(&held);
        assert_eq!(d.decision, CanaryDecision::Hold);
        assert!(d.reason.contains("confirm_promotion"), "{}", d.reason);
        assert!(d.then.is_none());
        assert_eq!(rig.route.candidate, Some(CANDIDATE));
    }

    #[tokio::test(start_paused = true)]
    async fn the_agreement_gate_waits_for_comparisons_and_fails_on_disagreement() {
        let mut rig = Rig::new(CanaryPolicy {
            min_agreement: Some(0.9),
            min_comparisons: 20,
            ..policy(&[1000, 10_000])
        });
        rig.route.shadowed = true;
        rig.tick();
        rig.traffic = HEALTHY;
        rig.route.agreement = (Some(1.0), 5);
        let few = rig.after_an_interval().await;
        let d = decided(&few);
        assert_eq!(d.decision, CanaryDecision::Hold);
        assert_eq!(d.reason, "not enough shadow comparisons: 5/20");
        rig.route.agreement = (Some(0.5), 50);
        let disagreed = rig.after_an_interval().await;
        let d = decided(&disagreed);
        assert_eq!(d.decision, CanaryDecision::Rollback);
        assert!(
            d.reason.starts_with("failed gate: agreement 0.5000"),
            "{}",
            d.reason
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_candidate_starts_a_new_run() {
        let mut rig = Rig::new(CanaryPolicy {
            failure_limit: 3,
            ..policy(&[1000, 10_000])
        });
        rig.tick();
        rig.traffic = FAILING;
        rig.after_an_interval().await;
        assert_eq!(rig.controller.runs[ROUTE].failures, 1);
        rig.route.candidate = Some("chat@3");
        rig.route.admin_sets_weight(0);
        let first = rig.tick();
        let d = decided(&first);
        assert_eq!(
            (d.decision, d.version.as_str()),
            (CanaryDecision::Advance, "chat@3")
        );
        assert_eq!(rig.controller.runs[ROUTE].failures, 0);
    }
}
