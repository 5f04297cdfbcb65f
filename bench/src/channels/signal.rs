//! Real-time signal with payload: rt_tgsigqueueinfo (sigqueue aimed at the
//! receiver thread) with `si_value` = sequence number; the 64 bytes travel in
//! a shared ring because a signal carries only 8 bytes of payload. The
//! receiver blocks the signal and waits in sigwaitinfo(2).

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};
use crate::sys::gettid;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

pub struct RtSignal;

fn signo() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

fn sigset_of(sig: libc::c_int) -> libc::sigset_t {
    // SAFETY: sigset_t is plain old data and is initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
    }
    set
}

struct Tx {
    ring: Producer,
    rx_tid: Arc<AtomicI32>,
}

struct Rx {
    ring: Consumer,
    tid: Arc<AtomicI32>,
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.ring.push(m);
        // SAFETY: siginfo_t is plain old data.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        si.si_signo = signo();
        si.si_code = libc::SI_QUEUE;
        // si_value sits after si_pid (i32) and si_uid (u32) in the _rt union
        // member, i.e. at byte 24 of siginfo_t on Linux/x86_64.
        let raw = (&mut si as *mut libc::siginfo_t).cast::<u8>();
        // SAFETY: byte 24..32 lies inside the 128-byte siginfo_t.
        unsafe { std::ptr::write_unaligned(raw.add(24).cast::<u64>(), m.seq()) };
        let tid = self.rx_tid.load(Ordering::Acquire);
        loop {
            // SAFETY: `si` is a valid siginfo_t; tgid/tid name our own thread.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_rt_tgsigqueueinfo,
                    libc::getpid(),
                    tid,
                    signo(),
                    &si as *const libc::siginfo_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            // EAGAIN: the rt signal queue is full; that is back-pressure.
            if e.raw_os_error() != Some(libc::EAGAIN) {
                return Err(ChanError::io("rt_tgsigqueueinfo", e));
            }
            std::thread::yield_now();
        }
    }
}

impl MsgReceiver for Rx {
    fn start(&mut self) -> Result<(), ChanError> {
        let set = sigset_of(signo());
        // SAFETY: `set` is valid; only this thread's mask changes.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(ChanError::io(
                "pthread_sigmask",
                std::io::Error::from_raw_os_error(r),
            ));
        }
        self.tid.store(gettid(), Ordering::Release);
        Ok(())
    }

    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        let set = sigset_of(signo());
        // SAFETY: siginfo_t is plain old data.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: `set` and `si` are valid for the call.
            let r = unsafe { libc::sigwaitinfo(&set, &mut si) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ChanError::io("sigwaitinfo", e));
            }
            let raw = (&si as *const libc::siginfo_t).cast::<u8>();
            // SAFETY: bytes 24..32 lie inside the siginfo_t written above.
            let seq = unsafe { std::ptr::read_unaligned(raw.add(24).cast::<u64>()) };
            let m = self.ring.pop().ok_or_else(|| {
                ChanError::Protocol(format!("signal for seq {seq} but ring empty"))
            })?;
            if m.seq() != seq {
                return Err(ChanError::Protocol(format!(
                    "signal carried seq {seq}, ring slot holds {}",
                    m.seq()
                )));
            }
            out.push(m);
            return Ok(());
        }
    }
}

impl Channel for RtSignal {
    fn name(&self) -> String {
        "rt signal (sigqueue)".into()
    }
    fn describe(&self) -> String {
        "rt_tgsigqueueinfo with si_value=seq, 64 B in a shared ring; receiver in sigwaitinfo".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let (p, c) = ring(1024);
        let tid = Arc::new(AtomicI32::new(0));
        Ok((
            Box::new(Tx {
                ring: p,
                rx_tid: tid.clone(),
            }),
            Box::new(Rx { ring: c, tid }),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rt_signal_delivers_all_in_order() {
        crate::runner::check_channel(&super::RtSignal);
    }
}
