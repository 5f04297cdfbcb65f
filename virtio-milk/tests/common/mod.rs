//! Test support shared by the runtime's integration tests: a simulated guest driver on
//! loopback memory (what `runtime.rs` and `swap.rs` drive the real runtime with).

// Each test crate that includes this module uses a different subset of it.
#![allow(dead_code)]

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::protocol::{parse_record, Direction, Message, RECORD_SIZE};

/// The simulated guest driver: loopback memory, one driver-side queue per virtqueue and the
/// kick eventfd the runtime sleeps on.
pub struct Guest {
    /// Guest memory with the rings and buffers.
    pub lm: LoopbackMemory,
    /// Driver side of every queue (2c = events, 2c+1 = decisions).
    pub dq: Vec<DriverQueue>,
    /// The device's kick eventfd.
    pub kick: EventFd,
}

impl Guest {
    /// Post one event buffer with `msgs` on `cpu`'s event queue (kicking if asked).
    pub fn send(&mut self, cpu: u16, msgs: &[Message]) {
        let raw: Vec<[u8; RECORD_SIZE]> = msgs.iter().map(Message::encode).collect();
        self.send_raw(cpu, &raw);
    }

    /// Post one event buffer holding these raw records.
    pub fn send_raw(&mut self, cpu: u16, msgs: &[[u8; RECORD_SIZE]]) {
        let q = usize::from(cpu) * 2;
        while self.dq[q].pop_used(&self.lm.mem).is_some() {}
        let d = self.dq[q].next_free_desc().expect("free event descriptor");
        let addr = self.lm.buffer(q as u16, d);
        for (i, m) in msgs.iter().enumerate() {
            self.lm
                .mem
                .write_slice(m, GuestAddress(addr + (i * RECORD_SIZE) as u64))
                .unwrap();
        }
        let len = (msgs.len() * RECORD_SIZE) as u32;
        self.dq[q]
            .add_chain(&self.lm.mem, &[(addr, len, false)])
            .unwrap();
        if self.dq[q].publish(&self.lm.mem) {
            self.kick.write(1).unwrap();
        }
    }

    pub fn post_decision_buffer(&mut self, q: usize) {
        let d = self.dq[q]
            .next_free_desc()
            .expect("free decision descriptor");
        let a = self.lm.buffer(q as u16, d);
        self.dq[q]
            .add_chain(&self.lm.mem, &[(a, 256, true)])
            .unwrap();
    }

    pub fn post_decision_buffers(&mut self) {
        for q in (1..self.dq.len()).step_by(2) {
            while self.dq[q].free_descs() > 0 {
                self.post_decision_buffer(q);
            }
            self.dq[q].publish(&self.lm.mem);
        }
    }

    /// Records received on `cpu`'s decision queue; buffers are reposted.
    pub fn recv(&mut self, cpu: u16) -> Vec<Message> {
        let q = usize::from(cpu) * 2 + 1;
        let mut msgs = Vec::new();
        while let Some((head, len)) = self.dq[q].pop_used(&self.lm.mem) {
            let a = self.lm.buffer(q as u16, head);
            for i in 0..len as usize / RECORD_SIZE {
                let mut raw = [0u8; RECORD_SIZE];
                self.lm
                    .mem
                    .read_slice(&mut raw, GuestAddress(a + (i * RECORD_SIZE) as u64))
                    .unwrap();
                msgs.push(
                    parse_record(&raw, Direction::HostToGuest, (self.dq.len() / 2) as u32).unwrap(),
                );
            }
            self.post_decision_buffer(q);
        }
        self.dq[q].publish(&self.lm.mem);
        msgs
    }
}
