//! Chaos on the channel: records held back (per queue, in order, so queues reorder
//! against each other), acks lost and duplicated, decisions written to another CPU's
//! queue, the runtime thread descheduled, the host stopping and restarting. The runtime
//! drives it through the hooks in [`super`]; every choice comes from one seeded [`Rng`].

use std::collections::VecDeque;

use super::counts::FaultCounts;
use super::rng::Rng;
use super::spec::ChaosSpec;
use super::Window;
use crate::protocol::{Message, RECORD_SIZE};

/// A decision (or host session record) held back.
struct HeldDecision {
    release_ns: u64,
    rec: [u8; RECORD_SIZE],
    /// Session it was made in: dropped if another session started meanwhile.
    session: u64,
}

/// What a host stop looks like (see [`Chaos::due_stop`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Stop {
    /// No GOODBYE: the guest only notices the silence.
    pub crash: bool,
    /// How long the host stays away, ns.
    pub down_ns: u64,
}

/// State of a chaos run.
pub(super) struct Chaos {
    spec: ChaosSpec,
    /// Per-record choices (delays, losses, routes).
    rng: Rng,
    /// Stalls and stops: a stream of its own, so their schedule depends on the seed
    /// alone, not on how many records went by.
    sched: Rng,
    pub(super) window: Window,
    /// Guest records held back, per event queue, in arrival order.
    events: Vec<VecDeque<(u64, u16, Message)>>,
    /// Decisions held back, per decision queue they will be written to.
    decisions: Vec<VecDeque<HeldDecision>>,
    next_stall_ns: u64,
    next_stop_ns: u64,
}

