//! Hot path.
