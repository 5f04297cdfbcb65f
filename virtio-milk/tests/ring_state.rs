//! Ring positions move between queue engines: what one engine exports (or what guest memory
//! shows after it died) lets another continue the same queues without re-reading or skipping
//! a chain. This is what vhost-user's GET/SET_VRING_BASE and any hand-over rely on.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::protocol::{EventInfo, Gtid, Message, TaskEventKind, RECORD_SIZE};
use virtio_milk::queue::{EngineConfig, EngineError, Malformed, QueueEngine, RingState};

const CPUS: u16 = 1;
const QSIZE: u16 = 8;

fn engine(lm: &LoopbackMemory) -> QueueEngine<GuestMemoryMmap> {
    let mut cfg = EngineConfig::new(u32::from(CPUS));
    cfg.event_idx = true;
    cfg.max_queue_size = QSIZE;
    QueueEngine::new(
        lm.mem.clone(),
        cfg,
        &lm.queues,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Box::new(|_q: u16| Ok(())),
    )
    .unwrap()
}

fn wake(pid: u32) -> [u8; RECORD_SIZE] {
    Message::Task(
        TaskEventKind::Wakeup,
        EventInfo {
            gtid: Gtid::new(pid, 1),
            seq: 1,
            ..EventInfo::default()
        },
    )
    .encode()
}

/// Posts one event for `pid` on CPU 0's event queue (buffer slot `slot`).
fn post(lm: &LoopbackMemory, dq: &mut DriverQueue, slot: u16, pid: u32) {
    let addr = lm.buffer(0, slot);
    lm.mem.write_slice(&wake(pid), GuestAddress(addr)).unwrap();
    dq.add_chain(&lm.mem, &[(addr, RECORD_SIZE as u32, false)])
        .unwrap();
    dq.publish(&lm.mem);
}

fn pids(e: &mut QueueEngine<GuestMemoryMmap>) -> Vec<u32> {
    let mut out = Vec::new();
    e.poll_events(&mut out);
    out.into_iter()
        .filter_map(|(_, m)| match m {
            Message::Task(_, e) => Some(e.gtid.pid()),
            _ => None,
        })
        .collect()
}

#[test]
fn exported_positions_let_a_second_engine_continue() {
    let lm = LoopbackMemory::new(CPUS, QSIZE, RECORD_SIZE as u32).unwrap();
    let mut dq = lm.driver_queues(true);
    let mut first = engine(&lm);
    assert_eq!(first.ring_state(), vec![RingState::default(); 2]);
    // More chains than the ring holds, so the indices wrap past the ring size.
    for round in 0..3u32 {
        for i in 0..5u32 {
            post(
                &lm,
                &mut dq[0],
                (i % u32::from(QSIZE)) as u16,
                round * 10 + i + 1,
            );
        }
        assert_eq!(pids(&mut first).len(), 5, "{:?}", first.stats());
        while dq[0].pop_used(&lm.mem).is_some() {}
    }
    let state = first.ring_state();
    assert_eq!(
        state[0],
        RingState {
            next_avail: 15,
            next_used: 15
        }
    );
    assert_eq!(
        state[1],
        RingState::default(),
        "no decision buffer used yet"
    );
    assert_eq!(first.ring_state_from_memory().unwrap(), state);
    drop(first);

    // Events posted while no engine served the queues, then a new engine at the old position.
    post(&lm, &mut dq[0], 0, 100);
    post(&lm, &mut dq[0], 1, 101);
    let mut second = engine(&lm);
    second.set_ring_state(&state).unwrap();
    assert_eq!(
        pids(&mut second),
        vec![100, 101],
        "only the new chains, each once"
    );
    assert_eq!(second.ring_state()[0].next_used, 17);
    while dq[0].pop_used(&lm.mem).is_some() {}
    assert_eq!(dq[0].in_flight(), 0, "every chain came back to the driver");

    // Without the hand-over a fresh engine starts at 0, 17 entries behind avail.idx: more
    // than a ring, so it takes the queue for corrupt and serves nothing.
    let mut fresh = engine(&lm);
    assert_eq!(fresh.ring_state()[0], RingState::default());
    assert!(pids(&mut fresh).is_empty());
    assert_eq!(fresh.stats().malformed[Malformed::AvailIndex as usize], 1);
}

#[test]
fn positions_recovered_from_guest_memory_after_a_crash() {
    let lm = LoopbackMemory::new(CPUS, QSIZE, RECORD_SIZE as u32).unwrap();
    let mut dq = lm.driver_queues(true);
    let mut dead = engine(&lm);
    for i in 0..3 {
        post(&lm, &mut dq[0], i, u32::from(i) + 1);
    }
    assert_eq!(pids(&mut dead).len(), 3);
    // The process "dies": its own state is lost, guest memory is not.
    std::mem::forget(dead);
    post(&lm, &mut dq[0], 3, 7);
    let mut next = engine(&lm);
    let st = next.ring_state_from_memory().unwrap();
    assert_eq!(
        st[0],
        RingState {
            next_avail: 3,
            next_used: 3
        }
    );
    next.set_ring_state(&st).unwrap();
    assert_eq!(pids(&mut next), vec![7]);
}

#[test]
fn impossible_positions_are_refused_and_change_nothing() {
    let lm = LoopbackMemory::new(CPUS, QSIZE, RECORD_SIZE as u32).unwrap();
    let mut e = engine(&lm);
    let bad = RingState {
        next_avail: 1,
        next_used: 2,
    };
    let ok = RingState {
        next_avail: 3,
        next_used: 3,
    };
    assert!(matches!(
        e.set_ring_state(&[ok, bad]),
        Err(EngineError::BadRingState(1))
    ));
    let far = RingState {
        next_avail: QSIZE + 1,
        next_used: 0,
    };
    assert!(matches!(
        e.set_ring_state(&[far, ok]),
        Err(EngineError::BadRingState(0))
    ));
    assert!(matches!(
        e.set_ring_state(&[ok]),
        Err(EngineError::QueueCount { .. })
    ));
    assert_eq!(e.ring_state(), vec![RingState::default(); 2], "unchanged");
    let full = RingState {
        next_avail: QSIZE + 5,
        next_used: 5,
    };
    e.set_ring_state(&[full, ok]).unwrap();
    assert_eq!(e.ring_state(), vec![full, ok]);
}
