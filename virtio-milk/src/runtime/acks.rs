//! Commitments: every decision sent and not yet acknowledged, per target CPU, with its
//! cookie, and how a commitment ends: its ACK, a timeout, or CPU events showing the CPU
//! moved on (V2: the host never keeps a CPU committed forever).

use vm_memory::GuestMemory;

use super::{Runtime, INJECTED_COOKIE};
use crate::policy::{
    CpuState, DecisionId, DecisionKind, Gtid, Outcome, PolicyEvent, RunnableReason, TaskState,
};
use crate::protocol::{AckInfo, AckStatus};

/// One decision sent to the guest and not acknowledged yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// Cookie on the wire (= the policy's [`DecisionId`]).
    pub cookie: u64,
    /// What was sent.
    pub kind: DecisionKind,
    /// RUN: the task; PREEMPT: the task expected there (or `Gtid(0)`).
    pub gtid: Gtid,
    /// Seq the decision carried.
    pub seq: u64,
    /// Host monotonic ns when it was queued.
    pub sent_ns: u64,
    /// Policy epoch that made it (outcomes of older epochs are not shown to the policy).
    pub epoch: u64,
}

impl Commit {
    /// The id the policy knows this decision by.
    pub fn id(&self) -> DecisionId {
        DecisionId(self.cookie)
    }

    /// A RUN of any kind (PREEMPT is not).
    pub fn is_run(&self) -> bool {
        self.kind != DecisionKind::Preempt
    }
}

/// Outstanding decisions by target CPU, and the cookie counter.
#[derive(Debug)]
pub struct Commitments {
    per_cpu: Vec<Vec<Commit>>,
    next_cookie: u64,
}

impl Commitments {
    /// No commitments on `num_cpus` CPUs. Cookies start after `first_cookie` (kept across
    /// sessions so a late ack of an old session never matches a new decision).
    pub fn new(num_cpus: usize, first_cookie: u64) -> Self {
        Commitments {
            per_cpu: vec![Vec::new(); num_cpus],
            next_cookie: first_cookie,
        }
    }

    /// The next cookie to use (never 0, never with [`INJECTED_COOKIE`] set).
    pub fn alloc_cookie(&mut self) -> u64 {
        self.next_cookie = (self.next_cookie + 1) & !INJECTED_COOKIE;
        if self.next_cookie == 0 {
            self.next_cookie = 1;
        }
        self.next_cookie
    }

    /// Last cookie handed out.
    pub fn last_cookie(&self) -> u64 {
        self.next_cookie
    }

    /// Record a sent decision.
    pub fn add(&mut self, cpu: u16, c: Commit) {
        if let Some(v) = self.per_cpu.get_mut(usize::from(cpu)) {
            v.push(c);
        }
    }

    /// Remove and return the commitment with `cookie` on `cpu`.
    pub fn take(&mut self, cpu: u16, cookie: u64) -> Option<Commit> {
        let v = self.per_cpu.get_mut(usize::from(cpu))?;
        let i = v.iter().position(|c| c.cookie == cookie)?;
        Some(v.remove(i))
    }

    /// Whether a RUN of `gtid` is still outstanding on any CPU.
    pub fn has_run(&self, gtid: Gtid) -> bool {
        self.per_cpu
            .iter()
            .flatten()
            .any(|c| c.is_run() && c.gtid == gtid)
    }

    /// Outstanding decisions on `cpu`, oldest first.
    pub fn on_cpu(&self, cpu: u16) -> &[Commit] {
        self.per_cpu
            .get(usize::from(cpu))
            .map_or(&[][..], Vec::as_slice)
    }

