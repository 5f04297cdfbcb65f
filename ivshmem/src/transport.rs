//! [`IvshmemTransport`]: the ivshmem server, the register-file device and the
//! guest RAM mapping put together, with the loop that serves them.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::Backend;
use crate::device::{Device, DeviceInfo, DeviceInfoError, RequestOutcome};
use crate::guest_ram::{GuestRam, GuestRamError};
use crate::qemu_args::QemuArgs;
use crate::regs::{Regs, VECTOR_CONFIG};
use crate::server::{ClientEvent, IvshmemServer, ServerError};
use crate::shm::{SharedMem, SHM_SIZE};

/// Where the transport keeps its files and what device it presents.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Unix socket QEMU's `-chardev socket` connects to.
    pub socket_path: PathBuf,
    /// Guest RAM backing file (created, sized, and removed when the transport
    /// is dropped). Put it on tmpfs.
    pub ram_path: PathBuf,
    /// Guest RAM size in MiB (QEMU's `-m`).
    pub memory_mib: u32,
    /// The virtio device presented to the driver.
    pub device: DeviceInfo,
    /// ivshmem ID of the host peer (default 0; the guest gets IDs after it).
    pub host_peer: u16,
}

impl TransportConfig {
    /// Files `ivshmem.sock` and `guest-ram` in `dir`, host peer 0.
    pub fn in_dir(dir: &Path, memory_mib: u32, device: DeviceInfo) -> Self {
        TransportConfig {
            socket_path: dir.join("ivshmem.sock"),
            ram_path: dir.join("guest-ram"),
            memory_mib,
            device,
            host_peer: 0,
        }
    }
}

