//! Runtime behaviour driven step by step through real queues: seq tracking, acks, session
//! handling, policy validation, policy swap and stop/restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::LoopbackMemory;
use virtio_milk::policy::{
    CpuState, Decision, DecisionKind, Dispatcher, Gtid, Outcome, Policy, PolicyEvent, SchedView,
    TaskState,
};
use virtio_milk::protocol::{
    pack_name, AckInfo, AckStatus, AffinityInfo, CpuEventKind, DecisionInfo, EventInfo, Message,
    PriorityInfo, SessionInfo, TaskEventKind, TaskNewInfo,
};
use virtio_milk::queue::{EngineConfig, QueueEngine};
use virtio_milk::runtime::{Runtime, RuntimeConfig};

mod common;
use common::Guest;

const CPUS: u16 = 2;

/// Dispatches runnable tasks (lowest pid first) to free CPUs; can be told to emit bogus
/// decisions. Records the events it saw.
struct TestPolicy {
    name: &'static str,
    seen: Arc<Mutex<Vec<PolicyEvent>>>,
    bogus: Vec<Decision>,
    attached_runnable: Arc<AtomicU64>,
}

impl TestPolicy {
    fn new(name: &'static str) -> (Self, Arc<Mutex<Vec<PolicyEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        (
            TestPolicy {
                name,
                seen: seen.clone(),
                bogus: Vec::new(),
                attached_runnable: Arc::new(AtomicU64::new(0)),
            },
            seen,
        )
    }
}

impl Policy for TestPolicy {
    fn name(&self) -> &str {
        self.name
    }
    fn attach(&mut self, view: &SchedView) {
        let n = view
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Runnable)
            .count();
        self.attached_runnable.store(n as u64, Ordering::Relaxed);
    }
    fn on_event(&mut self, ev: &PolicyEvent, _view: &SchedView) {
        self.seen.lock().unwrap().push(*ev);
    }
    fn schedule(&mut self, d: &mut Dispatcher<'_>) {
        for b in std::mem::take(&mut self.bogus) {
            let _ = d.submit(b);
        }
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
            let Some(i) = runnable
                .iter()
                .position(|&g| d.view().task(g).is_some_and(|t| t.allows(cpu)))
            else {
                continue;
            };
            let gtid = runnable.remove(i);
            d.run(gtid, cpu, 0).expect("runtime accepts a valid RUN");
        }
    }
}

fn setup(policy: Box<dyn Policy>) -> (Guest, Runtime<GuestMemoryMmap>) {
    setup_with(
        policy,
        RuntimeConfig {
            heartbeat: None,
            // Step-driven tests must not see commitments expire on a loaded machine.
            ack_timeout: Duration::from_secs(3600),
            ack_grace: Duration::from_secs(3600),
            ..Default::default()
        },
    )
}

fn setup_with(policy: Box<dyn Policy>, rcfg: RuntimeConfig) -> (Guest, Runtime<GuestMemoryMmap>) {
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
    let rt = Runtime::new(engine, policy, rcfg);
    (g, rt)
}

/// The gtid of test task `pid` (generation 1).
fn gt(pid: u32) -> Gtid {
    Gtid::new(pid, 1)
}

fn task_new_gtid(gtid: Gtid, seq: u64, mask: u64) -> Message {
    Message::TaskNew(TaskNewInfo {
        cpu: 0,
        gtid,
        seq,
        ts_ns: 0,
        comm: pack_name("t"),
        cpus_allowed: mask,
        tgid: gtid.pid(),
        weight: 100,
        nice: 0,
    })
}

fn task_new(pid: u32, seq: u64, mask: u64) -> Message {
    task_new_gtid(gt(pid), seq, mask)
}

fn ev_gtid(kind: TaskEventKind, cpu: u16, gtid: Gtid, seq: u64) -> Message {
    Message::Task(
        kind,
        EventInfo {
            cpu,
            gtid,
            seq,
            src_cpu: cpu,
            ..Default::default()
        },
    )
}

fn ev(kind: TaskEventKind, cpu: u16, pid: u32, seq: u64) -> Message {
    ev_gtid(kind, cpu, gt(pid), seq)
}

fn cpu_ev(kind: CpuEventKind, cpu: u16, gtid: Gtid) -> Message {
    Message::Cpu(
        kind,
        EventInfo {
            cpu,
            gtid,
            src_cpu: cpu,
            ..Default::default()
        },
    )
}

fn ack(d: &DecisionInfo, status: AckStatus) -> Message {
    Message::Ack(AckInfo {
        cpu: d.cpu,
        gtid: d.gtid,
        status,
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
fn seq_tracking_drops_stale_and_unknown_events() {
    let (p, _) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.send(
        0,
        &[
            task_new(10, 1, 0b01),
            ev(TaskEventKind::Wakeup, 0, 10, 3),
            ev(TaskEventKind::Blocked, 0, 10, 2), // older than 3: stale
            ev(TaskEventKind::Wakeup, 0, 99, 1),  // unknown pid
        ],
    );
    rt.step();
    assert_eq!(rt.metrics().stale_events, 1);
    assert_eq!(rt.metrics().unknown_task_events, 1);
    let t = rt.view().task(gt(10)).unwrap();
    assert_eq!(t.seq, 3);
    assert_eq!(t.state, TaskState::Dispatched(0));
    let got = g.recv(0);
    let r = runs(&got);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].gtid, r[0].cpu, r[0].seq),
        (gt(10), 0, 3),
        "RUN carries latest seq"
    );
    assert!(matches!(got[0], Message::Hello(_)));
}

