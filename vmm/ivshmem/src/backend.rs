//! What the transport hands to the device implementation when the driver sets
//! DRIVER_OK: the [`Backend`] trait, the [`Activation`] it receives, and
//! [`EchoBackend`], a small backend for tests.
//!
//! virtio-milk's queue engine plugs in as a backend: build its `QueueEngine`
//! from [`Activation::memory`], the queues' [`QueueConfig`]s, the first
//! queue's kick eventfd (the others through `add_kick_fd`) and an interrupt
//! closure calling [`Interrupts::signal_queue`].

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::regs::VECTOR_CONFIG;

/// Where the driver placed one split virtqueue (validated: size is a power of
/// two within the device's maximum, the three rings lie inside guest RAM and
/// are aligned as virtio requires).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size.
    pub size: u16,
    /// Guest physical address of the descriptor table.
    pub desc: u64,
    /// ... of the driver (available) ring.
    pub driver: u64,
    /// ... of the device (used) ring.
    pub device: u64,
}

/// The guest's interrupt eventfds, one per MSI-X vector: writing eventfd `v`
/// makes QEMU raise MSI-X vector `v` in the guest. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Interrupts {
    fds: Arc<Vec<EventFd>>,
}

impl Interrupts {
    /// Wraps the eventfds of vectors `0..fds.len()`.
    pub fn new(fds: Vec<EventFd>) -> Self {
        Interrupts { fds: Arc::new(fds) }
    }

    /// Number of vectors.
    pub fn vectors(&self) -> usize {
        self.fds.len()
    }

    /// The eventfd of vector `vector` (to hand to another process, e.g. as a
    /// vhost-user call eventfd).
    pub fn vector_fd(&self, vector: u16) -> Option<&EventFd> {
        self.fds.get(usize::from(vector))
    }

    /// Raises MSI-X vector `vector`.
    pub fn signal_vector(&self, vector: u16) -> io::Result<()> {
        match self.fds.get(usize::from(vector)) {
            Some(fd) => fd.write(1),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no interrupt vector {vector}"),
            )),
        }
    }

    /// Signals used buffers on queue `queue` (vector `1 + queue`).
    pub fn signal_queue(&self, queue: u16) -> io::Result<()> {
        match queue.checked_add(1) {
            Some(v) => self.signal_vector(v),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "queue index out of range",
            )),
        }
    }

    /// Signals a configuration change (vector 0).
    pub fn signal_config(&self) -> io::Result<()> {
        self.signal_vector(VECTOR_CONFIG)
    }
}

/// One queue the driver made ready.
#[derive(Debug)]
pub struct ActiveQueue {
    /// Queue index (its doorbell and MSI-X vector are `1 + index`).
    pub index: u16,
    /// Where the rings are.
    pub config: QueueConfig,
    /// Becomes readable when the driver rings this queue's doorbell
    /// (non-blocking; a duplicate of the transport's descriptor).
    pub kick: EventFd,
}

/// Everything a backend needs to serve the device once the driver is ready.
#[derive(Debug)]
pub struct Activation {
    /// Features the driver accepted (a subset of those offered).
    pub features: u64,
    /// Guest RAM, where the vrings live.
    pub memory: GuestMemoryMmap,
    /// The ready queues, in index order (queues the driver left unready are absent).
    pub queues: Vec<ActiveQueue>,
    /// The guest's interrupt vectors.
    pub interrupts: Interrupts,
}

/// Error a backend returns from [`Backend::activate`].
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// The device implementation behind the transport.
///
/// Calls come from the transport's thread, in order: `activate` when the driver
/// sets DRIVER_OK, then `reset` when the driver resets the device, makes it
/// fail, or QEMU disconnects. `reset` is also called when no activation is
/// live (it must then do nothing).
pub trait Backend: Send {
    /// Start serving. An error makes the transport set DEVICE_NEEDS_RESET.
    fn activate(&mut self, activation: Activation) -> Result<(), BackendError>;
    /// Stop serving and drop everything from the last activation.
    fn reset(&mut self);
}

