//! The runtime's [`DecisionSink`]: validates a policy's decision against the tables,
//! stamps it with the task's latest seq and a cookie, queues the record and records the
//! commitment. Nothing a policy asks for reaches the guest without passing here.

use vm_memory::GuestMemory;

use super::acks::{Commit, Commitments};
use super::timers::Timers;
use super::RuntimeConfig;
use crate::metrics::Metrics;
use crate::policy::{
    CpuState, Decision, DecisionId, DecisionKind, DecisionSink, Gtid, Reject, SchedView, TaskState,
};
use crate::protocol::{DecisionInfo, Message, RUN_F_PREEMPT};
use crate::queue::QueueEngine;

/// Borrowed runtime parts a [`crate::policy::Dispatcher`] sends through.
pub(super) struct Sink<'a, M: GuestMemory> {
    pub engine: &'a mut QueueEngine<M>,
    pub commits: &'a mut Commitments,
    pub timers: &'a mut Timers,
    pub metrics: &'a mut Metrics,
    pub cfg: &'a RuntimeConfig,
    pub epoch: u64,
}

impl<M: GuestMemory> Sink<'_, M> {
    fn reject(&mut self, r: Reject) -> Result<DecisionId, Reject> {
        self.metrics.policy_rejects += 1;
        Err(r)
    }

    fn run(
        &mut self,
        view: &mut SchedView,
        gtid: Gtid,
        cpu: u16,
        slice_ns: u64,
        preempt: bool,
    ) -> Result<DecisionId, Reject> {
        let c = usize::from(cpu);
        let Some(cpu_info) = view.cpus.get(c) else {
            return self.reject(Reject::BadCpu);
        };
        let free = cpu_info.state == CpuState::Idle && cpu_info.pending.is_empty();
        let state = cpu_info.state;
        let pending = cpu_info.pending.len();
        let Some(t) = view.tasks.get(&gtid) else {
            return self.reject(Reject::NoTask);
        };
        if !t.allows(cpu) {
            return self.reject(Reject::BadCpu);
        }
        if t.state != TaskState::Runnable {
            return self.reject(Reject::NotRunnable);
        }
        if state == CpuState::Released || pending >= self.cfg.max_staged {
            return self.reject(Reject::CpuBusy);
        }
        let kind = if preempt {
            DecisionKind::RunPreempt
        } else if free {
            DecisionKind::Run
        } else {
            DecisionKind::Staged
        };
        let seq = t.seq;
        let since = t.runnable_since_ns;
        let now = view.now_ns;
        let cookie = self.commits.alloc_cookie();
        let rec = Message::Run(DecisionInfo {
            cpu,
            gtid,
            seq,
            ts_ns: now,
            slice_ns: if slice_ns == 0 {
                self.cfg.default_slice_ns
            } else {
                slice_ns
            },
            cookie,
            flags: if preempt { RUN_F_PREEMPT } else { 0 },
        });
        if !self.engine.push_decision(cpu, rec.encode()) {
            self.metrics.queue_full += 1;
            return Err(Reject::QueueFull);
        }
        if let Some(t) = view.tasks.get_mut(&gtid) {
            t.state = TaskState::Dispatched(cpu);
        }
        let ci = &mut view.cpus[c];
        ci.pending.push(gtid);
        if kind == DecisionKind::Run {
            ci.state = CpuState::Committed(gtid);
        }
        self.commits.add(
            cpu,
            Commit {
                cookie,
                kind,
                gtid,
                seq,
                sent_ns: now,
                epoch: self.epoch,
            },
        );
        match kind {
            DecisionKind::Staged => self.metrics.decisions_staged += 1,
            DecisionKind::RunPreempt => self.metrics.decisions_run_preempt += 1,
            _ => {}
        }
        self.metrics.decisions_run += 1;
        self.metrics.latency.record(now.saturating_sub(since));
        Ok(DecisionId(cookie))
    }

    fn preempt(&mut self, view: &mut SchedView, cpu: u16) -> Result<DecisionId, Reject> {
        if usize::from(cpu) >= view.cpus.len() {
            return self.reject(Reject::BadCpu);
        }
        let gtid = match view.cpu_state(cpu) {
            CpuState::Running(g) => g,
            CpuState::Committed(g) => g,
            _ => return self.reject(Reject::CpuBusy),
        };
        let now = view.now_ns;
        let cookie = self.commits.alloc_cookie();
        let rec = Message::Preempt(DecisionInfo {
            cpu,
            gtid,
            seq: 0,
            ts_ns: now,
            slice_ns: 0,
            cookie,
            flags: 0,
        });
        if !self.engine.push_decision(cpu, rec.encode()) {
            self.metrics.queue_full += 1;
            return Err(Reject::QueueFull);
        }
        self.commits.add(
            cpu,
            Commit {
                cookie,
                kind: DecisionKind::Preempt,
                gtid,
                seq: 0,
                sent_ns: now,
                epoch: self.epoch,
            },
        );
        self.metrics.decisions_preempt += 1;
        Ok(DecisionId(cookie))
    }
}

impl<M: GuestMemory> DecisionSink for Sink<'_, M> {
    fn submit(&mut self, view: &mut SchedView, d: Decision) -> Result<DecisionId, Reject> {
        match d {
            Decision::Run {
                gtid,
                cpu,
                slice_ns,
                preempt,
            } => self.run(view, gtid, cpu, slice_ns, preempt),
            Decision::Preempt { cpu } => self.preempt(view, cpu),
        }
    }

    fn set_timer(&mut self, at_ns: u64, token: u64) {
        self.timers.set(at_ns, token);
    }

    fn max_staged(&self) -> usize {
        self.cfg.max_staged
    }
}
