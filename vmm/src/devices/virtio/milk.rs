//! virtio-milk on the virtio-mmio bus (the KVM engine).
//!
//! A thin adapter from the transport's [`VirtioDevice`] interface to
//! [`virtio_milk::device::MilkDevice`], the device model both MiLK transports
//! share: the transport does registers, feature negotiation and queue set-up;
//! at DRIVER_OK the device gets the queue addresses, the queue notification
//! eventfds (KVM ioeventfds on QueueNotify, so a guest kick wakes the host
//! runtime thread without a VM exit to user space) and an interrupt callback
//! that sets InterruptStatus and writes the slot's irqfd. The runtime thread
//! waits on the eventfds itself ([`NotificationMode::Device`]).
//!
//! Every runtime run ends in a [`Summary`] (device reset by the driver, or the
//! device dropped when the VM ends); they are collected in the handle returned
//! by [`MilkMmioDevice::new`].

use std::sync::{Arc, Mutex};

use virtio_milk::device::{DeviceError, MilkDevice, PolicyFactory};
use virtio_milk::metrics::Summary;
use virtio_milk::queue::QueueConfig;
use virtio_milk::runtime::RuntimeConfig;
use virtio_queue::QueueT;

use super::{ActivateError, Activation, NotificationMode, VirtioDevice};
use crate::memory::GuestMemory;

/// Summaries of the device's runtime runs, in order.
pub type MilkSummaries = Arc<Mutex<Vec<Summary>>>;

/// The virtio-milk device behind the virtio-mmio transport.
pub struct MilkMmioDevice {
    dev: MilkDevice<GuestMemory>,
    summaries: MilkSummaries,
    kicks_added: bool,
}

impl MilkMmioDevice {
    /// A device serving `num_cpus` guest CPUs with policies from `factory`;
    /// returns the handle that collects the runtime summaries.
    pub fn new(
        num_cpus: u32,
        factory: PolicyFactory,
        runtime: RuntimeConfig,
    ) -> Result<(Self, MilkSummaries), DeviceError> {
        let summaries = MilkSummaries::default();
        Ok((
            MilkMmioDevice {
                dev: MilkDevice::new(num_cpus, factory, runtime)?,
                summaries: summaries.clone(),
                kicks_added: false,
            },
            summaries,
        ))
    }

    fn stop(&mut self) {
        match self.dev.reset() {
            Ok(Some(s)) => self
                .summaries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s),
            Ok(None) => {}
            Err(e) => log::error!("virtio-milk: stopping the runtime: {e}"),
        }
    }
}

impl VirtioDevice for MilkMmioDevice {
    fn device_type(&self) -> u32 {
        self.dev.device_id()
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.dev.queue_max_size(); self.dev.num_queues()]
    }

    fn features(&self) -> u64 {
        self.dev.device_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.dev.read_config(offset, data);
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
        let mut evts = a.queue_evts.into_iter();
        let kick = evts
            .next()
            .ok_or_else(|| ActivateError::BadQueues("no queues".into()))?;
        // The transport's eventfds live as long as the slot: hand the others
        // to the device once (they stay registered across resets).
        if !self.kicks_added {
            for e in evts {
                self.dev.add_kick_fd(e);
            }
            self.kicks_added = true;
        }
        self.dev.ack_features(a.acked_features);
        let irq = a.interrupt;
        self.dev
            .activate(
                a.mem,
                &queues,
                kick,
                Box::new(move |q: u16| irq.signal_used_queue(q)),
            )
            .map_err(|e| ActivateError::Other(e.to_string()))?;
        log::info!(
            "virtio-milk: runtime started ({} queues, features {:#x})",
            queues.len(),
            self.dev.acked_features()
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn notification_mode(&self) -> NotificationMode {
        NotificationMode::Device
    }
}

impl Drop for MilkMmioDevice {
    fn drop(&mut self) {
        // VM end: stop the runtime thread (GOODBYE) and keep its summary.
        self.stop();
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
        Box::new(|| milk_policies::by_name("fifo").expect("fifo policy"))
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
        let (dev, summaries) = MilkMmioDevice::new(1, fifo(), RuntimeConfig::default()).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
        assert_eq!(r(&mut t, reg::DEVICE_ID), 58);
        assert_eq!(t.queue_evts().len(), 2, "one event and one decision queue");
        // Config: num_cpus 1, version 1, record size 64.
        assert_eq!(r(&mut t, reg::CONFIG), 1);
        assert_eq!(r(&mut t, reg::CONFIG + 4) & 0xffff, 1);
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
            let s = summaries.lock().unwrap();
            assert_eq!(s.len(), 1);
            assert_eq!(s[0].policy, "fifo");
            assert!(s[0].metrics.session_sent >= 1, "{}", s[0]);
        }
        // Activate again, then end the VM without a reset: dropping the slot
        // stops the second runtime and records its summary too.
        drive_to_driver_ok(&mut t);
        assert!(t.is_activated());
        drop(t);
        assert_eq!(summaries.lock().unwrap().len(), 2);
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
        let (dev, summaries) = MilkMmioDevice::new(2, fifo(), RuntimeConfig::default()).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), mem, irq).unwrap();
        assert_eq!(t.queue_evts().len(), 4);
        // Only CPU 0's queues: the device needs all of them.
        drive_to_driver_ok(&mut t);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        drop(t);
        assert!(summaries.lock().unwrap().is_empty(), "no runtime ran");
    }
}
