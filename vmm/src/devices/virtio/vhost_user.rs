//! virtio-milk served by an out-of-process policy (`milk-policy`) over vhost-user, on the
//! virtio-mmio bus (the KVM engine).
//!
//! milk-vmm keeps the transport (registers, feature negotiation, queue addresses); at
//! DRIVER_OK the rings go to the daemon through
//! [`milk_policy_daemon::frontend::MilkFrontend`]: guest RAM as the memfd behind
//! [`crate::memory::GuestMemory`], ring addresses, kick = the queue's ioeventfd (a guest
//! QueueNotify wakes the daemon without a VM exit to user space), call = one eventfd that a
//! relay thread here turns into InterruptStatus plus the slot's irqfd (virtio-mmio needs the
//! status bit, so the daemon cannot write the irqfd directly).
//!
//! The daemon's features and config space are fetched when the device is created (the
//! daemon must be listening by then); its CPU count must match the guest's. A device reset
//! stops the rings but keeps the connection for the next activation. Hang-ups, reconnection
//! and planned swaps are the frontend's ([`VhostUserMilkDevice::handle`]).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use milk_policy_daemon::frontend::{
    DeviceSetup, FrontendError, FrontendSlot, Link, MilkFrontend, RingSetup,
};
use virtio_milk::queue::QueueConfig;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, Activation, NotificationMode, VirtioDevice, VirtioInterrupt};

/// Swap and status handle of the device (see [`FrontendSlot`]).
pub type VhostUserHandle = FrontendSlot;

