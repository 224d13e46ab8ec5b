//! `weir demo`: the whole mission on one machine (placeholder, filled in by the demo work).
