//! `cargo xtask nested -- <milk-vmm args>`: runs exactly that milk-vmm
//! command on real KVM (inside the nested L1 here, directly where
//! `/dev/kvm` has VMX/SVM), streams its stdout and stderr, and exits with
//! its status.

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use milk_harness::nested::{NestedError, NestedLine};
use milk_l1_host::image::Binaries;
use milk_l1_host::runner::{mode_for_host, Mode, RunOptions, Runner};

/// Options of the `nested` subcommand.
#[derive(Debug, clap::Args)]
pub struct NestedArgs {
    /// Limit for the whole run (L1 boot and milk-vmm), seconds; exit 124.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// L1 vCPUs (each is a TCG thread; this machine has 2 cores).
    #[arg(long, default_value_t = 2)]
    pub l1_cpus: u32,
    /// L1 RAM in MiB.
    #[arg(long, default_value_t = 2048)]
    pub l1_memory: u32,
    /// Use the debug build of milk-vmm instead of the release build.
    #[arg(long)]
    pub debug: bool,
    /// Also show the L1 host's own console (kernel and /init) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
    /// The milk-vmm arguments, exactly as for milk-vmm itself.
    #[arg(last = true, required = true)]
    pub args: Vec<String>,
}

pub(crate) fn build_vmm(root: &std::path::Path, debug: bool) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "milk-vmm", "--bins"])
        .current_dir(root);
    if !debug {
        cmd.arg("--release");
    }
    let st = cmd.status().map_err(|e| format!("cargo build: {e}"))?;
    if !st.success() {
        return Err(format!("building milk-vmm failed ({st})"));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target
        .join(if debug { "debug" } else { "release" })
        .join("milk-vmm"))
}

/// Runs the subcommand.
pub fn run(a: NestedArgs, root: &std::path::Path) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let vmm = build_vmm(root, a.debug)?;
    let mode = mode_for_host();
    let mut runner = Runner::new(mode, Binaries::beside(&vmm));
    runner.vmm_step(&a.args)?;
    let work = milk_guest_kernel::cache_dir()
        .join("nested")
        .join(format!("run-{}", std::process::id()));
    let mut opts = RunOptions::new(&work);
    opts.timeout = Duration::from_secs(a.timeout);
    opts.l1_cpus = a.l1_cpus;
    opts.l1_memory_mib = a.l1_memory;
    if mode == Mode::Nested {
        eprintln!(
            "[nested] milk-vmm on real KVM inside an L1 host (QEMU TCG, AMD SVM+NPT, {} vCPUs, {} MiB)",
            a.l1_cpus, a.l1_memory
        );
    } else {
        eprintln!("[nested] /dev/kvm has VMX/SVM here: running milk-vmm directly");
    }
    let verbose = a.verbose;
    let result = runner.run(&opts, &mut |l| match l {
        NestedLine::Stdout(_, s) => println!("{s}"),
        NestedLine::Stderr(_, s) => eprintln!("{s}"),
        NestedLine::L1(s) if verbose => eprintln!("[l1] {s}"),
        NestedLine::L1(_) => {}
    });
    let _ = std::fs::remove_file(work.join("l1-initramfs.cpio"));
    let out = match result {
        Ok(o) => o,
        Err(milk_l1_host::Error::Nested(e @ NestedError::Timeout { .. })) => {
            eprintln!(
                "error: {}",
                e.to_string().lines().next().unwrap_or_default()
            );
            return Ok(ExitCode::from(124));
        }
        Err(milk_l1_host::Error::Nested(e @ (NestedError::NoSvm(_) | NestedError::NoKvm(_)))) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(69));
        }
        Err(e) => return Err(e.into()),
    };
    if let (Some(b), Some(t)) = (&out.boot, out.to_l1_init) {
        eprintln!(
            "[nested] L1 {} ({} CPUs) reached /init in {:.1} s; console log {}",
            b.kernel,
            b.cpus,
            t.as_secs_f64(),
            work.join("l1-console.log").display()
        );
    }
    match out.step(1).and_then(|s| s.status) {
        Some(st) => Ok(ExitCode::from(st as u8)),
        None => Err("the L1 host ended before milk-vmm did (see the console log)".into()),
    }
}
