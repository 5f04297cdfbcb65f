//! milk-control: MiLK's control plane (docs/control.md).
//!
//! - [`proto`]: the wire format, one JSON object per line each way;
//! - [`target`]: [`VmControl`], one VM and its virtio-milk device as the socket sees them;
//! - [`report`]: a runtime run's counters and histograms as JSON (also `milk-policy`'s);
//! - [`server`]: [`ControlServer`], the Unix socket milk-vmm opens (`--api-sock`);
//! - [`client`]: [`Client`], what `milkctl` uses.

#![warn(missing_docs)]

pub mod client;
pub mod proto;
pub mod report;
pub mod server;
pub mod target;

pub use client::{Client, ClientError};
pub use proto::{Reply, Request};
pub use server::{default_socket_path, ControlError, ControlServer};
pub use target::{RemotePolicy, RemoteStatus, VmControl};
