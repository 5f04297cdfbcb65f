//! MiLK's L1 host for nested-KVM CI.
//!
//! QEMU 7.2's TCG emulates AMD SVM with nested paging, so on a machine
//! without usable hardware KVM an L1 Linux booted by QEMU (`-cpu
//! EPYC,+svm,+npt`) gets a real `/dev/kvm`, and milk-vmm's KVM engine runs
//! inside it on real KVM. This crate builds that L1:
//!
//! - [`kernel`]: a KVM + kvm_amd kernel from the guest's pinned Linux source,
//!   cached like the guest kernel;
//! - [`image`]: the L1 initramfs (busybox, the L1 `/init`, milk-vmm and
//!   milkctl with their shared libraries) plus a per-run job archive (the
//!   guest files and the milk-vmm invocations), reproducible byte for byte;
//! - [`job`]: the milk-vmm invocations one L1 boot runs and the files they
//!   need;
//! - [`runner`]: runs a job on real KVM, directly where `/dev/kvm` has
//!   VMX/SVM and through [`milk_harness::nested`] everywhere else.

pub mod image;
pub mod job;
pub mod kernel;
pub mod libs;
pub mod runner;

use std::path::{Path, PathBuf};

/// Errors from building or running the L1 host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The guest-kernel crate failed (source, config, host packages, make).
    #[error(transparent)]
    Kernel(#[from] milk_guest_kernel::Error),
    /// The guest initramfs could not be built.
    #[error(transparent)]
    Images(#[from] milk_images::Error),
    /// Building the L1 kernel failed.
    #[error("L1 kernel: {0}")]
    Build(String),
    /// A binary's shared libraries cannot be resolved.
    #[error("shared libraries of {0}: {1}")]
    Libs(PathBuf, String),
    /// A milk-vmm invocation cannot run in the L1 as given.
    #[error("{0}")]
    Job(String),
    /// Running the L1 failed.
    #[error(transparent)]
    Nested(#[from] milk_harness::nested::NestedError),
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// This crate's directory (holds `config/` and `init`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
