//! Measuring in-process policy swaps (issue 10): the stall of the loop while it swaps,
//! the blackout (last decision of the old policy -> first decision of the new one, host
//! clock), the normal gap between two decisions to compare the blackout with, and the
//! old policy's last RUN (so a test can replay it late and check the guest rejects it).
//!
//! The swap itself is [`super::Runtime::swap_policy`]: at the loop's safe point (between
//! two iterations), the new policy attaches to the task table, the guest gets a HELLO
//! with the same session, outcomes and decisions of the old policy's epoch are not passed
//! on or are refused.

use vm_memory::GuestMemory;

use super::{RawDecision, Runtime};

/// Decision times across swaps.
#[derive(Debug, Default)]
pub(super) struct SwapClock {
    /// Host time of the last decision written (0: none yet).
    last_decision_ns: u64,
    /// Set by a swap until the new policy decides: the old policy's last decision time.
    blackout_from: Option<u64>,
}

impl<M: GuestMemory> Runtime<M> {
    /// Decisions written so far (RUN and PREEMPT).
    pub(super) fn decisions_written(&self) -> u64 {
        self.metrics.decisions_run + self.metrics.decisions_preempt
    }

    /// After the policy decided: if it wrote decisions since `before`, at `now`, record the
    /// blackout (first decision after a swap) or the gap since the previous decision.
    pub(super) fn note_decisions(&mut self, before: u64, now: u64) {
        if self.decisions_written() == before {
            return;
        }
        let clock = &mut self.swap_clock;
        if let Some(from) = clock.blackout_from.take() {
            self.metrics.swap_blackout.record(now.saturating_sub(from));
        } else if clock.last_decision_ns != 0 {
            self.metrics
                .decision_gap
                .record(now.saturating_sub(clock.last_decision_ns));
        }
        clock.last_decision_ns = now;
    }

    /// The most recent RUN still committed (the highest cookie), as a raw decision.
    fn last_run(&self) -> Option<RawDecision> {
        (0..self.view.cpus.len() as u16)
            .flat_map(|cpu| self.commits.on_cpu(cpu).iter().map(move |c| (cpu, c)))
            .filter(|(_, c)| c.is_run())
            .max_by_key(|(_, c)| c.cookie)
            .map(|(cpu, c)| RawDecision::run(c.gtid, cpu, c.seq))
    }

    /// A swap starts: remember the old policy's last decision time and its last RUN.
    pub(super) fn swap_begins(&mut self) {
        if self.swap_clock.last_decision_ns != 0 {
            self.swap_clock.blackout_from = Some(self.swap_clock.last_decision_ns);
        }
        if let Some(r) = self.last_run() {
            self.metrics.last_run_before_swap = Some(r);
        }
    }
}
