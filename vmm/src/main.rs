//! `milk-vmm`: boot a MiLK guest under KVM (or QEMU TCG where KVM cannot run it).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use milk_vmm::{choose_engine, detect_kvm, exit_code, Engine, EngineChoice, Vm, VmConfig};

const EXAMPLES: &str = "\
Examples:
  # Boot the MiLK kernel and initramfs; the exit status is the guest's result.
  milk-vmm --kernel vmlinux --initrd initramfs.cpio.gz --cpus 2 --memory 512

  # Force KVM (on kvm_pvm a standard kernel stops at its first exception).
  milk-vmm --kernel vmlinux --engine kvm --serial-log /tmp/serial.log --timeout 60

  # Same guest under QEMU TCG, scheduled by the host policy fifo through
  # virtio-milk; a summary of the host runtime is printed at exit.
  milk-vmm --kernel vmlinux --initrd initramfs.cpio.gz --engine qemu --cpus 2 \\
           --cmdline 'milk.run=\"milk-work -t 16 -r 5\"' --policy fifo

Exit status: the guest's `MILK-RESULT status=<n>`; otherwise 64 invalid
arguments, 65 unusable kernel/initramfs, 66 missing/unreadable input,
69 engine unavailable, 70 VMM failure, 71 guest fault (KVM internal error),
73 serial log not writable, 80 guest ended without a result line,
124 timeout, 128+N killed by signal N.";

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EngineArg {
    /// KVM when it can run a standard guest, else QEMU TCG.
    Auto,
    /// milk-vmm's KVM VMM.
    Kvm,
    /// QEMU TCG through milk-harness.
    Qemu,
}

/// Boots a MiLK guest under KVM with a rust-vmm based VMM (or QEMU TCG).
#[derive(Debug, Parser)]
#[command(name = "milk-vmm", version, after_help = EXAMPLES)]
struct Cli {
    /// Kernel: vmlinux (ELF; PVH entry if present) or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initramfs.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to the base
    /// (console=ttyS0 earlyprintk=ttyS0 reboot=t panic=-1 loglevel=7).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    memory: u32,
    /// Which engine runs the guest.
    #[arg(long, value_enum, default_value_t = EngineArg::Auto)]
    engine: EngineArg,
    /// Host scheduling policy: attach the virtio-milk device and serve it with
    /// this policy; a summary is printed at exit.
    #[arg(long, value_name = "NAME", long_help = policy_help())]
    policy: Option<String>,
    /// Out-of-process policy: attach the virtio-milk device and hand its queues to the
    /// `milk-policy` daemon listening on this vhost-user socket (KVM engine). A daemon
    /// that dies is noticed, the guest falls back to CFS, and a daemon started again on
    /// the same path is reconnected.
    #[arg(long, value_name = "PATH", conflicts_with = "policy")]
    policy_socket: Option<PathBuf>,
    /// Also write the serial console to this file.
    #[arg(long, value_name = "PATH")]
    serial_log: Option<PathBuf>,
    /// Stop the guest after this many seconds (exit status 124).
    #[arg(long, value_name = "SECS")]
    timeout: Option<u64>,
    /// Do not copy the serial console to stdout.
    #[arg(long)]
    quiet: bool,
    /// Attach the "echo" virtio test device in slot 0 (KVM engine; used by
    /// the tests and the start-up benchmark with the freestanding test guest).
    #[arg(long, hide = true)]
    echo_device: bool,
    /// Enter an ELF vmlinux through the 64-bit boot protocol (zero page)
    /// instead of its PVH entry.
    #[arg(long)]
    linux64: bool,
}

type Summaries = Option<milk_vmm::devices::virtio::milk::MilkSummaries>;

fn new_vm(
    config: VmConfig,
    echo_device: bool,
    policy: Option<&str>,
    policy_socket: Option<&std::path::Path>,
) -> Result<(Vm, Summaries), milk_vmm::VmmError> {
    let cpus = config.cpus;
    let mut vm = Vm::new(config);
    if echo_device {
        let (dev, _stats) = milk_vmm::devices::virtio::echo::EchoDevice::new();
        vm.add_virtio_device(Box::new(dev))?;
    }
    if let Some(path) = policy_socket {
        let dev = milk_vmm::devices::virtio::vhost_user::VhostUserMilkDevice::new(path, cpus)?;
        vm.add_virtio_device(Box::new(dev))?;
    }
    let mut summaries = None;
    if let Some(name) = policy {
        let name = name.to_owned();
        let factory: virtio_milk::device::PolicyFactory = Box::new(move || {
            // Checked against milk_policies::names() before the VM starts.
            milk_policies::by_name(&name)
                .unwrap_or_else(|| Box::new(milk_policies::Fifo::default()))
        });
        let (dev, s) = milk_vmm::devices::virtio::milk::MilkMmioDevice::new(
            cpus,
            factory,
            virtio_milk::runtime::RuntimeConfig::default(),
        )?;
        vm.add_virtio_device(Box::new(dev))?;
        summaries = Some(s);
    }
    Ok((vm, summaries))
}

