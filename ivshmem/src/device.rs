//! The device side of the register file: publishes what the device offers and
//! processes the driver's requests (`docs/transport-ivshmem.md`, "Register
//! file").
//!
//! Every value read from the register file is guest controlled. The device
//! keeps its own copy of everything it published (features, queue maxima,
//! config) and of what it accepted, so a driver scribbling over device fields
//! changes nothing; anything invalid sets DEVICE_NEEDS_RESET, after which only
//! a reset (status 0) is honoured.

use vmm_sys_util::eventfd::EventFd;

use crate::backend::{Activation, ActiveQueue, Backend, Interrupts, QueueConfig};
use crate::guest_ram::GuestRam;
use crate::regs::{status as st, QueueSlot, Regs, CONFIG_SIZE, MAGIC, MAX_QUEUES, VERSION};

/// Status bits a driver may set.
const DRIVER_BITS: u32 =
    st::ACKNOWLEDGE | st::DRIVER | st::DRIVER_OK | st::FEATURES_OK | st::FAILED;

/// Descriptor table alignment (virtio 1.2, 2.7.2).
const DESC_ALIGN: u64 = 16;
/// Available ring alignment.
const DRIVER_ALIGN: u64 = 2;
/// Used ring alignment.
const DEVICE_ALIGN: u64 = 4;

/// What the device offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// virtio device ID.
    pub device_id: u32,
    /// virtio vendor ID (published as `vendor_id`).
    pub vendor_id: u32,
    /// Offered feature bits.
    pub features: u64,
    /// Device config space (at most [`CONFIG_SIZE`] bytes).
    pub config: Vec<u8>,
    /// Number of queues (1..=[`MAX_QUEUES`]).
    pub num_queues: u16,
    /// Largest queue size (power of two, at most 32768), published as every
    /// queue's `num_max`.
    pub queue_max: u16,
}

/// An invalid [`DeviceInfo`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceInfoError {
    /// `num_queues` is 0 or above [`MAX_QUEUES`].
    #[error("num_queues must be 1..={MAX_QUEUES}, got {0}")]
    NumQueues(u16),
    /// `queue_max` is not a power of two in 1..=32768.
    #[error("queue_max must be a power of two up to 32768, got {0}")]
    QueueMax(u16),
    /// The config space does not fit.
    #[error("config is {0} bytes, at most {CONFIG_SIZE} fit")]
    ConfigSize(usize),
}

impl DeviceInfo {
    /// Checks the values before anything is published.
    pub fn validate(&self) -> Result<(), DeviceInfoError> {
        if self.num_queues == 0 || usize::from(self.num_queues) > MAX_QUEUES {
            return Err(DeviceInfoError::NumQueues(self.num_queues));
        }
        if !self.queue_max.is_power_of_two() {
            return Err(DeviceInfoError::QueueMax(self.queue_max));
        }
        if self.config.len() > CONFIG_SIZE {
            return Err(DeviceInfoError::ConfigSize(self.config.len()));
        }
        Ok(())
    }

    /// ivshmem vectors the device needs: one for requests/config plus one per queue.
    pub fn vectors(&self) -> u16 {
        1 + self.num_queues
    }
}

/// Why a request was refused with DEVICE_NEEDS_RESET.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Status has bits no driver may set.
    #[error("status {0:#x} has bits a driver may not set")]
    StatusBits(u32),
    /// The driver cleared status bits without a reset.
    #[error("status went from {old:#x} to {new:#x} without a reset")]
    StatusCleared {
        /// Before.
        old: u32,
        /// After.
        new: u32,
    },
    /// DRIVER_OK without accepted features.
    #[error("DRIVER_OK before FEATURES_OK")]
    DriverOkEarly,
    /// A queue was made ready before features were accepted.
    #[error("queue {0} made ready before FEATURES_OK")]
    QueueEarly(usize),
    /// `ready` is neither 0 nor 1.
    #[error("queue {0} ready={1}")]
    Ready(usize, u16),
    /// A queue the device does not have was made ready.
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    /// Queue size is not a power of two within `num_max`.
    #[error("queue {0} size {1} is not a power of two within the maximum")]
    QueueSize(usize, u16),
    /// A ring is misaligned or not inside guest RAM.
    #[error("queue {0} {1} ring at {2:#x} is misaligned or outside guest RAM")]
    Ring(usize, &'static str, u64),
    /// A ready queue's fields changed.
    #[error("queue {0} changed while ready")]
    QueueChanged(usize),
    /// A queue was disabled while the device runs.
    #[error("queue {0} disabled while the device runs")]
    QueueDisabledLive(usize),
    /// The backend refused to start.
    #[error("backend: {0}")]
    Backend(String),
}

