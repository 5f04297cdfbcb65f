//! [`EchoBackend`]: a test backend (cargo feature `echo`, and this crate's own
//! tests). It records activations and resets, and answers every kick of queue
//! `n` by writing the guest's interrupt for queue `n`; it touches no vring.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{Activation, ActiveQueue, Backend, BackendError, Interrupts, QueueConfig};

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
