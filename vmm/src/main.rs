//! `milk-vmm`: boot a MiLK guest under KVM (or QEMU TCG where KVM cannot run it).
//!
//! The thin front: command line, engine choice and QEMU runs (`milk-launcher`), the KVM
//! VMM (this package's library), the control socket (`milk-control`), and one outcome
//! ([`milk_launcher::Run`]) whatever ran the guest.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use milk_control::{ControlServer, VmControl};
use milk_launcher::{choose_engine, detect_kvm, End, Engine, EngineChoice, Run, StopFn};
use milk_policy_daemon::frontend::FrontendSlot;
use milk_vmm::devices::virtio::vhost_user::{SocketSwap, VhostUserMilkDevice};
use milk_vmm::{exit_code, ExitReason, Vm, VmConfig, VmOutcome};
use virtio_milk::control::PolicyControl;
use virtio_milk::runtime::{ChaosSpec, HostileSpec, RuntimeConfig};

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

  # With a control socket; from another shell swap the policy live.
  milk-vmm --kernel vmlinux --initrd initramfs.cpio.gz --policy fifo --api-sock /tmp/milk.sock
  milkctl --api-sock /tmp/milk.sock swap rr

Exit status: the guest's `MILK-RESULT status=<n>`; 0 after `milkctl stop`; otherwise 64 invalid
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
    /// Control socket (Unix, mode 0600, line-delimited JSON; see docs/control.md
    /// and milkctl). Default: $XDG_RUNTIME_DIR/milk/milk-vmm-<pid>.sock, or
    /// /run/milk/milk-vmm-<pid>.sock; the path is printed at start.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Out-of-process policy: attach the virtio-milk device and hand its queues to the
    /// `milk-policy` daemon listening on this vhost-user socket (both engines; see
    /// docs/vhost-user.md). A daemon that dies is noticed, the guest falls back to CFS,
    /// and a daemon started again on the same path is reconnected; `milkctl swap --socket
    /// NEW` hands the queues to another daemon.
    #[arg(long, value_name = "PATH", conflicts_with = "policy")]
    policy_socket: Option<PathBuf>,
    /// Chaos mode for reliability runs (with --policy): faults on the virtio-milk channel.
    #[arg(long, value_name = "SPEC", value_parser = parse_chaos, long_help = chaos_help())]
    chaos: Option<ChaosSpec>,
    /// Hostile-host mode for reliability runs (with --policy): random and garbage records
    /// for the guest for SECS seconds.
    #[arg(long, value_name = "SECS[,rate=N][,seed=N][,after=DURATION]",
          value_parser = parse_hostile, long_help = hostile_help())]
    hostile_host: Option<HostileSpec>,
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

/// The control socket of this run, opened once the engine is known.
struct Api {
    path: Option<PathBuf>,
    server: Option<ControlServer>,
    vm: Option<Arc<VmControl>>,
}

impl Api {
    /// Opens the socket for a VM run by `engine`. An explicit path that cannot
    /// be bound is an error; the default path only warns.
    fn open(
        &mut self,
        engine: &str,
        device: Option<Arc<dyn PolicyControl>>,
        stop: StopFn,
    ) -> Result<(), String> {
        let vm = Arc::new(VmControl::new(engine, device, stop));
        let (path, explicit) = match &self.path {
            Some(p) => (p.clone(), true),
            None => (milk_control::default_socket_path(), false),
        };
        match ControlServer::bind(&path, vm.clone()) {
            Ok(s) => {
                eprintln!("milk-vmm: control socket {}", s.path().display());
                self.server = Some(s);
            }
            Err(e) if explicit => return Err(e.to_string()),
            Err(e) => log::warn!("no control socket: {e} (use --api-sock PATH)"),
        }
        self.vm = Some(vm);
        Ok(())
    }

    /// Lets `milkctl swap --socket` reach the vhost-user frontend.
    fn set_remote(&self, slot: FrontendSlot) {
        if let Some(vm) = &self.vm {
            vm.set_remote_swap(Arc::new(SocketSwap(slot)));
        }
    }
}

type NewVm = (Vm, Option<MilkControl>, Option<FrontendSlot>);

