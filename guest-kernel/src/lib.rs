//! milk-guest-kernel
