//! milk-harness
