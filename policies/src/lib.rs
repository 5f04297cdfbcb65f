//! milk-policies