/// Transport errors.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device description is invalid.
    #[error("device: {0}")]
    Device(#[from] DeviceInfoError),
    /// Guest RAM could not be set up.
    #[error(transparent)]
    GuestRam(#[from] GuestRamError),
    /// The server could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// Creating the shared memory failed.
    #[error("shared memory: {0}")]
    SharedMemory(io::Error),
    /// Waiting for events failed.
    #[error("poll: {0}")]
    Poll(io::Error),
    /// Creating the stop eventfd or the thread failed.
    #[error("setup: {0}")]
    Setup(io::Error),
    /// The serving thread panicked.
    #[error("transport thread panicked")]
    Panicked,
}

/// Stops a running [`IvshmemTransport::run`] from another thread.
#[derive(Debug)]
pub struct Stopper(EventFd);

impl Stopper {
    /// Asks the loop to return.
    pub fn stop(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The QEMU-side virtio transport for one guest: an ivshmem server on a Unix
/// socket, the virtio register file in its shared memory, guest RAM mapped
/// from the file QEMU uses as RAM, and a [`Backend`] activated on DRIVER_OK.
///
/// Typical use:
///
/// ```no_run
/// # use milk_ivshmem::{IvshmemTransport, TransportConfig, DeviceInfo, EchoBackend};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dev = DeviceInfo { device_id: 42, vendor_id: 0x1af4, features: 1 << 32,
///                        config: vec![], num_queues: 2, queue_max: 256 };
/// let cfg = TransportConfig::in_dir(std::path::Path::new("/dev/shm/g1"), 256, dev);
/// let t = IvshmemTransport::new(cfg, EchoBackend::new().0)?;
/// let mut spec = milk_harness::GuestSpec::new("vmlinux");
/// t.qemu_args().apply(&mut spec);      // -M pc,..., -object, -chardev, -device
/// let handle = t.spawn()?;             // serve before QEMU starts
/// // milk_harness::run_qemu(&spec, ...) ...
/// let t = handle.stop()?;              // the transport back, e.g. for stats
/// # Ok(()) }
/// ```
pub struct IvshmemTransport<B: Backend> {
    server: IvshmemServer,
    device: Device<B>,
    ram: GuestRam,
    qemu: QemuArgs,
    stop: EventFd,
}

impl<B: Backend> IvshmemTransport<B> {
    /// Creates the shared memory, publishes the device in it, creates and
    /// maps the guest RAM file, and listens on the socket. Nothing is served
    /// until [`Self::run`] (or [`Self::spawn`]).
    pub fn new(cfg: TransportConfig, backend: B) -> Result<Self, TransportError> {
        cfg.device.validate()?;
        let ram = GuestRam::create(&cfg.ram_path, u64::from(cfg.memory_mib) << 20)?;
        let shm = Arc::new(
            SharedMem::create(c"milk-ivshmem", SHM_SIZE).map_err(TransportError::SharedMemory)?,
        );
        let regs = Regs::new(shm.clone()).ok_or_else(|| {
            TransportError::SharedMemory(io::Error::other("shared memory smaller than registers"))
        })?;
        let vectors = cfg.device.vectors();
        let device = Device::new(cfg.device, cfg.host_peer, regs, ram.clone(), backend)?;
        let server = IvshmemServer::bind(&cfg.socket_path, shm, vectors, cfg.host_peer)?;
        let qemu = QemuArgs::new(&cfg.ram_path, cfg.memory_mib, &cfg.socket_path, vectors);
        let stop = EventFd::new(EFD_NONBLOCK).map_err(TransportError::Setup)?;
        Ok(IvshmemTransport {
            server,
            device,
            ram,
            qemu,
            stop,
        })
    }

    /// The QEMU options that connect a guest to this transport.
    pub fn qemu_args(&self) -> &QemuArgs {
        &self.qemu
    }

    /// The register file (e.g. to inspect it from a test).
    pub fn regs(&self) -> &Regs {
        self.device.regs()
    }

    /// Guest RAM as this process maps it.
    pub fn guest_ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The device (stats, backend, liveness).
    pub fn device(&self) -> &Device<B> {
        &self.device
    }

    /// The device, mutably (e.g. to reach the backend).
    pub fn device_mut(&mut self) -> &mut Device<B> {
        &mut self.device
    }

    /// The ivshmem server (socket path, host peer, eventfds).
    pub fn server(&self) -> &IvshmemServer {
        &self.server
    }

    /// A handle that makes [`Self::run`] return.
    pub fn stopper(&self) -> Result<Stopper, TransportError> {
        self.stop
            .try_clone()
            .map(Stopper)
            .map_err(TransportError::Setup)
    }

    /// Serves connections and register requests until stopped. Queue kicks
    /// never pass through here: they go straight to the backend's eventfds.
    pub fn run(&mut self) -> Result<(), TransportError> {
        while self.serve_once(-1)? {}
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: forever) for events and handles them.
    /// Returns false once stopped.
    pub fn serve_once(&mut self, timeout_ms: i32) -> Result<bool, TransportError> {
        let Some(request_fd) = self
            .server
            .host_eventfd(VECTOR_CONFIG)
            .map(|f| f.as_raw_fd())
        else {
            return Err(TransportError::Setup(io::Error::other("no request vector")));
        };
        let fd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            fd(self.stop.as_raw_fd()),
            fd(self.server.listener_fd()),
            fd(request_fd),
            // A negative fd is ignored by poll.
            fd(self.server.client_fd().unwrap_or(-1)),
        ];
        // SAFETY: `fds` is a live array of 4 pollfd structs; the descriptors
        // belong to `self` and stay open for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(true);
            }
            return Err(TransportError::Poll(e));
        }
        if fds[0].revents != 0 {
            let _ = self.stop.read();
            return Ok(false);
        }
        if fds[1].revents != 0 {
            let device = &mut self.device;
            let connected = self.server.accept(|session| device.connect(session));
            if let Err(e) = connected {
                log::error!("ivshmem: {e}");
                if self.server.client_id().is_none() {
                    self.device.disconnect();
                }
            }
        }
        let requested = fds[2].revents != 0
            && self
                .server
                .host_eventfd(VECTOR_CONFIG)
                .is_some_and(|f| f.read().is_ok());
        if requested {
            let out = self.device.handle_request();
            if let RequestOutcome::NeedsReset(why) = out {
                log::debug!("ivshmem: request refused: {why}");
            }
        }
        if fds[3].revents != 0 {
            if let ClientEvent::Disconnected(_) = self.server.poll_client() {
                self.device.disconnect();
            }
        }
        Ok(true)
    }
}

impl<B: Backend + 'static> IvshmemTransport<B> {
    /// Runs [`Self::run`] on a thread named `ivshmem`.
    pub fn spawn(mut self) -> Result<TransportHandle<B>, TransportError> {
        let stop = self.stopper()?;
        let thread = std::thread::Builder::new()
            .name("ivshmem".into())
            .spawn(move || {
                if let Err(e) = self.run() {
                    log::error!("ivshmem transport stopped: {e}");
                }
                self
            })
            .map_err(TransportError::Setup)?;
        Ok(TransportHandle { stop, thread })
    }
}

impl<B: Backend> Drop for IvshmemTransport<B> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.ram.path());
    }
}

/// A transport serving on its own thread.
pub struct TransportHandle<B: Backend> {
    stop: Stopper,
    thread: JoinHandle<IvshmemTransport<B>>,
}

impl<B: Backend> TransportHandle<B> {
    /// Stops the loop and returns the transport (device, stats, backend).
    pub fn stop(self) -> Result<IvshmemTransport<B>, TransportError> {
        self.stop.stop().map_err(TransportError::Setup)?;
        self.thread.join().map_err(|_| TransportError::Panicked)
    }
}
