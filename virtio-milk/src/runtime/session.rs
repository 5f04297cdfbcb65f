//! Sessions: HELLO / HEARTBEAT / GOODBYE, the subscriptions a HELLO carries, and refusing a
//! guest that speaks another protocol version.

use vm_memory::GuestMemory;

use super::{Runtime, GOODBYE_RESYNC};
use crate::metrics::monotonic_ns;
use crate::policy::{CpuState, Granted, SchedView};
use crate::protocol::{
    pack_name, Message, SessionInfo, BYE_VERSION, HELLO_F_RUNNING, HELLO_F_TICK, PROTOCOL_VERSION,
};
use crate::queue::Malformed;

impl<M: GuestMemory> Runtime<M> {
    pub(super) fn session_record(&self, counter: u64) -> SessionInfo {
        let subs = self.policy.subscriptions();
        let mut flags = 0;
        if subs.tick_us > 0 {
            flags |= HELLO_F_TICK;
        }
        if subs.running {
            flags |= HELLO_F_RUNNING;
        }
        SessionInfo {
            cpu: 0,
            num_cpus: self.engine.num_cpus(),
            heartbeat_ms: self
                .cfg
                .heartbeat
                .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32),
            session_id: self.session_id,
            ts_ns: monotonic_ns(),
            counter,
            name: pack_name(self.policy.name()),
            flags,
            tick_us: subs.tick_us,
        }
    }

    pub(super) fn send_session(&mut self, m: Message) {
        // Session records travel on CPU 0's decision queue.
        if self.engine.push_decision(0, m.encode()) {
            self.metrics.session_sent += 1;
        } else {
            self.metrics.queue_full += 1;
        }
    }

    /// Start a new session: forget every task (the guest re-announces them after our
    /// HELLO), mark all CPUs free, re-attach the policy and send HELLO.
    pub fn start_session(&mut self) {
        self.new_session(None);
    }

    /// Like [`Self::start_session`], but first tell the guest GOODBYE (with `reason`) so a
    /// guest still scheduling with an older session falls back and re-announces its tasks
    /// when it takes the new HELLO.
    pub fn restart_session(&mut self, reason: u64) {
        self.new_session(Some(reason));
    }

    fn new_session(&mut self, goodbye: Option<u64>) {
        // Decisions of the old session that never reached the guest are meaningless now.
        self.metrics.dropped_old_decisions += self.engine.clear_backlog() as u64;
        if let Some(reason) = goodbye {
            let bye = Message::Goodbye(self.session_record(reason));
            self.send_session(bye);
        }
        // Unique across runtimes on the same device too (a restarted runtime must not
        // reuse the id the guest saw before its GOODBYE): clock based, strictly increasing.
        self.session_id = monotonic_ns().max(self.session_id.saturating_add(1));
        self.established = false;
        self.view = SchedView::new(self.engine.num_cpus());
        for c in &mut self.view.cpus {
            c.state = CpuState::Idle;
        }
        self.pids.clear();
        // Acks of the old session's decisions no longer match anything (cookies go on).
        self.commits.clear();
        self.timers.clear();
        self.events.clear();
        self.policy.attach(&self.view);
        let hello = Message::Hello(self.session_record(0));
        self.send_session(hello);
        self.engine.flush();
    }

    /// Tell the guest the host stops scheduling (it falls back to its own scheduler).
    pub fn end_session(&mut self, reason: u64) {
        let bye = Message::Goodbye(self.session_record(reason));
        self.send_session(bye);
        self.engine.flush();
    }

    pub(super) fn on_guest_hello(&mut self, s: SessionInfo) {
        if self.refused_version.take().is_some() {
            // A v2 HELLO from a guest we refused (its driver was replaced): start over.
            log::info!("guest now speaks v{PROTOCOL_VERSION}: new session");
            self.start_session();
            return;
        }
        if self.session_id != 0 && s.session_id == self.session_id {
            // The guest took our HELLO (again, after a swap: the subscriptions may differ).
            self.established = true;
            self.view.granted = Granted {
                tick_us: if s.flags & HELLO_F_TICK != 0 {
                    s.tick_us
                } else {
                    0
                },
                running: s.flags & HELLO_F_RUNNING != 0,
            };
        } else if self.session_id != 0 && s.session_id == 0 && !self.established {
            // A freshly probed driver while our HELLO may still be on its way
            // (startup race): repeat it, keep the tasks already announced.
            let hello = Message::Hello(self.session_record(0));
            self.send_session(hello);
        } else {
            // The guest restarted its driver, or still runs an older session:
            // resynchronise (GOODBYE makes it re-announce every task).
            log::info!("guest HELLO (session {}): new session", s.session_id);
            self.restart_session(GOODBYE_RESYNC);
        }
    }

    pub(super) fn on_guest_goodbye(&mut self, s: SessionInfo) {
        log::info!("guest GOODBYE (reason {})", s.counter);
        // The guest stopped using us; offer a new session right away.
        self.start_session();
    }

    /// After a poll: did records with another protocol version arrive? Then refuse the
    /// guest once: one clear error, GOODBYE(BYE_VERSION), no session until a v2 HELLO.
    pub(super) fn check_version(&mut self) {
        let stats = self.engine.stats();
        let bad = stats.malformed[Malformed::RecordVersion as usize];
        if bad == self.seen_bad_versions {
            return;
        }
        self.seen_bad_versions = bad;
        let v = stats.last_bad_version;
        if self.refused_version == Some(v) {
            return;
        }
        log::error!(
            "guest speaks virtio-milk v{v}, this host speaks v{PROTOCOL_VERSION}: rebuild the guest kernel"
        );
        self.metrics.version_refusals += 1;
        self.refused_version = Some(v);
        self.established = false;
        self.metrics.dropped_old_decisions += self.engine.clear_backlog() as u64;
        self.commits.clear();
        self.timers.clear();
        self.events.clear();
        let bye = Message::Goodbye(self.session_record(BYE_VERSION));
        self.send_session(bye);
        self.engine.flush();
    }
}
