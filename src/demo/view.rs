//! Showing traffic stats to a person: a live table redrawn in place on a terminal (a plain line
//! every two seconds otherwise), then a summary and a one-line verdict.
//!
//! Rendering is pure (stats in, lines out); only [`LiveView::update`] and [`LiveView::clear`]
//! write to stdout.

use std::io::{self, IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use super::stats::{FailureKind, Snapshot, VersionStats, NO_HEADER, NO_RESPONSE};

/// A line-per-tick view writes at most this often.
const PLAIN_INTERVAL: Duration = Duration::from_secs(2);
/// Updates come on a timer that drifts a little; without slack a line would skip a tick.
const PLAIN_SLACK: Duration = Duration::from_millis(250);

/// The live view of a traffic run.
#[derive(Debug)]
pub struct LiveView {
    terminal: bool,
    /// `(label, role)`, in display order.
    roles: Vec<(String, String)>,
    started: Instant,
    planned: Duration,
    /// Lines of the frame on screen, to move back over on a terminal.
    drawn: usize,
    last_plain: Option<Instant>,
    /// Total requests at the previous update, for the current rate.
    previous: Option<(Instant, u64)>,
    rate: f64,
}

// === impl LiveView ===

impl LiveView {
    /// A view of a run planned to last `planned`, starting now. It redraws in place when stdout
    /// is a terminal.
    pub fn new(planned: Duration) -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        LiveView {
            terminal: io::stdout().is_terminal() && !dumb,
            roles: Vec::new(),
            started: Instant::now(),
            planned,
            drawn: 0,
            // A line-per-tick view starts talking after its first interval, not at zero.
            last_plain: Some(Instant::now()),
            previous: None,
            rate: 0.0,
        }
    }

    /// Whether to redraw in place (a terminal) or print a line every two seconds.
    #[cfg(test)]
    pub fn terminal(mut self, terminal: bool) -> Self {
        self.terminal = terminal;
        self
    }

    /// Names the role of a version (`stable`, `candidate`); versions are shown in the order their
    /// role was first set. Setting it again (after a promotion) changes the role in place.
    pub fn set_role(&mut self, label: &str, role: &str) {
        match self.roles.iter_mut().find(|(l, _)| l == label) {
            Some((_, r)) => *r = role.to_string(),
            None => self.roles.push((label.to_string(), role.to_string())),
        }
    }

    pub fn role(&self, label: &str) -> &str {
        match self.roles.iter().find(|(l, _)| l == label) {
            Some((_, role)) => role,
            None if label == NO_HEADER || label == NO_RESPONSE => "-",
            None => "other",
        }
    }

    /// Shows `snapshot`; call it about twice a second.
    pub fn update(&mut self, snapshot: &Snapshot) -> io::Result<()> {
        let now = Instant::now();
        let total = snapshot.requests();
        if let Some((at, before)) = self.previous {
            let seconds = now.duration_since(at).as_secs_f64();
            if seconds >= 0.25 {
                self.rate = total.saturating_sub(before) as f64 / seconds;
                self.previous = Some((now, total));
            }
        } else {
            self.rate = 0.0;
            self.previous = Some((now, total));
        }

        let mut out = io::stdout().lock();
        if self.terminal {
            let mut frame = String::new();
            if self.drawn > 0 {
                // Back to the first line of the previous frame, and clear from there down.
                frame.push_str(&format!("\x1b[{}F\x1b[J", self.drawn));
            }
            let lines = self.frame(snapshot);
            self.drawn = lines.len();
            for line in lines {
                frame.push_str(&line);
                frame.push('\n');
            }
            out.write_all(frame.as_bytes())?;
        } else {
            if self
                .last_plain
                .is_some_and(|at| now.duration_since(at) + PLAIN_SLACK < PLAIN_INTERVAL)
            {
                return Ok(());
            }
            self.last_plain = Some(now);
            writeln!(out, "{}", self.line(snapshot))?;
        }
        out.flush()
    }

    /// Erases the live table from a terminal, so the summary takes its place.
    pub fn clear(&mut self) -> io::Result<()> {
        if self.terminal && self.drawn > 0 {
            let mut out = io::stdout().lock();
            write!(out, "\x1b[{}F\x1b[J", self.drawn)?;
            self.drawn = 0;
            out.flush()?;
        }
        Ok(())
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The title and table drawn on a terminal.
    pub fn frame(&self, snapshot: &Snapshot) -> Vec<String> {
        let mut lines = vec![format!(
            "{} of {} · {} requests · {:.0} req/s",
            fmt_secs(self.elapsed().min(self.planned)),
            fmt_secs(self.planned),
            snapshot.requests(),
            self.rate
        )];
        let headers = [
            "version", "role", "requests", "share", "errors", "error %", "p50", "p99", "ttfb p99",
        ];
        let rows: Vec<Vec<String>> = self
            .ordered(snapshot)
            .into_iter()
            .map(|(label, v)| {
                vec![
                    label.to_string(),
                    self.role(label).to_string(),
                    v.requests.to_string(),
                    fmt_share(snapshot.share(label)),
                    v.errors.to_string(),
                    fmt_rate(v.error_rate()),
                    fmt_latency(v.latency.quantile(0.5)),
                    fmt_latency(v.latency.quantile(0.99)),
                    fmt_latency(v.first_byte.quantile(0.99)),
                ]
            })
            .collect();
        lines.extend(table(&headers, &rows, 2));
        lines
    }

    /// One line for logs and pipes.
    pub fn line(&self, snapshot: &Snapshot) -> String {
        let mut line = format!(
            "[{:>6}] {} requests, {:.0} req/s",
            fmt_secs(self.elapsed()),
            snapshot.requests(),
            self.rate
        );
        for (label, v) in self.ordered(snapshot) {
            line.push_str(&format!(
                " | {label} ({}): {} req {} errors ({}) p50 {} p99 {}",
                self.role(label),
                v.requests,
                v.errors,
                fmt_rate(v.error_rate()),
                fmt_latency(v.latency.quantile(0.5)),
                fmt_latency(v.latency.quantile(0.99)),
            ));
        }
        line
    }

    /// The end-of-run report: a table with the stream columns, where errors came from, and what
    /// the run checked about the proxy.
    pub fn summary(&self, snapshot: &Snapshot, elapsed: Duration) -> Vec<String> {
        let total = snapshot.requests();
        let streams: u64 = snapshot.versions.values().map(|v| v.streams).sum();
        let mut lines = vec![format!(
            "Summary: {} requests in {} ({:.1} req/s), {} of them streamed",
            total,
            fmt_secs(elapsed),
            total as f64 / elapsed.as_secs_f64().max(1e-9),
            streams
        )];
        let headers = [
            "version", "role", "requests", "share", "errors", "error %", "p50", "p99", "max",
            "streams", "ttfb p50", "ttfb p99",
        ];
        let ordered = self.ordered(snapshot);
        let rows: Vec<Vec<String>> = ordered
            .iter()
            .map(|&(label, v)| {
                vec![
                    label.to_string(),
                    self.role(label).to_string(),
                    v.requests.to_string(),
                    fmt_share(snapshot.share(label)),
                    v.errors.to_string(),
                    fmt_rate(v.error_rate()),
                    fmt_latency(v.latency.quantile(0.5)),
                    fmt_latency(v.latency.quantile(0.99)),
                    fmt_latency(v.latency.max()),
                    v.streams.to_string(),
                    fmt_latency(v.first_byte.quantile(0.5)),
                    fmt_latency(v.first_byte.quantile(0.99)),
                ]
            })
            .collect();
        lines.extend(table(&headers, &rows, 2));
        lines.push(
            "  p50/p99/max: whole non-streaming responses; ttfb: first byte of streams; \
             successful requests only"
                .to_string(),
        );

        for &(label, v) in &ordered {
            // Status codes say more than "5xx"; the other kinds have no status to show.
            let statuses = v
                .error_statuses()
                .map(|(status, n)| format!("{n} × {status}"));
            let others = FailureKind::ALL
                .iter()
                .filter(|&&kind| {
                    !matches!(kind, FailureKind::ServerError | FailureKind::ClientError)
                })
                .filter(|&&kind| v.errors_of(kind) > 0)
                .map(|&kind| format!("{} × {}", v.errors_of(kind), kind.as_str()));
            let kinds: Vec<String> = statuses.chain(others).collect();
            if !kinds.is_empty() {
                lines.push(format!("  errors of {label}: {}", kinds.join(", ")));
            }
        }

        let checked: u64 = snapshot.versions.values().map(|v| v.version_checked).sum();
        let mismatched: u64 = snapshot
            .versions
            .values()
            .map(|v| v.version_mismatches)
            .sum();
        let unlabeled = snapshot.get(NO_HEADER).map_or(0, |v| v.requests);
        lines.push(if mismatched == 0 {
            format!("  check: x-weir-version named the backend that answered in all {checked} responses that showed both")
        } else {
            format!("  check FAILED: x-weir-version named another version than the backend that answered in {mismatched} of {checked} responses")
        });
        if unlabeled > 0 {
            lines.push(format!(
                "  check FAILED: {unlabeled} responses came without an x-weir-version header"
            ));
        }
        if let Some(sticky) = &snapshot.sticky {
            let cohorts: Vec<String> = sticky
                .first_versions
                .iter()
                .map(|(label, n)| format!("{n} on {label}"))
                .collect();
            lines.push(if sticky.moved_sessions == 0 {
                format!(
                    "  check: each of {} sticky sessions stayed on one version ({})",
                    sticky.sessions,
                    cohorts.join(", ")
                )
            } else {
                format!(
                    "  check FAILED: {} of {} sticky sessions were served by more than one version ({} responses)",
                    sticky.moved_sessions, sticky.sessions, sticky.moved_responses
                )
            });
        }
        lines
    }

    /// Versions with a role first (in role order), then any others by label.
    fn ordered<'a>(&self, snapshot: &'a Snapshot) -> Vec<(&'a str, &'a VersionStats)> {
        let mut ordered: Vec<(&str, &VersionStats)> = self
            .roles
            .iter()
            .filter_map(|(label, _)| snapshot.versions.get_key_value(label.as_str()))
            .map(|(l, v)| (l.as_str(), v))
            .collect();
        for (label, v) in &snapshot.versions {
            if !self.roles.iter().any(|(l, _)| l == label) {
                ordered.push((label, v));
            }
        }
        ordered
    }
}

