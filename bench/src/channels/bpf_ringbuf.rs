//! BPF ring buffer, kernel -> user. The sender thread makes a getppid(2)
//! call tagged with a magic first argument; a raw-tracepoint program on
//! `sys_enter` (our own instructions, loaded with bpf(2)) copies the 64-byte
//! message from the caller's buffer into a BPF_MAP_TYPE_RINGBUF record. The
//! receiver reads the mmap'ed ring, waiting in epoll_wait (adaptive kernel
//! wake-up) or busy-polling the producer position (BPF_RB_NO_WAKEUP).

use crate::bpf::btf::FuncInfo;
use crate::bpf::insn::{helper, Asm, Insn, R0, R1, R10, R2, R3, R6, R7, R8};
use crate::bpf::ring::{KernelRingConsumer, HDR};
use crate::bpf::sys::{self, Mmap, MAP_TYPE_RINGBUF};
use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::{Msg, MSG_SIZE};
use crate::sys::Fd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

/// x86_64 syscall number of getppid, our trigger.
pub const NR_GETPPID: i32 = 110;
/// First syscall argument that marks a benchmark trigger.
const MAGIC: i32 = 0x4d49_4c4b;
/// Offsets of rdi, rsi, rdx in x86_64 `struct pt_regs`.
pub const PT_REGS_DI: i32 = 112;
const PT_REGS_SI: i32 = 104;
const PT_REGS_DX: i32 = 96;
const RB_SIZE: usize = 256 * 1024;
const RB_NO_WAKEUP: u64 = 1;

pub struct BpfRingbuf {
    pub busy_poll: bool,
}

/// Emits: "r1 = r10 + stack_off; r2 = 8; r3 = regs + reg_off;
/// probe_read_kernel(); if r0 != 0 goto out" (regs pointer in r8).
pub fn read_reg(a: &mut Asm, stack_off: i32, reg_off: i32) {
    a.mov(R1, R10)
        .add_imm(R1, stack_off)
        .mov_imm(R2, 8)
        .mov(R3, R8)
        .add_imm(R3, reg_off)
        .call(helper::PROBE_READ_KERNEL)
        .jne_imm(R0, 0, "out");
}

/// Emits the common prologue: bail out unless this is getppid from `tgid`
/// with `magic` as first argument; leaves the pt_regs pointer in r8.
pub fn trigger_prologue(a: &mut Asm, tgid: i32, magic: i32) {
    a.mov(R6, R1)
        .ldx_dw(R2, R6, 8) // ctx->args[1]: syscall id
        .jne_imm(R2, NR_GETPPID, "out")
        .call(helper::GET_CURRENT_PID_TGID)
        .rsh_imm(R0, 32)
        .jne_imm(R0, tgid, "out")
        .ldx_dw(R8, R6, 0); // ctx->args[0]: struct pt_regs *
    read_reg(a, -8, PT_REGS_DI);
    a.ldx_dw(R1, R10, -8).jne_imm(R1, magic, "out");
}

/// The producer program: copy 64 B from the user buffer in rsi into a
/// ring record, submit with the flags in rdx.
pub fn producer_prog(map: &Fd, tgid: i32) -> Result<Vec<Insn>, ChanError> {
    let mut a = Asm::new();
    trigger_prologue(&mut a, tgid, MAGIC);
    read_reg(&mut a, -16, PT_REGS_SI);
    read_reg(&mut a, -24, PT_REGS_DX);
    a.ld_map_fd(R1, map.0)
        .mov_imm(R2, MSG_SIZE as i32)
        .mov_imm(R3, 0)
        .call(helper::RINGBUF_RESERVE)
        .jeq_imm(R0, 0, "out")
        .mov(R7, R0)
        .mov(R1, R7)
        .mov_imm(R2, MSG_SIZE as i32)
        .ldx_dw(R3, R10, -16)
        .call(helper::PROBE_READ_USER)
        .jne_imm(R0, 0, "discard")
        .mov(R1, R7)
        .ldx_dw(R2, R10, -24)
        .call(helper::RINGBUF_SUBMIT)
        .ja("out")
        .label("discard")
        .mov(R1, R7)
        .mov_imm(R2, 0)
        .call(helper::RINGBUF_DISCARD)
        .label("out")
        .mov_imm(R0, 0)
        .exit();
    a.finish().map_err(|e| ChanError::Protocol(e.to_string()))
}

/// Keeps map, program and attachment alive; dropping detaches.
pub struct Loaded {
    pub map: Fd,
    pub _prog: Fd,
    pub _link: Fd,
}

struct Tx {
    _loaded: Arc<Loaded>,
    /// Read-only view of both positions, for back-pressure: the kernel
    /// producer would silently drop when the ring is full.
    cons: Mmap,
    prod: Mmap,
    buf: Box<Msg>,
    flags: u64,
}

struct Rx {
    _loaded: Arc<Loaded>,
    ring: KernelRingConsumer,
    epoll: Option<Fd>,
}