/// Relays the daemon's call eventfd into the virtio interrupt.
struct CallRelay {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CallRelay {
    fn start(call: EventFd, irq: VirtioInterrupt) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let (stop2, wake2) = (stop.clone(), wake.try_clone()?);
        let thread = std::thread::Builder::new()
            .name("milk-vhost-call".into())
            .spawn(move || {
                let mut p = [
                    libc::pollfd {
                        fd: call.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: wake2.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                while !stop2.load(Ordering::Acquire) {
                    // SAFETY: `p` is a valid array of two pollfd structs for the whole call;
                    // the kernel only writes the `revents` fields.
                    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, -1) };
                    if r < 0 {
                        continue;
                    }
                    if p[0].revents & libc::POLLIN != 0 && call.read().is_ok() {
                        if let Err(e) = irq.signal_used_queue(0) {
                            log::warn!("virtio-milk (vhost-user): interrupt: {e}");
                        }
                    }
                    if p[1].revents & libc::POLLIN != 0 {
                        let _ = wake2.read();
                    }
                }
            })?;
        Ok(CallRelay {
            stop,
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for CallRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    /// Connecting or negotiating with the daemon failed.
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    /// The daemon serves another CPU count.
    #[error("policy daemon at {path} serves {daemon} cpus, the guest has {guest}")]
    CpuCount {
        /// Socket.
        path: PathBuf,
        /// Daemon's count.
        daemon: u32,
        /// Guest's count.
        guest: u32,
    },
}

/// virtio-milk behind the virtio-mmio transport, served by a `milk-policy` daemon.
pub struct VhostUserMilkDevice {
    path: PathBuf,
    num_cpus: u32,
    features: u64,
    config: Vec<u8>,
    /// Connected but not active.
    idle: Option<Link>,
    handle: VhostUserHandle,
    relay: Option<CallRelay>,
}

impl VhostUserMilkDevice {
    /// Connect to the daemon at `path` for a guest of `num_cpus` CPUs.
    pub fn new(path: &Path, num_cpus: u32) -> Result<Self, VhostUserDeviceError> {
        let nq = num_cpus as usize * 2;
        let link = Link::connect(path, nq)?;
        let daemon = link.num_cpus().unwrap_or(0);
        if daemon != num_cpus {
            return Err(VhostUserDeviceError::CpuCount {
                path: path.to_owned(),
                daemon,
                guest: num_cpus,
            });
        }
        log::info!(
            "virtio-milk: policy daemon at {} ({num_cpus} cpus)",
            path.display()
        );
        Ok(VhostUserMilkDevice {
            path: path.to_owned(),
            num_cpus,
            features: link.device_features(),
            config: link.config().to_vec(),
            idle: Some(link),
            handle: VhostUserHandle::default(),
            relay: None,
        })
    }

    /// Swap and status handle.
    pub fn handle(&self) -> VhostUserHandle {
        self.handle.clone()
    }

    fn stop(&mut self) {
        if let Some(fe) = self.handle.take() {
            self.idle = fe.detach();
        }
        self.relay = None;
    }
}

impl VirtioDevice for VhostUserMilkDevice {
    fn device_type(&self) -> u32 {
        virtio_milk::protocol::VIRTIO_ID_MILK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256; self.num_cpus as usize * 2]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::warn!(
            "virtio-milk: ignoring write of {} bytes to the read-only config at {offset}",
            data.len()
        );
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| ActivateError::Other(e.to_string()))?;
        let mut rings = Vec::with_capacity(a.queues.len());
        for (i, (q, kick)) in a.queues.iter().zip(&a.queue_evts).enumerate() {
            if !q.ready() {
                return Err(ActivateError::BadQueues(format!("queue {i} not ready")));
            }
            let dup = |e: &EventFd| {
                e.try_clone()
                    .map_err(|e| ActivateError::Other(e.to_string()))
            };
            rings.push(RingSetup {
                cfg: QueueConfig {
                    size: q.size(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                },
                kick: dup(kick)?,
                call: dup(&call)?,
            });
        }
        let dev = DeviceSetup {
            mem: a.mem,
            acked_features: a.acked_features,
            rings,
        };
        self.relay = Some(
            CallRelay::start(call, a.interrupt).map_err(|e| ActivateError::Other(e.to_string()))?,
        );
        let started = match self.idle.take() {
            Some(link) => MilkFrontend::start_on(link, dev, true),
            None => MilkFrontend::start(&self.path, dev),
        };
        let fe = started.map_err(|e| {
            self.relay = None;
            ActivateError::Other(e.to_string())
        })?;
        self.handle.set(fe);
        log::info!(
            "virtio-milk: rings handed to the policy daemon at {}",
            self.path.display()
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn notification_mode(&self) -> NotificationMode {
        NotificationMode::Device
    }
}

impl Drop for VhostUserMilkDevice {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long `milkctl status` waits for the daemon's stats socket.
const STATS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The control socket's view of a policy daemon serving the rings (either engine):
/// `milkctl swap --socket PATH` is a planned swap through the frontend (the report is the
/// reply's result); `status` / `metrics` are the frontend's state plus the current
/// daemon's counters, read from its stats socket ([`milk_policy_daemon::stats`]).
pub struct RemoteDaemon(pub FrontendSlot);

impl milk_control::RemotePolicy for RemoteDaemon {
    fn swap_to_socket(&self, socket: &str) -> Result<serde_json::Value, String> {
        let r = self.0.swap(Path::new(socket)).map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "socket": socket,
            "blackout_us": r.blackout.as_micros() as u64,
            "prepare_us": r.prepare.as_micros() as u64,
            "state_bytes": r.state_bytes,
            "tasks": r.pids.len(),
            "ring_bases": r.bases,
        }))
    }

    fn status(&self) -> milk_control::RemoteStatus {
        let Some(fe) = self.0.status() else {
            return milk_control::RemoteStatus {
                state: "inactive".into(),
                daemon: serde_json::Value::Null,
                stats: None,
            };
        };
        let mut daemon = serde_json::json!({
            "socket": fe.path,
            "connected": fe.connected,
            "hangups": fe.hangups,
            "reconnects": fe.reconnects,
            "swaps": fe.swaps,
        });
        if !fe.connected {
            return milk_control::RemoteStatus {
                state: "disconnected".into(),
                daemon,
                stats: None,
            };
        }
        match milk_policy_daemon::stats::query(&fe.path, STATS_TIMEOUT) {
            Ok(st) => {
                daemon["pid"] = st["pid"].clone();
                milk_control::RemoteStatus {
                    state: st["state"].as_str().unwrap_or("unreachable").to_owned(),
                    daemon,
                    stats: Some(st),
                }
            }
            Err(e) => {
                daemon["stats_error"] = serde_json::json!(e.to_string());
                milk_control::RemoteStatus {
                    state: "unreachable".into(),
                    daemon,
                    stats: None,
                }
            }
        }
    }
}
