//! AF_UNIX socketpairs, stream and seqpacket.

use super::stream::{FdTx, StreamRx};
use crate::channel::{ChanError, Channel, Pair};
use crate::sys::{cvt, Fd};

/// A Unix socketpair of the given type (SOCK_STREAM or SOCK_SEQPACKET).
pub struct UnixSocket {
    pub seqpacket: bool,
}

impl Channel for UnixSocket {
    fn name(&self) -> String {
        if self.seqpacket {
            "unix seqpacket".into()
        } else {
            "unix stream".into()
        }
    }
    fn describe(&self) -> String {
        if self.seqpacket {
            "socketpair(SOCK_SEQPACKET): one 64 B record per send/recv".into()
        } else {
            "socketpair(SOCK_STREAM): write 64 B, receiver reads in bulk".into()
        }
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let ty = if self.seqpacket {
            libc::SOCK_SEQPACKET
        } else {
            libc::SOCK_STREAM
        };
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors socketpair writes.
        cvt(unsafe {
            libc::socketpair(libc::AF_UNIX, ty | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        })
        .map_err(|e| ChanError::io("socketpair", e))?;
        // A seqpacket read returns one record, whatever the buffer size.
        let read_size = if self.seqpacket { 64 } else { 4096 };
        Ok((
            Box::new(FdTx(Fd(fds[0]))),
            Box::new(StreamRx::new(Fd(fds[1]), read_size)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::UnixSocket;

    #[test]
    fn unix_stream_delivers_all_in_order() {
        crate::runner::check_channel(&UnixSocket { seqpacket: false });
    }

    #[test]
    fn unix_seqpacket_delivers_all_in_order() {
        crate::runner::check_channel(&UnixSocket { seqpacket: true });
    }
}
