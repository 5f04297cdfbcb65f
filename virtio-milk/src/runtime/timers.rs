//! Host-side policy timers: a policy asks to be called back at a host monotonic time
//! ([`crate::policy::Dispatcher::set_timer`]); the loop fires due timers as
//! [`crate::policy::PolicyEvent::Timer`] and sleeps no longer than the next one.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Most timers one policy may have pending; more are refused (counted) so a policy bug
/// cannot grow the heap without bound.
pub const MAX_TIMERS: usize = 65_536;

/// Pending timers, earliest first.
#[derive(Debug, Default)]
pub struct Timers {
    /// (due ns, insertion order, token).
    heap: BinaryHeap<Reverse<(u64, u64, u64)>>,
    inserted: u64,
    /// Timers refused because [`MAX_TIMERS`] were pending.
    pub refused: u64,
}

impl Timers {
    /// Fire `token` at `at_ns`. Returns false if too many are pending.
    pub fn set(&mut self, at_ns: u64, token: u64) -> bool {
        if self.heap.len() >= MAX_TIMERS {
            self.refused += 1;
            return false;
        }
        self.inserted += 1;
        self.heap.push(Reverse((at_ns, self.inserted, token)));
        true
    }

    /// Due time of the earliest timer.
    pub fn next_due(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Remove and return the earliest timer due at or before `now_ns` as (token, due).
    pub fn pop_due(&mut self, now_ns: u64) -> Option<(u64, u64)> {
        match self.heap.peek() {
            Some(Reverse((at, _, _))) if *at <= now_ns => {
                self.heap.pop().map(|Reverse((at, _, token))| (token, at))
            }
            _ => None,
        }
    }

    /// Drop every timer (policy swap, new session).
    pub fn clear(&mut self) {
        self.heap.clear();
    }

    /// Pending timers.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// No timer pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_in_due_order_then_insertion_order() {
        let mut t = Timers::default();
        t.set(30, 1);
        t.set(10, 2);
        t.set(10, 3);
        t.set(20, 4);
        assert_eq!(t.next_due(), Some(10));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(25), Some((2, 10)));
        assert_eq!(t.pop_due(25), Some((3, 10)));
        assert_eq!(t.pop_due(25), Some((4, 20)));
        assert_eq!(t.pop_due(25), None);
        assert_eq!(t.len(), 1);
        t.clear();
        assert!(t.is_empty());
    }

    #[test]
    fn bounded() {
        let mut t = Timers::default();
        for i in 0..MAX_TIMERS as u64 {
            assert!(t.set(i, i));
        }
        assert!(!t.set(0, 0));
        assert_eq!(t.refused, 1);
    }
}
