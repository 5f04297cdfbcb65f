//! What the transport hands to the device implementation when the driver sets
//! DRIVER_OK: the [`Backend`] trait and the [`Activation`] it receives.
//!
//! virtio-milk plugs in as a backend (`crate::milk::MilkBackend`, feature
//! `virtio-milk`), turning the activation into virtio-milk's own
//! `virtio_milk::device::Activation`. A test backend is in `crate::echo`
//! (feature `echo`).

use std::io;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::regs::VECTOR_CONFIG;

/// Where the driver placed one split virtqueue (validated: size is a power of
/// two within the device's maximum, the three rings lie inside guest RAM and
/// are aligned as virtio requires).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size.
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc: u64,
    /// ... of the driver (available) ring.
    pub driver: u64,
    /// ... of the device (used) ring.
    pub device: u64,
}

/// The guest's interrupt eventfds, one per MSI-X vector: writing eventfd `v`
/// makes QEMU raise MSI-X vector `v` in the guest. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Interrupts {
    fds: Arc<Vec<EventFd>>,
}

impl Interrupts {
    /// Wraps the eventfds of vectors `0..fds.len()`.
    pub fn new(fds: Vec<EventFd>) -> Self {
        Interrupts { fds: Arc::new(fds) }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.fds.len()
    }

    /// The eventfd of vector `vector` (to hand to another process, e.g. as a
    /// vhost-user call eventfd).
    pub fn vector_fd(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(vector))
    }

    /// Raises MSI-X vector `vector`.
    pub fn signal_vector(&self, vector: u16) -> io::Result<()> {
        match self.fds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no interrupt vector {vector}"),
            )),
        }
    }

    /// Signals used buffers on queue `queue` (vector `1 + queue`).
    pub fn signal_queue(&self, queue: u16) -> io::Result<()> {
        match queue.checked_add(1) {
            Some(v) => self.signal_vector(v),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue index out of range",
            )),
        }
    }

    /// Signals a configuration change (vector 0).
    pub fn signal_config(&self) -> io::Result<()> {
        self.signal_vector(VECTOR_CONFIG)
    }
}

/// One queue the driver made ready.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index (its doorbell and MSI-X vector are `1 + index`).
    pub index: u16,
    /// Where the rings are.
    pub config: QueueConfig,
    /// Becomes readable when the driver rings this queue's doorbell
    /// (non-blocking; a duplicate of the transport's descriptor).
    pub kick: EventFd,
}

/// Everything a backend needs to serve the device once the driver is ready.
#[derive(Debug)]
pub struct Activation {
    /// Features the driver accepted (a subset of those offered).
    pub features: u64,
    /// Guest RAM, where the vrings live.
    pub memory: GuestMemoryMmap,
    /// The ready queues, in index order (queues the driver left unready are absent).
    pub queues: Vec<ActiveQueue>,
    /// The guest's interrupt vectors.
    pub interrupts: Interrupts,
}

/// Error a backend returns from [`Backend::activate`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// The device implementation behind the transport.
///
/// Calls come from the transport's thread, in order: `activate` when the driver
/// sets DRIVER_OK, then `reset` when the driver resets the device, makes it
/// fail, or QEMU disconnects. `reset` is also called when no activation is
/// live (it must then do nothing).
pub trait Backend: Send {
    /// Start serving. An error makes the transport set DEVICE_NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<(), BackendError>;
    /// Stop serving and drop everything from the last activation.
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn interrupts_write_the_vector_eventfd_and_refuse_unknown_vectors() {
        let fds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let peek: Vec<EventFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let irq = Interrupts::new(fds);
        irq.signal_queue(1).unwrap();
        irq.signal_queue(1).unwrap();
        irq.signal_config().unwrap();
        assert_eq!(peek[2].read().unwrap(), 2);
        assert_eq!(peek[0].read().unwrap(), 1);
        assert!(peek[1].read().is_err(), "vector 1 was not signalled");
        assert!(irq.signal_queue(2).is_err());
        assert!(irq.signal_queue(u16::MAX).is_err());
    }
}
