//! Running a runtime on its own thread: the [`Control`] block the loop polls and the
//! [`RuntimeHandle`] that swaps policies, injects decisions, reads snapshots and stops it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vm_memory::GuestMemory;
use vmm_sys_util::eventfd::EventFd;

use super::{RawDecision, Runtime, RuntimeError};
use crate::metrics::Summary;
use crate::policy::Policy;

/// Shared between a running runtime thread and its [`RuntimeHandle`].
#[derive(Default)]
pub struct Control {
    stop: AtomicBool,
    silent: AtomicBool,
    swap_pending: AtomicBool,
    mailbox: Mutex<Option<Box<dyn Policy>>>,
    inject_pending: AtomicBool,
    injections: Mutex<Vec<RawDecision>>,
    snapshot: Mutex<Option<Summary>>,
}

impl Control {
    /// Ask the loop to return.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether the stop must not send GOODBYE.
    pub fn silent_requested(&self) -> bool {
        self.silent.load(Ordering::Acquire)
    }

    /// The latest summary the loop published (about every [`super::SNAPSHOT_PERIOD`]).
    pub fn snapshot(&self) -> Option<Summary> {
        self.snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publish a summary (the loop does this periodically).
    pub fn publish(&self, s: Summary) {
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }

    /// Hand a new policy to the loop.
    pub fn request_swap(&self, p: Box<dyn Policy>) {
        *self.mailbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        self.swap_pending.store(true, Ordering::Release);
    }

    /// The policy handed over by [`Self::request_swap`], if any.
    pub fn take_swap(&self) -> Option<Box<dyn Policy>> {
        if !self.swap_pending.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.mailbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Ask the loop to return without telling the guest (no GOODBYE), as a crashed host
    /// would: the guest only notices through its host-silence timeout.
    pub fn request_silent_stop(&self) {
        self.silent.store(true, Ordering::Release);
        self.request_stop();
    }

    /// Queue raw decisions for the loop to write (see [`RawDecision`]).
    pub fn request_injection(&self, d: &[RawDecision]) {
        self.injections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(d);
        self.inject_pending.store(true, Ordering::Release);
    }

    /// Raw decisions queued by [`Self::request_injection`] since the last call.
    pub fn take_injections(&self) -> Vec<RawDecision> {
        if !self.inject_pending.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        std::mem::take(&mut *self.injections.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl<M: GuestMemory + Send + 'static> Runtime<M> {
    /// Run on a new thread; returns a handle to swap the policy or stop it.
    pub fn spawn(self) -> Result<RuntimeHandle<M>, RuntimeError> {
        let kick = self.engine.kick_fd().map_err(RuntimeError::Setup)?;
        let ctl = Arc::new(Control::default());
        let ctl2 = ctl.clone();
        let thread = std::thread::Builder::new()
            .name("milk-runtime".into())
            .spawn(move || {
                let mut rt = self;
                rt.run(&ctl2);
                rt
            })
            .map_err(RuntimeError::Setup)?;
        Ok(RuntimeHandle {
            ctl,
            kick,
            thread: Some(thread),
        })
    }
}

/// Controls a runtime running on its own thread.
pub struct RuntimeHandle<M: GuestMemory> {
    ctl: Arc<Control>,
    kick: EventFd,
    thread: Option<JoinHandle<Runtime<M>>>,
}

impl<M: GuestMemory> RuntimeHandle<M> {
    /// Install `policy` at the next loop iteration (the guest sees only a pause).
    pub fn swap_policy(&self, policy: Box<dyn Policy>) {
        self.ctl.request_swap(policy);
        let _ = self.kick.write(1);
    }

    /// Counters of the running loop, at most [`super::SNAPSHOT_PERIOD`] old (`None` during
    /// the first period).
    pub fn snapshot(&self) -> Option<Summary> {
        self.ctl.snapshot()
    }

    /// Testing / fault-injection hook: write `decisions` to the guest at the next loop
    /// iteration exactly as given, bypassing the runtime's validation of policy output
    /// (stale seqs, unknown gtids, disallowed or out-of-range CPUs all go through). Their
    /// cookies carry [`super::INJECTED_COOKIE`]; the guest's acks are counted by status in
    /// `Metrics::injected_acks` (and in `Metrics::acks`) and never reach the policy.
    /// Not for production use: a correct host never needs it.
    pub fn inject_decisions(&self, decisions: &[RawDecision]) {
        self.ctl.request_injection(decisions);
        let _ = self.kick.write(1);
    }

    /// Like [`Self::stop`] but without GOODBYE, whatever the configuration: the guest
    /// sees a host that went silent (crash simulation for tests).
    pub fn stop_silently(self) -> Result<Runtime<M>, RuntimeError> {
        self.ctl.request_silent_stop();
        self.stop()
    }

    /// Stop the loop (sending GOODBYE if configured) and get the runtime back, e.g. for
    /// its [`Runtime::summary`] or to restart it later on the same engine.
    pub fn stop(mut self) -> Result<Runtime<M>, RuntimeError> {
        self.ctl.request_stop();
        let _ = self.kick.write(1);
        let t = self.thread.take().ok_or(RuntimeError::Panicked)?;
        t.join().map_err(|_| RuntimeError::Panicked)
    }
}

impl<M: GuestMemory> Drop for RuntimeHandle<M> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.ctl.request_stop();
            let _ = self.kick.write(1);
            let _ = t.join();
        }
    }
}
