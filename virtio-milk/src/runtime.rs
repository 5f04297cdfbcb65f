//! The host policy runtime: task table, sequence tracking, session handling, the polling
//! loop, and hosting (and hot-swapping) a [`Policy`].
//!
//! One runtime serves one virtio-milk device. Each [`Runtime::step`] polls all event
//! queues, applies the messages to the [`SchedView`] (dropping stale or unknown-task
//! events), tells the policy, asks it for decisions, validates and stamps them with the
//! task's latest seq, and writes them to the decision queues. [`Runtime::run`] repeats this,
//! spinning for `spin_budget` after the last work, then re-enabling notifications
//! (EVENT_IDX `avail_event`) and sleeping on the kick eventfd.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::{monotonic_ns, Metrics, Summary};
use crate::policy::{
    CpuState, Decision, Pid, Policy, PolicyEvent, RunnableReason, SchedView, TaskInfo, TaskState,
};
use crate::protocol::{
    msg, pack_name, AckStatus, DecisionInfo, Message, SessionInfo, TaskEventKind,
    DEFAULT_HEARTBEAT_MS,
};
use crate::queue::QueueEngine;

/// How often a running loop publishes its counters for [`RuntimeHandle::snapshot`].
pub const SNAPSHOT_PERIOD: Duration = Duration::from_millis(100);

/// GOODBYE reason: the host runtime stopped in an orderly way.
pub const GOODBYE_STOPPED: u64 = 0;
/// GOODBYE reason: the host starts a new session because the guest's view of the session
/// disagrees with its own (a HELLO follows immediately).
pub const GOODBYE_RESYNC: u64 = 2;

/// Runtime knobs.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeConfig {
    /// How long to keep polling after the last work before sleeping on the kick eventfd.
    /// `None`: never sleep (pure polling). `Some(ZERO)`: notification driven.
    pub spin_budget: Option<Duration>,
    /// Host HEARTBEAT period (also the longest sleep). `None`: no heartbeats.
    pub heartbeat: Option<Duration>,
    /// Slice put in RUN decisions when the policy asks for 0.
    pub default_slice_ns: u64,
    /// Send HELLO when [`Runtime::run`] starts.
    pub hello_on_start: bool,
    /// Send GOODBYE when [`Runtime::run`] returns.
    pub goodbye_on_stop: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            spin_budget: Some(Duration::from_micros(50)),
            heartbeat: Some(Duration::from_millis(u64::from(DEFAULT_HEARTBEAT_MS))),
            default_slice_ns: 5_000_000,
            hello_on_start: true,
            goodbye_on_stop: true,
        }
    }
}

/// Runtime errors.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Could not clone the kick eventfd or spawn the thread.
    #[error("runtime setup failed: {0}")]
    Setup(io::Error),
    /// The runtime thread panicked.
    #[error("runtime thread panicked")]
    Panicked,
}

/// Cookie bit marking decisions written by [`RuntimeHandle::inject_decision`]; the runtime
/// never hands out such cookies itself, so their acks are told apart and counted in
/// [`crate::metrics::Metrics::injected_acks`].
pub const INJECTED_COOKIE: u64 = 1 << 63;

/// Kind of an injected decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// RUN(pid, cpu, seq, slice_ns).
    Run,
    /// PREEMPT(cpu) naming `pid` as the task expected to run there (0: whatever runs).
    Preempt,
}

/// A decision written to the guest exactly as given, bypassing every check the runtime
/// applies to policy output (task known, seq current, CPU allowed and free). Testing and
/// fault-injection hook: it lets a test play a buggy or hostile host and verify that the
/// guest rejects the decision with the right status. See [`RuntimeHandle::inject_decision`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDecision {
    /// RUN or PREEMPT.
    pub kind: RawKind,
    /// Target CPU written in the record (may be out of range).
    pub cpu: u16,
    /// Task.
    pub pid: Pid,
    /// Sequence number written in the record (may be stale).
    pub seq: u64,
    /// Slice for RUN (0: the guest's default).
    pub slice_ns: u64,
}

