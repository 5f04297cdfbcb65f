//! The vhost-user backend: virtio-milk's queues served by the same [`Runtime`] milk-vmm
//! runs in process, in a process of its own.
//!
//! `vhost-user-backend` does the protocol (memory table, ring addresses, kick and call
//! eventfds, ring enable/stop) and runs one epoll worker thread that calls
//! [`MilkBackend::handle_event`] on every kick. The policy runtime keeps its own polling
//! loop on its own thread (spin, then sleep on a wake eventfd), so the worker only forwards
//! kicks to that eventfd; only the runtime thread consumes it, no wake-up is lost.
//!
//! Life of a connection:
//! - all `2 * cpus` rings ready and enabled: the first event (the framework raises one for
//!   each ring it registers) starts the runtime on them, from the ring positions the
//!   frontend gave (`SET_VRING_BASE`, used index read from guest memory). If the frontend
//!   loaded a device state first (`SET_DEVICE_STATE_FD` LOAD, a planned swap), the runtime
//!   continues that session; otherwise it starts a new one (HELLO, the guest re-announces
//!   its tasks).
//! - `GET_VRING_BASE` ([`MilkBackend::stop_vring`]): the runtime stops at once without
//!   GOODBYE (the guest stays on sched_ext for the next backend), its ring positions go to
//!   the framework's vrings (the reply) and its session is kept for a `SAVE`.
//! - `RESET_DEVICE` or the frontend hanging up: the runtime stops with GOODBYE.
//!
//! Recovery without in-flight tracking (vhost-user-backend 0.24 has none): the engine
//! completes every chain in order right after popping it, so the used index in guest memory
//! is always the ring position; a frontend recovering from a crashed backend reads it there.
//! A chain popped but not completed at the crash is read again (at-least-once); the new
//! backend starts a new session, drops everything queued before its HELLO, and the guest
//! re-sends its whole state (TASK_NEW for every task) after the HELLO.

use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_milk::metrics::Summary;
use virtio_milk::protocol::{
    Config, DEVICE_FEATURES, MAX_BATCH, QUEUES_PER_CPU, VIRTIO_MILK_F_BATCH,
    VIRTIO_RING_F_EVENT_IDX,
};
use virtio_milk::queue::{EngineConfig, QueueConfig, QueueEngine, RingState};
use virtio_milk::runtime::{Runtime, RuntimeConfig, RuntimeHandle, SessionState};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state;

/// Guest memory as the framework maps it.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Largest guest CPU count one daemon serves (all queues on one worker thread, whose queue
/// mask is 64 bits).
pub const MAX_DAEMON_CPUS: u32 = 32;

/// Largest queue size offered.
pub const QUEUE_MAX_SIZE: u16 = 1024;

/// Backend setup errors.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// CPU count out of range.
    #[error("cpu count {0} out of range 1..={MAX_DAEMON_CPUS}")]
    CpuCount(u32),
    /// Unknown policy or bad parameters.
    #[error("--policy: {0}")]
    UnknownPolicy(String),
}

/// What a daemon runs.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// Guest CPUs (queue pairs).
    pub num_cpus: u32,
    /// Policy as `NAME[:PARAMS]` (`milk_policies::resolve`).
    pub policy: String,
    /// Runtime knobs (heartbeat, spin budget, ...).
    pub runtime: RuntimeConfig,
}

/// One change of the backend's state, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendEvent {
    /// A runtime started; `resumed`: it continues a loaded session.
    Started {
        /// Continued a loaded session (planned swap) rather than a new one.
        resumed: bool,
        /// Ring positions it started from, by queue index.
        rings: Vec<RingState>,
    },
    /// The runtime stopped for `GET_VRING_BASE` at these ring positions.
    Stopped {
        /// Ring positions, by queue index.
        rings: Vec<RingState>,
    },
}

struct Running {
    handle: RuntimeHandle<GuestMemoryMmap<()>>,
    wake: EventFd,
}

enum Transfer {
    Save(JoinHandle<io::Result<()>>),
    Load(JoinHandle<io::Result<Vec<u8>>>),
}

#[derive(Default)]
struct Inner {
    mem: Option<Mem>,
    acked_features: u64,
    /// The framework's vrings (seen at the first event).
    vrings: Vec<VringRwLock<Mem>>,
    running: Option<Running>,
    /// Session of the runtime stopped by GET_VRING_BASE (for SAVE).
    saved: Option<SessionState>,
    /// Session handed over by LOAD (for the next start).
    loaded: Option<SessionState>,
    transfer: Option<Transfer>,
    summaries: Vec<Summary>,
    events: Vec<BackendEvent>,
}

/// The virtio-milk vhost-user backend. Share it as `Arc<MilkBackend>`.
pub struct MilkBackend {
    cfg: BackendConfig,
    factory: Mutex<virtio_milk::device::PolicyFactory>,
    config_space: Config,
    inner: Mutex<Inner>,
}