/// Issues getppid(magic, arg1, arg2): the tracepoint program's trigger.
pub fn trigger(magic: i32, arg1: u64, arg2: u64) {
    // SAFETY: getppid ignores its arguments; the BPF program only reads them.
    unsafe { libc::syscall(libc::SYS_getppid, magic as u64, arg1, arg2) };
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        let need = (MSG_SIZE as u64 + HDR + 7) & !7;
        let mut spins = 0u32;
        loop {
            // SAFETY: both pages start with the u64 positions the kernel
            // and the consumer publish.
            let (c, p) = unsafe {
                (
                    (*self.cons.ptr.cast::<AtomicU64>()).load(Ordering::Acquire),
                    (*self.prod.ptr.cast::<AtomicU64>()).load(Ordering::Acquire),
                )
            };
            if p - c + need <= RB_SIZE as u64 {
                break;
            }
            crate::shm_ring::backoff(&mut spins);
        }
        *self.buf = *m;
        trigger(MAGIC, self.buf.0.as_ptr() as u64, self.flags);
        Ok(())
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            if self.ring.drain(out)? > 0 && !out.is_empty() {
                return Ok(());
            }
            let Some(ep) = &self.epoll else {
                std::hint::spin_loop();
                continue;
            };
            // Order our consumer-position store before re-reading the ring
            // (the kernel does the mirror image when deciding to wake us).
            fence(Ordering::SeqCst);
            if self.ring.has_committed() {
                continue;
            }
            // SAFETY: epoll_event is plain old data.
            let mut ev: libc::epoll_event = unsafe { std::mem::zeroed() };
            // SAFETY: `ev` is valid for one event.
            let r = unsafe { libc::epoll_wait(ep.0, &mut ev, 1, -1) };
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(ChanError::last_os("epoll_wait"));
            }
        }
    }
}

/// Loads `insns` and attaches them to the sys_enter raw tracepoint.
pub fn load_and_attach(
    map: Fd,
    insns: &[Insn],
    name: &str,
    btf: Option<(&Fd, &[FuncInfo])>,
) -> Result<Loaded, ChanError> {
    if !cfg!(target_arch = "x86_64") {
        return Err(ChanError::Unavailable(
            "pt_regs offsets are x86_64-only".into(),
        ));
    }
    let prog = sys::prog_load(insns, name, btf)?;
    let link = sys::raw_tracepoint_open("sys_enter", &prog)?;
    Ok(Loaded {
        map,
        _prog: prog,
        _link: link,
    })
}

impl Channel for BpfRingbuf {
    fn name(&self) -> String {
        if self.busy_poll {
            "BPF ringbuf k->u (busy-poll)".into()
        } else {
            "BPF ringbuf k->u (epoll)".into()
        }
    }
    fn describe(&self) -> String {
        let wait = if self.busy_poll {
            "receiver spins on the mmap'ed ring (BPF_RB_NO_WAKEUP)"
        } else {
            "receiver in epoll_wait, adaptive wake-up"
        };
        format!("sender's getppid() fires a sys_enter raw-tracepoint BPF program that copies 64 B into a BPF_MAP_TYPE_RINGBUF; {wait}")
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let map = sys::ringbuf_create(MAP_TYPE_RINGBUF, RB_SIZE as u32, "milk_rb")?;
        let insns = producer_prog(&map, std::process::id() as i32)?;
        let loaded = Arc::new(load_and_attach(map, &insns, "milk_rb_prod", None)?);
        let pg = sys::page_size();
        let cons = Mmap::map(&loaded.map, pg, 0, libc::PROT_READ)?;
        let prod = Mmap::map(&loaded.map, pg, pg, libc::PROT_READ)?;
        let ring = KernelRingConsumer::new(&loaded.map, RB_SIZE)?;
        let epoll = if self.busy_poll {
            None
        } else {
            // SAFETY: epoll_create1 takes no pointers.
            let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if ep < 0 {
                return Err(ChanError::last_os("epoll_create1"));
            }
            let ep = Fd(ep);
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: 0,
            };
            // SAFETY: both fds are open; `ev` is a valid event.
            if unsafe { libc::epoll_ctl(ep.0, libc::EPOLL_CTL_ADD, loaded.map.0, &mut ev) } < 0 {
                return Err(ChanError::last_os("epoll_ctl"));
            }
            Some(ep)
        };
        Ok((
            Box::new(Tx {
                _loaded: loaded.clone(),
                cons,
                prod,
                buf: Box::default(),
                flags: if self.busy_poll { RB_NO_WAKEUP } else { 0 },
            }),
            Box::new(Rx {
                _loaded: loaded,
                ring,
                epoll,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::BpfRingbuf;

    #[test]
    fn bpf_ringbuf_epoll_delivers_all_in_order() {
        crate::runner::check_channel(&BpfRingbuf { busy_poll: false });
    }

    #[test]
    fn bpf_ringbuf_survives_full_ring() {
        let cfg = crate::runner::RunConfig {
            tput_max_msgs: 50_000,
            tput_ms: 2000,
            ..crate::runner::smoke_config()
        };
        crate::runner::check_channel_with(&BpfRingbuf { busy_poll: true }, &cfg);
    }

    #[test]
    fn bpf_ringbuf_busy_poll_delivers_all_in_order() {
        crate::runner::check_channel(&BpfRingbuf { busy_poll: true });
    }
}
