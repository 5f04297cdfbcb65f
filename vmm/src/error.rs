//! VMM errors and the process exit codes they map to.

use std::path::PathBuf;

use crate::boot::BootError;

/// Process exit codes of `milk-vmm` other than the guest's own status.
///
/// When the guest prints `MILK-RESULT status=<n>`, the exit code is `n`
/// (0..=255). Otherwise one of these is returned; a one-line error on stderr
/// always accompanies them.
pub mod exit_code {
    /// Invalid arguments (`--cpus 0`, absurd `--memory`, bad command line).
    pub const USAGE: i32 = 64;
    /// Kernel or initramfs unusable (corrupt, does not fit in guest memory).
    pub const DATA: i32 = 65;
    /// Kernel or initramfs missing or unreadable.
    pub const NO_INPUT: i32 = 66;
    /// The requested engine is not available (no usable /dev/kvm, no QEMU).
    pub const UNAVAILABLE: i32 = 69;
    /// Internal VMM/hypervisor failure (a KVM ioctl failed, ...).
    pub const SOFTWARE: i32 = 70;
    /// The guest stopped abnormally: KVM internal error, failed VM entry,
    /// unexpected exit (e.g. a standard kernel under kvm_pvm).
    pub const GUEST_FAULT: i32 = 71;
    /// The serial log cannot be created or written.
    pub const CANT_CREATE: i32 = 73;
    /// The guest ended (shutdown/reset) without printing a result line.
    pub const NO_RESULT: i32 = 80;
    /// `--timeout` expired.
    pub const TIMEOUT: i32 = 124;
    /// Killed by a signal: 128 + signal number (130 for SIGINT, 143 for SIGTERM).
    pub const SIGNAL_BASE: i32 = 128;
}

/// Errors from setting up or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Input file missing or unreadable.
    #[error("{}: {msg}", .path.display())]
    Input {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// Loading the kernel/initramfs or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Kernel command line rejected.
    #[error(transparent)]
    Cmdline(#[from] crate::cmdline::CmdlineError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// KVM is not usable.
    #[error("KVM unavailable: {0}")]
    KvmUnavailable(String),
    /// KVM lacks capabilities milk-vmm needs (the names, comma separated).
    #[error("KVM lacks required capabilities: {0}")]
    MissingCapabilities(String),
    /// A KVM ioctl failed.
    #[error("{what}: {err}")]
    Kvm {
        /// What was being done.
        what: String,
        /// errno.
        err: kvm_ioctls::Error,
    },
    /// vCPU set-up failed.
    #[error(transparent)]
    Cpu(#[from] crate::cpu::CpuError),
    /// Serial log could not be created.
    #[error("serial log {}: {err}", .path.display())]
    SerialLog {
        /// The path.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// Any other system call failure.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
    /// The virtio-milk device under KVM failed.
    #[error("virtio-milk device: {0}")]
    MilkDevice(#[from] virtio_milk::device::DeviceError),
    /// The out-of-process policy (--policy-socket) is unreachable or unusable.
    #[error("policy daemon: {0}")]
    PolicyDaemon(#[from] crate::devices::virtio::vhost_user::VhostUserDeviceError),
}

impl VmmError {
    /// Builds a [`VmmError::Kvm`].
    pub fn kvm(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
        let what = what.into();
        move |err| VmmError::Kvm { what, err }
    }

    /// Builds a [`VmmError::Io`].
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
        let what = what.into();
        move |err| VmmError::Io { what, err }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::InvalidConfig(_) | VmmError::Cmdline(_) => exit_code::USAGE,
            VmmError::Input { .. } => exit_code::NO_INPUT,
            VmmError::Boot(BootError::KernelIo { .. } | BootError::InitrdIo { .. }) => {
                exit_code::NO_INPUT
            }
            VmmError::Boot(_) => exit_code::DATA,
            VmmError::KvmUnavailable(_)
            | VmmError::MissingCapabilities(_)
            | VmmError::PolicyDaemon(_) => exit_code::UNAVAILABLE,
            VmmError::SerialLog { .. } => exit_code::CANT_CREATE,
            VmmError::Memory(_) | VmmError::Kvm { .. } | VmmError::Cpu(_) | VmmError::Io { .. } => {
                exit_code::SOFTWARE
            }
            VmmError::MilkDevice(_) => exit_code::SOFTWARE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_by_class() {
        let usage = VmmError::InvalidConfig("x".into());
        let input = VmmError::Input {
            path: "/nope".into(),
            msg: "missing".into(),
        };
        let data = VmmError::Boot(BootError::KernelTooShort("k".into()));
        let unavailable = VmmError::KvmUnavailable("no".into());
        assert_eq!(usage.exit_code(), 64);
        assert_eq!(input.exit_code(), 66);
        assert_eq!(data.exit_code(), 65);
        assert_eq!(unavailable.exit_code(), 69);
        assert!(input.to_string().contains("/nope: missing"));
    }
}
