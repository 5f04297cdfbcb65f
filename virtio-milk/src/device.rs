//! Transport-facing device model: what a virtio transport (virtio-mmio in milk-vmm, the
//! ivshmem transport under QEMU) needs to expose virtio-milk, in one place so both
//! transports behave the same.
//!
//! The transport owns registers, feature negotiation bookkeeping and queue address
//! collection; at DRIVER_OK it calls [`MilkDevice::activate`] with the guest memory, the
//! queues the driver configured, its kick eventfd(s) and an interrupt callback. The device
//! then runs a [`Runtime`] thread with a policy from the factory. A device reset (status 0)
//! or VMM exit calls [`MilkDevice::reset`], which stops the runtime (GOODBYE to the guest)
//! and returns the run's [`Summary`].

use vm_memory::{ByteValued, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::metrics::Summary;
use crate::policy::Policy;
use crate::protocol::{
    Config, DEVICE_FEATURES, MAX_CPUS, QUEUES_PER_CPU, VIRTIO_F_VERSION_1, VIRTIO_ID_MILK,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::queue::{EngineConfig, EngineError, Interrupt, QueueConfig, QueueEngine, RingState};
#[cfg(feature = "fault-injection")]
use crate::runtime::RawDecision;
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError, RuntimeHandle};

/// Makes a fresh policy instance (`milk_policies::resolve` builds them from a name).
pub type PolicyFactory = Box<dyn Fn() -> Box<dyn Policy> + Send>;

/// Device errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// CPU count out of range.
    #[error("unsupported cpu count {0}")]
    CpuCount(u32),
    /// The driver did not accept VIRTIO_F_VERSION_1.
    #[error("driver did not negotiate VIRTIO_F_VERSION_1")]
    NoVersion1,
    /// Activation while already active.
    #[error("device already active")]
    AlreadyActive,
    /// Activation without a kick eventfd.
    #[error("activation without a kick eventfd")]
    NoKick,
    /// Queue setup rejected.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Runtime thread failure.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// What a transport hands the device at DRIVER_OK: the one activation contract of
/// virtio-milk, whatever carries the queues (virtio-mmio under KVM, virtio over ivshmem
/// under QEMU, a vhost-user backend).
pub struct Activation<M> {
    /// Guest memory holding the vrings.
    pub memory: M,
    /// Features the driver accepted (bits the device does not offer are ignored).
    pub features: u64,
    /// Every queue, in index order (2c event queue, 2c+1 decision queue of CPU c).
    pub queues: Vec<QueueConfig>,
    /// Eventfds that become readable when the driver kicks (one per queue, or one shared);
    /// at least one. The device keeps them until reset.
    pub kicks: Vec<EventFd>,
    /// Signals used buffers to the driver.
    pub interrupt: Box<dyn Interrupt>,
    /// Where each queue continues (vhost-user SET_VRING_BASE, a hand-over); `None`: at
    /// index 0, as after a virtio reset.
    pub ring_state: Option<Vec<RingState>>,
}

/// The virtio-milk device. See the module documentation.
pub struct MilkDevice<M: GuestMemory + Send + 'static> {
    num_cpus: u32,
    config: Config,
    acked_features: u64,
    queue_max_size: u16,
    policy: String,
    factory: PolicyFactory,
    runtime_cfg: RuntimeConfig,
    running: Option<RuntimeHandle<M>>,
    parked: Option<QueueEngine<M>>,
}

