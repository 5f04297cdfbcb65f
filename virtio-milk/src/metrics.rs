//! Runtime metrics: counters and a log-linear latency histogram, plus the summary printed
//! at exit (`milk-vmm --policy fifo` prints [`Summary`]).

use std::fmt;
use std::time::Duration;

use crate::protocol::{msg, type_name, AckStatus};
use crate::queue::{EngineStats, Malformed};

/// CLOCK_MONOTONIC in ns: the common clock of the runtime and the loopback guest thread.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(ts.tv_nsec as u64)
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;
const BUCKETS: usize = (2 * SUB + (63 - SUB_BITS as u64) * SUB) as usize;

/// Log-linear histogram of nanosecond values: exact below 64 ns, then 32 buckets per power
/// of two (relative bucket width <= 1/32). Fixed size, no allocation after creation.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.total)
            .field("p50", &self.percentile(50.0))
            .field("p99", &self.percentile(99.0))
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < 2 * SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let shift = e - SUB_BITS;
    let mantissa = v >> shift;
    (2 * SUB + u64::from(shift - 1) * SUB + (mantissa - SUB)) as usize
}

fn bucket_low(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < 2 * SUB {
        return idx;
    }
    let shift = (idx - 2 * SUB) / SUB + 1;
    let mantissa = (idx - 2 * SUB) % SUB + SUB;
    mantissa << shift
}

fn bucket_high(idx: usize) -> u64 {
    if idx + 1 >= BUCKETS {
        u64::MAX
    } else {
        bucket_low(idx + 1) - 1
    }
}

impl Histogram {
    /// Record one value in ns.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Smallest value (0 if empty).
    pub fn min(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest value.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean (0 if empty).
    pub fn mean(&self) -> u64 {
        if self.total == 0 {
            0
        } else {
            (self.sum / u128::from(self.total)) as u64
        }
    }

    /// Value at percentile `p` (0..=100): the midpoint of the bucket holding it, clamped to
    /// the observed min/max. 0 if empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let lo = bucket_low(i);
                let hi = bucket_high(i);
                let mid = lo + (hi - lo) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }

    /// Add another histogram's values.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// Runtime counters.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Valid messages received, by type (index = type & 0x7f).
    pub msgs_by_type: [u64; 128],
    /// RUN decisions sent.
    pub decisions_run: u64,
    /// PREEMPT decisions sent.
    pub decisions_preempt: u64,
    /// Acks received by status.
    pub acks: [u64; AckStatus::COUNT],
    /// Task events whose seq was not newer than the last seen (dropped).
    pub stale_events: u64,
    /// Task events for pids the runtime does not know (dropped).
    pub unknown_task_events: u64,
    /// Decisions the policy emitted that the runtime refused (bad pid/cpu/state).
    pub policy_rejects: u64,
    /// Decisions that could not be queued because a backlog was full.
    pub queue_full: u64,
    /// RUN acks that did not match the CPU's in-flight decision (ignored).
    pub unmatched_acks: u64,
    /// Undelivered decisions dropped when a new session started.
    pub dropped_old_decisions: u64,
    /// Guest records found queued when the runtime started (from before its session),
    /// dropped unprocessed.
    pub discarded_on_start: u64,
    /// HELLO/HEARTBEAT/GOODBYE sent to the guest.
    pub session_sent: u64,
    /// Policy swaps done.
    pub policy_swaps: u64,
    /// Local fallback dispatches the guest reported in its last HEARTBEAT.
    pub guest_fallbacks: u64,
    /// Event -> decision latency (ns) measured on the host: from the poll that received the
    /// event making a task runnable to the RUN decision being queued.
    pub latency: Histogram,
    /// Decision -> applied latency (ns), host clock: from a RUN being queued to the poll
    /// that received its OK ack (delivery, the guest's dispatch() applying it, the ack's
    /// trip back). Only RUNs the runtime is committed to (not injected ones).
    pub apply_latency: Histogram,
    /// Decisions written by the fault-injection hook (`RuntimeHandle::inject_decisions`).
    pub injected: u64,
    /// Acks of injected decisions, by status (also included in `acks`).
    pub injected_acks: [u64; AckStatus::COUNT],
    /// RUNs sent to a busy CPU (staged by the guest until its next dispatch).
    pub decisions_staged: u64,
    /// RUNs sent with F_PREEMPT.
    pub decisions_run_preempt: u64,
    /// Guests refused for speaking another protocol version.
    pub version_refusals: u64,
    /// Commitments given up after `ack_timeout` without an ack.
    pub commit_timeouts: u64,
    /// Commitments resolved by a CPU_IDLE / CPU_BUSY of their CPU (the guest moved on).
    pub commits_resolved_by_cpu_event: u64,
    /// OK acks of decisions no longer tracked (after a timeout or resolution).
    pub late_ok_acks: u64,
    /// TASK_FALLBACK records: the guest dispatched a task itself.
    pub fallbacks_reported: u64,
    /// TASK_DEPARTED records.
    pub departed: u64,
    /// TASK_NEW reusing the pid of a known task with another generation.
    pub pid_reuse: u64,
    /// Outcomes of decisions made by a policy swapped out since (not passed on).
    pub stale_policy_outcomes: u64,
    /// Decisions submitted for a policy epoch no longer installed (refused).
    pub stale_policy_decisions: u64,
    /// Policy timers fired.
    pub timers_fired: u64,
    /// CPU_TICK records.
    pub ticks: u64,
    /// Per swap: the loop's time in the swap (revoke, attach, HELLO, first schedule), ns.
    pub swap_stall: Histogram,
    /// Per swap: last decision of the old policy -> first decision of the new one, ns.
    pub swap_blackout: Histogram,
    /// Gap between two consecutive decisions of the same policy, ns (what a swap's
    /// blackout compares with).
    pub decision_gap: Histogram,
    /// The last RUN the policy swapped out last had written (for late-replay tests).
    pub last_run_before_swap: Option<crate::runtime::RawDecision>,
    /// Faults a chaos or hostile-host run injected (all zero otherwise).
    pub faults: crate::runtime::FaultCounts,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            msgs_by_type: [0; 128],
            decisions_run: 0,
            decisions_preempt: 0,
            acks: [0; AckStatus::COUNT],
            stale_events: 0,
            unknown_task_events: 0,
            policy_rejects: 0,
            queue_full: 0,
            unmatched_acks: 0,
            dropped_old_decisions: 0,
            discarded_on_start: 0,
            session_sent: 0,
            policy_swaps: 0,
            guest_fallbacks: 0,
            latency: Histogram::default(),
            apply_latency: Histogram::default(),
            injected: 0,
            injected_acks: [0; AckStatus::COUNT],
            decisions_staged: 0,
            decisions_run_preempt: 0,
            version_refusals: 0,
            commit_timeouts: 0,
            commits_resolved_by_cpu_event: 0,
            late_ok_acks: 0,
            fallbacks_reported: 0,
            departed: 0,
            pid_reuse: 0,
            stale_policy_outcomes: 0,
            stale_policy_decisions: 0,
            timers_fired: 0,
            ticks: 0,
            swap_stall: Histogram::default(),
            swap_blackout: Histogram::default(),
            decision_gap: Histogram::default(),
            last_run_before_swap: None,
            faults: crate::runtime::FaultCounts::default(),
        }
    }
}

