//! weir: a canary traffic-splitting reverse proxy for model inference.
//!
//! The code follows the two paths of the design: `data/` is the hot path every request takes
//! (listener, split, forward, metered bodies); `control/` is the cold path that builds routing
//! tables and serves the admin API; `shadow/` mirrors requests to a candidate and compares the
//! answers. `config/` turns files and flags into a validated [`Config`]; `cli/` is the command line
//! (`weir serve`, `weir admin`, `weir registry`, …).
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

pub mod cli;
pub mod config;
pub mod control;
pub mod data;
pub mod demo;
pub mod eval;
pub mod metrics;
pub mod registry;
mod server;
pub mod shadow;
mod shutdown;
pub mod tls;
pub mod upstream;

pub use config::Config;
pub use server::{Drained, Running, Server, StartError};
