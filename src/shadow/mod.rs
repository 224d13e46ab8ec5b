//! Shadowing: mirroring a share of a route's requests to its candidate and comparing the answers,
//! off the client's path.
//!
//! - [`tee`]: what the data path does per mirrored request — the plan a decision carries, the
//!   tees that copy request and response bodies as they stream, and the counters and agreement
//!   window the canary gate reads.
//! - [`task`]: the shadow exchange itself, in a task of its own holding one of a fixed number of
//!   permits: send to the candidate, wait for both answers, compare, record.
//! - [`compare`]: how two answers are compared (the route's comparators), also used by
//!   `weir eval`.
//!
//! Depends on `config`, `metrics` and the data path's `upstream` (the candidate's backends); never
//! on `control` (tests/layout.rs checks it).

pub mod compare;
pub mod task;
pub mod tee;