/// What one request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Status 0: the device reset.
    Reset,
    /// FEATURES_OK was refused (the driver asked for features not offered).
    FeaturesRefused(u64),
    /// Fields accepted (features, queues); nothing started.
    Accepted,
    /// DRIVER_OK: the backend was activated with this many queues.
    Activated(usize),
    /// The driver set FAILED; the backend (if running) was stopped.
    DriverFailed,
    /// The request was invalid: DEVICE_NEEDS_RESET is now set.
    NeedsReset(Invalid),
    /// The device already needs a reset; the request was ignored.
    Ignored,
}

/// Request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Requests processed (acknowledged).
    pub requests: u64,
    /// Resets by the driver.
    pub resets: u64,
    /// FEATURES_OK refusals.
    pub features_refused: u64,
    /// Backend activations.
    pub activations: u64,
    /// Requests that set DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
    /// Requests ignored while the device needed a reset.
    pub ignored: u64,
}

/// The QEMU side of one connection: the host's kick eventfd of every queue
/// and the guest's interrupt eventfds.
#[derive(Debug)]
pub struct Session {
    /// `kicks[n]` is readable when the driver rings queue `n`'s doorbell.
    pub kicks: Vec<EventFd>,
    /// The guest's MSI-X vectors.
    pub interrupts: Interrupts,
}

#[derive(Debug, Default)]
struct DriverState {
    /// Status as the device last left it.
    status: u32,
    /// Accepted features (valid once FEATURES_OK is in `status`).
    features: u64,
    /// Queues the driver made ready, validated.
    queues: Vec<Option<QueueConfig>>,
    /// The backend runs.
    live: bool,
    /// DEVICE_NEEDS_RESET is set.
    broken: bool,
}

/// The device side of the transport: register file + driver state + backend.
pub struct Device<B: Backend> {
    info: DeviceInfo,
    host_peer: u16,
    regs: Regs,
    ram: GuestRam,
    backend: B,
    state: DriverState,
    session: Option<Session>,
    stats: DeviceStats,
}

impl<B: Backend> Device<B> {
    /// Publishes `info` in the register file (with `host_peer` as the ivshmem
    /// ID the driver rings) and waits for requests.
    pub fn new(
        info: DeviceInfo,
        host_peer: u16,
        regs: Regs,
        ram: GuestRam,
        backend: B,
    ) -> Result<Self, DeviceInfoError> {
        info.validate()?;
        let d = Device {
            state: DriverState {
                queues: vec![None; usize::from(info.num_queues)],
                ..Default::default()
            },
            info,
            host_peer,
            regs,
            ram,
            backend,
            session: None,
            stats: DeviceStats::default(),
        };
        d.publish();
        Ok(d)
    }

    /// Clears the register file and writes the device fields: the state a
    /// driver finds after a reset or when a guest connects.
    fn publish(&self) {
        let r = &self.regs;
        r.clear();
        r.set_version(VERSION);
        r.set_device_id(self.info.device_id);
        r.set_vendor_id(self.info.vendor_id);
        r.set_device_features(self.info.features);
        r.set_num_queues(u32::from(self.info.num_queues));
        r.set_host_peer(u32::from(self.host_peer));
        r.set_config_size(self.info.config.len() as u32);
        r.write_config(&self.info.config);
        for n in 0..usize::from(self.info.num_queues) {
            r.set_queue(
                n,
                &QueueSlot {
                    num_max: self.info.queue_max,
                    ..Default::default()
                },
            );
        }
        // Last: a driver seeing the magic sees everything above.
        r.set_magic(MAGIC);
    }

