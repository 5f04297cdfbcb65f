//! milk-ivshmem
