//! virtio-milk behind this transport (cargo feature `virtio-milk`): a
//! [`Backend`] that hands activations to `virtio_milk::device::MilkDevice`,
//! and [`MilkControl`], a cloneable handle on the same device for other
//! threads (pause/resume, policy swap, live counters, fault injection).
//!
//! ```ignore
//! let dev = MilkDevice::new(num_cpus, factory, RuntimeConfig::default())?;
//! let backend = MilkBackend::new(dev);
//! let control = backend.control();
//! let cfg = TransportConfig::in_dir(dir, memory_mib, backend.device_info());
//! let t = IvshmemTransport::new(cfg, backend)?;
//! ```
//!
//! For a whole guest run (transport, QEMU, summaries) see [`crate::session`].

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_milk::device::{DeviceError, MilkDevice};
use virtio_milk::metrics::Summary;
use virtio_milk::policy::Policy;
use virtio_milk::queue::QueueConfig as MilkQueueConfig;
use virtio_milk::runtime::RawDecision;
use vm_memory::GuestMemoryMmap;

use crate::backend::{Activation, Backend, BackendError};
use crate::device::DeviceInfo;

/// Vendor ID published for virtio-milk ("MILK" in memory, like the magic).
pub const MILK_VENDOR_ID: u32 = 0x4b4c_494d;

/// What the transport thread and the control handles share.
struct Shared {
    dev: Mutex<MilkDevice<GuestMemoryMmap>>,
    /// Summaries of the runtime runs that ended, in order.
    summaries: Mutex<Vec<Summary>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn record(&self, s: Option<Summary>) {
        if let Some(s) = s {
            lock(&self.summaries).push(s);
        }
    }
}

/// The virtio-milk device as an ivshmem [`Backend`].
///
/// virtio-milk serves all its queues at once, so activation fails (and the
/// transport sets DEVICE_NEEDS_RESET) unless the driver made every queue
/// ready. The engine wakes on every queue's kick eventfd: the first is
/// passed at activation, the others are registered once with
/// `MilkDevice::add_kick_fd` (the transport's kick eventfds live as long as
/// it does, so later activations reuse them).
pub struct MilkBackend {
    shared: Arc<Shared>,
    kicks_added: bool,
}

impl MilkBackend {
    /// Wraps a device.
    pub fn new(dev: MilkDevice<GuestMemoryMmap>) -> Self {
        MilkBackend {
            shared: Arc::new(Shared {
                dev: Mutex::new(dev),
                summaries: Mutex::new(Vec::new()),
            }),
            kicks_added: false,
        }
    }

    /// What the transport must publish for this device.
    pub fn device_info(&self) -> DeviceInfo {
        let dev = self.device();
        DeviceInfo {
            device_id: dev.device_id(),
            vendor_id: MILK_VENDOR_ID,
            features: dev.device_features(),
            config: dev.config_space().to_vec(),
            num_queues: u16::try_from(dev.num_queues()).unwrap_or(u16::MAX),
            queue_max: dev.queue_max_size(),
        }
    }

    /// The device, locked (e.g. to swap its policy). Do not hold the guard
    /// across a guest run: the transport thread needs it for activation and
    /// reset.
    pub fn device(&self) -> MutexGuard<'_, MilkDevice<GuestMemoryMmap>> {
        lock(&self.shared.dev)
    }

    /// A handle on this device usable from any thread while the transport runs.
    pub fn control(&self) -> MilkControl {
        MilkControl {
            shared: self.shared.clone(),
        }
    }

    /// Summaries of the runtime runs that ended (one per pause or reset of a
    /// running device), in order.
    pub fn summaries(&self) -> Vec<Summary> {
        lock(&self.shared.summaries).clone()
    }
}