impl Metrics {
    /// Count a received message type.
    pub fn count_msg(&mut self, ty: u16) {
        self.msgs_by_type[usize::from(ty & 0x7f)] += 1;
    }

    /// Total valid messages received.
    pub fn messages(&self) -> u64 {
        self.msgs_by_type.iter().sum()
    }

    /// Total acks received.
    pub fn acks_total(&self) -> u64 {
        self.acks.iter().sum()
    }
}

/// Everything a runtime run produced; `Display` is the exit summary.
#[derive(Clone, Debug)]
pub struct Summary {
    /// Policy active at the end.
    pub policy: String,
    /// Wall time the runtime ran.
    pub elapsed: Duration,
    /// Runtime counters.
    pub metrics: Metrics,
    /// Queue engine counters.
    pub engine: EngineStats,
    /// Session id the runtime offered last (0: none yet).
    pub session_id: u64,
    /// Whether the guest echoed that session's HELLO.
    pub session_established: bool,
    /// Tasks in the runtime's task table.
    pub tasks: usize,
    /// Their pids, sorted (to compare with the guest's own list).
    pub task_pids: Vec<u32>,
    /// Decisions sent and not acknowledged when the summary was taken
    /// (commitments still held; at the end: CPUs left committed).
    pub outstanding: usize,
}

