//! One outcome type for every way milk-vmm runs a guest (KVM, QEMU, QEMU with a policy).

use virtio_milk::metrics::Summary;

use crate::engine::Engine;
use crate::error::exit_code;

/// How a guest run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest printed `MILK-RESULT status=<n>`.
    Result(i32),
    /// Stopped on request (the control socket's `stop`).
    Stopped,
    /// `--timeout` expired.
    Timeout,
    /// milk-vmm got this signal.
    Signal(i32),
    /// The guest stopped abnormally (the text says how).
    GuestFault(String),
    /// The guest ended normally but printed no result line (the text says how).
    NoResult(String),
    /// The VMM failed while the guest ran.
    Failed(String),
}

/// A finished guest run.
#[derive(Debug)]
pub struct Run {
    /// The engine that ran it.
    pub engine: Engine,
    /// How it ended.
    pub end: End,
    /// With a host policy: one summary per host runtime run, in order (`None`: no policy).
    pub summaries: Option<Vec<Summary>>,
}

impl Run {
    /// milk-vmm's exit status for this run: the guest's result, 0 after a requested stop,
    /// else a code from [`exit_code`].
    pub fn exit_code(&self) -> i32 {
        match &self.end {
            End::Result(s) => *s,
            End::Stopped => 0,
            End::Timeout => exit_code::TIMEOUT,
            End::Signal(s) => exit_code::SIGNAL_BASE + s,
            End::GuestFault(_) => exit_code::GUEST_FAULT,
            End::NoResult(_) => exit_code::NO_RESULT,
            End::Failed(_) => exit_code::SOFTWARE,
        }
    }

    /// The line explaining a run that did not end with the guest's result (for stderr).
    pub fn end_line(&self) -> Option<String> {
        match &self.end {
            End::Result(_) => None,
            End::Stopped => Some("stopped on request".into()),
            End::Timeout => Some("timeout".into()),
            End::Signal(s) => Some(format!("interrupted by signal {s}")),
            End::GuestFault(w) => Some(format!("guest fault: {w}")),
            End::NoResult(w) => Some(format!("{w} without a MILK-RESULT line")),
            End::Failed(w) => Some(format!("VMM error: {w}")),
        }
    }

    /// Prints the runtime summaries on stdout and the end line on stderr; returns the
    /// exit status.
    pub fn report(&self) -> i32 {
        if let Some(s) = &self.summaries {
            if s.is_empty() {
                println!("virtio-milk summary: the guest driver never started the device");
            }
            for x in s {
                println!("{x}");
            }
        }
        if let Some(l) = self.end_line() {
            eprintln!("milk-vmm: {l}");
        }
        self.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let run = |end| Run {
            engine: Engine::Qemu,
            end,
            summaries: None,
        };
        assert_eq!(run(End::Result(3)).exit_code(), 3);
        assert_eq!(run(End::Stopped).exit_code(), 0);
        assert_eq!(run(End::Timeout).exit_code(), 124);
        assert_eq!(run(End::Signal(15)).exit_code(), 143);
        assert_eq!(run(End::GuestFault("x".into())).exit_code(), 71);
        assert_eq!(run(End::NoResult("x".into())).exit_code(), 80);
        assert_eq!(run(End::Failed("x".into())).exit_code(), 70);
        assert!(run(End::Result(0)).end_line().is_none());
        assert!(run(End::Stopped).end_line().unwrap().contains("stopped"));
    }
}
