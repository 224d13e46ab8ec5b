//! Cold path.