/// Aligns `rows` under `headers`: the first `left` columns to the left, the rest to the right.
fn table(headers: &[&str], rows: &[Vec<String>], left: usize) -> Vec<String> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let render = |cells: &mut dyn Iterator<Item = &str>| {
        let mut line = String::new();
        for (i, (cell, &width)) in cells.zip(&widths).enumerate() {
            let pad = width - cell.chars().count();
            line.push_str("  ");
            if i < left {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        line.trim_end().to_string()
    };
    let mut lines = vec![render(&mut headers.iter().copied())];
    for row in rows {
        lines.push(render(&mut row.iter().map(String::as_str)));
    }
    lines
}

pub fn fmt_latency(latency: Option<Duration>) -> String {
    let Some(latency) = latency else {
        return "-".to_string();
    };
    let ms = latency.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}ms")
    } else if ms < 1000.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

fn fmt_secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn fmt_share(share: f64) -> String {
    format!("{:.1}%", share * 100.0)
}

fn fmt_rate(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::stats::{Outcome, Stats};
    use http::StatusCode;

    fn ok(version: &str, ms: u64) -> Outcome {
        Outcome {
            version: Some(version.to_string()),
            status: Some(StatusCode::OK),
            stream: false,
            latency: Duration::from_millis(ms),
            first_byte: None,
            error: None,
            body_model: Some(version.to_string()),
            session: None,
        }
    }

    #[test]
    fn tables_align_and_keep_role_order() {
        let stats = Stats::new();
        for _ in 0..9 {
            stats.record(&ok("chat@v1", 10));
        }
        stats.record(&Outcome {
            error: Some(FailureKind::ServerError),
            status: Some(StatusCode::INTERNAL_SERVER_ERROR),
            ..ok("chat@v2", 30)
        });
        let mut view = LiveView::new(Duration::from_secs(5)).terminal(false);
        view.set_role("chat@v2", "candidate");
        view.set_role("chat@v1", "stable");
        let snap = stats.snapshot();
        let frame = view.frame(&snap);
        assert!(frame[1].contains("version") && frame[1].contains("ttfb p99"));
        assert!(frame[2].contains("chat@v2") && frame[2].contains("100.00%"));
        assert!(frame[3].contains("chat@v1") && frame[3].contains("90.0%"));
        assert_eq!(
            frame[2].len(),
            frame[3].len(),
            "rows are aligned:\n{frame:#?}"
        );

        let summary = view.summary(&snap, Duration::from_secs(5)).join("\n");
        assert!(summary.contains("errors of chat@v2: 1 × 500"), "{summary}");
        assert!(summary.contains("in all 10 responses"), "{summary}");
        assert!(view
            .line(&snap)
            .contains("chat@v1 (stable): 9 req 0 errors"));
    }

    #[test]
    fn latencies_read_well() {
        assert_eq!(fmt_latency(None), "-");
        assert_eq!(fmt_latency(Some(Duration::from_micros(850))), "0.85ms");
        assert_eq!(fmt_latency(Some(Duration::from_micros(12_340))), "12.3ms");
        assert_eq!(fmt_latency(Some(Duration::from_millis(2_500))), "2.50s");
    }
}
