//! The `Policy` trait (API v2) and the scheduler state a policy sees.
//!
//! A policy is pure scheduling logic, written as ordinary Rust. The runtime keeps the task
//! and CPU tables ([`SchedView`]), feeds the policy [`PolicyEvent`]s (after updating the
//! tables), then calls [`Policy::schedule`] with a [`Dispatcher`] through which the policy
//! issues decisions. The flow follows scx_rustland_core (dequeue -> select a CPU ->
//! dispatch, each dispatch returning a `Result`) and ghOSt (every decision is a
//! transaction whose commit status comes back to the agent):
//!
//! - [`Dispatcher::run`]: RUN a runnable task on a CPU with a slice. To an idle CPU it runs
//!   at once; to a busy CPU it is *staged*: the guest latches it and dispatches it at that
//!   CPU's next `dispatch()` (several may be staged per CPU, up to
//!   [`Dispatcher::max_staged`]), so the CPU does not wait a round trip.
//! - [`Dispatcher::run_preempt`]: RUN with `F_PREEMPT`, the target CPU's current task is
//!   preempted now (it comes back as [`PolicyEvent::TaskRunnable`] with
//!   [`RunnableReason::Preempted`]).
//! - [`Dispatcher::preempt`]: take a CPU from its task.
//! - [`Dispatcher::set_timer`]: be called back ([`PolicyEvent::Timer`]) at a host time.
//!
//! Each accepted decision gets a [`DecisionId`]; its outcome arrives later as
//! [`PolicyEvent::Outcome`] (the guest's ACK status, or [`Outcome::Lost`] when the runtime
//! gave up waiting for the ack). A rejected one returns a [`Reject`] and nothing is sent.
//! A policy never sees sequence numbers: the runtime stamps every decision with the task's
//! latest seq (the guest's barrier) and validates everything it sends.
//!
//! Subscriptions ([`Policy::subscriptions`]) ask the guest for CPU ticks and TASK_RUNNING
//! records; runtime accounting (`runtime_ns`) comes with every event that carries it.

use std::collections::HashMap;

use crate::protocol::{AckStatus, COMM_LEN};

pub use crate::protocol::Gtid;

/// What the runtime believes a task is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Not runnable.
    Blocked,
    /// Runnable and not yet dispatched.
    Runnable,
    /// A RUN for this CPU is in flight (sent, not acked yet; possibly staged).
    Dispatched(u16),
    /// Running on this CPU (RUN acked OK, TASK_FALLBACK, TASK_RUNNING or CPU_BUSY named it).
    Running(u16),
}

/// One task in the runtime's table.
#[derive(Clone, Debug)]
pub struct TaskInfo {
    /// Identity (pid + generation).
    pub gtid: Gtid,
    /// Thread group.
    pub tgid: u32,
    /// Name, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Allowed CPUs, bit n = CPU n.
    pub cpus_allowed: u64,
    /// Load weight (1..10000, 100 = nice 0).
    pub weight: u32,
    /// Nice.
    pub nice: i32,
    /// Latest sequence number seen.
    pub seq: u64,
    /// State.
    pub state: TaskState,
    /// CPU of the task's latest event (`task_cpu(p)`).
    pub last_cpu: u16,
    /// Host monotonic ns when the task last became runnable (latency start).
    pub runnable_since_ns: u64,
    /// The task's total CPU time as of its latest event that carried it.
    pub runtime_ns: u64,
    /// Host monotonic ns when the task last started running (as far as the host knows).
    pub running_since_ns: u64,
}

impl TaskInfo {
    /// A blocked task with default properties (weight 100, all of `cpus_allowed`).
    pub fn new(gtid: Gtid, cpus_allowed: u64) -> Self {
        TaskInfo {
            gtid,
            tgid: gtid.pid(),
            comm: [0; COMM_LEN],
            cpus_allowed,
            weight: 100,
            nice: 0,
            seq: 1,
            state: TaskState::Blocked,
            last_cpu: 0,
            runnable_since_ns: 0,
            runtime_ns: 0,
            running_since_ns: 0,
        }
    }

