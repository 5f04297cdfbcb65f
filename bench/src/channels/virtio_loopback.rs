//! virtio-milk in a host-only loopback: `virtio_milk::loopback` runs a Rust
//! thread as the guest driver over shared memory against the real queue
//! engine and runtime (with the `fifo` policy from milk-policies). It is a
//! closed loop: the guest sends TASK_WAKEUP events on the event queue, the
//! host answers with RUN decisions in pre-posted decision buffers, the guest
//! applies them (and acknowledges). Its latency sample is event creation ->
//! decision applied, a round trip, so the row reports RTT/2 as one-way.
//! The loopback validates every record itself (sequence numbers, stale or
//! malformed decisions); a run with any rejection or protocol error fails.

use crate::row::Row;

/// How the two sides wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Sleep on eventfds (kick/interrupt) with EVENT_IDX suppression.
    Notify,
    /// Both sides spin on the rings.
    Poll,
}

/// One virtio-milk row: mode, records per buffer and guest CPUs (one task each).
pub struct VirtioLoopback {
    pub mode: Mode,
    pub batch: usize,
    pub cpus: u16,
}

/// The six rows of the issue (notify/poll x batch 1/8/32, 4 guest CPUs x 1 task: four
/// loops in flight), and poll with a single loop (1 CPU x 1 task: one round trip in
/// flight, the shape of the busy-poll floor row).
pub fn rows() -> Vec<Box<dyn Row>> {
    let mut v: Vec<Box<dyn Row>> = Vec::new();
    for mode in [Mode::Notify, Mode::Poll] {
        for batch in [1, 8, 32] {
            v.push(Box::new(VirtioLoopback {
                mode,
                batch,
                cpus: 4,
            }));
        }
    }
    v.push(Box::new(VirtioLoopback {
        mode: Mode::Poll,
        batch: 8,
        cpus: 1,
    }));
    v
}

impl VirtioLoopback {
    fn label(&self) -> String {
        let m = match self.mode {
            Mode::Notify => "notify",
            Mode::Poll => "poll",
        };
        if self.cpus == 4 {
            format!("virtio-milk {m} b{}", self.batch)
        } else {
            format!("virtio-milk {m} b{} {}cpu", self.batch, self.cpus)
        }
    }
}

#[cfg(feature = "virtio")]
mod imp {
    use super::{Mode, VirtioLoopback};
    use crate::channel::ChanError;
    use crate::clock::{process_cpu_ns, thread_cpu_ns};
    use crate::row::Row;
    use crate::runner::{RunConfig, RunResult};
    use crate::sys::{gettid, pin_tid, set_fifo_tid, threads_named};
    use std::sync::atomic::{AtomicI32, Ordering};
    use std::sync::Arc;
    use virtio_milk::loopback::{run_loopback, LoopbackConfig, NotifyMode};

    impl Row for VirtioLoopback {
        fn name(&self) -> String {
            self.label()
        }

        fn describe(&self) -> String {
            let how = match self.mode {
                Mode::Notify => "kick/interrupt eventfds with EVENT_IDX suppression",
                Mode::Poll => "both sides spin on the rings",
            };
            format!(
                "virtio_milk::loopback (fifo policy), {} guest CPU(s) x 1 task, up to {} records/buffer, {how}; closed loop wakeup->RUN applied, latency = RTT/2, msgs/s counts records both ways",
                self.cpus, self.batch
            )
        }

