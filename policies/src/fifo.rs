//! Centralized global FIFO, the analogue of ghOSt's `fifo` (centralized) agent.
//!
//! One global run queue in wakeup order. Whenever a CPU is free, the oldest runnable task
//! allowed on it is sent there. With staging (`stage=1`, the default) a busy CPU also gets
//! the next task ahead of time: the guest latches it and dispatches it the moment the
//! current task stops, without waiting a round trip to the host. A RUN that fails (stale,
//! bad CPU, lost) puts the task back at the head, so a retry does not lose its place.

use std::collections::{HashMap, VecDeque};

use virtio_milk::policy::{
    CpuState, Dispatcher, Gtid, Policy, PolicyEvent, Reject, RunnableReason, SchedView, TaskState,
};

use crate::params::{ParamInfo, Spec};
use crate::Error;

/// Behaviour version of this policy.
pub const VERSION: &str = "2";

/// Parameters `fifo` accepts.
pub const PARAMS: &[ParamInfo] = &[
    ParamInfo {
        name: "slice_us",
        default: "0",
        help: "slice of every RUN in us (0: the runtime's default)",
    },
    ParamInfo {
        name: "stage",
        default: "1",
        help: "RUNs staged ahead on each busy CPU (0: only idle CPUs get work)",
    },
];

/// Global FIFO policy. See the module documentation.
#[derive(Debug)]
pub struct Fifo {
    /// (gtid, stamp); an entry is live iff `live[gtid] == stamp`.
    queue: VecDeque<(Gtid, u64)>,
    live: HashMap<Gtid, u64>,
    stamp: u64,
    /// Slice for RUN decisions (0: the runtime's default).
    pub slice_ns: u64,
    /// RUNs to keep staged per busy CPU.
    pub stage: usize,
}

impl Default for Fifo {
    fn default() -> Self {
        Fifo {
            queue: VecDeque::new(),
            live: HashMap::new(),
            stamp: 0,
            slice_ns: 0,
            stage: 1,
        }
    }
}

impl Fifo {
    /// Build from a parsed spec (`fifo:slice_us=N,stage=N`).
    pub fn from_spec(s: &Spec) -> Result<Self, Error> {
        Ok(Fifo {
            slice_ns: s.u64_in("slice_us", 0, 0, 1_000_000)? * 1_000,
            stage: s.u64_in("stage", 1, 0, 8)? as usize,
            ..Default::default()
        })
    }

    /// Number of tasks queued.
    pub fn queued(&self) -> usize {
        self.live.len()
    }

    fn enqueue(&mut self, gtid: Gtid, front: bool) {
        if self.live.contains_key(&gtid) {
            return;
        }
        self.stamp += 1;
        self.live.insert(gtid, self.stamp);
        if front {
            self.queue.push_front((gtid, self.stamp));
        } else {
            self.queue.push_back((gtid, self.stamp));
        }
    }

    fn forget(&mut self, gtid: Gtid) {
        self.live.remove(&gtid);
    }

