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

use crate::config::units::{format_percent, parse_duration, parse_percent};
use crate::config::QuickMode;
use crate::server::{Drained, Server};

pub use backend::{ModelServer, SpawnedBackend};
pub use stats::{
    Comparison, ErrorKind, LatencyHistogram, Outcome, Snapshot, Stats, StickyReport, Verdict,
    VersionStats, NO_HEADER, NO_RESPONSE,
};
pub use traffic::{Traffic, TrafficReport};
pub use view::{verdict_line, LiveView};

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
    /// How long to send traffic, e.g. 20s or 1m.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Target request rate, all workers together (0: as fast as they can).
    #[arg(long, default_value_t = 200)]
    pub rps: u32,

    /// Requests in flight at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// Share of traffic for the candidate, e.g. 10%, 0.5%.
    #[arg(long, default_value = "10%", value_parser = parse_weight)]
    pub weight: String,

    /// Share of the candidate's requests that fail with a 500 (0.0 to 1.0).
    #[arg(long, default_value_t = 0.05, value_parser = parse_share)]
    pub candidate_error_rate: f64,

    /// Time the candidate model server takes before answering.
    #[arg(long, default_value = "30ms", value_parser = parse_duration)]
    pub candidate_latency: Duration,

    /// Time the stable model server takes before answering.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub stable_latency: Duration,

    /// Share of requests that ask for a streamed answer (0.0 to 1.0).
    #[arg(long, default_value_t = 0.3, value_parser = parse_share)]
    pub stream_share: f64,

    /// Send a user id header (x-session-id) and route on it, so each user keeps one version.
    #[arg(long)]
    pub sticky: bool,
}

fn parse_weight(text: &str) -> Result<String, String> {
    parse_percent(text).map(|_| text.to_string())
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!(
            "expected a share between 0.0 and 1.0 such as 0.05, got {text:?}"
        )),
    }
}