fn run_kvm(
    config: VmConfig,
    echo_device: bool,
    policy: Option<&str>,
    policy_socket: Option<&std::path::Path>,
) -> i32 {
    let (vm, summaries) = match new_vm(config, echo_device, policy, policy_socket) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("milk-vmm: {e}");
            return e.exit_code();
        }
    };
    let result = vm.run();
    // The VM and its devices are gone: every runtime summary is in.
    if let Some(s) = summaries {
        print_summaries(&s.lock().unwrap_or_else(|e| e.into_inner()));
    }
    match result {
        Ok(outcome) => milk_vmm::vmm::outcome_exit_code(&outcome),
        Err(e) => {
            eprintln!("milk-vmm: {e}");
            e.exit_code()
        }
    }
}

fn policy_help() -> String {
    format!(
        "Host scheduling policy: attach the virtio-milk device (virtio-mmio under KVM, \
         virtio over ivshmem under QEMU) and serve the guest's sched_ext bridge with this \
         host-side policy; a summary (messages, decisions, rejections, fallbacks, \
         event -> decision latency) is printed at exit. Under QEMU guest memory is limited \
         to {} MiB. Known policies: {}",
        milk_vmm::engine::QEMU_MILK_MAX_MEMORY_MIB,
        milk_policies::names().join(", ")
    )
}

fn print_summaries(summaries: &[virtio_milk::metrics::Summary]) {
    if summaries.is_empty() {
        println!("virtio-milk summary: the guest driver never started the device");
    }
    for s in summaries {
        println!("{s}");
    }
}

fn main() -> ExitCode {
    let _ = milk_vmm::vmm::PROCESS_START.set(Instant::now());
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    ExitCode::from(run(cli).clamp(0, 255) as u8)
}

fn run(cli: Cli) -> i32 {
    if let Some(p) = &cli.policy {
        if let Err(e) = milk_vmm::engine::check_policy(p) {
            eprintln!("milk-vmm: {e}");
            return e.exit_code();
        }
    }
    let cmdline = cli.cmdline.trim().to_string();
    let config = VmConfig {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline,
        cpus: cli.cpus,
        memory_mib: cli.memory,
        serial_log: cli.serial_log,
        echo_console: !cli.quiet,
        forward_stdin: true,
        timeout: cli.timeout.map(Duration::from_secs),
        handle_signals: true,
        force_linux64: cli.linux64,
    };
    if let Err(e) = config.validate() {
        eprintln!("milk-vmm: {e}");
        return e.exit_code();
    }
    let choice = match cli.engine {
        EngineArg::Auto => EngineChoice::Auto,
        EngineArg::Kvm => EngineChoice::Kvm,
        EngineArg::Qemu => EngineChoice::Qemu,
    };
    let support = detect_kvm();
    let engine = match choose_engine(choice, &support) {
        Ok((engine, note)) => {
            if let Some(n) = note {
                log::warn!("{n}");
            }
            engine
        }
        Err(e) => {
            eprintln!("milk-vmm: {e}");
            return e.exit_code();
        }
    };
    match engine {
        Engine::Qemu if cli.policy_socket.is_some() => {
            eprintln!("milk-vmm: --policy-socket needs the KVM engine");
            exit_code::UNAVAILABLE
        }
        Engine::Qemu if cli.policy.is_some() => {
            let policy = cli.policy.as_deref().unwrap_or_default();
            match milk_vmm::engine::run_qemu_milk(&config, policy) {
                Ok(run) => {
                    print_summaries(&run.summaries);
                    run.result.unwrap_or_else(|| {
                        eprintln!("milk-vmm: guest ended without a MILK-RESULT line");
                        exit_code::NO_RESULT
                    })
                }
                Err(e) => {
                    eprintln!("milk-vmm: {e}");
                    e.exit_code()
                }
            }
        }
        Engine::Qemu => match milk_vmm::engine::run_qemu(&config) {
            Ok(Some(status)) => status,
            Ok(None) => {
                eprintln!("milk-vmm: guest ended without a MILK-RESULT line");
                exit_code::NO_RESULT
            }
            Err(e) => {
                eprintln!("milk-vmm: {e}");
                e.exit_code()
            }
        },
        Engine::Kvm => run_kvm(
            config,
            cli.echo_device,
            cli.policy.as_deref(),
            cli.policy_socket.as_deref(),
        ),
    }
}
