//! milk-vmm
