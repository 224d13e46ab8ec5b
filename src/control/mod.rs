//! The cold path: routing state, the one writer that changes it, the audit log, and the admin API.
//!
//! Invariant: the hot path only ever sees a complete, validated [`RoutingTable`] that was
//! persisted and audited first; tables are built whole here and swapped in atomically.
//!
//! [`RoutingTable`]: crate::data::RoutingTable

pub mod admin;
pub mod aliases;
pub mod audit;
pub mod auth;
mod build;
pub mod canary;
pub mod command;
mod dashboard;
pub mod fleet;
pub mod history;
pub mod identity;
pub mod mlflow;
pub mod pins;
mod promotion;
pub mod replica;
pub mod state;
pub mod store;
mod window;
pub mod writer;

pub use build::{build_table, VersionSet};
pub use writer::{CommandError, Writer};
