//! Launcher errors and the process exit codes of milk-vmm.

/// Process exit codes of `milk-vmm` other than the guest's own status (the same table as
/// `milk_vmm::exit_code`, which the KVM VMM's errors use; a test keeps them equal).
pub mod exit_code {
    /// Invalid arguments.
    pub const USAGE: i32 = 64;
    /// Kernel or initramfs missing or unreadable.
    pub const NO_INPUT: i32 = 66;
    /// The requested engine is not available (no usable /dev/kvm, no QEMU).
    pub const UNAVAILABLE: i32 = 69;
    /// Internal failure.
    pub const SOFTWARE: i32 = 70;
    /// The guest stopped abnormally.
    pub const GUEST_FAULT: i32 = 71;
    /// The serial log cannot be created or written.
    pub const CANT_CREATE: i32 = 73;
    /// The guest ended without printing a result line.
    pub const NO_RESULT: i32 = 80;
    /// `--timeout` expired.
    pub const TIMEOUT: i32 = 124;
    /// Killed by a signal: 128 + signal number.
    pub const SIGNAL_BASE: i32 = 128;
}

/// Errors of engine choice and QEMU runs.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// KVM is not usable.
    #[error("KVM unavailable: {0}")]
    KvmUnavailable(String),
    /// QEMU failed or could not start.
    #[error("QEMU engine: {0}")]
    Qemu(#[from] milk_harness::HarnessError),
    /// The out-of-process policy (`--policy-socket`) is unreachable or unusable.
    #[error("policy daemon: {0}")]
    PolicyDaemon(#[from] milk_policy_daemon::frontend::FrontendError),
    /// The virtio-milk host side under QEMU failed.
    #[error("QEMU engine with virtio-milk: {0}")]
    Milk(milk_ivshmem::session::SessionError),
}

impl From<milk_ivshmem::session::SessionError> for LaunchError {
    fn from(e: milk_ivshmem::session::SessionError) -> Self {
        match e {
            // Keep the harness's exit-code mapping (timeout, QEMU missing, ...).
            milk_ivshmem::session::SessionError::Harness(h) => LaunchError::Qemu(h),
            milk_ivshmem::session::SessionError::Policy(p) => {
                LaunchError::InvalidConfig(format!("--policy: {p}"))
            }
            e => LaunchError::Milk(e),
        }
    }
}

impl LaunchError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        use milk_harness::HarnessError as H;
        match self {
            LaunchError::InvalidConfig(_) => exit_code::USAGE,
            LaunchError::KvmUnavailable(_) | LaunchError::PolicyDaemon(_) => exit_code::UNAVAILABLE,
            LaunchError::Milk(_) => exit_code::SOFTWARE,
            LaunchError::Qemu(h) => match h {
                H::QemuMissing => exit_code::UNAVAILABLE,
                H::BadInput(..) => exit_code::NO_INPUT,
                H::BadSpec(_) => exit_code::USAGE,
                H::Timeout { .. } => exit_code::TIMEOUT,
                H::SerialLog(..) => exit_code::CANT_CREATE,
                H::Qemu(_) => exit_code::SOFTWARE,
                // Variants the harness may add later.
                #[allow(unreachable_patterns)]
                _ => exit_code::SOFTWARE,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_by_class() {
        use milk_harness::HarnessError as H;
        assert_eq!(LaunchError::InvalidConfig("x".into()).exit_code(), 64);
        assert_eq!(LaunchError::KvmUnavailable("x".into()).exit_code(), 69);
        assert_eq!(LaunchError::Qemu(H::QemuMissing).exit_code(), 69);
        let t = H::Timeout {
            secs: 1,
            tail: String::new(),
        };
        assert_eq!(LaunchError::Qemu(t).exit_code(), 124);
    }
}
