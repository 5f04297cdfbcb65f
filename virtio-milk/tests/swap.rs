//! In-process policy swap at the runtime's safe point, driven step by step through real
//! queues: undelivered decisions of the old policy are revoked (never reach the guest, the
//! task is decided again by the new policy, one RUN per task), delivered ones resolve
//! exactly once when their ack comes late, the guest is told with a HELLO of the same
//! session, and the stall and blackout are measured.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::policy::{CpuState, Decision, Policy, PolicyEvent, SchedView, TaskState};
use virtio_milk::protocol::{
    pack_name, parse_record, unpack_name, AckStatus, DecisionInfo, Direction, Message,
    TaskEventKind, RECORD_SIZE,
};
use virtio_milk::queue::{EngineConfig, QueueEngine};
use virtio_milk::runtime::{RawDecision, Runtime, RuntimeConfig};

const CPUS: u16 = 2;

/// Runs the lowest runnable pid on each free CPU it may use.
struct Lowest(&'static str);

impl Policy for Lowest {
    fn name(&self) -> &str {
        self.0
    }
    fn attach(&mut self, _: &SchedView) {}
    fn on_event(&mut self, _: &PolicyEvent, _: &SchedView) {}
    fn schedule(&mut self, view: &SchedView, out: &mut Vec<Decision>) {
        let mut runnable: Vec<_> = view
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Runnable)
            .map(|t| t.pid)
            .collect();
        runnable.sort_unstable();
        for cpu in view.free_cpus() {
            if let Some(i) = runnable
                .iter()
                .position(|&p| view.task(p).is_some_and(|t| t.allows(cpu)))
            {
                out.push(Decision::Run {
                    pid: runnable.remove(i),
                    cpu,
                    slice_ns: 0,
                });
            }
        }
    }
}

struct Guest {
    lm: LoopbackMemory,
    dq: Vec<DriverQueue>,
}

impl Guest {
    fn send(&mut self, cpu: u16, msgs: &[Message]) {
        let q = usize::from(cpu) * 2;
        while self.dq[q].pop_used(&self.lm.mem).is_some() {}
        let d = self.dq[q].next_free_desc().unwrap();
        let addr = self.lm.buffer(q as u16, d);
        for (i, m) in msgs.iter().enumerate() {
            self.lm
                .mem
                .write_slice(&m.encode(), GuestAddress(addr + (i * RECORD_SIZE) as u64))
                .unwrap();
        }
        let len = (msgs.len() * RECORD_SIZE) as u32;
        self.dq[q]
            .add_chain(&self.lm.mem, &[(addr, len, false)])
            .unwrap();
        self.dq[q].publish(&self.lm.mem);
    }

    fn post_decision_buffers(&mut self) {
        for cpu in 0..CPUS {
            let q = usize::from(cpu) * 2 + 1;
            while self.dq[q].free_descs() > 0 {
                let d = self.dq[q].next_free_desc().unwrap();
                let a = self.lm.buffer(q as u16, d);
                self.dq[q]
                    .add_chain(&self.lm.mem, &[(a, 256, true)])
                    .unwrap();
            }
            self.dq[q].publish(&self.lm.mem);
        }
    }

    /// Every record received so far on all decision queues, in order per queue.
    fn recv(&mut self) -> Vec<Message> {
        let mut msgs = Vec::new();
        for cpu in 0..CPUS {
            let q = usize::from(cpu) * 2 + 1;
            while let Some((head, len)) = self.dq[q].pop_used(&self.lm.mem) {
                let a = self.lm.buffer(q as u16, head);
                for i in 0..len as usize / RECORD_SIZE {
                    let mut raw = [0u8; RECORD_SIZE];
                    self.lm
                        .mem
                        .read_slice(&mut raw, GuestAddress(a + (i * RECORD_SIZE) as u64))
                        .unwrap();
                    msgs.push(parse_record(&raw, Direction::HostToGuest, u32::from(CPUS)).unwrap());
                }
            }
        }
        self.post_decision_buffers();
        msgs
    }
}

fn setup(post_buffers: bool) -> (Guest, Runtime<GuestMemoryMmap>) {
    let lm = LoopbackMemory::new(CPUS, 8, 256).unwrap();
    let mut cfg = EngineConfig::new(u32::from(CPUS));
    cfg.max_batch = 4;
    cfg.max_queue_size = 8;
    let engine = QueueEngine::new(
        lm.mem.clone(),
        cfg,
        &lm.queues,
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Box::new(|_q: u16| Ok(())),
    )
    .unwrap();
    let dq = lm.driver_queues(true);
    let mut g = Guest { lm, dq };
    if post_buffers {
        g.post_decision_buffers();
    }
    let rt = Runtime::new(
        engine,
        Box::new(Lowest("old")),
        RuntimeConfig {
            heartbeat: None,
            ..Default::default()
        },
    );
    (g, rt)
}

fn task_new(pid: u32, mask: u64) -> Message {
    Message::TaskNew {
        cpu: 0,
        pid,
        tgid: pid,
        seq: 1,
        ts_ns: 0,
        comm: pack_name("t"),
        cpus_allowed: mask,
        weight: 100,
        nice: 0,
    }
}

fn wake(pid: u32, seq: u64) -> Message {
    Message::Task {
        kind: TaskEventKind::Wakeup,
        cpu: 0,
        pid,
        arg: 0,
        seq,
        ts_ns: 0,
    }
}

fn ack(d: &DecisionInfo, status: AckStatus) -> Message {
    Message::Ack {
        cpu: d.cpu,
        pid: d.pid,
        status,
        seq: d.seq,
        ts_ns: 0,
        cookie: d.cookie,
        decision_type: virtio_milk::protocol::msg::RUN,
        target_cpu: d.cpu,
    }
}

