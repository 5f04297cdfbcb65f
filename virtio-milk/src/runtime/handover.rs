//! Handing a live session to a runtime in another process (a planned swap between
//! vhost-user backends, docs/vhost-user.md): [`SessionState`] out of one runtime, into
//! the next, without the guest seeing more than a HELLO with the same session id.

use vm_memory::GuestMemory;

use super::acks::{Commit, Commitments};
use super::Runtime;
use crate::policy::SchedView;
use crate::protocol::Message;

/// What a runtime in another process needs to continue a session.
///
/// Decisions in flight move with it: their acks resolve them in the next runtime (their
/// outcomes are not shown to its policy, as after an in-process swap), or they expire
/// there after `ack_timeout`.
#[derive(Clone, Debug, Default)]
pub struct SessionState {
    /// Session id the guest knows (0: none).
    pub session_id: u64,
    /// The guest echoed that session's HELLO.
    pub established: bool,
    /// Task and CPU tables, subscriptions granted.
    pub view: SchedView,
    /// Decisions sent and not acknowledged yet, as (target CPU, commitment).
    pub commits: Vec<(u16, Commit)>,
    /// Last decision cookie handed out (the next runtime continues after it, so a late ack
    /// never matches one of its own decisions).
    pub last_cookie: u64,
    /// Heartbeats sent in this session.
    pub heartbeats: u64,
}

impl<M: GuestMemory> Runtime<M> {
    /// This runtime's session for another runtime (see [`SessionState`]).
    pub fn session_state(&self) -> SessionState {
        let commits = (0..self.view.cpus.len() as u16)
            .flat_map(|cpu| self.commits.on_cpu(cpu).iter().map(move |c| (cpu, *c)))
            .collect();
        SessionState {
            session_id: self.session_id,
            established: self.established,
            view: self.view.clone(),
            commits,
            last_cookie: self.commits.last_cookie(),
            heartbeats: self.heartbeats,
        }
    }

    /// Continue the session another runtime exported: its tables replace ours, the policy
    /// attaches to them, and the guest gets a HELLO with the same session id and this
    /// runtime's policy (as after an in-process swap). Run it with `hello_on_start` off. A
    /// state for another CPU count starts a new session instead.
    pub fn resume_session(&mut self, state: SessionState) {
        let n = self.view.cpus.len();
        if state.view.cpus.len() != n || state.session_id == 0 {
            log::warn!("session state unusable here: starting a new session");
            self.start_session();
            return;
        }
        self.session_id = state.session_id;
        self.established = state.established;
        self.view = state.view;
        self.pids = self.view.tasks.keys().map(|g| (g.pid(), *g)).collect();
        self.commits = Commitments::new(n, state.last_cookie);
        for (cpu, mut c) in state.commits {
            // Made by the previous process's policy: no outcome for ours.
            c.epoch = 0;
            self.commits.add(cpu, c);
        }
        self.timers.clear();
        self.events.clear();
        self.heartbeats = state.heartbeats;
        self.policy.attach(&self.view);
        let hello = Message::Hello(self.session_record(0));
        self.send_session(hello);
        self.schedule();
        self.engine.flush();
    }
}
