//! The transport against a fake QEMU: a client that speaks QEMU's side of the
//! ivshmem protocol, maps the shared memory it receives and plays the guest
//! driver on it, ringing doorbells the way QEMU does (writing the host peer's
//! eventfds) and watching its own interrupt eventfds.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{read_fd, wait_fd, FakeQemu};
use milk_ivshmem::proto::recv_msg;
use milk_ivshmem::regs::{status as st, QueueSlot, MAGIC};
use milk_ivshmem::{
    DeviceInfo, EchoBackend, EchoEvent, EchoLog, IvshmemTransport, QueueConfig, TransportConfig,
    TransportHandle,
};

const VERSION_1: u64 = 1 << 32;

fn info() -> DeviceInfo {
    DeviceInfo {
        device_id: 0x2a,
        vendor_id: 0x1af4,
        features: VERSION_1 | 1,
        config: b"milk".to_vec(),
        num_queues: 3,
        queue_max: 128,
    }
}

fn start() -> (
    tempfile::TempDir,
    TransportConfig,
    TransportHandle<EchoBackend>,
    EchoLog,
) {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().unwrap();
    let cfg = TransportConfig::in_dir(dir.path(), 16, info());
    let (backend, log) = EchoBackend::new();
    let t = IvshmemTransport::new(cfg.clone(), backend).unwrap();
    (dir, cfg, t.spawn().unwrap(), log)
}

#[test]
fn handshake_then_driver_bring_up_kick_and_interrupt() {
    let (_dir, cfg, handle, log) = start();
    let q = FakeQemu::connect(&cfg, 4);
    assert_eq!(q.regs.magic(), MAGIC);
    assert_eq!(i64::from(q.regs.host_peer()), q.host_peer);
    assert_eq!(q.regs.num_queues(), 3);
    assert_eq!(&q.regs.config()[..4], b"milk");

    // Feature negotiation, with a refusal first.
    assert_eq!(q.set_status(st::ACKNOWLEDGE | st::DRIVER), 3);
    q.regs.set_driver_features(VERSION_1 | (1 << 9));
    assert_eq!(q.set_status(3 | st::FEATURES_OK), 3, "refused");
    q.regs.set_driver_features(VERSION_1);
    assert_eq!(q.set_status(3 | st::FEATURES_OK), 3 | st::FEATURES_OK);

    // Queues 0 and 2 (queue 1 left unused), rings inside the 16 MiB of RAM.
    for (n, base) in [(0usize, 0x10_0000u64), (2, 0x20_0000)] {
        q.regs.set_queue(
            n,
            &QueueSlot {
                num_max: 128,
                num: 32,
                ready: 1,
                desc: base,
                driver: base + 0x800,
                device: base + 0xc00,
            },
        );
    }
    let ok = 3 | st::FEATURES_OK | st::DRIVER_OK;
    assert_eq!(q.set_status(ok), ok);
    let act = log
        .wait_for(Duration::from_secs(5), |e| {
            matches!(e, EchoEvent::Activated { .. })
        })
        .expect("backend activated");
    let cfg_of = |base: u64| QueueConfig {
        size: 32,
        desc: base,
        driver: base + 0x800,
        device: base + 0xc00,
    };
    assert_eq!(
        act,
        EchoEvent::Activated {
            features: VERSION_1,
            queues: vec![(0, cfg_of(0x10_0000)), (2, cfg_of(0x20_0000))]
        }
    );

    // Doorbell vector 3 = queue 2: the backend sees queue 2, and its interrupt
    // arrives on our vector 3 and no other.
    q.doorbell(q.host_peer, 3);
    assert!(log
        .wait_for(Duration::from_secs(5), |e| *e == EchoEvent::Kick(2))
        .is_some());
    assert_eq!(wait_fd(&q.irq[3], Duration::from_secs(5)), 1);
    for v in [0, 1, 2] {
        assert_eq!(read_fd(&q.irq[v]), 0, "vector {v} fired");
    }
    assert!(!log.events().contains(&EchoEvent::Kick(0)));

    // Request latency over the real path (reported, not asserted).
    let mut lat: Vec<Duration> = (0..200).map(|_| q.request()).collect();
    lat.sort();
    println!(
        "register request round trip over eventfds: p50 {:?} p99 {:?} max {:?}",
        lat[100], lat[198], lat[199]
    );

    let t = handle.stop().unwrap();
    let s = t.device().stats();
    assert_eq!(s.activations, 1);
    assert_eq!(s.features_refused, 1);
    assert_eq!(s.needs_reset, 0);
    assert_eq!(s.requests, 204, "one processed request per driver request");
    drop(q.sock);
}

#[test]
fn a_second_client_is_refused_and_a_reconnect_starts_fresh() {
    let (_dir, cfg, handle, log) = start();
    let first = FakeQemu::connect(&cfg, 4);
    assert_eq!(first.set_status(st::ACKNOWLEDGE), st::ACKNOWLEDGE);

    // A second QEMU gets its connection closed without a handshake.
    let second = UnixStream::connect(&cfg.socket_path).unwrap();
    second
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(recv_msg(&second).unwrap().is_none(), "second client served");

    // Bring the first one up, then let it vanish like a killed QEMU.
    first.regs.set_driver_features(VERSION_1);
    first.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK);
    let ok = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK | st::DRIVER_OK;
    assert_eq!(first.set_status(ok), ok);
    assert!(log
        .wait_for(Duration::from_secs(5), |e| matches!(
            e,
            EchoEvent::Activated { .. }
        ))
        .is_some());
    let old_id = first.id;
    let old_regs = first.regs.clone();
    drop(first);
    assert!(
        log.wait_for(Duration::from_secs(5), |e| *e == EchoEvent::Reset)
            .is_some(),
        "disconnect did not reset the backend"
    );

    // The next QEMU gets a new id, a republished register file (same memory).
    let deadline = Instant::now() + Duration::from_secs(5);
    while old_regs.status() != 0 {
        assert!(Instant::now() < deadline, "register file not republished");
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = FakeQemu::connect(&cfg, 4);
    assert_ne!(again.id, old_id);
    assert_eq!(again.regs.magic(), MAGIC);
    assert_eq!(again.regs.status(), 0);
    assert_eq!(again.regs.driver_features(), 0);
    assert_eq!(again.set_status(st::ACKNOWLEDGE), st::ACKNOWLEDGE);
    handle.stop().unwrap();
}

#[test]
fn a_client_that_vanishes_mid_handshake_does_not_stop_the_server() {
    let (_dir, cfg, handle, _log) = start();
    for _ in 0..3 {
        let s = UnixStream::connect(&cfg.socket_path).unwrap();
        drop(s);
    }
    // Give the server a moment to notice, then a real client still works.
    std::thread::sleep(Duration::from_millis(50));
    let q = FakeQemu::connect(&cfg, 4);
    assert_eq!(q.set_status(st::ACKNOWLEDGE), st::ACKNOWLEDGE);
    handle.stop().unwrap();
}