fn runs(msgs: &[Message]) -> Vec<DecisionInfo> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Run(d) => Some(*d),
            _ => None,
        })
        .collect()
}

fn hellos(msgs: &[Message]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Hello(s) => Some((s.session_id, unpack_name(&s.name).to_string())),
            _ => None,
        })
        .collect()
}

#[test]
fn undelivered_decisions_of_the_old_policy_are_revoked_and_decided_once_more() {
    // No decision buffers: the old policy's RUN waits in the backlog.
    let (mut g, mut rt) = setup(false);
    rt.start_session();
    g.send(0, &[task_new(1, 0b01), wake(1, 2)]);
    rt.step();
    assert_eq!(rt.view().task(1).unwrap().state, TaskState::Dispatched(0));
    assert_eq!(rt.metrics().decisions_run, 1);

    rt.swap_policy(Box::new(Lowest("new")));
    let m = rt.metrics();
    assert_eq!(m.swap_revoked, 1, "the undelivered RUN was revoked");
    assert_eq!(m.policy_swaps, 1);
    // The new policy decided the task again at once.
    assert_eq!(m.decisions_run, 2);
    assert_eq!(rt.view().task(1).unwrap().state, TaskState::Dispatched(0));
    assert_eq!(rt.view().cpus[0], CpuState::Committed(1));

    g.post_decision_buffers();
    rt.step();
    let got = g.recv();
    let r = runs(&got);
    assert_eq!(r.len(), 1, "one RUN reaches the guest, not two: {got:?}");
    assert_eq!((r[0].pid, r[0].cpu, r[0].seq), (1, 0, 2));
    let h = hellos(&got);
    assert_eq!(h.len(), 2, "session HELLO, then the swap's: {h:?}");
    assert_eq!(h[0].0, h[1].0, "same session: the guest stays on sched_ext");
    assert_eq!((h[0].1.as_str(), h[1].1.as_str()), ("old", "new"));

    g.send(0, &[ack(&r[0], AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.view().task(1).unwrap().state, TaskState::Running(0));
    assert_eq!(
        rt.metrics().old_policy_acks,
        0,
        "the RUN was the new policy's"
    );
    assert_eq!(rt.metrics().unmatched_acks, 0);
}

#[test]
fn a_late_ack_of_the_old_policy_resolves_its_run_exactly_once() {
    let (mut g, mut rt) = setup(true);
    rt.start_session();
    g.send(0, &[task_new(1, 0b01), task_new(2, 0b10), wake(1, 2)]);
    rt.step();
    let before = runs(&g.recv());
    assert_eq!(before.len(), 1);
    let old_run = before[0];

    rt.swap_policy(Box::new(Lowest("new")));
    assert_eq!(rt.metrics().swap_revoked, 0, "nothing was undelivered");
    assert_eq!(
        rt.metrics().last_run_before_swap,
        Some(RawDecision::run(1, 0, 2)),
        "kept for late-replay tests"
    );
    // Task 1 is still the old policy's until its ack: the new policy does not send it
    // anywhere else.
    rt.step();
    assert!(runs(&g.recv()).is_empty());

    // The old policy's ack arrives after the swap: applied once.
    g.send(0, &[ack(&old_run, AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.view().task(1).unwrap().state, TaskState::Running(0));
    assert_eq!(rt.metrics().old_policy_acks, 1);
    // The same ack again is not applied a second time.
    g.send(0, &[ack(&old_run, AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.metrics().unmatched_acks, 1);
    assert_eq!(rt.view().task(1).unwrap().state, TaskState::Running(0));

    // The new policy's first decision ends the blackout.
    assert_eq!(rt.metrics().swap_blackout.count(), 0);
    g.send(0, &[wake(2, 2)]);
    rt.step();
    let after = runs(&g.recv());
    assert_eq!(after.len(), 1);
    assert_eq!((after[0].pid, after[0].cpu), (2, 1));
    assert!(after[0].cookie > old_run.cookie);
    let m = rt.metrics();
    assert_eq!(m.swap_blackout.count(), 1);
    assert_eq!(m.swap_stall.count(), 1);
    assert_eq!(
        m.decision_gap.count(),
        0,
        "one decision before, one after the swap"
    );
    assert!(m.swap_blackout.max() >= m.swap_stall.min());
}

#[test]
fn twenty_swaps_keep_the_task_table_and_the_session() {
    let (mut g, mut rt) = setup(true);
    rt.start_session();
    let session = rt.session_id();
    g.send(
        0,
        &[task_new(1, 0b11), task_new(2, 0b11), task_new(3, 0b11)],
    );
    rt.step();
    let mut seq = 2;
    let names = ["a", "b"];
    for i in 0..20 {
        g.send(0, &[wake(1 + (i % 3) as u32, seq)]);
        rt.step();
        rt.swap_policy(Box::new(Lowest(names[i % 2])));
        // Ack whatever was sent so no CPU stays committed.
        rt.step();
        for r in runs(&g.recv()) {
            g.send(0, &[ack(&r, AckStatus::Ok)]);
            rt.step();
        }
        if i % 3 == 2 {
            seq += 1;
        }
    }
    assert_eq!(rt.metrics().policy_swaps, 20);
    assert_eq!(rt.session_id(), session, "no new session");
    assert_eq!(rt.view().tasks.len(), 3, "task table kept");
    assert_eq!(rt.policy_name(), "b");
    assert_eq!(rt.metrics().swap_stall.count(), 20);
}