        fn run(&self, cfg: &RunConfig) -> Result<RunResult, ChanError> {
            let policy = milk_policies::by_name("fifo")
                .map_err(|e| ChanError::Unavailable(e.to_string()))?;
            let lcfg = LoopbackConfig {
                // One task per guest CPU (queue pair): no task queues
                // behind another, so a sample is one channel round trip;
                // four CPUs put four loops in flight (the virtio-milk
                // loopback doc uses the same shape), one CPU a single one.
                num_cpus: self.cpus,
                tasks: u32::from(self.cpus),
                batch: self.batch,
                mode: match self.mode {
                    Mode::Notify => NotifyMode::Notification,
                    Mode::Poll => NotifyMode::Polling,
                },
                runs: cfg.warmup + cfg.lat_msgs,
                timeout: cfg.timeout,
                ..LoopbackConfig::default()
            };
            // The guest runs on the calling thread and spawns the runtime
            // thread, which would inherit its CPU mask and policy. So both
            // start unpinned; once the runtime thread exists, the guest goes
            // to the sender CPU and the runtime to the receiver CPU (and both
            // to SCHED_FIFO with --fifo).
            let guest_tid = Arc::new(AtomicI32::new(0));
            let gt = guest_tid.clone();
            let before = threads_named("milk-runtime");
            let h = std::thread::spawn(move || {
                gt.store(gettid(), Ordering::Release);
                let cpu0 = process_cpu_ns();
                let t0 = thread_cpu_ns();
                let r = run_loopback(lcfg, policy);
                (r, process_cpu_ns() - cpu0, thread_cpu_ns() - t0)
            });
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_millis(500) && !h.is_finished() {
                let fresh = threads_named("milk-runtime")
                    .into_iter()
                    .find(|t| !before.contains(t));
                if let Some(rt) = fresh {
                    let guest = guest_tid.load(Ordering::Acquire);
                    if let (Some(tx), Some(rx)) = (cfg.sender_cpu, cfg.receiver_cpu) {
                        pin_tid(guest, tx);
                        pin_tid(rt, rx);
                    }
                    if let Some(p) = cfg.fifo_priority {
                        set_fifo_tid(guest, p);
                        set_fifo_tid(rt, p);
                    }
                    break;
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            let (r, cpu, guest_cpu) = h
                .join()
                .map_err(|_| ChanError::Protocol("loopback thread panicked".into()))?;
            let s = r.map_err(|e| ChanError::Protocol(format!("virtio-milk loopback: {e}")))?;
            let rejected: u64 = s.rejected.iter().sum();
            if rejected > 0 || s.guest_protocol_errors > 0 {
                return Err(ChanError::Protocol(format!(
                    "loopback guest rejected {rejected} decisions, {} protocol errors",
                    s.guest_protocol_errors
                )));
            }
            if s.runs_applied < cfg.warmup + cfg.lat_msgs {
                return Err(ChanError::Protocol(format!(
                    "only {} of {} decisions applied",
                    s.runs_applied,
                    cfg.warmup + cfg.lat_msgs
                )));
            }
            let msgs = s.records_sent + s.records_received;
            Ok(RunResult {
                latency_ns: s
                    .latencies_ns
                    .iter()
                    .skip(cfg.warmup as usize)
                    .take(cfg.lat_msgs as usize)
                    .map(|rtt| rtt / 2)
                    .collect(),
                tput_msgs: msgs,
                tput_wall_ns: s.elapsed.as_nanos() as u64,
                tput_cpu_ns: cpu,
                sender_cpu_ns: guest_cpu,
                receiver_cpu_ns: cpu.saturating_sub(guest_cpu),
                // The host side is the loopback's own thread: not measured.
                rx_idle_cpu_ns_per_msg: None,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn loopback_rows_complete_with_every_decision_valid() {
            for row in super::super::rows() {
                let cfg = crate::runner::smoke_config();
                let r = crate::row::Row::run(row.as_ref(), &cfg)
                    .unwrap_or_else(|e| panic!("{}: {e}", row.name()));
                assert_eq!(r.latency_ns.len() as u64, cfg.lat_msgs, "{}", row.name());
                assert!(r.tput_msgs > cfg.lat_msgs, "{}", row.name());
            }
        }
    }
}

#[cfg(not(feature = "virtio"))]
impl Row for VirtioLoopback {
    fn name(&self) -> String {
        self.label()
    }
    fn describe(&self) -> String {
        "virtio-milk loopback (built without the `virtio` feature)".into()
    }
    fn run(
        &self,
        _cfg: &crate::runner::RunConfig,
    ) -> Result<crate::runner::RunResult, crate::channel::ChanError> {
        Err(crate::channel::ChanError::Unavailable(
            "pending: virtio-milk loopback not available".into(),
        ))
    }
}
