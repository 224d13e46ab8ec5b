//! weir: a canary traffic-splitting reverse proxy for model inference.
//!
//! The code follows the two paths of the design, and depends one way only
//! (`tests/layout.rs` checks it):
//!
//! ```text
//! config, metrics, shutdown  <-  upstream  <-  shadow  <-  data  <-  control  <-  server, cli
//! ```
//!
//! - `data/` is the hot path every request takes (listener, HTTP/1 relay and server, split,
//!   forward, metered bodies); `upstream/` holds the versions, their backends and connection
//!   pools; `shadow/` mirrors requests to a candidate and compares the answers.
//! - `control/` is the cold path: the one writer and its store, the audit log, the admin API,
//!   the canary controller, fleet mode.
//! - `config/` turns files and flags into a validated [`Config`]; `cli/` is the command line
//!   (`weir serve`, `weir admin`, `weir registry`, …); `demo/` is `weir demo`.
//!
//! Every module is private; what the binary, the integration tests and the benchmarks use is
//! re-exported below.
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

mod cli;
mod config;
mod control;
mod data;
mod demo;
mod eval;
mod fields;
mod grpc;
mod metrics;
mod registry;
mod server;
mod shadow;
mod shutdown;
mod stats;
mod tls;
mod upstream;

pub use cli::main;

/// An error with its causes, `outer: inner: root`, for a log line or an answer.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub use config::units::{format_percent, parse_percent};
pub use config::{Config, FleetConfig, QuickMode};
pub use control::admin::status_of;
pub use control::audit::{AuditLog, Entry, Prepared};
pub use control::fleet::{Fleet, FleetError};
pub use control::state::{AuditHead, RoutingState, StateBody, STATE_FORMAT};
pub use control::writer::{Actor, Change, Command, CommandError, Writer};
pub use control::{build_table, VersionSet};
pub use data::proxy::strip_hop_by_hop;
pub use metrics::{Metrics, Role};
pub use registry::{check_promotion, Registry};
pub use server::{Drained, Running, Server, StartError};
