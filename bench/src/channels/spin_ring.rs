//! Busy-polled shared-memory SPSC ring: no kernel at all, the physical floor
//! (a cache line moving between two cores).

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};

pub struct SpinRing;

struct Tx(Producer);
struct Rx(Consumer);

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.0.push(m);
        Ok(())
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        while self.0.drain_into(out) == 0 {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

impl Channel for SpinRing {
    fn name(&self) -> String {
        "shm ring (busy-poll)".into()
    }
    fn describe(&self) -> String {
        "SPSC ring of 64 B slots, both sides spin; no syscalls".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let (p, c) = ring(1024);
        Ok((Box::new(Tx(p)), Box::new(Rx(c))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn spin_ring_delivers_all_in_order() {
        crate::runner::check_channel(&super::SpinRing);
    }
}
