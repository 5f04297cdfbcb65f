//! pipe(2): the classic ipc-bench baseline.

use super::stream::{FdTx, StreamRx};
use crate::channel::{ChanError, Channel, Pair};
use crate::sys::{cvt, Fd};

pub struct Pipe;

/// Creates a pipe; returns (read end, write end).
pub fn pipe_fds() -> Result<(Fd, Fd), ChanError> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })
        .map_err(|e| ChanError::io("pipe2", e))?;
    Ok((Fd(fds[0]), Fd(fds[1])))
}

impl Channel for Pipe {
    fn name(&self) -> String {
        "pipe".into()
    }
    fn describe(&self) -> String {
        "write(2) 64 B into a pipe; receiver blocks in read(2)".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        let (r, w) = pipe_fds()?;
        Ok((Box::new(FdTx(w)), Box::new(StreamRx::new(r, 4096))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pipe_delivers_all_in_order() {
        crate::runner::check_channel(&super::Pipe);
    }
}
