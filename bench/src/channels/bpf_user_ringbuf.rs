//! BPF user ring buffer, user -> kernel. The sender writes 64-byte records
//! into a BPF_MAP_TYPE_USER_RINGBUF with no syscall. Nothing in the kernel
//! waits on that ring: a BPF program must call bpf_user_ringbuf_drain from
//! some hook. Here the "kernel consumer" is a sys_enter raw-tracepoint
//! program triggered by a thread on the receiver CPU calling getppid(2) in a
//! loop (a kernel hook firing repeatedly, like a scheduler's dispatch path).
//! The drain callback copies each record into a kernel->user ring buffer,
//! which that same thread reads right after the syscall to verify it.

use super::bpf_ringbuf::{load_and_attach, read_reg, trigger, Loaded, NR_GETPPID, PT_REGS_DI};
use crate::bpf::btf::{self, FuncInfo};
use crate::bpf::insn::{helper, Asm, Insn, R0, R1, R10, R2, R3, R4, R5, R6, R7, R8};
use crate::bpf::ring::{KernelRingConsumer, UserRingProducer};
use crate::bpf::sys::{self, MAP_TYPE_RINGBUF, MAP_TYPE_USER_RINGBUF};
use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::{Msg, MSG_SIZE};
use crate::sys::Fd;
use std::sync::Arc;

const MAGIC: i32 = 0x4d49_4c55;
const RB_SIZE: usize = 256 * 1024;
const RB_NO_WAKEUP: i32 = 1;
/// The callback stops the drain once the output ring holds more than this:
/// a drain releases each sample whatever the callback did, so a producer
/// refilling the user ring during a long drain would otherwise overflow the
/// output ring and lose the record whose reservation failed. (A counter on
/// the stack would do too, but the verifier then explores every iteration
/// of the callback and gives up with ENOMEM.)
const OUT_STOP_BYTES: i32 = (RB_SIZE - 4 * 72) as i32;
/// `BPF_RB_AVAIL_DATA` for bpf_ringbuf_query.
const RB_AVAIL_DATA: i32 = 0;

pub struct BpfUserRingbuf;

/// Drain program: on getppid(MAGIC) from our process, drain the user ring;
/// the callback forwards each 64-byte record to the output ring.
/// Returns the instructions and the callback's instruction index.
fn drain_prog(user_rb: &Fd, out_rb: &Fd, tgid: i32) -> Result<(Vec<Insn>, u32), ChanError> {
    let mut a = Asm::new();
    a.mov(R6, R1)
        .ldx_dw(R2, R6, 8)
        .jne_imm(R2, NR_GETPPID, "out")
        .call(helper::GET_CURRENT_PID_TGID)
        .rsh_imm(R0, 32)
        .jne_imm(R0, tgid, "out")
        .ldx_dw(R8, R6, 0);
    read_reg(&mut a, -8, PT_REGS_DI);
    a.ldx_dw(R1, R10, -8)
        .jne_imm(R1, MAGIC, "out")
        .ld_map_fd(R1, user_rb.0)
        .ld_func(R2, "callback")
        .mov_imm(R3, 0)
        .mov_imm(R4, RB_NO_WAKEUP)
        .call(helper::USER_RINGBUF_DRAIN)
        .label("out")
        .mov_imm(R0, 0)
        .exit();
    // callback(struct bpf_dynptr *sample, void *ctx) -> 0 continue, 1 stop
    a.label("callback")
        .mov(R6, R1)
        .ld_map_fd(R1, out_rb.0)
        .mov_imm(R2, MSG_SIZE as i32)
        .mov_imm(R3, 0)
        .call(helper::RINGBUF_RESERVE)
        .jeq_imm(R0, 0, "stop")
        .mov(R7, R0)
        .mov(R1, R7)
        .mov_imm(R2, MSG_SIZE as i32)
        .mov(R3, R6)
        .mov_imm(R4, 0)
        .mov_imm(R5, 0)
        .call(helper::DYNPTR_READ)
        .jne_imm(R0, 0, "cb_discard")
        .mov(R1, R7)
        .mov_imm(R2, RB_NO_WAKEUP)
        .call(helper::RINGBUF_SUBMIT)
        .ld_map_fd(R1, out_rb.0)
        .mov_imm(R2, RB_AVAIL_DATA)
        .call(helper::RINGBUF_QUERY)
        .mov(R1, R0)
        .mov_imm(R0, 0)
        .jlt_imm(R1, OUT_STOP_BYTES, "cb_ret")
        .mov_imm(R0, 1)
        .label("cb_ret")
        .exit()
        .label("cb_discard")
        .mov(R1, R7)
        .mov_imm(R2, RB_NO_WAKEUP)
        .call(helper::RINGBUF_DISCARD)
        .label("stop")
        .mov_imm(R0, 1)
        .exit();
    let cb = a.position("callback").unwrap_or(0) as u32;
    let insns = a.finish().map_err(|e| ChanError::Protocol(e.to_string()))?;
    Ok((insns, cb))
}

