//! The transport's register state machine driven by a fake driver.

use super::*;
use crate::devices::virtio::echo::{
    EchoDevice, EchoStats, ECHO_DEVICE_ID, ECHO_F_UNUSED, ECHO_F_UPPER,
};
use crate::devices::virtio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vm_memory::Bytes;

const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const REQ: u64 = 0x20000;
const RESP: u64 = 0x21000;

struct FakeDriver {
    t: MmioTransport,
    mem: GuestMemory,
    irq: EventFd,
    stats: Arc<Mutex<EchoStats>>,
}

impl FakeDriver {
    fn new() -> Self {
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (dev, stats) = EchoDevice::new();
        let t = MmioTransport::new(Box::new(dev), mem.clone(), irq.try_clone().unwrap()).unwrap();
        FakeDriver { t, mem, irq, stats }
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn features(&mut self) -> u64 {
        self.w(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.r(reg::DEVICE_FEATURES) as u64;
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.r(reg::DEVICE_FEATURES) as u64;
        lo | (hi << 32)
    }

    fn ack_features(&mut self, f: u64) {
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, f as u32);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, (f >> 32) as u32);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(&mut self, f: u64) {
        self.w(reg::STATUS, status::ACKNOWLEDGE);
        self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.ack_features(f);
        self.w(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(&mut self, size: u32, desc: u64, avail: u64, used: u64) {
        self.w(reg::QUEUE_SEL, 0);
        self.w(reg::QUEUE_NUM, size);
        self.w(reg::QUEUE_DESC_LOW, desc as u32);
        self.w(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.w(reg::QUEUE_DRIVER_LOW, avail as u32);
        self.w(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.w(reg::QUEUE_DEVICE_LOW, used as u32);
        self.w(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.w(reg::QUEUE_READY, 1);
    }

    fn driver_ok(&mut self) {
        let s = self.r(reg::STATUS);
        self.w(reg::STATUS, s | status::DRIVER_OK);
    }

    fn full_init(&mut self) {
        self.negotiate(VIRTIO_F_VERSION_1 | ECHO_F_UPPER);
        self.setup_queue(8, DESC, AVAIL, USED);
        self.driver_ok();
    }

    /// Puts one request/response chain on the avail ring.
    fn post(&mut self, req: &[u8], slot: u16, resp_len: u32) {
        let m = &self.mem;
        let d0 = DESC + 32 * slot as u64;
        m.write_slice(req, GuestAddress(REQ)).unwrap();
        // desc[2*slot]: request, NEXT -> desc[2*slot+1]: response, WRITE.
        m.write_obj(REQ, GuestAddress(d0)).unwrap();
        m.write_obj(req.len() as u32, GuestAddress(d0 + 8)).unwrap();
        m.write_obj(1u16, GuestAddress(d0 + 12)).unwrap();
        m.write_obj(2 * slot + 1, GuestAddress(d0 + 14)).unwrap();
        m.write_obj(RESP, GuestAddress(d0 + 16)).unwrap();
        m.write_obj(resp_len, GuestAddress(d0 + 24)).unwrap();
        m.write_obj(2u16, GuestAddress(d0 + 28)).unwrap();
        m.write_obj(0u16, GuestAddress(d0 + 30)).unwrap();
        let idx: u16 = m.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(2 * slot, GuestAddress(AVAIL + 4 + 2 * (idx as u64 % 8)))
            .unwrap();
        m.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }
}

#[test]
fn identification_registers() {
    let mut d = FakeDriver::new();
    assert_eq!(d.r(reg::MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.r(reg::VERSION), 2);
    assert_eq!(d.r(reg::DEVICE_ID), ECHO_DEVICE_ID);
    assert_eq!(d.r(reg::VENDOR_ID), MMIO_VENDOR_ID);
    assert_eq!(d.r(reg::SHM_LEN_LOW), u32::MAX, "no shared memory regions");
    assert_eq!(d.t.bad_accesses(), 0);
}

#[test]
fn feature_negotiation() {
    let mut d = FakeDriver::new();
    let offered = d.features();
    assert_eq!(offered, VIRTIO_F_VERSION_1 | ECHO_F_UPPER | ECHO_F_UNUSED);
    d.w(reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(d.r(reg::DEVICE_FEATURES), 0);

    // Before DRIVER the write is ignored.
    d.ack_features(VIRTIO_F_VERSION_1);
    assert_eq!(d.t.acked_features(), 0);
    assert_eq!(d.t.bad_accesses(), 2);

    d.w(reg::STATUS, status::ACKNOWLEDGE);
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // Bits the device does not offer are dropped (and counted).
    d.ack_features(VIRTIO_F_VERSION_1 | ECHO_F_UPPER | (1 << 20));
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1 | ECHO_F_UPPER);
    assert_eq!(d.t.bad_accesses(), 3);
    // Re-writing a half replaces it.
    d.w(reg::DRIVER_FEATURES_SEL, 0);
    d.w(reg::DRIVER_FEATURES, 0);
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1);
    d.w(reg::DRIVER_FEATURES, ECHO_F_UPPER as u32);

    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(d.r(reg::STATUS) & status::FEATURES_OK, 0);
    // Frozen after FEATURES_OK.
    d.w(reg::DRIVER_FEATURES_SEL, 0);
    d.w(reg::DRIVER_FEATURES, 0);
    assert_eq!(d.t.acked_features(), VIRTIO_F_VERSION_1 | ECHO_F_UPPER);
}

#[test]
fn features_ok_requires_version_1() {
    let mut d = FakeDriver::new();
    d.negotiate(ECHO_F_UPPER);
    let s = d.r(reg::STATUS);
    assert_eq!(s & status::FEATURES_OK, 0, "device refuses legacy drivers");
    assert_eq!(s, status::ACKNOWLEDGE | status::DRIVER);
}

#[test]
fn status_transitions_must_be_ordered() {
    let mut d = FakeDriver::new();
    d.w(reg::STATUS, status::DRIVER);
    assert_eq!(d.r(reg::STATUS), 0, "DRIVER without ACKNOWLEDGE");
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
    );
    assert_eq!(
        d.r(reg::STATUS),
        status::ACKNOWLEDGE,
        "DRIVER_OK without FEATURES_OK"
    );
    d.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    d.w(reg::STATUS, status::DRIVER);
    assert_eq!(
        d.r(reg::STATUS),
        status::ACKNOWLEDGE | status::DRIVER,
        "bits are only cleared by a reset"
    );
    d.w(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FAILED,
    );
    assert_ne!(d.r(reg::STATUS) & status::FAILED, 0);
    assert!(!d.t.is_activated());
    assert_eq!(d.t.bad_accesses(), 3);
}

#[test]
fn queue_setup_window() {
    let mut d = FakeDriver::new();
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 16);
    // Before FEATURES_OK: ignored.
    d.w(reg::QUEUE_NUM, 8);
    d.w(reg::QUEUE_READY, 1);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    d.negotiate(VIRTIO_F_VERSION_1);
    let before = d.t.bad_accesses();
    // Bad sizes are ignored.
    d.w(reg::QUEUE_NUM, 0);
    d.w(reg::QUEUE_NUM, 12);
    d.w(reg::QUEUE_NUM, 32);
    assert_eq!(d.t.bad_accesses(), before + 3);
    // Nonexistent queue.
    d.w(reg::QUEUE_SEL, 1);
    assert_eq!(d.r(reg::QUEUE_NUM_MAX), 0);
    d.w(reg::QUEUE_READY, 1);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert_eq!(d.t.bad_accesses(), before + 4);
    d.setup_queue(8, DESC, AVAIL, USED);
    assert_eq!(d.r(reg::QUEUE_READY), 1);
    d.driver_ok();
    assert!(d.t.is_activated());
    // After DRIVER_OK queue registers are frozen.
    d.w(reg::QUEUE_READY, 0);
    assert_eq!(d.r(reg::QUEUE_READY), 1);
}

#[test]
fn queue_round_trip_and_interrupt_status() {
    let mut d = FakeDriver::new();
    d.full_init();
    let s = d.stats.lock().unwrap().clone();
    assert_eq!(s.activations, 1);
    assert_eq!(s.acked_features, VIRTIO_F_VERSION_1 | ECHO_F_UPPER);

    d.post(b"hello milk", 0, 64);
    d.w(reg::QUEUE_NOTIFY, 0);
    // The event loop would see the queue eventfd; emulate it.
    assert_eq!(d.t.queue_evts()[0].read().unwrap(), 1);
    d.t.process_queue(0);

    assert_eq!(d.used_idx(), 1);
    let id: u32 = d.mem.read_obj(GuestAddress(USED + 4)).unwrap();
    let len: u32 = d.mem.read_obj(GuestAddress(USED + 8)).unwrap();
    assert_eq!((id, len), (0, 10));
    let mut out = [0u8; 10];
    d.mem.read_slice(&mut out, GuestAddress(RESP)).unwrap();
    assert_eq!(&out, b"HELLO MILK");
    assert_eq!(
        d.stats.lock().unwrap().requests,
        vec![b"hello milk".to_vec()]
    );

    assert_eq!(d.r(reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.irq.read().unwrap(), 1, "irqfd raised");
    d.w(reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);

    // A short response buffer truncates; used length says so.
    d.post(b"abc", 1, 2);
    d.t.process_queue(0);
    assert_eq!(d.used_idx(), 2);
    let len: u32 = d.mem.read_obj(GuestAddress(USED + 4 + 8 + 4)).unwrap();
    assert_eq!(len, 2);
    assert_eq!(d.t.bad_accesses(), 0);
}

#[test]
fn reset_returns_to_initial_state() {
    let mut d = FakeDriver::new();
    d.full_init();
    d.post(b"x", 0, 4);
    d.t.process_queue(0);
    assert_ne!(d.r(reg::INTERRUPT_STATUS), 0);
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0);
    assert!(!d.t.is_activated());
    assert_eq!(d.t.acked_features(), 0);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), 0);
    assert_eq!(d.r(reg::QUEUE_READY), 0);
    assert_eq!(d.stats.lock().unwrap().resets, 1);
    // Kicks after a reset do nothing.
    d.post(b"y", 1, 4);
    d.t.process_queue(0);
    assert_eq!(d.stats.lock().unwrap().requests.len(), 1);
    // And the device can be brought up again.
    for off in [DESC, AVAIL, USED] {
        d.mem.write_slice(&[0u8; 0x100], GuestAddress(off)).unwrap();
    }
    d.full_init();
    assert_eq!(d.stats.lock().unwrap().activations, 2);
}

#[test]
fn bad_register_accesses_are_ignored() {
    let mut d = FakeDriver::new();
    d.w(reg::STATUS, status::ACKNOWLEDGE);
    // Misaligned and wrongly sized accesses.
    let mut b = [0xaau8; 4];
    d.t.read(reg::STATUS + 1, &mut b);
    assert_eq!(b, [0; 4]);
    let mut two = [0xaau8; 2];
    d.t.read(reg::STATUS, &mut two);
    assert_eq!(two, [0, 0]);
    d.t.write(reg::STATUS, &[0, 0]);
    d.t.write(reg::STATUS + 2, &[0, 0, 0, 0]);
    // Write to read-only, read of write-only registers, unknown offset.
    d.w(reg::MAGIC_VALUE, 0);
    assert_eq!(d.r(reg::QUEUE_NOTIFY), 0);
    d.w(0x0f0, 1);
    // Notify of a nonexistent queue.
    d.w(reg::QUEUE_NOTIFY, 5);
    assert_eq!(d.t.bad_accesses(), 8);
    assert_eq!(d.r(reg::STATUS), status::ACKNOWLEDGE, "state unchanged");
    assert_eq!(d.r(reg::MAGIC_VALUE), MMIO_MAGIC);
}

#[test]
fn config_space_through_transport() {
    let mut d = FakeDriver::new();
    // Config writes before DRIVER are ignored.
    d.w(reg::CONFIG + 4, 9);
    assert_eq!(d.r(reg::CONFIG + 4), 0);
    d.negotiate(VIRTIO_F_VERSION_1);
    assert_eq!(d.r(reg::CONFIG), 4096);
    d.w(reg::CONFIG + 4, 0x1234);
    assert_eq!(d.r(reg::CONFIG + 4), 0x1234);
    // Byte-wide config access is allowed.
    let mut b = [0u8; 1];
    d.t.read(reg::CONFIG + 5, &mut b);
    assert_eq!(b[0], 0x12);
    assert_eq!(d.stats.lock().unwrap().scratch, 0x1234);
    assert_eq!(d.r(reg::CONFIG_GENERATION), 0);
}

#[test]
fn activation_failure_sets_needs_reset() {
    let mut d = FakeDriver::new();
    d.negotiate(VIRTIO_F_VERSION_1);
    // Used ring past the end of the 1 MiB guest.
    d.setup_queue(8, DESC, AVAIL, 0x20_0000);
    d.driver_ok();
    assert!(!d.t.is_activated());
    assert_ne!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert_eq!(d.r(reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(d.r(reg::CONFIG_GENERATION), 1);
    assert_eq!(d.stats.lock().unwrap().activations, 0);
    // Unready queue: the echo device refuses to activate too.
    d.w(reg::STATUS, 0);
    d.negotiate(VIRTIO_F_VERSION_1);
    d.driver_ok();
    assert!(!d.t.is_activated());
}

#[test]
fn notify_handler_drives_device_from_event_loop() {
    let d = FakeDriver::new();
    let FakeDriver { t, mem, stats, .. } = d;
    let t = Arc::new(Mutex::new(t));
    let mut em = event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    let handler = QueueNotifyHandler::new(t.clone()).unwrap();
    event_manager::SubscriberOps::add_subscriber(&mut em, Arc::new(Mutex::new(handler)));
    let mut drv = FakeDriver {
        t: MmioTransport::new(
            Box::new(EchoDevice::new().0),
            mem.clone(),
            EventFd::new(0).unwrap(),
        )
        .unwrap(),
        mem,
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
        stats,
    };
    // Drive the shared transport through the fake driver's helpers.
    std::mem::swap(&mut drv.t, &mut *t.lock().unwrap());
    drv.full_init();
    drv.post(b"loop", 0, 8);
    drv.w(reg::QUEUE_NOTIFY, 0);
    std::mem::swap(&mut drv.t, &mut *t.lock().unwrap());
    let n = em.run_with_timeout(1000).unwrap();
    assert_eq!(n, 1);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.stats.lock().unwrap().requests, vec![b"loop".to_vec()]);
}