    /// Whether `cpu` is in the task's allowed mask.
    pub fn allows(&self, cpu: u16) -> bool {
        cpu < 64 && self.cpus_allowed & (1u64 << cpu) != 0
    }
}

/// What the runtime believes a CPU is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuState {
    /// No information yet.
    Unknown,
    /// Idle, nothing dispatched to it.
    Idle,
    /// A RUN for this task was sent to the idle CPU and is not acked yet.
    Committed(Gtid),
    /// Running this task (`Gtid(0)`: a task the host does not schedule).
    Running(Gtid),
    /// A higher sched class holds the CPU (CPU_RELEASE until CPU_ACQUIRE).
    Released,
}

/// One CPU in the runtime's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuInfo {
    /// State.
    pub state: CpuState,
    /// RUNs sent to this CPU and not acked yet (committed + staged), oldest first.
    pub pending: Vec<Gtid>,
}

impl Default for CpuInfo {
    fn default() -> Self {
        CpuInfo {
            state: CpuState::Unknown,
            pending: Vec::new(),
        }
    }
}

/// What the guest granted of the policy's [`Subscriptions`] (its HELLO reply).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Granted {
    /// CPU_TICK period in us (0: no ticks).
    pub tick_us: u32,
    /// TASK_RUNNING records.
    pub running: bool,
}

/// The runtime's tables, read-only for policies.
#[derive(Clone, Debug, Default)]
pub struct SchedView {
    /// Known tasks by gtid.
    pub tasks: HashMap<Gtid, TaskInfo>,
    /// One entry per guest CPU.
    pub cpus: Vec<CpuInfo>,
    /// What the guest granted of the subscriptions.
    pub granted: Granted,
    /// Host monotonic ns of the current batch.
    pub now_ns: u64,
}

impl SchedView {
    /// An empty view for `num_cpus` CPUs.
    pub fn new(num_cpus: u32) -> Self {
        SchedView {
            tasks: HashMap::new(),
            cpus: vec![CpuInfo::default(); num_cpus as usize],
            granted: Granted::default(),
            now_ns: 0,
        }
    }

    /// A task by gtid.
    pub fn task(&self, gtid: Gtid) -> Option<&TaskInfo> {
        self.tasks.get(&gtid)
    }

    /// Number of CPUs.
    pub fn num_cpus(&self) -> u16 {
        self.cpus.len() as u16
    }

    /// A CPU's state (`Unknown` if out of range).
    pub fn cpu_state(&self, cpu: u16) -> CpuState {
        self.cpus
            .get(usize::from(cpu))
            .map_or(CpuState::Unknown, |c| c.state)
    }

    /// RUNs in flight to `cpu` (committed or staged).
    pub fn pending_runs(&self, cpu: u16) -> usize {
        self.cpus
            .get(usize::from(cpu))
            .map_or(0, |c| c.pending.len())
    }

    /// Whether the CPU is idle with nothing sent to it: a RUN there starts at once.
    pub fn cpu_is_free(&self, cpu: u16) -> bool {
        self.cpus
            .get(usize::from(cpu))
            .is_some_and(|c| c.state == CpuState::Idle && c.pending.is_empty())
    }

    /// CPUs that can take a RUN now, ascending.
    pub fn free_cpus(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.num_cpus()).filter(|&c| self.cpu_is_free(c))
    }

    /// The task the host believes runs on `cpu`, if it schedules it.
    pub fn running_on(&self, cpu: u16) -> Option<Gtid> {
        match self.cpu_state(cpu) {
            CpuState::Running(g) if g != Gtid(0) => Some(g),
            _ => None,
        }
    }
}

/// Why a task became runnable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnableReason {
    /// TASK_WAKEUP (woken up, first enqueue, or re-enqueue after a property change).
    Wakeup,
    /// TASK_PREEMPT (slice end, host preemption, higher class, other).
    Preempted,
    /// TASK_YIELD.
    Yielded,
    /// A RUN for it failed or was lost and the task is still runnable (retry).
    Requeued,
}

/// Host-side id of one accepted decision; its [`PolicyEvent::Outcome`] carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DecisionId(pub u64);

