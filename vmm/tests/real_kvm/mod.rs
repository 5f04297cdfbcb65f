//! Running milk-vmm on real KVM from the tests: directly where `/dev/kvm`
//! has VMX/SVM, inside the nested L1 host (QEMU TCG with emulated AMD SVM,
//! `milk_l1_host`) everywhere else, e.g. here where `/dev/kvm` is kvm_pvm.
//! One L1 boot runs all the steps a test adds.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use milk_harness::nested::{NestedLine, NestedOutcome, StepResult};
use milk_l1_host::image::Binaries;
use milk_l1_host::runner::{mode_for_host, Mode, RunOptions, Runner};

/// The binary under test (and milkctl beside it, when built).
pub const BIN: &str = env!("CARGO_BIN_EXE_milk-vmm");

/// The project's guest: `vmlinux`, `bzImage` and initramfs (built and
/// cached on first use), or `MILK_VMLINUX` / `MILK_BZIMAGE` / `MILK_INITRAMFS`.
pub struct Guest {
    /// ELF kernel with the PVH note.
    pub vmlinux: PathBuf,
    /// The same kernel as bzImage.
    pub bzimage: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// The guest artifacts.
pub fn guest() -> Guest {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let (vmlinux, bzimage) = match (env("MILK_VMLINUX"), env("MILK_BZIMAGE")) {
        (Some(v), Some(b)) => (v, b),
        _ => {
            let k = milk_guest_kernel::ensure_built().expect("guest kernel builds");
            (k.vmlinux, k.bzimage)
        }
    };
    let initrd = env("MILK_INITRAMFS")
        .unwrap_or_else(|| milk_images::ensure_initramfs().expect("initramfs builds"));
    Guest {
        vmlinux,
        bzimage,
        initrd,
    }
}

/// A runner for this host with milk-vmm (and milkctl if built).
pub fn runner() -> Runner {
    Runner::new(mode_for_host(), Binaries::beside(BIN))
}

/// Builds milkctl (package milk-control) beside milk-vmm unless it is there
/// (`cargo test --workspace` builds it; `cargo test -p milk-vmm` does not).
pub fn ensure_milkctl() {
    if Binaries::beside(BIN).milkctl.is_some() {
        return;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args(["build", "-q", "-p", "milk-control", "--bin", "milkctl"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build for milkctl");
    assert!(st.success(), "building milkctl failed");
    assert!(
        Binaries::beside(BIN).milkctl.is_some(),
        "milkctl not beside {BIN} after building it"
    );
}

/// One L1 (two TCG threads: both host cores) at a time in a test binary.
static ONE_L1: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs every step of `r` (within `timeout`), echoing the output, and
/// returns the outcome; panics with the reason if the L1 could not run.
pub fn run(r: &Runner, timeout: Duration) -> NestedOutcome {
    let _one = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    let _ = env_logger::builder().is_test(true).try_init();
    let work = tempfile::tempdir().unwrap();
    let mut opts = RunOptions::new(work.path());
    opts.timeout = timeout;
    let out = r
        .run(&opts, &mut |l| match l {
            NestedLine::L1(s) => println!("l1| {s}"),
            NestedLine::Stdout(id, s) => println!("{id}| {s}"),
            NestedLine::Stderr(id, s) => println!("{id}!| {s}"),
        })
        .unwrap_or_else(|e| {
            let log =
                std::fs::read_to_string(work.path().join("l1-console.log")).unwrap_or_default();
            panic!(
                "running on real KVM ({:?}) failed: {e}\nL1 console:\n{log}",
                r.mode
            )
        });
    if r.mode == Mode::Nested {
        let b = out.boot.as_ref().expect("the L1 reported its boot");
        assert!(b.svm && b.kvm, "{b:?}");
        eprintln!(
            "nested: L1 {} reached /init in {:.1} s; {} steps; whole run {:.1} s",
            b.kernel,
            out.to_l1_init.unwrap_or_default().as_secs_f64(),
            out.steps.len(),
            out.elapsed.as_secs_f64()
        );
        assert!(out.done, "the L1 ended before its last step");
    }
    assert_eq!(out.steps.len(), r.job.steps.len(), "every step ran");
    for s in &out.steps {
        assert!(
            !s.stderr_text().contains("panicked"),
            "step {} panicked:\n{}",
            s.id,
            s.stderr_text()
        );
    }
    out
}

/// A step's context for assertion messages.
pub fn ctx(s: &StepResult) -> String {
    format!(
        "step {} status {:?} ({:.1} s)\nstdout:\n{}\nstderr:\n{}",
        s.id,
        s.status,
        s.elapsed.as_secs_f64(),
        s.stdout_text(),
        s.stderr_text()
    )
}

/// `s` as a `Vec<String>` argument list.
pub fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}
