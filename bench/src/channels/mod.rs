//! Every benchmarked channel, one file each, and the default row order.

pub mod bpf_ringbuf;
pub mod bpf_user_ringbuf;
pub mod eventfd;
pub mod futex_ring;
pub mod mqueue;
pub mod netlink_proc;
pub mod pipe;
pub mod signal;
pub mod spin_ring;
pub mod stream;
pub mod unix;
pub mod uring_msg_ring;
pub mod uring_pipe;
pub mod virtio_loopback;

use crate::channel::{ChanError, Channel};
use crate::row::{ChannelRow, Row};

/// Maps an io_uring setup/enter error; ENOSYS/EPERM mean "not here".
pub(crate) fn uring_err(op: &'static str, e: std::io::Error) -> ChanError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => ChanError::Unavailable("kernel built without io_uring".into()),
        Some(libc::EPERM) if op == "io_uring_setup" => {
            ChanError::Unavailable("io_uring disabled (kernel.io_uring_disabled)".into())
        }
        _ => ChanError::io(op, e),
    }
}

/// Knobs that shape some rows.
#[derive(Debug, Clone, Default)]
pub struct ChannelOpts {
    /// CPU for kernel polling threads (SQPOLL), normally the receiver's.
    pub poll_cpu: Option<u32>,
}

/// All rows, in table order.
pub fn all(opts: &ChannelOpts) -> Vec<Box<dyn Row>> {
    let chans: Vec<Box<dyn Channel>> = vec![
        Box::new(pipe::Pipe),
        Box::new(eventfd::EventFd),
        Box::new(unix::UnixSocket { seqpacket: false }),
        Box::new(unix::UnixSocket { seqpacket: true }),
        Box::new(mqueue::MQueue),
        Box::new(signal::RtSignal),
        Box::new(futex_ring::FutexRing { spin_ns: 0 }),
        Box::new(futex_ring::FutexRing { spin_ns: 50_000 }),
        Box::new(spin_ring::SpinRing),
        Box::new(uring_pipe::UringPipe {
            sqpoll: false,
            sq_cpu: None,
        }),
        Box::new(uring_pipe::UringPipe {
            sqpoll: true,
            sq_cpu: opts.poll_cpu,
        }),
        Box::new(uring_msg_ring::UringMsgRing),
        Box::new(bpf_ringbuf::BpfRingbuf { busy_poll: false }),
        Box::new(bpf_ringbuf::BpfRingbuf { busy_poll: true }),
        Box::new(bpf_user_ringbuf::BpfUserRingbuf),
        Box::new(netlink_proc::NetlinkProc),
    ];
    let mut rows: Vec<Box<dyn Row>> = chans
        .into_iter()
        .map(|c| Box::new(ChannelRow(c)) as Box<dyn Row>)
        .collect();
    rows.extend(virtio_loopback::rows());
    rows
}
