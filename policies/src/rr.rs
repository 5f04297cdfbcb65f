//! Preemptive round robin over one global queue.
//!
//! Runnable tasks wait in arrival order; a free CPU takes the head. When a task starts
//! running (its RUN acked OK, or the guest reports it running) the policy arms a host
//! timer at start + `slice_us`. When the timer fires and a task allowed on that CPU is
//! waiting, the policy sends that task with a preempting RUN (`F_PREEMPT`): the guest
//! switches at once and reports the old task as preempted, which puts it at the tail.
//! Nobody waiting: the task keeps the CPU and the timer is re-armed. The policy also
//! subscribes to CPU ticks: a tick showing the running task past its slice (by the guest's
//! own runtime accounting) triggers the same preemption, should a timer be late.
//!
//! RUNs carry `guest_slice_us` (default 20 ms): the guest enforces that much itself, so a
//! slow or silent host cannot let one task keep a CPU forever.

use std::collections::{HashMap, VecDeque};

use virtio_milk::policy::{
    DecisionKind, Dispatcher, Gtid, Outcome, Policy, PolicyEvent, Reject, RunnableReason,
    SchedView, Subscriptions, TaskState,
};
use virtio_milk::protocol::AckStatus;

use crate::params::{ParamInfo, Spec};
use crate::Error;

/// Behaviour version of this policy.
pub const VERSION: &str = "1";

/// Parameters `rr` accepts.
pub const PARAMS: &[ParamInfo] = &[
    ParamInfo {
        name: "slice_us",
        default: "2000",
        help: "round-robin slice in us; a waiting task preempts the running one after it",
    },
    ParamInfo {
        name: "guest_slice_us",
        default: "20000",
        help: "slice the guest itself enforces on every RUN (backstop for a slow host)",
    },
];

/// What runs on one CPU, as far as the policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    gtid: Gtid,
    /// Distinguishes timers of earlier occupants of the CPU.
    generation: u64,
    /// Host ns when the current slice started.
    start_ns: u64,
    /// The task's guest runtime when its slice started (0: unknown yet).
    start_runtime_ns: u64,
    /// A timer for this slice is set.
    armed: bool,
}

/// Round-robin policy. See the module documentation.
#[derive(Debug)]
pub struct RoundRobin {
    /// (gtid, stamp); an entry is live iff `live[gtid] == stamp`.
    queue: VecDeque<(Gtid, u64)>,
    live: HashMap<Gtid, u64>,
    stamp: u64,
    slots: Vec<Option<Slot>>,
    generation: u64,
    /// CPUs whose slice ended (timer or tick), to act on in `schedule`.
    expired: Vec<u16>,
    /// Round-robin slice.
    pub slice_ns: u64,
    /// Slice carried by every RUN (the guest's own enforcement).
    pub guest_slice_ns: u64,
    /// Preempting RUNs issued.
    pub preemptions: u64,
}

impl Default for RoundRobin {
    fn default() -> Self {
        RoundRobin {
            queue: VecDeque::new(),
            live: HashMap::new(),
            stamp: 0,
            slots: Vec::new(),
            generation: 0,
            expired: Vec::new(),
            slice_ns: 2_000_000,
            guest_slice_ns: 20_000_000,
            preemptions: 0,
        }
    }
}

fn token(cpu: u16, generation: u64) -> u64 {
    (generation << 16) | u64::from(cpu)
}

impl RoundRobin {
    /// Build from a parsed spec (`rr:slice_us=N,guest_slice_us=N`).
    pub fn from_spec(s: &Spec) -> Result<Self, Error> {
        let slice_us = s.u64_in("slice_us", 2_000, 50, 10_000_000)?;
        let guest_us = s.u64_in("guest_slice_us", 20_000, 50, 10_000_000)?;
        Ok(RoundRobin {
            slice_ns: slice_us * 1_000,
            guest_slice_ns: guest_us * 1_000,
            ..Default::default()
        })
    }

    /// Number of tasks waiting.
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

    fn slot_mut(&mut self, cpu: u16) -> &mut Option<Slot> {
        let c = usize::from(cpu);
        if self.slots.len() <= c {
            self.slots.resize(c + 1, None);
        }
        &mut self.slots[c]
    }

    fn started(&mut self, gtid: Gtid, cpu: u16, view: &SchedView) {
        self.live.remove(&gtid);
        // The task cannot run on two CPUs: drop its old slot if any.
        for s in self.slots.iter_mut() {
            if s.is_some_and(|s| s.gtid == gtid) {
                *s = None;
            }
        }
        self.generation += 1;
        let generation = self.generation;
        let start_runtime_ns = view.task(gtid).map_or(0, |t| t.runtime_ns);
        *self.slot_mut(cpu) = Some(Slot {
            gtid,
            generation,
            start_ns: view.now_ns,
            start_runtime_ns,
            armed: false,
        });
    }

    fn stopped(&mut self, gtid: Gtid) {
        for s in self.slots.iter_mut() {
            if s.is_some_and(|s| s.gtid == gtid) {
                *s = None;
            }
        }
    }

