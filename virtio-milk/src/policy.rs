//! The `Policy` trait and the scheduler state a policy sees.
//!
//! A policy is pure scheduling logic: the runtime feeds it [`PolicyEvent`]s (after updating
//! its own task and CPU tables) and asks it for [`Decision`]s. It never touches queues,
//! never sees sequence numbers (the runtime stamps every decision with the task's latest
//! seq) and cannot send anything the runtime has not validated.

use std::collections::HashMap;

use crate::protocol::{AckStatus, COMM_LEN};

/// Guest task id (kernel TID).
pub type Pid = u32;

/// What the runtime believes a task is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Not runnable.
    Blocked,
    /// Runnable and not yet dispatched.
    Runnable,
    /// A RUN decision for this CPU is in flight (not acked yet).
    Dispatched(u16),
    /// Running on this CPU (RUN acked OK, or CPU_BUSY named it).
    Running(u16),
}

/// One task in the runtime's table.
#[derive(Clone, Debug)]
pub struct TaskInfo {
    /// Pid.
    pub pid: Pid,
    /// Thread group.
    pub tgid: u32,
    /// Name, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Allowed CPUs, bit n = CPU n.
    pub cpus_allowed: u64,
    /// Load weight.
    pub weight: u32,
    /// Nice.
    pub nice: i32,
    /// Latest sequence number seen.
    pub seq: u64,
    /// State.
    pub state: TaskState,
    /// CPU of the task's latest event.
    pub last_cpu: u16,
    /// Host monotonic ns when the task last became runnable (latency start).
    pub runnable_since_ns: u64,
}

impl TaskInfo {
    /// Whether `cpu` is in the task's allowed mask.
    pub fn allows(&self, cpu: u16) -> bool {
        cpu < 64 && self.cpus_allowed & (1u64 << cpu) != 0
    }
}

/// What the runtime believes a CPU is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuState {
    /// No information yet (no CPU_IDLE seen).
    Unknown,
    /// Idle, nothing dispatched to it.
    Idle,
    /// A RUN for this task is in flight.
    Committed(Pid),
    /// Running this task (0: a task the host does not schedule).
    Running(Pid),
}

/// The runtime's tables, read-only for policies.
#[derive(Clone, Debug, Default)]
pub struct SchedView {
    /// Known tasks.
    pub tasks: HashMap<Pid, TaskInfo>,
    /// One entry per guest CPU.
    pub cpus: Vec<CpuState>,
}

impl SchedView {
    /// An empty view for `num_cpus` CPUs.
    pub fn new(num_cpus: u32) -> Self {
        SchedView {
            tasks: HashMap::new(),
            cpus: vec![CpuState::Unknown; num_cpus as usize],
        }
    }

    /// A task by pid.
    pub fn task(&self, pid: Pid) -> Option<&TaskInfo> {
        self.tasks.get(&pid)
    }

    /// Number of CPUs.
    pub fn num_cpus(&self) -> u16 {
        self.cpus.len() as u16
    }

    /// Whether the CPU can take a RUN now.
    pub fn cpu_is_free(&self, cpu: u16) -> bool {
        self.cpus.get(usize::from(cpu)) == Some(&CpuState::Idle)
    }

    /// CPUs that can take a RUN now, ascending.
    pub fn free_cpus(&self) -> impl Iterator<Item = u16> + '_ {
        self.cpus
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == CpuState::Idle)
            .map(|(i, _)| i as u16)
    }
}

/// Why a task became runnable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunnableReason {
    /// TASK_WAKEUP.
    Wakeup,
    /// TASK_PREEMPT.
    Preempted,
    /// TASK_YIELD.
    Yielded,
    /// A RUN for it failed and the task is still runnable (retry).
    Requeued,
}

/// What a policy is told, after the runtime updated its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyEvent {
    /// TASK_NEW (task is Blocked until its first wakeup).
    TaskNew(Pid),
    /// The task is runnable.
    TaskRunnable {
        /// Task.
        pid: Pid,
        /// CPU of the event.
        cpu: u16,
        /// Why.
        reason: RunnableReason,
    },
    /// The task blocked.
    TaskBlocked(Pid),
    /// The task is gone (already removed from the view).
    TaskDead(Pid),
    /// Allowed CPUs changed.
    TaskAffinity(Pid),
    /// Weight/nice changed.
    TaskPriority(Pid),
    /// A CPU became free.
    CpuIdle(u16),
    /// A CPU is busy with something.
    CpuBusy(u16),
    /// A decision was acknowledged.
    Ack {
        /// Task.
        pid: Pid,
        /// Target CPU.
        cpu: u16,
        /// Outcome.
        status: AckStatus,
    },
}

/// What a policy may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run `pid` on `cpu` for `slice_ns` (0: guest default).
    Run {
        /// Task.
        pid: Pid,
        /// CPU.
        cpu: u16,
        /// Slice.
        slice_ns: u64,
    },
    /// Preempt whatever runs on `cpu`.
    Preempt {
        /// CPU.
        cpu: u16,
    },
}

/// A host scheduling policy. See the module documentation.
pub trait Policy: Send {
    /// Registry name, e.g. "fifo".
    fn name(&self) -> &str;

    /// (Re)build internal state from the runtime's tables. Called when the policy is
    /// installed (start or swap) and when the guest starts a new session.
    fn attach(&mut self, view: &SchedView);

    /// React to one event; `view` already reflects it.
    fn on_event(&mut self, ev: &PolicyEvent, view: &SchedView);

    /// Emit decisions into `out`. Called after each batch of events.
    fn schedule(&mut self, view: &SchedView, out: &mut Vec<Decision>);
}
