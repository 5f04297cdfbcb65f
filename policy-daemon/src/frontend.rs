//! The vhost-user frontend side of virtio-milk, shared by milk-vmm's two engines.
//!
//! The VMM keeps the virtio transport (registers, feature negotiation, queue addresses) and
//! hands the rings to a `milk-policy` daemon: guest RAM by file descriptor
//! (`SET_MEM_TABLE`), each ring's size, addresses and position, its kick eventfd (what the
//! driver's notification writes) and its call eventfd (what the daemon writes for used
//! buffers). [`Link`] is one connection; [`MilkFrontend`] owns the current link and a
//! supervisor thread that:
//!
//! - notices when the daemon hangs up (the socket's `POLLRDHUP`, e.g. after `kill -9`),
//!   tells the guest GOODBYE itself so it falls back to CFS at once rather than after its
//!   500 ms silence watchdog, and
//! - reconnects to the socket path every [`RECONNECT_PERIOD`] until a daemon answers, then
//!   starts the rings there from the positions recovered from guest memory (the used index:
//!   virtio-milk completes every chain in order as soon as it pops it). The new daemon starts
//!   a new session; the guest re-enables sched_ext on its HELLO.
//!
//! [`MilkFrontend::swap`] is the planned hand-over: connect and negotiate with the new
//! daemon first, then stop the old one's rings (`GET_VRING_BASE`, positions), fetch its
//! session (`SET_DEVICE_STATE_FD` SAVE), load it into the new one (LOAD), start the rings
//! there at the same positions and drop the old link. The guest keeps its session and stays
//! on sched_ext; the blackout is the time between the two.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags,
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_milk::metrics::monotonic_ns;
use virtio_milk::protocol::{pack_name, Config, Message, SessionInfo};
use virtio_milk::queue::{EngineConfig, QueueConfig, QueueEngine, RingState};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How often the supervisor tries to reach a daemon after a hang-up.
pub const RECONNECT_PERIOD: Duration = Duration::from_millis(20);

/// GOODBYE reason the frontend sends when the daemon hung up.
pub const GOODBYE_BACKEND_GONE: u64 = 3;

const PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::DEVICE_STATE);

/// Frontend errors.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// Could not reach the daemon's socket.
    #[error("cannot connect to policy daemon at {path}: {err}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: io::Error,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {what}: {err}")]
    Protocol {
        /// The request.
        what: &'static str,
        /// Cause.
        err: vhost::Error,
    },
    /// The daemon lacks something virtio-milk needs.
    #[error("policy daemon unusable: {0}")]
    Incompatible(String),
    /// Guest memory is not shareable (a region without a file).
    #[error("guest memory region at {0:#x} has no file to share")]
    Memory(u64),
    /// Local I/O (pipes, eventfds, threads).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// No daemon connected right now.
    #[error("no policy daemon connected")]
    NotConnected,
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |err| FrontendError::Protocol { what, err }
}

/// One ring as the driver set it up, with its notification eventfds.
pub struct RingSetup {
    /// Size and guest addresses.
    pub cfg: QueueConfig,
    /// Written on every driver notification for this ring (KVM ioeventfd, ivshmem vector).
    pub kick: EventFd,
    /// Written by the daemon when the ring has used buffers (relayed or wired to the guest
    /// interrupt).
    pub call: EventFd,
}

/// What the daemon gets: guest RAM (every region must have a file offset), the features the
/// driver accepted, and the rings in queue index order.
pub struct DeviceSetup {
    /// Guest RAM.
    pub mem: GuestMemoryMmap<()>,
    /// Virtio features the driver accepted.
    pub acked_features: u64,
    /// Rings, queue index order (2c event, 2c+1 decision).
    pub rings: Vec<RingSetup>,
}

impl DeviceSetup {
    fn num_cpus(&self) -> u32 {
        (self.rings.len() / 2) as u32
    }

    /// Ring positions recovered from guest memory: the used index of each ring (see the
    /// module docs). Unreadable rings read as 0.
    pub fn ring_bases_from_memory(&self) -> Vec<u16> {
        self.rings
            .iter()
            .map(|r| {
                self.mem
                    .read_obj::<u16>(GuestAddress(r.cfg.used_ring + 2))
                    .map(u16::from_le)
                    .unwrap_or(0)
            })
            .collect()
    }