impl RawDecision {
    /// A RUN decision.
    pub fn run(pid: Pid, cpu: u16, seq: u64) -> Self {
        RawDecision {
            kind: RawKind::Run,
            cpu,
            pid,
            seq,
            slice_ns: 0,
        }
    }
}

/// Shared between a running runtime thread and its [`RuntimeHandle`].
#[derive(Default)]
pub struct Control {
    stop: AtomicBool,
    silent: AtomicBool,
    swap_pending: AtomicBool,
    mailbox: Mutex<Option<Box<dyn Policy>>>,
    inject_pending: AtomicBool,
    injections: Mutex<Vec<RawDecision>>,
    snapshot: Mutex<Option<Summary>>,
}

impl Control {
    /// Ask the loop to return.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The latest summary the loop published (about every [`SNAPSHOT_PERIOD`]).
    pub fn snapshot(&self) -> Option<Summary> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Hand a new policy to the loop.
    pub fn request_swap(&self, p: Box<dyn Policy>) {
        *self.mailbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        self.swap_pending.store(true, Ordering::Release);
    }

    /// Ask the loop to return without telling the guest (no GOODBYE), as a crashed host
    /// would: the guest only notices through its host-silence timeout.
    pub fn request_silent_stop(&self) {
        self.silent.store(true, Ordering::Release);
        self.request_stop();
    }

    /// Queue raw decisions for the loop to write (see [`RawDecision`]).
    pub fn request_injection(&self, d: &[RawDecision]) {
        self.injections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(d);
        self.inject_pending.store(true, Ordering::Release);
    }
}

/// The part of a runtime that a runtime in another process needs to continue the same
/// session without the guest noticing more than a pause (a planned hand-over between
/// vhost-user backends): session, task and CPU tables, and the RUNs still in flight.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Session id the guest knows (0: none).
    pub session_id: u64,
    /// The guest echoed that session's HELLO.
    pub established: bool,
    /// Task and CPU tables.
    pub view: SchedView,
    /// Last cookie handed out.
    pub cookie: u64,
    /// Cookie of the RUN each CPU is committed to (0: none).
    pub inflight: Vec<u64>,
    /// When each of those RUNs was queued (host monotonic ns).
    pub inflight_ns: Vec<u64>,
    /// Heartbeats sent in this session.
    pub heartbeats: u64,
}

/// A policy runtime bound to one queue engine.
pub struct Runtime<M: GuestMemory> {
    engine: QueueEngine<M>,
    policy: Box<dyn Policy>,
    view: SchedView,
    metrics: Metrics,
    cfg: RuntimeConfig,
    session_id: u64,
    /// The guest echoed our current HELLO.
    established: bool,
    cookie: u64,
    /// Cookie of the RUN each CPU is committed to (0: none).
    inflight: Vec<u64>,
    /// When that RUN was queued (host monotonic ns).
    inflight_ns: Vec<u64>,
    /// Injected decisions written so far (their cookies count up under INJECTED_COOKIE).
    injected: u64,
    heartbeats: u64,
    last_heartbeat: Instant,
    started: Instant,
    msgs: Vec<(u16, Message)>,
    events: Vec<PolicyEvent>,
    decisions: Vec<Decision>,
}

impl<M: GuestMemory> Runtime<M> {
    /// A runtime driving `engine` with `policy`.
    pub fn new(engine: QueueEngine<M>, mut policy: Box<dyn Policy>, cfg: RuntimeConfig) -> Self {
        let view = SchedView::new(engine.num_cpus());
        let inflight = vec![0; view.cpus.len()];
        policy.attach(&view);
        Runtime {
            engine,
            policy,
            view,
            metrics: Metrics::default(),
            cfg,
            session_id: 0,
            established: false,
            cookie: 0,
            inflight_ns: inflight.clone(),
            inflight,
            injected: 0,
            heartbeats: 0,
            last_heartbeat: Instant::now(),
            started: Instant::now(),
            msgs: Vec::new(),
            events: Vec::new(),
            decisions: Vec::new(),
        }
    }

