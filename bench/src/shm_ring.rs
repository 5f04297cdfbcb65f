//! Single-producer/single-consumer ring of 64-byte slots in shared memory.
//!
//! Used directly by the busy-polled row and as the payload store for
//! channels whose kernel object carries only a few bytes (futex, eventfd,
//! rt signals, MSG_RING, netlink): the notification carries the sequence
//! number, the slot carries the message, and the receiver checks both agree.

use crate::msg::{Msg, MSG_SIZE};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[repr(C, align(64))]
struct Padded(AtomicU64);

struct Ring {
    /// Messages published by the producer (monotonic count).
    head: Padded,
    /// Messages consumed by the consumer (monotonic count).
    tail: Padded,
    slots: Box<[UnsafeCell<[u8; MSG_SIZE]>]>,
    mask: u64,
}

// SAFETY: a slot is written only by the single producer while it is outside
// [tail, head) and read only by the single consumer while inside; head/tail
// are published with release and read with acquire, which orders the slot
// accesses. `Producer`/`Consumer` are not Clone, so there is one of each.
unsafe impl Sync for Ring {}
// SAFETY: see above; the raw cells are only touched through the halves.
unsafe impl Send for Ring {}

/// Producing half.
pub struct Producer {
    ring: Arc<Ring>,
    head: u64,
}

/// Consuming half.
pub struct Consumer {
    ring: Arc<Ring>,
    tail: u64,
}

/// Creates a ring with `cap` slots (rounded up to a power of two).
pub fn ring(cap: usize) -> (Producer, Consumer) {
    let cap = cap.max(2).next_power_of_two();
    let slots = (0..cap).map(|_| UnsafeCell::new([0u8; MSG_SIZE])).collect();
    let ring = Arc::new(Ring {
        head: Padded(AtomicU64::new(0)),
        tail: Padded(AtomicU64::new(0)),
        slots,
        mask: cap as u64 - 1,
    });
    (
        Producer {
            ring: ring.clone(),
            head: 0,
        },
        Consumer { ring, tail: 0 },
    )
}

impl Producer {
    /// Publishes `m`; returns false if the ring is full.
    pub fn try_push(&mut self, m: &Msg) -> bool {
        let r = &self.ring;
        if self.head - r.tail.0.load(Ordering::Acquire) > r.mask {
            return false;
        }
        let slot = &r.slots[(self.head & r.mask) as usize];
        // SAFETY: the slot is outside [tail, head), so the consumer does not
        // read it; only this (unique) producer writes it.
        unsafe { *slot.get() = m.0 };
        self.head += 1;
        r.head.0.store(self.head, Ordering::Release);
        true
    }

    /// Publishes `m`, spinning (then yielding) while the ring is full.
    pub fn push(&mut self, m: &Msg) {
        let mut spins = 0u32;
        while !self.try_push(m) {
            backoff(&mut spins);
        }
    }

    /// Number of messages pushed so far.
    pub fn pushed(&self) -> u64 {
        self.head
    }
}

impl Consumer {
    /// Takes the oldest message, if any.
    pub fn pop(&mut self) -> Option<Msg> {
        let r = &self.ring;
        if self.tail == r.head.0.load(Ordering::Acquire) {
            return None;
        }
        let slot = &r.slots[(self.tail & r.mask) as usize];
        // SAFETY: the slot is inside [tail, head): published by the producer
        // (acquire above) and not rewritten until we advance tail.
        let m = Msg(unsafe { *slot.get() });
        self.tail += 1;
        r.tail.0.store(self.tail, Ordering::Release);
        Some(m)
    }

    /// True if a message is waiting.
    pub fn has_data(&self) -> bool {
        self.tail != self.ring.head.0.load(Ordering::Acquire)
    }

    /// Moves every available message into `out`; returns how many.
    pub fn drain_into(&mut self, out: &mut Vec<Msg>) -> usize {
        let mut n = 0;
        while let Some(m) = self.pop() {
            out.push(m);
            n += 1;
        }
        n
    }
}

/// Spin a little, then yield the CPU: used while waiting for space.
pub fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_and_full() {
        let (mut p, mut c) = ring(4);
        for i in 0..4 {
            assert!(p.try_push(&Msg::new(i, 0, 0)));
        }
        assert!(!p.try_push(&Msg::new(4, 0, 0)), "ring of 4 accepted a 5th");
        for i in 0..4 {
            assert_eq!(c.pop().map(|m| m.seq()), Some(i));
        }
        assert!(c.pop().is_none());
    }

    #[test]
    fn cross_thread_order() {
        let (mut p, mut c) = ring(8);
        let t = std::thread::spawn(move || {
            for i in 0..10_000 {
                p.push(&Msg::new(i, 0, 0));
            }
        });
        let mut next = 0;
        while next < 10_000 {
            if let Some(m) = c.pop() {
                assert_eq!(m.seq(), next);
                assert!(m.verify().is_ok());
                next += 1;
            }
        }
        t.join().unwrap();
    }
}
