//! One guest run with virtio-milk over this transport, end to end (cargo
//! feature `virtio-milk`): the device with a policy chosen by name
//! (`milk_policies::resolve`), the ivshmem transport serving it, QEMU booting
//! the guest, and at the end the guest's outcome plus one runtime
//! [`Summary`] per host runtime run.
//!
//! Two levels:
//!
//! - [`run_milk_guest`]: everything, with a console callback that also gets a
//!   [`MilkControl`] (pause/resume, policy swap, live counters, fault
//!   injection) to act on what the guest prints;
//! - [`MilkHost`]: the host side alone, for a caller that runs QEMU itself
//!   (milk-vmm's QEMU engine): `MilkHost::new`, `apply` the QEMU options to
//!   its `GuestSpec`, `start`, run QEMU, `finish`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use milk_harness::{GuestOutcome, GuestSpec, HarnessError};
use virtio_milk::device::{DeviceError, MilkDevice};
use virtio_milk::metrics::Summary;
use virtio_milk::runtime::RuntimeConfig;

use crate::device::DeviceStats;
use crate::milk::{MilkBackend, MilkControl};
use crate::qemu_args::runtime_dir;
use crate::transport::{IvshmemTransport, TransportConfig, TransportError, TransportHandle};

/// Errors of a virtio-milk guest run.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The policy string did not resolve.
    #[error(transparent)]
    Policy(#[from] milk_policies::PolicyError),
    /// The device refused its configuration or a control request.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// QEMU failed or the guest timed out.
    #[error(transparent)]
    Harness(#[from] HarnessError),
    /// The per-guest directory could not be created.
    #[error("runtime directory {0}: {1}")]
    Dir(PathBuf, std::io::Error),
    /// `finish` before `start`, or twice.
    #[error("host not started")]
    NotStarted,
}

/// The control handle a guest run hands out (pause/resume, policy swap, live
/// counters, summaries).
pub type GuestControl = MilkControl;

/// Per-guest files (socket, RAM file) in a directory removed on drop.
struct GuestDir(PathBuf);

impl GuestDir {
    fn create(parent: &Path) -> Result<Self, SessionError> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("milk-guest-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| SessionError::Dir(p.clone(), e))?;
        Ok(GuestDir(p))
    }
}

impl Drop for GuestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The host side of a virtio-milk guest under QEMU: device, policy,
/// transport. See the module documentation.
pub struct MilkHost {
    control: GuestControl,
    transport: Option<IvshmemTransport<MilkBackend>>,
    running: Option<TransportHandle<MilkBackend>>,
    device_stats: DeviceStats,
    // Declared last: removed after the transport (its RAM file) is dropped.
    _dir: GuestDir,
}

impl MilkHost {
    /// A device for `cpus` guest CPUs running policy `policy`
    /// (`NAME[:PARAMS]`, see `milk_policies::resolve`), a
    /// transport for `memory_mib` MiB of guest RAM with its files in a new
    /// directory under `dir` (default [`runtime_dir`]).
    pub fn new(
        cpus: u32,
        memory_mib: u32,
        policy: &str,
        runtime: RuntimeConfig,
        dir: Option<&Path>,
    ) -> Result<Self, SessionError> {
        let policy = milk_policies::resolve(policy)?;
        let dev = MilkDevice::with_policy(cpus, &policy.spec, policy.factory, runtime)?;
        let backend = MilkBackend::new(dev);
        let control = backend.control();
        let gdir = GuestDir::create(dir.unwrap_or(&runtime_dir()))?;
        let cfg = TransportConfig::in_dir(&gdir.0, memory_mib, backend.device_info());
        let transport = IvshmemTransport::new(cfg, backend)?;
        Ok(MilkHost {
            control,
            transport: Some(transport),
            running: None,
            device_stats: DeviceStats::default(),
            _dir: gdir,
        })
    }

    /// Sets `spec`'s machine, memory and the ivshmem/RAM options QEMU needs.
    pub fn apply(&self, spec: &mut GuestSpec) {
        if let Some(t) = &self.transport {
            t.qemu_args().apply(spec);
        }
    }

    /// The QEMU options as one vector (`-M`, `-m`, `-object`, ...), for a
    /// caller that builds its own QEMU command line.
    pub fn qemu_args(&self) -> Vec<String> {
        self.transport
            .as_ref()
            .map(|t| t.qemu_args().to_vec())
            .unwrap_or_default()
    }

    /// A control handle (valid for the whole run, from any thread).
    pub fn control(&self) -> GuestControl {
        self.control.clone()
    }

    /// Starts serving the socket (call before starting QEMU).
    pub fn start(&mut self) -> Result<(), SessionError> {
        let t = self.transport.take().ok_or(SessionError::NotStarted)?;
        self.running = Some(t.spawn()?);
        Ok(())
    }

    /// After QEMU exited: stops the transport, stops a runtime still running
    /// (its summary is added), and returns every runtime summary in order.
    pub fn finish(&mut self) -> Result<Vec<Summary>, SessionError> {
        let h = self.running.take().ok_or(SessionError::NotStarted)?;
        let mut t = h.stop()?;
        // QEMU's disconnect normally reset the device already.
        t.device_mut().disconnect();
        self.device_stats = t.device().stats();
        self.transport = Some(t);
        Ok(self.control.summaries())
    }

    /// Register-level counters of the transport (valid after [`Self::finish`]).
    pub fn device_stats(&self) -> DeviceStats {
        self.device_stats
    }
}

/// A guest to boot with virtio-milk.
#[derive(Clone, Debug)]
pub struct MilkGuestConfig {
    /// Kernel, initrd, command line, CPUs, memory, timeout. Machine and the
    /// ivshmem options are set by [`run_milk_guest`].
    pub spec: GuestSpec,
    /// Policy name (`milk_policies::names()`).
    pub policy: String,
    /// Host runtime knobs.
    pub runtime: RuntimeConfig,
    /// Parent directory of the per-guest files (default [`runtime_dir`]).
    pub dir: Option<PathBuf>,
}

impl MilkGuestConfig {
    /// `spec` with `policy` and the default runtime configuration.
    pub fn new(spec: GuestSpec, policy: &str) -> Self {
        MilkGuestConfig {
            spec,
            policy: policy.into(),
            runtime: RuntimeConfig::default(),
            dir: None,
        }
    }
}

/// What a virtio-milk guest run produced.
#[derive(Debug)]
pub struct MilkRun {
    /// The guest's console, result line and timings.
    pub outcome: GuestOutcome,
    /// One summary per host runtime run (each pause and the final reset), in order.
    pub summaries: Vec<Summary>,
    /// Transport register counters.
    pub device: DeviceStats,
}

impl MilkRun {
    /// The guest's `MILK-RESULT` status.
    pub fn status(&self) -> Option<i32> {
        self.outcome.result.map(|r| r.status)
    }
}

/// Boots `cfg.spec` under QEMU with virtio-milk over ivshmem and the policy
/// `cfg.policy`, calling `on_line` with every console line and a control
/// handle (the callback runs on the caller's thread while the guest runs;
/// keep it short). Returns when QEMU exits.
pub fn run_milk_guest(
    cfg: &MilkGuestConfig,
    on_line: &mut dyn FnMut(&str, &GuestControl),
) -> Result<MilkRun, SessionError> {
    let mut host = MilkHost::new(
        cfg.spec.cpus,
        cfg.spec.memory_mib,
        &cfg.policy,
        cfg.runtime,
        cfg.dir.as_deref(),
    )?;
    let mut spec = cfg.spec.clone();
    host.apply(&mut spec);
    let control = host.control();
    host.start()?;
    let outcome = milk_harness::run_qemu(&spec, &mut |l| on_line(l, &control));
    // Stop serving whatever happened to QEMU.
    let summaries = host.finish()?;
    Ok(MilkRun {
        outcome: outcome?,
        summaries,
        device: host.device_stats(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_handles_cross_threads() {
        fn send_sync<T: Send + Sync + Clone + 'static>() {}
        send_sync::<GuestControl>();
        send_sync::<MilkControl>();
        let host = MilkHost::new(1, 64, "fifo", RuntimeConfig::default(), None).unwrap();
        let ctl = host.control();
        let t = std::thread::spawn(move || (ctl.is_running(), ctl.summaries().len()));
        assert_eq!(t.join().unwrap(), (false, 0));
    }

    #[test]
    fn unknown_policy_is_refused_by_name() {
        let e = MilkHost::new(2, 64, "nope", RuntimeConfig::default(), None)
            .err()
            .expect("unknown policy refused");
        assert!(matches!(e, SessionError::Policy(_)));
        assert!(e.to_string().contains("fifo"), "{e}");
        let host =
            MilkHost::new(1, 64, "fifo:slice_us=300", RuntimeConfig::default(), None).unwrap();
        assert_eq!(host.control().policy(), "fifo:slice_us=300");
    }

    #[test]
    fn host_before_the_guest_and_its_files() {
        let parent = tempfile::tempdir().unwrap();
        let mut host =
            MilkHost::new(2, 64, "fifo", RuntimeConfig::default(), Some(parent.path())).unwrap();
        let args = host.qemu_args().join(" ");
        assert!(args.contains("ivshmem-doorbell"), "{args}");
        assert!(args.contains("share=on"), "{args}");
        let mut spec = GuestSpec::new("vmlinux");
        host.apply(&mut spec);
        assert_eq!(spec.memory_mib, 64);
        assert!(spec.machine.starts_with("pc,"), "{}", spec.machine);
        // The per-guest directory holds the RAM file and the socket.
        let dirs: Vec<_> = std::fs::read_dir(parent.path()).unwrap().collect();
        assert_eq!(dirs.len(), 1);

        // No driver yet: control calls say they did nothing.
        let ctl = host.control();
        assert!(!ctl.is_running());
        assert!(!ctl.pause().unwrap());
        assert!(!ctl.resume().unwrap());
        assert!(ctl.snapshot().is_none());
        let r = milk_policies::resolve("fifo:slice_us=100").unwrap();
        assert!(
            !ctl.set_policy(&r.spec, r.factory),
            "nothing running to swap"
        );
        assert_eq!(
            ctl.policy(),
            "fifo:slice_us=100",
            "kept for the first activation"
        );

        assert!(matches!(host.finish(), Err(SessionError::NotStarted)));
        host.start().unwrap();
        assert!(matches!(host.start(), Err(SessionError::NotStarted)));
        assert!(host.finish().unwrap().is_empty(), "no runtime ever ran");
        assert_eq!(host.device_stats().activations, 0);
        drop(host);
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}