    /// The tables as the policy sees them.
    pub fn view(&self) -> &SchedView {
        &self.view
    }

    /// Counters so far.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The queue engine.
    pub fn engine(&self) -> &QueueEngine<M> {
        &self.engine
    }

    /// Current session id (0 before the first HELLO).
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Whether the guest echoed the current session's HELLO.
    pub fn session_established(&self) -> bool {
        self.established
    }

    /// Name of the active policy.
    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// What another runtime needs to continue this session (see [`SessionState`]).
    pub fn session_state(&self) -> SessionState {
        SessionState {
            session_id: self.session_id,
            established: self.established,
            view: self.view.clone(),
            cookie: self.cookie,
            inflight: self.inflight.clone(),
            inflight_ns: self.inflight_ns.clone(),
            heartbeats: self.heartbeats,
        }
    }

    /// Continue the session another runtime exported: its tables replace ours, the policy
    /// attaches to them, and the guest gets a HELLO with the same session id and our policy
    /// name, exactly as after an in-process swap. Run it with `hello_on_start` off.
    pub fn resume_session(&mut self, state: SessionState) {
        let n = self.view.cpus.len();
        if state.view.cpus.len() != n || state.inflight.len() != n || state.inflight_ns.len() != n {
            log::warn!("session state for another cpu count: starting a new session");
            self.start_session();
            return;
        }
        self.session_id = state.session_id;
        self.established = state.established;
        self.view = state.view;
        self.cookie = state.cookie;
        self.inflight = state.inflight;
        self.inflight_ns = state.inflight_ns;
        self.heartbeats = state.heartbeats;
        self.policy.attach(&self.view);
        if self.session_id != 0 {
            let hello = Message::Hello(self.session_record(0));
            self.send_session(hello);
        }
        self.schedule();
        self.engine.flush();
    }

    /// Give the engine back (e.g. to start another runtime on the same queues).
    pub fn into_engine(self) -> QueueEngine<M> {
        self.engine
    }

    /// The exit summary.
    pub fn summary(&self) -> Summary {
        Summary {
            policy: self.policy.name().to_owned(),
            elapsed: self.started.elapsed(),
            metrics: self.metrics.clone(),
            engine: self.engine.stats().clone(),
            session_id: self.session_id,
            session_established: self.established,
        }
    }