    fn host_addr(&self, gpa: u64) -> Result<u64, FrontendError> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|_| FrontendError::Memory(gpa))
    }

    fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|_| FrontendError::Memory(r.start_addr().raw_value()))
            })
            .collect()
    }
}

/// One connection to a `milk-policy` daemon.
pub struct Link {
    fe: Frontend,
    path: PathBuf,
    config: Vec<u8>,
    features: u64,
}

impl Link {
    /// Connect to the daemon at `path` and negotiate (owner, features, protocol features,
    /// queue count, config space). One attempt.
    pub fn connect(path: &Path, num_queues: usize) -> Result<Link, FrontendError> {
        let sock = UnixStream::connect(path).map_err(|err| FrontendError::Connect {
            path: path.to_owned(),
            err,
        })?;
        let mut fe = Frontend::from_stream(sock, num_queues as u64);
        fe.set_owner().map_err(proto("SET_OWNER"))?;
        let features = fe.get_features().map_err(proto("GET_FEATURES"))?;
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(FrontendError::Incompatible("no protocol features".into()));
        }
        let pf = fe
            .get_protocol_features()
            .map_err(proto("GET_PROTOCOL_FEATURES"))?;
        if !pf.contains(PROTOCOL) {
            return Err(FrontendError::Incompatible(format!(
                "protocol features {pf:?} lack {:?}",
                PROTOCOL - pf
            )));
        }
        fe.set_protocol_features(PROTOCOL)
            .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        // Every request from now on is acknowledged: errors show up where they happen.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        let nq = fe.get_queue_num().map_err(proto("GET_QUEUE_NUM"))?;
        if nq < num_queues as u64 {
            return Err(FrontendError::Incompatible(format!(
                "daemon serves {} cpus, the guest has {}",
                nq / 2,
                num_queues / 2
            )));
        }
        let size = std::mem::size_of::<Config>();
        let (_, config) = fe
            .get_config(
                0,
                size as u32,
                VhostUserConfigFlags::empty(),
                &vec![0u8; size],
            )
            .map_err(proto("GET_CONFIG"))?;
        Ok(Link {
            fe,
            path: path.to_owned(),
            config,
            features: features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        })
    }

    /// The daemon's socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtio features the daemon offers (without vhost-user's own bit).
    pub fn device_features(&self) -> u64 {
        self.features
    }

    /// The daemon's CPU count (from its config space).
    pub fn num_cpus(&self) -> Option<u32> {
        Config::from_slice(&self.config).map(|c| u32::from(c.num_cpus))
    }

    /// The daemon's virtio-milk config space.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Hand the rings over and start them at `bases`. With `state`, the daemon first loads
    /// that session (planned swap); without, it starts a new session.
    pub fn start(
        &mut self,
        dev: &DeviceSetup,
        bases: &[u16],
        state: Option<&[u8]>,
    ) -> Result<(), FrontendError> {
        self.fe
            .set_features(dev.acked_features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .map_err(proto("SET_FEATURES"))?;
        let regions = dev.regions()?;
        self.fe
            .set_mem_table(&regions)
            .map_err(proto("SET_MEM_TABLE"))?;
        if let Some(blob) = state {
            self.load_state(blob)?;
        }
        for (i, r) in dev.rings.iter().enumerate() {
            let data = VringConfigData {
                queue_max_size: r.cfg.size,
                queue_size: r.cfg.size,
                flags: 0,
                desc_table_addr: dev.host_addr(r.cfg.desc_table)?,
                used_ring_addr: dev.host_addr(r.cfg.used_ring)?,
                avail_ring_addr: dev.host_addr(r.cfg.avail_ring)?,
                log_addr: None,
            };
            self.fe
                .set_vring_num(i, r.cfg.size)
                .map_err(proto("SET_VRING_NUM"))?;
            self.fe
                .set_vring_addr(i, &data)
                .map_err(proto("SET_VRING_ADDR"))?;
            self.fe
                .set_vring_base(i, bases.get(i).copied().unwrap_or(0))
                .map_err(proto("SET_VRING_BASE"))?;
            self.fe
                .set_vring_kick(i, &r.kick)
                .map_err(proto("SET_VRING_KICK"))?;
            self.fe
                .set_vring_call(i, &r.call)
                .map_err(proto("SET_VRING_CALL"))?;
        }
        for i in 0..dev.rings.len() {
            self.fe
                .set_vring_enable(i, true)
                .map_err(proto("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    /// Stop every ring (`GET_VRING_BASE`); returns their positions.
    pub fn stop(&mut self, num_queues: usize) -> Result<Vec<u16>, FrontendError> {
        (0..num_queues)
            .map(|i| {
                self.fe
                    .get_vring_base(i)
                    .map(|b| b as u16)
                    .map_err(proto("GET_VRING_BASE"))
            })
            .collect()
    }

    /// The stopped daemon's session (`SET_DEVICE_STATE_FD` SAVE, `CHECK_DEVICE_STATE`).
    pub fn save_state(&mut self) -> Result<Vec<u8>, FrontendError> {
        let (mut rd, wr) = pipe()?;
        self.fe
            .set_device_state_fd(
                VhostTransferStateDirection::SAVE,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(wr),
            )
            .map_err(proto("SET_DEVICE_STATE_FD"))?;
        let mut blob = Vec::new();
        (&mut rd).take(256 << 20).read_to_end(&mut blob)?;
        self.fe
            .check_device_state()
            .map_err(proto("CHECK_DEVICE_STATE"))?;
        Ok(blob)
    }

    fn load_state(&mut self, blob: &[u8]) -> Result<(), FrontendError> {
        let (rd, mut wr) = pipe()?;
        self.fe
            .set_device_state_fd(
                VhostTransferStateDirection::LOAD,
                VhostTransferStatePhase::STOPPED,
                OwnedFd::from(rd),
            )
            .map_err(proto("SET_DEVICE_STATE_FD"))?;
        wr.write_all(blob)?;
        drop(wr);
        self.fe
            .check_device_state()
            .map_err(proto("CHECK_DEVICE_STATE"))
    }

    /// The socket's file descriptor (readable/hung up when the daemon goes away).
    pub fn raw_fd(&self) -> RawFd {
        self.fe.as_raw_fd()
    }

    /// Whether the daemon closed its end.
    pub fn hung_up(&self) -> bool {
        poll_hup(self.raw_fd(), None, 0).0
    }
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints the kernel fills in; checked below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nobody else.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// poll `fd` for hang-up and `wake` for input for at most `ms` (-1: forever).
/// Returns (hung up, woken).
fn poll_hup(fd: RawFd, wake: Option<RawFd>, ms: i32) -> (bool, bool) {
    let mut p = [
        libc::pollfd {
            fd,
            events: libc::POLLRDHUP,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.unwrap_or(-1),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `p` is a valid array of two pollfd structs for the whole call (a negative fd
    // is ignored by poll); the kernel only writes `revents`.
    let r = unsafe { libc::poll(p.as_mut_ptr(), 2, ms) };
    if r <= 0 {
        return (false, false);
    }
    let hup = p[0].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL);
    (hup != 0, p[1].revents & libc::POLLIN != 0)
}

/// What happened to the frontend's link, with host monotonic timestamps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendEvent {
    /// Rings started on a daemon (first connection or reconnection).
    Connected {
        /// Socket path.
        path: PathBuf,
        /// When (monotonic ns).
        at_ns: u64,
        /// Ring positions it started from.
        bases: Vec<u16>,
    },
    /// The daemon hung up.
    HungUp {
        /// When it was noticed (monotonic ns).
        at_ns: u64,
        /// Whether a GOODBYE reached the guest's decision queue.
        goodbye: bool,
    },
    /// Planned swap done.
    Swapped {
        /// New socket path.
        path: PathBuf,
        /// Rings stopped on the old daemon until started on the new one.
        blackout: Duration,
        /// Ring positions handed over.
        bases: Vec<u16>,
    },
}

/// Frontend status for `milkctl status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FrontendStatus {
    /// A daemon serves the rings now.
    pub connected: bool,
    /// Socket path of the current (or awaited) daemon.
    pub path: PathBuf,
    /// Hang-ups seen.
    pub hangups: u64,
    /// Reconnections after a hang-up.
    pub reconnects: u64,
    /// Planned swaps done.
    pub swaps: u64,
}

/// Result of a planned swap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwapReport {
    /// Rings stopped on the old daemon until running on the new one.
    pub blackout: Duration,
    /// Connecting and negotiating with the new daemon (before the rings stopped).
    pub prepare: Duration,
    /// Size of the session state handed over.
    pub state_bytes: usize,
    /// Pids of the host's task table handed over, ascending (empty when there was no
    /// daemon to take it from).
    pub pids: Vec<u32>,
    /// Ring positions handed over.
    pub bases: Vec<u16>,
}

struct State {
    dev: DeviceSetup,
    link: Option<Link>,
    path: PathBuf,
    status: FrontendStatus,
    events: Vec<FrontendEvent>,
}

struct Shared {
    state: Mutex<State>,
    wake: EventFd,
    stop: AtomicBool,
    goodbye_on_hangup: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The rings served by a daemon, with crash supervision. See the module docs.
pub struct MilkFrontend {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MilkFrontend {
    /// Connect to the daemon at `path` and start the rings of `dev` there (positions from
    /// guest memory, new session). Fails if no daemon answers.
    pub fn start(path: &Path, dev: DeviceSetup) -> Result<Self, FrontendError> {
        Self::start_with(path, dev, true)
    }

    /// Like [`Self::start`]; `goodbye_on_hangup` false leaves a crashed daemon to the
    /// guest's silence watchdog.
    pub fn start_with(
        path: &Path,
        dev: DeviceSetup,
        goodbye_on_hangup: bool,
    ) -> Result<Self, FrontendError> {
        let link = Link::connect(path, dev.rings.len())?;
        Self::start_on(link, dev, goodbye_on_hangup)
    }

    /// Start the rings of `dev` on an already connected daemon.
    pub fn start_on(
        mut link: Link,
        dev: DeviceSetup,
        goodbye_on_hangup: bool,
    ) -> Result<Self, FrontendError> {
        let path = link.path().to_owned();
        let path = path.as_path();
        check_config(&link, &dev)?;
        let bases = dev.ring_bases_from_memory();
        link.start(&dev, &bases, None)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dev,
                link: Some(link),
                path: path.to_owned(),
                status: FrontendStatus {
                    connected: true,
                    path: path.to_owned(),
                    ..FrontendStatus::default()
                },
                events: vec![FrontendEvent::Connected {
                    path: path.to_owned(),
                    at_ns: monotonic_ns(),
                    bases,
                }],
            }),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            goodbye_on_hangup,
        });
        let s2 = shared.clone();
        let thread = std::thread::Builder::new()
            .name("milk-vhost-sup".into())
            .spawn(move || supervise(&s2))?;
        Ok(MilkFrontend {
            shared,
            thread: Some(thread),
        })
    }

    /// Current status.
    pub fn status(&self) -> FrontendStatus {
        self.shared.lock().status.clone()
    }

    /// Everything that happened so far.
    pub fn events(&self) -> Vec<FrontendEvent> {
        self.shared.lock().events.clone()
    }

    /// Planned swap to the daemon at `path` (see the module docs). When no daemon is
    /// connected (after a hang-up) this connects to `path` with a new session instead, and
    /// the supervisor keeps waiting on `path` from then on. On failure before the rings
    /// stopped, the old daemon keeps serving.
    pub fn swap(&self, path: &Path) -> Result<SwapReport, FrontendError> {
        let t0 = Instant::now();
        let mut st = self.shared.lock();
        let n = st.dev.rings.len();
        let mut new = Link::connect(path, n)?;
        check_config(&new, &st.dev)?;
        // Negotiation done; from here the guest sees no daemon until the new one runs.
        let prepare = t0.elapsed();
        let t1 = Instant::now();
        let (bases, blob) = match st.link.as_mut() {
            Some(old) => {
                let bases = old.stop(n)?;
                let blob = old.save_state()?;
                (bases, Some(blob))
            }
            None => (st.dev.ring_bases_from_memory(), None),
        };
        let res = new.start(&st.dev, &bases, blob.as_deref());
        if let Err(e) = res {
            // The old daemon's rings are stopped: restart them there (same positions, its
            // own session state is still loaded) so the guest keeps its scheduler.
            let State { dev, link, .. } = &mut *st;
            if let (Some(old), Some(b)) = (link.as_mut(), blob.as_deref()) {
                if let Err(e2) = old.start(dev, &bases, Some(b)) {
                    log::error!("swap failed and the old daemon did not restart: {e2}");
                    st.link = None;
                    st.status.connected = false;
                }
            }
            return Err(e);
        }
        let blackout = t1.elapsed();
        let connected = blob.is_some();
        st.link = Some(new);
        st.path = path.to_owned();
        st.status.path = path.to_owned();
        st.status.connected = true;
        let ev = if connected {
            st.status.swaps += 1;
            FrontendEvent::Swapped {
                path: path.to_owned(),
                blackout,
                bases: bases.clone(),
            }
        } else {
            st.status.reconnects += 1;
            FrontendEvent::Connected {
                path: path.to_owned(),
                at_ns: monotonic_ns(),
                bases: bases.clone(),
            }
        };
        st.events.push(ev);
        drop(st);
        let _ = self.shared.wake.write(1);
        log::info!(
            "policy daemon swapped to {}: blackout {blackout:?}",
            path.display()
        );
        Ok(SwapReport {
            blackout,
            prepare,
            state_bytes: blob.as_ref().map_or(0, Vec::len),
            pids: blob
                .as_deref()
                .and_then(|b| crate::state::decode(b).ok())
                .map(|s| {
                    let mut p: Vec<u32> = s.view.tasks.keys().map(|g| g.pid()).collect();
                    p.sort_unstable();
                    p
                })
                .unwrap_or_default(),
            bases,
        })
    }

    /// Stop the rings on the daemon and disconnect (VM end).
    pub fn stop(mut self) {
        drop(self.detach_link());
    }

    /// Stop the supervisor and the rings (device reset) but keep the connection for the
    /// next activation; `None` if no daemon is connected.
    pub fn detach(mut self) -> Option<Link> {
        self.detach_link()
    }

    fn detach_link(&mut self) -> Option<Link> {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = self.shared.lock();
        let n = st.dev.rings.len();
        st.status.connected = false;
        let mut l = st.link.take()?;
        match l.stop(n) {
            Ok(_) => Some(l),
            Err(e) => {
                log::debug!("stopping the daemon's rings: {e}");
                None
            }
        }
    }
}

impl Drop for MilkFrontend {
    fn drop(&mut self) {
        drop(self.detach_link());
    }
}

fn check_config(link: &Link, dev: &DeviceSetup) -> Result<(), FrontendError> {
    let cfg = Config::from_slice(link.config())
        .ok_or_else(|| FrontendError::Incompatible("short config space".into()))?;
    let cpus = u32::from(cfg.num_cpus);
    if cpus != dev.num_cpus() {
        return Err(FrontendError::Incompatible(format!(
            "daemon serves {cpus} cpus, the guest has {}",
            dev.num_cpus()
        )));
    }
    Ok(())
}

fn supervise(sh: &Shared) {
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let fd = sh.lock().link.as_ref().map(Link::raw_fd);
        match fd {
            Some(fd) => {
                let (hup, woken) = poll_hup(fd, Some(sh.wake.as_raw_fd()), 1000);
                if woken {
                    let _ = sh.wake.read();
                }
                if hup {
                    on_hangup(sh, fd);
                }
            }
            None => {
                if try_reconnect(sh) {
                    // Watch the new link at once (a daemon can die right away too).
                    continue;
                }
                let mut p = libc::pollfd {
                    fd: sh.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut p, 1, RECONNECT_PERIOD.as_millis() as i32) };
                if p.revents & libc::POLLIN != 0 {
                    let _ = sh.wake.read();
                }
            }
        }
    }
}

