//! The host policy runtime: the polling loop that hosts (and hot-swaps) a [`Policy`].
//!
//! One runtime serves one virtio-milk device. Each [`Runtime::step`] polls all event
//! queues, applies the messages to the [`SchedView`] (dropping stale or unknown-task
//! events; [`tasks`], [`cpus`], [`session`]), resolves acknowledgements and expired
//! commitments ([`acks`]), fires due policy timers ([`timers`]), tells the policy, and
//! lets it decide through a [`Dispatcher`] whose decisions are validated, stamped with the
//! task's latest seq and queued ([`dispatch`]). [`Runtime::run`] repeats this, spinning for
//! `spin_budget` after the last work, then re-enabling notifications (EVENT_IDX
//! `avail_event`) and sleeping on the kick eventfd until the next heartbeat, timer or
//! commitment deadline.

pub mod acks;
mod cpus;
mod dispatch;
mod fault;
mod handle;
mod handover;
mod inject;
#[cfg(feature = "invariants")]
mod invariants;
mod session;
mod swap;
mod tasks;
pub mod timers;

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;

use crate::metrics::{monotonic_ns, Metrics, Summary};
use crate::policy::{Dispatcher, Gtid, Policy, PolicyEvent, SchedView};
use crate::protocol::{Message, BYE_RESYNC, BYE_STOP, DEFAULT_HEARTBEAT_MS};
use crate::queue::QueueEngine;

pub use fault::{
    ChaosSpec, FaultCounts, HostileSpec, SpecError, CHAOS_KEYS, HOSTILE_COOKIE, HOSTILE_KEYS,
};
pub use handle::{Control, RuntimeHandle};
pub use handover::SessionState;
pub use inject::{RawDecision, RawKind, INJECTED_COOKIE, UNKNOWN_GENERATION};

use acks::Commitments;
use timers::Timers;

/// How often a running loop publishes its counters for [`RuntimeHandle::snapshot`].
pub const SNAPSHOT_PERIOD: Duration = Duration::from_millis(100);

/// GOODBYE reason: the host runtime stopped in an orderly way.
pub const GOODBYE_STOPPED: u64 = BYE_STOP;
/// GOODBYE reason: the host starts a new session because the guest's view of the session
/// disagrees with its own (a HELLO follows immediately).
pub const GOODBYE_RESYNC: u64 = BYE_RESYNC;

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
    /// A decision not acknowledged after this long is given up ([`crate::policy::Outcome::Lost`]);
    /// its CPU is no longer committed. V2: 3 x the host heartbeat.
    pub ack_timeout: Duration,
    /// A CPU_IDLE / CPU_BUSY for a CPU resolves that CPU's commitments older than this
    /// (the guest moved on without acknowledging them).
    pub ack_grace: Duration,
    /// Most RUNs in flight to one CPU (the next one plus staged ones).
    pub max_staged: usize,
    /// Chaos mode: faults on the channel (reliability runs; `None`: off).
    pub chaos: Option<ChaosSpec>,
    /// Hostile-host mode: random and garbage records for the guest (`None`: off).
    pub hostile: Option<HostileSpec>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            spin_budget: Some(Duration::from_micros(50)),
            heartbeat: Some(Duration::from_millis(u64::from(DEFAULT_HEARTBEAT_MS))),
            default_slice_ns: 5_000_000,
            hello_on_start: true,
            goodbye_on_stop: true,
            ack_timeout: Duration::from_millis(3 * u64::from(DEFAULT_HEARTBEAT_MS)),
            ack_grace: Duration::from_millis(u64::from(DEFAULT_HEARTBEAT_MS)),
            max_staged: 2,
            chaos: None,
            hostile: None,
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

