//! virtio-milk: the host side of MiLK's scheduling channel.
//!
//! Data flows one way round: guest event -> event queue -> [`queue`] engine -> [`runtime`]
//! -> [`policy::Policy`] -> decision queue -> guest dispatch -> ACK on the event queue.
//!
//! - [`protocol`]: wire records, device ID, features, config space (protocol version 2,
//!   mirrors `include/virtio_milk.h`).
//! - [`queue`]: device-side virtqueue engine (pop/validate events, push decisions,
//!   EVENT_IDX, interrupts), transport agnostic.
//! - [`vring`]: the device side of one split virtqueue, its rings translated once.
//! - [`device`]: the transport-facing device model (ID, features, config space, activate /
//!   reset) shared by the virtio-mmio and ivshmem transports.
//! - [`control`]: [`control::MilkControl`], the one handle on a device shared by its
//!   transport and its controllers (pause/resume, policy swap, live counters, summaries).
//! - [`runtime`]: polling loop, task table (by gtid), sessions, commitments and acks,
//!   policy timers, policy hosting and swap.
//! - [`policy`]: the `Policy` trait (API v2), the `Dispatcher` a policy decides through, and
//!   the data a policy sees.
//! - [`metrics`]: counters and the event -> decision latency histogram.
//! - [`loopback`]: a driver-side split vring playing the guest on shared memory, used by tests
//!   and by the benchmark crate ([`loopback::run_loopback`]).

#![warn(missing_docs)]

pub mod control;
pub mod device;
pub mod loopback;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod queue;
pub mod runtime;
pub mod vring;
