//! milk-bench
