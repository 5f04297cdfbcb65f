//! virtio-milk on the virtio-mmio bus (the KVM engine).
//!
//! A thin adapter from the transport's [`VirtioDevice`] interface to
//! [`virtio_milk::device::MilkDevice`], the device model both MiLK transports
//! share, reached through its one control handle
//! ([`virtio_milk::control::MilkControl`]): the transport does registers,
//! feature negotiation and queue set-up; at DRIVER_OK the adapter builds
//! virtio-milk's [`virtio_milk::device::Activation`] from the queue
//! addresses, the queue notification eventfds (KVM ioeventfds on
//! QueueNotify, so a guest kick wakes the host runtime thread without a VM
//! exit to user space) and an interrupt callback that sets InterruptStatus
//! and writes the slot's irqfd. The runtime thread waits on the eventfds
//! itself ([`NotificationMode::Device`]).
//!
//! Every runtime run ends in a summary (device reset by the driver, pause,
//! or the device dropped when the VM ends), collected by the control handle
//! returned by [`MilkMmioDevice::new`].

use virtio_milk::device::{Activation as MilkActivation, DeviceError, MilkDevice, PolicyFactory};
use virtio_milk::queue::QueueConfig;
use virtio_milk::runtime::RuntimeConfig;
use virtio_queue::QueueT;

use super::{ActivateError, Activation, NotificationMode, VirtioDevice};
use crate::memory::GuestMemory;

/// The control handle of the virtio-milk device under KVM.
pub type MilkControl = virtio_milk::control::MilkControl<GuestMemory>;

/// The virtio-milk device behind the virtio-mmio transport.
pub struct MilkMmioDevice {
    control: MilkControl,
}

impl MilkMmioDevice {
    /// A device serving `num_cpus` guest CPUs with the policy `name` made by
    /// `factory`; returns the device's control handle too.
    pub fn new(
        num_cpus: u32,
        name: &str,
        factory: PolicyFactory,
        runtime: RuntimeConfig,
    ) -> Result<(Self, MilkControl), DeviceError> {
        let control = MilkControl::new(MilkDevice::with_policy(num_cpus, name, factory, runtime)?);
        Ok((
            MilkMmioDevice {
                control: control.clone(),
            },
            control,
        ))
    }
}

impl VirtioDevice for MilkMmioDevice {
    fn device_type(&self) -> u32 {
        self.control.with_device(MilkDevice::device_id)
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        self.control
            .with_device(|d| vec![d.queue_max_size(); d.num_queues()])
    }

    fn features(&self) -> u64 {
        self.control.with_device(MilkDevice::device_features)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.control.with_device(|d| d.read_config(offset, data));
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio-milk: ignoring write of {} bytes to the read-only config at {offset}",
            data.len()
        );
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let mut queues = Vec::with_capacity(a.queues.len());
        for (i, q) in a.queues.iter().enumerate() {
            if !q.ready() {
                return Err(ActivateError::BadQueues(format!("queue {i} not ready")));
            }
            queues.push(QueueConfig {
                size: q.size(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
            });
        }
        let n = queues.len();
        let irq = a.interrupt;
        self.control
            .activate(MilkActivation {
                memory: a.mem,
                features: a.acked_features,
                queues,
                kicks: a.queue_evts,
                interrupt: Box::new(move |q: u16| irq.signal_used_queue(q)),
                ring_state: None,
            })
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        log::info!(
            "virtio-milk: runtime started ({n} queues, features {:#x})",
            self.control.with_device(MilkDevice::acked_features)
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.control.reset();
    }

    fn notification_mode(&self) -> NotificationMode {
        NotificationMode::Device
    }
}

impl Drop for MilkMmioDevice {
    fn drop(&mut self) {
        // VM end: stop the runtime thread (GOODBYE) and keep its summary.
        self.control.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use crate::devices::virtio::status;
    use crate::devices::BusDevice;
    use crate::memory::create_guest_memory;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn fifo() -> PolicyFactory {
        milk_policies::resolve("fifo").expect("fifo policy").factory
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn identity_config_and_activation_through_the_transport() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (dev, summaries) =
            MilkMmioDevice::new(1, "fifo", fifo(), RuntimeConfig::default()).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
        assert_eq!(r(&mut t, reg::DEVICE_ID), 58);
        assert_eq!(t.queue_evts().len(), 2, "one event and one decision queue");
        // Config: num_cpus 1, version 2, record size 64.
        assert_eq!(r(&mut t, reg::CONFIG), 1);
        assert_eq!(r(&mut t, reg::CONFIG + 4) & 0xffff, 2);
        assert_eq!(r(&mut t, reg::CONFIG + 8) & 0xffff, 64);
        w(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES) & 1, 1, "VERSION_1");
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(&mut t, reg::STATUS, s);
        // Rings in low memory, 16 entries each.
        for (q, base) in [(0u32, 0x10_0000u32), (1, 0x20_0000)] {
            w(&mut t, reg::QUEUE_SEL, q);
            w(&mut t, reg::QUEUE_NUM, 16);
            w(&mut t, reg::QUEUE_DESC_LOW, base);
            w(&mut t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
            w(&mut t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
            w(&mut t, reg::QUEUE_READY, 1);
        }
        w(&mut t, reg::STATUS, s | status::DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        // Reset stops the runtime and records its summary (HELLO and GOODBYE sent).
        w(&mut t, reg::STATUS, 0);
        {
            let s = summaries.summaries();
            assert_eq!(s.len(), 1);
            assert_eq!(s[0].policy, "fifo");
            assert!(s[0].metrics.session_sent >= 1, "{}", s[0]);
        }
        // Activate again, then end the VM without a reset: dropping the slot
        // stops the second runtime and records its summary too.
        drive_to_driver_ok(&mut t);
        assert!(t.is_activated());
        drop(t);
        assert_eq!(summaries.summaries().len(), 2);
    }

    fn drive_to_driver_ok(t: &mut MmioTransport) {
        w(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(t, reg::STATUS, s);
        for (q, base) in [(0u32, 0x10_0000u32), (1, 0x20_0000)] {
            w(t, reg::QUEUE_SEL, q);
            w(t, reg::QUEUE_NUM, 16);
            w(t, reg::QUEUE_DESC_LOW, base);
            w(t, reg::QUEUE_DRIVER_LOW, base + 0x1000);
            w(t, reg::QUEUE_DEVICE_LOW, base + 0x2000);
            w(t, reg::QUEUE_READY, 1);
        }
        w(t, reg::STATUS, s | status::DRIVER_OK);
    }

    #[test]
    fn unready_queues_are_refused() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let (dev, summaries) =
            MilkMmioDevice::new(2, "fifo", fifo(), RuntimeConfig::default()).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
        assert_eq!(t.queue_evts().len(), 4);
        // Only CPU 0's queues: the device needs all of them.
        drive_to_driver_ok(&mut t);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        drop(t);
        assert!(summaries.summaries().is_empty(), "no runtime ran");
    }
}
