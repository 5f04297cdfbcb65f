//! Why the VM stopped, and the one-shot handle every thread uses to ask the
//! main loop to stop it.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest triple-faulted or shut down (`KVM_EXIT_SHUTDOWN`, e.g. `reboot=t`).
    Shutdown,
    /// The guest reset the machine through the i8042 controller.
    Reset,
    /// KVM reported a system event (shutdown/reset/crash) of this type.
    SystemEvent(u32),
    /// The guest stopped in a way the hypervisor could not handle (internal
    /// error, failed entry, unexpected exit); the text says where.
    GuestFault(String),
    /// The VMM failed while running the guest.
    VmmError(String),
    /// The configured timeout expired.
    Timeout,
    /// The VMM received this signal (SIGINT/SIGTERM).
    Signal(i32),
    /// Stopped on request (the control socket's `stop`).
    Stopped,
}

impl ExitReason {
    /// True for the ways a guest normally ends (shutdown, reset, system event).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::Shutdown | ExitReason::Reset | ExitReason::SystemEvent(_)
        )
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Shutdown => write!(f, "guest shut down (triple fault)"),
            ExitReason::Reset => write!(f, "guest reset through i8042"),
            ExitReason::SystemEvent(t) => write!(f, "guest system event {t}"),
            ExitReason::GuestFault(s) => write!(f, "guest fault: {s}"),
            ExitReason::VmmError(s) => write!(f, "VMM error: {s}"),
            ExitReason::Timeout => write!(f, "timeout"),
            ExitReason::Signal(s) => write!(f, "interrupted by signal {s}"),
            ExitReason::Stopped => write!(f, "stopped on request"),
        }
    }
}

struct ExitState {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

/// Shared handle: the first [`ExitHandle::request`] wins and wakes the main loop.
#[derive(Clone)]
pub struct ExitHandle {
    inner: Arc<ExitState>,
}

impl ExitHandle {
    /// Creates a handle with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitHandle {
            inner: Arc::new(ExitState {
                reason: Mutex::new(None),
                evt: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    /// Records `reason` (unless another reason was recorded first) and wakes
    /// the main loop.
    pub fn request(&self, reason: ExitReason) {
        {
            let mut r = self.inner.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                log::debug!("exit requested: {reason}");
                *r = Some(reason);
            }
        }
        if let Err(e) = self.inner.evt.write(1) {
            log::error!("cannot signal VM exit: {e}");
        }
    }

    /// The recorded reason, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.inner
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable on the first request.
    pub fn eventfd(&self) -> &EventFd {
        &self.inner.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let h = ExitHandle::new().unwrap();
        assert!(h.reason().is_none());
        assert!(h.eventfd().read().is_err(), "not readable before a request");
        let h2 = h.clone();
        h2.request(ExitReason::Reset);
        h.request(ExitReason::Timeout);
        assert_eq!(h.reason(), Some(ExitReason::Reset));
        assert_eq!(h.eventfd().read().unwrap(), 2);
        assert!(ExitReason::Shutdown.is_clean());
        assert!(!ExitReason::GuestFault("x".into()).is_clean());
    }
}
