//! The QEMU TCG engine: the guest under `milk-harness`, with virtio-milk over ivshmem
//! served by a host policy when one is given (`milk_ivshmem::session::MilkHost`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_milk::control::PolicyControl;

use crate::engine::Engine;
use crate::error::LaunchError;
use crate::run::{End, Run};

/// Largest guest RAM with virtio-milk under QEMU: the host maps the whole RAM
/// file to reach the vrings, and the ivshmem transport addresses RAM below the
/// PCI hole only.
pub const QEMU_MILK_MAX_MEMORY_MIB: u32 = 3072;

/// A guest to run under QEMU.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// vmlinux (PVH) or bzImage.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    /// Copy of the serial console.
    pub serial_log: Option<PathBuf>,
    /// Copy the console to stdout.
    pub echo_console: bool,
    /// Stop after this long.
    pub timeout: Option<Duration>,
    /// Host policy (`NAME[:PARAMS]`): attach virtio-milk and serve it.
    pub policy: Option<String>,
    /// Host runtime knobs for that policy (fault modes included).
    pub runtime: virtio_milk::runtime::RuntimeConfig,
}

/// Stops a running VM from another thread (the control socket's `stop`).
pub type StopFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Called once before the guest starts, with the virtio-milk device's control handle
/// (with a policy) and a way to stop the VM; an error ends the run before QEMU starts
/// (invalid configuration).
pub type OnStart<'a> =
    &'a mut dyn FnMut(Option<Arc<dyn PolicyControl>>, StopFn) -> Result<(), String>;

/// Checks that `policy` (`NAME[:PARAMS]`) resolves (`milk_policies::resolve`).
pub fn check_policy(policy: &str) -> Result<(), LaunchError> {
    use milk_policies::PolicyError;
    milk_policies::resolve(policy).map(|_| ()).map_err(|e| {
        LaunchError::InvalidConfig(match e {
            PolicyError::UnknownPolicy(name) => format!(
                "unknown --policy {name:?} (known: {})",
                milk_policies::names().join(", ")
            ),
            e => format!("--policy: {e}"),
        })
    })
}

/// QEMU writes its pid here (`-pidfile`), so `stop` can end it with SIGTERM.
pub(crate) struct PidFile {
    path: PathBuf,
    stopped: Arc<AtomicBool>,
}

