//! Engine selection: KVM when it can run a standard guest, otherwise QEMU TCG
//! through `milk-harness`, with the same kernel, initramfs and command line.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_milk::control::PolicyControl;

use crate::error::VmmError;
use crate::vmm::VmConfig;

/// Engine requested on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// KVM if it can run a standard guest, else QEMU.
    Auto,
    /// KVM, even if it is kvm_pvm.
    Kvm,
    /// QEMU TCG.
    Qemu,
}

/// What this host's /dev/kvm can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmSupport {
    /// A hardware-assisted KVM (VMX/SVM): standard guests run.
    Standard,
    /// kvm_pvm: a PVM hypervisor; a standard kernel's ring-0 code is emulated
    /// and stops at its first exception.
    Pvm,
    /// No usable /dev/kvm (the text says why).
    Missing(String),
}

/// The engine that will run the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// milk-vmm's own KVM VMM.
    Kvm,
    /// QEMU TCG through milk-harness.
    Qemu,
}

/// Probes /dev/kvm and the kvm_pvm module.
pub fn detect_kvm() -> KvmSupport {
    detect_kvm_at(Path::new("/dev/kvm"), Path::new("/sys/module/kvm_pvm"))
}

/// [`detect_kvm`] with explicit paths (for tests).
pub fn detect_kvm_at(dev: &Path, pvm_module: &Path) -> KvmSupport {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        return KvmSupport::Missing(format!("cannot open {}: {e}", dev.display()));
    }
    if pvm_module.exists() {
        return KvmSupport::Pvm;
    }
    KvmSupport::Standard
}

/// Picks the engine; the returned line explains the choice when it is not
/// plain KVM (log it once).
pub fn choose_engine(
    choice: EngineChoice,
    support: &KvmSupport,
) -> Result<(Engine, Option<String>), VmmError> {
    match (choice, support) {
        (EngineChoice::Qemu, _) => Ok((Engine::Qemu, Some("engine: QEMU TCG (requested)".into()))),
        (EngineChoice::Auto, KvmSupport::Standard) | (EngineChoice::Kvm, KvmSupport::Standard) => {
            Ok((Engine::Kvm, None))
        }
        (EngineChoice::Auto, KvmSupport::Pvm) => Ok((
            Engine::Qemu,
            Some(
                "engine: /dev/kvm is kvm_pvm (/sys/module/kvm_pvm), which cannot run a standard \
                 kernel's ring-0 code; running the guest under QEMU TCG instead"
                    .into(),
            ),
        )),
        (EngineChoice::Auto, KvmSupport::Missing(why)) => Ok((
            Engine::Qemu,
            Some(format!(
                "engine: no usable KVM ({why}); running the guest under QEMU TCG instead"
            )),
        )),
        (EngineChoice::Kvm, KvmSupport::Pvm) => Ok((
            Engine::Kvm,
            Some(
                "engine: KVM requested on kvm_pvm: a standard kernel stops at its first \
                 exception (only ring-3 code runs natively)"
                    .into(),
            ),
        )),
        (EngineChoice::Kvm, KvmSupport::Missing(why)) => Err(VmmError::KvmUnavailable(why.clone())),
    }
}

/// Largest guest RAM with virtio-milk under QEMU: the host maps the whole RAM
/// file to reach the vrings, and the ivshmem transport addresses RAM below the
/// PCI hole only.
pub const QEMU_MILK_MAX_MEMORY_MIB: u32 = 3072;

/// A host policy run under QEMU: the guest's result and the host summaries.
#[derive(Debug)]
pub struct QemuMilkRun {
    /// The guest's `MILK-RESULT` status.
    pub result: Option<i32>,
    /// One summary per host runtime run (normally exactly one).
    pub summaries: Vec<virtio_milk::metrics::Summary>,
}

/// Checks that `policy` (`NAME[:PARAMS]`) resolves (`milk_policies::resolve`).
pub fn check_policy(policy: &str) -> Result<(), VmmError> {
    milk_policies::resolve(policy)
        .map(|_| ())
        .map_err(|e| VmmError::InvalidConfig(format!("--policy: {e}")))
}

/// Stops a running VM from another thread (the control socket's `stop`).
pub type StopFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Called once before the guest starts, with the virtio-milk device's control
/// handle (QEMU with a policy) and a way to stop the VM; an error stops the run
/// before QEMU starts (invalid configuration).
pub type OnStart<'a> =
    &'a mut dyn FnMut(Option<Arc<dyn PolicyControl>>, StopFn) -> Result<(), String>;

/// QEMU writes its pid here (`-pidfile`), so `stop` can end it with SIGTERM.
pub(crate) struct PidFile(PathBuf);

impl PidFile {
    pub(crate) fn new() -> Self {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        PidFile(std::env::temp_dir().join(format!("milk-vmm-{}-{n}.qemu.pid", std::process::id())))
    }

    pub(crate) fn apply(&self, spec: &mut milk_harness::GuestSpec) {
        spec.extra_args
            .extend(["-pidfile".into(), self.0.display().to_string()]);
    }

