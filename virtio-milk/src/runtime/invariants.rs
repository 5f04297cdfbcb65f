//! Consistency checks of the runtime's tables (feature `invariants`; the fuzz targets call
//! [`Runtime::check_invariants`] after every step).

use std::collections::HashMap;

use vm_memory::GuestMemory;

use super::Runtime;
use crate::policy::{CpuState, Gtid, TaskState};

impl<M: GuestMemory> Runtime<M> {
    /// Checks what must hold between any two steps, whatever the guest sent:
    ///
    /// * every CPU a task or commitment names exists;
    /// * each CPU's `pending` list is exactly its outstanding commitments, in order, and
    ///   holds at most `max_staged` RUNs;
    /// * no task has two RUNs with its current seq outstanding (a task is never committed
    ///   twice; an older RUN, made stale by a newer event, may still wait for its ack);
    /// * a task the host believes dispatched to CPU c has its RUN outstanding on c, and a
    ///   CPU `Committed` to a task has that task's RUN outstanding;
    /// * the pid index and the task table agree;
    /// * every valid record the engine delivered was counted once, as a message or as
    ///   discarded before the session.
    ///
    /// Returns the first violation found.
    pub fn check_invariants(&self) -> Result<(), String> {
        let n = self.view.cpus.len();
        if n != self.engine.num_cpus() as usize {
            return Err(format!(
                "{n} CPU entries for {} CPUs",
                self.engine.num_cpus()
            ));
        }
        let mut runs: HashMap<Gtid, Vec<u16>> = HashMap::new();
        let mut current: HashMap<Gtid, Vec<u16>> = HashMap::new();
        for (c, ci) in self.view.cpus.iter().enumerate() {
            let cpu = c as u16;
            let commits = self.commits.on_cpu(cpu);
            let gtids: Vec<Gtid> = commits.iter().map(|k| k.gtid).collect();
            if gtids != ci.pending {
                return Err(format!(
                    "cpu {c}: pending {:?} but commitments {gtids:?}",
                    ci.pending
                ));
            }
            let nruns = commits.iter().filter(|k| k.is_run()).count();
            if nruns > self.cfg.max_staged {
                return Err(format!(
                    "cpu {c}: {nruns} RUNs outstanding, max_staged {}",
                    self.cfg.max_staged
                ));
            }
            for k in commits.iter().filter(|k| k.is_run()) {
                runs.entry(k.gtid).or_default().push(cpu);
            }
            if let CpuState::Committed(g) = ci.state {
                if !commits.iter().any(|k| k.is_run() && k.gtid == g) {
                    return Err(format!(
                        "cpu {c} committed to {g} without its RUN outstanding"
                    ));
                }
            }
        }
        if self.commits.len()
            != self
                .view
                .cpus
                .iter()
                .map(|c| c.pending.len())
                .sum::<usize>()
        {
            return Err("commitment count differs from the CPUs' pending lists".into());
        }
        for c in 0..n as u16 {
            for k in self.commits.on_cpu(c).iter().filter(|k| k.is_run()) {
                if let Some(t) = self.view.tasks.get(&k.gtid) {
                    current
                        .entry(k.gtid)
                        .or_default()
                        .extend((k.seq == t.seq).then_some(c));
                }
            }
        }
        for (g, cpus) in &current {
            if cpus.len() > 1 {
                return Err(format!(
                    "task {g} has current RUNs outstanding on CPUs {cpus:?}"
                ));
            }
        }
        for (g, t) in &self.view.tasks {
            if t.gtid != *g {
                return Err(format!("task table entry {g} holds {}", t.gtid));
            }
            match t.state {
                TaskState::Dispatched(c) | TaskState::Running(c) if usize::from(c) >= n => {
                    return Err(format!("task {g} on CPU {c} of {n}"));
                }
                TaskState::Dispatched(c) if runs.get(g).is_none_or(|v| !v.contains(&c)) => {
                    return Err(format!(
                        "task {g} dispatched to CPU {c} but its RUNs are on {:?}",
                        runs.get(g)
                    ));
                }
                _ => {}
            }
            if self.pids.get(&g.pid()) != Some(g) {
                return Err(format!("task {g} missing from the pid index"));
            }
        }
        if self.pids.len() != self.view.tasks.len() {
            return Err(format!(
                "{} pids indexed for {} tasks",
                self.pids.len(),
                self.view.tasks.len()
            ));
        }
        let delivered = self.engine.stats().records_in;
        let counted = self.metrics.messages() + self.metrics.discarded_on_start;
        if counted != delivered {
            return Err(format!(
                "{counted} messages counted or discarded, {delivered} delivered by the engine"
            ));
        }
        Ok(())
    }
}
