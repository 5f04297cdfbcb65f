//! Fault injection: decisions written to the guest exactly as given, bypassing every check
//! the runtime applies to policy output, so a test can play a buggy or hostile host.

use vm_memory::GuestMemory;

use super::Runtime;
use crate::metrics::monotonic_ns;
use crate::policy::Gtid;
use crate::protocol::{DecisionInfo, Message, RUN_F_PREEMPT};

/// Cookie bit marking decisions written by [`super::RuntimeHandle::inject_decisions`]; the
/// runtime never hands out such cookies itself, so their acks are told apart and counted in
/// [`crate::metrics::Metrics::injected_acks`].
pub const INJECTED_COOKIE: u64 = 1 << 63;

/// Kind of an injected decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// RUN(gtid, cpu, seq, slice_ns).
    Run,
    /// RUN with F_PREEMPT.
    RunPreempt,
    /// PREEMPT(cpu) naming `gtid` as the task expected to run there (`Gtid(0)`: whatever).
    Preempt,
}

/// A decision written to the guest exactly as given, bypassing every check the runtime
/// applies to policy output (task known, seq current, CPU allowed and free). See
/// [`super::RuntimeHandle::inject_decisions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDecision {
    /// RUN or PREEMPT.
    pub kind: RawKind,
    /// Target CPU written in the record (may be out of range).
    pub cpu: u16,
    /// Task.
    pub gtid: Gtid,
    /// Sequence number written in the record (may be stale).
    pub seq: u64,
    /// Slice for RUN (0: the guest's default).
    pub slice_ns: u64,
}

impl RawDecision {
    /// A RUN decision.
    pub fn run(gtid: Gtid, cpu: u16, seq: u64) -> Self {
        RawDecision {
            kind: RawKind::Run,
            cpu,
            gtid,
            seq,
            slice_ns: 0,
        }
    }

    /// A RUN for whatever task holds `pid` when the runtime writes it (a test that only
    /// knows the guest's pid): the runtime fills in that task's generation, or
    /// [`UNKNOWN_GENERATION`] if it knows no task with this pid.
    pub fn run_pid(pid: u32, cpu: u16, seq: u64) -> Self {
        Self::run(Gtid::new(pid, 0), cpu, seq)
    }
}

/// Generation [`RawDecision::run_pid`] uses for a pid the runtime does not know: no task
/// ever gets it within a boot (the guest's counter would have to wrap).
pub const UNKNOWN_GENERATION: u32 = u32::MAX;

impl<M: GuestMemory> Runtime<M> {
    /// Write `d` to the guest as is (testing / fault injection, see [`RawDecision`]). The
    /// record goes to the decision queue of `d.cpu`, or of CPU 0 when `d.cpu` is out of
    /// range. Returns false if the queue's backlog was full.
    pub fn inject(&mut self, d: RawDecision) -> bool {
        self.injected += 1;
        let gtid = if d.gtid.generation() == 0 {
            self.pids
                .get(&d.gtid.pid())
                .copied()
                .unwrap_or(Gtid::new(d.gtid.pid(), UNKNOWN_GENERATION))
        } else {
            d.gtid
        };
        let info = DecisionInfo {
            cpu: d.cpu,
            gtid,
            seq: d.seq,
            slice_ns: d.slice_ns,
            cookie: INJECTED_COOKIE | self.injected,
            ts_ns: monotonic_ns(),
            flags: if d.kind == RawKind::RunPreempt {
                RUN_F_PREEMPT
            } else {
                0
            },
        };
        let rec = match d.kind {
            RawKind::Run | RawKind::RunPreempt => Message::Run(info),
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
}