/// A policy runtime bound to one queue engine.
pub struct Runtime<M: GuestMemory> {
    engine: QueueEngine<M>,
    policy: Box<dyn Policy>,
    /// Bumped by every policy install; decisions and timers belong to one epoch.
    epoch: u64,
    view: SchedView,
    /// pid -> the gtid currently holding it (a new generation evicts the old task).
    pids: HashMap<u32, Gtid>,
    commits: Commitments,
    timers: Timers,
    swap_clock: swap::SwapClock,
    metrics: Metrics,
    cfg: RuntimeConfig,
    session_id: u64,
    /// The guest echoed our current HELLO.
    established: bool,
    /// The guest speaks another protocol version: no session until a v2 HELLO.
    refused_version: Option<u8>,
    /// Malformed-version count of the engine already handled.
    seen_bad_versions: u64,
    /// Injected decisions written so far (their cookies count up under INJECTED_COOKIE).
    injected: u64,
    heartbeats: u64,
    last_heartbeat: Instant,
    started: Instant,
    msgs: Vec<(u16, Message)>,
    events: Vec<PolicyEvent>,
    /// Chaos / hostile-host modes, if configured.
    faults: Option<fault::Faults>,
}

impl<M: GuestMemory> Runtime<M> {
    /// A runtime driving `engine` with `policy`.
    pub fn new(engine: QueueEngine<M>, mut policy: Box<dyn Policy>, cfg: RuntimeConfig) -> Self {
        let view = SchedView::new(engine.num_cpus());
        policy.attach(&view);
        let seen_bad_versions =
            engine.stats().malformed[crate::queue::Malformed::RecordVersion as usize];
        let mut metrics = Metrics::default();
        let faults =
            fault::Faults::new(cfg.chaos, cfg.hostile, view.cpus.len(), &mut metrics.faults);
        Runtime {
            commits: Commitments::new(view.cpus.len(), 0),
            engine,
            policy,
            epoch: 1,
            view,
            pids: HashMap::new(),
            timers: Timers::default(),
            swap_clock: swap::SwapClock::default(),
            metrics,
            cfg,
            session_id: 0,
            established: false,
            refused_version: None,
            seen_bad_versions,
            injected: 0,
            heartbeats: 0,
            last_heartbeat: Instant::now(),
            started: Instant::now(),
            msgs: Vec::new(),
            events: Vec::new(),
            faults,
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

    /// The protocol version of a refused guest (see V2: version negotiation).
    pub fn refused_version(&self) -> Option<u8> {
        self.refused_version
    }

    /// Name of the active policy.
    pub fn policy_name(&self) -> &str {
        self.policy.name()
    }

    /// Epoch of the active policy; [`Self::submit_external`] refuses other epochs.
    pub fn policy_epoch(&self) -> u64 {
        self.epoch
    }

    /// Decisions sent and not acknowledged yet.
    pub fn outstanding(&self) -> usize {
        self.commits.len()
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
            tasks: self.view.tasks.len(),
            task_pids: {
                let mut p: Vec<u32> = self.view.tasks.keys().map(|g| g.pid()).collect();
                p.sort_unstable();
                p
            },
            outstanding: self.commits.len(),
        }
    }

    /// Replace the policy without telling the guest anything but a HELLO carrying the same
    /// session id, the new name and the new policy's subscriptions: the task table
    /// survives, the new policy rebuilds its state from it, and the guest only sees a
    /// pause. Outcomes of the old policy's decisions and its timers are not passed on.
    pub fn swap_policy(&mut self, mut policy: Box<dyn Policy>) {
        let t0 = Instant::now();
        self.swap_begins();
        log::info!(
            "swapping policy {} -> {}",
            self.policy.name(),
            policy.name()
        );
        policy.attach(&self.view);
        self.policy = policy;
        self.epoch += 1;
        self.timers.clear();
        self.metrics.policy_swaps += 1;
        if self.session_id != 0 && self.refused_version.is_none() {
            let hello = Message::Hello(self.session_record(0));
            self.send_session(hello);
        }
        self.schedule();
        self.engine.flush();
        self.metrics
            .swap_stall
            .record(t0.elapsed().as_nanos() as u64);
    }

    /// One iteration: poll events, update tables, expire commitments, fire timers, run
    /// the policy, write decisions. Returns the number of event chains consumed plus
    /// timers fired.
    pub fn step(&mut self) -> usize {
        self.step_with(true)
    }

    /// [`Self::step`]; with `idle_deadlines` false a step that finds no event skips the
    /// timer and commitment checks (the loop does them on every 32nd idle poll: the clock
    /// read is the most expensive part of an idle poll).
    fn step_with(&mut self, idle_deadlines: bool) -> usize {
        let mut msgs = std::mem::take(&mut self.msgs);
        let fresh = self.faults.is_some() && self.engine.backlog_len() == 0;
        let mut chains = self.engine.poll_events(&mut msgs);
        if self.faults.is_some() {
            chains = self.fault_events(&mut msgs);
        }
        let mut work = chains;
        let mut now = 0;
        if chains > 0 {
            now = monotonic_ns();
            self.view.now_ns = now;
            for (_, m) in msgs.drain(..) {
                self.handle(m, now);
            }
            self.check_version();
        }
        self.msgs = msgs;
        if chains > 0 || idle_deadlines && (!self.timers.is_empty() || !self.commits.is_empty()) {
            if now == 0 {
                now = monotonic_ns();
                self.view.now_ns = now;
            }
            work += self.fire_timers(now);
            self.expire_commitments(now);
        }
        if !self.events.is_empty() || chains > 0 {
            self.schedule();
        }
        if self.faults.is_some() {
            self.fault_decisions(fresh);
        }
        if self.engine.backlog_len() > 0 {
            self.engine.flush();
        }
        work
    }

    fn handle(&mut self, m: Message, now: u64) {
        self.metrics.count_msg(m.msg_type());
        if self.refused_version.is_some() && !matches!(m, Message::Hello(_)) {
            // No session with this guest: everything but a new HELLO is ignored.
            return;
        }
        match m {
            Message::Hello(s) => self.on_guest_hello(s),
            Message::Heartbeat(s) => self.metrics.guest_fallbacks = s.counter,
            Message::Goodbye(s) => self.on_guest_goodbye(s),
            Message::TaskNew(t) => self.on_task_new(t, now),
            Message::Task(kind, e) => self.on_task_event(kind, e, now),
            Message::TaskAffinity(a) => self.on_affinity(a),
            Message::TaskPriority(p) => self.on_priority(p),
            Message::Cpu(kind, e) => self.on_cpu_event(kind, e, now),
            Message::Ack(a) => self.on_ack(a, now),
            // parse_record never yields decisions for the event queue.
            Message::Run(_) | Message::Preempt(_) => {}
        }
    }

    fn fire_timers(&mut self, now: u64) -> usize {
        let mut n = 0;
        while let Some((token, due_ns)) = self.timers.pop_due(now) {
            self.metrics.timers_fired += 1;
            self.events.push(PolicyEvent::Timer { token, due_ns });
            n += 1;
        }
        n
    }

    fn schedule(&mut self) {
        if self.refused_version.is_some() {
            self.events.clear();
            return;
        }
        // The policy sees every event of this batch, then decides once.
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            self.policy.on_event(&ev, &self.view);
        }
        self.events = events;
        if self.view.now_ns == 0 {
            self.view.now_ns = monotonic_ns();
        }
        let before = self.decisions_written();
        let now = self.view.now_ns;
        let mut sink = dispatch::Sink {
            engine: &mut self.engine,
            commits: &mut self.commits,
            timers: &mut self.timers,
            metrics: &mut self.metrics,
            cfg: &self.cfg,
            epoch: self.epoch,
        };
        let mut d = Dispatcher::new(&mut self.view, &mut sink);
        self.policy.schedule(&mut d);
        self.note_decisions(before, now);
        // Outcomes produced while deciding (none today) would wait for the next batch.
    }

