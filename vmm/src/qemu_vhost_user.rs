//! The QEMU engine with an out-of-process policy (`--engine qemu --policy-socket`): milk-vmm
//! serves virtio over ivshmem to the QEMU TCG guest as with `--policy`, but the rings go to
//! a `milk-policy` daemon: guest-RAM file, ring addresses, doorbell eventfds as kicks and
//! the guest's MSI-X eventfds as calls
//! ([`milk_policy_daemon::ivshmem::VhostUserIvshmem`]).

use std::path::Path;

use milk_ivshmem::qemu_args::runtime_dir;
use milk_ivshmem::transport::{IvshmemTransport, TransportConfig};
use milk_policy_daemon::frontend::FrontendSlot;
use milk_policy_daemon::ivshmem::VhostUserIvshmem;

use crate::devices::virtio::vhost_user::VhostUserDeviceError;
use crate::engine::{harness_spec, PidFile, StopFn, QEMU_MILK_MAX_MEMORY_MIB};
use crate::{VmConfig, VmmError};

/// Called once the guest's frontend exists and QEMU is about to start, with the swap
/// handle and a function stopping QEMU (milk-vmm opens its control socket here).
pub type OnVhostStart<'a> = &'a mut dyn FnMut(FrontendSlot, StopFn) -> Result<(), String>;

/// Runs the guest of `config` under QEMU with its virtio-milk rings served by the daemon at
/// `socket`. Returns the guest's result status.
pub fn run_qemu_vhost_user(
    config: &VmConfig,
    socket: &Path,
    on_start: OnVhostStart<'_>,
) -> Result<Option<i32>, VmmError> {
    if config.memory_mib > QEMU_MILK_MAX_MEMORY_MIB {
        return Err(VmmError::InvalidConfig(format!(
            "--memory {} MiB: with --policy-socket under QEMU the host maps guest RAM, at most \
             {} MiB",
            config.memory_mib, QEMU_MILK_MAX_MEMORY_MIB
        )));
    }
    let backend = VhostUserIvshmem::new(socket, config.cpus)
        .map_err(|e| VmmError::PolicyDaemon(VhostUserDeviceError::Frontend(e)))?;
    let slot = backend.handle();
    let dir = tempdir_in(&runtime_dir())?;
    let cfg = TransportConfig::in_dir(&dir.0, config.memory_mib, backend.device_info());
    let transport = IvshmemTransport::new(cfg, backend).map_err(|e| VmmError::Io {
        what: "ivshmem transport".into(),
        err: std::io::Error::other(e.to_string()),
    })?;
    let mut spec = harness_spec(config);
    transport.qemu_args().apply(&mut spec);
    let pid = PidFile::new();
    pid.apply(&mut spec);
    on_start(slot, pid.stopper()).map_err(VmmError::InvalidConfig)?;
    let running = transport.spawn().map_err(|e| VmmError::Io {
        what: "ivshmem transport thread".into(),
        err: std::io::Error::other(e.to_string()),
    })?;
    let echo = config.echo_console;
    let outcome = milk_harness::run_qemu(&spec, &mut |line| {
        if echo {
            println!("{line}");
        }
    });
    match running.stop() {
        Ok(mut t) => t.device_mut().disconnect(),
        Err(e) => log::warn!("stopping the ivshmem transport: {e}"),
    }
    let outcome = outcome?;
    Ok(outcome.result.map(|r| r.status))
}

/// A per-run directory (RAM file, ivshmem socket), removed at the end.
struct RunDir(std::path::PathBuf);

fn tempdir_in(parent: &Path) -> Result<RunDir, VmmError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let p = parent.join(format!(
        "milk-vhost-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).map_err(|err| VmmError::Io {
        what: format!("creating {}", p.display()),
        err,
    })?;
    Ok(RunDir(p))
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
