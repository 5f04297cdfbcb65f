//! Valid-format guest records from fuzzer bytes: real message types with fields drawn from
//! small domains (a few pids and generations, small seqs, CPUs around the served count), so
//! sequences of them reach the runtime's task, seq, ack and session logic instead of dying
//! in the parser.

use virtio_milk::policy::Gtid;
use virtio_milk::protocol::{
    msg, pack_name, AckInfo, AckStatus, AffinityInfo, CpuEventKind, EventInfo, Message,
    PriorityInfo, SessionInfo, TaskEventKind, TaskNewInfo, HELLO_FLAGS_ALL,
};

use crate::input::Input;

/// A decision the simulated guest received, which a generated ACK may answer.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    /// The decision's cookie.
    pub cookie: u64,
    /// Its task.
    pub gtid: Gtid,
    /// Its seq.
    pub seq: u64,
    /// Its target CPU.
    pub cpu: u16,
    /// `msg::RUN` or `msg::PREEMPT`.
    pub ty: u16,
}

/// What the generator may refer to.
pub struct Context<'a> {
    /// CPUs served.
    pub num_cpus: u16,
    /// The host's current session id (0: none yet).
    pub session_id: u64,
    /// Decisions received and not answered yet.
    pub seen: &'a [Seen],
}

/// A task identity from a pool of 4 pids x 2 generations.
pub fn gtid(inp: &mut Input<'_>) -> Gtid {
    let b = inp.u8();
    Gtid::new(1 + u32::from(b & 3), 1 + u32::from((b >> 2) & 1))
}

fn cpu(inp: &mut Input<'_>, n: u16) -> u16 {
    // Mostly served CPUs, sometimes one past them (the parser must refuse it).
    inp.below(u32::from(n) + 1) as u16
}

fn mask(inp: &mut Input<'_>, n: u16) -> u64 {
    let m = u64::from(inp.u8());
    if inp.bool() {
        m
    } else {
        m & ((1u64 << n) - 1)
    }
}

fn event(inp: &mut Input<'_>, n: u16, gtid: Gtid) -> EventInfo {
    EventInfo {
        cpu: cpu(inp, n),
        gtid,
        seq: u64::from(inp.u8()),
        ts_ns: 0,
        runtime_ns: u64::from(inp.u16()) * 1000,
        enq_flags: u64::from(inp.u8()),
        slice_ns: u64::from(inp.u16()) * 1000,
        arg: inp.below(4),
        src_cpu: cpu(inp, n),
    }
}

/// One guest-to-host message.
pub fn message(inp: &mut Input<'_>, ctx: &Context<'_>) -> Message {
    let n = ctx.num_cpus;
    match inp.below(12) {
        0 => {
            let session_id = match inp.below(3) {
                0 => 0,
                1 => ctx.session_id,
                _ => u64::from(inp.u8()),
            };
            Message::Hello(SessionInfo {
                num_cpus: u32::from(n),
                session_id,
                name: pack_name("linux"),
                flags: inp.u32() & HELLO_FLAGS_ALL,
                tick_us: u32::from(inp.u16()),
                ..Default::default()
            })
        }
        1 => Message::Heartbeat(SessionInfo {
            session_id: ctx.session_id,
            counter: u64::from(inp.u16()),
            ..Default::default()
        }),
        2 => Message::Goodbye(SessionInfo {
            session_id: ctx.session_id,
            counter: u64::from(inp.below(4)),
            ..Default::default()
        }),
        3 | 4 => {
            let g = gtid(inp);
            Message::TaskNew(TaskNewInfo {
                cpu: cpu(inp, n),
                gtid: g,
                seq: 1 + u64::from(inp.below(2)),
                ts_ns: 0,
                comm: pack_name("fuzz"),
                cpus_allowed: mask(inp, n),
                tgid: g.pid(),
                weight: 1 + inp.below(200),
                nice: inp.below(40) as i32 - 20,
            })
        }
        5..=7 => {
            let kind = TaskEventKind::ALL[inp.below(TaskEventKind::ALL.len() as u32) as usize];
            let g = gtid(inp);
            Message::Task(kind, event(inp, n, g))
        }
        8 => {
            let kind = CpuEventKind::ALL[inp.below(CpuEventKind::ALL.len() as u32) as usize];
            let g = if inp.bool() { Gtid(0) } else { gtid(inp) };
            let mut e = event(inp, n, g);
            e.arg = 0;
            Message::Cpu(kind, e)
        }
        9 => Message::TaskAffinity(AffinityInfo {
            cpu: cpu(inp, n),
            gtid: gtid(inp),
            seq: u64::from(inp.u8()),
            ts_ns: 0,
            cpus_allowed: mask(inp, n),
        }),
        10 => Message::TaskPriority(PriorityInfo {
            cpu: cpu(inp, n),
            gtid: gtid(inp),
            seq: u64::from(inp.u8()),
            ts_ns: 0,
            weight: 1 + inp.below(10000),
            nice: inp.below(40) as i32 - 20,
        }),
        _ => {
            let status = AckStatus::from_wire(inp.below(6)).unwrap_or(AckStatus::Ok);
            let a = match ctx.seen.len() {
                0 => None,
                k => ctx.seen.get(inp.below(k as u32 + 1) as usize),
            };
            let s = a.copied().unwrap_or(Seen {
                cookie: u64::from(inp.u8()),
                gtid: gtid(inp),
                seq: u64::from(inp.u8()),
                cpu: cpu(inp, n),
                ty: if inp.bool() { msg::RUN } else { msg::PREEMPT },
            });
            Message::Ack(AckInfo {
                cpu: s.cpu,
                gtid: s.gtid,
                seq: s.seq,
                ts_ns: 0,
                cookie: s.cookie,
                status,
                decision_type: s.ty,
                target_cpu: s.cpu,
            })
        }
    }
}
