//! milk-ivshmem: the host side of MiLK's virtio transport over QEMU's
//! `ivshmem-doorbell` PCI device (`docs/transport-ivshmem.md`).
//!
//! Under QEMU (TCG) stock QEMU cannot host the custom virtio-milk device, so
//! the guest's `virtio_ivshmem` driver talks to this crate instead:
//!
//! - [`server`]: the ivshmem server QEMU connects to (QEMU's documented
//!   protocol): shared memory, the host's kick eventfds, the guest's
//!   interrupt eventfds;
//! - [`regs`]: the virtio register file at the start of the shared memory,
//!   mirroring `virtio_ivshmem.h`;
//! - [`device`]: the device side of that register file (feature negotiation,
//!   queue validation, activation, DEVICE_NEEDS_RESET);
//! - [`guest_ram`]: guest RAM mapped from QEMU's `memory-backend-file`, as a
//!   vm-memory `GuestMemoryMmap`, where the vrings live;
//! - [`backend`]: the [`Backend`] trait a device implementation (virtio-milk)
//!   implements; `echo` (feature `echo`): `EchoBackend`, a backend for tests;
//! - [`qemu_args`]: the matching QEMU options;
//! - [`transport`]: [`IvshmemTransport`], all of the above plus the serving loop;
//! - `milk` (feature `virtio-milk`): `MilkBackend`, virtio-milk's device as a
//!   backend, and `MilkControl`, a handle on it for other threads;
//! - `session` (feature `virtio-milk`): a whole guest run with a policy by
//!   name (`run_milk_guest`, or `MilkHost` for callers that run QEMU).
//!
//! Data path: the driver's doorbell write `(host_peer << 16) | (1 + n)` makes
//! QEMU write the host eventfd of vector `1 + n`, which the backend holds as
//! queue `n`'s kick eventfd; the backend writes the guest's eventfd of vector
//! `1 + n` and QEMU raises that MSI-X vector. The transport's own thread only
//! sees connections and register requests (vector 0).

pub mod backend;
pub mod device;
#[cfg(any(test, feature = "echo"))]
pub mod echo;
pub mod guest_ram;
#[cfg(feature = "virtio-milk")]
pub mod milk;
pub mod proto;
pub mod qemu_args;
pub mod regs;
pub mod server;
#[cfg(feature = "virtio-milk")]
pub mod session;
pub mod shm;
pub mod transport;

pub use backend::{Activation, ActiveQueue, Backend, BackendError, Interrupts, QueueConfig};
pub use device::{Device, DeviceInfo, DeviceStats, Invalid, RequestOutcome};
#[cfg(any(test, feature = "echo"))]
pub use echo::{EchoBackend, EchoEvent, EchoLog};
pub use guest_ram::GuestRam;
pub use qemu_args::QemuArgs;
pub use regs::Regs;
pub use server::IvshmemServer;
pub use transport::{IvshmemTransport, Stopper, TransportConfig, TransportError, TransportHandle};
