//! In-process policy swap at the runtime's safe point, driven step by step through real
//! queues: the stall of each swap, the blackout (old policy's last decision -> new
//! policy's first) and the normal decision gap are measured, the old policy's last RUN is
//! kept for late-replay tests, its late outcome is not passed on, and 20 swaps keep the
//! task table and the session.

use std::time::Duration;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::LoopbackMemory;
use virtio_milk::policy::{Dispatcher, Gtid, Policy, PolicyEvent, SchedView, TaskState};
use virtio_milk::protocol::{
    pack_name, AckInfo, AckStatus, DecisionInfo, EventInfo, Message, TaskEventKind, TaskNewInfo,
};
use virtio_milk::queue::{EngineConfig, QueueEngine};
use virtio_milk::runtime::{RawDecision, Runtime, RuntimeConfig};

mod common;
use common::Guest;

const CPUS: u16 = 2;

/// Runs the lowest runnable task on each free CPU it may use.
struct Lowest(&'static str);

impl Policy for Lowest {
    fn name(&self) -> &str {
        self.0
    }
    fn attach(&mut self, _: &SchedView) {}
    fn on_event(&mut self, _: &PolicyEvent, _: &SchedView) {}
    fn schedule(&mut self, d: &mut Dispatcher<'_>) {
        let view = d.view();
        let mut runnable: Vec<_> = view
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Runnable)
            .map(|t| t.gtid)
            .collect();
        runnable.sort_unstable();
        let free: Vec<u16> = view.free_cpus().collect();
        for cpu in free {
            if let Some(i) = runnable
                .iter()
                .position(|&g| d.view().task(g).is_some_and(|t| t.allows(cpu)))
            {
                let gtid = runnable.remove(i);
                d.run(gtid, cpu, 0).expect("a valid RUN");
            }
        }
    }
}

fn setup() -> (Guest, Runtime<GuestMemoryMmap>) {
    let lm = LoopbackMemory::new(CPUS, 8, 256).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut cfg = EngineConfig::new(u32::from(CPUS));
    cfg.max_batch = 4;
    cfg.max_queue_size = 8;
    let engine = QueueEngine::new(
        lm.mem.clone(),
        cfg,
        &lm.queues,
        kick.try_clone().unwrap(),
        Box::new(|_q: u16| Ok(())),
    )
    .unwrap();
    let dq = lm.driver_queues(true);
    let mut g = Guest { lm, dq, kick };
    g.post_decision_buffers();
    let rt = Runtime::new(
        engine,
        Box::new(Lowest("old")),
        RuntimeConfig {
            heartbeat: None,
            ack_timeout: Duration::from_secs(3600),
            ack_grace: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    (g, rt)
}

fn gt(pid: u32) -> Gtid {
    Gtid::new(pid, 1)
}

fn task_new(pid: u32, mask: u64) -> Message {
    Message::TaskNew(TaskNewInfo {
        cpu: 0,
        gtid: gt(pid),
        seq: 1,
        ts_ns: 0,
        comm: pack_name("t"),
        cpus_allowed: mask,
        tgid: pid,
        weight: 100,
        nice: 0,
    })
}

fn ev(kind: TaskEventKind, pid: u32, seq: u64) -> Message {
    Message::Task(
        kind,
        EventInfo {
            cpu: 0,
            gtid: gt(pid),
            seq,
            src_cpu: 0,
            ..Default::default()
        },
    )
}

fn ack(d: &DecisionInfo) -> Message {
    Message::Ack(AckInfo {
        cpu: d.cpu,
        gtid: d.gtid,
        status: AckStatus::Ok,
        seq: d.seq,
        ts_ns: 0,
        cookie: d.cookie,
        decision_type: virtio_milk::protocol::msg::RUN,
        target_cpu: d.cpu,
    })
}

fn runs(msgs: &[Message]) -> Vec<DecisionInfo> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Run(d) => Some(*d),
            _ => None,
        })
        .collect()
}

#[test]
fn stall_blackout_gap_and_the_old_policys_last_run() {
    let (mut g, mut rt) = setup();
    rt.start_session();
    g.send(
        0,
        &[
            task_new(1, 0b01),
            task_new(2, 0b10),
            ev(TaskEventKind::Wakeup, 1, 2),
        ],
    );
    rt.step();
    let before = runs(&g.recv(0));
    assert_eq!(before.len(), 1);
    let old_run = before[0];

    rt.swap_policy(Box::new(Lowest("new")));
    let m = rt.metrics();
    assert_eq!(m.policy_swaps, 1);
    assert_eq!(m.swap_stall.count(), 1);
    assert_eq!(
        m.last_run_before_swap,
        Some(RawDecision::run(gt(1), 0, 2)),
        "the old policy's RUN, kept for late-replay tests"
    );
    assert_eq!(
        m.swap_blackout.count(),
        0,
        "the new policy has not decided yet"
    );
    assert_eq!(m.decision_gap.count(), 0);

    // The old policy's RUN is acked after the swap: applied once, not shown to the new one.
    g.send(0, &[ack(&old_run)]);
    rt.step();
    assert_eq!(rt.view().task(gt(1)).unwrap().state, TaskState::Running(0));
    assert_eq!(rt.metrics().stale_policy_outcomes, 1);

    // The new policy's first decision ends the blackout.
    g.send(0, &[ev(TaskEventKind::Wakeup, 2, 2)]);
    rt.step();
    let after = runs(&g.recv(1));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].gtid, gt(2));
    assert!(after[0].cookie > old_run.cookie);
    assert_eq!(rt.metrics().swap_blackout.count(), 1);

    // Later decisions of the same policy count as gaps.
    g.send(0, &[ack(&after[0]), ev(TaskEventKind::Blocked, 2, 3)]);
    rt.step();
    g.send(0, &[ev(TaskEventKind::Wakeup, 2, 4)]);
    rt.step();
    assert_eq!(runs(&g.recv(1)).len(), 1);
    let m = rt.metrics();
    assert_eq!(m.decision_gap.count(), 1);
    assert_eq!(m.swap_blackout.count(), 1);
}

#[test]
fn twenty_swaps_keep_the_task_table_and_the_session() {
    let (mut g, mut rt) = setup();
    rt.start_session();
    let session = rt.session_id();
    g.send(
        0,
        &[task_new(1, 0b11), task_new(2, 0b11), task_new(3, 0b11)],
    );
    rt.step();
    let names = ["a", "b"];
    let mut seq = [1u64; 4];
    for i in 0..20 {
        let pid = 1 + (i % 3) as u32;
        seq[pid as usize] += 1;
        g.send(0, &[ev(TaskEventKind::Wakeup, pid, seq[pid as usize])]);
        rt.step();
        rt.swap_policy(Box::new(Lowest(names[i % 2])));
        rt.step();
        // Ack whatever was sent, then block the task again, so CPUs free up.
        for cpu in 0..CPUS {
            for r in runs(&g.recv(cpu)) {
                let p = r.gtid.pid() as usize;
                seq[p] += 1;
                g.send(
                    0,
                    &[ack(&r), ev(TaskEventKind::Blocked, r.gtid.pid(), seq[p])],
                );
                rt.step();
            }
        }
    }
    let m = rt.metrics();
    assert_eq!(m.policy_swaps, 20);
    assert_eq!(m.swap_stall.count(), 20);
    assert!(m.swap_blackout.count() > 0);
    assert_eq!(rt.session_id(), session, "no new session");
    assert_eq!(rt.view().tasks.len(), 3, "task table kept");
    assert_eq!(rt.policy_name(), "b");
}
