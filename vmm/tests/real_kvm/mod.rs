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

/// Builds milkctl (package milk-control) beside milk-vmm (`cargo test -p
/// milk-vmm` does not, and one left there may be stale; cargo does nothing
/// when it is up to date).
pub fn ensure_milkctl() {
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

/// Lines of a step's output an assertion message shows (the whole output
/// is in the run's log file, named in the message).
const TAIL: usize = 40;

/// The log file of the last [`run`] in this test binary.
static LAST_LOG: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// A fresh log file under the cargo target tmpdir for one L1 run.
fn new_log() -> (PathBuf, std::fs::File) {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested-logs");
    std::fs::create_dir_all(&dir).expect("create the nested log dir");
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{}-{n}.log", std::process::id()));
    let f = std::fs::File::create(&path).expect("create the nested log");
    (path, f)
}

/// L1 boots a [`run`] makes when the L1 host kernel itself crashes.
const L1_ATTEMPTS: usize = 3;

/// True if the L1 host kernel (test infrastructure: an emulated SVM host
/// under QEMU TCG, not the system under test) crashed during `out`: the L1
/// ended before its last step and its own kernel (release `<boot>-milk-l1`,
/// never the guest's) printed an oops or panic. Seen on 2026-12-01: a stack
/// guard page hit in the L1's KVM (`Comm: vcpu0 ... 6.12.117-milk-l1`).
fn l1_kernel_crashed(out: &NestedOutcome) -> bool {
    let Some(b) = out.boot.as_ref() else {
        return false;
    };
    let release = format!("{} #", b.kernel);
    let lines = || {
        out.l1_console
            .iter()
            .chain(out.steps.iter().flat_map(|s| s.stdout.iter()))
    };
    !out.done
        && lines().any(|l| l.contains(&release))
        && lines().any(|l| l.contains("Kernel panic") || l.contains("Oops"))
}

/// Runs every step of `r` (within `timeout`) and returns the outcome; panics
/// with the reason if the L1 could not run. Everything the L1 printed goes
/// to a log file under the target dir (`MILK_NESTED_ECHO=1` also echoes it);
/// assertion messages show the tail and the file's path. A crash of the L1
/// host kernel itself ([`l1_kernel_crashed`]) is reported and the whole run
/// repeated in a fresh L1, up to [`L1_ATTEMPTS`] boots; anything the guest
/// or milk-vmm does is never retried.
pub fn run(r: &Runner, timeout: Duration) -> NestedOutcome {
    let _one = ONE_L1.lock().unwrap_or_else(|e| e.into_inner());
    let _ = env_logger::builder().is_test(true).try_init();
    let mut attempt = 1;
    loop {
        let (out, log_path) = run_once(r, timeout);
        if r.mode != Mode::Nested || !l1_kernel_crashed(&out) {
            break check(r, out);
        }
        eprintln!(
            "nested: the L1 host kernel crashed (boot {attempt} of {L1_ATTEMPTS}; log {})",
            log_path.display()
        );
        assert!(
            attempt < L1_ATTEMPTS,
            "the L1 host kernel crashed in {L1_ATTEMPTS} boots in a row; last: {}",
            out.steps.last().map(ctx).unwrap_or_default()
        );
        attempt += 1;
    }
}

/// One L1 boot running every step of `r`, logged to a fresh file.
fn run_once(r: &Runner, timeout: Duration) -> (NestedOutcome, PathBuf) {
    use std::io::Write;
    let echo = std::env::var_os("MILK_NESTED_ECHO").is_some_and(|v| v != "0");
    let (log_path, mut log) = new_log();
    *LAST_LOG.lock().unwrap_or_else(|e| e.into_inner()) = Some(log_path.clone());
    let work = tempfile::tempdir().unwrap();
    let mut opts = RunOptions::new(work.path());
    opts.timeout = timeout;
    let out = r
        .run(&opts, &mut |l| {
            let line = match l {
                NestedLine::L1(s) => format!("l1| {s}"),
                NestedLine::Stdout(id, s) => format!("{id}| {s}"),
                NestedLine::Stderr(id, s) => format!("{id}!| {s}"),
            };
            let _ = writeln!(log, "{line}");
            if echo {
                println!("{line}");
            }
        })
        .unwrap_or_else(|e| {
            let console =
                std::fs::read_to_string(work.path().join("l1-console.log")).unwrap_or_default();
            panic!(
                "running on real KVM ({:?}) failed: {e}\nlast L1 console lines:\n{}\n(whole run: {})",
                r.mode,
                tail(&console.lines().map(str::to_string).collect::<Vec<_>>(), TAIL),
                log_path.display()
            )
        });
    (out, log_path)
}

/// The checks every run passes: the L1 booted with SVM and KVM and ran
/// every step, and no step panicked.
fn check(r: &Runner, out: NestedOutcome) -> NestedOutcome {
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
        assert!(
            out.done,
            "the L1 ended before its last step; last step: {}",
            out.steps.last().map(ctx).unwrap_or_default()
        );
    }
    assert_eq!(
        out.steps.len(),
        r.job.steps.len(),
        "every step ran; last step: {}",
        out.steps.last().map(ctx).unwrap_or_default()
    );
    for s in &out.steps {
        assert!(
            !s.stderr_text().contains("panicked"),
            "step {} panicked: {}",
            s.id,
            ctx(s)
        );
    }
    out
}

/// The last `n` of `lines`, joined, with a note of how many were left out.
pub fn tail(lines: &[String], n: usize) -> String {
    let skip = lines.len().saturating_sub(n);
    let mut t = String::new();
    if skip > 0 {
        t.push_str(&format!("[{skip} earlier lines]\n"));
    }
    t.push_str(&lines[skip..].join("\n"));
    t
}

/// A step's context for assertion messages: status, the tail of its
/// output, and the log file with all of it.
pub fn ctx(s: &StepResult) -> String {
    let log = LAST_LOG.lock().unwrap_or_else(|e| e.into_inner()).clone();
    format!(
        "step {} status {:?} ({:.1} s)\nstdout (tail):\n{}\nstderr (tail):\n{}\n(whole run: {})",
        s.id,
        s.status,
        s.elapsed.as_secs_f64(),
        tail(&s.stdout, TAIL),
        tail(&s.stderr, TAIL),
        log.map(|p| p.display().to_string()).unwrap_or_default()
    )
}

/// `s` as a `Vec<String>` argument list.
pub fn args(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}