fn on_hangup(sh: &Shared, fd: RawFd) {
    let mut st = sh.lock();
    // The link may have been replaced (swap) while we polled the old one.
    match &st.link {
        Some(l) if l.raw_fd() == fd && l.hung_up() => {}
        _ => return,
    }
    let at_ns = monotonic_ns();
    st.link = None;
    st.status.connected = false;
    st.status.hangups += 1;
    let goodbye = sh.goodbye_on_hangup && send_goodbye(&st.dev);
    log::warn!(
        "policy daemon at {} hung up{}; waiting for a daemon there",
        st.path.display(),
        if goodbye {
            ", told the guest GOODBYE"
        } else {
            ""
        }
    );
    st.events.push(FrontendEvent::HungUp { at_ns, goodbye });
}

/// Returns whether a daemon serves the rings now.
fn try_reconnect(sh: &Shared) -> bool {
    let mut st = sh.lock();
    if st.link.is_some() {
        return true;
    }
    let path = st.path.clone();
    let mut link = match Link::connect(&path, st.dev.rings.len()) {
        Ok(l) => l,
        Err(e) => {
            log::trace!("reconnect: {e}");
            return false;
        }
    };
    let started = check_config(&link, &st.dev).and_then(|()| {
        let bases = st.dev.ring_bases_from_memory();
        link.start(&st.dev, &bases, None).map(|()| bases)
    });
    match started {
        Ok(bases) => {
            log::info!(
                "policy daemon at {} connected, rings at {bases:?}",
                path.display()
            );
            st.link = Some(link);
            st.status.connected = true;
            st.status.reconnects += 1;
            st.events.push(FrontendEvent::Connected {
                path,
                at_ns: monotonic_ns(),
                bases,
            });
            true
        }
        Err(e) => {
            log::warn!("policy daemon at {}: {e}", path.display());
            false
        }
    }
}

