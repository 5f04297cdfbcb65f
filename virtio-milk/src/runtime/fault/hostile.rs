//! A hostile host: random but well-framed decisions, acks, HELLOs, HEARTBEATs, GOODBYEs
//! and garbage records for the guest, at a given rate, mixed into the policy's own
//! traffic. Decisions carry [`INJECTED_COOKIE`] so their acks are counted apart
//! (`Metrics::injected_acks`) and never reach the policy.

use super::counts::FaultCounts;
use super::rng::Rng;
use super::spec::HostileSpec;
use super::Window;
use crate::metrics::monotonic_ns;
use crate::policy::SchedView;
use crate::protocol::{
    msg, AckInfo, AckStatus, DecisionInfo, Gtid, Message, SessionInfo, PROTOCOL_VERSION,
    RECORD_SIZE, RUN_F_PREEMPT,
};
use crate::runtime::INJECTED_COOKIE;

/// Cookie bit of hostile decisions (with [`INJECTED_COOKIE`]), apart from
/// `RuntimeHandle::inject_decisions`' own.
pub const HOSTILE_COOKIE: u64 = 1 << 62;

/// Most records one tick sends (a long stall of the loop does not turn into a flood).
const MAX_PER_TICK: u64 = 256;

/// Types the guest accepts from the host: every other one is garbage to it.
const HOST_TYPES: [u16; 5] = [
    msg::HELLO,
    msg::HEARTBEAT,
    msg::GOODBYE,
    msg::RUN,
    msg::PREEMPT,
];

/// What one hostile record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Decision,
    Ack,
    Hello,
    Heartbeat,
    Goodbye,
    Garbage,
}

/// State of a hostile run.
pub(super) struct Hostile {
    rate: u32,
    rng: Rng,
    pub(super) window: Window,
    last_tick_ns: u64,
    /// Fraction of a record owed from the last tick, in records * 1e9.
    carry: u64,
    sent: u64,
}

impl Hostile {
    /// Ticks are this far apart at most while the window is open.
    pub(super) const TICK_NS: u64 = 5_000_000;

    pub(super) fn new(spec: HostileSpec, seed: u64) -> Self {
        Hostile {
            rate: spec.rate,
            rng: Rng::new(seed),
            window: Window::new(spec.after, Some(spec.duration)),
            last_tick_ns: 0,
            carry: 0,
            sent: 0,
        }
    }

    /// How many records are due at `now` (rate times the time since the last tick).
    pub(super) fn due(&mut self, now: u64) -> u64 {
        let start = self.window.start().unwrap_or(now);
        let since = now.saturating_sub(self.last_tick_ns.max(start));
        self.last_tick_ns = now;
        let owed = u128::from(since) * u128::from(self.rate) + u128::from(self.carry);
        let n = (owed / 1_000_000_000) as u64;
        self.carry = (owed % 1_000_000_000) as u64;
        n.min(MAX_PER_TICK)
    }

    /// One hostile record for a guest with `num_cpus` CPUs, whose tasks the host knows
    /// as `view`, in host session `session`. Returns its kind, the decision queue to
    /// write it to and the record.
    pub(super) fn record(
        &mut self,
        view: &SchedView,
        num_cpus: u32,
        session: u64,
    ) -> (Kind, u16, [u8; RECORD_SIZE]) {
        self.sent += 1;
        let r = &mut self.rng;
        let queue = r.below(u64::from(num_cpus)) as u16;
        let kind = match r.below(100) {
            0..=44 => Kind::Decision,
            45..=79 => Kind::Garbage,
            80..=87 => Kind::Ack,
            88..=94 => Kind::Heartbeat,
            95..=97 => Kind::Hello,
            _ => Kind::Goodbye,
        };
        let rec = match kind {
            Kind::Decision => self.decision(view, num_cpus),
            Kind::Ack => Message::Ack(AckInfo {
                cpu: self.cpu(num_cpus),
                gtid: self.gtid(view),
                seq: self.rng.next_u64(),
                ts_ns: monotonic_ns(),
                cookie: self.rng.next_u64(),
                status: AckStatus::ALL[self.rng.below(AckStatus::ALL.len() as u64) as usize],
                decision_type: if self.rng.chance(0.5) {
                    msg::RUN
                } else {
                    msg::PREEMPT
                },
                target_cpu: self.cpu(num_cpus),
            })
            .encode(),
            Kind::Hello | Kind::Heartbeat | Kind::Goodbye => {
                let s = self.session(session);
                match kind {
                    Kind::Hello => Message::Hello(s),
                    Kind::Heartbeat => Message::Heartbeat(s),
                    _ => Message::Goodbye(s),
                }
                .encode()
            }
            Kind::Garbage => self.garbage(),
        };
        (kind, queue, rec)
    }