#[test]
fn acks_drive_task_and_cpu_state() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.send(
        0,
        &[
            task_new(1, 1, 0b11),
            task_new(2, 1, 0b11),
            ev(TaskEventKind::Wakeup, 0, 1, 2),
            ev(TaskEventKind::Wakeup, 0, 2, 2),
        ],
    );
    rt.step();
    let mut all = g.recv(0);
    all.extend(g.recv(1));
    let r = runs(&all);
    assert_eq!(r.len(), 2);
    let d1 = r.iter().find(|d| d.gtid == gt(1)).unwrap();
    let d2 = r.iter().find(|d| d.gtid == gt(2)).unwrap();
    // An ack whose cookie is not the CPU's in-flight RUN changes nothing.
    let mut wrong = *d1;
    wrong.cookie += 100;
    g.send(0, &[ack(&wrong, AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.metrics().unmatched_acks, 1);
    assert_eq!(rt.view().cpu_state(d1.cpu), CpuState::Committed(gt(1)));
    // Task 1: OK -> Running. Task 2: STALE -> requeued and dispatched again.
    g.send(0, &[ack(d1, AckStatus::Ok), ack(d2, AckStatus::Stale)]);
    rt.step();
    assert_eq!(
        rt.view().task(gt(1)).unwrap().state,
        TaskState::Running(d1.cpu)
    );
    assert_eq!(rt.view().cpu_state(d1.cpu), CpuState::Running(gt(1)));
    let again = runs(&g.recv(d2.cpu));
    assert_eq!(again.len(), 1, "stale RUN is retried");
    assert_eq!(again[0].gtid, gt(2));
    // NO_TASK removes the task; BLOCKED frees task 1's CPU.
    g.send(
        0,
        &[
            ack(&again[0], AckStatus::NoTask),
            ev(TaskEventKind::Blocked, d1.cpu, 1, 3),
        ],
    );
    rt.step();
    assert!(rt.view().task(gt(2)).is_none());
    assert_eq!(rt.view().task(gt(1)).unwrap().state, TaskState::Blocked);
    assert_eq!(rt.view().cpu_state(d1.cpu), CpuState::Idle);
    let m = rt.metrics();
    assert_eq!(
        m.acks[AckStatus::Ok as usize],
        2,
        "the unmatched ack is counted too"
    );
    assert_eq!(m.acks[AckStatus::Stale as usize], 1);
    assert_eq!(m.acks[AckStatus::NoTask as usize], 1);
    assert_eq!(m.decisions_run, 3);
    assert_eq!(m.latency.count(), 3);
    let seen = seen.lock().unwrap();
    assert!(seen.contains(&PolicyEvent::TaskDead(gt(2))));
    assert!(seen.contains(&PolicyEvent::TaskBlocked {
        gtid: gt(1),
        runtime_ns: 0
    }));
}

#[test]
fn runtime_refuses_bad_policy_decisions() {
    let (mut p, _) = TestPolicy::new("t");
    p.bogus = vec![
        Decision::Run {
            gtid: gt(77),
            cpu: 0,
            slice_ns: 0,
            preempt: false,
        }, // unknown task
        Decision::Run {
            gtid: gt(5),
            cpu: 1,
            slice_ns: 0,
            preempt: false,
        }, // not allowed on CPU 1
        Decision::Run {
            gtid: gt(5),
            cpu: 9,
            slice_ns: 0,
            preempt: false,
        }, // no such CPU
    ];
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.send(
        0,
        &[task_new(5, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 5, 2)],
    );
    rt.step();
    assert_eq!(rt.metrics().policy_rejects, 3);
    assert_eq!(runs(&g.recv(1)).len(), 0);
    assert_eq!(
        runs(&g.recv(0)).len(),
        1,
        "the valid decision still goes out"
    );
}

fn guest_hello(g: &mut Guest, session_id: u64) {
    g.send(
        0,
        &[Message::Hello(SessionInfo {
            session_id,
            ..Default::default()
        })],
    );
}

/// Session records the host sent on CPU 0's decision queue, as (type name, session id).
fn session_records(g: &mut Guest) -> Vec<(&'static str, u64)> {
    g.recv(0)
        .into_iter()
        .filter_map(|m| match m {
            Message::Hello(s) => Some(("HELLO", s.session_id)),
            Message::Goodbye(s) => Some(("GOODBYE", s.session_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn guest_session_messages() {
    let (p, _) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    let s1 = rt.session_id();
    assert_eq!(session_records(&mut g), vec![("HELLO", s1)]);
    // A freshly probed driver (session 0) before it took our HELLO: repeat the HELLO, keep
    // the session and the tasks it already announced.
    g.send(0, &[task_new(3, 1, 1)]);
    guest_hello(&mut g, 0);
    rt.step();
    assert_eq!(rt.session_id(), s1);
    assert!(rt.view().task(gt(3)).is_some());
    assert_eq!(session_records(&mut g), vec![("HELLO", s1)]);
    assert!(!rt.session_established());
    // The guest echoes our session: established.
    guest_hello(&mut g, s1);
    rt.step();
    assert!(rt.session_established());
    assert_eq!(session_records(&mut g), vec![]);
    // Now a HELLO 0 means the driver restarted: GOODBYE, then a new session.
    guest_hello(&mut g, 0);
    rt.step();
    let s2 = rt.session_id();
    assert_ne!(s1, s2);
    assert!(
        rt.view().task(gt(3)).is_none(),
        "a new session forgets the tasks"
    );
    assert_eq!(
        session_records(&mut g),
        vec![("GOODBYE", s1), ("HELLO", s2)]
    );
    guest_hello(&mut g, s2);
    rt.step();
    assert!(rt.session_established());
    // A guest still in an older session: resynchronise the same way.
    guest_hello(&mut g, s1);
    rt.step();
    let s3 = rt.session_id();
    assert!(s3 > s2);
    assert_eq!(
        session_records(&mut g),
        vec![("GOODBYE", s2), ("HELLO", s3)]
    );
    // The guest's heartbeat reports its local fallbacks.
    g.send(
        1,
        &[Message::Heartbeat(SessionInfo {
            session_id: s3,
            counter: 42,
            cpu: 1,
            ..Default::default()
        })],
    );
    rt.step();
    assert_eq!(rt.metrics().guest_fallbacks, 42);
    // GOODBYE from the guest: tasks are forgotten, a new HELLO (no GOODBYE) is offered.
    g.send(0, &[task_new(4, 1, 1)]);
    rt.step();
    assert!(rt.view().task(gt(4)).is_some());
    g.send(0, &[Message::Goodbye(SessionInfo::default())]);
    rt.step();
    assert!(rt.view().task(gt(4)).is_none());
    let s4 = rt.session_id();
    assert!(s4 > s3);
    assert_eq!(session_records(&mut g), vec![("HELLO", s4)]);
}

#[test]
fn swap_rebuilds_new_policy_from_the_task_table() {
    let (p, _) = TestPolicy::new("first");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    // Three runnable tasks on a single allowed CPU: one dispatched, two waiting.
    g.send(
        0,
        &[
            task_new(1, 1, 1),
            task_new(2, 1, 1),
            task_new(3, 1, 1),
            ev(TaskEventKind::Wakeup, 0, 1, 2),
        ],
    );
    g.send(
        0,
        &[
            ev(TaskEventKind::Wakeup, 0, 2, 2),
            ev(TaskEventKind::Wakeup, 0, 3, 2),
        ],
    );
    rt.step();
    let (p2, _) = TestPolicy::new("second");
    let counter = p2.attached_runnable.clone();
    rt.swap_policy(Box::new(p2));
    assert_eq!(rt.policy_name(), "second");
    assert_eq!(
        counter.load(Ordering::Relaxed),
        2,
        "new policy saw the runnable tasks"
    );
    assert_eq!(rt.metrics().policy_swaps, 1);
    // Same session; the swap is announced with a HELLO carrying the new name.
    let got = g.recv(0);
    let last_hello = got
        .iter()
        .rev()
        .find_map(|m| match m {
            Message::Hello(s) => Some(s.clone()),
            _ => None,
        })
        .unwrap();
    assert_eq!(last_hello.session_id, rt.session_id());
    assert_eq!(
        virtio_milk::protocol::unpack_name(&last_hello.name),
        "second"
    );
}

#[test]
fn threaded_runtime_stops_with_goodbye_and_restarts() {
    let (p, _) = TestPolicy::new("t");
    let (mut g, rt) = setup(Box::new(p));
    let h = rt.spawn().unwrap();
    // Wait for HELLO.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.iter().any(|m| matches!(m, Message::Hello(_))) {
        assert!(
            Instant::now() < deadline,
            "no HELLO from the runtime thread"
        );
        got.extend(g.recv(0));
        std::thread::sleep(Duration::from_millis(1));
    }
    g.send(0, &[task_new(1, 1, 1), ev(TaskEventKind::Wakeup, 0, 1, 2)]);
    let mut r = Vec::new();
    while r.is_empty() {
        assert!(Instant::now() < deadline, "no RUN from the runtime thread");
        r = runs(&g.recv(0));
        std::thread::sleep(Duration::from_millis(1));
    }
    let rt = h.stop().unwrap();
    let first_session = rt.session_id();
    let bye = g.recv(0);
    assert!(bye.iter().any(|m| matches!(m, Message::Goodbye(_))));
    let s = rt.summary();
    assert_eq!(s.metrics.decisions_run, 1);
    assert!(s.to_string().contains("RUN 1"));
    // Restart on the same engine: a new session begins with HELLO.
    let (p2, _) = TestPolicy::new("t2");
    let engine = rt.into_engine();
    let rt2 = Runtime::new(engine, Box::new(p2), RuntimeConfig::default());
    let h2 = rt2.spawn().unwrap();
    let mut hello = None;
    while hello.is_none() {
        assert!(Instant::now() < deadline, "no HELLO after restart");
        hello = g.recv(0).into_iter().find_map(|m| match m {
            Message::Hello(s) => Some(s),
            _ => None,
        });
        std::thread::sleep(Duration::from_millis(1));
    }
    let hello = hello.unwrap();
    assert_eq!(virtio_milk::protocol::unpack_name(&hello.name), "t2");
    assert_ne!(
        hello.session_id, first_session,
        "a restart is a new session"
    );
    h2.stop().unwrap();
}

#[test]
fn preempt_yield_affinity_priority_and_cpu_events() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    // CPU 1 is busy with something the host does not schedule.
    g.send(1, &[cpu_ev(CpuEventKind::Busy, 1, Gtid(0))]);
    g.send(
        0,
        &[task_new(1, 1, 0b11), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    assert_eq!(rt.view().cpu_state(1), CpuState::Running(Gtid(0)));
    let r = runs(&g.recv(0));
    assert_eq!((r.len(), r[0].cpu), (1, 0), "only CPU 0 is free");
    // CPU_IDLE on a committed CPU does not free it; the ack decides.
    g.send(0, &[cpu_ev(CpuEventKind::Idle, 0, Gtid(0))]);
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Committed(gt(1)));
    g.send(0, &[ack(&r[0], AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(1)));
    // Preempted: runnable again, CPU 0 freed, dispatched again.
    g.send(0, &[ev(TaskEventKind::Preempt, 0, 1, 3)]);
    rt.step();
    let r = runs(&g.recv(0));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].seq, 3);
    g.send(0, &[ack(&r[0], AckStatus::Ok)]);
    rt.step();
    // Yield: same story.
    g.send(0, &[ev(TaskEventKind::Yield, 0, 1, 4)]);
    rt.step();
    let r = runs(&g.recv(0));
    assert_eq!((r.len(), r[0].seq), (1, 4));
    g.send(0, &[ack(&r[0], AckStatus::Ok)]);
    rt.step();
    // Affinity to CPU 1 only, priority change, block, CPU 1 idles, wake: RUN on CPU 1.
    g.send(
        0,
        &[
            Message::TaskAffinity(AffinityInfo {
                cpu: 0,
                gtid: gt(1),
                seq: 5,
                ts_ns: 0,
                cpus_allowed: 0b10,
            }),
            Message::TaskPriority(PriorityInfo {
                cpu: 0,
                gtid: gt(1),
                seq: 6,
                ts_ns: 0,
                weight: 250,
                nice: -3,
            }),
            ev(TaskEventKind::Blocked, 0, 1, 7),
        ],
    );
    g.send(1, &[cpu_ev(CpuEventKind::Idle, 1, Gtid(0))]);
    rt.step();
    let t = rt.view().task(gt(1)).unwrap();
    assert_eq!((t.cpus_allowed, t.weight, t.nice), (0b10, 250, -3));
    assert_eq!(
        rt.view().cpu_state(0),
        CpuState::Idle,
        "blocking freed CPU 0"
    );
    g.send(0, &[ev(TaskEventKind::Wakeup, 0, 1, 8)]);
    rt.step();
    assert!(runs(&g.recv(0)).is_empty(), "CPU 0 is no longer allowed");
    let r = runs(&g.recv(1));
    assert_eq!((r.len(), r[0].cpu, r[0].seq), (1, 1, 8));
    // Dead while dispatched: the ack comes back STALE; task gone, CPU 1 freed.
    g.send(
        1,
        &[
            ev(TaskEventKind::Dead, 1, 1, 9),
            ack(&r[0], AckStatus::Stale),
        ],
    );
    rt.step();
    assert!(rt.view().task(gt(1)).is_none());
    assert_eq!(rt.view().cpu_state(1), CpuState::Idle);
    assert_eq!(rt.metrics().stale_events, 0);
    let seen = seen.lock().unwrap();
    for want in [
        PolicyEvent::TaskAffinity(gt(1)),
        PolicyEvent::TaskPriority(gt(1)),
        PolicyEvent::CpuBusy(1),
        PolicyEvent::TaskDead(gt(1)),
    ] {
        assert!(seen.contains(&want), "policy never saw {want:?}");
    }
}

#[test]
fn device_pause_and_resume_mid_workload() {
    use virtio_milk::device::MilkDevice;
    use virtio_milk::protocol::VIRTIO_F_VERSION_1;
    let lm = LoopbackMemory::new(CPUS, 8, 256).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut dev: MilkDevice<GuestMemoryMmap> = MilkDevice::new(
        u32::from(CPUS),
        Box::new(|| Box::new(TestPolicy::new("t").0)),
        RuntimeConfig::default(),
    )
    .unwrap();
    let dq = lm.driver_queues(true);
    let queues = lm.queues.clone();
    let mem = lm.mem.clone();
    let mut g = Guest {
        lm,
        dq,
        kick: kick.try_clone().unwrap(),
    };
    g.post_decision_buffers();
    dev.activate(virtio_milk::device::Activation {
        memory: mem,
        features: dev.device_features(),
        queues,
        kicks: vec![kick],
        interrupt: Box::new(|_q: u16| Ok(())),
        ring_state: None,
    })
    .unwrap();
    assert_ne!(dev.acked_features() & (1 << VIRTIO_F_VERSION_1), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let wait_for = |g: &mut Guest, what: &str, f: &dyn Fn(&Message) -> bool| loop {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        if let Some(m) = g.recv(0).into_iter().find(|m| f(m)) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let hello = |m: &Message| matches!(m, Message::Hello(_));
    let Message::Hello(s1) = wait_for(&mut g, "HELLO", &hello) else {
        unreachable!()
    };
    g.send(0, &[task_new(1, 1, 1), ev(TaskEventKind::Wakeup, 0, 1, 2)]);
    wait_for(&mut g, "RUN", &|m| matches!(m, Message::Run(_)));
    // Pause: the guest is told GOODBYE; the summary counts what happened so far.
    let s = dev.pause().unwrap().unwrap();
    assert_eq!(s.metrics.decisions_run, 1);
    assert!(g.recv(0).iter().any(|m| matches!(m, Message::Goodbye(_))));
    // Events sent while paused wait in the ring: a BLOCKED of task 1, and a task 9 that
    // appears and wakes up (and, say, exits before the host is back).
    g.send(
        0,
        &[
            ev(TaskEventKind::Blocked, 0, 1, 3),
            task_new(9, 1, 1),
            ev(TaskEventKind::Wakeup, 0, 9, 2),
        ],
    );
    // Resume: a new session; the guest re-announces its task and gets it scheduled again.
    dev.resume().unwrap();
    let Message::Hello(s2) = wait_for(&mut g, "HELLO after resume", &hello) else {
        unreachable!()
    };
    assert_ne!(s1.session_id, s2.session_id);
    g.send(0, &[task_new(1, 4, 1), ev(TaskEventKind::Wakeup, 0, 1, 5)]);
    let Message::Run(d) = wait_for(&mut g, "RUN after resume", &|m| {
        matches!(m, Message::Run(_))
    }) else {
        unreachable!()
    };
    assert_eq!((d.gtid, d.seq), (gt(1), 5));
    let s = dev.reset().unwrap().unwrap();
    assert_eq!(s.metrics.decisions_run, 1, "no RUN for task 9: {s}");
    assert_eq!(
        s.metrics.discarded_on_start, 3,
        "records queued while paused are dropped before the HELLO"
    );
    assert_eq!(s.metrics.unknown_task_events, 0);
}

#[test]
fn injected_decisions_bypass_validation_and_their_acks_are_counted_apart() {
    use virtio_milk::runtime::{RawDecision, INJECTED_COOKIE};
    let (p, seen) = TestPolicy::new("t");
    let (mut g, rt) = setup(Box::new(p));
    let h = rt.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while !got.iter().any(|m| matches!(m, Message::Hello(_))) {
        assert!(Instant::now() < deadline, "no HELLO");
        got.extend(g.recv(0));
        std::thread::sleep(Duration::from_millis(1));
    }
    // A real task pinned to CPU 0 gets a real RUN first.
    g.send(
        0,
        &[task_new(5, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 5, 2)],
    );
    let mut real = Vec::new();
    while real.is_empty() {
        assert!(Instant::now() < deadline, "no RUN");
        real = runs(&g.recv(0));
        std::thread::sleep(Duration::from_millis(1));
    }
    // Nothing the runtime would send: an unknown pid, a stale seq, a CPU outside the
    // task's mask (CPU 1 while pid 5 may only use CPU 0).
    h.inject_decisions(&[
        RawDecision::run(gt(4242), 0, 1),
        RawDecision::run_pid(5, 0, 1),
        RawDecision::run(gt(5), 1, 2),
    ]);
    let mut inj = Vec::new();
    while inj.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "injected decisions not written: {inj:?}"
        );
        inj.extend(runs(&g.recv(0)));
        inj.extend(runs(&g.recv(1)));
        std::thread::sleep(Duration::from_millis(1));
    }
    inj.sort_by_key(|d| d.cookie);
    assert!(inj.iter().all(|d| d.cookie & INJECTED_COOKIE != 0));
    let fields: Vec<_> = inj.iter().map(|d| (d.gtid, d.cpu, d.seq)).collect();
    // run_pid resolved pid 5 to the task's gtid.
    assert_eq!(fields, [(gt(4242), 0, 1), (gt(5), 0, 1), (gt(5), 1, 2)]);
    // The guest rejects them; it applies the real one.
    g.send(
        0,
        &[
            ack(&inj[0], AckStatus::NoTask),
            ack(&inj[1], AckStatus::Stale),
            ack(&inj[2], AckStatus::BadCpu),
            ack(&real[0], AckStatus::Ok),
        ],
    );
    let s = loop {
        assert!(Instant::now() < deadline, "acks not counted");
        if let Some(s) = h.snapshot() {
            if s.metrics.acks_total() == 4 {
                break s;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let m = &s.metrics;
    assert_eq!(m.injected, 3);
    assert_eq!(m.injected_acks, [0, 1, 1, 1, 0, 0]);
    assert_eq!(m.acks, [1, 1, 1, 1, 0, 0]);
    assert_eq!(m.unmatched_acks, 0, "injected acks are not policy acks");
    assert_eq!(m.apply_latency.count(), 1, "the real RUN's ack is timed");
    assert!(s.to_string().contains("injected decisions: 3"), "{s}");
    // The policy saw only its own decision's outcome.
    let acks: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, PolicyEvent::Outcome { .. }))
        .copied()
        .collect();
    assert_eq!(
        acks,
        [PolicyEvent::Outcome {
            id: virtio_milk::policy::DecisionId(real[0].cookie),
            kind: DecisionKind::Run,
            gtid: gt(5),
            cpu: 0,
            outcome: Outcome::Acked(AckStatus::Ok),
        }]
    );
    // A silent stop sends no GOODBYE.
    let rt = h.stop_silently().unwrap();
    let after = g.recv(0);
    assert!(
        !after.iter().any(|m| matches!(m, Message::Goodbye(_))),
        "{after:?}"
    );
    assert_eq!(rt.summary().metrics.injected, 3);
}

#[test]
fn v1_guest_is_refused_with_goodbye_version_until_a_v2_hello() {
    use virtio_milk::protocol::BYE_VERSION;
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    let s1 = rt.session_id();
    assert_eq!(session_records(&mut g), vec![("HELLO", s1)]);
    // A v1 guest: same header layout, version byte 1 (its HELLO and a task event).
    let mut hello = Message::Hello(SessionInfo::default()).encode();
    hello[4] = 1;
    let mut wake = ev(TaskEventKind::Wakeup, 0, 1, 2).encode();
    wake[4] = 1;
    g.send_raw(0, &[hello, wake]);
    rt.step();
    assert_eq!(rt.refused_version(), Some(1));
    assert_eq!(rt.metrics().version_refusals, 1);
    assert!(!rt.session_established());
    let got = g.recv(0);
    let byes: Vec<_> = got
        .iter()
        .filter_map(|m| match m {
            Message::Goodbye(s) => Some(s.counter),
            _ => None,
        })
        .collect();
    assert_eq!(byes, vec![BYE_VERSION], "one GOODBYE(BYE_VERSION)");
    // More v1 records: no second refusal, nothing reaches the policy or the guest.
    g.send_raw(0, &[hello]);
    g.send(0, &[task_new(1, 1, 1), ev(TaskEventKind::Wakeup, 0, 1, 2)]);
    rt.step();
    assert_eq!(rt.metrics().version_refusals, 1);
    assert!(g.recv(0).is_empty() && g.recv(1).is_empty());
    assert!(
        seen.lock().unwrap().is_empty(),
        "policy saw a refused guest"
    );
    // The guest's driver is replaced by a v2 one: its HELLO starts a new session.
    guest_hello(&mut g, 0);
    rt.step();
    assert_eq!(rt.refused_version(), None);
    let s2 = rt.session_id();
    assert!(s2 > s1);
    assert_eq!(session_records(&mut g), vec![("HELLO", s2)]);
}

#[test]
fn reused_pid_with_a_new_generation_is_another_task() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    let old = Gtid::new(77, 1);
    let new = Gtid::new(77, 2);
    // The old task ran for a while (seq 9); the pid is reused by a new task (seq 1).
    g.send(
        0,
        &[
            task_new_gtid(old, 1, 1),
            ev_gtid(TaskEventKind::Blocked, 0, old, 9),
            task_new_gtid(new, 1, 1),
        ],
    );
    rt.step();
    assert!(rt.view().task(new).is_some(), "TASK_NEW seq 1 is not stale");
    assert!(
        rt.view().task(old).is_none(),
        "the old generation is evicted"
    );
    assert_eq!(rt.metrics().pid_reuse, 1);
    assert_eq!(rt.metrics().stale_events, 0);
    // The old task's late TASK_DEAD does not delete the new one.
    g.send(0, &[ev_gtid(TaskEventKind::Dead, 0, old, 10)]);
    rt.step();
    assert!(rt.view().task(new).is_some());
    assert_eq!(rt.metrics().unknown_task_events, 1);
    // DEPARTED removes a task without a death.
    g.send(0, &[ev_gtid(TaskEventKind::Departed, 0, new, 2)]);
    rt.step();
    assert!(rt.view().task(new).is_none());
    assert_eq!(rt.metrics().departed, 1);
    let seen = seen.lock().unwrap();
    assert!(seen.contains(&PolicyEvent::TaskDead(old)));
    assert!(seen.contains(&PolicyEvent::TaskDeparted(new)));
    assert!(!seen.contains(&PolicyEvent::TaskDead(new)));
}

/// Fuzz finding (runtime): a late TASK_NEW of an older generation of a pid that a newer
/// task holds was taken as a pid reuse: it deleted the live task and revived the old gtid,
/// which could then have two current RUNs out (one from before its removal).
#[test]
fn an_older_generations_late_task_new_is_stale() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    let old = Gtid::new(4, 1);
    let new = Gtid::new(4, 2);
    g.send(0, &[task_new_gtid(old, 1, 1), task_new_gtid(new, 1, 1)]);
    rt.step();
    assert!(rt.view().task(old).is_none() && rt.view().task(new).is_some());
    assert_eq!(rt.metrics().pid_reuse, 1);
    // The old generation's TASK_NEW again, late: stale, the live task stays.
    g.send(0, &[task_new_gtid(old, 2, 1)]);
    rt.step();
    assert!(rt.view().task(new).is_some(), "the live task was deleted");
    assert!(rt.view().task(old).is_none(), "the old gtid was revived");
    assert_eq!(rt.metrics().pid_reuse, 1);
    assert_eq!(rt.metrics().stale_events, 1);
    assert!(!seen.lock().unwrap().contains(&PolicyEvent::TaskDead(new)));
}

/// Fuzz finding (runtime): a RUN given up after `ack_timeout` left its task `Dispatched`
/// for good when an event that does not change the task's state (here TASK_PRIORITY) had
/// bumped its seq meanwhile: no RUN outstanding, and the policy never saw it runnable again.
#[test]
fn a_lost_run_requeues_its_task_after_a_priority_change() {
    let (p, _seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup_with(
        Box::new(p),
        RuntimeConfig {
            heartbeat: None,
            ack_timeout: Duration::from_millis(50),
            ack_grace: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    rt.start_session();
    g.send(
        0,
        &[task_new(1, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    assert_eq!(runs(&g.recv(0)).len(), 1);
    g.send(
        0,
        &[Message::TaskPriority(PriorityInfo {
            cpu: 0,
            gtid: gt(1),
            seq: 3,
            ts_ns: 0,
            weight: 200,
            nice: -3,
        })],
    );
    rt.step();
    assert_eq!(
        rt.view().task(gt(1)).unwrap().state,
        TaskState::Dispatched(0)
    );
    std::thread::sleep(Duration::from_millis(60));
    rt.step();
    assert_eq!(rt.metrics().commit_timeouts, 1);
    let again = runs(&g.recv(0));
    assert_eq!(again.len(), 1, "task dispatched again after the timeout");
    assert_eq!(again[0].seq, 3, "stamped with the newest seq");
}

#[test]
fn a_lost_ack_does_not_commit_a_cpu_forever() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup_with(
        Box::new(p),
        RuntimeConfig {
            heartbeat: None,
            ack_timeout: Duration::from_millis(50),
            ack_grace: Duration::from_secs(3600),
            ..Default::default()
        },
    );
    rt.start_session();
    g.send(
        0,
        &[task_new(1, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    let r = runs(&g.recv(0));
    assert_eq!(r.len(), 1);
    assert_eq!(rt.view().cpu_state(0), CpuState::Committed(gt(1)));
    // The ack never comes. After ack_timeout the CPU is free and the task runnable again,
    // so the policy sends it again (same seq: nothing newer happened).
    std::thread::sleep(Duration::from_millis(60));
    rt.step();
    assert_eq!(rt.metrics().commit_timeouts, 1);
    let again = runs(&g.recv(0));
    assert_eq!(again.len(), 1, "task dispatched again after the timeout");
    assert_eq!(again[0].seq, 2);
    assert_ne!(again[0].cookie, r[0].cookie);
    assert!(seen.lock().unwrap().iter().any(|e| matches!(
        e,
        PolicyEvent::Outcome {
            outcome: Outcome::Lost,
            ..
        }
    )));
    // The first RUN's late OK ack is counted, not matched.
    g.send(0, &[ack(&r[0], AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.metrics().unmatched_acks, 1);
    assert_eq!(rt.metrics().late_ok_acks, 1);
    assert_eq!(
        rt.outstanding(),
        1,
        "the second RUN still waits for its ack"
    );
}

#[test]
fn cpu_events_resolve_old_commitments() {
    let (p, _) = TestPolicy::new("t");
    let (mut g, mut rt) = setup_with(
        Box::new(p),
        RuntimeConfig {
            heartbeat: None,
            ack_timeout: Duration::from_secs(3600),
            ack_grace: Duration::from_millis(20),
            ..Default::default()
        },
    );
    rt.start_session();
    g.send(
        0,
        &[task_new(1, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    let r = runs(&g.recv(0));
    assert_eq!(r.len(), 1);
    // A CPU_IDLE right away does not resolve the fresh commitment...
    g.send(0, &[cpu_ev(CpuEventKind::Idle, 0, Gtid(0))]);
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Committed(gt(1)));
    // ...one after ack_grace does: the guest went idle without running it.
    std::thread::sleep(Duration::from_millis(30));
    g.send(0, &[cpu_ev(CpuEventKind::Idle, 0, Gtid(0))]);
    rt.step();
    assert_eq!(rt.metrics().commits_resolved_by_cpu_event, 1);
    assert_eq!(rt.outstanding(), 1, "the task was sent again");
    assert_eq!(runs(&g.recv(0)).len(), 1);
}

#[test]
fn fallback_running_and_dropped_acks_track_the_guest() {
    let (p, seen) = TestPolicy::new("t");
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.send(
        0,
        &[task_new(1, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    let r = runs(&g.recv(0));
    // The kernel dropped the dispatch: not running, not runnable until its next event.
    g.send(0, &[ack(&r[0], AckStatus::Dropped)]);
    rt.step();
    assert_eq!(rt.view().task(gt(1)).unwrap().state, TaskState::Blocked);
    assert_eq!(rt.view().cpu_state(0), CpuState::Idle);
    assert!(runs(&g.recv(0)).is_empty());
    // Its new event brings a new RUN, but the guest ran it itself first (fallback, seq
    // bumped).
    g.send(0, &[ev(TaskEventKind::Wakeup, 0, 1, 3)]);
    rt.step();
    g.send(0, &[ev(TaskEventKind::Fallback, 0, 1, 4)]);
    rt.step();
    let t = rt.view().task(gt(1)).unwrap();
    assert_eq!((t.state, t.seq), (TaskState::Running(0), 4));
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(1)));
    assert_eq!(rt.metrics().fallbacks_reported, 1);
    // The RUN the wakeup caused comes back STALE: the task keeps running.
    let r2 = runs(&g.recv(0));
    assert_eq!(r2.len(), 1);
    g.send(0, &[ack(&r2[0], AckStatus::Stale)]);
    rt.step();
    assert_eq!(rt.view().task(gt(1)).unwrap().state, TaskState::Running(0));
    assert!(seen.lock().unwrap().contains(&PolicyEvent::TaskRunning {
        gtid: gt(1),
        cpu: 0,
        fallback: true
    }));
}

/// Sends what it is told to, once, through the dispatcher; records what came back.
struct Scripted {
    script: Arc<Mutex<Vec<Decision>>>,
    results: Arc<Mutex<Vec<Result<virtio_milk::policy::DecisionId, virtio_milk::policy::Reject>>>>,
    seen: Arc<Mutex<Vec<PolicyEvent>>>,
}

impl Policy for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn attach(&mut self, _: &SchedView) {}
    fn on_event(&mut self, ev: &PolicyEvent, _: &SchedView) {
        self.seen.lock().unwrap().push(*ev);
    }
    fn schedule(&mut self, d: &mut Dispatcher<'_>) {
        for dec in std::mem::take(&mut *self.script.lock().unwrap()) {
            let r = d.submit(dec);
            self.results.lock().unwrap().push(r);
        }
    }
}

#[allow(clippy::type_complexity)]
fn scripted() -> (
    Scripted,
    Arc<Mutex<Vec<Decision>>>,
    Arc<Mutex<Vec<Result<virtio_milk::policy::DecisionId, virtio_milk::policy::Reject>>>>,
) {
    let script = Arc::new(Mutex::new(Vec::new()));
    let results = Arc::new(Mutex::new(Vec::new()));
    (
        Scripted {
            script: script.clone(),
            results: results.clone(),
            seen: Arc::new(Mutex::new(Vec::new())),
        },
        script,
        results,
    )
}

#[test]
fn staged_and_preempting_runs() {
    use virtio_milk::policy::Reject;
    use virtio_milk::protocol::RUN_F_PREEMPT;
    let (p, script, results) = scripted();
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.recv(0);
    // Task 1 runs on CPU 0; tasks 2, 3, 4 are runnable.
    g.send(
        0,
        &[
            task_new(1, 1, 0b01),
            task_new(2, 1, 0b01),
            task_new(3, 1, 0b01),
            task_new(4, 1, 0b01),
        ],
    );
    g.send(
        0,
        &[
            ev(TaskEventKind::Running, 0, 1, 2),
            ev(TaskEventKind::Wakeup, 0, 2, 2),
            ev(TaskEventKind::Wakeup, 0, 3, 2),
            ev(TaskEventKind::Wakeup, 0, 4, 2),
        ],
    );
    let run = |gtid, preempt| Decision::Run {
        gtid,
        cpu: 0,
        slice_ns: 1_000_000,
        preempt,
    };
    // Two RUNs staged behind the running task (max_staged 2), a third is refused.
    *script.lock().unwrap() = vec![run(gt(2), false), run(gt(3), false), run(gt(4), false)];
    rt.step();
    {
        let r = results.lock().unwrap();
        assert!(r[0].is_ok() && r[1].is_ok(), "{r:?}");
        assert_eq!(r[2], Err(Reject::CpuBusy));
    }
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(1)));
    assert_eq!(rt.view().pending_runs(0), 2);
    assert_eq!(rt.metrics().decisions_staged, 2);
    let staged = runs(&g.recv(0));
    assert_eq!(staged.len(), 2);
    assert!(staged
        .iter()
        .all(|d| d.flags == 0 && d.slice_ns == 1_000_000));
    // Task 1 blocks; the guest dispatches the first staged RUN with no round trip.
    g.send(
        0,
        &[
            ev(TaskEventKind::Blocked, 0, 1, 3),
            ack(&staged[0], AckStatus::Ok),
        ],
    );
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(2)));
    assert_eq!(rt.view().pending_runs(0), 1);
    // Task 2 blocks too and task 3 (the second staged RUN) starts. A preempting RUN of
    // task 4 carries F_PREEMPT; task 3 comes back preempted.
    *script.lock().unwrap() = vec![run(gt(4), true)];
    g.send(
        0,
        &[
            ev(TaskEventKind::Blocked, 0, 2, 3),
            ack(&staged[1], AckStatus::Ok),
        ],
    );
    rt.step();
    let pre = runs(&g.recv(0));
    assert_eq!(pre.len(), 1);
    assert_eq!((pre[0].gtid, pre[0].flags), (gt(4), RUN_F_PREEMPT));
    assert_eq!(rt.metrics().decisions_run_preempt, 1);
    g.send(
        0,
        &[
            ev(TaskEventKind::Preempt, 0, 3, 3),
            ack(&pre[0], AckStatus::Ok),
        ],
    );
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(4)));
    assert_eq!(rt.view().task(gt(3)).unwrap().state, TaskState::Runnable);
    assert_eq!(rt.outstanding(), 0);
}

#[test]
fn late_decisions_of_a_swapped_out_policy_are_stale() {
    use virtio_milk::policy::Reject;
    let (p, _, _) = scripted();
    let (mut g, mut rt) = setup(Box::new(p));
    rt.start_session();
    g.send(
        0,
        &[task_new(1, 1, 0b01), ev(TaskEventKind::Wakeup, 0, 1, 2)],
    );
    rt.step();
    let old_epoch = rt.policy_epoch();
    let run = Decision::Run {
        gtid: gt(1),
        cpu: 0,
        slice_ns: 0,
        preempt: false,
    };
    // Before the swap an external decision of the current policy goes through.
    let id = rt.submit_external(old_epoch, run).expect("current epoch");
    let sent = runs(&g.recv(0));
    assert_eq!(sent[0].cookie, id.0);
    let (p2, _) = TestPolicy::new("second");
    let seen2 = p2.seen.clone();
    rt.swap_policy(Box::new(p2));
    assert_ne!(rt.policy_epoch(), old_epoch);
    // A late decision of the old policy is refused; the ack of its earlier decision
    // updates the tables but is not shown to the new policy as its own outcome.
    assert_eq!(rt.submit_external(old_epoch, run), Err(Reject::StalePolicy));
    assert_eq!(rt.metrics().stale_policy_decisions, 1);
    g.send(0, &[ack(&sent[0], AckStatus::Ok)]);
    rt.step();
    assert_eq!(rt.view().cpu_state(0), CpuState::Running(gt(1)));
    assert_eq!(rt.metrics().stale_policy_outcomes, 1);
    assert!(!seen2
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PolicyEvent::Outcome { .. })));
}

#[test]
fn hello_carries_subscriptions_and_ticks_reach_the_policy() {
    use virtio_milk::policy::Subscriptions;
    use virtio_milk::protocol::{HELLO_F_RUNNING, HELLO_F_TICK};
    struct Ticker(Arc<Mutex<Vec<PolicyEvent>>>);
    impl Policy for Ticker {
        fn name(&self) -> &str {
            "ticker"
        }
        fn subscriptions(&self) -> Subscriptions {
            Subscriptions {
                tick_us: 2000,
                running: true,
            }
        }
        fn attach(&mut self, _: &SchedView) {}
        fn on_event(&mut self, ev: &PolicyEvent, _: &SchedView) {
            self.0.lock().unwrap().push(*ev);
        }
        fn schedule(&mut self, d: &mut Dispatcher<'_>) {
            if d.view().task(gt(1)).is_some() && d.view().granted.tick_us > 0 {
                // Be called back in 1 ms.
                d.set_timer(d.now_ns() + 1_000_000, 7);
            }
        }
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (mut g, mut rt) = setup(Box::new(Ticker(seen.clone())));
    rt.start_session();
    let hello = g
        .recv(0)
        .into_iter()
        .find_map(|m| match m {
            Message::Hello(s) => Some(s),
            _ => None,
        })
        .unwrap();
    assert_eq!(hello.flags, HELLO_F_TICK | HELLO_F_RUNNING);
    assert_eq!(hello.tick_us, 2000);
    // The guest grants ticks at 4 ms only, no TASK_RUNNING.
    g.send(
        0,
        &[Message::Hello(SessionInfo {
            session_id: hello.session_id,
            flags: HELLO_F_TICK,
            tick_us: 4000,
            ..Default::default()
        })],
    );
    rt.step();
    assert_eq!(rt.view().granted.tick_us, 4000);
    assert!(!rt.view().granted.running);
    let mut tick = cpu_ev(CpuEventKind::Tick, 0, gt(1));
    if let Message::Cpu(_, e) = &mut tick {
        e.runtime_ns = 5_000_000;
        e.slice_ns = 100;
    }
    g.send(0, &[task_new(1, 1, 1), tick]);
    rt.step();
    assert_eq!(rt.view().task(gt(1)).unwrap().runtime_ns, 5_000_000);
    assert_eq!(rt.metrics().ticks, 1);
    // The timer set while scheduling fires after 1 ms.
    std::thread::sleep(Duration::from_millis(2));
    rt.step();
    assert!(rt.metrics().timers_fired >= 1);
    let seen = seen.lock().unwrap();
    assert!(seen.contains(&PolicyEvent::Tick {
        cpu: 0,
        gtid: gt(1),
        runtime_ns: 5_000_000,
        slice_ns: 100
    }));
    assert!(seen
        .iter()
        .any(|e| matches!(e, PolicyEvent::Timer { token: 7, .. })));
}