    /// Submit a decision made outside [`Policy::schedule`] (e.g. by an agent in another
    /// process) on behalf of the policy installed as `epoch`. A decision of a policy that
    /// was swapped out since is refused with [`crate::policy::Reject::StalePolicy`].
    pub fn submit_external(
        &mut self,
        epoch: u64,
        d: crate::policy::Decision,
    ) -> Result<crate::policy::DecisionId, crate::policy::Reject> {
        if epoch != self.epoch || self.refused_version.is_some() {
            self.metrics.stale_policy_decisions += 1;
            return Err(crate::policy::Reject::StalePolicy);
        }
        self.view.now_ns = monotonic_ns();
        let before = self.decisions_written();
        let now = self.view.now_ns;
        let mut sink = dispatch::Sink {
            engine: &mut self.engine,
            commits: &mut self.commits,
            timers: &mut self.timers,
            metrics: &mut self.metrics,
            cfg: &self.cfg,
            epoch: self.epoch,
        };
        let r = crate::policy::DecisionSink::submit(&mut sink, &mut self.view, d);
        self.engine.flush();
        self.note_decisions(before, now);
        r
    }

    fn maybe_heartbeat(&mut self, now: Instant) {
        if let Some(period) = self.cfg.heartbeat {
            if self.session_id != 0
                && self.refused_version.is_none()
                && now.duration_since(self.last_heartbeat) >= period
            {
                self.last_heartbeat = now;
                self.heartbeats += 1;
                let hb = Message::Heartbeat(self.session_record(self.heartbeats));
                self.send_session(hb);
                self.engine.flush();
            }
        }
    }

