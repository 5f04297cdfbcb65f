//! The one handle on a virtio-milk device, shared by its transport and by whoever controls
//! it (milk-vmm's control socket, tests).
//!
//! A transport (virtio-mmio under KVM, virtio over ivshmem under QEMU, a vhost-user
//! backend) calls [`MilkControl::activate`] at DRIVER_OK and [`MilkControl::reset`] when the
//! driver resets the device or the VM ends; every runtime run that ends leaves its
//! [`Summary`] in [`MilkControl::summaries`]. Control calls (pause, resume, policy swap,
//! live counters) come from any thread. The device owns its current policy, so a swap
//! survives a pause and a driver reset.
//!
//! [`PolicyControl`] is the same handle without the guest-memory type, for callers that
//! only control (a control server serving either engine).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::GuestMemory;

use crate::device::{Activation, DeviceError, MilkDevice, PolicyFactory};
use crate::metrics::Summary;
#[cfg(feature = "fault-injection")]
use crate::runtime::RawDecision;

/// What the device is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// The driver has not activated the device (or reset it).
    Inactive,
    /// A host runtime serves the queues.
    Running,
    /// Activated, but no runtime serves the queues (the guest runs on its own scheduler).
    Paused,
}

impl DeviceState {
    /// Lower-case name (`inactive`, `running`, `paused`).
    pub fn name(self) -> &'static str {
        match self {
            DeviceState::Inactive => "inactive",
            DeviceState::Running => "running",
            DeviceState::Paused => "paused",
        }
    }
}

struct Shared<M: GuestMemory + Send + 'static> {
    dev: Mutex<MilkDevice<M>>,
    /// Summaries of the runtime runs that ended, in order.
    summaries: Mutex<Vec<Summary>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Controls one [`MilkDevice`] from any thread (cheap to clone). See the module docs.
///
/// Every call takes the device lock briefly; `pause` and `reset` wait for the runtime
/// thread to end (one loop iteration).
pub struct MilkControl<M: GuestMemory + Send + 'static> {
    shared: Arc<Shared<M>>,
}

impl<M: GuestMemory + Send + 'static> Clone for MilkControl<M> {
    fn clone(&self) -> Self {
        MilkControl {
            shared: self.shared.clone(),
        }
    }
}

