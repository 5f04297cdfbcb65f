//! Fault modes of the runtime, for reliability runs: **chaos** (faults on the channel:
//! delays, lost and duplicated acks, decisions on other CPUs' queues, a descheduled
//! runtime thread, host stops and restarts; [`chaos`]) and a **hostile host** (random
//! well-framed and garbage records for the guest; [`hostile`]). Both are off unless
//! [`super::RuntimeConfig::chaos`] / [`super::RuntimeConfig::hostile`] say otherwise, and
//! cost the loop one `Option` check then. Their windows open when the guest first
//! establishes a session. What they injected is in `Metrics::faults`
//! ([`FaultCounts`]); the seed of each run is logged and in the counts, so a failing run
//! is replayed with `seed=`.

mod chaos;
mod counts;
mod hostile;
mod rng;
mod spec;

use std::time::Duration;

use vm_memory::GuestMemory;

pub use counts::FaultCounts;
pub use hostile::HOSTILE_COOKIE;
pub use spec::{ChaosSpec, HostileSpec, SpecError, CHAOS_KEYS, HOSTILE_KEYS};

use rng::Rng;

use super::{Control, Runtime, GOODBYE_RESYNC, GOODBYE_STOPPED};
use crate::metrics::monotonic_ns;
use crate::protocol::Message;

/// A fault window: opens `after` the guest's first established session, lasts `length`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Window {
    after: u64,
    length: Option<u64>,
    start: Option<u64>,
}

impl Window {
    fn new(after: Duration, length: Option<Duration>) -> Self {
        let ns = |d: Duration| d.as_nanos().min(u128::from(u64::MAX / 4)) as u64;
        Window {
            after: ns(after),
            length: length.map(ns),
            start: None,
        }
    }

    /// The session was established at `now`: the window starts `after` from here.
    /// Later calls change nothing.
    fn open_at(&mut self, now: u64) -> bool {
        if self.start.is_some() {
            return false;
        }
        self.start = Some(now + self.after);
        true
    }

    fn start(&self) -> Option<u64> {
        self.start
    }

    fn end(&self) -> Option<u64> {
        Some(self.start? + self.length?)
    }

    fn active(&self, now: u64) -> bool {
        self.start.is_some_and(|s| now >= s) && self.end().is_none_or(|e| now < e)
    }

    /// Whether the window opened and closed before `now`.
    fn over(&self, now: u64) -> bool {
        self.end().is_some_and(|e| now >= e)
    }

    /// The window's next opening or closing after `now`, if any.
    fn next_change(&self) -> Option<u64> {
        let now = monotonic_ns();
        [self.start, self.end()]
            .into_iter()
            .flatten()
            .find(|&t| t > now)
    }
}

/// The fault modes of one runtime.
pub(super) struct Faults {
    chaos: Option<chaos::Chaos>,
    hostile: Option<hostile::Hostile>,
    /// Scratch for decisions released by chaos.
    out: Vec<(u16, [u8; crate::protocol::RECORD_SIZE])>,
}

impl Faults {
    /// The fault modes `cfg` asks for, if any; draws and logs the seeds.
    pub(super) fn new(
        chaos: Option<ChaosSpec>,
        hostile: Option<HostileSpec>,
        num_cpus: usize,
        counts: &mut FaultCounts,
    ) -> Option<Self> {
        if chaos.is_none() && hostile.is_none() {
            return None;
        }
        let chaos = chaos.map(|s| {
            let seed = s.seed.unwrap_or_else(Rng::fresh_seed).max(1);
            counts.chaos_seed = seed;
            log::warn!(
                "chaos mode on, seed {seed} (replay: --chaos {})",
                ChaosSpec {
                    seed: Some(seed),
                    ..s
                }
            );
            chaos::Chaos::new(s, seed, num_cpus)
        });
        let hostile = hostile.map(|s| {
            let seed = s.seed.unwrap_or_else(Rng::fresh_seed).max(1);
            counts.hostile_seed = seed;
            log::warn!(
                "hostile host on: {:?} at {} records/s, seed {seed}",
                s.duration,
                s.rate
            );
            hostile::Hostile::new(s, seed)
        });
        Some(Faults {
            chaos,
            hostile,
            out: Vec::new(),
        })
    }
}

impl<M: GuestMemory> Runtime<M> {
    /// Hook after each poll: chaos on the guest's records. Returns how many the runtime
    /// handles now.
    pub(super) fn fault_events(&mut self, msgs: &mut Vec<(u16, Message)>) -> usize {
        if let Some(c) = self.faults.as_mut().and_then(|f| f.chaos.as_mut()) {
            c.filter_events(msgs, monotonic_ns(), &mut self.metrics.faults);
        }
        msgs.len()
    }

