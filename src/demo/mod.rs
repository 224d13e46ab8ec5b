//! `weir demo`: a canary on one machine with nothing installed — two built-in model servers, the
//! proxy in front of them, generated traffic, and a live view of what each version served.
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
) -> String {
    let mut text = format!(
        "[listener]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[state]\ndir = {:?}\n\n",
        state_dir.display().to_string()
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
    text.push_str(&format!(
        "[[routes]]\nname = \"chat\"\nstable = {stable:?}\ncandidate = {candidate:?}\n{}\n[routes.canary]\nsteps = [{}]\ninterval = {:?}\nmin_requests = {}\nprogress_deadline = {:?}\n",
        if opts.sticky { format!("sticky_header = {SESSION_HEADER:?}\n") } else { String::new() },
        steps.join(", "),
        humantime::format_duration(opts.interval).to_string(),
        opts.min_requests,
        humantime::format_duration(opts.duration).to_string(),
    ));
    text
}

/// Runs the demo: a healthy candidate stepped up and promoted, then a bad one rolled back, with
/// the canary's decisions and the audit trail shown as they happen.
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
    std::fs::write(
        &config_path,
        demo_config(&opts, &state_dir, &versions, v1.label(), v2.label()),
    )
    .context("cannot write the demo config")?;
    let config = crate::Config::from_file(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let drain_timeout = config.proxy.drain_timeout;
    let running = Server::start(config)
        .await
        .context("cannot start the proxy")?;
    let proxy = format!("http://{}", running.proxy_addr());
    let admin = format!("http://{}", running.admin_addr());

    println!("weir demo: a canary on this machine — a healthy candidate is promoted, a bad one rolled back");
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
    )
    .await?;
    let mut second = None;
    if !first.interrupted {
        let stable_now = running.live().state.routes[0].stable.clone();
        std::fs::write(
            &config_path,
            demo_config(&opts, &state_dir, &versions, &stable_now, v3.label()),
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
            )
            .await?,
        );
    }

    println!();
    println!("Audit trail ({}):", state_dir.join("audit.jsonl").display());
    print_audit(&state_dir.join("audit.jsonl"));
    println!();
    println!(
        "Outcome: {}{}",
        first.outcome,
        second
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
    let mut traffic_run = tokio::spawn(traffic.run(stats.clone(), stop_rx));
    let mut view = LiveView::new(opts.duration);
    view.set_role(stable, "stable");
    view.set_role(candidate, "candidate");
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = std::time::Instant::now();
    let mut last_shown = String::new();
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