/// Runs the demo: model servers, proxy, traffic and live view, then a summary and a verdict.
/// Ctrl-C stops the traffic early and still summarizes; a second Ctrl-C exits at once.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let local: SocketAddr = ([127, 0, 0, 1], 0).into();
    let stable = ModelServer::new("chat", "v1")
        .latency(opts.stable_latency)
        .token_delay(TOKEN_DELAY)
        .spawn(local)
        .await
        .context("cannot start the stable model server")?;
    let candidate = ModelServer::new("chat", "v2")
        .latency(opts.candidate_latency)
        .error_rate(opts.candidate_error_rate)
        .token_delay(TOKEN_DELAY)
        .spawn(local)
        .await
        .context("cannot start the candidate model server")?;

    let state_dir = std::env::temp_dir().join(format!("weir-demo-{}", std::process::id()));
    let config = QuickMode {
        stable: format!("{}={}", stable.label(), stable.url()),
        candidate: Some(format!("{}={}", candidate.label(), candidate.url())),
        weight: Some(opts.weight.clone()),
        sticky_header: opts.sticky.then(|| SESSION_HEADER.to_string()),
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        state_dir: Some(state_dir.clone()),
        ..Default::default()
    }
    .into_config()
    .context("cannot build the demo configuration")?;
    let weight = config.routes[0].weight;
    let drain_timeout = config.proxy.drain_timeout;
    let version_header = config
        .proxy
        .version_header
        .clone()
        .unwrap_or_else(|| HeaderName::from_static("x-weir-version"));
    let running = Server::start(config)
        .await
        .context("cannot start the proxy")?;
    let proxy = format!("http://{}", running.proxy_addr());
    let admin = format!("http://{}", running.admin_addr());

    println!(
        "weir demo: {} takes {} of traffic next to {} for {}",
        candidate.label(),
        format_percent(weight),
        stable.label(),
        humantime::format_duration(opts.duration)
    );
    println!(
        "  stable     {:<9} {}  {} latency",
        stable.label(),
        stable.url(),
        humantime::format_duration(opts.stable_latency)
    );
    println!(
        "  candidate  {:<9} {}  {} latency, {:.1}% injected errors",
        candidate.label(),
        candidate.url(),
        humantime::format_duration(opts.candidate_latency),
        opts.candidate_error_rate * 100.0
    );
    println!("  proxy      {proxy}");
    println!(
        "             curl {proxy}/v1/chat/completions -d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}]}}'"
    );
    println!("  admin      {admin}");
    println!("             curl {admin}/v1/routes    curl -s {admin}/metrics | grep ^weir_requests_total");
    println!(
        "  traffic    {} req/s from {} workers, {:.0}% streamed{}",
        opts.rps,
        opts.concurrency,
        opts.stream_share * 100.0,
        if opts.sticky {
            format!(", {SESSIONS} users sticky on {SESSION_HEADER}")
        } else {
            String::new()
        }
    );
    println!("  Ctrl-C stops early and summarizes");
    println!();

    let stats = Arc::new(Stats::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut traffic = Traffic::new(running.proxy_addr())
        .rps(opts.rps)
        .concurrency(opts.concurrency as usize)
        .duration(opts.duration)
        .stream_share(opts.stream_share)
        .version_header(version_header);
    if opts.sticky {
        traffic = traffic.sessions(HeaderName::from_static(SESSION_HEADER), SESSIONS);
    }
    let mut traffic_run = tokio::spawn(traffic.run(stats.clone(), stop_rx));

    let mut view = LiveView::new(opts.duration);
    view.set_role(stable.label(), "stable");
    view.set_role(candidate.label(), "candidate");
    let mut refresh = tokio::time::interval(REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut interrupted = false;
    let report = loop {
        tokio::select! {
            _ = refresh.tick() => view.update(&stats.snapshot())?,
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
    view.update(&snapshot)?;
    view.clear()?;

    // On a terminal the summary takes the place of the live table, under the banner's blank line.
    if !view.is_terminal() {
        println!();
    }
    if report.interrupted {
        println!(
            "Stopped early by Ctrl-C{}.",
            if report.abandoned > 0 {
                format!(
                    "; {} requests still in flight were abandoned and are not counted",
                    report.abandoned
                )
            } else {
                String::new()
            }
        );
    }
    for line in view.summary(&snapshot, report.elapsed) {
        println!("{line}");
    }
    let empty = VersionStats::default();
    let comparison = Comparison::new(
        snapshot.get(stable.label()).unwrap_or(&empty),
        snapshot.get(candidate.label()).unwrap_or(&empty),
    );
    println!(
        "{}",
        verdict_line(stable.label(), candidate.label(), &comparison)
    );
    println!(
        "  backends saw {} (stable) and {} (candidate) chat requests",
        stable.chat_requests(),
        candidate.chat_requests()
    );

    running.shutdown();
    let drained =
        tokio::time::timeout(drain_timeout + Duration::from_secs(5), running.wait()).await;
    match drained {
        Ok(Drained::Clean) => println!("Proxy stopped cleanly."),
        Ok(Drained::TimedOut) => println!(
            "Proxy stopped after its drain timeout ({}) with connections still open.",
            humantime::format_duration(drain_timeout)
        ),
        Err(_) => println!("Proxy did not stop within its drain timeout; leaving it behind."),
    }
    stable.shutdown().await;
    candidate.shutdown().await;
    let _ = std::fs::remove_dir_all(&state_dir);
    Ok(())
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
        assert_eq!(cli.demo.duration, Duration::from_secs(20));
        assert_eq!((cli.demo.rps, cli.demo.concurrency), (200, 16));
        assert_eq!(cli.demo.weight, "10%");
        assert_eq!(cli.demo.candidate_latency, Duration::from_millis(30));
        assert!(!cli.demo.sticky);

        let cli = Cli::try_parse_from(["weir", "--duration", "5s", "--weight", "0.5%", "--sticky"])
            .unwrap();
        assert_eq!(cli.demo.duration, Duration::from_secs(5));
        assert!(cli.demo.sticky);
        assert!(Cli::try_parse_from(["weir", "--weight", "150%"]).is_err());
        assert!(Cli::try_parse_from(["weir", "--stream-share", "1.5"]).is_err());
        assert!(Cli::try_parse_from(["weir", "--concurrency", "0"]).is_err());
    }
}
