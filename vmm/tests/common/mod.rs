//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Builds the freestanding test guest (both flavours) once per test binary;
/// returns the directory holding `milk-test-guest-{pvh,64}.elf`.
pub fn test_guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("milk-test-guest-{}", std::process::id()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("test-guest/build.sh");
        let st = Command::new("sh")
            .arg(&script)
            .arg(&out)
            .status()
            .expect("run test-guest/build.sh (needs gcc and ld)");
        assert!(st.success(), "building the test guest failed");
        out
    })
}

/// Path of one flavour of the test guest.
pub fn test_guest(flavour: &str) -> PathBuf {
    test_guest_dir().join(format!("milk-test-guest-{flavour}.elf"))
}

/// True when /dev/kvm can be opened.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}