    /// A CPU index: mostly in range, sometimes just past it, sometimes absurd.
    fn cpu(&mut self, num_cpus: u32) -> u16 {
        match self.rng.below(10) {
            0..=6 => self.rng.below(u64::from(num_cpus)) as u16,
            7 | 8 => (num_cpus as u16).saturating_add(self.rng.below(64) as u16),
            _ => self.rng.next_u64() as u16,
        }
    }

    /// A task: a known one, a known pid in another generation, or made up.
    fn gtid(&mut self, view: &SchedView) -> Gtid {
        let n = view.tasks.len() as u64;
        match self.rng.below(10) {
            0..=4 if n > 0 => {
                let i = self.rng.below(n) as usize;
                view.tasks.keys().nth(i).copied().unwrap_or_default()
            }
            5 | 6 if n > 0 => {
                let i = self.rng.below(n) as usize;
                let g = view.tasks.keys().nth(i).copied().unwrap_or_default();
                Gtid::new(
                    g.pid(),
                    g.generation().wrapping_add(1 + self.rng.below(3) as u32),
                )
            }
            7 => Gtid(0),
            _ => Gtid::new(self.rng.next_u64() as u32, self.rng.next_u64() as u32),
        }
    }

    fn decision(&mut self, view: &SchedView, num_cpus: u32) -> [u8; RECORD_SIZE] {
        let gtid = self.gtid(view);
        let known = view.tasks.get(&gtid).map(|t| t.seq);
        let seq = match (known, self.rng.below(4)) {
            (Some(s), 0 | 1) => s,
            (Some(s), 2) => s.saturating_sub(1 + self.rng.below(8)),
            _ => self.rng.next_u64(),
        };
        let slice_ns = match self.rng.below(4) {
            0 => 0,
            1 => u64::MAX,
            2 => self.rng.below(100_000),
            _ => self.rng.next_u64(),
        };
        let flags = match self.rng.below(4) {
            0 | 1 => 0,
            2 => RUN_F_PREEMPT,
            _ => self.rng.next_u64() as u32,
        };
        let d = DecisionInfo {
            cpu: self.cpu(num_cpus),
            gtid,
            seq,
            ts_ns: monotonic_ns(),
            slice_ns,
            cookie: INJECTED_COOKIE | HOSTILE_COOKIE | (self.sent & (HOSTILE_COOKIE - 1)),
            flags,
        };
        if self.rng.chance(0.8) {
            Message::Run(d)
        } else {
            Message::Preempt(DecisionInfo { seq: 0, ..d })
        }
        .encode()
    }

    fn session(&mut self, current: u64) -> SessionInfo {
        let r = &mut self.rng;
        let mut name = [0u8; 16];
        for b in &mut name {
            *b = r.next_u64() as u8;
        }
        SessionInfo {
            cpu: r.below(4) as u16,
            num_cpus: r.below(128) as u32,
            heartbeat_ms: r.next_u64() as u32,
            session_id: match r.below(4) {
                0 => current,
                1 => 0,
                _ => r.next_u64(),
            },
            ts_ns: r.next_u64(),
            counter: r.next_u64() % 8,
            name,
            flags: r.next_u64() as u32,
            tick_us: r.next_u64() as u32,
        }
    }

