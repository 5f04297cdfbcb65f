//! `rr` through the real runtime and queue engine against a simulated one-CPU guest whose
//! tasks never block: the host timer at slice end sends the waiting task with a preempting
//! RUN, the guest reports the old task preempted, and the two alternate.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::protocol::{
    msg, pack_name, parse_record, AckInfo, AckStatus, DecisionInfo, Direction, EventInfo, Gtid,
    Message, SessionInfo, TaskEventKind, TaskNewInfo, PREEMPT_HOST, RECORD_SIZE, RUN_F_PREEMPT,
};
use virtio_milk::queue::{EngineConfig, QueueEngine};
use virtio_milk::runtime::{Runtime, RuntimeConfig};

struct Guest {
    lm: LoopbackMemory,
    dq: Vec<DriverQueue>,
}

impl Guest {
    fn send(&mut self, msgs: &[Message]) {
        while self.dq[0].pop_used(&self.lm.mem).is_some() {}
        let d = self.dq[0].next_free_desc().expect("free event descriptor");
        let addr = self.lm.buffer(0, d);
        for (i, m) in msgs.iter().enumerate() {
            self.lm
                .mem
                .write_slice(&m.encode(), GuestAddress(addr + (i * RECORD_SIZE) as u64))
                .unwrap();
        }
        let len = (msgs.len() * RECORD_SIZE) as u32;
        self.dq[0]
            .add_chain(&self.lm.mem, &[(addr, len, false)])
            .unwrap();
        self.dq[0].publish(&self.lm.mem);
    }

    fn post(&mut self) {
        while self.dq[1].free_descs() > 0 {
            let d = self.dq[1].next_free_desc().unwrap();
            let a = self.lm.buffer(1, d);
            self.dq[1]
                .add_chain(&self.lm.mem, &[(a, 256, true)])
                .unwrap();
        }
        self.dq[1].publish(&self.lm.mem);
    }

    fn recv(&mut self) -> Vec<Message> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.dq[1].pop_used(&self.lm.mem) {
            let a = self.lm.buffer(1, head);
            for i in 0..len as usize / RECORD_SIZE {
                let mut raw = [0u8; RECORD_SIZE];
                self.lm
                    .mem
                    .read_slice(&mut raw, GuestAddress(a + (i * RECORD_SIZE) as u64))
                    .unwrap();
                out.push(parse_record(&raw, Direction::HostToGuest, 1).unwrap());
            }
        }
        self.post();
        out
    }
}

fn ev(kind: TaskEventKind, gtid: Gtid, seq: u64, arg: u32, runtime_ns: u64) -> Message {
    Message::Task(
        kind,
        EventInfo {
            gtid,
            seq,
            arg,
            runtime_ns,
            ..Default::default()
        },
    )
}

fn ack(d: &DecisionInfo) -> Message {
    Message::Ack(AckInfo {
        cpu: 0,
        gtid: d.gtid,
        seq: d.seq,
        ts_ns: 0,
        cookie: d.cookie,
        status: AckStatus::Ok,
        decision_type: msg::RUN,
        target_cpu: 0,
    })
}

#[test]
fn rr_preempts_at_slice_end_and_tasks_alternate() {
    let lm = LoopbackMemory::new(1, 16, 256).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut cfg = EngineConfig::new(1);
    cfg.max_batch = 4;
    cfg.max_queue_size = 16;
    let engine: QueueEngine<GuestMemoryMmap> = QueueEngine::new(
        lm.mem.clone(),
        cfg,
        &lm.queues,
        kick,
        Box::new(|_q: u16| Ok(())),
    )
    .unwrap();
    let dq = lm.driver_queues(true);
    let mut g = Guest { lm, dq };
    g.post();
    let policy = milk_policies::by_name("rr:slice_us=1000").unwrap();
    let mut rt = Runtime::new(
        engine,
        policy,
        RuntimeConfig {
            heartbeat: None,
            ack_timeout: Duration::from_secs(3600),
            ack_grace: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    rt.start_session();
    let hello = g
        .recv()
        .into_iter()
        .find_map(|m| match m {
            Message::Hello(s) => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(hello.tick_us, 1000, "rr subscribes to ticks at its slice");
    let (a, b) = (Gtid::new(10, 1), Gtid::new(11, 1));
    let new = |gtid: Gtid| {
        Message::TaskNew(TaskNewInfo {
            gtid,
            seq: 1,
            comm: pack_name("spin"),
            cpus_allowed: 1,
            tgid: gtid.pid(),
            weight: 100,
            ..Default::default()
        })
    };
    g.send(&[
        Message::Hello(SessionInfo {
            session_id: hello.session_id,
            ..Default::default()
        }),
        new(a),
        new(b),
    ]);
    g.send(&[
        ev(TaskEventKind::Wakeup, a, 2, 0, 0),
        ev(TaskEventKind::Wakeup, b, 2, 0, 0),
    ]);
    // The guest: one CPU, the current task never blocks; seqs per task.
    let mut seq = [2u64, 2u64];
    let idx = |gtid: Gtid| usize::from(gtid == b);
    let mut running: Option<Gtid> = None;
    let mut switches = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while switches.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "rr did not alternate: {switches:?}\n{}",
            rt.summary()
        );
        rt.step();
        for m in g.recv() {
            let Message::Run(d) = m else { continue };
            assert_eq!(d.seq, seq[idx(d.gtid)], "RUN with the task's seq");
            let mut out = Vec::new();
            if let Some(cur) = running {
                // Only a preempting RUN may take the CPU from a task that never blocks.
                assert_eq!(
                    d.flags, RUN_F_PREEMPT,
                    "RUN without F_PREEMPT to a busy CPU"
                );
                seq[idx(cur)] += 1;
                out.push(ev(
                    TaskEventKind::Preempt,
                    cur,
                    seq[idx(cur)],
                    PREEMPT_HOST,
                    1_000_000,
                ));
                switches.push((cur, d.gtid, Instant::now()));
            }
            running = Some(d.gtid);
            out.push(ack(&d));
            g.send(&out);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // Strict alternation, each slice at least the 1 ms rr was given.
    for w in switches.windows(2) {
        assert_eq!(
            w[0].1, w[1].0,
            "the task that got the CPU is the next one preempted"
        );
        assert_ne!(w[1].0, w[1].1);
        assert!(
            w[1].2 - w[0].2 >= Duration::from_millis(1),
            "slice shorter than 1 ms"
        );
    }
    // Take the last ack.
    rt.step();
    let m = rt.metrics();
    assert!(m.decisions_run_preempt >= 4, "{}", rt.summary());
    assert!(m.timers_fired >= 4);
    assert_eq!(m.policy_rejects, 0);
    assert_eq!(m.acks[AckStatus::Ok as usize], m.decisions_run);
}