impl MilkBackend {
    /// A backend for `cfg.num_cpus` guest CPUs running `cfg.policy`.
    pub fn new(cfg: BackendConfig) -> Result<Self, BackendError> {
        if cfg.num_cpus == 0 || cfg.num_cpus > MAX_DAEMON_CPUS {
            return Err(BackendError::CpuCount(cfg.num_cpus));
        }
        let factory = milk_policies::resolve(&cfg.policy)
            .map_err(|e| BackendError::UnknownPolicy(e.to_string()))?
            .factory;
        let factory = Mutex::new(factory);
        let mut config_space = Config::new(cfg.num_cpus);
        config_space.heartbeat_ms = cfg
            .runtime
            .heartbeat
            .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32)
            .into();
        Ok(MilkBackend {
            cfg,
            factory,
            config_space,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a runtime is serving the rings.
    pub fn is_running(&self) -> bool {
        self.lock().running.is_some()
    }

    /// Summaries of the runtimes that ran so far.
    pub fn summaries(&self) -> Vec<Summary> {
        self.lock().summaries.clone()
    }

    /// State changes so far.
    pub fn events(&self) -> Vec<BackendEvent> {
        self.lock().events.clone()
    }

    /// Counters of the running runtime (at most a snapshot period old).
    pub fn snapshot(&self) -> Option<Summary> {
        self.lock()
            .running
            .as_ref()
            .and_then(|r| r.handle.snapshot())
    }

    /// Stop the runtime, telling the guest GOODBYE (frontend gone or device reset).
    pub fn shutdown(&self) {
        let mut inner = self.lock();
        if let Some(r) = inner.running.take() {
            match r.handle.stop() {
                Ok(rt) => inner.summaries.push(rt.summary()),
                Err(e) => log::error!("stopping the runtime: {e}"),
            }
        }
    }

    fn num_queues_used(&self) -> usize {
        self.cfg.num_cpus as usize * usize::from(QUEUES_PER_CPU)
    }

    /// Start a runtime if every ring is ready and enabled.
    fn maybe_start(&self, inner: &mut Inner, vrings: &[VringRwLock<Mem>]) -> io::Result<()> {
        let n = self.num_queues_used();
        if vrings.len() < n {
            return Ok(());
        }
        let mut queues = Vec::with_capacity(n);
        let mut rings = Vec::with_capacity(n);
        for v in &vrings[..n] {
            let g = v.get_ref();
            let q = g.get_queue();
            if !q.ready() || !g.is_enabled() {
                return Ok(());
            }
            queues.push(QueueConfig {
                size: q.size(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
            });
            rings.push(RingState {
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            });
        }
        let Some(mem) = inner.mem.as_ref() else {
            return Ok(());
        };
        let mem: GuestMemoryMmap<()> = (*mem.memory()).clone();
        let mut ecfg = EngineConfig::new(self.cfg.num_cpus);
        ecfg.event_idx = inner.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        ecfg.max_queue_size = QUEUE_MAX_SIZE;
        ecfg.max_batch = if inner.acked_features & (1 << VIRTIO_MILK_F_BATCH) != 0 {
            MAX_BATCH
        } else {
            1
        };
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let calls: Vec<VringRwLock<Mem>> = vrings[..n].to_vec();
        let irq = move |q: u16| -> io::Result<()> {
            match calls.get(usize::from(q)) {
                Some(v) => v.signal_used_queue(),
                None => Ok(()),
            }
        };
        let mut engine = QueueEngine::new(mem, ecfg, &queues, wake.try_clone()?, Box::new(irq))
            .map_err(io::Error::other)?;
        engine.set_ring_state(&rings).map_err(io::Error::other)?;
        let policy = (self.factory.lock().unwrap_or_else(|e| e.into_inner()))();
        let loaded = inner.loaded.take();
        let resumed = loaded.is_some();
        let mut rcfg = self.cfg.runtime;
        let rt = match loaded {
            Some(s) => {
                rcfg.hello_on_start = false;
                let mut rt = Runtime::new(engine, policy, rcfg);
                rt.resume_session(s);
                rt
            }
            None => Runtime::new(engine, policy, rcfg),
        };
        // A fresh start also discards what was queued before it (Runtime::run does).
        let handle = rt.spawn().map_err(io::Error::other)?;
        log::info!(
            "runtime started ({}, policy {}, rings {:?})",
            if resumed {
                "session continued"
            } else {
                "new session"
            },
            self.cfg.policy,
            rings.iter().map(|r| r.next_avail).collect::<Vec<_>>()
        );
        inner.events.push(BackendEvent::Started { resumed, rings });
        inner.running = Some(Running { handle, wake });
        Ok(())
    }

    /// GET_VRING_BASE: stop serving, hand the ring positions back through `vrings` and keep
    /// the session for a SAVE. No GOODBYE: the guest stays on sched_ext for the next backend.
    fn stop_runtime(&self, inner: &mut Inner) -> io::Result<()> {
        let Some(r) = inner.running.take() else {
            return Ok(());
        };
        let vrings = inner.vrings.clone();
        let rt = r.handle.stop_silently().map_err(io::Error::other)?;
        let state = rt.session_state();
        inner.summaries.push(rt.summary());
        // Decisions still waiting for a guest buffer go out now: the next daemon starts
        // from the ring positions, not from this engine's backlog.
        let mut engine = rt.into_engine();
        if engine.backlog_len() > 0 {
            engine.flush();
        }
        let left = engine.backlog_len();
        if left > 0 {
            // No guest buffer for them: they are dropped; their commitments move with the
            // session and expire in the next daemon after its ack timeout.
            log::warn!("{left} decisions undelivered at stop");
        }
        let rings = engine.ring_state();
        for (v, st) in vrings.iter().zip(&rings) {
            v.set_queue_next_avail(st.next_avail);
            v.set_queue_next_used(st.next_used);
        }
        inner.saved = Some(state);
        log::info!(
            "runtime stopped at rings {:?}",
            rings.iter().map(|r| r.next_avail).collect::<Vec<_>>()
        );
        inner.events.push(BackendEvent::Stopped { rings });
        Ok(())
    }
}

impl VhostUserBackend for MilkBackend {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        self.num_queues_used()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_MAX_SIZE)
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        self.lock().acked_features = features;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::DEVICE_STATE
    }

    fn reset_device(&self) {
        self.shutdown();
        let mut inner = self.lock();
        inner.saved = None;
        inner.loaded = None;
    }

    fn set_event_idx(&self, _enabled: bool) {
        // Taken from the acked features when the runtime starts.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.config_space.as_slice();
        (0..size as usize)
            .map(|i| {
                (offset as usize)
                    .checked_add(i)
                    .and_then(|o| cfg.get(o))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        let mut inner = self.lock();
        if inner.running.is_some() {
            // The runtime holds the map it started with; virtio-milk guests do not hot-plug.
            log::warn!("memory table changed while running: ignored until the next start");
        }
        inner.mem = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let n = self.num_queues_used();
        vec![if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }]
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without it, dropping the daemon waits forever for the worker thread.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, _queue_index: u32) -> io::Result<()> {
        let mut inner = self.lock();
        self.stop_runtime(&mut inner)
    }

    fn handle_event(
        &self,
        _device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut inner = self.lock();
        if let Some(r) = &inner.running {
            // Wake the runtime thread; it finds the work by polling the rings.
            return r.wake.write(1);
        }
        if inner.vrings.is_empty() {
            inner.vrings = vrings.to_vec();
        }
        self.maybe_start(&mut inner, vrings)
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        mut file: File,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "only the STOPPED phase",
            ));
        }
        let mut inner = self.lock();
        if inner.running.is_some() {
            return Err(io::Error::other("rings still running"));
        }
        let t = match direction {
            VhostTransferStateDirection::SAVE => {
                let blob = match &inner.saved {
                    Some(s) => state::encode(s),
                    None => return Err(io::Error::other("no stopped session to save")),
                };
                Transfer::Save(std::thread::spawn(move || file.write_all(&blob)))
            }
            VhostTransferStateDirection::LOAD => Transfer::Load(std::thread::spawn(move || {
                let mut v = Vec::new();
                // Bounded: a task table of MAX_TASKS entries is far below 256 MiB.
                (&mut file).take(256 << 20).read_to_end(&mut v)?;
                Ok(v)
            })),
        };
        inner.transfer = Some(t);
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        let mut inner = self.lock();
        match inner.transfer.take() {
            None => Ok(()),
            Some(Transfer::Save(t)) => t
                .join()
                .map_err(|_| io::Error::other("state writer panicked"))?,
            Some(Transfer::Load(t)) => {
                let blob = t
                    .join()
                    .map_err(|_| io::Error::other("state reader panicked"))??;
                let s = state::decode(&blob).map_err(io::Error::other)?;
                if s.view.cpus.len() != self.cfg.num_cpus as usize {
                    return Err(io::Error::other(format!(
                        "state for {} cpus, daemon serves {}",
                        s.view.cpus.len(),
                        self.cfg.num_cpus
                    )));
                }
                log::info!(
                    "loaded session {:#x} with {} tasks",
                    s.session_id,
                    s.view.tasks.len()
                );
                inner.loaded = Some(s);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configuration_is_refused() {
        let cfg = |n, p: &str| BackendConfig {
            num_cpus: n,
            policy: p.into(),
            runtime: RuntimeConfig::default(),
        };
        assert!(matches!(
            MilkBackend::new(cfg(0, "fifo")),
            Err(BackendError::CpuCount(0))
        ));
        assert!(matches!(
            MilkBackend::new(cfg(33, "fifo")),
            Err(BackendError::CpuCount(33))
        ));
        assert!(matches!(
            MilkBackend::new(cfg(2, "nope")),
            Err(BackendError::UnknownPolicy(_))
        ));
        let b = MilkBackend::new(cfg(2, "fifo")).unwrap();
        assert_eq!(b.num_queues(), 4);
        assert_eq!(b.queues_per_thread(), vec![0b1111]);
        assert!(b.exit_event(0).is_some(), "dropping the daemon needs it");
        let c = b.get_config(0, 4);
        assert_eq!(u32::from_le_bytes(c[..4].try_into().unwrap()), 2);
        assert_eq!(
            b.get_config(u32::MAX, 2),
            vec![0, 0],
            "past the end reads 0"
        );
    }
}