impl<M: GuestMemory + Send + 'static> MilkDevice<M> {
    /// A device for a guest with `num_cpus` CPUs, serving it with the policy `factory`
    /// makes (named after a first instance).
    pub fn new(
        num_cpus: u32,
        factory: PolicyFactory,
        runtime_cfg: RuntimeConfig,
    ) -> Result<Self, DeviceError> {
        let name = factory().name().to_owned();
        Self::with_policy(num_cpus, &name, factory, runtime_cfg)
    }

    /// Like [`Self::new`], with the policy's name as chosen (e.g. `fifo:slice_us=2000`).
    pub fn with_policy(
        num_cpus: u32,
        name: &str,
        factory: PolicyFactory,
        runtime_cfg: RuntimeConfig,
    ) -> Result<Self, DeviceError> {
        if num_cpus == 0 || num_cpus > MAX_CPUS {
            return Err(DeviceError::CpuCount(num_cpus));
        }
        let mut config = Config::new(num_cpus);
        if let Some(hb) = runtime_cfg.heartbeat {
            config.heartbeat_ms = (hb.as_millis().min(u128::from(u32::MAX)) as u32).into();
        }
        Ok(MilkDevice {
            num_cpus,
            config,
            acked_features: 0,
            queue_max_size: 256,
            policy: name.to_owned(),
            factory,
            runtime_cfg,
            running: None,
            parked: None,
        })
    }

    /// virtio device ID.
    pub fn device_id(&self) -> u32 {
        VIRTIO_ID_MILK
    }

    /// Features offered.
    pub fn device_features(&self) -> u64 {
        DEVICE_FEATURES
    }

    /// Features in effect.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Number of virtqueues (two per CPU).
    pub fn num_queues(&self) -> usize {
        self.num_cpus as usize * usize::from(QUEUES_PER_CPU)
    }

    /// Largest queue size offered (QueueNumMax).
    pub fn queue_max_size(&self) -> u16 {
        self.queue_max_size
    }

    /// Config space bytes.
    pub fn config_space(&self) -> &[u8] {
        self.config.as_slice()
    }

    /// Read config space at `offset` into `data`; bytes past the end read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Whether the device was activated (running or paused) and not reset since.
    pub fn is_active(&self) -> bool {
        self.running.is_some() || self.parked.is_some()
    }

    /// Whether a runtime is serving the queues right now.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// DRIVER_OK: start serving the activation's queues (index 2c event, 2c+1 decision)
    /// with a fresh instance of the current policy. Refused unless the driver negotiated
    /// VIRTIO_F_VERSION_1 and configured every queue.
    pub fn activate(&mut self, a: Activation<M>) -> Result<(), DeviceError> {
        if self.is_active() {
            return Err(DeviceError::AlreadyActive);
        }
        self.acked_features = a.features & DEVICE_FEATURES;
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(DeviceError::NoVersion1);
        }
        let mut ecfg = EngineConfig::new(self.num_cpus);
        ecfg.event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        ecfg.max_queue_size = self.queue_max_size;
        ecfg.max_batch = usize::from(u16::from(self.config.max_batch));
        if self.acked_features & (1 << crate::protocol::VIRTIO_MILK_F_BATCH) == 0 {
            ecfg.max_batch = 1;
        }
        let mut kicks = a.kicks.into_iter();
        let kick = kicks.next().ok_or(DeviceError::NoKick)?;
        let mut engine = QueueEngine::new(a.memory, ecfg, &a.queues, kick, a.interrupt)?;
        for fd in kicks {
            engine.add_kick_fd(fd);
        }
        if let Some(st) = &a.ring_state {
            engine.set_ring_state(st)?;
        }
        let rt = Runtime::new(engine, (self.factory)(), self.runtime_cfg);
        self.running = Some(rt.spawn()?);
        Ok(())
    }

    /// The current policy's name as it was chosen (e.g. `fifo:slice_us=2000`).
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Make `factory` (called `name`) the device's policy: the running runtime swaps to a
    /// new instance at its next safe point (the task table survives, the guest stays on
    /// sched_ext), and every later resume or activation uses it. Returns whether a running
    /// runtime was told to swap.
    pub fn set_policy(&mut self, name: &str, factory: PolicyFactory) -> bool {
        self.policy = name.to_owned();
        self.factory = factory;
        match &self.running {
            Some(h) => {
                h.swap_policy((self.factory)());
                true
            }
            None => false,
        }
    }

    /// Number of guest CPUs served.
    pub fn num_cpus(&self) -> u32 {
        self.num_cpus
    }

    /// Counters of the running runtime (at most `runtime::SNAPSHOT_PERIOD` old).
    pub fn snapshot(&self) -> Option<Summary> {
        self.running.as_ref().and_then(RuntimeHandle::snapshot)
    }

    /// Fault-injection hook: write `decisions` unvalidated (see
    /// [`RuntimeHandle::inject_decisions`]). Returns false (nothing sent) when no runtime
    /// is running.
    #[cfg(feature = "fault-injection")]
    pub fn inject_decisions(&self, decisions: &[RawDecision]) -> bool {
        match &self.running {
            Some(h) => {
                h.inject_decisions(decisions);
                true
            }
            None => false,
        }
    }

    /// Stop the host runtime but keep the queues (GOODBYE: the guest falls back to its own
    /// scheduler). Returns the stopped runtime's summary; no-op if not running.
    pub fn pause(&mut self) -> Result<Option<Summary>, DeviceError> {
        self.pause_with(false)
    }

    /// Like [`Self::pause`] but without GOODBYE: the guest sees a host that went silent
    /// and falls back after its host timeout (fault injection: a crash simulation).
    #[cfg(feature = "fault-injection")]
    pub fn pause_silently(&mut self) -> Result<Option<Summary>, DeviceError> {
        self.pause_with(true)
    }

    fn pause_with(&mut self, silent: bool) -> Result<Option<Summary>, DeviceError> {
        let Some(h) = self.running.take() else {
            return Ok(None);
        };
        let rt = if silent {
            h.stop_silently()?
        } else {
            h.stop()?
        };
        let summary = rt.summary();
        self.parked = Some(rt.into_engine());
        Ok(Some(summary))
    }

    /// Start a fresh runtime (new policy instance, new session: HELLO) on the paused
    /// queues. No-op unless paused.
    pub fn resume(&mut self) -> Result<(), DeviceError> {
        let Some(engine) = self.parked.take() else {
            return Ok(());
        };
        let rt = Runtime::new(engine, (self.factory)(), self.runtime_cfg);
        self.running = Some(rt.spawn()?);
        Ok(())
    }

    /// Device reset or shutdown: stop the runtime (GOODBYE), forget the queues, and return
    /// the summary of the runtime that was running (`None` if it was paused or inactive).
    pub fn reset(&mut self) -> Result<Option<Summary>, DeviceError> {
        self.acked_features = 0;
        self.parked = None;
        match self.running.take() {
            Some(h) => Ok(Some(h.stop()?.summary())),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Dispatcher, PolicyEvent, SchedView};
    use vm_memory::GuestMemoryMmap;

    struct Idle;
    impl Policy for Idle {
        fn name(&self) -> &str {
            "idle"
        }
        fn attach(&mut self, _: &SchedView) {}
        fn on_event(&mut self, _: &PolicyEvent, _: &SchedView) {}
        fn schedule(&mut self, _: &mut Dispatcher<'_>) {}
    }

    fn dev(n: u32) -> Result<MilkDevice<GuestMemoryMmap>, DeviceError> {
        MilkDevice::new(n, Box::new(|| Box::new(Idle)), RuntimeConfig::default())
    }

    #[test]
    fn identity_features_and_config() {
        assert!(matches!(dev(0), Err(DeviceError::CpuCount(0))));
        assert!(matches!(dev(65), Err(DeviceError::CpuCount(65))));
        let d = dev(3).unwrap();
        assert_eq!(d.device_id(), 58);
        assert_eq!(d.num_queues(), 6);
        let mut b = [0u8; 4];
        d.read_config(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 3);
        let mut b = [0xffu8; 4];
        d.read_config(14, &mut b);
        assert_eq!(b, [0, 0, 0, 0], "heartbeat high bytes, then past the end");
        d.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn activation_needs_version_1_and_reset_stops() {
        use crate::loopback::LoopbackMemory;
        use vmm_sys_util::eventfd::EFD_NONBLOCK;
        let lm = LoopbackMemory::new(2, 16, 256).unwrap();
        let mut d = dev(2).unwrap();
        let act = |features: u64, queues: &[QueueConfig]| Activation {
            memory: lm.mem.clone(),
            features,
            queues: queues.to_vec(),
            kicks: vec![EventFd::new(EFD_NONBLOCK).unwrap()],
            interrupt: Box::new(|_q: u16| Ok(())),
            ring_state: None,
        };
        assert!(matches!(
            d.activate(act(0, &lm.queues)),
            Err(DeviceError::NoVersion1)
        ));
        let v1 = 1 << VIRTIO_F_VERSION_1;
        // Bad queue layout is refused.
        assert!(matches!(
            d.activate(act(v1, &lm.queues[..2])),
            Err(DeviceError::Engine(_))
        ));
        let mut no_kick = act(v1, &lm.queues);
        no_kick.kicks.clear();
        assert!(matches!(d.activate(no_kick), Err(DeviceError::NoKick)));
        d.activate(act(u64::MAX, &lm.queues)).unwrap();
        assert_eq!(
            d.acked_features(),
            DEVICE_FEATURES,
            "unoffered bits dropped"
        );
        assert!(d.is_active());
        assert!(matches!(
            d.activate(act(v1, &lm.queues)),
            Err(DeviceError::AlreadyActive)
        ));
        // Live counters appear within a snapshot period.
        let t0 = std::time::Instant::now();
        while d.snapshot().is_none() {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "no snapshot"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        // Pause keeps the queues; resume starts a new runtime on them.
        let paused = d.pause().unwrap().expect("summary of the paused runtime");
        assert!(paused.metrics.session_sent >= 2, "HELLO and GOODBYE");
        assert!(d.is_active() && !d.is_running());
        assert!(d.pause().unwrap().is_none());
        d.resume().unwrap();
        assert!(d.is_running());
        let s = d
            .reset()
            .unwrap()
            .expect("a summary from the stopped runtime");
        assert_eq!(s.policy, "idle");
        assert!(s.metrics.session_sent >= 2, "HELLO and GOODBYE again");
        assert!(!d.is_active());
        assert!(d.reset().unwrap().is_none());
        d.resume().unwrap();
        assert!(!d.is_running(), "nothing to resume after reset");
    }
}
