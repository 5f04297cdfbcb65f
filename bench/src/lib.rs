//! milk-bench: kernel <-> user-space channels measured side by side with the
//! same 64-byte message and the same method (see docs/benchmarks.md).

pub mod bpf;
pub mod channel;
pub mod channels;
pub mod clock;
pub mod msg;
pub mod plot;
pub mod report;
pub mod row;
pub mod runner;
pub mod shm_ring;
pub mod stats;
pub mod suite;
pub mod sys;