/// Kind of a decision, as told back in its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    /// RUN to a CPU that was free.
    Run,
    /// RUN to a busy CPU, latched by the guest until that CPU's next dispatch.
    Staged,
    /// RUN with F_PREEMPT.
    RunPreempt,
    /// PREEMPT.
    Preempt,
}

/// What became of a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest acknowledged it with this status (OK: the task started running).
    Acked(AckStatus),
    /// No ack arrived in time, or CPU events showed the CPU moved on: the runtime
    /// stopped waiting (the task, if still waiting, was made runnable again).
    Lost,
}

/// What a policy is told, after the runtime updated its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    /// TASK_NEW (task is Blocked until its first wakeup).
    TaskNew(Gtid),
    /// The task is runnable and waits for a RUN.
    TaskRunnable {
        /// Task.
        gtid: Gtid,
        /// `task_cpu(p)`.
        cpu: u16,
        /// Why.
        reason: RunnableReason,
        /// The task's total CPU time (0 if not carried).
        runtime_ns: u64,
    },
    /// The task blocked.
    TaskBlocked {
        /// Task.
        gtid: Gtid,
        /// Its total CPU time.
        runtime_ns: u64,
    },
    /// The task exited (already removed from the view).
    TaskDead(Gtid),
    /// The task left sched_ext for another class (already removed from the view).
    TaskDeparted(Gtid),
    /// The task started running on `cpu` (TASK_RUNNING, or the guest's own dispatch).
    TaskRunning {
        /// Task.
        gtid: Gtid,
        /// CPU.
        cpu: u16,
        /// The guest dispatched it itself (TASK_FALLBACK), not a host decision.
        fallback: bool,
    },
    /// Allowed CPUs changed.
    TaskAffinity(Gtid),
    /// Weight/nice changed.
    TaskPriority(Gtid),
    /// A CPU became free.
    CpuIdle(u16),
    /// A CPU is busy with something.
    CpuBusy(u16),
    /// Periodic tick of a CPU (subscribed with [`Subscriptions::tick_us`]).
    Tick {
        /// CPU.
        cpu: u16,
        /// Its current task (`Gtid(0)` if none the host schedules).
        gtid: Gtid,
        /// The task's total CPU time.
        runtime_ns: u64,
        /// Its slice left.
        slice_ns: u64,
    },
    /// A higher sched class took the CPU.
    CpuReleased(u16),
    /// The CPU is back for sched_ext.
    CpuAcquired(u16),
    /// A timer set with [`Dispatcher::set_timer`] expired.
    Timer {
        /// The token given to `set_timer`.
        token: u64,
        /// When it was due (host monotonic ns).
        due_ns: u64,
    },
    /// What became of a decision this policy made.
    Outcome {
        /// The decision.
        id: DecisionId,
        /// Its kind.
        kind: DecisionKind,
        /// Task (PREEMPT: the task expected to run there, or `Gtid(0)`).
        gtid: Gtid,
        /// Target CPU.
        cpu: u16,
        /// Ack status, or lost.
        outcome: Outcome,
    },
}

/// What a policy asks the guest to report beyond the basic events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Subscriptions {
    /// CPU_TICK period in us (0: no ticks). The guest rate-limits it to its own minimum.
    pub tick_us: u32,
    /// TASK_RUNNING records whenever a task starts running.
    pub running: bool,
}

/// Why a decision was refused (nothing was sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    /// No such task.
    #[error("unknown task")]
    NoTask,
    /// The task is not runnable (blocked, running, or already dispatched).
    #[error("task not runnable")]
    NotRunnable,
    /// The CPU does not exist or is not in the task's allowed mask.
    #[error("cpu not allowed")]
    BadCpu,
    /// The CPU cannot take this decision now (too many staged RUNs, released to a
    /// higher class, or nothing to preempt).
    #[error("cpu busy")]
    CpuBusy,
    /// The decision queue's backlog is full.
    #[error("decision queue full")]
    QueueFull,
    /// The decision comes from a policy that is no longer installed.
    #[error("stale policy")]
    StalePolicy,
}