fn new_vm(
    config: VmConfig,
    echo_device: bool,
    policy: Option<&str>,
    policy_socket: Option<&Path>,
    runtime: RuntimeConfig,
) -> Result<NewVm, milk_vmm::VmmError> {
    let cpus = config.cpus;
    let mut vm = Vm::new(config);
    if echo_device {
        #[cfg(feature = "test-devices")]
        {
            let (dev, _stats) = milk_vmm::devices::virtio::echo::EchoDevice::new();
            vm.add_virtio_device(Box::new(dev))?;
        }
        #[cfg(not(feature = "test-devices"))]
        return Err(milk_vmm::VmmError::InvalidConfig(
            "--echo-device needs milk-vmm built with the test-devices feature".into(),
        ));
    }
    let mut slot = None;
    if let Some(path) = policy_socket {
        let dev = VhostUserMilkDevice::new(path, cpus)?;
        slot = Some(dev.handle());
        vm.add_virtio_device(Box::new(dev))?;
    }
    let mut control = None;
    if let Some(spec) = policy {
        let p = milk_policies::resolve(spec)
            .map_err(|e| milk_vmm::VmmError::InvalidConfig(format!("--policy: {e}")))?;
        let (dev, c) = milk_vmm::devices::virtio::milk::MilkMmioDevice::new(
            cpus, &p.spec, p.factory, runtime,
        )?;
        vm.add_virtio_device(Box::new(dev))?;
        control = Some(c);
    }
    Ok((vm, control, slot))
}

type MilkControl = milk_vmm::devices::virtio::milk::MilkControl;

fn run_kvm(
    config: VmConfig,
    echo_device: bool,
    policy: Option<&str>,
    policy_socket: Option<&Path>,
    runtime: RuntimeConfig,
    api: &mut Api,
) -> i32 {
    let (mut vm, control, slot) = match new_vm(config, echo_device, policy, policy_socket, runtime)
    {
        Ok(v) => v,
        Err(e) => {
            eprintln!("milk-vmm: {e}");
            return e.exit_code();
        }
    };
    let exit = match vm.exit_handle() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("milk-vmm: creating the exit eventfd: {e}");
            return exit_code::SOFTWARE;
        }
    };
    let exit = Mutex::new(exit);
    let stop: StopFn = Box::new(move || {
        exit.lock()
            .unwrap_or_else(|e| e.into_inner())
            .request(ExitReason::Stopped);
        Ok(())
    });
    let device = control
        .clone()
        .map(|c| Arc::new(c) as Arc<dyn PolicyControl>);
    if let Err(e) = api.open("kvm", device, stop) {
        eprintln!("milk-vmm: {e}");
        return exit_code::USAGE;
    }
    if let Some(s) = slot {
        api.set_remote(s);
    }
    let result = vm.run();
    // The VM and its devices are gone: every runtime summary is in.
    match result {
        Ok(outcome) => Run {
            engine: Engine::Kvm,
            end: kvm_end(&outcome),
            summaries: control.map(|c| c.summaries()),
        }
        .report(),
        Err(e) => {
            if let Some(c) = control {
                for s in c.summaries() {
                    println!("{s}");
                }
            }
            eprintln!("milk-vmm: {e}");
            e.exit_code()
        }
    }
}

/// How a KVM run ended, in the launcher's terms.
fn kvm_end(o: &VmOutcome) -> End {
    if let Some(s) = o.result {
        return End::Result(s);
    }
    match &o.exit {
        r if r.is_clean() => End::NoResult(r.to_string()),
        ExitReason::Timeout => End::Timeout,
        ExitReason::Signal(s) => End::Signal(*s),
        ExitReason::GuestFault(w) => End::GuestFault(w.clone()),
        ExitReason::Stopped => End::Stopped,
        other => End::Failed(other.to_string()),
    }
}

fn policy_help() -> String {
    format!(
        "Host scheduling policy: attach the virtio-milk device (virtio-mmio under KVM, \
         virtio over ivshmem under QEMU) and serve the guest's sched_ext bridge with this \
         host-side policy; a summary (messages, decisions, rejections, fallbacks, \
         event -> decision latency) is printed at exit. Under QEMU guest memory is limited \
         to {} MiB. Known policies: {}",
        milk_launcher::QEMU_MILK_MAX_MEMORY_MIB,
        milk_policies::names().join(", ")
    )
}

