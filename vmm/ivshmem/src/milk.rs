//! virtio-milk behind this transport (cargo feature `virtio-milk`): a
//! [`Backend`] that hands activations to `virtio_milk::device::MilkDevice`.
//!
//! ```ignore
//! let dev = MilkDevice::new(num_cpus, factory, RuntimeConfig::default())?;
//! let backend = MilkBackend::new(dev);
//! let cfg = TransportConfig::in_dir(dir, memory_mib, backend.device_info());
//! let t = IvshmemTransport::new(cfg, backend)?;
//! ```

use virtio_milk::device::MilkDevice;
use virtio_milk::metrics::Summary;
use virtio_milk::queue::QueueConfig as MilkQueueConfig;
use vm_memory::GuestMemoryMmap;

use crate::backend::{Activation, Backend, BackendError};
use crate::device::DeviceInfo;

/// Vendor ID published for virtio-milk ("MILK" in memory, like the magic).
pub const MILK_VENDOR_ID: u32 = 0x4b4c_494d;

/// The virtio-milk device as an ivshmem [`Backend`].
///
/// virtio-milk serves all its queues at once, so activation fails (and the
/// transport sets DEVICE_NEEDS_RESET) unless the driver made every queue
/// ready. The engine wakes on every queue's kick eventfd: the first is
/// passed at activation, the others are registered once with
/// `MilkDevice::add_kick_fd` (the transport's kick eventfds live as long as
/// it does, so later activations reuse them).
pub struct MilkBackend {
    dev: MilkDevice<GuestMemoryMmap>,
    kicks_added: bool,
    summaries: Vec<Summary>,
}

impl MilkBackend {
    /// Wraps a device.
    pub fn new(dev: MilkDevice<GuestMemoryMmap>) -> Self {
        MilkBackend {
            dev,
            kicks_added: false,
            summaries: Vec::new(),
        }
    }

    /// What the transport must publish for this device.
    pub fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: self.dev.device_id(),
            vendor_id: MILK_VENDOR_ID,
            features: self.dev.device_features(),
            config: self.dev.config_space().to_vec(),
            num_queues: u16::try_from(self.dev.num_queues()).unwrap_or(u16::MAX),
            queue_max: self.dev.queue_max_size(),
        }
    }

    /// The device (e.g. to swap its policy).
    pub fn device(&self) -> &MilkDevice<GuestMemoryMmap> {
        &self.dev
    }

    /// Summaries of the runtime runs that ended (one per reset of a live device).
    pub fn summaries(&self) -> &[Summary] {
        &self.summaries
    }
}

impl Backend for MilkBackend {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        let n = self.dev.num_queues();
        let complete = a.queues.len() == n
            && a.queues
                .iter()
                .enumerate()
                .all(|(i, q)| usize::from(q.index) == i);
        if !complete {
            let ready: Vec<u16> = a.queues.iter().map(|q| q.index).collect();
            return Err(format!("virtio-milk needs all {n} queues ready, got {ready:?}").into());
        }
        self.dev.ack_features(a.features);
        let queues: Vec<MilkQueueConfig> = a
            .queues
            .iter()
            .map(|q| MilkQueueConfig {
                size: q.config.size,
                desc_table: q.config.desc,
                avail_ring: q.config.driver,
                used_ring: q.config.device,
            })
            .collect();
        let mut kicks = a.queues.into_iter().map(|q| q.kick);
        let kick = kicks.next().ok_or("virtio-milk device without queues")?;
        if !self.kicks_added {
            for k in kicks {
                self.dev.add_kick_fd(k);
            }
            self.kicks_added = true;
        }
        let irq = a.interrupts;
        self.dev.activate(
            a.memory,
            &queues,
            kick,
            Box::new(move |q: u16| irq.signal_queue(q)),
        )?;
        Ok(())
    }

    fn reset(&mut self) {
        match self.dev.reset() {
            Ok(Some(s)) => self.summaries.push(s),
            Ok(None) => {}
            Err(e) => log::warn!("virtio-milk reset: {e}"),
        }
    }
}