    /// The register file.
    pub fn regs(&self) -> &Regs {
        &self.regs
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// What the device offers.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Request counters.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// True while the backend runs.
    pub fn is_live(&self) -> bool {
        self.state.live
    }

    /// A guest connected: from now on requests can activate the backend with
    /// these eventfds. Starts from a freshly published register file.
    pub fn connect(&mut self, session: Session) {
        self.stop_backend();
        self.reset_state();
        self.publish();
        self.session = Some(session);
    }

    /// The guest went away: stop the backend and republish.
    pub fn disconnect(&mut self) {
        self.stop_backend();
        self.reset_state();
        self.publish();
        self.session = None;
    }

    fn stop_backend(&mut self) {
        if self.state.live {
            self.backend.reset();
            self.state.live = false;
        }
    }

    fn reset_state(&mut self) {
        self.state = DriverState {
            queues: vec![None; usize::from(self.info.num_queues)],
            ..Default::default()
        };
    }

    /// Processes one request (the driver rang doorbell vector 0) and
    /// acknowledges it: `ack_seq = req_seq` as read before processing.
    pub fn handle_request(&mut self) -> RequestOutcome {
        let seq = self.regs.req_seq();
        let out = self.process();
        self.stats.requests += 1;
        match &out {
            RequestOutcome::Reset => self.stats.resets += 1,
            RequestOutcome::FeaturesRefused(_) => self.stats.features_refused += 1,
            RequestOutcome::Activated(_) => self.stats.activations += 1,
            RequestOutcome::NeedsReset(why) => {
                self.stats.needs_reset += 1;
                log::warn!("virtio-ivshmem: invalid request {seq}: {why}; device needs reset");
            }
            RequestOutcome::Ignored => self.stats.ignored += 1,
            _ => {}
        }
        log::debug!("virtio-ivshmem: request {seq}: {out:?}");
        self.regs.set_ack_seq(seq);
        out
    }

    fn process(&mut self) -> RequestOutcome {
        let status = self.regs.status();
        if status == 0 {
            self.stop_backend();
            self.reset_state();
            self.publish();
            return RequestOutcome::Reset;
        }
        if self.state.broken {
            // Keep the bit visible whatever the driver wrote.
            self.regs
                .set_status(self.state.status | st::DEVICE_NEEDS_RESET);
            return RequestOutcome::Ignored;
        }
        match self.apply(status) {
            Ok(out) => out,
            Err(why) => {
                self.stop_backend();
                self.state.broken = true;
                self.state.status = status | st::DEVICE_NEEDS_RESET;
                self.regs.set_status(self.state.status);
                if let Some(s) = &self.session {
                    // virtio: a device that sets DEVICE_NEEDS_RESET notifies a
                    // configuration change.
                    if let Err(e) = s.interrupts.signal_config() {
                        log::warn!("virtio-ivshmem: config interrupt: {e}");
                    }
                }
                RequestOutcome::NeedsReset(why)
            }
        }
    }

    fn apply(&mut self, mut status: u32) -> Result<RequestOutcome, Invalid> {
        let old = self.state.status;
        if status & !DRIVER_BITS != 0 {
            return Err(Invalid::StatusBits(status));
        }
        if old & !status != 0 {
            return Err(Invalid::StatusCleared { old, new: status });
        }
        let newly = status & !old;

        if newly & st::FAILED != 0 {
            self.stop_backend();
            self.state.status = status;
            return Ok(RequestOutcome::DriverFailed);
        }

        if newly & st::FEATURES_OK != 0 {
            let wanted = self.regs.driver_features();
            let extra = wanted & !self.info.features;
            if extra != 0 {
                status &= !st::FEATURES_OK;
                self.regs.set_status(status);
                self.state.status = status;
                log::info!("virtio-ivshmem: refusing features {extra:#x}");
                return Ok(RequestOutcome::FeaturesRefused(extra));
            }
            self.state.features = wanted;
        }

        self.apply_queues(status)?;

        if newly & st::DRIVER_OK != 0 {
            if status & st::FEATURES_OK == 0 {
                return Err(Invalid::DriverOkEarly);
            }
            let n = self.activate()?;
            self.state.status = status;
            return Ok(RequestOutcome::Activated(n));
        }
        self.state.status = status;
        Ok(RequestOutcome::Accepted)
    }

    fn apply_queues(&mut self, status: u32) -> Result<(), Invalid> {
        for n in 0..MAX_QUEUES {
            let Some(slot) = self.regs.queue(n) else {
                break;
            };
            let Some(recorded) = self.state.queues.get(n).copied() else {
                if slot.ready != 0 {
                    return Err(Invalid::NoSuchQueue(n));
                }
                continue;
            };
            match (recorded, slot.ready) {
                (None, 0) => {}
                (None, 1) => {
                    if status & st::FEATURES_OK == 0 {
                        return Err(Invalid::QueueEarly(n));
                    }
                    let cfg = self.validate_queue(n, &slot)?;
                    self.state.queues[n] = Some(cfg);
                }
                (Some(cfg), 1) => {
                    let now = QueueConfig {
                        size: slot.num,
                        desc: slot.desc,
                        driver: slot.driver,
                        device: slot.device,
                    };
                    if now != cfg {
                        return Err(Invalid::QueueChanged(n));
                    }
                }
                (Some(_), 0) => {
                    if self.state.live {
                        return Err(Invalid::QueueDisabledLive(n));
                    }
                    self.state.queues[n] = None;
                }
                (_, r) => return Err(Invalid::Ready(n, r)),
            }
        }
        Ok(())
    }

    fn validate_queue(&self, n: usize, s: &QueueSlot) -> Result<QueueConfig, Invalid> {
        if !s.num.is_power_of_two() || s.num > self.info.queue_max {
            return Err(Invalid::QueueSize(n, s.num));
        }
        let num = u64::from(s.num);
        let rings = [
            ("descriptor", s.desc, DESC_ALIGN, 16 * num),
            ("driver", s.driver, DRIVER_ALIGN, 6 + 2 * num),
            ("device", s.device, DEVICE_ALIGN, 6 + 8 * num),
        ];
        for (name, addr, align, len) in rings {
            if !addr.is_multiple_of(align) || !self.ram.contains(addr, len) {
                return Err(Invalid::Ring(n, name, addr));
            }
        }
        Ok(QueueConfig {
            size: s.num,
            desc: s.desc,
            driver: s.driver,
            device: s.device,
        })
    }

    fn activate(&mut self) -> Result<usize, Invalid> {
        let Some(session) = &self.session else {
            return Err(Invalid::Backend("no guest connected".into()));
        };
        let mut queues = Vec::new();
        for (i, q) in self.state.queues.iter().enumerate() {
            let Some(cfg) = q else { continue };
            let kick = session
                .kicks
                .get(i)
                .ok_or_else(|| Invalid::Backend(format!("no kick eventfd for queue {i}")))?
                .try_clone()
                .map_err(|e| Invalid::Backend(format!("kick eventfd: {e}")))?;
            queues.push(ActiveQueue {
                index: i as u16,
                config: *cfg,
                kick,
            });
        }
        let n = queues.len();
        let a = Activation {
            features: self.state.features,
            memory: self.ram.memory().clone(),
            queues,
            interrupts: session.interrupts.clone(),
        };
        self.backend
            .activate(a)
            .map_err(|e| Invalid::Backend(e.to_string()))?;
        self.state.live = true;
        log::info!(
            "virtio-ivshmem: DRIVER_OK, features {:#x}, {n} queues live",
            self.state.features
        );
        Ok(n)
    }
}

impl<B: Backend> Drop for Device<B> {
    fn drop(&mut self) {
        self.stop_backend();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::echo::{EchoBackend, EchoEvent, EchoLog};
    use crate::shm::{SharedMem, SHM_SIZE};
    use std::sync::Arc;
    use std::time::Duration;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const RAM: u64 = 4 << 20;
    const F_A: u64 = 1 << 0;
    const F_VERSION_1: u64 = 1 << 32;

    struct Rig {
        dev: Device<EchoBackend>,
        log: EchoLog,
        /// The driver's own mapping of the shared memory.
        drv: Regs,
        /// Host-side ends of the queue kick eventfds (what the doorbell writes).
        doorbell: Vec<EventFd>,
        /// Test-side ends of the guest interrupt eventfds.
        irq: Vec<EventFd>,
        _dir: tempfile::TempDir,
    }

    fn info() -> DeviceInfo {
        DeviceInfo {
            device_id: 0x2a,
            vendor_id: 0x1af4,
            features: F_A | F_VERSION_1,
            config: vec![7, 8, 9],
            num_queues: 2,
            queue_max: 256,
        }
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::create(&dir.path().join("ram"), RAM).unwrap();
        let shm = Arc::new(SharedMem::create(c"t", SHM_SIZE).unwrap());
        let drv_map = SharedMem::map(shm.file().try_clone().unwrap(), SHM_SIZE).unwrap();
        let drv = Regs::new(Arc::new(drv_map)).unwrap();
        let (backend, log) = EchoBackend::new();
        let mut dev = Device::new(info(), 0, Regs::new(shm).unwrap(), ram, backend).unwrap();
        let kicks: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let doorbell = kicks.iter().map(|k| k.try_clone().unwrap()).collect();
        let irqs: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let irq = irqs.iter().map(|k| k.try_clone().unwrap()).collect();
        dev.connect(Session {
            kicks,
            interrupts: Interrupts::new(irqs),
        });
        Rig {
            dev,
            log,
            drv,
            doorbell,
            irq,
            _dir: dir,
        }
    }

    impl Rig {
        /// The driver's request: bump req_seq, let the device process, check the ack.
        fn request(&mut self) -> RequestOutcome {
            let seq = self.drv.req_seq().wrapping_add(1);
            self.drv.set_req_seq(seq);
            let out = self.dev.handle_request();
            assert_eq!(self.drv.ack_seq(), seq, "request not acknowledged");
            out
        }

        fn set_status(&mut self, s: u32) -> RequestOutcome {
            self.drv.set_status(s);
            self.request()
        }

        fn place_queue(&self, n: usize, num: u16, base: u64) {
            let num_max = self.drv.queue(n).unwrap().num_max;
            self.drv.set_queue(
                n,
                &QueueSlot {
                    num_max,
                    num,
                    ready: 1,
                    desc: base,
                    driver: base.wrapping_add(0x1000),
                    device: base.wrapping_add(0x2000),
                },
            );
        }

        /// ACK|DRIVER, features, FEATURES_OK: a driver ready to set up queues.
        fn negotiate(&mut self, features: u64) -> RequestOutcome {
            assert_eq!(
                self.set_status(st::ACKNOWLEDGE | st::DRIVER),
                RequestOutcome::Accepted
            );
            self.drv.set_driver_features(features);
            self.set_status(st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK)
        }
    }

    type Placement = Box<dyn Fn(&Rig)>;

    const NEGOTIATED: u32 = st::ACKNOWLEDGE | st::DRIVER | st::FEATURES_OK;

    #[test]
    fn publishes_the_device_before_any_driver() {
        let r = rig();
        let d = &r.drv;
        assert_eq!(d.magic(), MAGIC);
        assert_eq!(d.version(), VERSION);
        assert_eq!(d.device_id(), 0x2a);
        assert_eq!(d.vendor_id(), 0x1af4);
        assert_eq!(d.device_features(), F_A | F_VERSION_1);
        assert_eq!(d.num_queues(), 2);
        assert_eq!(d.host_peer(), 0);
        assert_eq!(d.config_size(), 3);
        assert_eq!(&d.config()[..4], &[7, 8, 9, 0]);
        assert_eq!(d.queue(0).unwrap().num_max, 256);
        assert_eq!(d.queue(1).unwrap().num_max, 256);
        assert_eq!(d.queue(2).unwrap().num_max, 0, "no third queue");
        assert_eq!(d.status(), 0);
    }

    #[test]
    fn full_bring_up_activates_the_backend_with_the_ready_queues() {
        let mut r = rig();
        assert_eq!(r.negotiate(F_VERSION_1), RequestOutcome::Accepted);
        assert_eq!(r.drv.status(), NEGOTIATED);
        r.place_queue(0, 64, 0x10_0000);
        assert_eq!(r.request(), RequestOutcome::Accepted);
        assert_eq!(
            r.set_status(NEGOTIATED | st::DRIVER_OK),
            RequestOutcome::Activated(1)
        );
        assert!(r.dev.is_live());
        assert_eq!(
            r.log.events()[0],
            EchoEvent::Activated {
                features: F_VERSION_1,
                queues: vec![(
                    0,
                    QueueConfig {
                        size: 64,
                        desc: 0x10_0000,
                        driver: 0x10_1000,
                        device: 0x10_2000
                    }
                )]
            }
        );
        // The doorbell of queue 0 reaches the backend, whose interrupt reaches vector 1.
        r.doorbell[0].write(1).unwrap();
        assert!(r
            .log
            .wait_for(Duration::from_secs(5), |e| *e == EchoEvent::Interrupted(0))
            .is_some());
        assert_eq!(r.irq[1].read().unwrap(), 1);
        assert!(r.irq[0].read().is_err() && r.irq[2].read().is_err());
        // Reset stops it and clears the driver's fields.
        assert_eq!(r.set_status(0), RequestOutcome::Reset);
        assert!(!r.dev.is_live());
        assert_eq!(r.log.events().last(), Some(&EchoEvent::Reset));
        assert_eq!(r.drv.driver_features(), 0);
        assert_eq!(r.drv.queue(0).unwrap().ready, 0);
        assert_eq!(r.drv.queue(0).unwrap().num_max, 256);
        let s = r.dev.stats();
        assert_eq!((s.activations, s.resets, s.needs_reset), (1, 1, 0));
    }

    #[test]
    fn features_not_offered_are_refused_then_a_subset_is_accepted() {
        let mut r = rig();
        assert_eq!(
            r.negotiate(F_VERSION_1 | (1 << 40)),
            RequestOutcome::FeaturesRefused(1 << 40)
        );
        assert_eq!(r.drv.status(), st::ACKNOWLEDGE | st::DRIVER);
        r.drv.set_driver_features(F_A);
        assert_eq!(r.set_status(NEGOTIATED), RequestOutcome::Accepted);
        assert_eq!(r.drv.status(), NEGOTIATED);
        assert_eq!(r.dev.stats().features_refused, 1);
    }

    #[test]
    fn bad_queues_set_needs_reset() {
        let cases: Vec<(&str, Placement)> = vec![
            (
                "size not a power of two",
                Box::new(|r| r.place_queue(0, 48, 0x10_0000)),
            ),
            ("size zero", Box::new(|r| r.place_queue(0, 0, 0x10_0000))),
            (
                "size above num_max",
                Box::new(|r| r.place_queue(0, 512, 0x10_0000)),
            ),
            (
                "rings outside RAM",
                Box::new(|r| r.place_queue(0, 64, RAM - 0x1000)),
            ),
            (
                "address overflow",
                Box::new(|r| r.place_queue(0, 64, u64::MAX - 0xfff)),
            ),
            (
                "misaligned descriptors",
                Box::new(|r| r.place_queue(0, 64, 0x10_0008)),
            ),
            (
                "queue that does not exist",
                Box::new(|r| r.place_queue(5, 64, 0x10_0000)),
            ),
            (
                "last slot",
                Box::new(|r| r.place_queue(MAX_QUEUES - 1, 64, 0x10_0000)),
            ),
            (
                "ready=2",
                Box::new(|r| {
                    r.place_queue(0, 64, 0x10_0000);
                    r.drv.set_queue_ready(0, 2);
                }),
            ),
        ];
        for (what, place) in cases {
            let mut r = rig();
            r.negotiate(0);
            place(&r);
            let out = r.request();
            assert!(
                matches!(out, RequestOutcome::NeedsReset(_)),
                "{what}: {out:?}"
            );
            assert_eq!(
                r.drv.status(),
                NEGOTIATED | st::DEVICE_NEEDS_RESET,
                "{what}"
            );
            // The device notified a configuration change.
            assert_eq!(r.irq[0].read().unwrap(), 1, "{what}");
            // Broken: DRIVER_OK is ignored, nothing starts.
            assert_eq!(
                r.set_status(NEGOTIATED | st::DRIVER_OK),
                RequestOutcome::Ignored,
                "{what}"
            );
            assert!(!r.dev.is_live());
            assert_eq!(
                r.drv.status() & st::DEVICE_NEEDS_RESET,
                st::DEVICE_NEEDS_RESET
            );
            // A reset recovers.
            assert_eq!(r.set_status(0), RequestOutcome::Reset, "{what}");
            assert_eq!(r.drv.status(), 0);
            assert_eq!(r.negotiate(0), RequestOutcome::Accepted, "{what}");
            assert!(r.log.events().is_empty(), "{what}: backend was touched");
        }
    }

    #[test]
    fn protocol_violations_set_needs_reset() {
        // DRIVER_OK before FEATURES_OK.
        let mut r = rig();
        r.set_status(st::ACKNOWLEDGE | st::DRIVER);
        assert_eq!(
            r.set_status(st::ACKNOWLEDGE | st::DRIVER | st::DRIVER_OK),
            RequestOutcome::NeedsReset(Invalid::DriverOkEarly)
        );
        // A queue before FEATURES_OK.
        let mut r = rig();
        r.set_status(st::ACKNOWLEDGE | st::DRIVER);
        r.place_queue(0, 64, 0x10_0000);
        assert_eq!(
            r.request(),
            RequestOutcome::NeedsReset(Invalid::QueueEarly(0))
        );
        // Unknown status bits, including DEVICE_NEEDS_RESET itself.
        for bits in [0x100, 0x8000_0000, st::DEVICE_NEEDS_RESET] {
            let mut r = rig();
            assert!(matches!(
                r.set_status(st::ACKNOWLEDGE | bits),
                RequestOutcome::NeedsReset(Invalid::StatusBits(_))
            ));
        }
        // Clearing bits without a reset.
        let mut r = rig();
        r.negotiate(0);
        assert!(matches!(
            r.set_status(st::ACKNOWLEDGE),
            RequestOutcome::NeedsReset(Invalid::StatusCleared { .. })
        ));
        // Changing a ready queue.
        let mut r = rig();
        r.negotiate(0);
        r.place_queue(0, 64, 0x10_0000);
        assert_eq!(r.request(), RequestOutcome::Accepted);
        r.place_queue(0, 64, 0x20_0000);
        assert_eq!(
            r.request(),
            RequestOutcome::NeedsReset(Invalid::QueueChanged(0))
        );
    }

    #[test]
    fn live_device_stops_on_invalid_input_and_on_failed() {
        let mut r = rig();
        r.negotiate(0);
        r.place_queue(0, 64, 0x10_0000);
        r.place_queue(1, 64, 0x20_0000);
        assert_eq!(
            r.set_status(NEGOTIATED | st::DRIVER_OK),
            RequestOutcome::Activated(2)
        );
        r.drv.set_queue_ready(1, 0);
        assert_eq!(
            r.request(),
            RequestOutcome::NeedsReset(Invalid::QueueDisabledLive(1))
        );
        assert!(!r.dev.is_live());
        assert_eq!(r.log.events().last(), Some(&EchoEvent::Reset));

        let mut r = rig();
        r.negotiate(0);
        assert_eq!(
            r.set_status(NEGOTIATED | st::DRIVER_OK),
            RequestOutcome::Activated(0)
        );
        assert_eq!(
            r.set_status(NEGOTIATED | st::DRIVER_OK | st::FAILED),
            RequestOutcome::DriverFailed
        );
        assert!(!r.dev.is_live());
    }

    #[test]
    fn driver_scribbling_on_device_fields_changes_nothing() {
        let mut r = rig();
        r.drv.set_device_features(u64::MAX);
        r.drv.set_num_queues(128);
        for n in 0..MAX_QUEUES {
            let mut q = r.drv.queue(n).unwrap();
            q.num_max = 0x8000;
            r.drv.set_queue(n, &q);
        }
        // Still only the offered features and 2 queues of at most 256.
        assert_eq!(r.negotiate(1 << 7), RequestOutcome::FeaturesRefused(1 << 7));
        r.drv.set_driver_features(0);
        r.set_status(NEGOTIATED);
        r.place_queue(0, 512, 0x10_0000);
        assert!(matches!(
            r.request(),
            RequestOutcome::NeedsReset(Invalid::QueueSize(0, 512))
        ));
        // A reset republishes the device fields.
        r.set_status(0);
        assert_eq!(r.drv.device_features(), F_A | F_VERSION_1);
        assert_eq!(r.drv.num_queues(), 2);
        assert_eq!(r.drv.queue(0).unwrap().num_max, 256);
        assert_eq!(r.drv.queue(2).unwrap().num_max, 0);
    }

    #[test]
    fn garbage_register_files_never_panic() {
        // A cheap deterministic generator; every request on random contents must
        // be acknowledged and leave the device consistent.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut r = rig();
        for i in 0..2000 {
            let off = (next() as usize % (crate::regs::REGS_SIZE / 8)) * 8;
            // SAFETY: off + 8 <= REGS_SIZE, inside the driver's live mapping.
            unsafe {
                std::sync::atomic::AtomicU64::from_ptr(r.drv.shm().as_ptr().add(off).cast())
                    .store(next(), std::sync::atomic::Ordering::Release)
            };
            if i % 3 == 0 {
                r.drv.set_status(next() as u32 & 0xff);
            }
            r.request();
            if r.dev.is_live() {
                assert_eq!(r.drv.status() & st::DEVICE_NEEDS_RESET, 0);
            }
        }
        assert_eq!(r.dev.stats().requests, 2000);
    }

    #[test]
    fn activation_without_a_guest_needs_reset() {
        let mut r = rig();
        r.dev.disconnect();
        r.negotiate(0);
        assert!(matches!(
            r.set_status(NEGOTIATED | st::DRIVER_OK),
            RequestOutcome::NeedsReset(Invalid::Backend(_))
        ));
    }

    #[test]
    fn bad_device_info_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ram = GuestRam::create(&dir.path().join("ram"), RAM).unwrap();
        let shm = Arc::new(SharedMem::create(c"t", SHM_SIZE).unwrap());
        let regs = Regs::new(shm).unwrap();
        for (bad, want) in [
            (
                DeviceInfo {
                    num_queues: 0,
                    ..info()
                },
                DeviceInfoError::NumQueues(0),
            ),
            (
                DeviceInfo {
                    num_queues: 129,
                    ..info()
                },
                DeviceInfoError::NumQueues(129),
            ),
            (
                DeviceInfo {
                    queue_max: 100,
                    ..info()
                },
                DeviceInfoError::QueueMax(100),
            ),
            (
                DeviceInfo {
                    config: vec![0; 193],
                    ..info()
                },
                DeviceInfoError::ConfigSize(193),
            ),
        ] {
            let e = Device::new(bad, 0, regs.clone(), ram.clone(), EchoBackend::new().0)
                .err()
                .unwrap();
            assert_eq!(e, want);
        }
    }
}
