//! The cold path: building routing tables from configuration and serving the admin API.
//!
//! Invariant: the hot path only ever sees a complete, validated [`RoutingTable`]; tables are
//! built whole here and swapped in atomically.
//!
//! [`RoutingTable`]: crate::data::RoutingTable

pub mod admin;
mod build;

pub use build::{build_table, VersionSet};