    fn session_record(&self, counter: u64) -> SessionInfo {
        SessionInfo {
            cpu: 0,
            num_cpus: self.engine.num_cpus(),
            heartbeat_ms: self
                .cfg
                .heartbeat
                .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32),
            session_id: self.session_id,
            ts_ns: monotonic_ns(),
            counter,
            name: pack_name(self.policy.name()),
        }
    }

    fn send_session(&mut self, m: Message) {
        // Session records travel on CPU 0's decision queue.
        if self.engine.push_decision(0, m.encode()) {
            self.metrics.session_sent += 1;
        } else {
            self.metrics.queue_full += 1;
        }
    }

    /// Start a new session: forget every task (the guest re-announces them after our
    /// HELLO), mark all CPUs free, re-attach the policy and send HELLO.
    pub fn start_session(&mut self) {
        self.new_session(None);
    }

    /// Like [`Self::start_session`], but first tell the guest GOODBYE (with `reason`) so a
    /// guest still scheduling with an older session falls back and re-announces its tasks
    /// when it takes the new HELLO.
    pub fn restart_session(&mut self, reason: u64) {
        self.new_session(Some(reason));
    }

    fn new_session(&mut self, goodbye: Option<u64>) {
        // Decisions of the old session that never reached the guest are meaningless now.
        self.metrics.dropped_old_decisions += self.engine.clear_backlog() as u64;
        if let Some(reason) = goodbye {
            let bye = Message::Goodbye(self.session_record(reason));
            self.send_session(bye);
        }
        // Unique across runtimes on the same device too (a restarted runtime must not
        // reuse the id the guest saw before its GOODBYE): clock based, strictly increasing.
        self.session_id = monotonic_ns().max(self.session_id.saturating_add(1));
        self.established = false;
        self.view = SchedView::new(self.engine.num_cpus());
        for c in &mut self.view.cpus {
            *c = CpuState::Idle;
        }
        self.inflight = vec![0; self.view.cpus.len()];
        self.inflight_ns = vec![0; self.view.cpus.len()];
        self.policy.attach(&self.view);
        let hello = Message::Hello(self.session_record(0));
        self.send_session(hello);
        self.engine.flush();
    }

    /// Tell the guest the host stops scheduling (it falls back to its own scheduler).
    pub fn end_session(&mut self, reason: u64) {
        let bye = Message::Goodbye(self.session_record(reason));
        self.send_session(bye);
        self.engine.flush();
    }

    /// Replace the policy without telling the guest anything but a HELLO carrying the same
    /// session id and the new name: the task table survives, the new policy rebuilds its
    /// state from it, and the guest only sees a pause.
    pub fn swap_policy(&mut self, mut policy: Box<dyn Policy>) {
        log::info!(
            "swapping policy {} -> {}",
            self.policy.name(),
            policy.name()
        );
        policy.attach(&self.view);
        self.policy = policy;
        self.metrics.policy_swaps += 1;
        if self.session_id != 0 {
            let hello = Message::Hello(self.session_record(0));
            self.send_session(hello);
        }
        self.schedule();
        self.engine.flush();
    }

    /// One iteration: poll events, update tables, run the policy, write decisions.
    /// Returns the number of event chains consumed.
    pub fn step(&mut self) -> usize {
        let mut msgs = std::mem::take(&mut self.msgs);
        let chains = self.engine.poll_events(&mut msgs);
        if chains > 0 {
            let now = monotonic_ns();
            for (_, m) in msgs.drain(..) {
                self.handle(m, now);
            }
            self.schedule();
        }
        self.msgs = msgs;
        if self.engine.backlog_len() > 0 {
            self.engine.flush();
        }
        chains
    }

    fn maybe_heartbeat(&mut self, now: Instant) {
        if let Some(period) = self.cfg.heartbeat {
            if self.session_id != 0 && now.duration_since(self.last_heartbeat) >= period {
                self.last_heartbeat = now;
                self.heartbeats += 1;
                let hb = Message::Heartbeat(self.session_record(self.heartbeats));
                self.send_session(hb);
                self.engine.flush();
            }
        }
    }

    /// Poll until `ctl` asks to stop; swap policies when asked. See the module docs.
    pub fn run(&mut self, ctl: &Control) {
        self.started = Instant::now();
        if self.cfg.hello_on_start {
            self.discard_stale_events();
            self.start_session();
        }
        self.engine.disable_notifications();
        let mut last_work = Instant::now();
        let mut last_snapshot = Instant::now();
        while !ctl.stop.load(Ordering::Acquire) {
            if last_snapshot.elapsed() >= SNAPSHOT_PERIOD {
                last_snapshot = Instant::now();
                *ctl.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.summary());
            }
            if ctl.swap_pending.swap(false, Ordering::AcqRel) {
                let next = ctl.mailbox.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(p) = next {
                    self.swap_policy(p);
                }
            }
            if ctl.inject_pending.swap(false, Ordering::AcqRel) {
                let raw =
                    std::mem::take(&mut *ctl.injections.lock().unwrap_or_else(|e| e.into_inner()));
                for d in raw {
                    self.inject(d);
                }
                self.engine.flush();
            }
            let n = self.step();
            let now = Instant::now();
            self.maybe_heartbeat(now);
            if n > 0 {
                last_work = now;
                continue;
            }
            let keep_spinning = match self.cfg.spin_budget {
                None => true,
                Some(b) => now.duration_since(last_work) < b,
            };
            if keep_spinning {
                std::hint::spin_loop();
                continue;
            }
            if self.engine.enable_notifications() {
                // Work raced in while we re-armed: keep going without sleeping.
                self.engine.disable_notifications();
                continue;
            }
            let timeout = match self.cfg.heartbeat {
                Some(p) => p.saturating_sub(now.duration_since(self.last_heartbeat)),
                None => SNAPSHOT_PERIOD,
            }
            .min(SNAPSHOT_PERIOD)
            .max(Duration::from_millis(1));
            if let Err(e) = self.engine.wait_kick(timeout) {
                log::warn!("{e}");
            }
            self.engine.disable_notifications();
            last_work = Instant::now();
        }
        if self.cfg.goodbye_on_stop && self.session_id != 0 && !ctl.silent.load(Ordering::Acquire) {
            self.end_session(GOODBYE_STOPPED);
        }
    }

    /// Drop every event the guest queued while no runtime served the queues (a paused
    /// device, or a stopped runtime whose engine is reused). They belong to an earlier
    /// session or to none: task events of tasks that may have exited since (a RUN for them
    /// would only come back NO_TASK), acks of decisions the new runtime never sent, the
    /// guest's GOODBYE to a host that is gone. The guest re-announces every task after the
    /// HELLO that follows. Returns the number of records dropped.
    pub fn discard_stale_events(&mut self) -> u64 {
        let mut msgs = std::mem::take(&mut self.msgs);
        let mut n = 0;
        while self.engine.poll_events(&mut msgs) > 0 {
            n += msgs.len() as u64;
            msgs.clear();
        }
        self.msgs = msgs;
        if n > 0 {
            log::info!("dropped {n} records queued before this runtime started");
        }
        self.metrics.discarded_on_start += n;
        n
    }

    /// Write `d` to the guest as is (testing / fault injection, see [`RawDecision`]). The
    /// record goes to the decision queue of `d.cpu`, or of CPU 0 when `d.cpu` is out of
    /// range. Returns false if the queue's backlog was full.
    pub fn inject(&mut self, d: RawDecision) -> bool {
        self.injected += 1;
        let info = DecisionInfo {
            cpu: d.cpu,
            pid: d.pid,
            seq: d.seq,
            slice_ns: d.slice_ns,
            cookie: INJECTED_COOKIE | self.injected,
            ts_ns: monotonic_ns(),
        };
        let rec = match d.kind {
            RawKind::Run => Message::Run(info),
            RawKind::Preempt => Message::Preempt(info),
        };
        let queue = if u32::from(d.cpu) < self.engine.num_cpus() {
            d.cpu
        } else {
            0
        };
        log::info!("injecting {d:?} on queue {queue}");
        if self.engine.push_decision(queue, rec.encode()) {
            self.metrics.injected += 1;
            true
        } else {
            self.metrics.queue_full += 1;
            false
        }
    }

    fn free_cpu_of(&mut self, pid: Pid, prev: TaskState) {
        if let TaskState::Running(c) = prev {
            if let Some(s) = self.view.cpus.get_mut(usize::from(c)) {
                if *s == CpuState::Running(pid) {
                    *s = CpuState::Idle;
                    self.events.push(PolicyEvent::CpuIdle(c));
                }
            }
        }
    }

    /// Check and record a task event's seq; returns the task if the event is newer.
    fn fresh_task(&mut self, pid: Pid, seq: u64) -> Option<&mut TaskInfo> {
        let Some(t) = self.view.tasks.get_mut(&pid) else {
            self.metrics.unknown_task_events += 1;
            return None;
        };
        if seq <= t.seq {
            self.metrics.stale_events += 1;
            return None;
        }
        t.seq = seq;
        Some(t)
    }

    fn handle(&mut self, m: Message, now: u64) {
        self.metrics.count_msg(m.msg_type());
        match m {
            Message::Hello(s) => {
                if self.session_id != 0 && s.session_id == self.session_id {
                    // The guest took our HELLO.
                    self.established = true;
                } else if self.session_id != 0 && s.session_id == 0 && !self.established {
                    // A freshly probed driver while our HELLO may still be on its way
                    // (startup race): repeat it, keep the tasks already announced.
                    let hello = Message::Hello(self.session_record(0));
                    self.send_session(hello);
                } else {
                    // The guest restarted its driver, or still runs an older session:
                    // resynchronise (GOODBYE makes it re-announce every task).
                    log::info!("guest HELLO (session {}): new session", s.session_id);
                    self.restart_session(GOODBYE_RESYNC);
                }
            }
            Message::Heartbeat(s) => self.metrics.guest_fallbacks = s.counter,
            Message::Goodbye(s) => {
                log::info!("guest GOODBYE (reason {})", s.counter);
                // The guest stopped using us; offer a new session right away.
                self.start_session();
            }
            Message::TaskNew {
                cpu,
                pid,
                tgid,
                seq,
                comm,
                cpus_allowed,
                weight,
                nice,
                ..
            } => {
                if let Some(old) = self.view.tasks.get(&pid) {
                    if seq <= old.seq {
                        self.metrics.stale_events += 1;
                        return;
                    }
                }
                self.view.tasks.insert(
                    pid,
                    TaskInfo {
                        pid,
                        tgid,
                        comm,
                        cpus_allowed,
                        weight,
                        nice,
                        seq,
                        state: TaskState::Blocked,
                        last_cpu: cpu,
                        runnable_since_ns: now,
                    },
                );
                self.events.push(PolicyEvent::TaskNew(pid));
            }
            Message::Task {
                kind,
                cpu,
                pid,
                seq,
                ..
            } => {
                let Some(t) = self.fresh_task(pid, seq) else {
                    return;
                };
                let prev = t.state;
                t.last_cpu = cpu;
                match kind {
                    TaskEventKind::Wakeup | TaskEventKind::Preempt | TaskEventKind::Yield => {
                        t.state = TaskState::Runnable;
                        t.runnable_since_ns = now;
                        let reason = match kind {
                            TaskEventKind::Wakeup => RunnableReason::Wakeup,
                            TaskEventKind::Preempt => RunnableReason::Preempted,
                            _ => RunnableReason::Yielded,
                        };
                        self.free_cpu_of(pid, prev);
                        self.events
                            .push(PolicyEvent::TaskRunnable { pid, cpu, reason });
                    }
                    TaskEventKind::Blocked => {
                        t.state = TaskState::Blocked;
                        self.free_cpu_of(pid, prev);
                        self.events.push(PolicyEvent::TaskBlocked(pid));
                    }
                    TaskEventKind::Dead => {
                        self.view.tasks.remove(&pid);
                        self.free_cpu_of(pid, prev);
                        self.events.push(PolicyEvent::TaskDead(pid));
                    }
                }
            }
            Message::TaskAffinity {
                pid,
                seq,
                cpus_allowed,
                ..
            } => {
                if let Some(t) = self.fresh_task(pid, seq) {
                    t.cpus_allowed = cpus_allowed;
                    self.events.push(PolicyEvent::TaskAffinity(pid));
                }
            }
            Message::TaskPriority {
                pid,
                seq,
                weight,
                nice,
                ..
            } => {
                if let Some(t) = self.fresh_task(pid, seq) {
                    t.weight = weight;
                    t.nice = nice;
                    self.events.push(PolicyEvent::TaskPriority(pid));
                }
            }
            Message::CpuIdle { cpu, .. } => {
                let s = &mut self.view.cpus[usize::from(cpu)];
                // A RUN in flight stays committed until its ack arrives.
                if !matches!(s, CpuState::Committed(_)) {
                    *s = CpuState::Idle;
                    self.events.push(PolicyEvent::CpuIdle(cpu));
                }
            }
            Message::CpuBusy { cpu, pid, .. } => {
                let s = &mut self.view.cpus[usize::from(cpu)];
                if !matches!(s, CpuState::Committed(_)) {
                    *s = CpuState::Running(pid);
                    self.events.push(PolicyEvent::CpuBusy(cpu));
                }
            }
            Message::Ack {
                pid,
                status,
                seq,
                cookie,
                decision_type,
                target_cpu,
                ..
            } => self.handle_ack(pid, status, seq, cookie, decision_type, target_cpu, now),
            // parse_record never yields decisions for the event queue.
            Message::Run(_) | Message::Preempt(_) => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_ack(
        &mut self,
        pid: Pid,
        status: AckStatus,
        seq: u64,
        cookie: u64,
        ty: u16,
        cpu: u16,
        now: u64,
    ) {
        self.metrics.acks[status as usize] += 1;
        if cookie & INJECTED_COOKIE != 0 {
            // Ours, but not the policy's: counted, never shown to the policy or matched
            // against the CPU's in-flight RUN.
            self.metrics.injected_acks[status as usize] += 1;
            return;
        }
        if ty == msg::RUN {
            let c = usize::from(cpu);
            // Only the ack of the RUN this CPU is committed to resolves it; acks of older
            // decisions (e.g. from a previous session) are counted and otherwise ignored.
            if self.inflight.get(c) != Some(&cookie) || cookie == 0 {
                self.metrics.unmatched_acks += 1;
                self.events.push(PolicyEvent::Ack { pid, cpu, status });
                return;
            }
            self.inflight[c] = 0;
            if status == AckStatus::Ok {
                if let Some(&sent) = self.inflight_ns.get(c) {
                    self.metrics.apply_latency.record(now.saturating_sub(sent));
                }
            }
            if self.view.cpus[c] == CpuState::Committed(pid) {
                self.view.cpus[c] = if status == AckStatus::Ok {
                    CpuState::Running(pid)
                } else {
                    self.events.push(PolicyEvent::CpuIdle(cpu));
                    CpuState::Idle
                };
            }
            let mut requeue = false;
            let mut dead = false;
            if let Some(t) = self.view.tasks.get_mut(&pid) {
                if t.state == TaskState::Dispatched(cpu) {
                    t.state = match status {
                        AckStatus::Ok => TaskState::Running(cpu),
                        AckStatus::NotRunnable if seq == t.seq => TaskState::Blocked,
                        AckStatus::NoTask => {
                            dead = true;
                            TaskState::Blocked
                        }
                        _ => {
                            requeue = true;
                            TaskState::Runnable
                        }
                    };
                }
            }
            if dead {
                self.view.tasks.remove(&pid);
                self.events.push(PolicyEvent::TaskDead(pid));
            }
            if requeue {
                self.events.push(PolicyEvent::TaskRunnable {
                    pid,
                    cpu,
                    reason: RunnableReason::Requeued,
                });
            }
        }
        self.events.push(PolicyEvent::Ack { pid, cpu, status });
    }

    fn schedule(&mut self) {
        // The policy sees every event of this batch, then decides once.
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            self.policy.on_event(&ev, &self.view);
        }
        self.events = events;
        let mut decisions = std::mem::take(&mut self.decisions);
        self.policy.schedule(&self.view, &mut decisions);
        let now = monotonic_ns();
        for d in decisions.drain(..) {
            self.apply(d, now);
        }
        self.decisions = decisions;
    }

    fn apply(&mut self, d: Decision, now: u64) {
        match d {
            Decision::Run { pid, cpu, slice_ns } => {
                let c = usize::from(cpu);
                let ok_cpu = self.view.cpus.get(c) == Some(&CpuState::Idle);
                let Some(t) = self.view.tasks.get_mut(&pid) else {
                    self.metrics.policy_rejects += 1;
                    return;
                };
                if !ok_cpu || t.state != TaskState::Runnable || !t.allows(cpu) {
                    self.metrics.policy_rejects += 1;
                    return;
                }
                self.cookie += 1;
                let rec = Message::Run(DecisionInfo {
                    cpu,
                    pid,
                    seq: t.seq,
                    slice_ns: if slice_ns == 0 {
                        self.cfg.default_slice_ns
                    } else {
                        slice_ns
                    },
                    cookie: self.cookie,
                    ts_ns: now,
                });
                if self.engine.push_decision(cpu, rec.encode()) {
                    t.state = TaskState::Dispatched(cpu);
                    self.view.cpus[c] = CpuState::Committed(pid);
                    if let Some(slot) = self.inflight.get_mut(c) {
                        *slot = self.cookie;
                    }
                    if let Some(slot) = self.inflight_ns.get_mut(c) {
                        *slot = now;
                    }
                    self.metrics.decisions_run += 1;
                    self.metrics
                        .latency
                        .record(now.saturating_sub(t.runnable_since_ns));
                } else {
                    self.metrics.queue_full += 1;
                }
            }
            Decision::Preempt { cpu } => {
                let Some(state) = self.view.cpus.get(usize::from(cpu)) else {
                    self.metrics.policy_rejects += 1;
                    return;
                };
                let pid = match state {
                    CpuState::Running(p) => *p,
                    _ => 0,
                };
                let seq = self.view.task(pid).map_or(0, |t| t.seq);
                self.cookie += 1;
                let rec = Message::Preempt(DecisionInfo {
                    cpu,
                    pid,
                    seq,
                    slice_ns: 0,
                    cookie: self.cookie,
                    ts_ns: now,
                });
                if self.engine.push_decision(cpu, rec.encode()) {
                    self.metrics.decisions_preempt += 1;
                } else {
                    self.metrics.queue_full += 1;
                }
            }
        }
    }
}