    /// Remove and return every commitment on `cpu` sent at or before `before_ns`, except
    /// RUNs of `keep` (a task the CPU reports running: its ack is on the way).
    pub fn take_older(&mut self, cpu: u16, before_ns: u64, keep: Gtid) -> Vec<Commit> {
        let Some(v) = self.per_cpu.get_mut(usize::from(cpu)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        v.retain(|c| {
            let old = c.sent_ns <= before_ns && !(keep != Gtid(0) && c.gtid == keep);
            if old {
                out.push(*c);
            }
            !old
        });
        out
    }

    /// Remove and return every commitment, on any CPU, sent at or before `before_ns`, as
    /// (cpu, commit).
    pub fn take_expired(&mut self, before_ns: u64) -> Vec<(u16, Commit)> {
        let mut out = Vec::new();
        for (cpu, v) in self.per_cpu.iter_mut().enumerate() {
            if v.iter().all(|c| c.sent_ns > before_ns) {
                continue;
            }
            v.retain(|c| {
                let old = c.sent_ns <= before_ns;
                if old {
                    out.push((cpu as u16, *c));
                }
                !old
            });
        }
        out
    }

    /// Send time of the oldest commitment anywhere.
    pub fn oldest_ns(&self) -> Option<u64> {
        self.per_cpu
            .iter()
            .filter_map(|v| v.first().map(|c| c.sent_ns))
            .min()
    }

    /// Total outstanding decisions.
    pub fn len(&self) -> usize {
        self.per_cpu.iter().map(Vec::len).sum()
    }

    /// Nothing outstanding.
    pub fn is_empty(&self) -> bool {
        self.per_cpu.iter().all(Vec::is_empty)
    }

    /// Forget everything (new session); the cookie counter continues.
    pub fn clear(&mut self) {
        for v in &mut self.per_cpu {
            v.clear();
        }
    }
}

impl<M: GuestMemory> Runtime<M> {
    pub(super) fn on_ack(&mut self, a: AckInfo, now: u64) {
        self.metrics.acks[a.status as usize] += 1;
        if a.cookie & INJECTED_COOKIE != 0 {
            // Ours, but not the policy's: counted, never shown to the policy or matched
            // against the CPU's commitments.
            self.metrics.injected_acks[a.status as usize] += 1;
            return;
        }
        let Some(commit) = self.commits.take(a.target_cpu, a.cookie) else {
            // An ack of a decision we stopped waiting for (timed out or resolved by CPU
            // events), or of an earlier session.
            self.metrics.unmatched_acks += 1;
            self.late_ack(a, now);
            return;
        };
        let cpu = a.target_cpu;
        if commit.is_run() {
            self.unpend(cpu, commit.gtid);
            if a.status == AckStatus::Ok {
                self.metrics
                    .apply_latency
                    .record(now.saturating_sub(commit.sent_ns));
                self.started_running(cpu, commit.gtid, now);
            } else {
                self.run_failed(cpu, &commit, a.status, a.seq);
            }
        }
        self.outcome(cpu, &commit, Outcome::Acked(a.status));
    }

    /// A RUN acked OK: the task runs on `cpu` now.
    fn started_running(&mut self, cpu: u16, gtid: Gtid, now: u64) {
        if let Some(t) = self.view.tasks.get_mut(&gtid) {
            if matches!(t.state, TaskState::Dispatched(_) | TaskState::Runnable) {
                t.state = TaskState::Running(cpu);
                t.running_since_ns = now;
            }
        }
        let s = &mut self.view.cpus[usize::from(cpu)];
        if s.state != CpuState::Released {
            s.state = CpuState::Running(gtid);
        }
    }

    /// A RUN was refused or dropped: fix the task's and the CPU's state.
    fn run_failed(&mut self, cpu: u16, commit: &Commit, status: AckStatus, seq: u64) {
        let gtid = commit.gtid;
        let mut requeue = false;
        let mut dead = false;
        // A newer RUN of the task (sent after an event made it runnable again) is what its
        // state waits for now: this one was stale.
        let superseded = self.commits.has_run(gtid);
        if let Some(t) = self.view.tasks.get_mut(&gtid) {
            if t.state == TaskState::Dispatched(cpu) && !superseded {
                t.state = match status {
                    AckStatus::NotRunnable if seq == t.seq => TaskState::Blocked,
                    // The kernel dropped the dispatch; a new event for the task follows.
                    AckStatus::Dropped => TaskState::Blocked,
                    AckStatus::NoTask => {
                        dead = true;
                        TaskState::Blocked
                    }
                    _ => {
                        requeue = true;
                        TaskState::Runnable
                    }
                };
            }
        }
        self.cpu_after_failed_run(cpu, gtid);
        if dead {
            self.remove_task(gtid);
            self.events.push(PolicyEvent::TaskDead(gtid));
        }
        if requeue {
            self.events.push(PolicyEvent::TaskRunnable {
                gtid,
                cpu,
                reason: RunnableReason::Requeued,
                runtime_ns: self.view.task(gtid).map_or(0, |t| t.runtime_ns),
            });
        }
    }

    /// The CPU was committed to a RUN that did not happen: idle again unless more RUNs
    /// are on their way.
    fn cpu_after_failed_run(&mut self, cpu: u16, gtid: Gtid) {
        let s = &mut self.view.cpus[usize::from(cpu)];
        if s.state == CpuState::Committed(gtid) {
            match s.pending.first() {
                Some(&next) => s.state = CpuState::Committed(next),
                None => {
                    s.state = CpuState::Idle;
                    self.events.push(PolicyEvent::CpuIdle(cpu));
                }
            }
        }
    }