/// Write one GOODBYE into CPU 0's decision queue, as the device would, so the guest falls
/// back to its own scheduler now. Only called with no daemon connected (the daemon that
/// owned the rings is gone), so nobody else touches them. Returns whether it was delivered.
fn send_goodbye(dev: &DeviceSetup) -> bool {
    let queues: Vec<QueueConfig> = dev.rings.iter().map(|r| r.cfg).collect();
    let bases = dev.ring_bases_from_memory();
    let calls: Vec<EventFd> = match dev.rings.iter().map(|r| r.call.try_clone()).collect() {
        Ok(c) => c,
        Err(_) => return false,
    };
    let Ok(kick) = EventFd::new(EFD_NONBLOCK) else {
        return false;
    };
    let mut ecfg = EngineConfig::new(dev.num_cpus());
    ecfg.event_idx =
        dev.acked_features & (1 << virtio_milk::protocol::VIRTIO_RING_F_EVENT_IDX) != 0;
    ecfg.max_batch = 1;
    let irq = move |q: u16| -> io::Result<()> {
        match calls.get(usize::from(q)) {
            Some(c) => c.write(1),
            None => Ok(()),
        }
    };
    let mut engine = match QueueEngine::new(dev.mem.clone(), ecfg, &queues, kick, Box::new(irq)) {
        Ok(e) => e,
        Err(e) => {
            log::warn!("cannot reach the guest's rings for GOODBYE: {e}");
            return false;
        }
    };
    let rings: Vec<RingState> = bases
        .iter()
        .map(|&b| RingState {
            next_avail: b,
            next_used: b,
        })
        .collect();
    if let Err(e) = engine.set_ring_state(&rings) {
        log::warn!("guest rings unusable for GOODBYE: {e}");
        return false;
    }
    let bye = Message::Goodbye(SessionInfo {
        cpu: 0,
        num_cpus: dev.num_cpus(),
        heartbeat_ms: 0,
        session_id: 0,
        ts_ns: monotonic_ns(),
        counter: GOODBYE_BACKEND_GONE,
        name: pack_name("milk-vmm"),
        ..SessionInfo::default()
    });
    engine.push_decision(0, bye.encode());
    engine.flush() == 1
}

