//! In-process policy swap (a child of the runtime module: it works on the runtime's
//! tables).
//!
//! The runtime swaps at a safe point: between two loop iterations, when the previous
//! batch of events has been handed to the old policy and its decisions written. Then:
//!
//! 1. The old policy's decisions still waiting for a guest buffer (the backlog) are
//!    revoked: never delivered, so they cannot be applied after the swap. A revoked RUN
//!    puts its task back to runnable and its CPU back to idle, as if never decided.
//!    Session records in the backlog stay.
//! 2. The new policy attaches to the runtime's task table and CPU states as they are
//!    (tasks dispatched by the old policy stay dispatched until the guest acks them, each
//!    ack resolves its RUN exactly once by cookie, acks of the old policy's RUNs are
//!    counted in `Metrics::old_policy_acks`).
//! 3. The guest gets a HELLO with the same session id and the new policy's name: it keeps
//!    sched_ext enabled (no resync, no fallback).
//! 4. The new policy schedules at once.
//!
//! Measured: `swap_stall` (time the loop spent swapping: revoke, attach, HELLO, first
//! schedule) and `swap_blackout` (last decision written by the old policy -> first
//! decision written by the new one, host clock; includes waiting for the workload's next
//! event when no task was runnable), compared with `decision_gap`, the gap between two
//! consecutive decisions of one policy. The last RUN the old policy wrote is kept in
//! `Metrics::last_run_before_swap`, so a test can replay it late (fault injection) and
//! check that the guest rejects it.

use std::time::Instant;

use vm_memory::GuestMemory;

use super::{RawDecision, Runtime, INJECTED_COOKIE};
use crate::policy::{CpuState, Policy, TaskState};
use crate::protocol::{parse_record, Direction, Message};

/// What the runtime remembers across a swap.
#[derive(Debug, Default)]
pub(super) struct SwapState {
    /// Host time of the last decision written (0: none yet).
    last_decision_ns: u64,
    /// The last RUN written.
    last_run: Option<RawDecision>,
    /// A swap happened and the new policy has not written a decision yet: the old
    /// policy's last decision time.
    blackout_from: Option<u64>,
    /// Cookies up to this one belong to policies swapped out.
    old_cookie_max: u64,
}

impl SwapState {
    /// A decision (RUN with `run`, or PREEMPT) was written at `now`.
    pub(super) fn decision_written<M: GuestMemory>(
        rt: &mut Runtime<M>,
        now: u64,
        run: Option<RawDecision>,
    ) {
        if let Some(from) = rt.swap.blackout_from.take() {
            rt.metrics.swap_blackout.record(now.saturating_sub(from));
        } else if rt.swap.last_decision_ns != 0 {
            rt.metrics
                .decision_gap
                .record(now.saturating_sub(rt.swap.last_decision_ns));
        }
        rt.swap.last_decision_ns = now;
        if run.is_some() {
            rt.swap.last_run = run;
        }
    }

    /// An ack of `cookie` arrived.
    pub(super) fn note_ack<M: GuestMemory>(rt: &mut Runtime<M>, cookie: u64) {
        if cookie != 0 && cookie & INJECTED_COOKIE == 0 && cookie <= rt.swap.old_cookie_max {
            rt.metrics.old_policy_acks += 1;
        }
    }
}

/// Revoke the undelivered decisions of the outgoing policy; returns how many.
fn revoke_backlog<M: GuestMemory>(rt: &mut Runtime<M>) -> u64 {
    let num_cpus = rt.engine.num_cpus();
    let mut revoked = 0;
    for (cpu, rec) in rt.engine.take_backlog() {
        let m = parse_record(&rec, Direction::HostToGuest, num_cpus);
        let d = match m {
            Ok(Message::Run(d)) => Some((true, d)),
            Ok(Message::Preempt(d)) => Some((false, d)),
            _ => None,
        };
        match d {
            Some((is_run, d)) if d.cookie & INJECTED_COOKIE == 0 => {
                revoked += 1;
                if !is_run {
                    continue;
                }
                let c = usize::from(d.cpu);
                if rt.inflight.get(c) == Some(&d.cookie) {
                    rt.inflight[c] = 0;
                    if rt.view.cpus[c] == CpuState::Committed(d.pid) {
                        rt.view.cpus[c] = CpuState::Idle;
                    }
                }
                if let Some(t) = rt.view.tasks.get_mut(&d.pid) {
                    if t.state == TaskState::Dispatched(d.cpu) {
                        t.state = TaskState::Runnable;
                    }
                }
            }
            // Session records and injected decisions are not the policy's: keep them.
            _ => {
                if !rt.engine.push_decision(cpu, rec) {
                    rt.metrics.queue_full += 1;
                }
            }
        }
    }
    revoked
}

/// Replace the running policy with `policy` at this safe point. See the module docs.
pub(super) fn swap<M: GuestMemory>(rt: &mut Runtime<M>, mut policy: Box<dyn Policy>) {
    let t0 = Instant::now();
    log::info!("swapping policy {} -> {}", rt.policy.name(), policy.name());
    rt.metrics.swap_revoked += revoke_backlog(rt);
    rt.swap.old_cookie_max = rt.cookie;
    if rt.swap.last_decision_ns != 0 {
        rt.swap.blackout_from = Some(rt.swap.last_decision_ns);
    }
    rt.metrics.last_run_before_swap = rt.swap.last_run;
    policy.attach(&rt.view);
    rt.policy = policy;
    rt.metrics.policy_swaps += 1;
    if rt.session_id != 0 {
        let hello = Message::Hello(rt.session_record(0));
        rt.send_session(hello);
    }
    rt.schedule();
    rt.engine.flush();
    rt.metrics.swap_stall.record(t0.elapsed().as_nanos() as u64);
}