    /// An ack for a decision no longer tracked. An OK still tells where the task runs.
    fn late_ack(&mut self, a: AckInfo, now: u64) {
        if a.status != AckStatus::Ok || a.decision_type != crate::protocol::msg::RUN {
            return;
        }
        self.metrics.late_ok_acks += 1;
        let current = self.view.task(a.gtid).is_some_and(|t| t.seq == a.seq);
        if current && self.view.cpus[usize::from(a.target_cpu)].pending.is_empty() {
            self.started_running(a.target_cpu, a.gtid, now);
        }
    }

    fn unpend(&mut self, cpu: u16, gtid: Gtid) {
        let p = &mut self.view.cpus[usize::from(cpu)].pending;
        if let Some(i) = p.iter().position(|&g| g == gtid) {
            p.remove(i);
        }
    }

    /// Stop waiting for `commit`'s ack: the CPU is no longer committed to it and its task,
    /// if still waiting for it, is runnable again.
    pub(super) fn resolve_lost(&mut self, cpu: u16, commit: Commit) {
        if commit.is_run() {
            self.unpend(cpu, commit.gtid);
            let mut requeue = false;
            let superseded = self.commits.has_run(commit.gtid);
            if let Some(t) = self.view.tasks.get_mut(&commit.gtid) {
                // Whatever its seq now: an event that bumped it without changing the
                // task's state (TASK_PRIORITY, TASK_AFFINITY) leaves it waiting for this RUN,
                // unless a newer RUN of it is outstanding.
                if t.state == TaskState::Dispatched(cpu) && !superseded {
                    t.state = TaskState::Runnable;
                    requeue = true;
                }
            }
            self.cpu_after_failed_run(cpu, commit.gtid);
            if requeue {
                self.events.push(PolicyEvent::TaskRunnable {
                    gtid: commit.gtid,
                    cpu,
                    reason: RunnableReason::Requeued,
                    runtime_ns: self.view.task(commit.gtid).map_or(0, |t| t.runtime_ns),
                });
            }
        }
        self.outcome(cpu, &commit, Outcome::Lost);
    }

    /// Give up on commitments older than `ack_timeout`.
    pub(super) fn expire_commitments(&mut self, now: u64) {
        let timeout = self.cfg.ack_timeout.as_nanos() as u64;
        match self.commits.oldest_ns() {
            Some(t) if now.saturating_sub(t) >= timeout => {}
            _ => return,
        }
        for (cpu, c) in self.commits.take_expired(now.saturating_sub(timeout)) {
            log::debug!("no ack for {:?} on cpu {cpu} after {timeout} ns", c.kind);
            self.metrics.commit_timeouts += 1;
            self.resolve_lost(cpu, c);
        }
    }

    /// Tell the policy that made `commit` what became of it.
    fn outcome(&mut self, cpu: u16, commit: &Commit, outcome: Outcome) {
        if commit.epoch != self.epoch {
            self.metrics.stale_policy_outcomes += 1;
            return;
        }
        self.events.push(PolicyEvent::Outcome {
            id: commit.id(),
            kind: commit.kind,
            gtid: commit.gtid,
            cpu,
            outcome,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(cookie: u64, gtid: Gtid, sent_ns: u64) -> Commit {
        Commit {
            cookie,
            kind: DecisionKind::Run,
            gtid,
            seq: 1,
            sent_ns,
            epoch: 0,
        }
    }

    #[test]
    fn take_by_cookie_and_age() {
        let mut c = Commitments::new(2, 0);
        let a = Gtid::new(1, 1);
        let b = Gtid::new(2, 1);
        c.add(0, commit(1, a, 10));
        c.add(0, commit(2, b, 20));
        c.add(1, commit(3, a, 30));
        assert_eq!(c.len(), 3);
        assert_eq!(c.oldest_ns(), Some(10));
        assert_eq!(c.take(1, 1), None, "cookie 1 is on cpu 0");
        assert_eq!(c.take(0, 1).map(|x| x.gtid), Some(a));
        // b is kept: the CPU reports it running.
        assert!(c.take_older(0, 25, b).is_empty());
        assert_eq!(c.take_older(0, 25, Gtid(0)).len(), 1);
        assert_eq!(c.take_expired(29), vec![]);
        assert_eq!(c.take_expired(30).len(), 1);
        assert!(c.is_empty());
    }

    #[test]
    fn cookies_skip_zero_and_the_injected_bit() {
        let mut c = Commitments::new(1, super::INJECTED_COOKIE - 1);
        let k = c.alloc_cookie();
        assert_ne!(k, 0);
        assert_eq!(k & super::INJECTED_COOKIE, 0);
        assert_eq!(c.alloc_cookie(), k + 1);
    }
}