    pub(crate) fn stopper(&self) -> StopFn {
        let path = self.0.clone();
        Box::new(move || {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("QEMU pid file {}: {e}", path.display()))?;
            let pid: libc::pid_t = text
                .trim()
                .parse()
                .map_err(|_| format!("QEMU pid file {}: no pid", path.display()))?;
            // SAFETY: kill(2) with a pid QEMU wrote for itself and SIGTERM, which
            // QEMU handles by shutting down.
            if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
                return Err(format!(
                    "stopping QEMU: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(())
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the guest of `config` under QEMU TCG with the virtio-milk device
/// (over ivshmem) served by the host policy `policy` (`NAME[:PARAMS]`).
pub fn run_qemu_milk(
    config: &VmConfig,
    policy: &str,
    on_start: OnStart<'_>,
) -> Result<QemuMilkRun, VmmError> {
    check_policy(policy)?;
    if config.memory_mib > QEMU_MILK_MAX_MEMORY_MIB {
        return Err(VmmError::InvalidConfig(format!(
            "--memory {} MiB: with --policy under QEMU the host maps guest RAM, at most {} MiB",
            config.memory_mib, QEMU_MILK_MAX_MEMORY_MIB
        )));
    }
    let mut host = milk_ivshmem::session::MilkHost::new(
        config.cpus,
        config.memory_mib,
        policy,
        virtio_milk::runtime::RuntimeConfig::default(),
        None,
    )?;
    let mut spec = harness_spec(config);
    host.apply(&mut spec);
    let pid = PidFile::new();
    pid.apply(&mut spec);
    let control: Arc<dyn PolicyControl> = Arc::new(host.control());
    on_start(Some(control), pid.stopper()).map_err(VmmError::InvalidConfig)?;
    host.start()?;
    let echo = config.echo_console;
    let outcome = milk_harness::run_qemu(&spec, &mut |line| {
        if echo {
            println!("{line}");
        }
    });
    // Stop serving whatever happened to QEMU.
    let summaries = host.finish()?;
    let outcome = outcome?;
    log::info!(
        "QEMU guest with virtio-milk ended after {:?} (qemu status {:?}); transport {:?}",
        outcome.elapsed,
        outcome.qemu_status,
        host.device_stats()
    );
    Ok(QemuMilkRun {
        result: outcome.result.map(|r| r.status),
        summaries,
    })
}

pub(crate) fn harness_spec(config: &VmConfig) -> milk_harness::GuestSpec {
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

/// Runs the guest of `config` under QEMU TCG; returns the guest's result
/// status, if it printed one.
pub fn run_qemu(config: &VmConfig, on_start: OnStart<'_>) -> Result<Option<i32>, VmmError> {
    let mut spec = harness_spec(config);
    let pid = PidFile::new();
    pid.apply(&mut spec);
    on_start(None, pid.stopper()).map_err(VmmError::InvalidConfig)?;
    let echo = config.echo_console;
    let outcome = milk_harness::run_qemu(&spec, &mut |line| {
        if echo {
            println!("{line}");
        }
    })?;
    log::info!(
        "QEMU guest ended after {:?} (qemu status {:?})",
        outcome.elapsed,
        outcome.qemu_status
    );
    Ok(outcome.result.map(|r| r.status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_from_paths() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        let pvm = dir.path().join("kvm_pvm");
        assert!(
            matches!(detect_kvm_at(&dev, &pvm), KvmSupport::Missing(m) if m.contains("cannot open"))
        );
        std::fs::write(&dev, b"").unwrap();
        assert_eq!(detect_kvm_at(&dev, &pvm), KvmSupport::Standard);
        std::fs::create_dir(&pvm).unwrap();
        assert_eq!(detect_kvm_at(&dev, &pvm), KvmSupport::Pvm);
    }

    #[test]
    fn choice_matrix() {
        use EngineChoice::*;
        let missing = KvmSupport::Missing("x".into());
        assert_eq!(
            choose_engine(Auto, &KvmSupport::Standard).unwrap(),
            (Engine::Kvm, None)
        );
        let (e, why) = choose_engine(Auto, &KvmSupport::Pvm).unwrap();
        assert_eq!(e, Engine::Qemu);
        assert!(why.unwrap().contains("kvm_pvm"));
        assert_eq!(choose_engine(Auto, &missing).unwrap().0, Engine::Qemu);
        assert_eq!(choose_engine(Kvm, &KvmSupport::Pvm).unwrap().0, Engine::Kvm);
        assert_eq!(choose_engine(Kvm, &missing).unwrap_err().exit_code(), 69);
        assert_eq!(
            choose_engine(Qemu, &KvmSupport::Standard).unwrap().0,
            Engine::Qemu
        );
    }

    #[test]
    fn policies_are_checked_by_name() {
        assert!(check_policy("fifo").is_ok());
        let e = check_policy("nope").unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("fifo"), "{e}");
    }

    #[test]
    fn milk_under_qemu_refuses_large_memory_before_starting() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, b"\x7fELF\x02\x01\x01").unwrap();
        let mut c = VmConfig::new(&k);
        c.memory_mib = QEMU_MILK_MAX_MEMORY_MIB + 1;
        let e = run_qemu_milk(&c, "fifo", &mut |_, _| Ok(())).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("at most 3072 MiB"), "{e}");
        assert_eq!(
            run_qemu_milk(&c, "nope", &mut |_, _| Ok(()))
                .unwrap_err()
                .exit_code(),
            64
        );
    }

    #[test]
    fn this_host_is_detected_consistently() {
        let s = detect_kvm();
        if Path::new("/sys/module/kvm_pvm").exists() && Path::new("/dev/kvm").exists() {
            assert_eq!(s, KvmSupport::Pvm);
        }
    }
}
