//! IORING_OP_MSG_RING between two rings: the sender's ring posts a CQE
//! (user_data = seq) straight into the receiver's completion ring, which
//! waits in io_uring_enter. A CQE carries 8+4 bytes, so the 64 B travel in a
//! shared ring and the receiver checks the CQE's seq against the slot.

use super::uring_err;
use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};
use io_uring::{opcode, squeue, types, IoUring};
use std::os::fd::AsRawFd;

pub struct UringMsgRing;

struct Tx {
    ring: IoUring,
    target: i32,
    slots: Producer,
}

struct Rx {
    ring: IoUring,
    slots: Consumer,
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.slots.push(m);
        let sqe = opcode::MsgRingData::new(types::Fd(self.target), 0, m.seq(), None)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS);
        // SAFETY: MSG_RING references no user memory.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| ChanError::Protocol("io_uring SQ full".into()))?;
        self.ring.submit().map_err(|e| uring_err("submit", e))?;
        // Successful MSG_RINGs post nothing here; anything on our CQ is a failure.
        if let Some(cqe) = self.ring.completion().next() {
            return Err(ChanError::io(
                "IORING_OP_MSG_RING",
                std::io::Error::from_raw_os_error(-cqe.result()),
            ));
        }
        Ok(())
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        self.ring
            .submit_and_wait(1)
            .map_err(|e| uring_err("submit_and_wait", e))?;
        for cqe in self.ring.completion() {
            let seq = cqe.user_data();
            let m = self
                .slots
                .pop()
                .ok_or_else(|| ChanError::Protocol(format!("CQE for seq {seq} but ring empty")))?;
            if m.seq() != seq {
                return Err(ChanError::Protocol(format!(
                    "CQE carried seq {seq}, slot holds {}",
                    m.seq()
                )));
            }
            out.push(m);
        }
        Ok(())
    }
}

impl Channel for UringMsgRing {
    fn name(&self) -> String {
        "io_uring MSG_RING".into()
    }
    fn describe(&self) -> String {
        "IORING_OP_MSG_RING posts seq into the receiver's CQ (64 B in shared ring); receiver in io_uring_enter".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let tx_ring = IoUring::new(8).map_err(|e| uring_err("io_uring_setup", e))?;
        // The CQ must hold every message the slot ring lets be in flight.
        let rx_ring = IoUring::builder()
            .setup_cqsize(1024)
            .build(8)
            .map_err(|e| uring_err("io_uring_setup", e))?;
        let (p, c) = ring(256);
        Ok((
            Box::new(Tx {
                target: rx_ring.as_raw_fd(),
                ring: tx_ring,
                slots: p,
            }),
            Box::new(Rx {
                ring: rx_ring,
                slots: c,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn uring_msg_ring_delivers_all_in_order() {
        crate::runner::check_channel(&super::UringMsgRing);
    }
}