impl<M: GuestMemory + Send + 'static> MilkControl<M> {
    /// Takes ownership of `dev`.
    pub fn new(dev: MilkDevice<M>) -> Self {
        MilkControl {
            shared: Arc::new(Shared {
                dev: Mutex::new(dev),
                summaries: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Reads something off the device (identity, config space, ...).
    pub fn with_device<R>(&self, f: impl FnOnce(&MilkDevice<M>) -> R) -> R {
        f(&lock(&self.shared.dev))
    }

    fn record(&self, s: Option<Summary>) {
        if let Some(s) = s {
            lock(&self.shared.summaries).push(s);
        }
    }

    /// Transport: the driver set DRIVER_OK.
    pub fn activate(&self, a: Activation<M>) -> Result<(), DeviceError> {
        lock(&self.shared.dev).activate(a)
    }

    /// Transport: the driver reset the device, or the VM ends. Stops a running runtime
    /// (GOODBYE) and keeps its summary; does nothing when inactive.
    pub fn reset(&self) {
        let res = lock(&self.shared.dev).reset();
        match res {
            Ok(s) => self.record(s),
            Err(e) => log::error!("virtio-milk: stopping the runtime: {e}"),
        }
    }

    /// What the device is doing.
    pub fn state(&self) -> DeviceState {
        let d = lock(&self.shared.dev);
        if d.is_running() {
            DeviceState::Running
        } else if d.is_active() {
            DeviceState::Paused
        } else {
            DeviceState::Inactive
        }
    }

    /// Whether a host runtime serves the queues now.
    pub fn is_running(&self) -> bool {
        self.state() == DeviceState::Running
    }

    /// Stops the host runtime with GOODBYE (the guest falls back to its own scheduler at
    /// once); the queues stay. Returns whether a runtime was running.
    pub fn pause(&self) -> Result<bool, DeviceError> {
        let s = lock(&self.shared.dev).pause()?;
        let was = s.is_some();
        self.record(s);
        Ok(was)
    }

    /// Starts a fresh runtime with the current policy on the paused queues (new session:
    /// HELLO, the guest re-enables the host scheduler). Returns whether it did.
    pub fn resume(&self) -> Result<bool, DeviceError> {
        let mut d = lock(&self.shared.dev);
        if d.is_running() || !d.is_active() {
            return Ok(false);
        }
        d.resume()?;
        Ok(d.is_running())
    }

    /// Makes `factory` (called `name`) the device's policy; see
    /// [`MilkDevice::set_policy`]. Returns whether a running runtime swapped to it now.
    pub fn set_policy(&self, name: &str, factory: PolicyFactory) -> bool {
        lock(&self.shared.dev).set_policy(name, factory)
    }

    /// Name of the current policy as chosen.
    pub fn policy(&self) -> String {
        lock(&self.shared.dev).policy().to_owned()
    }

    /// Counters of the running runtime (at most `runtime::SNAPSHOT_PERIOD` old; `None`
    /// while not running or during its first period).
    pub fn snapshot(&self) -> Option<Summary> {
        lock(&self.shared.dev).snapshot()
    }

    /// Summaries of the runtime runs that ended so far, in order.
    pub fn summaries(&self) -> Vec<Summary> {
        lock(&self.shared.summaries).clone()
    }

    /// Polls [`Self::snapshot`] until `pred` holds or `timeout` passes.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Summary) -> bool) -> Option<Summary> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.snapshot() {
                if pred(&s) {
                    return Some(s);
                }
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fault injection: like [`Self::pause`] but without GOODBYE, as a crashed host would
    /// look to the guest (it falls back after its host timeout).
    #[cfg(feature = "fault-injection")]
    pub fn pause_silently(&self) -> Result<bool, DeviceError> {
        let s = lock(&self.shared.dev).pause_silently()?;
        let was = s.is_some();
        self.record(s);
        Ok(was)
    }

    /// Fault injection: writes `decisions` to the guest as given, bypassing the runtime's
    /// checks (see `RuntimeHandle::inject_decisions`). Returns false when no runtime runs.
    #[cfg(feature = "fault-injection")]
    pub fn inject_decisions(&self, decisions: &[RawDecision]) -> bool {
        lock(&self.shared.dev).inject_decisions(decisions)
    }
}

/// Control of a virtio-milk device without its guest-memory type (object safe).
pub trait PolicyControl: Send + Sync {
    /// See [`MilkControl::state`].
    fn state(&self) -> DeviceState;
    /// Number of guest CPUs the device serves.
    fn num_cpus(&self) -> u32;
    /// See [`MilkControl::pause`].
    fn pause(&self) -> Result<bool, DeviceError>;
    /// See [`MilkControl::resume`].
    fn resume(&self) -> Result<bool, DeviceError>;
    /// See [`MilkControl::set_policy`].
    fn set_policy(&self, name: &str, factory: PolicyFactory) -> bool;
    /// See [`MilkControl::policy`].
    fn policy(&self) -> String;
    /// See [`MilkControl::snapshot`].
    fn snapshot(&self) -> Option<Summary>;
    /// See [`MilkControl::summaries`].
    fn summaries(&self) -> Vec<Summary>;
}

impl<M: GuestMemory + Send + 'static> PolicyControl for MilkControl<M> {
    fn state(&self) -> DeviceState {
        MilkControl::state(self)
    }
    fn num_cpus(&self) -> u32 {
        self.with_device(MilkDevice::num_cpus)
    }
    fn pause(&self) -> Result<bool, DeviceError> {
        MilkControl::pause(self)
    }
    fn resume(&self) -> Result<bool, DeviceError> {
        MilkControl::resume(self)
    }
    fn set_policy(&self, name: &str, factory: PolicyFactory) -> bool {
        MilkControl::set_policy(self, name, factory)
    }
    fn policy(&self) -> String {
        MilkControl::policy(self)
    }
    fn snapshot(&self) -> Option<Summary> {
        MilkControl::snapshot(self)
    }
    fn summaries(&self) -> Vec<Summary> {
        MilkControl::summaries(self)
    }
}
