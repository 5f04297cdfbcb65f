//! `runtime`: the host policy runtime (task table, seqs, acks and commitments, sessions,
//! policy swap) with a real policy, fed valid-format guest records through real queues by a
//! simulated guest driver that also answers the decisions it receives. After every
//! operation `Runtime::check_invariants` must hold (no task committed twice or dispatched
//! without its RUN outstanding, pending lists = commitments, pid index = task table,
//! messages counted = records delivered), and the host's output must parse as host records.

use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::protocol::{msg, parse_record, Direction, Message, RECORD_SIZE};
use virtio_milk::queue::{EngineConfig, QueueEngine};
use virtio_milk::runtime::{Runtime, RuntimeConfig};

use crate::gen::{self, Context, Seen};
use crate::input::Input;

const CPUS: u16 = 2;
const QSIZE: u16 = 8;
const BATCH: usize = 4;
/// Operations per input.
const MAX_OPS: usize = 256;
/// Decisions remembered for the guest's ACKs.
const MAX_SEEN: usize = 32;

thread_local! {
    static LM: LoopbackMemory =
        LoopbackMemory::new(CPUS, QSIZE, (BATCH * RECORD_SIZE) as u32).expect("loopback memory");
    static KICK: EventFd = EventFd::new(EFD_NONBLOCK).expect("eventfd");
}

const POLICIES: [&str; 4] = ["fifo", "rr", "fifo:slice_us=100", "rr:slice_us=50"];

struct Guest<'a> {
    lm: &'a LoopbackMemory,
    dq: Vec<DriverQueue>,
}

impl Guest<'_> {
    fn send(&mut self, cpu: u16, msgs: &[Message]) {
        let q = usize::from(cpu) * 2;
        while self.dq[q].pop_used(&self.lm.mem).is_some() {}
        let Some(d) = self.dq[q].next_free_desc() else {
            return;
        };
        let a = self.lm.buffer(q as u16, d);
        for (i, m) in msgs.iter().enumerate() {
            self.lm
                .mem
                .write_slice(&m.encode(), GuestAddress(a + (i * RECORD_SIZE) as u64))
                .expect("loopback buffer");
        }
        let len = (msgs.len() * RECORD_SIZE) as u32;
        self.dq[q].add_chain(&self.lm.mem, &[(a, len, false)]);
        self.dq[q].publish(&self.lm.mem);
    }

    fn post_decision_buffers(&mut self) {
        for q in (1..self.dq.len()).step_by(2) {
            while let Some(d) = self.dq[q].next_free_desc() {
                let a = self.lm.buffer(q as u16, d);
                self.dq[q].add_chain(&self.lm.mem, &[(a, self.lm.buf_bytes(), true)]);
            }
            self.dq[q].publish(&self.lm.mem);
        }
    }

    /// Every record on the decision queues; each must be a valid host record.
    fn recv(&mut self, seen: &mut Vec<Seen>) {
        for cpu in 0..CPUS {
            let q = usize::from(cpu) * 2 + 1;
            while let Some((head, len)) = self.dq[q].pop_used(&self.lm.mem) {
                assert!(
                    (len as usize).is_multiple_of(RECORD_SIZE)
                        && len as usize <= BATCH * RECORD_SIZE,
                    "used length {len}"
                );
                let a = self.lm.buffer(q as u16, head);
                for i in 0..len as usize / RECORD_SIZE {
                    let mut raw = [0u8; RECORD_SIZE];
                    self.lm
                        .mem
                        .read_slice(&mut raw, GuestAddress(a + (i * RECORD_SIZE) as u64))
                        .expect("loopback buffer");
                    let m = parse_record(&raw, Direction::HostToGuest, u32::from(CPUS))
                        .unwrap_or_else(|e| panic!("host wrote an invalid record: {e}"));
                    let d = match m {
                        Message::Run(d) => Some((d, msg::RUN)),
                        Message::Preempt(d) => Some((d, msg::PREEMPT)),
                        _ => None,
                    };
                    if let Some((d, ty)) = d {
                        assert_eq!(
                            d.cpu, cpu,
                            "decision for CPU {} on CPU {cpu}'s queue",
                            d.cpu
                        );
                        if seen.len() == MAX_SEEN {
                            seen.remove(0);
                        }
                        seen.push(Seen {
                            cookie: d.cookie,
                            gtid: d.gtid,
                            seq: d.seq,
                            cpu: d.cpu,
                            ty,
                        });
                    }
                }
            }
        }
        self.post_decision_buffers();
    }
}

