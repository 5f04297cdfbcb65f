//! milk-tests
