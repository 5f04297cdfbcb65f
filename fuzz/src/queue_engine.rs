//! `queue_engine`: the device-side queue engine over guest memory the input writes:
//! descriptor tables, avail and used rings, chained and indirect descriptors, bogus lengths
//! and addresses, rings rewritten between (and during a series of) engine calls.
//!
//! Properties: no panic, no hang (libFuzzer's `-timeout`), every access through `vm-memory`
//! (the guest memory has a hole the engine must not touch without an error), every message
//! handed out re-validates as a guest record for the served CPUs, the counters add up, and
//! the decision backlog stays within its limit.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::protocol::{
    parse_record, DecisionInfo, Direction, Message, MAX_BATCH, RECORD_SIZE,
};
use virtio_milk::queue::{EngineConfig, QueueConfig, QueueEngine, RingState};

use crate::gen::{self, Context};
use crate::input::Input;

/// Guest RAM: [0, LOW) and [HIGH, HIGH + HIGH_LEN), with a hole between.
const LOW: u64 = 0x8000;
const HIGH: u64 = 0xa000;
const HIGH_LEN: u64 = 0x2000;
/// Decisions buffered per CPU.
const BACKLOG: usize = 16;
/// Operations per input (a cap against slow units).
const MAX_OPS: usize = 512;

thread_local! {
    static MEM: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH), HIGH_LEN as usize),
    ])
    .expect("fuzz guest memory");
    static KICK: EventFd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
}

fn clear(mem: &GuestMemoryMmap) {
    let zeros = vec![0u8; LOW as usize];
    mem.write_slice(&zeros, GuestAddress(0)).expect("low RAM");
    mem.write_slice(&zeros[..HIGH_LEN as usize], GuestAddress(HIGH))
        .expect("high RAM");
}

/// An address in or around guest RAM (some land in the hole or past the end).
fn addr(inp: &mut Input<'_>) -> u64 {
    match inp.below(8) {
        0 => inp.u64(),
        _ => u64::from(inp.u16()) % (HIGH + HIGH_LEN + 0x100),
    }
}

/// The canonical layout of queue `i`: 0x1000 apart, desc / avail / used.
fn canonical(i: u64, size: u16) -> QueueConfig {
    let base = i * 0x1000;
    QueueConfig {
        size,
        desc_table: base,
        avail_ring: base + 0x400,
        used_ring: base + 0x800,
    }
}