fn ns(d: std::time::Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Chaos {
    pub(super) fn new(spec: ChaosSpec, seed: u64, num_cpus: usize) -> Self {
        Chaos {
            window: Window::new(spec.after, spec.window),
            spec,
            rng: Rng::new(seed),
            sched: Rng::new(seed ^ 0x5ca1_ab1e_c4a0_5eed),
            events: (0..num_cpus).map(|_| VecDeque::new()).collect(),
            decisions: (0..num_cpus).map(|_| VecDeque::new()).collect(),
            next_stall_ns: u64::MAX,
            next_stop_ns: u64::MAX,
        }
    }

    /// The window opened at `start_ns`: schedule the first stall and stop.
    pub(super) fn open(&mut self, start_ns: u64) {
        if !self.spec.stall_every.is_zero() {
            self.next_stall_ns = start_ns + self.sched.exp(ns(self.spec.stall_every));
        }
        if !self.spec.restart_every.is_zero() {
            self.next_stop_ns = start_ns + self.sched.exp(ns(self.spec.restart_every));
        }
    }

    fn delay(&mut self, bound: std::time::Duration) -> u64 {
        if !bound.is_zero() && self.rng.chance(self.spec.delay_p) {
            self.rng.between(1, ns(bound))
        } else {
            0
        }
    }

    /// How long after the first session the window opens.
    pub(super) fn spec_after(&self) -> std::time::Duration {
        self.spec.after
    }

    /// Everything held back, whatever its release time.
    pub(super) fn held(&self) -> usize {
        self.events.iter().map(VecDeque::len).sum::<usize>()
            + self.decisions.iter().map(VecDeque::len).sum::<usize>()
    }

    /// Takes the records the engine just popped (`msgs`) and gives back the ones the
    /// runtime may see now: acks lost or doubled, records held back in queue order.
    pub(super) fn filter_events(
        &mut self,
        msgs: &mut Vec<(u16, Message)>,
        now: u64,
        counts: &mut FaultCounts,
    ) {
        let active = self.window.active(now);
        if !active && self.events.iter().all(VecDeque::is_empty) {
            return;
        }
        let incoming = std::mem::take(msgs);
        let nq = self.events.len();
        for (q, m) in incoming {
            let qi = usize::from(q) % nq;
            let mut copies = 1;
            if active && matches!(m, Message::Ack(_)) {
                if self.rng.chance(self.spec.ack_loss) {
                    counts.acks_lost += 1;
                    continue;
                }
                if self.rng.chance(self.spec.ack_dup) {
                    counts.acks_duplicated += 1;
                    copies = 2;
                }
            }
            for _ in 0..copies {
                let d = if active {
                    self.delay(self.spec.event_delay)
                } else {
                    0
                };
                if d > 0 {
                    counts.events_delayed += 1;
                }
                let held = &mut self.events[qi];
                let release = held.back().map_or(now + d, |b| b.0.max(now + d));
                if release <= now && held.is_empty() {
                    msgs.push((q, m.clone()));
                } else {
                    held.push_back((release, q, m.clone()));
                }
            }
        }
        for held in &mut self.events {
            while held.front().is_some_and(|h| !active || h.0 <= now) {
                if let Some((_, q, m)) = held.pop_front() {
                    msgs.push((q, m));
                }
            }
        }
    }

    /// Holds back or reroutes the decisions `recs` (target CPU, record) made in
    /// `session`; returns the ones due now as (queue, record), in queue order.
    pub(super) fn filter_decisions(
        &mut self,
        recs: Vec<(u16, [u8; RECORD_SIZE])>,
        session: u64,
        now: u64,
        counts: &mut FaultCounts,
        out: &mut Vec<(u16, [u8; RECORD_SIZE])>,
    ) {
        let active = self.window.active(now);
        let nq = self.decisions.len();
        for (cpu, rec) in recs {
            let mut q = usize::from(cpu) % nq;
            if active && nq > 1 && self.rng.chance(self.spec.misroute) {
                q = (q + 1 + self.rng.below(nq as u64 - 1) as usize) % nq;
                counts.decisions_misrouted += 1;
            }
            let d = if active {
                self.delay(self.spec.decision_delay)
            } else {
                0
            };
            if d > 0 {
                counts.decisions_delayed += 1;
            }
            let held = &mut self.decisions[q];
            let release = held.back().map_or(now + d, |b| b.release_ns.max(now + d));
            held.push_back(HeldDecision {
                release_ns: release,
                rec,
                session,
            });
        }
        for (q, held) in self.decisions.iter_mut().enumerate() {
            while held.front().is_some_and(|h| !active || h.release_ns <= now) {
                if let Some(h) = held.pop_front() {
                    if h.session == session {
                        out.push((q as u16, h.rec));
                    } else {
                        counts.held_dropped += 1;
                    }
                }
            }
        }
    }

    /// Drops everything held (the host stops: nothing it held survives).
    pub(super) fn drop_held(&mut self, counts: &mut FaultCounts) {
        counts.held_dropped += self.held() as u64;
        self.events.iter_mut().for_each(VecDeque::clear);
        self.decisions.iter_mut().for_each(VecDeque::clear);
    }

    /// A stall due at `now`: how long to deschedule the runtime thread, ns.
    pub(super) fn due_stall(&mut self, now: u64) -> Option<u64> {
        if now < self.next_stall_ns || !self.window.active(now) {
            return None;
        }
        self.next_stall_ns = now + self.rng.exp(ns(self.spec.stall_every));
        Some(
            self.rng
                .between(ns(self.spec.stall.0), ns(self.spec.stall.1)),
        )
    }

    /// A host stop due at `now`.
    pub(super) fn due_stop(&mut self, now: u64) -> Option<Stop> {
        if now < self.next_stop_ns || !self.window.active(now) {
            return None;
        }
        self.next_stop_ns = now + self.sched.exp(ns(self.spec.restart_every));
        Some(Stop {
            crash: self.sched.chance(self.spec.crash_p),
            down_ns: self
                .sched
                .between(ns(self.spec.down.0), ns(self.spec.down.1)),
        })
    }

    /// The next time something is due: a held record, a stall, a stop.
    pub(super) fn next_due(&self) -> Option<u64> {
        let held = self
            .events
            .iter()
            .filter_map(|h| h.front().map(|e| e.0))
            .chain(
                self.decisions
                    .iter()
                    .filter_map(|h| h.front().map(|d| d.release_ns)),
            )
            .min();
        [held, Some(self.next_stall_ns), Some(self.next_stop_ns)]
            .into_iter()
            .flatten()
            .filter(|&t| t != u64::MAX)
            .chain(self.window.next_change())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AckInfo, AckStatus, Gtid};
    use std::time::Duration;

    fn ack(cookie: u64) -> Message {
        Message::Ack(AckInfo {
            cpu: 0,
            gtid: Gtid::new(5, 1),
            seq: 1,
            ts_ns: 0,
            cookie,
            status: AckStatus::Ok,
            decision_type: crate::protocol::msg::RUN,
            target_cpu: 0,
        })
    }

    fn open(spec: ChaosSpec) -> Chaos {
        let mut c = Chaos::new(spec, 1, 2);
        c.window.open_at(1000);
        c.open(1000);
        c
    }

    #[test]
    fn delays_keep_queue_order_and_release_everything() {
        let spec = ChaosSpec {
            delay_p: 1.0,
            event_delay: Duration::from_millis(5),
            ..ChaosSpec::none()
        };
        let mut c = open(spec);
        let mut counts = FaultCounts::default();
        let mut msgs: Vec<_> = (0..50).map(|i| ((i % 2) as u16, ack(i))).collect();
        c.filter_events(&mut msgs, 2000, &mut counts);
        assert!(msgs.is_empty(), "every record is held");
        assert_eq!(counts.events_delayed, 50);
        let mut seen = Vec::new();
        let mut t = 2000;
        while seen.len() < 50 {
            t += 100_000;
            assert!(t < 20_000_000, "not released within the bound");
            c.filter_events(&mut msgs, t, &mut counts);
            seen.append(&mut msgs);
        }
        for q in 0..2u16 {
            let cookies: Vec<u64> = seen
                .iter()
                .filter(|(qq, _)| *qq == q)
                .map(|(_, m)| match m {
                    Message::Ack(a) => a.cookie,
                    _ => unreachable!(),
                })
                .collect();
            let mut sorted = cookies.clone();
            sorted.sort();
            assert_eq!(cookies, sorted, "queue {q} kept its order");
            assert_eq!(cookies.len(), 25);
        }
        assert_eq!(c.held(), 0);
    }

    #[test]
    fn acks_are_lost_and_duplicated_only_in_the_window() {
        let spec = ChaosSpec {
            ack_loss: 0.3,
            ack_dup: 0.3,
            window: Some(Duration::from_millis(1)),
            ..ChaosSpec::none()
        };
        let mut c = open(spec);
        let mut counts = FaultCounts::default();
        let mut msgs: Vec<_> = (0..1000).map(|i| (0u16, ack(i))).collect();
        c.filter_events(&mut msgs, 2000, &mut counts);
        assert!(
            counts.acks_lost > 200 && counts.acks_lost < 400,
            "{counts:?}"
        );
        assert!(counts.acks_duplicated > 100, "{counts:?}");
        assert_eq!(
            msgs.len() as u64,
            1000 - counts.acks_lost + counts.acks_duplicated
        );
        // After the window (1 ms after 1000 ns): untouched.
        let mut msgs: Vec<_> = (0..100).map(|i| (0u16, ack(i))).collect();
        let before = counts;
        c.filter_events(&mut msgs, 5_000_000, &mut counts);
        assert_eq!(msgs.len(), 100);
        assert_eq!(counts, before);
    }

    #[test]
    fn misrouted_and_stale_session_decisions() {
        let spec = ChaosSpec {
            misroute: 1.0,
            delay_p: 1.0,
            decision_delay: Duration::from_millis(1),
            ..ChaosSpec::none()
        };
        let mut c = open(spec);
        let mut counts = FaultCounts::default();
        let mut out = Vec::new();
        let recs = vec![(0u16, [1u8; RECORD_SIZE]), (1u16, [2u8; RECORD_SIZE])];
        c.filter_decisions(recs, 7, 2000, &mut counts, &mut out);
        assert!(out.is_empty());
        assert_eq!(counts.decisions_misrouted, 2);
        c.filter_decisions(Vec::new(), 7, 10_000_000, &mut counts, &mut out);
        assert_eq!(out.len(), 2);
        for (q, rec) in &out {
            assert_eq!(
                rec[0],
                if *q == 0 { 2 } else { 1 },
                "went to the other CPU's queue"
            );
        }
        out.clear();
        c.filter_decisions(
            vec![(0, [3; RECORD_SIZE])],
            7,
            20_000_000,
            &mut counts,
            &mut out,
        );
        c.filter_decisions(Vec::new(), 8, 30_000_000, &mut counts, &mut out);
        assert!(out.is_empty(), "made in session 7, due in session 8");
        assert_eq!(counts.held_dropped, 1);
    }

    #[test]
    fn stalls_and_stops_follow_the_seed() {
        let spec = ChaosSpec {
            stall: (Duration::from_millis(10), Duration::from_millis(20)),
            stall_every: Duration::from_millis(100),
            restart_every: Duration::from_secs(1),
            down: (Duration::from_millis(100), Duration::from_millis(100)),
            crash_p: 0.5,
            ..ChaosSpec::none()
        };
        let run = || {
            let mut c = open(spec);
            let (mut stalls, mut stops) = (Vec::new(), Vec::new());
            for t in (0..10_000).map(|i| 1000 + i * 1_000_000) {
                stalls.extend(c.due_stall(t));
                stops.extend(c.due_stop(t));
            }
            (stalls, stops)
        };
        let (stalls, stops) = run();
        assert!(stalls.len() > 50, "{}", stalls.len());
        assert!(stalls
            .iter()
            .all(|&s| (10_000_000..=20_000_000).contains(&s)));
        assert!(!stops.is_empty() && stops.iter().all(|s| s.down_ns == 100_000_000));
        assert_eq!(run(), (stalls, stops), "same seed, same faults");
    }
}