    /// Random bytes with a header the guest must refuse: a length other than 64, a
    /// version other than ours, or a type the host never sends.
    fn garbage(&mut self) -> [u8; RECORD_SIZE] {
        let mut rec = [0u8; RECORD_SIZE];
        for chunk in rec.chunks_mut(8) {
            chunk.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let mut ty = u16::from_le_bytes([rec[0], rec[1]]);
        let mut len = RECORD_SIZE as u16;
        let mut version = PROTOCOL_VERSION;
        match self.rng.below(3) {
            0 => {
                len = self.rng.next_u64() as u16;
                if len == RECORD_SIZE as u16 {
                    len = 0;
                }
            }
            1 => {
                version = self.rng.next_u64() as u8;
                if version == PROTOCOL_VERSION {
                    version = 1;
                }
            }
            _ => {
                // A guest-to-host type half of the time, else anything unknown.
                if self.rng.chance(0.5) {
                    const G2H: [u16; 17] = [
                        msg::TASK_NEW,
                        msg::TASK_WAKEUP,
                        msg::TASK_BLOCKED,
                        msg::TASK_PREEMPT,
                        msg::TASK_YIELD,
                        msg::TASK_DEAD,
                        msg::TASK_AFFINITY,
                        msg::TASK_PRIORITY,
                        msg::TASK_DEPARTED,
                        msg::TASK_RUNNING,
                        msg::TASK_FALLBACK,
                        msg::CPU_IDLE,
                        msg::CPU_BUSY,
                        msg::CPU_TICK,
                        msg::CPU_RELEASE,
                        msg::CPU_ACQUIRE,
                        msg::ACK,
                    ];
                    ty = G2H[self.rng.below(G2H.len() as u64) as usize];
                }
            }
        }
        while len == RECORD_SIZE as u16 && version == PROTOCOL_VERSION && HOST_TYPES.contains(&ty) {
            ty = self.rng.next_u64() as u16;
        }
        rec[0..2].copy_from_slice(&ty.to_le_bytes());
        rec[2..4].copy_from_slice(&len.to_le_bytes());
        rec[4] = version;
        rec
    }
}

/// Counts one hostile record of `kind`.
pub(super) fn count(c: &mut FaultCounts, kind: Kind) {
    match kind {
        Kind::Decision => c.hostile_decisions += 1,
        Kind::Ack => c.hostile_acks += 1,
        Kind::Hello => c.hostile_hellos += 1,
        Kind::Heartbeat => c.hostile_heartbeats += 1,
        Kind::Goodbye => c.hostile_goodbyes += 1,
        Kind::Garbage => c.hostile_garbage += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::TaskInfo;
    use crate::protocol::{parse_record, Direction};

    fn hostile(seed: u64) -> Hostile {
        let spec = HostileSpec::parse("1,rate=1000").unwrap();
        let mut h = Hostile::new(spec, seed);
        h.window.open_at(0);
        h
    }

    #[test]
    fn records_are_well_framed_or_garbage_the_guest_refuses() {
        let mut view = SchedView::new(2);
        for pid in 1..20 {
            let g = Gtid::new(pid, 1);
            view.tasks.insert(g, TaskInfo::new(g, 3));
        }
        let mut h = hostile(3);
        let mut kinds = std::collections::HashMap::new();
        for _ in 0..20_000 {
            let (kind, queue, rec) = h.record(&view, 2, 77);
            assert!(queue < 2);
            *kinds.entry(kind).or_insert(0u32) += 1;
            let ty = u16::from_le_bytes([rec[0], rec[1]]);
            let len = u16::from_le_bytes([rec[2], rec[3]]);
            let framed = len == 64 && rec[4] == PROTOCOL_VERSION && HOST_TYPES.contains(&ty);
            assert_eq!(
                framed,
                !matches!(kind, Kind::Garbage | Kind::Ack),
                "{kind:?}: type {ty:#x} len {len} version {}",
                rec[4]
            );
            if kind == Kind::Ack {
                assert_eq!(ty, msg::ACK);
            }
            if kind == Kind::Decision {
                // What the host's own parser makes of it (the guest checks less).
                let cookie = u64::from_le_bytes(rec[40..48].try_into().unwrap());
                assert_eq!(
                    cookie & (INJECTED_COOKIE | HOSTILE_COOKIE),
                    INJECTED_COOKIE | HOSTILE_COOKIE
                );
                let _ = parse_record(&rec, Direction::HostToGuest, 2);
            }
        }
        for k in [
            Kind::Decision,
            Kind::Ack,
            Kind::Hello,
            Kind::Heartbeat,
            Kind::Goodbye,
            Kind::Garbage,
        ] {
            assert!(kinds.get(&k).copied().unwrap_or(0) > 100, "{kinds:?}");
        }
    }

    #[test]
    fn rate_is_kept_and_bounded() {
        let mut h = hostile(1);
        let mut n = 0;
        for t in 1..=200 {
            n += h.due(t * 5_000_000);
        }
        assert_eq!(n, 1000, "1000 records per second for one second");
        assert_eq!(
            h.due(100 * 1_000_000_000),
            MAX_PER_TICK,
            "a stall does not flood"
        );
    }
}
