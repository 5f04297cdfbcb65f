//! virtio-mmio transport, modern register layout (version 2).
//!
//! The transport keeps the driver-visible state (status, feature selects and
//! acknowledged features, per-queue configuration, InterruptStatus through
//! [`VirtioInterrupt`]) and enforces the initialisation order of the virtio
//! spec (section 3.1): ACKNOWLEDGE -> DRIVER -> features -> FEATURES_OK ->
//! queue set-up -> DRIVER_OK. Accesses that break the rules (misaligned or
//! wrongly sized register accesses, writes to read-only registers, queue
//! set-up outside its window, clearing status bits without a reset, bad queue
//! sizes) are logged and ignored, and counted in [`MmioTransport::bad_accesses`].

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    status, Activation, NotificationMode, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::BusDevice;
use crate::memory::GuestMemory;

/// "virt".
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported by MiLK devices ("MILK").
pub const MMIO_VENDOR_ID: u32 = 0x4b4c_494d;

/// Register offsets.
pub mod reg {
    #![allow(missing_docs)]
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

#[derive(Clone, Copy, Debug, Default)]
struct QueueState {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

fn set_low(v: &mut u64, lo: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(lo);
}

fn set_high(v: &mut u64, hi: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(hi) << 32);
}

/// One virtio-mmio device slot.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: VirtioInterrupt,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueState>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    activated: bool,
    bad_accesses: u64,
}

