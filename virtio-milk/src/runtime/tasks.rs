//! The task table: keyed by gtid, updated by task events whose seq is newer than the
//! task's last one. A pid reused with a new generation is a different task (the old entry
//! is evicted), so a late TASK_DEAD of the old task cannot delete the new one.

use vm_memory::GuestMemory;

use super::Runtime;
use crate::policy::{CpuState, Gtid, PolicyEvent, RunnableReason, TaskInfo, TaskState};
use crate::protocol::{AffinityInfo, EventInfo, PriorityInfo, TaskEventKind, TaskNewInfo};

impl<M: GuestMemory> Runtime<M> {
    pub(super) fn on_task_new(&mut self, t: TaskNewInfo, now: u64) {
        if let Some(old) = self.view.tasks.get(&t.gtid) {
            if t.seq <= old.seq {
                self.metrics.stale_events += 1;
                return;
            }
        }
        if let Some(&old) = self.pids.get(&t.gtid.pid()) {
            if old.generation() > t.gtid.generation() {
                // An older generation of a pid a newer task holds: that task was
                // created after it, so this record is late (or hostile). Accepting it as a
                // pid reuse would delete the live task and revive a gtid whose RUNs may
                // still be out (found by the runtime fuzz target).
                self.metrics.stale_events += 1;
                return;
            }
            if old != t.gtid {
                // The pid was freed and reused: the old task is gone even if its
                // TASK_DEAD is still on its way (it will find nothing to delete).
                self.metrics.pid_reuse += 1;
                self.remove_task(old);
                self.events.push(PolicyEvent::TaskDead(old));
            }
        }
        self.pids.insert(t.gtid.pid(), t.gtid);
        self.view.tasks.insert(
            t.gtid,
            TaskInfo {
                gtid: t.gtid,
                tgid: t.tgid,
                comm: t.comm,
                cpus_allowed: t.cpus_allowed,
                weight: t.weight,
                nice: t.nice,
                seq: t.seq,
                state: TaskState::Blocked,
                last_cpu: t.cpu,
                runnable_since_ns: now,
                runtime_ns: 0,
                running_since_ns: 0,
            },
        );
        self.events.push(PolicyEvent::TaskNew(t.gtid));
    }

    pub(super) fn on_task_event(&mut self, kind: TaskEventKind, e: EventInfo, now: u64) {
        let gtid = e.gtid;
        let Some(t) = self.fresh_task(gtid, e.seq) else {
            return;
        };
        let prev = t.state;
        t.last_cpu = e.cpu;
        t.runtime_ns = t.runtime_ns.max(e.runtime_ns);
        let runtime_ns = t.runtime_ns;
        match kind {
            TaskEventKind::Wakeup | TaskEventKind::Preempt | TaskEventKind::Yield => {
                t.state = TaskState::Runnable;
                t.runnable_since_ns = now;
                let reason = match kind {
                    TaskEventKind::Wakeup => RunnableReason::Wakeup,
                    TaskEventKind::Preempt => RunnableReason::Preempted,
                    _ => RunnableReason::Yielded,
                };
                self.free_cpu_of(gtid, prev);
                self.events.push(PolicyEvent::TaskRunnable {
                    gtid,
                    cpu: e.cpu,
                    reason,
                    runtime_ns,
                });
            }
            TaskEventKind::Blocked => {
                t.state = TaskState::Blocked;
                self.free_cpu_of(gtid, prev);
                self.events
                    .push(PolicyEvent::TaskBlocked { gtid, runtime_ns });
            }
            TaskEventKind::Dead | TaskEventKind::Departed => {
                self.remove_task(gtid);
                self.free_cpu_of(gtid, prev);
                if kind == TaskEventKind::Dead {
                    self.events.push(PolicyEvent::TaskDead(gtid));
                } else {
                    self.metrics.departed += 1;
                    self.events.push(PolicyEvent::TaskDeparted(gtid));
                }
            }
            TaskEventKind::Running | TaskEventKind::Fallback => {
                t.state = TaskState::Running(e.cpu);
                t.running_since_ns = now;
                if prev != TaskState::Running(e.cpu) {
                    self.free_cpu_of(gtid, prev);
                }
                let fallback = kind == TaskEventKind::Fallback;
                if fallback {
                    self.metrics.fallbacks_reported += 1;
                }
                if let Some(c) = self.view.cpus.get_mut(usize::from(e.cpu)) {
                    if c.state != CpuState::Released {
                        c.state = CpuState::Running(gtid);
                    }
                }
                self.events.push(PolicyEvent::TaskRunning {
                    gtid,
                    cpu: e.cpu,
                    fallback,
                });
            }
        }
    }

    pub(super) fn on_affinity(&mut self, a: AffinityInfo) {
        if let Some(t) = self.fresh_task(a.gtid, a.seq) {
            t.cpus_allowed = a.cpus_allowed;
            self.events.push(PolicyEvent::TaskAffinity(a.gtid));
        }
    }

    pub(super) fn on_priority(&mut self, p: PriorityInfo) {
        if let Some(t) = self.fresh_task(p.gtid, p.seq) {
            t.weight = p.weight;
            t.nice = p.nice;
            self.events.push(PolicyEvent::TaskPriority(p.gtid));
        }
    }

    /// Drop a task from the table and the pid index.
    pub(super) fn remove_task(&mut self, gtid: Gtid) {
        if let Some(t) = self.view.tasks.remove(&gtid) {
            self.free_cpu_of(gtid, t.state);
        }
        if self.pids.get(&gtid.pid()) == Some(&gtid) {
            self.pids.remove(&gtid.pid());
        }
    }

    /// The task stopped running where the host thought it ran: that CPU is idle unless
    /// RUNs are on their way to it.
    pub(super) fn free_cpu_of(&mut self, gtid: Gtid, prev: TaskState) {
        if let TaskState::Running(c) = prev {
            if let Some(s) = self.view.cpus.get_mut(usize::from(c)) {
                if s.state == CpuState::Running(gtid) {
                    s.state = match s.pending.first() {
                        // A staged RUN runs next (its ack will say so).
                        Some(&next) => CpuState::Committed(next),
                        None => CpuState::Idle,
                    };
                    if s.pending.is_empty() {
                        self.events.push(PolicyEvent::CpuIdle(c));
                    }
                }
            }
        }
    }

    /// Check and record a task event's seq; returns the task if the event is newer.
    pub(super) fn fresh_task(&mut self, gtid: Gtid, seq: u64) -> Option<&mut TaskInfo> {
        let Some(t) = self.view.tasks.get_mut(&gtid) else {
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
}