impl<M: GuestMemory + Send + 'static> Runtime<M> {
    /// Run on a new thread; returns a handle to swap the policy or stop it.
    pub fn spawn(self) -> Result<RuntimeHandle<M>, RuntimeError> {
        let kick = self.engine.kick_fd().map_err(RuntimeError::Setup)?;
        let ctl = Arc::new(Control::default());
        let ctl2 = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("milk-runtime".into())
            .spawn(move || {
                let mut rt = self;
                rt.run(&ctl2);
                rt
            })
            .map_err(RuntimeError::Setup)?;
        Ok(RuntimeHandle {
            ctl,
            kick,
            thread: Some(thread),
        })
    }
}

/// Controls a runtime running on its own thread.
pub struct RuntimeHandle<M: GuestMemory> {
    ctl: Arc<Control>,
    kick: EventFd,
    thread: Option<JoinHandle<Runtime<M>>>,
}

impl<M: GuestMemory> RuntimeHandle<M> {
    /// Install `policy` at the next loop iteration (the guest sees only a pause).
    pub fn swap_policy(&self, policy: Box<dyn Policy>) {
        self.ctl.request_swap(policy);
        let _ = self.kick.write(1);
    }

    /// Counters of the running loop, at most [`SNAPSHOT_PERIOD`] old (`None` during the
    /// first period).
    pub fn snapshot(&self) -> Option<Summary> {
        self.ctl.snapshot()
    }