struct Tx {
    _loaded: Arc<Loaded>,
    _user_rb: Arc<Fd>,
    ring: UserRingProducer,
}

struct Rx {
    _loaded: Arc<Loaded>,
    out: KernelRingConsumer,
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        let mut spins = 0u32;
        while !self.ring.try_push(m) {
            crate::shm_ring::backoff(&mut spins);
        }
        Ok(())
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            trigger(MAGIC, 0, 0);
            self.out.drain(out)?;
            if !out.is_empty() {
                return Ok(());
            }
        }
    }
}

impl Channel for BpfUserRingbuf {
    fn name(&self) -> String {
        "BPF user ringbuf u->k (kernel polls)".into()
    }
    fn describe(&self) -> String {
        "sender writes 64 B into a BPF_MAP_TYPE_USER_RINGBUF (no syscall); a sys_enter BPF program on the receiver CPU, fired by a getppid() loop, drains it with bpf_user_ringbuf_drain".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let user_rb = Arc::new(sys::ringbuf_create(
            MAP_TYPE_USER_RINGBUF,
            RB_SIZE as u32,
            "milk_urb",
        )?);
        let out_rb = sys::ringbuf_create(MAP_TYPE_RINGBUF, RB_SIZE as u32, "milk_urb_out")?;
        let (insns, cb) = drain_prog(&user_rb, &out_rb, std::process::id() as i32)?;
        let btf_fd = btf::load(&btf::two_funcs())?;
        let funcs = [
            FuncInfo {
                insn_off: 0,
                type_id: btf::MAIN_FUNC_ID,
            },
            FuncInfo {
                insn_off: cb,
                type_id: btf::CB_FUNC_ID,
            },
        ];
        let loaded = Arc::new(load_and_attach(
            out_rb,
            &insns,
            "milk_urb_drain",
            Some((&btf_fd, &funcs)),
        )?);
        let ring = UserRingProducer::new(&user_rb, RB_SIZE)?;
        let out = KernelRingConsumer::new(&loaded.map, RB_SIZE)?;
        Ok((
            Box::new(Tx {
                _loaded: loaded.clone(),
                _user_rb: user_rb,
                ring,
            }),
            Box::new(Rx {
                _loaded: loaded,
                out,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bpf_user_ringbuf_delivers_all_in_order() {
        crate::runner::check_channel(&super::BpfUserRingbuf);
    }

    /// Streams enough records to fill and wrap both rings many times while
    /// drains run concurrently (this caught a lost record once).
    #[test]
    fn bpf_user_ringbuf_survives_full_rings() {
        let cfg = crate::runner::RunConfig {
            tput_max_msgs: 50_000,
            tput_ms: 2000,
            ..crate::runner::smoke_config()
        };
        crate::runner::check_channel_with(&super::BpfUserRingbuf, &cfg);
    }
}
