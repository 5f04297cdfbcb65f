//! CPU events: idle, busy, tick, release to and acquire from a higher sched class. A
//! CPU_IDLE or CPU_BUSY also resolves that CPU's commitments older than `ack_grace`: the
//! guest moved on without acknowledging them.

use vm_memory::GuestMemory;

use super::Runtime;
use crate::policy::{CpuState, Gtid, PolicyEvent, TaskState};
use crate::protocol::{CpuEventKind, EventInfo};

impl<M: GuestMemory> Runtime<M> {
    pub(super) fn on_cpu_event(&mut self, kind: CpuEventKind, e: EventInfo, now: u64) {
        let cpu = e.cpu;
        let c = usize::from(cpu);
        match kind {
            CpuEventKind::Idle | CpuEventKind::Busy => {
                let grace = self.cfg.ack_grace.as_nanos() as u64;
                let keep = if kind == CpuEventKind::Busy {
                    e.gtid
                } else {
                    Gtid(0)
                };
                let old = self
                    .commits
                    .take_older(cpu, now.saturating_sub(grace), keep);
                for commit in old {
                    self.metrics.commits_resolved_by_cpu_event += 1;
                    self.resolve_lost(cpu, commit);
                }
                let s = &mut self.view.cpus[c];
                if !s.pending.is_empty() {
                    // A RUN in flight stays committed until its ack arrives.
                    return;
                }
                if s.state == CpuState::Released {
                    return;
                }
                if kind == CpuEventKind::Idle {
                    s.state = CpuState::Idle;
                    self.events.push(PolicyEvent::CpuIdle(cpu));
                } else {
                    s.state = CpuState::Running(e.gtid);
                    self.events.push(PolicyEvent::CpuBusy(cpu));
                }
            }
            CpuEventKind::Tick => {
                self.metrics.ticks += 1;
                if let Some(t) = self.view.tasks.get_mut(&e.gtid) {
                    t.runtime_ns = t.runtime_ns.max(e.runtime_ns);
                    // Ground truth: this task runs here now.
                    if t.state == TaskState::Runnable {
                        t.state = TaskState::Running(cpu);
                        t.running_since_ns = now;
                    }
                }
                let s = &mut self.view.cpus[c];
                if s.pending.is_empty() && s.state != CpuState::Released {
                    s.state = CpuState::Running(e.gtid);
                }
                self.events.push(PolicyEvent::Tick {
                    cpu,
                    gtid: e.gtid,
                    runtime_ns: e.runtime_ns,
                    slice_ns: e.slice_ns,
                });
            }
            CpuEventKind::Release => {
                self.view.cpus[c].state = CpuState::Released;
                self.events.push(PolicyEvent::CpuReleased(cpu));
            }
            CpuEventKind::Acquire => {
                let s = &mut self.view.cpus[c];
                s.state = match s.pending.first() {
                    Some(&g) => CpuState::Committed(g),
                    None => CpuState::Idle,
                };
                self.events.push(PolicyEvent::CpuAcquired(cpu));
            }
        }
    }
}