fn parse_chaos(s: &str) -> Result<ChaosSpec, String> {
    ChaosSpec::parse(s).map_err(|e| e.to_string())
}

fn parse_hostile(s: &str) -> Result<HostileSpec, String> {
    HostileSpec::parse(s).map_err(|e| e.to_string())
}

fn chaos_help() -> String {
    format!(
        "Chaos mode for reliability runs (needs --policy): the host runtime injects faults on \
         the virtio-milk channel once the guest's first session is up. SPEC is `default` (a \
         third of the records delayed up to 2 ms, 2 % of acks lost and 2 % duplicated, 5 % of \
         decisions on another CPU's queue, a 10-40 ms stall of the runtime thread every \
         500 ms, a 100-300 ms host stop every 8 s, one in four a crash without GOODBYE), \
         optionally followed by changes, or only KEY=VALUE items, comma-separated. Keys: {}. \
         Durations take a unit (500us, 20ms, 1.5s), ranges are LO..HI, probabilities 0..1. \
         The seed is printed; `seed=N` replays a run. What was injected is in the summary. \
         Example: --chaos default,seed=7,for=30s,ack_loss=0.1",
        virtio_milk::runtime::CHAOS_KEYS
    )
}

fn hostile_help() -> String {
    format!(
        "Hostile-host mode for reliability runs (needs --policy): for SECS seconds after the \
         guest's first session is up (plus `after`), the host runtime also sends random but \
         well-framed RUN, PREEMPT, ACK, HELLO, HEARTBEAT and GOODBYE records and garbage \
         records (bad length, version or type) at `rate` per second (default {}), then starts \
         a normal session. Keys after SECS: {}. The seed is printed; `seed=N` replays a run.",
        HostileSpec::DEFAULT_RATE,
        virtio_milk::runtime::HOSTILE_KEYS
    )
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
    if (cli.chaos.is_some() || cli.hostile_host.is_some()) && cli.policy.is_none() {
        eprintln!(
            "milk-vmm: --chaos and --hostile-host need --policy (the host runtime they act in; \
             with --policy-socket it runs in milk-policy)"
        );
        return exit_code::USAGE;
    }
    let runtime = RuntimeConfig {
        chaos: cli.chaos,
        hostile: cli.hostile_host,
        ..RuntimeConfig::default()
    };
    if let Some(p) = &cli.policy {
        if let Err(e) = milk_launcher::qemu::check_policy(p) {
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
    let mut api = Api {
        path: cli.api_sock.clone(),
        server: None,
        vm: None,
    };
    if engine == Engine::Kvm {
        return run_kvm(
            config,
            cli.echo_device,
            cli.policy.as_deref(),
            cli.policy_socket.as_deref(),
            runtime,
            &mut api,
        );
    }
    let guest = milk_launcher::GuestConfig {
        kernel: config.kernel.clone(),
        initrd: config.initrd.clone(),
        cmdline: config.cmdline.clone(),
        cpus: config.cpus,
        memory_mib: config.memory_mib,
        serial_log: config.serial_log.clone(),
        echo_console: config.echo_console,
        timeout: config.timeout,
        policy: cli.policy.clone(),
        runtime,
    };
    if let Some(sock) = &cli.policy_socket {
        let mut on_start = |slot: FrontendSlot, stop: StopFn| {
            api.open("qemu", None, stop)?;
            api.set_remote(slot);
            Ok(())
        };
        return match milk_launcher::run_qemu_vhost_user(&guest, sock, &mut on_start) {
            Ok(run) => run.report(),
            Err(e) => {
                eprintln!("milk-vmm: {e}");
                e.exit_code()
            }
        };
    }
    let mut on_start =
        |device: Option<Arc<dyn PolicyControl>>, stop: StopFn| api.open("qemu", device, stop);
    match milk_launcher::run_qemu(&guest, &mut on_start) {
        Ok(run) => run.report(),
        Err(e) => {
            eprintln!("milk-vmm: {e}");
            e.exit_code()
        }
    }
}
