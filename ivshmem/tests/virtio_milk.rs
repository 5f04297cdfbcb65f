//! virtio-milk's real device (queue engine + runtime) behind the transport,
//! with a fake QEMU whose "guest driver" brings the device up through the
//! register file and then uses split vrings in guest RAM (virtio-milk's
//! loopback `DriverQueue`): the host's HELLO arrives in a decision buffer with
//! an interrupt on the decision queue's vector, and the guest's HELLO on the
//! event queue is consumed by the engine.
#![cfg(feature = "virtio-milk")]

mod common;

use std::time::{Duration, Instant};

use common::{read_fd, wait_fd, FakeQemu};
use milk_ivshmem::milk::{MilkBackend, MILK_VENDOR_ID};
use milk_ivshmem::regs::{status as st, QueueSlot};
use milk_ivshmem::{IvshmemTransport, TransportConfig};
use virtio_milk::device::MilkDevice;
use virtio_milk::loopback::DriverQueue;
use virtio_milk::policy::{Dispatcher, Policy, PolicyEvent, SchedView};
use virtio_milk::protocol::{
    pack_name, parse_record, Direction, Message, SessionInfo, RECORD_SIZE, VIRTIO_ID_MILK,
};
use virtio_milk::queue::QueueConfig;
use virtio_milk::runtime::RuntimeConfig;
use vm_memory::{Bytes, GuestAddress};

struct Idle;
impl Policy for Idle {
    fn name(&self) -> &str {
        "idle"
    }
    fn attach(&mut self, _: &SchedView) {}
    fn on_event(&mut self, _: &PolicyEvent, _: &SchedView) {}
    fn schedule(&mut self, _: &mut Dispatcher<'_>) {}
}

const QSIZE: u16 = 64;
const EVENT_Q: u64 = 0x10_0000;
const DECISION_Q: u64 = 0x11_0000;
const DECISION_BUF: u64 = 0x20_0000;
const EVENT_BUF: u64 = 0x30_0000;

fn rings(base: u64) -> QueueConfig {
    QueueConfig {
        size: QSIZE,
        desc_table: base,
        avail_ring: base + 16 * u64::from(QSIZE),
        used_ring: base + 0x800,
    }
}

#[test]
fn virtio_milk_runtime_talks_to_a_driver_through_the_transport() {
    let _ = env_logger::builder().is_test(true).try_init();
    let rt = RuntimeConfig {
        heartbeat: None,
        ..RuntimeConfig::default()
    };
    let dev = MilkDevice::new(1, Box::new(|| Box::new(Idle) as Box<dyn Policy>), rt).unwrap();
    let backend = MilkBackend::new(dev);
    let info = backend.device_info();
    assert_eq!(info.device_id, VIRTIO_ID_MILK);
    assert_eq!(info.num_queues, 2);
    let features = info.features;
    let dir = tempfile::tempdir().unwrap();
    let cfg = TransportConfig::in_dir(dir.path(), 16, info);
    let t = IvshmemTransport::new(cfg.clone(), backend).unwrap();
    let mem = t.guest_ram().memory().clone();
    let handle = t.spawn().unwrap();

    let q = FakeQemu::connect(&cfg, 3);
    assert_eq!(q.regs.device_id(), VIRTIO_ID_MILK);
    assert_eq!(q.regs.vendor_id(), MILK_VENDOR_ID);
    q.set_status(st::ACKNOWLEDGE | st::DRIVER);
    q.regs.set_driver_features(features);
    let neg = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;
    assert_eq!(q.set_status(neg), neg, "all offered features accepted");

    // The driver side of both queues, in guest RAM; one writable decision
    // buffer posted before DRIVER_OK, as the guest driver does.
    let event_idx = true;
    let mut events = DriverQueue::new(QSIZE, rings(EVENT_Q), event_idx);
    let mut decisions = DriverQueue::new(QSIZE, rings(DECISION_Q), event_idx);
    decisions
        .add_chain(&mem, &[(DECISION_BUF, 8 * RECORD_SIZE as u32, true)])
        .unwrap();
    decisions.publish(&mem);
    decisions.enable_interrupts(&mem);
    for (n, base) in [(0, EVENT_Q), (1, DECISION_Q)] {
        let r = rings(base);
        q.regs.set_queue(
            n,
            &QueueSlot {
                num_max: q.regs.queue(n).unwrap().num_max,
                num: QSIZE,
                ready: 1,
                desc: r.desc_table,
                driver: r.avail_ring,
                device: r.used_ring,
            },
        );
    }
    let ok = neg | st::DRIVER_OK;
    assert_eq!(q.set_status(ok), ok, "activation failed");

    // Host HELLO: a used decision buffer and MSI-X vector 2 (queue 1).
    assert!(
        wait_fd(&q.irq[2], Duration::from_secs(5)) >= 1,
        "no decision-queue interrupt"
    );
    let (_, len) = decisions.pop_used(&mem).expect("used decision buffer");
    assert!(len as usize >= RECORD_SIZE, "used length {len}");
    let mut raw = [0u8; RECORD_SIZE];
    mem.read_slice(&mut raw, GuestAddress(DECISION_BUF))
        .unwrap();
    let hello = match parse_record(&raw, Direction::HostToGuest, 1) {
        Ok(Message::Hello(s)) => s,
        other => panic!("expected HELLO, got {other:?}"),
    };
    assert_eq!(hello.num_cpus, 1);

    // Guest HELLO back on the event queue, kicked through doorbell vector 1.
    let mine = Message::Hello(SessionInfo {
        cpu: 0,
        num_cpus: 1,
        heartbeat_ms: 0,
        session_id: hello.session_id,
        ts_ns: 1,
        counter: 0,
        name: pack_name("linux"),
        ..Default::default()
    });
    mem.write_slice(&mine.encode(), GuestAddress(EVENT_BUF))
        .unwrap();
    events
        .add_chain(&mem, &[(EVENT_BUF, RECORD_SIZE as u32, false)])
        .unwrap();
    events.enable_interrupts(&mem);
    if events.publish(&mem) {
        q.doorbell(q.host_peer, 1);
    }
    let t0 = Instant::now();
    while events.pop_used(&mem).is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "event buffer not consumed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = read_fd(&q.irq[1]);

    // Reset stops the runtime; its summary counts what crossed the transport.
    assert_eq!(q.set_status(0), 0);
    let t = handle.stop().unwrap();
    let s = t.device().backend().control().summaries();
    assert_eq!(s.len(), 1, "one run ended");
    println!("{}", s[0]);
    assert_eq!(s[0].engine.records_in, 1, "guest HELLO received");
    assert!(s[0].engine.records_out >= 1, "host HELLO sent");
    assert_eq!(s[0].engine.malformed_total(), 0);
}
