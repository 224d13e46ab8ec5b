//! The hot path: every proxied request runs through here.
//!
//! listener → table load → route match → split → pooled forward → metered streaming body.
//! Nothing here parses bodies (but for the top-level fields a route that routes by model reads,
//! with `crate::fields`), allocates metric labels or takes a lock shared between requests.

pub mod body;
mod date;
pub mod decide;
pub mod framing;
mod general;
pub mod h1;
pub mod listener;
pub mod proxy;
pub mod split;
pub mod table;

pub use table::RoutingTable;
