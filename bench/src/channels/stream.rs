//! Shared ends for byte-stream and datagram descriptors (pipe, Unix
//! sockets): one write(2) of 64 bytes per message; the receiver reads as much
//! as is available and reassembles whole messages.

use crate::channel::{ChanError, MsgReceiver, MsgSender};
use crate::msg::{Msg, MSG_SIZE};
use crate::sys::{read_some, write_all, Fd};

/// Writes each message with one write(2).
pub struct FdTx(pub Fd);

impl MsgSender for FdTx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        write_all(self.0 .0, m.as_bytes()).map_err(|e| ChanError::io("write", e))
    }
}

/// Blocking reader that reassembles 64-byte messages from a byte stream.
pub struct StreamRx {
    fd: Fd,
    pending: Vec<u8>,
    chunk: Vec<u8>,
}

impl StreamRx {
    /// `read_size` bounds one read(2): 64 for one message per syscall
    /// (datagram sockets), larger to drain a stream in bulk.
    pub fn new(fd: Fd, read_size: usize) -> Self {
        StreamRx {
            fd,
            pending: Vec::with_capacity(2 * read_size),
            chunk: vec![0; read_size.max(MSG_SIZE)],
        }
    }
}

impl MsgReceiver for StreamRx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            let n = read_some(self.fd.0, &mut self.chunk).map_err(|e| ChanError::io("read", e))?;
            if n == 0 {
                return Err(ChanError::Protocol("peer closed the channel".into()));
            }
            self.pending.extend_from_slice(&self.chunk[..n]);
            let whole = self.pending.len() / MSG_SIZE * MSG_SIZE;
            if whole == 0 {
                continue;
            }
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
