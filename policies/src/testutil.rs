//! Test helpers: hand-built views and a decision sink that applies decisions to the view the
//! way the runtime does (task dispatched, CPU committed or RUN staged), without queues.

use virtio_milk::policy::{
    CpuInfo, CpuState, Decision, DecisionId, DecisionSink, Gtid, Policy, PolicyEvent, Reject,
    RunnableReason, SchedView, TaskInfo, TaskState,
};

/// A task in `state` allowed on `mask`, runnable since `since`.
pub fn task(gtid: Gtid, state: TaskState, mask: u64, since: u64) -> TaskInfo {
    let mut t = TaskInfo::new(gtid, mask);
    t.state = state;
    t.runnable_since_ns = since;
    t
}

/// A view with these CPU states and tasks.
pub fn view(cpus: Vec<CpuState>, tasks: Vec<TaskInfo>) -> SchedView {
    let mut v = SchedView::new(cpus.len() as u32);
    for (c, s) in v.cpus.iter_mut().zip(cpus) {
        *c = CpuInfo {
            state: s,
            pending: Vec::new(),
        };
    }
    v.tasks = tasks.into_iter().map(|t| (t.gtid, t)).collect();
    v
}

/// Tell `p` that `gtid` woke up.
pub fn wake(p: &mut dyn Policy, v: &SchedView, gtid: Gtid) {
    p.on_event(
        &PolicyEvent::TaskRunnable {
            gtid,
            cpu: 0,
            reason: RunnableReason::Wakeup,
            runtime_ns: 0,
        },
        v,
    );
}

/// Accepts what the runtime would accept and records it.
#[derive(Default)]
pub struct SimSink {
    /// Every accepted decision.
    pub decisions: Vec<Decision>,
    /// Timers set as (at, token).
    pub timers: Vec<(u64, u64)>,
}

impl SimSink {
    /// Accepted RUNs as (gtid, cpu).
    pub fn runs(&self) -> Vec<(Gtid, u16)> {
        self.decisions
            .iter()
            .filter_map(|d| match *d {
                Decision::Run { gtid, cpu, .. } => Some((gtid, cpu)),
                _ => None,
            })
            .collect()
    }
}

impl DecisionSink for SimSink {
    fn submit(&mut self, view: &mut SchedView, d: Decision) -> Result<DecisionId, Reject> {
        if let Decision::Run { gtid, cpu, .. } = d {
            let c = view.cpus.get(usize::from(cpu)).ok_or(Reject::BadCpu)?;
            let free = c.state == CpuState::Idle && c.pending.is_empty();
            if c.pending.len() >= self.max_staged() {
                return Err(Reject::CpuBusy);
            }
            let t = view.tasks.get_mut(&gtid).ok_or(Reject::NoTask)?;
            if !t.allows(cpu) {
                return Err(Reject::BadCpu);
            }
            if t.state != TaskState::Runnable {
                return Err(Reject::NotRunnable);
            }
            t.state = TaskState::Dispatched(cpu);
            let c = &mut view.cpus[usize::from(cpu)];
            c.pending.push(gtid);
            if free {
                c.state = CpuState::Committed(gtid);
            }
        }
        self.decisions.push(d);
        Ok(DecisionId(self.decisions.len() as u64))
    }

    fn set_timer(&mut self, at_ns: u64, token: u64) {
        self.timers.push((at_ns, token));
    }

    fn max_staged(&self) -> usize {
        2
    }
}
