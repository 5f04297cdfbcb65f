//! The QEMU engine with an out-of-process policy (`milk-vmm --engine qemu
//! --policy-socket`): the guest's virtio-milk rings, virtio over ivshmem, are served by a
//! `milk-policy` daemon, which gets the guest-RAM file, the ring addresses, the doorbell
//! eventfds as kicks and the guest's MSI-X eventfds as calls
//! ([`milk_policy_daemon::ivshmem::VhostUserIvshmem`], docs/vhost-user.md).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use milk_ivshmem::qemu_args::runtime_dir;
use milk_ivshmem::transport::{IvshmemTransport, TransportConfig};
use milk_policy_daemon::frontend::FrontendSlot;
use milk_policy_daemon::ivshmem::VhostUserIvshmem;

use crate::engine::Engine;
use crate::error::LaunchError;
use crate::qemu::{end_of, harness_spec, GuestConfig, PidFile, StopFn, QEMU_MILK_MAX_MEMORY_MIB};
use crate::run::Run;

/// Called once before QEMU starts with the frontend's swap handle and a way to stop the
/// VM (milk-vmm opens its control socket here); an error ends the run first.
pub type OnVhostStart<'a> = &'a mut dyn FnMut(FrontendSlot, StopFn) -> Result<(), String>;

/// Per-run files (guest RAM, ivshmem socket), removed at the end.
struct RunDir(PathBuf);

impl RunDir {
    fn create() -> Result<Self, LaunchError> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let p = runtime_dir().join(format!(
            "milk-vhost-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p)
            .map_err(|e| LaunchError::InvalidConfig(format!("{}: {e}", p.display())))?;
        Ok(RunDir(p))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the guest of `config` (its `policy` must be `None`) under QEMU TCG with the
/// virtio-milk rings served by the daemon listening on `socket`.
pub fn run_qemu_vhost_user(
    config: &GuestConfig,
    socket: &Path,
    on_start: OnVhostStart<'_>,
) -> Result<Run, LaunchError> {
    if config.policy.is_some() {
        return Err(LaunchError::InvalidConfig(
            "--policy and --policy-socket exclude each other".into(),
        ));
    }
    if config.memory_mib > QEMU_MILK_MAX_MEMORY_MIB {
        return Err(LaunchError::InvalidConfig(format!(
            "--memory {} MiB: with --policy-socket under QEMU the host maps guest RAM, at \
             most {QEMU_MILK_MAX_MEMORY_MIB} MiB",
            config.memory_mib
        )));
    }
    let backend = VhostUserIvshmem::new(socket, config.cpus)?;
    let slot = backend.handle();
    let dir = RunDir::create()?;
    let tcfg = TransportConfig::in_dir(&dir.0, config.memory_mib, backend.device_info());
    let transport = IvshmemTransport::new(tcfg, backend)
        .map_err(|e| LaunchError::Milk(milk_ivshmem::session::SessionError::Transport(e)))?;
    let mut spec = harness_spec(config);
    transport.qemu_args().apply(&mut spec);
    let pid = PidFile::new();
    pid.apply(&mut spec);
    on_start(slot, pid.stopper()).map_err(LaunchError::InvalidConfig)?;
    let running = transport
        .spawn()
        .map_err(|e| LaunchError::Milk(milk_ivshmem::session::SessionError::Transport(e)))?;
    let echo = config.echo_console;
    let outcome = milk_harness::run_qemu(&spec, &mut |line| {
        if echo {
            println!("{line}");
        }
    });
    // QEMU is gone: the transport resets the device, the frontend stops the rings.
    match running.stop() {
        Ok(mut t) => t.device_mut().disconnect(),
        Err(e) => log::warn!("stopping the ivshmem transport: {e}"),
    }
    let outcome = outcome?;
    Ok(Run {
        engine: Engine::Qemu,
        end: end_of(
            outcome.result.map(|r| r.status),
            pid.stopped(),
            outcome.qemu_status,
        ),
        summaries: None,
    })
}