/// One input: a set-up header, then operations until the input is used up.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let num_cpus: u16 = 1 + u16::from(flags & 1);
    let event_idx = flags & 2 != 0;
    let max_batch = 1 + inp.below(MAX_BATCH as u32) as usize;
    let size: u16 = 1 << inp.below(5);
    let nq = u64::from(num_cpus) * 2;
    let queues: Vec<QueueConfig> = (0..nq)
        .map(|i| {
            if flags & 4 == 0 {
                canonical(i, size)
            } else {
                QueueConfig {
                    size: inp.u16(),
                    desc_table: addr(&mut inp),
                    avail_ring: addr(&mut inp),
                    used_ring: addr(&mut inp),
                }
            }
        })
        .collect();
    let (mem, kick) = (
        MEM.with(Clone::clone),
        KICK.with(|k| k.try_clone().expect("dup eventfd")),
    );
    clear(&mem);
    let cfg = EngineConfig {
        num_cpus: u32::from(num_cpus),
        event_idx,
        max_batch,
        backlog_limit: BACKLOG,
        max_queue_size: 16,
    };
    let Ok(mut eng) = QueueEngine::new(mem.clone(), cfg, &queues, kick, Box::new(|_q| Ok(())))
    else {
        return;
    };
    // Driver-side avail index per queue (the input may also scribble on it directly).
    let mut avail_idx = vec![0u16; queues.len()];
    let mut delivered = 0u64;
    let mut out: Vec<(u16, Message)> = Vec::new();
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.below(10) {
            0 => {
                // Raw bytes anywhere (rings, tables, buffers, or outside RAM).
                let a = addr(&mut inp);
                let n = 1 + inp.below(64) as usize;
                let _ = mem.write_slice(inp.bytes(n), GuestAddress(a));
            }
            1 | 2 => {
                // A descriptor: addr, len, flags (NEXT / WRITE / INDIRECT), next.
                let q = &queues[inp.below(nq as u32) as usize];
                let idx = u64::from(inp.u8() % q.size.max(1) as u8);
                let mut d = [0u8; 16];
                d[0..8].copy_from_slice(&addr(&mut inp).to_le_bytes());
                let len = match inp.below(4) {
                    0 => inp.u32(),
                    _ => RECORD_SIZE as u32 * (1 + inp.below(4)),
                };
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&u16::from(inp.u8() & 7).to_le_bytes());
                d[14..16].copy_from_slice(&u16::from(inp.u8() % 17).to_le_bytes());
                let _ = mem.write_slice(&d, GuestAddress(q.desc_table.wrapping_add(idx * 16)));
            }
            3 => {
                // Make a chain available (avail.ring[idx % size] = head; idx += 1, or a jump).
                let qi = inp.below(nq as u32) as usize;
                let q = &queues[qi];
                let head = u16::from(inp.u8() % 17);
                let slot = u64::from(avail_idx[qi] % q.size.max(1));
                let _ = mem.write_obj(head, GuestAddress(q.avail_ring.wrapping_add(4 + 2 * slot)));
                avail_idx[qi] =
                    avail_idx[qi].wrapping_add(if inp.u8() == 0xff { inp.u16() } else { 1 });
                let _ = mem.write_obj(avail_idx[qi], GuestAddress(q.avail_ring.wrapping_add(2)));
            }
            4 => {
                // A valid-format record somewhere (usually where a descriptor points).
                let a = addr(&mut inp) & !(RECORD_SIZE as u64 - 1);
                let m = gen::message(
                    &mut inp,
                    &Context {
                        num_cpus,
                        session_id: 1,
                        seen: &[],
                    },
                );
                let _ = mem.write_slice(&m.encode(), GuestAddress(a));
            }
            5 => {
                out.clear();
                eng.poll_events(&mut out);
                for (cpu, m) in &out {
                    assert!(*cpu < num_cpus, "message from queue of cpu {cpu}");
                    let back = parse_record(&m.encode(), Direction::GuestToHost, cfg.num_cpus);
                    assert_eq!(back.as_ref(), Ok(m), "engine handed out an invalid record");
                }
                delivered += out.len() as u64;
            }
            6 => {
                let cpu = inp.below(u32::from(num_cpus) + 1) as u16;
                let rec = if inp.bool() {
                    let mut r = [0u8; RECORD_SIZE];
                    let b = inp.bytes(RECORD_SIZE);
                    r[..b.len()].copy_from_slice(b);
                    r
                } else {
                    Message::Run(DecisionInfo {
                        cpu,
                        seq: u64::from(inp.u8()),
                        cookie: u64::from(inp.u8()),
                        ..Default::default()
                    })
                    .encode()
                };
                let _ = eng.push_decision(cpu, rec);
            }
            7 => {
                eng.flush();
            }
            8 => match inp.below(4) {
                0 => eng.disable_notifications(),
                1 => {
                    let _ = eng.enable_notifications();
                }
                2 => {
                    let _ = eng.wait_kick(Duration::ZERO);
                }
                _ => {
                    let _ = eng.broken_queues();
                }
            },
            _ => match inp.below(4) {
                0 => {
                    let st = eng.ring_state();
                    assert_eq!(st.len(), queues.len());
                    eng.set_ring_state(&st)
                        .expect("own ring state is importable");
                }
                1 => {
                    let st: Vec<RingState> = (0..nq)
                        .map(|_| RingState {
                            next_avail: inp.u16(),
                            next_used: inp.u16(),
                        })
                        .collect();
                    let _ = eng.set_ring_state(&st);
                }
                2 => {
                    if let Ok(st) = eng.ring_state_from_memory() {
                        let _ = eng.set_ring_state(&st);
                    }
                }
                _ => {
                    if inp.bool() {
                        let _ = eng.take_backlog();
                    } else {
                        let _ = eng.clear_backlog();
                    }
                }
            },
        }
        assert!(
            eng.backlog_len() <= BACKLOG * usize::from(num_cpus),
            "backlog grew past its limit"
        );
        let s = eng.stats();
        assert_eq!(s.records_in, delivered, "records counted but not delivered");
        assert!(s.records_out <= s.decision_chains * max_batch as u64);
    }
}
