//! Virtio devices over the in-tree virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]: it declares its type, queues, features
//! and config space, and is handed an [`Activation`] (guest memory, the
//! driver-configured queues, their notification eventfds and an interrupt
//! handle) when the driver sets `DRIVER_OK`. The transport ([`mmio`]) does the
//! register state machine, feature negotiation and queue set-up; the VMM wires
//! queue notifications through ioeventfds and interrupts through an irqfd.
//!
//! Queue kicks reach a device in one of two ways ([`NotificationMode`]): the
//! VMM's event loop calls [`VirtioDevice::process_queue`], or the device waits
//! on the eventfds in the [`Activation`] from its own threads (e.g. a polling
//! scheduler channel).

#[cfg(any(test, feature = "test-devices"))]
pub mod echo;
pub mod milk;
pub mod mmio;
pub mod vhost_user;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemory;

/// `VIRTIO_F_VERSION_1`: the transport always offers it and requires it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX`.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// InterruptStatus bit: a queue has used buffers.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// Device status bits.
pub mod status {
    /// Guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// Guest has a driver.
    pub const DRIVER: u32 = 2;
    /// Driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// Device needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// Driver gave up.
    pub const FAILED: u32 = 0x80;
}

/// How a device learns about queue notifications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationMode {
    /// The VMM event loop waits on the queue eventfds and calls
    /// [`VirtioDevice::process_queue`].
    EventLoop,
    /// The device waits on [`Activation::queue_evts`] itself.
    Device,
}

/// Raises the device's interrupt and keeps InterruptStatus and the config
/// generation. Cheap to clone and safe to use from any thread.
#[derive(Clone)]
pub struct VirtioInterrupt {
    status: Arc<AtomicU32>,
    config_generation: Arc<AtomicU32>,
    evt: Arc<EventFd>,
}

impl VirtioInterrupt {
    /// New interrupt raising `evt` (an irqfd).
    pub fn new(evt: EventFd) -> Self {
        VirtioInterrupt {
            status: Arc::new(AtomicU32::new(0)),
            config_generation: Arc::new(AtomicU32::new(0)),
            evt: Arc::new(evt),
        }
    }

    /// Signals used buffers on queue `queue_index`.
    pub fn signal_used_queue(&self, queue_index: u16) -> std::io::Result<()> {
        log::trace!("virtio: used buffers on queue {queue_index}");
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Signals a configuration change (bumps the config generation).
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        self.evt.write(1)
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Current config generation.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Everything a device needs to start working, handed over at `DRIVER_OK`.
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// All queues in index order, as configured by the driver (check
    /// `ready()`); event index is enabled when it was negotiated.
    pub queues: Vec<Queue>,
    /// Notification eventfd of each queue (clones of the ioeventfds).
    pub queue_evts: Vec<EventFd>,
    /// Interrupt handle.
    pub interrupt: VirtioInterrupt,
    /// Features the driver acknowledged.
    pub acked_features: u64,
}

/// Errors a device may return from [`VirtioDevice::activate`].
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver's queue configuration is unusable.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
    /// Anything else.
    #[error("activation failed: {0}")]
    Other(String),
}

/// A virtio device that can sit behind the virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 2 for block); non-zero.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device feature bits (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device config space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the device and drops its queues (driver wrote 0 to Status). The
    /// device must stop any threads it started before returning.
    fn reset(&mut self);
    /// Processes queue `queue_index` after a notification
    /// ([`NotificationMode::EventLoop`] devices only).
    fn process_queue(&mut self, queue_index: usize) {
        let _ = queue_index;
    }
    /// Who waits on the queue notifications.
    fn notification_mode(&self) -> NotificationMode {
        NotificationMode::EventLoop
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupt_status_bits() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = VirtioInterrupt::new(evt.try_clone().unwrap());
        irq.signal_used_queue(0).unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING);
        irq.signal_config_change().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(evt.read().unwrap(), 2, "each signal writes the irqfd");
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }
}