    /// Hook before each flush: chaos on the decisions queued since the last flush (only
    /// when the backlog held nothing older, `fresh`), and the held ones now due.
    pub(super) fn fault_decisions(&mut self, fresh: bool) {
        let Some(f) = self.faults.as_mut() else {
            return;
        };
        let Some(c) = f.chaos.as_mut() else {
            return;
        };
        let now = monotonic_ns();
        if c.held() == 0 && (!fresh || !c.window.active(now)) {
            return;
        }
        let recs = if fresh {
            self.engine.take_backlog()
        } else {
            Vec::new()
        };
        let mut out = std::mem::take(&mut f.out);
        c.filter_decisions(
            recs,
            self.session_id,
            now,
            &mut self.metrics.faults,
            &mut out,
        );
        for (q, rec) in out.drain(..) {
            if !self.engine.push_decision(q, rec) {
                self.metrics.queue_full += 1;
            }
        }
        f.out = out;
    }

    /// Hook at the loop's housekeeping: open the windows, stall, stop and restart the
    /// host, send hostile records.
    pub(super) fn fault_housekeeping(&mut self, ctl: &Control) {
        let Some(f) = self.faults.as_mut() else {
            return;
        };
        let now = monotonic_ns();
        if self.established {
            if let Some(c) = f.chaos.as_mut() {
                if c.window.open_at(now) {
                    let start = c.window.start().unwrap_or(now);
                    c.open(start);
                    log::info!("chaos window: opens in {:?}", c.spec_after());
                }
            }
            if let Some(h) = f.hostile.as_mut() {
                if h.window.open_at(now) {
                    log::info!("hostile window: session up, opens after the configured delay");
                }
            }
        }
        let mut stall = None;
        let mut stop = None;
        if let Some(c) = f.chaos.as_mut() {
            stall = c.due_stall(now);
            stop = c.due_stop(now);
        }
        if let Some(ns) = stall {
            self.metrics.faults.stalls += 1;
            self.metrics.faults.stall_ns += ns;
            std::thread::sleep(Duration::from_nanos(ns));
        }
        if let Some(s) = stop {
            self.fault_stop(s, ctl);
        }
        self.fault_hostile();
    }

    fn fault_stop(&mut self, s: chaos::Stop, ctl: &Control) {
        log::info!(
            "chaos: host {} for {} ms",
            if s.crash { "crashes" } else { "stops" },
            s.down_ns / 1_000_000
        );
        if s.crash {
            self.metrics.faults.crashes += 1;
        } else {
            self.metrics.faults.restarts += 1;
            self.end_session(GOODBYE_STOPPED);
        }
        if let Some(c) = self.faults.as_mut().and_then(|f| f.chaos.as_mut()) {
            c.drop_held(&mut self.metrics.faults);
        }
        let until = monotonic_ns() + s.down_ns;
        while !ctl.stop_requested() {
            let left = until.saturating_sub(monotonic_ns());
            if left == 0 {
                break;
            }
            std::thread::sleep(Duration::from_nanos(left.min(10_000_000)));
        }
        // Back as a new host would be: what the guest queued meanwhile is from before.
        self.discard_stale_events();
        self.start_session();
    }

    fn fault_hostile(&mut self) {
        let Some(h) = self.faults.as_mut().and_then(|f| f.hostile.as_mut()) else {
            return;
        };
        let now = monotonic_ns();
        if self.metrics.faults.hostile_done {
            return;
        }
        if h.window.over(now) {
            self.metrics.faults.hostile_done = true;
            log::info!(
                "hostile host done ({} records); a normal session follows",
                self.metrics.faults.hostile_total()
            );
            self.restart_session(GOODBYE_RESYNC);
            return;
        }
        if !h.window.active(now) {
            return;
        }
        let n = h.due(now);
        if n == 0 {
            return;
        }
        let ncpu = self.engine.num_cpus();
        for _ in 0..n {
            let (kind, q, rec) = h.record(&self.view, ncpu, self.session_id);
            if self.engine.push_decision(q, rec) {
                hostile::count(&mut self.metrics.faults, kind);
            } else {
                self.metrics.queue_full += 1;
            }
        }
        self.engine.flush();
        // Whatever is left waits for a guest buffer; a new session would drop it.
        self.metrics.faults.hostile_unsure += n.min(self.engine.backlog_len() as u64);
    }

    /// When the loop must wake for a fault mode at the latest (monotonic ns).
    pub(super) fn fault_next_due(&self) -> Option<u64> {
        let f = self.faults.as_ref()?;
        let now = monotonic_ns();
        let c = f.chaos.as_ref().and_then(|c| {
            if c.window.active(now) || c.held() > 0 {
                c.next_due()
            } else {
                c.window.next_change()
            }
        });
        let h = f.hostile.as_ref().and_then(|h| {
            if self.metrics.faults.hostile_done {
                None
            } else if h.window.active(now) {
                Some(now + hostile::Hostile::TICK_NS)
            } else {
                h.window.next_change()
            }
        });
        [c, h].into_iter().flatten().min()
    }
}
