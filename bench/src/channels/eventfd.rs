//! eventfd(2) as the doorbell of a shared-memory ring: an eventfd carries
//! only a 64-bit counter, so the 64 bytes sit in the ring and every message
//! costs one write(2) on the eventfd; the receiver blocks in read(2).

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};
use crate::sys::{read_some, write_all, Fd};
use std::sync::Arc;

pub struct EventFd;

struct Tx(Producer, Arc<Fd>);
struct Rx(Consumer, Arc<Fd>);

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.0.push(m);
        write_all(self.1 .0, &1u64.to_ne_bytes()).map_err(|e| ChanError::io("eventfd write", e))
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        let mut cnt = [0u8; 8];
        loop {
            if self.0.drain_into(out) > 0 {
                return Ok(());
            }
            read_some(self.1 .0, &mut cnt).map_err(|e| ChanError::io("eventfd read", e))?;
        }
    }
}

impl Channel for EventFd {
    fn name(&self) -> String {
        "eventfd + shm ring".into()
    }
    fn describe(&self) -> String {
        "64 B in a shared ring, one eventfd write per message; receiver blocks in read(2)".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        // SAFETY: eventfd takes no pointers.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(ChanError::last_os("eventfd"));
        }
        let fd = Arc::new(Fd(fd));
        let (p, c) = ring(1024);
        Ok((Box::new(Tx(p, fd.clone())), Box::new(Rx(c, fd))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn eventfd_delivers_all_in_order() {
        crate::runner::check_channel(&super::EventFd);
    }
}
