//! virtio-milk behind this transport (cargo feature `virtio-milk`): a
//! [`Backend`] that turns the transport's activation into virtio-milk's
//! [`virtio_milk::device::Activation`] and hands it to the device through
//! its one control handle, [`MilkControl`] (also what other threads use to
//! pause/resume, swap the policy and read counters).
//!
//! ```ignore
//! let dev = MilkDevice::new(num_cpus, factory, RuntimeConfig::default())?;
//! let backend = MilkBackend::new(dev);
//! let control = backend.control();
//! let cfg = TransportConfig::in_dir(dir, memory_mib, backend.device_info());
//! let t = IvshmemTransport::new(cfg, backend)?;
//! ```
//!
//! For a whole guest run (transport, QEMU, summaries) see [`crate::session`].

use virtio_milk::control::MilkControl as Control;
use virtio_milk::device::{Activation as MilkActivation, MilkDevice};
use virtio_milk::queue::QueueConfig as MilkQueueConfig;
use vm_memory::GuestMemoryMmap;

use crate::backend::{Activation, Backend, BackendError};
use crate::device::DeviceInfo;

/// The control handle of a virtio-milk device behind this transport.
pub type MilkControl = Control<GuestMemoryMmap>;

/// Vendor ID published for virtio-milk ("MILK" in memory, like the magic).
pub const MILK_VENDOR_ID: u32 = 0x4b4c_494d;

/// The virtio-milk device as an ivshmem [`Backend`].
///
/// virtio-milk serves all its queues at once, so activation fails (and the
/// transport sets DEVICE_NEEDS_RESET) unless the driver made every queue
/// ready. The engine wakes on every queue's kick eventfd.
pub struct MilkBackend {
    control: MilkControl,
}

impl MilkBackend {
    /// Wraps a device.
    pub fn new(dev: MilkDevice<GuestMemoryMmap>) -> Self {
        MilkBackend {
            control: MilkControl::new(dev),
        }
    }

    /// What the transport must publish for this device.
    pub fn device_info(&self) -> DeviceInfo {
        self.control.with_device(|dev| DeviceInfo {
            device_id: dev.device_id(),
            vendor_id: MILK_VENDOR_ID,
            features: dev.device_features(),
            config: dev.config_space().to_vec(),
            num_queues: u16::try_from(dev.num_queues()).unwrap_or(u16::MAX),
            queue_max: dev.queue_max_size(),
        })
    }

    /// The device's control handle, usable from any thread while the
    /// transport runs.
    pub fn control(&self) -> MilkControl {
        self.control.clone()
    }
}

impl Backend for MilkBackend {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        let n = self.control.with_device(MilkDevice::num_queues);
        let complete = a.queues.len() == n
            && a.queues
                .iter()
                .enumerate()
                .all(|(i, q)| usize::from(q.index) == i);
        if !complete {
            let ready: Vec<u16> = a.queues.iter().map(|q| q.index).collect();
            return Err(format!("virtio-milk needs all {n} queues ready, got {ready:?}").into());
        }
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
        let irq = a.interrupts;
        self.control.activate(MilkActivation {
            memory: a.memory,
            features: a.features,
            queues,
            kicks: a.queues.into_iter().map(|q| q.kick).collect(),
            interrupt: Box::new(move |q: u16| irq.signal_queue(q)),
            ring_state: None,
        })?;
        Ok(())
    }

    fn reset(&mut self) {
        self.control.reset();
    }
}
