//! Shared helpers for MiLK's end-to-end tests.

use std::path::PathBuf;
use std::time::Duration;

use milk_harness::{GuestOutcome, GuestSpec};

/// The built guest: kernel artifacts plus the initramfs.
pub struct Guest {
    /// Kernel artifacts from the cache (built on first use).
    pub kernel: milk_guest_kernel::KernelArtifacts,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds (or finds in the cache) the guest kernel and initramfs.
pub fn guest() -> Guest {
    let kernel = milk_guest_kernel::ensure_built().expect("guest kernel builds");
    let initrd = milk_images::ensure_initramfs().expect("initramfs builds");
    Guest { kernel, initrd }
}

impl Guest {
    /// A spec booting the PVH vmlinux with this initramfs and `cmdline`.
    pub fn spec(&self, cmdline: &str) -> GuestSpec {
        let mut s = GuestSpec::new(&self.kernel.vmlinux);
        s.initrd = Some(self.initrd.clone());
        s.cmdline = cmdline.to_string();
        s.timeout = Duration::from_secs(120);
        s
    }

    /// Boots `spec`, echoing the console to the test's output.
    pub fn run(&self, spec: &GuestSpec) -> GuestOutcome {
        milk_harness::run_qemu(spec, &mut |l| println!("guest| {l}"))
            .expect("guest runs to its end")
    }
}

/// The value of `key=` on the `MILK-BOOT` line /init prints.
pub fn boot_field(out: &GuestOutcome, key: &str) -> Option<String> {
    let line = out.console.iter().find(|l| l.contains("MILK-BOOT "))?;
    let at = line.find("MILK-BOOT ")?;
    line[at..]
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .map(str::to_string)
}
