//! weir: a canary traffic-splitting reverse proxy for model inference.
//!
//! The code follows the two paths of the design: `data/` is the hot path every request takes
//! (listener, split, forward, metered bodies); `control/` is the cold path that builds routing
//! tables and serves the admin API. `config/` turns files and flags into a validated [`Config`].
#![forbid(unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

pub mod admin_client;
pub mod cli;
pub mod config;
pub mod control;
pub mod data;
pub mod demo;
pub mod eval;
pub mod metrics;
pub mod registry;
pub mod registry_cli;
mod server;
pub mod shadow;
pub mod tls;

pub use config::Config;
pub use server::{Drained, Running, Server, StartError};
