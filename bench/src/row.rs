//! A table row: anything that yields a [`RunResult`] per run. Message
//! channels become rows through [`ChannelRow`] (the shared runner measures
//! them); closed-loop systems with their own driver, like the virtio-milk
//! loopback, implement [`Row`] directly.

use crate::channel::{ChanError, Channel};
use crate::runner::{run_once, RunConfig, RunResult};

pub trait Row: Sync {
    /// Row name.
    fn name(&self) -> String;
    /// One line: what is measured and how.
    fn describe(&self) -> String;
    /// One run at `cfg`; `Unavailable` prints the reason instead of numbers.
    fn run(&self, cfg: &RunConfig) -> Result<RunResult, ChanError>;
}

/// Measures a message [`Channel`] with the shared runner.
pub struct ChannelRow(pub Box<dyn Channel>);

impl Row for ChannelRow {
    fn name(&self) -> String {
        self.0.name()
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn run(&self, cfg: &RunConfig) -> Result<RunResult, ChanError> {
        run_once(self.0.as_ref(), cfg)
    }
}