    /// How long the loop may sleep: until the next heartbeat, timer or commitment deadline
    /// (at most [`SNAPSHOT_PERIOD`], at least 1 ms... or less for a timer due sooner).
    fn sleep_budget(&self, now: Instant) -> Duration {
        let mut t = match self.cfg.heartbeat {
            Some(p) => p.saturating_sub(now.duration_since(self.last_heartbeat)),
            None => SNAPSHOT_PERIOD,
        }
        .min(SNAPSHOT_PERIOD)
        .max(Duration::from_millis(1));
        let mono = monotonic_ns();
        if let Some(due) = self.timers.next_due() {
            t = t.min(Duration::from_nanos(due.saturating_sub(mono)));
        }
        if let Some(sent) = self.commits.oldest_ns() {
            let deadline = sent.saturating_add(self.cfg.ack_timeout.as_nanos() as u64);
            t = t.min(Duration::from_nanos(deadline.saturating_sub(mono)));
        }
        if let Some(due) = self.fault_next_due() {
            t = t.min(Duration::from_nanos(due.saturating_sub(mono)));
        }
        t
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
        let mut iter: u32 = 0;
        while !ctl.stop_requested() {
            iter = iter.wrapping_add(1);
            // Control and housekeeping every 64 idle-or-busy iterations: Instant::now()
            // and the atomics stay off the per-record path.
            if iter.is_multiple_of(64) {
                let now = Instant::now();
                if now.duration_since(last_snapshot) >= SNAPSHOT_PERIOD {
                    last_snapshot = now;
                    ctl.publish(self.summary());
                }
                if let Some(p) = ctl.take_swap() {
                    self.swap_policy(p);
                }
                let raw = ctl.take_injections();
                if !raw.is_empty() {
                    for d in raw {
                        self.inject(d);
                    }
                    self.engine.flush();
                }
                self.maybe_heartbeat(now);
                if self.faults.is_some() {
                    self.fault_housekeeping(ctl);
                }
            }
            let n = self.step_with(iter.is_multiple_of(32));
            let Some(budget) = self.cfg.spin_budget else {
                // Pure polling: never sleeps, so no clock read per step.
                std::hint::spin_loop();
                continue;
            };
            if n > 0 {
                last_work = Instant::now();
                continue;
            }
            let keep_spinning = !iter.is_multiple_of(64) || last_work.elapsed() < budget;
            if keep_spinning {
                std::hint::spin_loop();
                continue;
            }
            if self.engine.enable_notifications() {
                // Work raced in while we re-armed: keep going without sleeping.
                self.engine.disable_notifications();
                continue;
            }
            let now = Instant::now();
            self.maybe_heartbeat(now);
            let timeout = self.sleep_budget(now);
            if !timeout.is_zero() {
                if let Err(e) = self.engine.wait_kick(timeout) {
                    log::warn!("{e}");
                }
            }
            self.engine.disable_notifications();
            last_work = Instant::now();
            // Look at control requests right after a wake-up.
            iter = 63;
        }
        if self.cfg.goodbye_on_stop
            && self.session_id != 0
            && self.refused_version.is_none()
            && !ctl.silent_requested()
        {
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
        self.seen_bad_versions =
            self.engine.stats().malformed[crate::queue::Malformed::RecordVersion as usize];
        n
    }
}