    /// Index of the oldest live, runnable task allowed on `cpu`; drops dead entries.
    fn pick(&mut self, view: &SchedView, cpu: u16) -> Option<usize> {
        let mut i = 0;
        while i < self.queue.len() {
            let (gtid, stamp) = self.queue[i];
            let live = self.live.get(&gtid) == Some(&stamp);
            let task = view.task(gtid).filter(|t| t.state == TaskState::Runnable);
            if !live || task.is_none() {
                if live {
                    self.live.remove(&gtid);
                }
                self.queue.remove(i);
                continue;
            }
            if task.is_some_and(|t| t.allows(cpu)) {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// Send the oldest task allowed on `cpu` there; false if there is none or the runtime
    /// refused the CPU.
    fn place(&mut self, d: &mut Dispatcher<'_>, cpu: u16) -> bool {
        let Some(i) = self.pick(d.view(), cpu) else {
            return false;
        };
        let (gtid, _) = self.queue[i];
        match d.run(gtid, cpu, self.slice_ns) {
            Ok(_) => {
                self.queue.remove(i);
                self.live.remove(&gtid);
                true
            }
            Err(Reject::NoTask | Reject::NotRunnable) => {
                self.queue.remove(i);
                self.live.remove(&gtid);
                false
            }
            Err(_) => false,
        }
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
            .map(|t| (t.runnable_since_ns, t.gtid))
            .collect();
        runnable.sort_unstable();
        for (_, gtid) in runnable {
            self.enqueue(gtid, false);
        }
    }

    fn on_event(&mut self, ev: &PolicyEvent, _view: &SchedView) {
        match *ev {
            PolicyEvent::TaskRunnable { gtid, reason, .. } => {
                self.enqueue(gtid, reason == RunnableReason::Requeued)
            }
            PolicyEvent::TaskBlocked { gtid, .. }
            | PolicyEvent::TaskDead(gtid)
            | PolicyEvent::TaskDeparted(gtid)
            | PolicyEvent::TaskRunning { gtid, .. } => self.forget(gtid),
            _ => {}
        }
    }

    fn schedule(&mut self, d: &mut Dispatcher<'_>) {
        // Idle CPUs first: work that can start now.
        let free: Vec<u16> = d.view().free_cpus().collect();
        for cpu in free {
            if self.live.is_empty() {
                return;
            }
            self.place(d, cpu);
        }
        // Then the next task for each busy CPU, so it never waits a round trip for work.
        let depth = self.stage.min(d.max_staged().saturating_sub(1));
        for level in 1..=depth {
            for cpu in 0..d.view().num_cpus() {
                if self.live.is_empty() {
                    return;
                }
                let busy = matches!(
                    d.view().cpu_state(cpu),
                    CpuState::Running(_) | CpuState::Committed(_)
                );
                // Running(g): nothing in flight yet is the running task's successor;
                // Committed: the first pending RUN is the one that runs next.
                let ahead = match d.view().cpu_state(cpu) {
                    CpuState::Committed(_) => d.view().pending_runs(cpu).saturating_sub(1),
                    _ => d.view().pending_runs(cpu),
                };
                if busy && ahead < level {
                    self.place(d, cpu);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{task, view, wake, SimSink};
    use virtio_milk::policy::CpuState;

    fn g(pid: u32) -> Gtid {
        Gtid::new(pid, 1)
    }

    #[test]
    fn dispatches_in_wakeup_order_to_free_cpus_then_stages() {
        let mut v = view(
            vec![CpuState::Idle, CpuState::Running(g(9)), CpuState::Idle],
            vec![
                task(g(1), TaskState::Runnable, 0b111, 0),
                task(g(2), TaskState::Runnable, 0b111, 0),
                task(g(3), TaskState::Runnable, 0b111, 0),
                task(g(4), TaskState::Runnable, 0b111, 0),
            ],
        );
        let mut p = Fifo::default();
        for pid in [3, 1, 2, 4] {
            wake(&mut p, &v, g(pid));
        }
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        // Free CPUs 0 and 2 get 3 and 1; then one task is staged per busy CPU, in CPU
        // order: 0 and 2 are committed to their first RUN, 1 runs task 9.
        assert_eq!(
            sink.runs(),
            vec![(g(3), 0), (g(1), 2), (g(2), 0), (g(4), 1)]
        );
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn stage_zero_only_fills_idle_cpus() {
        let mut v = view(
            vec![CpuState::Idle, CpuState::Running(g(9))],
            vec![
                task(g(1), TaskState::Runnable, 0b11, 0),
                task(g(2), TaskState::Runnable, 0b11, 0),
            ],
        );
        let mut p = Fifo::from_spec(&Spec::parse("fifo:stage=0").unwrap()).unwrap();
        wake(&mut p, &v, g(1));
        wake(&mut p, &v, g(2));
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.runs(), vec![(g(1), 0)]);
        assert_eq!(p.queued(), 1);
    }

    #[test]
    fn respects_affinity_and_skips_blocked() {
        let mut v = view(
            vec![CpuState::Idle, CpuState::Idle],
            vec![
                task(g(1), TaskState::Runnable, 0b10, 0),
                task(g(2), TaskState::Blocked, 0b11, 0),
                task(g(3), TaskState::Runnable, 0b01, 0),
            ],
        );
        let mut p = Fifo::from_spec(&Spec::parse("fifo:stage=0").unwrap()).unwrap();
        for pid in [1, 2, 3] {
            wake(&mut p, &v, g(pid));
        }
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        // CPU 0: task 1 is not allowed, task 2 is blocked (dropped), task 3 fits.
        // CPU 1: task 1.
        assert_eq!(sink.runs(), vec![(g(3), 0), (g(1), 1)]);
        assert_eq!(p.queued(), 0);
    }

    #[test]
    fn block_then_wake_requeues_at_tail_once() {
        let mut v = view(
            vec![CpuState::Running(g(7))],
            vec![
                task(g(1), TaskState::Runnable, 1, 0),
                task(g(2), TaskState::Runnable, 1, 0),
            ],
        );
        let mut p = Fifo::from_spec(&Spec::parse("fifo:stage=0").unwrap()).unwrap();
        wake(&mut p, &v, g(1));
        wake(&mut p, &v, g(2));
        p.on_event(
            &PolicyEvent::TaskBlocked {
                gtid: g(1),
                runtime_ns: 0,
            },
            &v,
        );
        wake(&mut p, &v, g(1));
        v.cpus[0].state = CpuState::Idle;
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.runs(), vec![(g(2), 0)]);
        assert_eq!(p.queued(), 1);
    }

    #[test]
    fn attach_rebuilds_from_view_in_runnable_order() {
        let mut v = view(
            vec![CpuState::Idle],
            vec![
                task(g(1), TaskState::Runnable, 1, 30),
                task(g(2), TaskState::Running(0), 1, 10),
                task(g(3), TaskState::Runnable, 1, 20),
            ],
        );
        let mut p = Fifo::from_spec(&Spec::parse("fifo:stage=0").unwrap()).unwrap();
        p.attach(&v);
        assert_eq!(p.queued(), 2);
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.runs(), vec![(g(3), 0)]);
    }
}
