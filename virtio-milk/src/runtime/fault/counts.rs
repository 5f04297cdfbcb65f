//! What a chaos or hostile-host run injected, by kind (part of [`crate::metrics::Metrics`]
//! and of every runtime summary).

use std::fmt;

/// Faults injected so far. All zero when no fault mode is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Seed of the chaos run (0: no chaos).
    pub chaos_seed: u64,
    /// Guest records (events, acks) held back before the runtime saw them.
    pub events_delayed: u64,
    /// Decisions (and session records) held back before they were written.
    pub decisions_delayed: u64,
    /// Decisions written to another CPU's decision queue than their target's.
    pub decisions_misrouted: u64,
    /// Acks the runtime never saw.
    pub acks_lost: u64,
    /// Acks the runtime saw twice.
    pub acks_duplicated: u64,
    /// Times the runtime thread was descheduled.
    pub stalls: u64,
    /// Total time descheduled, ns.
    pub stall_ns: u64,
    /// Host stops followed by a restart (new session), GOODBYE first.
    pub restarts: u64,
    /// Host stops without GOODBYE (crashes), then a restart.
    pub crashes: u64,
    /// Held records dropped because the host stopped or the session changed under them.
    pub held_dropped: u64,
    /// Seed of the hostile run (0: none).
    pub hostile_seed: u64,
    /// Hostile RUN / PREEMPT records written.
    pub hostile_decisions: u64,
    /// Hostile ACK records written (a type only the guest sends).
    pub hostile_acks: u64,
    /// Hostile HELLOs written.
    pub hostile_hellos: u64,
    /// Hostile HEARTBEATs written.
    pub hostile_heartbeats: u64,
    /// Hostile GOODBYEs written.
    pub hostile_goodbyes: u64,
    /// Garbage records written: a bad length, version or type (the guest must count each
    /// in `bad_records`).
    pub hostile_garbage: u64,
    /// Hostile records still waiting for a guest buffer when the next one was sent: they
    /// may have been dropped with a session's backlog instead of delivered.
    pub hostile_unsure: u64,
    /// Whether the hostile window has ended (and the normal session was restarted).
    pub hostile_done: bool,
}

impl FaultCounts {
    /// Channel faults injected (delays, misroutes, ack losses and duplicates, stalls,
    /// stops).
    pub fn chaos_total(&self) -> u64 {
        self.events_delayed
            + self.decisions_delayed
            + self.decisions_misrouted
            + self.acks_lost
            + self.acks_duplicated
            + self.stalls
            + self.restarts
            + self.crashes
    }

    /// Hostile records written.
    pub fn hostile_total(&self) -> u64 {
        self.hostile_decisions
            + self.hostile_acks
            + self.hostile_hellos
            + self.hostile_heartbeats
            + self.hostile_goodbyes
            + self.hostile_garbage
    }
}

impl fmt::Display for FaultCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if self.chaos_seed != 0 {
            write!(
                f,
                "chaos (seed {}): {} events and {} decisions delayed, {} misrouted, acks {} lost \
                 {} duplicated, {} stalls ({:.1} ms), {} restarts, {} crashes, {} held dropped",
                self.chaos_seed,
                self.events_delayed,
                self.decisions_delayed,
                self.decisions_misrouted,
                self.acks_lost,
                self.acks_duplicated,
                self.stalls,
                self.stall_ns as f64 / 1e6,
                self.restarts,
                self.crashes,
                self.held_dropped
            )?;
            sep = "; ";
        }
        if self.hostile_seed != 0 {
            write!(
                f,
                "{sep}hostile host (seed {}{}): {} decisions, {} acks, {} HELLOs, {} HEARTBEATs, \
                 {} GOODBYEs, {} garbage ({} maybe undelivered)",
                self.hostile_seed,
                if self.hostile_done { ", done" } else { "" },
                self.hostile_decisions,
                self.hostile_acks,
                self.hostile_hellos,
                self.hostile_heartbeats,
                self.hostile_goodbyes,
                self.hostile_garbage,
                self.hostile_unsure
            )?;
        }
        Ok(())
    }
}