/// One input: a set-up byte, then operations until the input is used up.
pub fn run(data: &[u8]) {
    let mut inp = Input::new(data);
    let setup = inp.u8();
    // Commitments either never expire or expire at once (both deterministic).
    let deadline = if setup & 1 == 0 {
        Duration::from_secs(3600)
    } else {
        Duration::ZERO
    };
    let rcfg = RuntimeConfig {
        heartbeat: None,
        ack_timeout: deadline,
        ack_grace: deadline,
        max_staged: 1 + usize::from((setup >> 1) & 1),
        ..Default::default()
    };
    let policy = POLICIES[usize::from(setup >> 2) % POLICIES.len()];
    LM.with(|lm| KICK.with(|kick| run_on(&mut inp, lm, kick, rcfg, policy, setup & 0x40 != 0)));
}

fn run_on(
    inp: &mut Input<'_>,
    lm: &LoopbackMemory,
    kick: &EventFd,
    rcfg: RuntimeConfig,
    policy: &str,
    event_idx: bool,
) {
    // Fresh rings: zero each queue's descriptor table and rings.
    let zeros = vec![0u8; 0x1100];
    for q in &lm.queues {
        lm.mem
            .write_slice(&zeros, GuestAddress(q.desc_table))
            .expect("ring memory");
    }
    let mut cfg = EngineConfig::new(u32::from(CPUS));
    cfg.max_batch = BATCH;
    cfg.max_queue_size = QSIZE;
    cfg.event_idx = event_idx;
    let engine = QueueEngine::new(
        lm.mem.clone(),
        cfg,
        &lm.queues,
        kick.try_clone().expect("dup eventfd"),
        Box::new(|_q: u16| Ok(())),
    )
    .expect("loopback queues are valid");
    let mut g = Guest {
        lm,
        dq: lm.driver_queues(event_idx),
    };
    g.post_decision_buffers();
    let mut rt = Runtime::new(
        engine,
        milk_policies::by_name(policy).expect("built-in policy"),
        rcfg,
    );
    let mut seen: Vec<Seen> = Vec::new();
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        match inp.below(16) {
            0..=5 => {
                let cpu = inp.below(u32::from(CPUS)) as u16;
                let n = 1 + inp.below(BATCH as u32) as usize;
                let ctx = Context {
                    num_cpus: CPUS,
                    session_id: rt.session_id(),
                    seen: &seen,
                };
                let msgs: Vec<Message> = (0..n).map(|_| gen::message(inp, &ctx)).collect();
                g.send(cpu, &msgs);
            }
            6..=9 => {
                rt.step();
            }
            10 | 11 => g.recv(&mut seen),
            12 => rt.start_session(),
            13 => match inp.below(4) {
                0 => rt.restart_session(u64::from(inp.below(4))),
                1 => rt.end_session(u64::from(inp.below(4))),
                2 => {
                    let st = rt.session_state();
                    rt.resume_session(st);
                }
                _ => {
                    rt.discard_stale_events();
                }
            },
            14 => {
                let p = POLICIES[inp.below(POLICIES.len() as u32) as usize];
                rt.swap_policy(milk_policies::by_name(p).expect("built-in policy"));
            }
            _ => {
                // Forget answered decisions (the guest moved on).
                seen.clear();
            }
        }
        if let Err(e) = rt.check_invariants() {
            panic!("runtime invariant broken: {e}");
        }
    }
}