/// What [`EchoBackend`] saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EchoEvent {
    /// Activated with these features and queues.
    Activated {
        /// Accepted features.
        features: u64,
        /// `(index, config)` of each ready queue.
        queues: Vec<(u16, QueueConfig)>,
    },
    /// Queue `0` was kicked (its own eventfd became readable).
    Kick(u16),
    /// The echo interrupt for that queue was written.
    Interrupted(u16),
    /// Reset while active.
    Reset,
}

/// The events an [`EchoBackend`] recorded, shared with the test that made it.
#[derive(Clone, Default, Debug)]
pub struct EchoLog {
    inner: Arc<(Mutex<Vec<EchoEvent>>, Condvar)>,
}

impl EchoLog {
    fn push(&self, e: EchoEvent) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        cv.notify_all();
    }

    /// A copy of all events so far.
    pub fn events(&self) -> Vec<EchoEvent> {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until some event satisfies `pred`; returns it, or `None` at the timeout.
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&EchoEvent) -> bool,
    ) -> Option<EchoEvent> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.inner;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = g.iter().find(|e| pred(e)) {
                return Some(e.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// A test backend: records activations and resets, and answers every kick of
/// queue `n` by recording it and writing the guest's interrupt for queue `n`.
/// It touches no vring, so any valid queue placement works.
#[derive(Default)]
pub struct EchoBackend {
    log: EchoLog,
    worker: Option<(EventFd, JoinHandle<()>)>,
}

impl EchoBackend {
    /// A backend and the log it writes.
    pub fn new() -> (Self, EchoLog) {
        let log = EchoLog::default();
        (
            EchoBackend {
                log: log.clone(),
                worker: None,
            },
            log,
        )
    }

    fn stop_worker(&mut self) {
        if let Some((stop, t)) = self.worker.take() {
            let _ = stop.write(1);
            let _ = t.join();
        }
    }
}

fn echo_loop(queues: Vec<ActiveQueue>, irq: Interrupts, stop: EventFd, log: EchoLog) {
    let mut fds: Vec<libc::pollfd> = queues
        .iter()
        .map(|q| q.kick.as_raw_fd())
        .chain(std::iter::once(stop.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a live array of fds.len() pollfd structs whose
        // descriptors are owned by `queues` and `stop`, alive for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("echo backend: poll: {}", io::Error::last_os_error());
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (q, p) in queues.iter().zip(&fds) {
            if p.revents & libc::POLLIN != 0 && q.kick.read().is_ok() {
                log.push(EchoEvent::Kick(q.index));
                match irq.signal_queue(q.index) {
                    Ok(()) => log.push(EchoEvent::Interrupted(q.index)),
                    Err(e) => log::warn!("echo backend: interrupt {}: {e}", q.index),
                }
            }
        }
    }
}

impl Backend for EchoBackend {
    fn activate(&mut self, a: Activation) -> Result<(), BackendError> {
        self.stop_worker();
        self.log.push(EchoEvent::Activated {
            features: a.features,
            queues: a.queues.iter().map(|q| (q.index, q.config)).collect(),
        });
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let log = self.log.clone();
        let irq = a.interrupts;
        let queues = a.queues;
        let t = std::thread::Builder::new()
            .name("ivshmem-echo".into())
            .spawn(move || echo_loop(queues, irq, stop2, log))?;
        self.worker = Some((stop, t));
        Ok(())
    }

    fn reset(&mut self) {
        if self.worker.is_some() {
            self.stop_worker();
            self.log.push(EchoEvent::Reset);
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupts_write_the_vector_eventfd_and_refuse_unknown_vectors() {
        let fds: Vec<EventFd> = (0..3)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let peek: Vec<EventFd> = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        let irq = Interrupts::new(fds);
        irq.signal_queue(1).unwrap();
        irq.signal_queue(1).unwrap();
        irq.signal_config().unwrap();
        assert_eq!(peek[2].read().unwrap(), 2);
        assert_eq!(peek[0].read().unwrap(), 1);
        assert!(peek[1].read().is_err(), "vector 1 was not signalled");
        assert!(irq.signal_queue(2).is_err());
        assert!(irq.signal_queue(u16::MAX).is_err());
    }
}
