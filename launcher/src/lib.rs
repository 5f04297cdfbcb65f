//! milk-launcher: how milk-vmm's front runs a guest, apart from the KVM VMM itself.
//!
//! - [`engine`]: what /dev/kvm can do here and which engine runs the guest;
//! - [`qemu`]: the QEMU TCG engine (plain, or with virtio-milk over ivshmem and a host
//!   policy), with a stop hook for the control socket;
//! - [`run`]: [`Run`], the one outcome type of every run path (the KVM path builds it
//!   from the VMM's outcome);
//! - [`error`]: [`LaunchError`] and milk-vmm's exit codes.

#![warn(missing_docs)]

pub mod engine;
pub mod error;
pub mod qemu;
pub mod run;
pub mod vhost_user;

pub use engine::{choose_engine, detect_kvm, detect_kvm_at, Engine, EngineChoice, KvmSupport};
pub use error::{exit_code, LaunchError};
pub use qemu::{run_qemu, GuestConfig, OnStart, StopFn, QEMU_MILK_MAX_MEMORY_MIB};
pub use run::{End, Run};
pub use vhost_user::{run_qemu_vhost_user, OnVhostStart};