impl Backend for MilkBackend {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        let mut dev = lock(&self.shared.dev);
        let n = dev.num_queues();
        let complete = a.queues.len() == n
            && a.queues
                .iter()
                .enumerate()
                .all(|(i, q)| usize::from(q.index) == i);
        if !complete {
            let ready: Vec<u16> = a.queues.iter().map(|q| q.index).collect();
            return Err(format!("virtio-milk needs all {n} queues ready, got {ready:?}").into());
        }
        dev.ack_features(a.features);
        let queues: Vec<MilkQueueConfig> = a
            .queues
            .iter()
            .map(|q| MilkQueueConfig {
                size: q.config.size,
                desc_table: q.config.desc,
                avail_ring: q.config.driver,
                used_ring: q.config.device,
            })
            .collect();
        let mut kicks = a.queues.into_iter().map(|q| q.kick);
        let kick = kicks.next().ok_or("virtio-milk device without queues")?;
        if !self.kicks_added {
            for k in kicks {
                dev.add_kick_fd(k);
            }
            self.kicks_added = true;
        }
        let irq = a.interrupts;
        dev.activate(
            a.memory,
            &queues,
            kick,
            Box::new(move |q: u16| irq.signal_queue(q)),
        )?;
        Ok(())
    }

    fn reset(&mut self) {
        let res = lock(&self.shared.dev).reset();
        match res {
            Ok(s) => self.shared.record(s),
            Err(e) => log::warn!("virtio-milk reset: {e}"),
        }
    }
}

/// Controls a [`MilkBackend`]'s device from any thread (cheap to clone).
///
/// Every call takes the device lock briefly; `pause` waits for the runtime
/// thread to end (one loop iteration). Calls made before the driver
/// activated the device, or after a reset, do nothing and say so.
#[derive(Clone)]
pub struct MilkControl {
    shared: Arc<Shared>,
}

impl MilkControl {
    /// Whether a host runtime is serving the queues now.
    pub fn is_running(&self) -> bool {
        lock(&self.shared.dev).is_running()
    }

    /// Whether the driver activated the device (running or paused).
    pub fn is_active(&self) -> bool {
        lock(&self.shared.dev).is_active()
    }

    /// Stops the host runtime with GOODBYE (the guest falls back to CFS at
    /// once); the queues stay. The stopped run's summary joins
    /// [`Self::summaries`]. Returns whether a runtime was running.
    pub fn pause(&self) -> Result<bool, DeviceError> {
        let s = lock(&self.shared.dev).pause()?;
        let was = s.is_some();
        self.shared.record(s);
        Ok(was)
    }

    /// Like [`Self::pause`] but without GOODBYE: a host that simply goes
    /// silent, as a crash would look to the guest (it falls back after its
    /// `host_timeout_ms`).
    pub fn pause_silently(&self) -> Result<bool, DeviceError> {
        let s = lock(&self.shared.dev).pause_silently()?;
        let was = s.is_some();
        self.shared.record(s);
        Ok(was)
    }

    /// Starts a fresh runtime on the paused queues (new policy instance from
    /// the device's factory, new session: HELLO). Returns whether it did.
    pub fn resume(&self) -> Result<bool, DeviceError> {
        let mut dev = lock(&self.shared.dev);
        if dev.is_running() || !dev.is_active() {
            return Ok(false);
        }
        dev.resume()?;
        Ok(dev.is_running())
    }

    /// Hot-swaps the running runtime's policy (the guest sees a HELLO with the
    /// same session and the new name). Returns false if no runtime runs.
    /// A later [`Self::resume`] uses the device's factory again; see
    /// [`crate::session::MilkHost`] for swaps that persist across resumes.
    pub fn swap_policy(&self, policy: Box<dyn Policy>) -> bool {
        let dev = lock(&self.shared.dev);
        dev.swap_policy(policy);
        dev.is_running()
    }

    /// Live counters of the running runtime (at most
    /// `virtio_milk::runtime::SNAPSHOT_PERIOD` old; `None` while not running
    /// or during its first period).
    pub fn snapshot(&self) -> Option<Summary> {
        lock(&self.shared.dev).snapshot()
    }

    /// Testing / fault-injection hook: writes `decisions` to the guest as
    /// given, bypassing the runtime's validation of policy output (see
    /// `virtio_milk::runtime::RuntimeHandle::inject_decisions`). Acks come
    /// back counted by status in `Metrics::injected_acks`. Returns false when
    /// no runtime is running (nothing sent).
    pub fn inject_decisions(&self, decisions: &[RawDecision]) -> bool {
        lock(&self.shared.dev).inject_decisions(decisions)
    }

    /// Summaries of the runtime runs that ended so far, in order.
    pub fn summaries(&self) -> Vec<Summary> {
        lock(&self.shared.summaries).clone()
    }

    /// Polls [`Self::snapshot`] until `pred` holds or `timeout` passes.
    pub fn wait_for(
        &self,
        timeout: std::time::Duration,
        pred: impl Fn(&Summary) -> bool,
    ) -> Option<Summary> {
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.snapshot() {
                if pred(&s) {
                    return Some(s);
                }
            }
            if std::time::Instant::now() >= end {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