    /// Testing / fault-injection hook: write `decisions` to the guest at the next loop
    /// iteration exactly as given, bypassing the runtime's validation of policy output
    /// (stale seqs, unknown pids, disallowed or out-of-range CPUs all go through). Their
    /// cookies carry [`INJECTED_COOKIE`]; the guest's acks are counted by status in
    /// `Metrics::injected_acks` (and in `Metrics::acks`) and never reach the policy.
    /// Not for production use: a correct host never needs it.
    pub fn inject_decisions(&self, decisions: &[RawDecision]) {
        self.ctl.request_injection(decisions);
        let _ = self.kick.write(1);
    }

    /// Like [`Self::stop`] but without GOODBYE, whatever the configuration: the guest
    /// sees a host that went silent (crash simulation for tests).
    pub fn stop_silently(self) -> Result<Runtime<M>, RuntimeError> {
        self.ctl.request_silent_stop();
        self.stop()
    }

    /// Stop the loop (sending GOODBYE if configured) and get the runtime back, e.g. for
    /// its [`Runtime::summary`] or to restart it later on the same engine.
    pub fn stop(mut self) -> Result<Runtime<M>, RuntimeError> {
        self.ctl.request_stop();
        let _ = self.kick.write(1);
        let t = self.thread.take().ok_or(RuntimeError::Panicked)?;
        t.join().map_err(|_| RuntimeError::Panicked)
    }
}

impl<M: GuestMemory> Drop for RuntimeHandle<M> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.ctl.request_stop();
            let _ = self.kick.write(1);
            let _ = t.join();
        }
    }
}
