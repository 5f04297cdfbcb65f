//! virtio-milk over vhost-user.
//!
//! - [`backend`]: [`backend::MilkBackend`], the `milk-policy` daemon's vhost-user backend: it
//!   owns the virtio-milk queues and runs one policy with virtio-milk's runtime.
//! - [`frontend`]: what milk-vmm uses to drive such a daemon: connect, start the rings,
//!   stop them and hand them to another daemon (planned swap), notice a daemon that hung
//!   up and reconnect, recovering ring positions from guest memory.
//! - `ivshmem` (feature `ivshmem`): the same for the QEMU engine's ivshmem transport.
//! - [`daemon`]: bind a socket and serve one frontend (what `milk-policy` runs).
//! - [`stats`]: the daemon's stats socket (`<socket>.stats`), read for `milkctl status`.
//! - [`state`]: the device state handed from one daemon to the next in a planned swap.
//!
//! See `docs/vhost-user.md`.

#![warn(missing_docs)]

pub mod backend;
pub mod daemon;
pub mod frontend;
#[cfg(feature = "ivshmem")]
pub mod ivshmem;
pub mod state;
pub mod stats;
