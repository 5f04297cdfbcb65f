//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_milk-vmm");

/// Runs milk-vmm with `args` (logs at info) and asserts it did not panic.
pub fn run(args: &[&str]) -> Output {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run milk-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "milk-vmm panicked:\n{stderr}");
    out
}

/// Asserts that no process mentions `marker` (a unique temp path) in its
/// command line: nothing the binary started outlived it.
pub fn assert_no_leftovers(marker: &Path) {
    let marker = marker.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(!cmd.contains(&marker), "leftover process {pid}: {cmd}");
        }
    }
}

/// The number right after `key` in `text` (e.g. `"RUN "` in `"(RUN 12, ..."`).
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let i = text.find(key)? + key.len();
    let digits: String = text[i..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

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