    /// Oldest live runnable task allowed on `cpu` (dead entries dropped).
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

    fn take(&mut self, i: usize) -> Gtid {
        let (gtid, _) = self.queue.remove(i).expect("index from pick");
        self.live.remove(&gtid);
        gtid
    }

    /// Slice over on `cpu`: hand it to the next waiting task, or extend the slice.
    fn slice_end(&mut self, d: &mut Dispatcher<'_>, cpu: u16) {
        let Some(slot) = self.slots.get(usize::from(cpu)).copied().flatten() else {
            return;
        };
        if d.view().running_on(cpu) != Some(slot.gtid) {
            return;
        }
        if let Some(i) = self.pick(d.view(), cpu) {
            let (next, _) = self.queue[i];
            match d.run_preempt(next, cpu, self.guest_slice_ns) {
                Ok(_) => {
                    self.take(i);
                    self.preemptions += 1;
                    // Timers of this slot are void; the next occupant gets its own.
                    if let Some(s) = self.slot_mut(cpu) {
                        s.generation = 0;
                        s.armed = true;
                    }
                    return;
                }
                Err(Reject::NoTask | Reject::NotRunnable) => {
                    self.take(i);
                }
                Err(_) => {}
            }
        }
        // Nobody (able) to take over: a fresh slice for the current task.
        let now = d.now_ns();
        let generation = {
            self.generation += 1;
            self.generation
        };
        let start_runtime_ns = d.view().task(slot.gtid).map_or(0, |t| t.runtime_ns);
        *self.slot_mut(cpu) = Some(Slot {
            generation,
            start_ns: now,
            start_runtime_ns,
            armed: true,
            ..slot
        });
        d.set_timer(now + self.slice_ns, token(cpu, generation));
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &str {
        "rr"
    }

    fn subscriptions(&self) -> Subscriptions {
        Subscriptions {
            tick_us: (self.slice_ns / 1_000).min(u64::from(u32::MAX)) as u32,
            running: false,
        }
    }

    fn attach(&mut self, view: &SchedView) {
        self.queue.clear();
        self.live.clear();
        self.expired.clear();
        self.slots = vec![None; view.cpus.len()];
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
        // Running tasks get a slice from now (their timers come with the first schedule).
        for cpu in 0..view.num_cpus() {
            if let Some(g) = view.running_on(cpu) {
                self.started(g, cpu, view);
            }
        }
    }

    fn on_event(&mut self, ev: &PolicyEvent, view: &SchedView) {
        match *ev {
            PolicyEvent::TaskRunnable { gtid, reason, .. } => {
                self.stopped(gtid);
                self.enqueue(gtid, reason == RunnableReason::Requeued);
            }
            PolicyEvent::TaskBlocked { gtid, .. }
            | PolicyEvent::TaskDead(gtid)
            | PolicyEvent::TaskDeparted(gtid) => {
                self.live.remove(&gtid);
                self.stopped(gtid);
            }
            PolicyEvent::TaskRunning { gtid, cpu, .. } => self.started(gtid, cpu, view),
            PolicyEvent::Outcome {
                kind: DecisionKind::Run | DecisionKind::Staged | DecisionKind::RunPreempt,
                gtid,
                cpu,
                outcome: Outcome::Acked(AckStatus::Ok),
                ..
            } => self.started(gtid, cpu, view),
            PolicyEvent::CpuIdle(cpu) | PolicyEvent::CpuReleased(cpu) => {
                *self.slot_mut(cpu) = None;
            }
            PolicyEvent::Timer { token, .. } => {
                let cpu = (token & 0xffff) as u16;
                let generation = token >> 16;
                if self
                    .slots
                    .get(usize::from(cpu))
                    .copied()
                    .flatten()
                    .is_some_and(|s| s.generation == generation)
                {
                    self.expired.push(cpu);
                }
            }
            PolicyEvent::Tick {
                cpu,
                gtid,
                runtime_ns,
                ..
            } => {
                let slice = self.slice_ns;
                if let Some(s) = self.slot_mut(cpu) {
                    if s.gtid == gtid && s.generation != 0 {
                        if s.start_runtime_ns == 0 {
                            s.start_runtime_ns = runtime_ns;
                        } else if runtime_ns.saturating_sub(s.start_runtime_ns) >= slice {
                            self.expired.push(cpu);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn schedule(&mut self, d: &mut Dispatcher<'_>) {
        let mut expired = std::mem::take(&mut self.expired);
        expired.sort_unstable();
        expired.dedup();
        for &cpu in &expired {
            self.slice_end(d, cpu);
        }
        expired.clear();
        self.expired = expired;
        // Arm the slice timer of every task that started running.
        for cpu in 0..self.slots.len() {
            if let Some(s) = self.slots[cpu].as_mut() {
                if !s.armed {
                    s.armed = true;
                    d.set_timer(s.start_ns + self.slice_ns, token(cpu as u16, s.generation));
                }
            }
        }
        // Free CPUs take the head of the queue.
        let free: Vec<u16> = d.view().free_cpus().collect();
        for cpu in free {
            if self.live.is_empty() {
                break;
            }
            let Some(i) = self.pick(d.view(), cpu) else {
                continue;
            };
            let (gtid, _) = self.queue[i];
            match d.run(gtid, cpu, self.guest_slice_ns) {
                Ok(_) | Err(Reject::NoTask | Reject::NotRunnable) => {
                    self.take(i);
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{task, view, wake, SimSink};
    use virtio_milk::policy::{CpuState, Decision, DecisionId};

    fn g(pid: u32) -> Gtid {
        Gtid::new(pid, 1)
    }

    fn ok(gtid: Gtid, cpu: u16) -> PolicyEvent {
        PolicyEvent::Outcome {
            id: DecisionId(1),
            kind: DecisionKind::Run,
            gtid,
            cpu,
            outcome: Outcome::Acked(AckStatus::Ok),
        }
    }

    #[test]
    fn timer_at_slice_end_preempts_for_a_waiter_and_rearms_without_one() {
        let mut p = RoundRobin::from_spec(&Spec::parse("rr:slice_us=1000").unwrap()).unwrap();
        let mut v = view(
            vec![CpuState::Idle],
            vec![
                task(g(1), TaskState::Runnable, 1, 0),
                task(g(2), TaskState::Blocked, 1, 0),
            ],
        );
        p.attach(&v);
        assert_eq!(p.subscriptions().tick_us, 1000);
        wake(&mut p, &v, g(1));
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.runs(), vec![(g(1), 0)]);
        // Task 1 starts at t=10 us: a timer for t=1010 us.
        v.now_ns = 10_000;
        v.cpus[0].state = CpuState::Running(g(1));
        v.cpus[0].pending.clear();
        v.tasks.get_mut(&g(1)).unwrap().state = TaskState::Running(0);
        p.on_event(&ok(g(1), 0), &v);
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.timers.len(), 1);
        let (at, tok) = sink.timers[0];
        assert_eq!(at, 1_010_000);
        // Slice over, nobody waiting: no decision, the timer is re-armed.
        v.now_ns = at;
        p.on_event(
            &PolicyEvent::Timer {
                token: tok,
                due_ns: at,
            },
            &v,
        );
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert!(sink.decisions.is_empty());
        assert_eq!(sink.timers.len(), 1);
        let (at2, tok2) = sink.timers[0];
        assert_eq!(at2, at + 1_000_000);
        // The old timer is void now.
        p.on_event(
            &PolicyEvent::Timer {
                token: tok,
                due_ns: at,
            },
            &v,
        );
        assert!(p.expired.is_empty());
        // Task 2 wakes; at the next slice end it preempts task 1.
        v.tasks.get_mut(&g(2)).unwrap().state = TaskState::Runnable;
        wake(&mut p, &v, g(2));
        v.now_ns = at2;
        p.on_event(
            &PolicyEvent::Timer {
                token: tok2,
                due_ns: at2,
            },
            &v,
        );
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(
            sink.decisions,
            vec![Decision::Run {
                gtid: g(2),
                cpu: 0,
                slice_ns: 20_000_000,
                preempt: true
            }]
        );
        assert_eq!(p.preemptions, 1);
        // The preempted task comes back and queues at the tail.
        p.on_event(
            &PolicyEvent::TaskRunnable {
                gtid: g(1),
                cpu: 0,
                reason: RunnableReason::Preempted,
                runtime_ns: 1_000_000,
            },
            &v,
        );
        assert_eq!(p.queued(), 1);
    }

    #[test]
    fn tick_past_the_slice_preempts_too() {
        let mut p = RoundRobin::from_spec(&Spec::parse("rr:slice_us=1000").unwrap()).unwrap();
        let mut v = view(
            vec![CpuState::Running(g(1))],
            vec![
                task(g(1), TaskState::Running(0), 1, 0),
                task(g(2), TaskState::Runnable, 1, 0),
            ],
        );
        p.attach(&v);
        wake(&mut p, &v, g(2));
        let tick = |rt| PolicyEvent::Tick {
            cpu: 0,
            gtid: g(1),
            runtime_ns: rt,
            slice_ns: 0,
        };
        p.on_event(&tick(5_000_000), &v);
        p.on_event(&tick(5_500_000), &v);
        assert!(p.expired.is_empty());
        p.on_event(&tick(6_000_000), &v);
        let mut sink = SimSink::default();
        p.schedule(&mut Dispatcher::new(&mut v, &mut sink));
        assert_eq!(sink.decisions.len(), 1);
        assert!(matches!(
            sink.decisions[0],
            Decision::Run {
                preempt: true,
                gtid,
                ..
            } if gtid == g(2)
        ));
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(RoundRobin::from_spec(&Spec::parse("rr:slice_us=10").unwrap()).is_err());
        assert!(RoundRobin::from_spec(&Spec::parse("rr:guest_slice_us=x").unwrap()).is_err());
    }
}
