//! io_uring driving a pipe: the sender submits IORING_OP_WRITE of 64 B, the
//! receiver keeps one IORING_OP_READ posted and waits in io_uring_enter.
//! With `sqpoll`, the sender's ring has a kernel SQ thread (pinned to the
//! receiver's CPU: with two CPUs there is no third one for it), so the
//! sender submits and reaps completions without any syscall.

use super::pipe::pipe_fds;
use super::uring_err;
use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::{Msg, MSG_SIZE};
use crate::sys::Fd;
use io_uring::{opcode, types, IoUring};

pub struct UringPipe {
    pub sqpoll: bool,
    /// CPU of the SQPOLL kernel thread.
    pub sq_cpu: Option<u32>,
}

struct Tx {
    ring: IoUring,
    buf: Box<Msg>,
    fd: Fd,
    sqpoll: bool,
}

struct Rx {
    ring: IoUring,
    fd: Fd,
    buf: Vec<u8>,
    pending: Vec<u8>,
}

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        *self.buf = *m;
        let sqe = opcode::Write::new(types::Fd(self.fd.0), self.buf.0.as_ptr(), MSG_SIZE as u32)
            .offset(u64::MAX)
            .build()
            .user_data(m.seq());
        // SAFETY: the buffer is owned by `self` and not touched again until
        // this write's completion has been reaped below.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| ChanError::Protocol("io_uring SQ full".into()))?;
        // Wait for this write to complete before the next one: io_uring does
        // not order independent writes, and the buffer is reused.
        if self.sqpoll {
            self.ring.submit().map_err(|e| uring_err("submit", e))?;
            let mut spins = 0u32;
            loop {
                if let Some(cqe) = self.ring.completion().next() {
                    return check_write(cqe.result());
                }
                crate::shm_ring::backoff(&mut spins);
            }
        }
        self.ring
            .submit_and_wait(1)
            .map_err(|e| uring_err("submit_and_wait", e))?;
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| ChanError::Protocol("no write completion".into()))?;
        check_write(cqe.result())
    }
}

fn check_write(res: i32) -> Result<(), ChanError> {
    match res {
        n if n == MSG_SIZE as i32 => Ok(()),
        n if n < 0 => Err(ChanError::io(
            "io_uring write",
            std::io::Error::from_raw_os_error(-n),
        )),
        n => Err(ChanError::Protocol(format!("short io_uring write {n}"))),
    }
}

impl Rx {
    fn post_read(&mut self) -> Result<(), ChanError> {
        let sqe = opcode::Read::new(
            types::Fd(self.fd.0),
            self.buf.as_mut_ptr(),
            self.buf.len() as u32,
        )
        .offset(u64::MAX)
        .build();
        // SAFETY: `buf` lives in `self` and is only read after the completion.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| ChanError::Protocol("io_uring SQ full".into()))
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            self.post_read()?;
            self.ring
                .submit_and_wait(1)
                .map_err(|e| uring_err("submit_and_wait", e))?;
            let cqe = self
                .ring
                .completion()
                .next()
                .ok_or_else(|| ChanError::Protocol("no read completion".into()))?;
            let n = cqe.result();
            if n <= 0 {
                return Err(ChanError::Protocol(format!("io_uring read returned {n}")));
            }
            self.pending.extend_from_slice(&self.buf[..n as usize]);
            let whole = self.pending.len() / MSG_SIZE * MSG_SIZE;
            if whole > 0 {
                out.extend(
                    self.pending[..whole]
                        .chunks_exact(MSG_SIZE)
                        .filter_map(Msg::from_slice),
                );
                self.pending.drain(..whole);
                return Ok(());
            }
        }
    }
}

impl Channel for UringPipe {
    fn name(&self) -> String {
        if self.sqpoll {
            "io_uring SQPOLL (pipe)".into()
        } else {
            "io_uring (pipe)".into()
        }
    }
    fn describe(&self) -> String {
        if self.sqpoll {
            "sender ring with SQPOLL thread writes 64 B into a pipe, no sender syscalls; receiver io_uring READ".into()
        } else {
            "IORING_OP_WRITE 64 B into a pipe; receiver waits on IORING_OP_READ in io_uring_enter"
                .into()
        }
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let (r, w) = pipe_fds()?;
        let tx_ring = if self.sqpoll {
            let mut b = IoUring::builder();
            b.setup_sqpoll(500);
            if let Some(cpu) = self.sq_cpu {
                b.setup_sqpoll_cpu(cpu);
            }
            b.build(8)
        } else {
            IoUring::new(8)
        }
        .map_err(|e| uring_err("io_uring_setup", e))?;
        let rx_ring = IoUring::new(8).map_err(|e| uring_err("io_uring_setup", e))?;
        Ok((
            Box::new(Tx {
                ring: tx_ring,
                buf: Box::default(),
                fd: w,
                sqpoll: self.sqpoll,
            }),
            Box::new(Rx {
                ring: rx_ring,
                fd: r,
                buf: vec![0; 4096],
                pending: Vec::new(),
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::UringPipe;

    #[test]
    fn uring_pipe_delivers_all_in_order() {
        crate::runner::check_channel(&UringPipe {
            sqpoll: false,
            sq_cpu: None,
        });
    }

    #[test]
    fn uring_sqpoll_delivers_all_in_order() {
        crate::runner::check_channel(&UringPipe {
            sqpoll: true,
            sq_cpu: Some(1),
        });
    }
}