/// One decision as the policy asks for it (also the form external agents submit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// RUN `gtid` on `cpu` for `slice_ns` (0: the runtime's default); staged if the CPU is
    /// busy; with `preempt`, the CPU's current task is preempted now.
    Run {
        /// Task.
        gtid: Gtid,
        /// CPU.
        cpu: u16,
        /// Slice.
        slice_ns: u64,
        /// F_PREEMPT.
        preempt: bool,
    },
    /// Take `cpu` from its current task.
    Preempt {
        /// CPU.
        cpu: u16,
    },
}

/// The runtime's side of a [`Dispatcher`]: validation, state change and sending.
pub trait DecisionSink {
    /// Validate `d`, update the tables and queue it; returns its id.
    fn submit(&mut self, view: &mut SchedView, d: Decision) -> Result<DecisionId, Reject>;
    /// Call the policy back at host time `at_ns` with `token`.
    fn set_timer(&mut self, at_ns: u64, token: u64);
    /// Most RUNs that may be in flight to one CPU (committed + staged).
    fn max_staged(&self) -> usize;
}

/// Handed to [`Policy::schedule`]: read the tables, issue decisions.
pub struct Dispatcher<'a> {
    view: &'a mut SchedView,
    sink: &'a mut dyn DecisionSink,
}

impl<'a> Dispatcher<'a> {
    /// A dispatcher over the runtime's tables and decision sink.
    pub fn new(view: &'a mut SchedView, sink: &'a mut dyn DecisionSink) -> Self {
        Dispatcher { view, sink }
    }

    /// The tables, with every decision issued so far applied.
    pub fn view(&self) -> &SchedView {
        self.view
    }

    /// Host monotonic ns of this batch.
    pub fn now_ns(&self) -> u64 {
        self.view.now_ns
    }

    /// Most RUNs in flight to one CPU (the one that runs next plus staged ones).
    pub fn max_staged(&self) -> usize {
        self.sink.max_staged()
    }

    /// Issue any decision.
    pub fn submit(&mut self, d: Decision) -> Result<DecisionId, Reject> {
        self.sink.submit(self.view, d)
    }

    /// RUN `gtid` on `cpu` (staged if the CPU is busy). `slice_ns` 0: runtime default.
    pub fn run(&mut self, gtid: Gtid, cpu: u16, slice_ns: u64) -> Result<DecisionId, Reject> {
        self.submit(Decision::Run {
            gtid,
            cpu,
            slice_ns,
            preempt: false,
        })
    }

    /// RUN `gtid` on `cpu` now, preempting the CPU's current task.
    pub fn run_preempt(
        &mut self,
        gtid: Gtid,
        cpu: u16,
        slice_ns: u64,
    ) -> Result<DecisionId, Reject> {
        self.submit(Decision::Run {
            gtid,
            cpu,
            slice_ns,
            preempt: true,
        })
    }

    /// Take `cpu` from its current task.
    pub fn preempt(&mut self, cpu: u16) -> Result<DecisionId, Reject> {
        self.submit(Decision::Preempt { cpu })
    }

    /// Be called back with [`PolicyEvent::Timer`] at host monotonic time `at_ns`.
    pub fn set_timer(&mut self, at_ns: u64, token: u64) {
        self.sink.set_timer(at_ns, token);
    }
}

/// A host scheduling policy. See the module documentation.
pub trait Policy: Send {
    /// Registry name, e.g. "fifo".
    fn name(&self) -> &str;

    /// What to ask the guest for in the HELLO (ticks, TASK_RUNNING).
    fn subscriptions(&self) -> Subscriptions {
        Subscriptions::default()
    }

    /// (Re)build internal state from the runtime's tables. Called when the policy is
    /// installed (start or swap) and when the guest starts a new session.
    fn attach(&mut self, view: &SchedView);

    /// React to one event; `view` already reflects it.
    fn on_event(&mut self, ev: &PolicyEvent, view: &SchedView);

    /// Issue decisions. Called after each batch of events (and after timers fire).
    fn schedule(&mut self, d: &mut Dispatcher<'_>);
}
