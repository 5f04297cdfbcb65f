//! The ivshmem server: QEMU's `ivshmem-doorbell` device connects to this Unix
//! socket (`-chardev socket,path=...`) and receives, in order (QEMU's
//! `ivshmem-spec.txt`):
//!
//! 1. protocol version 0;
//! 2. its own peer ID;
//! 3. `-1` with the shared-memory descriptor;
//! 4. the host peer's ID once per vector, each with one eventfd: the guest
//!    rings these through the doorbell register (the host's kick eventfds);
//! 5. its own ID once per vector, each with one eventfd: the host writes these
//!    and QEMU raises MSI-X vector `n`.
//!
//! The host peer is not a process: it exists only as the eventfds in step 4.
//! One guest is served at a time; a second connection is closed at once (QEMU
//! then fails to start with a clear error). When QEMU goes away its eventfds
//! are dropped and the next connection gets fresh ones.

use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::Interrupts;
use crate::device::Session;
use crate::proto::{send_msg, PROTOCOL_VERSION, SHM_MSG};
use crate::shm::SharedMem;

/// Largest ivshmem peer ID (the doorbell register has 16 bits for it).
pub const MAX_PEER_ID: u16 = u16::MAX;

/// Server errors.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path is taken by something that is not a socket.
    #[error("{0} exists and is not a socket")]
    PathTaken(PathBuf),
    /// Binding or configuring the listening socket failed.
    #[error("ivshmem socket {0}: {1}")]
    Bind(PathBuf, io::Error),
    /// `vectors` is zero.
    #[error("the device needs at least one vector")]
    NoVectors,
    /// Creating an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    /// Accepting a connection failed.
    #[error("accept: {0}")]
    Accept(io::Error),
    /// Sending the set-up messages to a new client failed.
    #[error("handshake with client {0}: {1}")]
    Handshake(u16, io::Error),
}

/// What happened on the client connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// Nothing to report.
    Quiet,
    /// The client closed the connection (or it failed); it is gone.
    Disconnected(u16),
}

/// Borrows an eventfd's descriptor for sending.
fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `fd`, which outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

#[derive(Debug)]
struct Client {
    stream: UnixStream,
    id: u16,
}

/// An ivshmem server for one guest. See the module documentation.
#[derive(Debug)]
pub struct IvshmemServer {
    listener: UnixListener,
    path: PathBuf,
    shm: Arc<SharedMem>,
    host_peer: u16,
    host_fds: Vec<EventFd>,
    client: Option<Client>,
    next_id: u16,
}

impl IvshmemServer {
    /// Listens on `path` (a stale socket there is replaced), serving `shm` to
    /// clients configured with `vectors` vectors. The host's eventfds are
    /// created now and live as long as the server.
    pub fn bind(
        path: &Path,
        shm: Arc<SharedMem>,
        vectors: u16,
        host_peer: u16,
    ) -> Result<Self, ServerError> {
        if vectors == 0 {
            return Err(ServerError::NoVectors);
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(path).map_err(|e| ServerError::Bind(path.into(), e))?
            }
            Ok(_) => return Err(ServerError::PathTaken(path.into())),
            Err(_) => {}
        }
        let listener = UnixListener::bind(path).map_err(|e| ServerError::Bind(path.into(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ServerError::Bind(path.into(), e))?;
        let host_fds = (0..vectors)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServerError::EventFd)?;
        Ok(IvshmemServer {
            listener,
            path: path.into(),
            shm,
            host_peer,
            host_fds,
            client: None,
            next_id: host_peer.wrapping_add(1),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The host peer's ID (what the driver writes in the doorbell's high half).
    pub fn host_peer(&self) -> u16 {
        self.host_peer
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.host_fds.len() as u16
    }

    /// The host eventfd of `vector`: readable when the guest rings it.
    pub fn host_eventfd(&self, vector: u16) -> Option<&EventFd> {
        self.host_fds.get(usize::from(vector))
    }

    /// The listening socket (poll it for readability, then call [`Self::accept`]).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// The connected client's socket, if any (poll it, then call [`Self::poll_client`]).
    pub fn client_fd(&self) -> Option<RawFd> {
        self.client.as_ref().map(|c| c.stream.as_raw_fd())
    }

    /// The connected client's peer ID.
    pub fn client_id(&self) -> Option<u16> {
        self.client.as_ref().map(|c| c.id)
    }

    fn allocate_id(&mut self) -> u16 {
        let mut id = self.next_id;
        if id == self.host_peer {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        id
    }

    /// Accepts a pending connection and sends it the set-up messages.
    ///
    /// `on_connect` receives the new [`Session`] (the host's per-queue kick
    /// eventfds and the guest's interrupt eventfds) *before* the client gets
    /// the shared memory, so the device can publish a fresh register file
    /// that no client has seen yet. Returns true if a client was connected;
    /// false if no connection was pending or it was refused because a guest is
    /// already connected. After an error no client is connected.
    pub fn accept(&mut self, on_connect: impl FnOnce(Session)) -> Result<bool, ServerError> {
        let stream = match self.listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(ServerError::Accept(e)),
        };
        if let Some(c) = &self.client {
            log::warn!(
                "ivshmem: refusing a second client while client {} is connected",
                c.id
            );
            return Ok(false);
        }
        let id = self.allocate_id();
        let guest_fds = (0..self.host_fds.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServerError::EventFd)?;
        let kicks = self.host_fds[1..]
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServerError::EventFd)?;
        let theirs = guest_fds
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(ServerError::EventFd)?;
        // Kicks rung before this guest existed mean nothing.
        for fd in &self.host_fds {
            let _ = fd.read();
        }
        on_connect(Session {
            kicks,
            interrupts: Interrupts::new(guest_fds),
        });
        self.handshake(&stream, id, &theirs)
            .map_err(|e| ServerError::Handshake(id, e))?;
        stream
            .set_nonblocking(true)
            .map_err(|e| ServerError::Handshake(id, e))?;
        log::info!(
            "ivshmem: client {id} connected ({} vectors, host peer {})",
            self.host_fds.len(),
            self.host_peer
        );
        self.client = Some(Client { stream, id });
        Ok(true)
    }

    fn handshake(&self, s: &UnixStream, id: u16, guest_fds: &[EventFd]) -> io::Result<()> {
        // QEMU reads the first messages synchronously while it starts; it never
        // stalls for long, but do not let a wedged client block the server.
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        send_msg(s, PROTOCOL_VERSION, None)?;
        send_msg(s, i64::from(id), None)?;
        send_msg(s, SHM_MSG, Some(self.shm.as_fd()))?;
        for fd in &self.host_fds {
            send_msg(s, i64::from(self.host_peer), Some(borrow(fd)))?;
        }
        for fd in guest_fds {
            send_msg(s, i64::from(id), Some(borrow(fd)))?;
        }
        Ok(())
    }

    /// Checks the client connection (call when it polls readable). QEMU never
    /// sends anything, so readable means closed; stray bytes are discarded.
    pub fn poll_client(&mut self) -> ClientEvent {
        let Some(c) = &mut self.client else {
            return ClientEvent::Quiet;
        };
        let mut buf = [0u8; 64];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => log::warn!("ivshmem: client {} sent {n} unexpected bytes", c.id),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ClientEvent::Quiet,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("ivshmem: client {}: {e}", c.id);
                    break;
                }
            }
        }
        let id = c.id;
        self.client = None;
        log::info!("ivshmem: client {id} disconnected");
        ClientEvent::Disconnected(id)
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