impl PidFile {
    pub(crate) fn new() -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        PidFile {
            path: std::env::temp_dir()
                .join(format!("milk-vmm-{}-{n}.qemu.pid", std::process::id())),
            stopped: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn apply(&self, spec: &mut milk_harness::GuestSpec) {
        spec.extra_args
            .extend(["-pidfile".into(), self.path.display().to_string()]);
    }

    pub(crate) fn stopper(&self) -> StopFn {
        let path = self.path.clone();
        let stopped = self.stopped.clone();
        Box::new(move || {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("QEMU pid file {}: {e}", path.display()))?;
            let pid: libc::pid_t = text
                .trim()
                .parse()
                .map_err(|_| format!("QEMU pid file {}: no pid", path.display()))?;
            stopped.store(true, Ordering::Release);
            // SAFETY: kill(2) with the pid QEMU wrote for itself and SIGTERM, which QEMU
            // handles by shutting down.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                return Err(format!(
                    "stopping QEMU: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        })
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn harness_spec(config: &GuestConfig) -> milk_harness::GuestSpec {
    let mut spec = milk_harness::GuestSpec::new(&config.kernel);
    spec.initrd = config.initrd.clone();
    spec.cmdline = config.cmdline.clone();
    spec.cpus = config.cpus;
    spec.memory_mib = config.memory_mib;
    // The harness needs a limit; without --timeout use one day.
    spec.timeout = config.timeout.unwrap_or(Duration::from_secs(24 * 3600));
    spec.serial_log = config.serial_log.clone();
    spec
}

pub(crate) fn end_of(result: Option<i32>, stopped: bool, qemu_status: Option<i32>) -> End {
    match (result, stopped) {
        (Some(s), _) => End::Result(s),
        (None, true) => End::Stopped,
        (None, false) => End::NoResult(format!("QEMU exited (status {qemu_status:?})")),
    }
}

/// Runs the guest of `config` under QEMU TCG; with `config.policy`, the virtio-milk device
/// (over ivshmem) is served by that host policy.
pub fn run_qemu(config: &GuestConfig, on_start: OnStart<'_>) -> Result<Run, LaunchError> {
    let mut spec = harness_spec(config);
    let pid = PidFile::new();
    pid.apply(&mut spec);
    let echo = config.echo_console;
    let mut print = |line: &str| {
        if echo {
            println!("{line}");
        }
    };
    let Some(policy) = &config.policy else {
        on_start(None, pid.stopper()).map_err(LaunchError::InvalidConfig)?;
        let outcome = milk_harness::run_qemu(&spec, &mut print)?;
        log::info!(
            "QEMU guest ended after {:?} (qemu status {:?})",
            outcome.elapsed,
            outcome.qemu_status
        );
        return Ok(Run {
            engine: Engine::Qemu,
            end: end_of(
                outcome.result.map(|r| r.status),
                pid.stopped(),
                outcome.qemu_status,
            ),
            summaries: None,
        });
    };
    check_policy(policy)?;
    if config.memory_mib > QEMU_MILK_MAX_MEMORY_MIB {
        return Err(LaunchError::InvalidConfig(format!(
            "--memory {} MiB: with --policy under QEMU the host maps guest RAM, at most {} MiB",
            config.memory_mib, QEMU_MILK_MAX_MEMORY_MIB
        )));
    }
    let mut host = milk_ivshmem::session::MilkHost::new(
        config.cpus,
        config.memory_mib,
        policy,
        config.runtime,
        None,
    )?;
    host.apply(&mut spec);
    let control: Arc<dyn PolicyControl> = Arc::new(host.control());
    on_start(Some(control), pid.stopper()).map_err(LaunchError::InvalidConfig)?;
    host.start()?;
    let outcome = milk_harness::run_qemu(&spec, &mut print);
    // Stop serving whatever happened to QEMU.
    let summaries = host.finish()?;
    let outcome = outcome?;
    log::info!(
        "QEMU guest with virtio-milk ended after {:?} (qemu status {:?}); transport {:?}",
        outcome.elapsed,
        outcome.qemu_status,
        host.device_stats()
    );
    Ok(Run {
        engine: Engine::Qemu,
        end: end_of(
            outcome.result.map(|r| r.status),
            pid.stopped(),
            outcome.qemu_status,
        ),
        summaries: Some(summaries),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> GuestConfig {
        let k = dir.join("k");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        GuestConfig {
            kernel: k,
            initrd: None,
            cmdline: String::new(),
            cpus: 1,
            memory_mib: 256,
            serial_log: None,
            echo_console: false,
            timeout: None,
            policy: Some("fifo".into()),
            runtime: Default::default(),
        }
    }

    #[test]
    fn milk_under_qemu_refuses_bad_input_before_starting() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.memory_mib = QEMU_MILK_MAX_MEMORY_MIB + 1;
        let mut started = false;
        let e = run_qemu(&c, &mut |_, _| {
            started = true;
            Ok(())
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("at most 3072 MiB"), "{e}");
        c.policy = Some("nope".into());
        let e = run_qemu(&c, &mut |_, _| Ok(())).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("unknown --policy \"nope\""), "{e}");
        assert!(!started, "nothing started");
    }

    #[test]
    fn a_failing_start_hook_stops_the_run_before_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let e = run_qemu(&c, &mut |dev, _| {
            assert!(dev.is_some(), "the device's control handle");
            Err("socket in use".into())
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("socket in use"));
    }

    #[test]
    fn ends() {
        assert_eq!(end_of(Some(2), true, Some(0)), End::Result(2));
        assert_eq!(end_of(None, true, Some(0)), End::Stopped);
        assert!(matches!(end_of(None, false, Some(1)), End::NoResult(_)));
    }
}