/// The running frontend of a device, shared between the transport (which starts and stops
/// it) and control paths on other threads (swap, status). Cheap to clone.
#[derive(Clone, Default)]
pub struct FrontendSlot {
    fe: Arc<Mutex<Option<MilkFrontend>>>,
}

impl FrontendSlot {
    fn lock(&self) -> MutexGuard<'_, Option<MilkFrontend>> {
        self.fe.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Planned swap to the daemon listening on `path` (see [`MilkFrontend::swap`]).
    pub fn swap(&self, path: &Path) -> Result<SwapReport, FrontendError> {
        self.lock()
            .as_ref()
            .ok_or(FrontendError::NotConnected)?
            .swap(path)
    }

    /// Status (`None` while the driver has not started the device).
    pub fn status(&self) -> Option<FrontendStatus> {
        self.lock().as_ref().map(MilkFrontend::status)
    }

    /// Events so far (empty while inactive).
    pub fn events(&self) -> Vec<FrontendEvent> {
        self.lock()
            .as_ref()
            .map(MilkFrontend::events)
            .unwrap_or_default()
    }

    /// Install the frontend of a new activation.
    pub fn set(&self, fe: MilkFrontend) {
        *self.lock() = Some(fe);
    }

    /// Take the frontend out (device reset).
    pub fn take(&self) -> Option<MilkFrontend> {
        self.lock().take()
    }
}
