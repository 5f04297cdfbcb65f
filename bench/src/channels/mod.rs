//! Every benchmarked channel, one file each, and the default row order.

pub mod eventfd;
pub mod futex_ring;
pub mod mqueue;
pub mod pipe;
pub mod signal;
pub mod spin_ring;
pub mod stream;
pub mod unix;

use crate::channel::Channel;

/// All rows, in table order.
pub fn all() -> Vec<Box<dyn Channel>> {
    vec![
        Box::new(pipe::Pipe),
        Box::new(eventfd::EventFd),
        Box::new(unix::UnixSocket { seqpacket: false }),
        Box::new(unix::UnixSocket { seqpacket: true }),
        Box::new(mqueue::MQueue),
        Box::new(signal::RtSignal),
        Box::new(futex_ring::FutexRing),
        Box::new(spin_ring::SpinRing),
    ]
}
