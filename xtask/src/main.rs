//! `cargo xtask`: builds the guest, boots it, runs the test suite and the
//! scheduler comparison.

mod compare;
mod fuzz;
mod nested;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use clap::{Parser, Subcommand};
use milk_harness::GuestSpec;

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "MiLK build orchestration",
    after_help = "Examples:\n  cargo xtask demo               build the guest, boot it, show kernel/CPUs/sched_ext\n  \
                  cargo xtask test               everything CI runs\n  \
                  cargo xtask boot -- milk-work  boot and run a command in the guest\n  \
                  cargo xtask boot --test-fifo -- cat /sys/kernel/sched_ext/root/ops\n  \
                  cargo xtask compare --quick    smoke run of the scheduler comparison\n  \
                  cargo xtask fuzz runtime --time 600   one fuzz target for 10 minutes\n  \
                  cargo xtask nested -- --kernel K --initrd I --cpus 2 --policy fifo   milk-vmm on real KVM (nested)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest and boot it with virtio-milk and the host FIFO policy:
    /// prints kernel version, CPUs, sched_ext state, a 64-thread workload's
    /// result and the host's summary.
    Demo,
    /// Run everything CI runs: format, lints, the whole test suite, benchmark smoke run.
    Test,
    /// Build (or find in the cache) the guest kernel and print its paths.
    Kernel {
        /// Build from scratch in a fresh directory, ignoring the cache.
        #[arg(long)]
        clean: bool,
    },
    /// Build (or find in the cache) the nested-KVM L1 host kernel and print its path.
    L1Kernel,
    /// Build (or find in the cache) the initramfs and print its path.
    Initramfs,
    /// Boot the guest under QEMU TCG and run a command in it.
    Boot {
        /// vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Enable the built-in sched_ext test FIFO scheduler (scx_test_fifo).
        #[arg(long)]
        test_fifo: bool,
        /// Timeout in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Boot bzImage instead of the PVH vmlinux.
        #[arg(long)]
        bzimage: bool,
        /// Command to run in the guest (default: an interactive shell).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a milk-vmm command on real KVM: inside a nested L1 host under QEMU
    /// TCG with emulated AMD SVM (directly where /dev/kvm has VMX/SVM);
    /// exits with milk-vmm's status.
    Nested(nested::NestedArgs),
    /// Build the kernel twice from scratch and compare the bzImage hashes.
    Reproducible {
        /// Write the hash into guest-kernel/kernel.lock when both builds agree.
        #[arg(long)]
        record: bool,
    },
    /// Compare CFS, scx_test_fifo and milk with every host policy on the
    /// same workloads: interleaved boots, medians and spreads, ratios to
    /// CFS, fidelity counters, JSON and SVG plots.
    Compare(compare::CompareArgs),
    /// Run one coverage-guided fuzz target (libFuzzer, stable toolchain) with progress
    /// output; `--list` names the targets (docs/reliability.md).
    Fuzz(fuzz::FuzzArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // compare prints its own progress; the per-boot transport logs would bury it.
    let level = if matches!(cli.cmd, Cmd::Compare(_)) {
        "warn"
    } else {
        "info"
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level))
        .format_timestamp(None)
        .init();
    match run(cli.cmd) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn boot(
    cmdline_extra: &str,
    cpus: u32,
    memory: u32,
    timeout: u64,
    bzimage: bool,
) -> Res<milk_harness::GuestOutcome> {
    let k = milk_guest_kernel::ensure_built()?;
    let initrd = milk_images::ensure_initramfs()?;
    let mut spec = GuestSpec::new(if bzimage { &k.bzimage } else { &k.vmlinux });
    spec.initrd = Some(initrd);
    spec.cpus = cpus;
    spec.memory_mib = memory;
    spec.timeout = Duration::from_secs(timeout);
    spec.cmdline = cmdline_extra.to_string();
    let log_dir = milk_guest_kernel::cache_dir().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    spec.serial_log = Some(log_dir.join("last-boot.log"));
    eprintln!(
        "[boot] qemu TCG, {cpus} vCPUs, {memory} MiB, {} (console log: {})",
        spec.kernel.display(),
        log_dir.join("last-boot.log").display()
    );
    Ok(milk_harness::run_qemu(&spec, &mut |l| println!("{l}"))?)
}

fn run(cmd: Cmd) -> Res<ExitCode> {
    match cmd {
        Cmd::Demo => demo(),
        Cmd::Test => test_suite(),
        Cmd::Kernel { clean } => {
            let opts = milk_guest_kernel::BuildOptions {
                clean,
                ..Default::default()
            };
            let k = milk_guest_kernel::build(&opts)?;
            println!("version  {}", k.version);
            println!(
                "bzImage  {} (sha256 {})",
                k.bzimage.display(),
                k.bzimage_sha256
            );
            println!("vmlinux  {}", k.vmlinux.display());
            println!("config   {}", k.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::L1Kernel => {
            let k = milk_l1_host::kernel::ensure_kernel()?;
            println!("version  {}", k.version);
            println!(
                "bzImage  {} (sha256 {})",
                k.bzimage.display(),
                k.bzimage_sha256
            );
            println!("config   {}", k.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Initramfs => {
            println!("{}", milk_images::ensure_initramfs()?.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Boot {
            cpus,
            memory,
            test_fifo,
            timeout,
            bzimage,
            command,
        } => {
            let mut extra = String::new();
            if test_fifo {
                extra.push_str("scx_test_fifo ");
            }
            if !command.is_empty() {
                let c = command.join(" ");
                if c.contains('"') {
                    return Err("the guest command cannot contain '\"' (it travels on the kernel command line)".into());
                }
                extra.push_str(&format!("milk.run=\"{c}\""));
            }
            let out = boot(&extra, cpus, memory, timeout, bzimage)?;
            Ok(exit_for(&out))
        }
        Cmd::Reproducible { record } => reproducible(record),
        Cmd::Compare(args) => {
            compare::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Nested(a) => nested::run(a, &workspace_root()),
        Cmd::Fuzz(a) => fuzz::run(a),
    }
}

/// The main job: the guest scheduled by a host policy over virtio-milk.
fn demo() -> Res<ExitCode> {
    use milk_ivshmem::session::{run_milk_guest, MilkGuestConfig};

    let k = milk_guest_kernel::ensure_built()?;
    let mut spec = GuestSpec::new(&k.vmlinux);
    spec.initrd = Some(milk_images::ensure_initramfs()?);
    spec.cpus = 2;
    spec.memory_mib = 256;
    spec.timeout = Duration::from_secs(180);
    let log_dir = milk_guest_kernel::cache_dir().join("logs");
    std::fs::create_dir_all(&log_dir)?;
    spec.serial_log = Some(log_dir.join("demo.log"));
    // Wait for the bridge to come up, report, then run a workload under it.
    let script = "i=0; while [ $(cat /sys/kernel/milk/state) != enabled ] && [ $i -lt 100 ]; \
                  do usleep 50000; i=$((i+1)); done; \
                  echo kernel: $(uname -r); echo cpus: $(nproc); \
                  echo sched_ext: $(cat /sys/kernel/sched_ext/state) ops $(cat /sys/kernel/sched_ext/root/ops); \
                  milk-work -t 64 -r 10 -w 20000 -s 1000; r=$?; \
                  echo guest bridge: applied $(cat /sys/kernel/milk/decisions_applied) \
                  fallbacks $(cat /sys/kernel/milk/local_fallbacks); exit $r";
    spec.cmdline = format!("milk.run=\"{script}\"");
    eprintln!(
        "[demo] QEMU TCG, 2 vCPUs, virtio-milk over ivshmem, host policy fifo (console log: {})",
        log_dir.join("demo.log").display()
    );
    let run = run_milk_guest(&MilkGuestConfig::new(spec, "fifo"), &mut |line, _| {
        if !line.starts_with('[') {
            println!("guest| {line}");
        }
    })?;
    println!();
    for s in &run.summaries {
        println!("{s}");
    }
    if let Some(t) = run.outcome.to_init {
        println!(
            "guest reached /init in {:.1} s wall, whole run {:.1} s",
            t.as_secs_f64(),
            run.outcome.elapsed.as_secs_f64()
        );
    }
    Ok(exit_for(&run.outcome))
}

fn exit_for(out: &milk_harness::GuestOutcome) -> ExitCode {
    match out.result {
        Some(r) => ExitCode::from(r.status as u8),
        None => {
            eprintln!("error: the guest ended without a result line");
            ExitCode::from(1)
        }
    }
}

fn reproducible(record: bool) -> Res<ExitCode> {
    let mut builds = Vec::new();
    for i in 1..=2 {
        eprintln!("[reproducible] clean build {i} of 2");
        let opts = milk_guest_kernel::BuildOptions {
            clean: true,
            ..Default::default()
        };
        builds.push(milk_guest_kernel::build(&opts)?);
    }
    println!("build 1 bzImage sha256 {}", builds[0].bzimage_sha256);
    println!("build 2 bzImage sha256 {}", builds[1].bzimage_sha256);
    if builds[0].bzimage_sha256 != builds[1].bzimage_sha256 {
        eprintln!("error: the two clean builds differ");
        return Ok(ExitCode::from(1));
    }
    if record {
        let path = milk_guest_kernel::lock_path();
        let text = std::fs::read_to_string(&path)?;
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with("bzimage_sha256") && !l.starts_with("bzimage_key"))
            .map(str::to_string)
            .collect();
        lines.push(format!("bzimage_sha256 = \"{}\"", builds[0].bzimage_sha256));
        lines.push(format!("bzimage_key = \"{}\"", builds[0].key));
        std::fs::write(&path, lines.join("\n") + "\n")?;
        println!("recorded in {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn step(name: &str, cmd: &mut Command) -> Res<()> {
    eprintln!("\n=== {name} ===");
    let status = cmd.current_dir(workspace_root()).status()?;
    if !status.success() {
        return Err(format!("{name} failed ({status})").into());
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test_suite() -> Res<ExitCode> {
    eprintln!("=== host packages ===");
    milk_guest_kernel::host_deps::ensure()?;
    step("format", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "lints",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    // Build the guest first so its progress is visible (the tests would
    // otherwise build it silently inside a test).
    eprintln!("\n=== guest kernel and initramfs ===");
    let k = milk_guest_kernel::ensure_built()?;
    eprintln!("kernel {} at {}", k.version, k.vmlinux.display());
    eprintln!("initramfs {}", milk_images::ensure_initramfs()?.display());
    let l1 = milk_l1_host::kernel::ensure_kernel()?;
    eprintln!("L1 host kernel {} at {}", l1.version, l1.bzimage.display());
    step(
        "tests",
        cargo().args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--test-threads=2",
        ]),
    )?;
    eprintln!("\n=== fuzzing: corpus replay and a short run of every target ===");
    fuzz::ci_step()?;
    step(
        "benchmark smoke run",
        cargo().args(["run", "--release", "-p", "milk-bench", "--", "--smoke"]),
    )?;
    Ok(ExitCode::SUCCESS)
}
