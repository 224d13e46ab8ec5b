//! Serving windows: the traffic one table generation served, measured from the metric
//! counters, closed into each change's audit record so one can say which version served which
//! window of traffic.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{json, Value};

use crate::data::RoutingTable;
use crate::metrics::TargetStats;

/// The traffic one table generation served, measured from the metric counters.
#[derive(Debug)]
pub(super) struct Window {
    generation: u64,
    started: SystemTime,
    targets: Vec<WindowTarget>,
}

#[derive(Debug)]
struct WindowTarget {
    route: Arc<str>,
    version: Arc<str>,
    role: &'static str,
    weight: u16,
    stats: Arc<TargetStats>,
    requests_at_start: u64,
    errors_at_start: u64,
    /// Not in this window's table: kept because requests it started may still be answered.
    carried: bool,
}

impl Window {
    /// Opens the window of `table`. Targets of the `previous` window that the new table dropped
    /// stay counted while they may still answer: responses are counted when their head is sent,
    /// so a request routed under the old table can land in the new window.
    pub(super) fn open(table: &RoutingTable, previous: Option<&Window>) -> Window {
        let mut targets = Vec::new();
        for route in &table.routes {
            for target in std::iter::once(&route.stable).chain(&route.candidate) {
                targets.push(WindowTarget {
                    route: Arc::clone(&route.name),
                    version: Arc::clone(&target.version.label),
                    role: target.role.as_str(),
                    weight: route.weight,
                    requests_at_start: target.stats.requests_total(),
                    errors_at_start: target.stats.server_errors_total(),
                    stats: Arc::clone(&target.stats),
                    carried: false,
                });
            }
        }
        for old in previous.map(|p| p.targets.as_slice()).unwrap_or_default() {
            // Same labels, same counters (tables resolve new handles to the same series).
            if targets
                .iter()
                .any(|t| t.route == old.route && t.version == old.version && t.role == old.role)
            {
                continue;
            }
            // A target that just left the table is kept one window; after that only while it
            // has requests in flight or answered some in the window that just closed.
            let still_answering = old.stats.in_flight.get() > 0
                || old.stats.requests_total() != old.requests_at_start;
            if !old.carried || still_answering {
                targets.push(WindowTarget {
                    route: Arc::clone(&old.route),
                    version: Arc::clone(&old.version),
                    role: old.role,
                    weight: 0,
                    requests_at_start: old.stats.requests_total(),
                    errors_at_start: old.stats.server_errors_total(),
                    stats: Arc::clone(&old.stats),
                    carried: true,
                });
            }
        }
        Window {
            generation: table.generation,
            started: SystemTime::now(),
            targets,
        }
    }

    /// The window as an audit value: who served how many requests (and 5xx) in it.
    pub(super) fn close(&self) -> Value {
        let served: Vec<Value> = self
            .targets
            .iter()
            .map(|t| {
                json!({
                    "route": &*t.route,
                    "version": &*t.version,
                    "role": t.role,
                    "weight": t.weight,
                    "requests": t.stats.requests_total() - t.requests_at_start,
                    "errors": t.stats.server_errors_total() - t.errors_at_start,
                })
            })
            .collect();
        json!({
            "generation": self.generation,
            "start": humantime::format_rfc3339_millis(self.started).to_string(),
            "end": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            "served": served,
        })
    }
}