fn fmt_ns(ns: u64) -> String {
    if ns >= 1_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else if ns >= 1_000 {
        format!("{:.2} us", ns as f64 / 1e3)
    } else {
        format!("{ns} ns")
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.metrics;
        writeln!(
            f,
            "virtio-milk summary: policy {}, {:.3} s",
            self.policy,
            self.elapsed.as_secs_f64()
        )?;
        write!(f, "  messages: {}", m.messages())?;
        let mut sep = " (";
        for ty in 0u16..128 {
            let c = m.msgs_by_type[usize::from(ty)];
            if c > 0 {
                write!(f, "{sep}{} {c}", type_name(ty))?;
                sep = ", ";
            }
        }
        writeln!(f, "{}", if sep == ", " { ")" } else { "" })?;
        writeln!(
            f,
            "  decisions: {} (RUN {} [staged {}, preempting {}], PREEMPT {})",
            m.decisions_run + m.decisions_preempt,
            m.decisions_run,
            m.decisions_staged,
            m.decisions_run_preempt,
            m.decisions_preempt
        )?;
        write!(f, "  acks:")?;
        for s in AckStatus::ALL {
            write!(f, " {} {}", s.name(), m.acks[s as usize])?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  rejections: {}  guest fallbacks: {} (reported {})",
            m.acks_total() - m.acks[AckStatus::Ok as usize],
            m.guest_fallbacks,
            m.fallbacks_reported
        )?;
        writeln!(
            f,
            "  commitments: {} timed out, {} resolved by cpu events, {} late OK acks, {} outstanding",
            m.commit_timeouts, m.commits_resolved_by_cpu_event, m.late_ok_acks, self.outstanding
        )?;
        if m.version_refusals > 0 {
            writeln!(
                f,
                "  refused guests (protocol version): {}",
                m.version_refusals
            )?;
        }
        write!(
            f,
            "  protocol errors: {} malformed",
            self.engine.malformed_total()
        )?;
        for why in Malformed::ALL {
            let c = self.engine.malformed[why as usize];
            if c > 0 {
                write!(f, " [{} {c}]", why.name())?;
            }
        }
        writeln!(
            f,
            ", {} stale events, {} unknown-task events, {} unmatched acks, {} policy rejects",
            m.stale_events, m.unknown_task_events, m.unmatched_acks, m.policy_rejects
        )?;
        writeln!(
            f,
            "  queue full: {} (backlog overflow {}, no decision buffer {})",
            m.queue_full + self.engine.decision_queue_empty,
            self.engine.backlog_overflow,
            self.engine.decision_queue_empty
        )?;
        write!(
            f,
            "  event->decision: p50 {} p99 {} (n={}, max {})",
            fmt_ns(m.latency.percentile(50.0)),
            fmt_ns(m.latency.percentile(99.0)),
            m.latency.count(),
            fmt_ns(m.latency.max())
        )?;
        if m.apply_latency.count() > 0 {
            write!(
                f,
                "\n  decision->applied ack: p50 {} p99 {} (n={}, max {})",
                fmt_ns(m.apply_latency.percentile(50.0)),
                fmt_ns(m.apply_latency.percentile(99.0)),
                m.apply_latency.count(),
                fmt_ns(m.apply_latency.max())
            )?;
        }
        if m.discarded_on_start > 0 {
            write!(
                f,
                "\n  records queued before this runtime started (dropped): {}",
                m.discarded_on_start
            )?;
        }
        if m.policy_swaps > 0 {
            write!(
                f,
                "\n  policy swaps: {} (stale outcomes {}, stale decisions {}); stall p50 {} max {}; \
                 blackout p50 {} max {} (decision gap p50 {} p99 {})",
                m.policy_swaps,
                m.stale_policy_outcomes,
                m.stale_policy_decisions,
                fmt_ns(m.swap_stall.percentile(50.0)),
                fmt_ns(m.swap_stall.max()),
                fmt_ns(m.swap_blackout.percentile(50.0)),
                fmt_ns(m.swap_blackout.max()),
                fmt_ns(m.decision_gap.percentile(50.0)),
                fmt_ns(m.decision_gap.percentile(99.0))
            )?;
        }
        if m.faults.chaos_seed != 0 || m.faults.hostile_seed != 0 {
            write!(f, "\n  faults: {}", m.faults)?;
        }
        if m.injected > 0 || m.faults.hostile_decisions > 0 {
            write!(
                f,
                "\n  injected decisions: {} (+ {} hostile), acks:",
                m.injected, m.faults.hostile_decisions
            )?;
            for s in AckStatus::ALL {
                write!(f, " {} {}", s.name(), m.injected_acks[s as usize])?;
            }
        }
        Ok(())
    }
}

/// Name of a decision type for acks.
pub fn decision_name(ty: u16) -> &'static str {
    match ty {
        msg::RUN => "RUN",
        msg::PREEMPT => "PREEMPT",
        _ => "?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_monotonic() {
        let mut prev_hi = None;
        for i in 0..BUCKETS {
            let lo = bucket_low(i);
            if let Some(p) = prev_hi {
                assert_eq!(lo, p + 1, "gap before bucket {i}");
            }
            assert_eq!(bucket_of(lo), i);
            let hi = bucket_high(i);
            assert_eq!(bucket_of(hi), i);
            prev_hi = Some(hi);
        }
        assert_eq!(prev_hi, Some(u64::MAX));
    }

    #[test]
    fn relative_error_is_bounded() {
        for v in [100u64, 1_234, 56_789, 1_000_000, 123_456_789_012] {
            let i = bucket_of(v);
            let w = bucket_high(i) - bucket_low(i) + 1;
            assert!(w as f64 / v as f64 <= 1.0 / 32.0 + 1e-9, "v={v} width={w}");
        }
    }

    #[test]
    fn percentiles_of_uniform_values() {
        let mut h = Histogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.04, "p50 {p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.04, "p99 {p99}");
        assert_eq!(h.min(), 1);
        assert_eq!(h.max(), 10_000);
        assert_eq!(h.mean(), 5000);
        assert_eq!(h.percentile(100.0), 10_000);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Histogram::default();
        let mut b = Histogram::default();
        a.record(10);
        b.record(1_000_000);
        a.merge(&b);
        assert_eq!(a.count(), 2);
        assert_eq!(a.max(), 1_000_000);
        assert_eq!(a.min(), 10);
        assert_eq!(Histogram::default().percentile(50.0), 0);
    }
}
