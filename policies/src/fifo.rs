//! Centralized global FIFO, the analogue of ghOSt's `fifo` (centralized) agent.
//!
//! One global run queue in wakeup order. Whenever a CPU is free, the oldest runnable task
//! allowed on it is sent there. A RUN that fails (stale, bad CPU) puts the task back at the
//! head, so a retry does not lose its place.

use std::collections::{HashMap, VecDeque};

use virtio_milk::policy::{
    Decision, Pid, Policy, PolicyEvent, RunnableReason, SchedView, TaskState,
};

/// Global FIFO policy. See the module documentation.
#[derive(Debug, Default)]
pub struct Fifo {
    /// (pid, generation); an entry is live iff `live[pid] == generation`.
    queue: VecDeque<(Pid, u64)>,
    live: HashMap<Pid, u64>,
    generation: u64,
    /// Slice for RUN decisions (0: the runtime's default).
    pub slice_ns: u64,
}

impl Fifo {
    /// Number of tasks queued.
    pub fn queued(&self) -> usize {
        self.live.len()
    }

    fn enqueue(&mut self, pid: Pid, front: bool) {
        if self.live.contains_key(&pid) {
            return;
        }
        self.generation += 1;
        self.live.insert(pid, self.generation);
        if front {
            self.queue.push_front((pid, self.generation));
        } else {
            self.queue.push_back((pid, self.generation));
        }
    }

    fn forget(&mut self, pid: Pid) {
        self.live.remove(&pid);
    }
}

impl Policy for Fifo {
    fn name(&self) -> &str {
        "fifo"
    }

    fn attach(&mut self, view: &SchedView) {
        self.queue.clear();
        self.live.clear();
        let mut runnable: Vec<_> = view
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Runnable)
            .map(|t| (t.runnable_since_ns, t.pid))
            .collect();
        runnable.sort_unstable();
        for (_, pid) in runnable {
            self.enqueue(pid, false);
        }
    }

    fn on_event(&mut self, ev: &PolicyEvent, _view: &SchedView) {
        match *ev {
            PolicyEvent::TaskRunnable { pid, reason, .. } => {
                self.enqueue(pid, reason == RunnableReason::Requeued)
            }
            PolicyEvent::TaskBlocked(pid) | PolicyEvent::TaskDead(pid) => self.forget(pid),
            _ => {}
        }
    }

    fn schedule(&mut self, view: &SchedView, out: &mut Vec<Decision>) {
        for cpu in view.free_cpus() {
            // Drop dead entries at the head, then take the oldest task allowed on `cpu`.
            let mut pick = None;
            let mut i = 0;
            while i < self.queue.len() {
                let (pid, gen) = self.queue[i];
                let task = view.task(pid).filter(|t| t.state == TaskState::Runnable);
                if self.live.get(&pid) != Some(&gen) || task.is_none() {
                    if self.live.get(&pid) == Some(&gen) {
                        self.live.remove(&pid);
                    }
                    self.queue.remove(i);
                    continue;
                }
                if task.is_some_and(|t| t.allows(cpu)) {
                    pick = Some(i);
                    break;
                }
                i += 1;
            }
            let Some(i) = pick else {
                if self.queue.is_empty() {
                    break;
                }
                continue;
            };
            if let Some((pid, _)) = self.queue.remove(i) {
                self.live.remove(&pid);
                out.push(Decision::Run {
                    pid,
                    cpu,
                    slice_ns: self.slice_ns,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_milk::policy::{CpuState, TaskInfo};

    fn task(pid: Pid, state: TaskState, mask: u64, since: u64) -> TaskInfo {
        TaskInfo {
            pid,
            tgid: pid,
            comm: [0; 16],
            cpus_allowed: mask,
            weight: 100,
            nice: 0,
            seq: 1,
            state,
            last_cpu: 0,
            runnable_since_ns: since,
        }
    }

    fn view(cpus: Vec<CpuState>, tasks: Vec<TaskInfo>) -> SchedView {
        SchedView {
            tasks: tasks.into_iter().map(|t| (t.pid, t)).collect(),
            cpus,
        }
    }

    fn wake(p: &mut Fifo, v: &SchedView, pid: Pid) {
        p.on_event(
            &PolicyEvent::TaskRunnable {
                pid,
                cpu: 0,
                reason: RunnableReason::Wakeup,
            },
            v,
        );
    }

    #[test]
    fn dispatches_in_wakeup_order_to_free_cpus() {
        let v = view(
            vec![CpuState::Idle, CpuState::Running(9), CpuState::Idle],
            vec![
                task(1, TaskState::Runnable, 0b111, 0),
                task(2, TaskState::Runnable, 0b111, 0),
                task(3, TaskState::Runnable, 0b111, 0),
            ],
        );
        let mut p = Fifo::default();
        for pid in [3, 1, 2] {
            wake(&mut p, &v, pid);
        }
        let mut out = Vec::new();
        p.schedule(&v, &mut out);
        assert_eq!(
            out,
            vec![
                Decision::Run {
                    pid: 3,
                    cpu: 0,
                    slice_ns: 0
                },
                Decision::Run {
                    pid: 1,
                    cpu: 2,
                    slice_ns: 0
                },
            ]
        );
        assert_eq!(p.queued(), 1);
    }

    #[test]
    fn respects_affinity_and_skips_blocked() {
        let v = view(
            vec![CpuState::Idle, CpuState::Idle],
            vec![
                task(1, TaskState::Runnable, 0b10, 0),
                task(2, TaskState::Blocked, 0b11, 0),
                task(3, TaskState::Runnable, 0b01, 0),
            ],
        );
        let mut p = Fifo::default();
        for pid in [1, 2, 3] {
            wake(&mut p, &v, pid);
        }
        let mut out = Vec::new();
        p.schedule(&v, &mut out);
        // CPU 0: task 1 is not allowed, task 2 is blocked (dropped), task 3 fits.
        // CPU 1: task 1.
        assert_eq!(
            out,
            vec![
                Decision::Run {
                    pid: 3,
                    cpu: 0,
                    slice_ns: 0
                },
                Decision::Run {
                    pid: 1,
                    cpu: 1,
                    slice_ns: 0
                },
            ]
        );
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn block_then_wake_requeues_at_tail_once() {
        let mut v = view(
            vec![CpuState::Running(7)],
            vec![
                task(1, TaskState::Runnable, 1, 0),
                task(2, TaskState::Runnable, 1, 0),
            ],
        );
        let mut p = Fifo::default();
        wake(&mut p, &v, 1);
        wake(&mut p, &v, 2);
        p.on_event(&PolicyEvent::TaskBlocked(1), &v);
        wake(&mut p, &v, 1);
        v.cpus[0] = CpuState::Idle;
        let mut out = Vec::new();
        p.schedule(&v, &mut out);
        assert_eq!(
            out,
            vec![Decision::Run {
                pid: 2,
                cpu: 0,
                slice_ns: 0
            }]
        );
        assert_eq!(p.queued(), 1);
    }

    #[test]
    fn attach_rebuilds_from_view_in_runnable_order() {
        let v = view(
            vec![CpuState::Idle],
            vec![
                task(1, TaskState::Runnable, 1, 30),
                task(2, TaskState::Running(0), 1, 10),
                task(3, TaskState::Runnable, 1, 20),
            ],
        );
        let mut p = Fifo::default();
        p.attach(&v);
        assert_eq!(p.queued(), 2);
        let mut out = Vec::new();
        p.schedule(&v, &mut out);
        assert_eq!(
            out,
            vec![Decision::Run {
                pid: 3,
                cpu: 0,
                slice_ns: 0
            }]
        );
    }
}