impl MmioTransport {
    /// Wraps `device`; `irq_evt` is the eventfd that raises its interrupt.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        irq_evt: EventFd,
    ) -> std::io::Result<Self> {
        let queues: Vec<_> = device
            .queue_max_sizes()
            .into_iter()
            .map(QueueState::new)
            .collect();
        let queue_evts = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt: VirtioInterrupt::new(irq_evt),
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            activated: false,
            bad_accesses: 0,
        })
    }

    /// Queue notification eventfds, index = queue index (register them as
    /// ioeventfds on QueueNotify with the index as datamatch).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt handle.
    pub fn interrupt(&self) -> &VirtioInterrupt {
        &self.interrupt
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// True between a successful DRIVER_OK and the next reset.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Number of ignored bad accesses so far.
    pub fn bad_accesses(&self) -> u64 {
        self.bad_accesses
    }

    /// How the wrapped device wants its queue notifications.
    pub fn notification_mode(&self) -> NotificationMode {
        self.device.notification_mode()
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Runs the device's queue handler after a notification (if active).
    pub fn process_queue(&mut self, index: usize) {
        if self.activated && self.device.notification_mode() == NotificationMode::EventLoop {
            self.device.process_queue(index);
        } else {
            log::debug!("virtio-mmio: notification for queue {index} while inactive");
        }
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn bad(&mut self, what: &str) {
        self.bad_accesses += 1;
        log::warn!(
            "virtio-mmio (device type {}): ignoring {what}",
            self.device.device_type()
        );
    }

    fn selected_queue(&mut self, reg: &str) -> Option<&mut QueueState> {
        let sel = self.queue_sel as usize;
        if sel >= self.queues.len() {
            self.bad(&format!("{reg} for nonexistent queue {sel}"));
            return None;
        }
        Some(&mut self.queues[sel])
    }

    fn queue_setup_allowed(&mut self, reg: &str) -> bool {
        let ok = self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        if !ok {
            self.bad(&format!(
                "{reg} write outside queue set-up (status {:#x})",
                self.status
            ));
        }
        ok
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: length and base read as all ones.
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            _ => {
                self.bad(&format!("read of register {offset:#x}"));
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if self.queue_setup_allowed("QueueNum") {
                    if let Some(q) = self.selected_queue("QueueNum") {
                        if v == 0 || v > u32::from(q.max_size) || !v.is_power_of_two() {
                            let max = q.max_size;
                            self.bad(&format!("QueueNum {v} (max {max}, power of two)"));
                        } else {
                            q.size = v as u16;
                        }
                    }
                }
            }
            reg::QUEUE_READY => {
                if self.queue_setup_allowed("QueueReady") {
                    if let Some(q) = self.selected_queue("QueueReady") {
                        q.ready = v == 1;
                    }
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if self.queue_setup_allowed("queue address") {
                    if let Some(q) = self.selected_queue("queue address") {
                        match offset {
                            reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                            reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                            reg::QUEUE_DRIVER_LOW => set_low(&mut q.avail, v),
                            reg::QUEUE_DRIVER_HIGH => set_high(&mut q.avail, v),
                            reg::QUEUE_DEVICE_LOW => set_low(&mut q.used, v),
                            _ => set_high(&mut q.used, v),
                        }
                    }
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally KVM consumes these through the ioeventfd; this path
                // serves set-ups without one (and tests).
                match self.queue_evts.get(v as usize) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            log::warn!("virtio-mmio: queue notify failed: {e}");
                        }
                    }
                    None => self.bad(&format!("notify of nonexistent queue {v}")),
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::SHM_SEL => {}
            _ => self.bad(&format!("write of {v:#x} to register {offset:#x}")),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            self.bad(&format!(
                "DriverFeatures write in status {:#x}",
                self.status
            ));
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            s => {
                self.bad(&format!("DriverFeatures with select {s}"));
                return;
            }
        };
        let offered = (self.offered_features() >> shift) as u32;
        if v & !offered != 0 {
            self.bad(&format!(
                "driver features {:#x} not offered (select {})",
                v & !offered,
                self.driver_features_sel
            ));
        }
        let mask = 0xffff_ffffu64 << shift;
        self.acked_features = (self.acked_features & !mask) | (u64::from(v & offered) << shift);
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            self.bad(&format!(
                "status {v:#x} clearing bits of {old:#x} without a reset"
            ));
            return;
        }
        let has = |b| v & b != 0;
        let ordered = (!has(status::DRIVER) || has(status::ACKNOWLEDGE))
            && (!has(status::FEATURES_OK) || has(status::DRIVER))
            && (!has(status::DRIVER_OK) || has(status::FEATURES_OK))
            && (!has(status::DEVICE_NEEDS_RESET) || old & status::DEVICE_NEEDS_RESET != 0);
        if !ordered {
            self.bad(&format!("status {v:#x} out of order (was {old:#x})"));
            return;
        }
        let new = v & !old;
        let mut v = v;
        if new & status::FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            log::warn!(
                "virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; refusing FEATURES_OK"
            );
            v &= !status::FEATURES_OK;
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 && v & status::FEATURES_OK != 0 {
            self.activate();
        }
        if new & status::FAILED != 0 {
            log::warn!(
                "virtio-mmio: driver marked device type {} FAILED",
                self.device.device_type()
            );
        }
    }

    fn activate(&mut self) {
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut err = None;
        for (i, qs) in self.queues.iter().enumerate() {
            let mut q = match Queue::new(qs.max_size) {
                Ok(q) => q,
                Err(e) => {
                    err = Some(format!("queue {i}: {e:?}"));
                    break;
                }
            };
            if qs.ready {
                let setup = q
                    .try_set_size(qs.size)
                    .and_then(|_| q.try_set_desc_table_address(GuestAddress(qs.desc)))
                    .and_then(|_| q.try_set_avail_ring_address(GuestAddress(qs.avail)))
                    .and_then(|_| q.try_set_used_ring_address(GuestAddress(qs.used)));
                if let Err(e) = setup {
                    err = Some(format!("queue {i}: {e:?}"));
                    break;
                }
                q.set_event_idx(event_idx);
                q.set_ready(true);
                if !q.is_valid(&self.mem) {
                    err = Some(format!(
                        "queue {i}: rings outside guest memory or misaligned"
                    ));
                    break;
                }
            }
            queues.push(q);
        }
        let result = match err {
            Some(e) => Err(super::ActivateError::BadQueues(e)),
            None => {
                let evts = self
                    .queue_evts
                    .iter()
                    .map(|e| e.try_clone())
                    .collect::<std::io::Result<Vec<_>>>();
                match evts {
                    Ok(queue_evts) => self.device.activate(Activation {
                        mem: self.mem.clone(),
                        queues,
                        queue_evts,
                        interrupt: self.interrupt.clone(),
                        acked_features: self.acked_features,
                    }),
                    Err(e) => Err(super::ActivateError::Other(e.to_string())),
                }
            }
        };
        match result {
            Ok(()) => {
                self.activated = true;
                log::info!(
                    "virtio-mmio: device type {} activated (features {:#x})",
                    self.device.device_type(),
                    self.acked_features
                );
            }
            Err(e) => {
                log::warn!(
                    "virtio-mmio: device type {} failed to activate: {e}",
                    self.device.device_type()
                );
                self.status |= status::DEVICE_NEEDS_RESET;
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueState::new(q.max_size);
        }
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt.reset();
        log::debug!(
            "virtio-mmio: device type {} reset",
            self.device.device_type()
        );
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad(&format!("{}-byte register read at {offset:#x}", data.len()));
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER == 0 {
                self.bad("config write before DRIVER");
                return;
            }
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.bad(&format!(
                "{}-byte register write at {offset:#x}",
                data.len()
            ));
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_reg(offset, v);
    }
}

/// Event-loop subscriber that turns queue notifications into
/// [`MmioTransport::process_queue`] calls.
pub struct QueueNotifyHandler {
    transport: Arc<Mutex<MmioTransport>>,
    evts: Vec<EventFd>,
}

impl QueueNotifyHandler {
    /// Handler for `transport`'s queue eventfds.
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<Self> {
        let evts = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_evts()
            .iter()
            .map(|e| e.try_clone())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(QueueNotifyHandler { transport, evts })
    }
}

impl MutEventSubscriber for QueueNotifyHandler {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let idx = events.data() as usize;
        if let Some(evt) = self.evts.get(idx) {
            if evt.read().is_ok() {
                self.transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .process_queue(idx);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            let ev = event_manager::Events::with_data_raw(evt.as_raw_fd(), i as u32, EventSet::IN);
            if let Err(e) = ops.add(ev) {
                log::error!("cannot watch queue {i} notifications: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
