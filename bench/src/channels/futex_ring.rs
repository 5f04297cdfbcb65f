//! Shared-memory ring plus futex wake: the receiver sleeps in FUTEX_WAIT
//! when the ring is empty and the sender issues FUTEX_WAKE only if a waiter
//! announced itself (an eventcount, so idle-free streaming costs no syscall).

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// `spin_ns`: spin this long on an empty ring before sleeping (0: sleep at
/// once), the spin-then-sleep poller virtio-milk's runtime uses.
pub struct FutexRing {
    pub spin_ns: u64,
}

#[derive(Default)]
struct EventCount {
    /// Bumped on every publish; the futex word.
    seq: AtomicU32,
    /// 1 while the consumer is (about to be) asleep.
    waiting: AtomicU32,
}

struct Tx(Producer, Arc<EventCount>);
struct Rx(Consumer, Arc<EventCount>, u64);

fn futex(word: &AtomicU32, op: libc::c_int, val: u32) -> libc::c_long {
    // SAFETY: `word` is a live, aligned u32 for the duration of the call; the
    // timeout and second address are unused by FUTEX_WAIT/FUTEX_WAKE here.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        )
    }
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.0.push(m);
        self.1.seq.fetch_add(1, Ordering::SeqCst);
        if self.1.waiting.load(Ordering::SeqCst) != 0 && futex(&self.1.seq, libc::FUTEX_WAKE, 1) < 0
        {
            return Err(ChanError::last_os("futex wake"));
        }
        Ok(())
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            if self.0.drain_into(out) > 0 {
                return Ok(());
            }
            if self.2 > 0 {
                let until = crate::clock::now_ns() + self.2;
                while !self.0.has_data() && crate::clock::now_ns() < until {
                    std::hint::spin_loop();
                }
                if self.0.drain_into(out) > 0 {
                    return Ok(());
                }
            }
            let ec = &self.1;
            ec.waiting.store(1, Ordering::SeqCst);
            let seen = ec.seq.load(Ordering::SeqCst);
            if !self.0.has_data() && futex(&ec.seq, libc::FUTEX_WAIT, seen) < 0 {
                let e = std::io::Error::last_os_error();
                let benign = matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR));
                if !benign {
                    return Err(ChanError::io("futex wait", e));
                }
            }
            ec.waiting.store(0, Ordering::SeqCst);
        }
    }
}

impl Channel for FutexRing {
    fn name(&self) -> String {
        if self.spin_ns > 0 {
            format!("futex + shm ring, spin {} µs", self.spin_ns / 1000)
        } else {
            "futex + shm ring".into()
        }
    }
    fn describe(&self) -> String {
        let spin = if self.spin_ns > 0 {
            format!(
                "; receiver spins {} µs before sleeping",
                self.spin_ns / 1000
            )
        } else {
            String::new()
        };
        format!("64 B slots in a shared ring; FUTEX_WAKE only when the receiver sleeps{spin}")
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let (p, c) = ring(1024);
        let ec = Arc::new(EventCount::default());
        Ok((
            Box::new(Tx(p, ec.clone())),
            Box::new(Rx(c, ec, self.spin_ns)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::FutexRing;

    #[test]
    fn futex_ring_delivers_all_in_order() {
        crate::runner::check_channel(&FutexRing { spin_ns: 0 });
    }

    #[test]
    fn futex_ring_spin_then_sleep_delivers_all_in_order() {
        crate::runner::check_channel(&FutexRing { spin_ns: 50_000 });
    }
}
