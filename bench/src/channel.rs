//! The small trait set every channel implements; a new row (e.g. the
//! virtio-milk loopback) plugs in by implementing [`Channel`].

use crate::msg::Msg;

/// Errors raised by channels and the runner.
#[derive(Debug, thiserror::Error)]
pub enum ChanError {
    /// The channel cannot run on this machine; the table prints the reason.
    #[error("{0}")]
    Unavailable(String),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Protocol(String),
}

impl ChanError {
    /// Wraps the current `errno` for operation `op`.
    pub fn last_os(op: &'static str) -> Self {
        ChanError::Io {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        ChanError::Io { op, source }
    }
}

/// The producing end, driven by the runner on the sender CPU.
pub trait MsgSender: Send {
    /// Runs once on the sender thread, after pinning, before any message.
    fn start(&mut self) -> Result<(), ChanError> {
        Ok(())
    }
    /// Hands one message to the channel (may buffer up to the channel's batch).
    fn send(&mut self, m: &Msg) -> Result<(), ChanError>;
    /// Makes every message handed over so far visible/notified to the receiver.
    fn flush(&mut self) -> Result<(), ChanError> {
        Ok(())
    }
}

/// The consuming end, driven by the runner on the receiver CPU.
pub trait MsgReceiver: Send {
    /// Runs once on the receiver thread, after pinning, before the sender starts.
    fn start(&mut self) -> Result<(), ChanError> {
        Ok(())
    }
    /// Waits (blocking or spinning, as the channel's mode says) until at least
    /// one message arrived and appends every available message to `out`.
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError>;
}

/// A connected sender/receiver pair.
pub type Pair = (Box<dyn MsgSender>, Box<dyn MsgReceiver>);

/// A benchmarked channel: a factory for connected sender/receiver pairs.
pub trait Channel: Sync {
    /// Row name, e.g. "pipe" or "virtio-milk notify b8".
    fn name(&self) -> String;
    /// One line: how the 64 bytes travel and how the receiver waits.
    fn describe(&self) -> String;
    /// Creates a fresh connected pair (one per run).
    fn open(&self) -> Result<Pair, ChanError>;
}
