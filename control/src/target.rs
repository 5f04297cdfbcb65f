//! What the control socket acts on: one VM (its engine, boot, stop) and its virtio-milk
//! device's control handle. [`VmControl::handle`] carries out one request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virtio_milk::control::{DeviceState, PolicyControl};
use virtio_milk::metrics::{Histogram, Summary};
use virtio_milk::protocol::AckStatus;

use crate::proto::Request;

/// Swaps to a policy in another process (a vhost-user policy daemon behind `socket`). The
/// KVM engine's vhost-user frontend implements it; without one, `swap --socket` is refused.
pub trait RemoteSwap: Send + Sync {
    /// Hand the queues to the daemon at `socket`; the result is the reply's `result`.
    fn swap_to_socket(&self, socket: &str) -> Result<Value, String>;
}

/// Stops the VM (asynchronously: the VM's main loop ends soon after).
pub type StopFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One VM as the control socket sees it.
pub struct VmControl {
    engine: String,
    boot_id: String,
    started: Instant,
    device: Option<Arc<dyn PolicyControl>>,
    remote: Mutex<Option<Arc<dyn RemoteSwap>>>,
    stop: StopFn,
    stopping: AtomicBool,
}

/// A fresh random id for one guest boot (32 hex digits).
pub fn new_boot_id() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    if !ok {
        // Unique enough for one host: time and pid.
        let t = virtio_milk::metrics::monotonic_ns();
        b[..8].copy_from_slice(&t.to_le_bytes());
        b[8..12].copy_from_slice(&std::process::id().to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hist(h: &Histogram) -> Value {
    json!({
        "count": h.count(),
        "min_ns": h.min(),
        "mean_ns": h.mean(),
        "p50_ns": h.percentile(50.0),
        "p90_ns": h.percentile(90.0),
        "p99_ns": h.percentile(99.0),
        "max_ns": h.max(),
    })
}

fn acks(a: &[u64; AckStatus::COUNT]) -> Value {
    let mut m = serde_json::Map::new();
    for s in AckStatus::ALL {
        m.insert(s.name().to_ascii_lowercase(), json!(a[s as usize]));
    }
    Value::Object(m)
}

fn counters(s: &Summary) -> Value {
    let m = &s.metrics;
    json!({
        "messages": m.messages(),
        "decisions_run": m.decisions_run,
        "decisions_preempt": m.decisions_preempt,
        "acks": acks(&m.acks),
        "stale_events": m.stale_events,
        "unknown_task_events": m.unknown_task_events,
        "policy_rejects": m.policy_rejects,
        "unmatched_acks": m.unmatched_acks,
        "queue_full": m.queue_full,
        "policy_swaps": m.policy_swaps,
        "guest_fallbacks": m.guest_fallbacks,
        "malformed": s.engine.malformed_total(),
    })
}

impl VmControl {
    /// A VM run by `engine` (`kvm`, `qemu`) whose guest boots now, with its virtio-milk
    /// device (`None`: booted without a policy) and a way to stop it.
    pub fn new(engine: &str, device: Option<Arc<dyn PolicyControl>>, stop: StopFn) -> Self {
        VmControl {
            engine: engine.to_owned(),
            boot_id: new_boot_id(),
            started: Instant::now(),
            device,
            remote: Mutex::new(None),
            stop,
            stopping: AtomicBool::new(false),
        }
    }

    /// Lets `swap --socket` hand the queues to another process.
    pub fn set_remote_swap(&self, r: Arc<dyn RemoteSwap>) {
        *self.remote.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// The id of this guest boot.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    /// Whether `stop` was requested.
    pub fn stop_requested(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    fn device(&self) -> Result<&Arc<dyn PolicyControl>, String> {
        self.device
            .as_ref()
            .ok_or_else(|| "this VM has no virtio-milk device (started without --policy)".into())
    }

    /// Live counters of the running runtime, else those of the last run that ended.
    fn current(&self) -> Option<Summary> {
        let d = self.device.as_ref()?;
        d.snapshot().or_else(|| d.summaries().pop())
    }

    /// Carries out `req`; the value is the reply's `result`, the error its `error`.
    pub fn handle(&self, req: &Request) -> Result<Value, String> {
        match req {
            Request::Status => Ok(self.status()),
            Request::Policies => Ok(self.policies()),
            Request::Metrics => self.metrics(),
            Request::Swap { policy, socket } => self.swap(policy.as_deref(), socket.as_deref()),
            Request::Pause => {
                let d = self.device()?;
                if d.state() == DeviceState::Inactive {
                    return Err("the guest driver has not started the device".into());
                }
                let was = d.pause().map_err(|e| e.to_string())?;
                Ok(json!({ "paused": was, "state": d.state().name() }))
            }
            Request::Resume => {
                let d = self.device()?;
                if d.state() == DeviceState::Inactive {
                    return Err("the guest driver has not started the device".into());
                }
                let did = d.resume().map_err(|e| e.to_string())?;
                Ok(json!({ "resumed": did, "state": d.state().name(), "policy": d.policy() }))
            }
            Request::Stop => {
                if self.stopping.swap(true, Ordering::AcqRel) {
                    return Ok(json!({ "stopping": true, "already": true }));
                }
                (self.stop)()?;
                Ok(json!({ "stopping": true }))
            }
        }
    }

    fn status(&self) -> Value {
        let uptime = self.started.elapsed();
        let mut v = json!({
            "engine": self.engine,
            "pid": std::process::id(),
            "boot_id": self.boot_id,
            "guest_uptime_ms": uptime.as_millis() as u64,
            "policy_version": milk_policies::registry::VERSION,
        });
        let Some(d) = &self.device else {
            v["state"] = json!("none");
            return v;
        };
        v["state"] = json!(d.state().name());
        v["policy"] = json!(d.policy());
        v["cpus"] = json!(d.num_cpus());
        let running = d.state() == DeviceState::Running;
        v["runs"] = json!(d.summaries().len() + usize::from(running));
        if let Some(s) = self.current() {
            v["session_id"] = json!(s.session_id);
            v["session_established"] = json!(s.session_established);
            v["tasks"] = json!(s.tasks);
            v["counters"] = counters(&s);
        }
        v
    }

    fn policies(&self) -> Value {
        let list: Vec<Value> = milk_policies::names()
            .iter()
            .map(|n| json!({ "name": n, "about": milk_policies::registry::describe(n) }))
            .collect();
        let current = self.device.as_ref().map(|d| d.policy());
        json!({
            "policies": list,
            "current": current,
            "version": milk_policies::registry::VERSION,
        })
    }

    fn metrics(&self) -> Result<Value, String> {
        let d = self.device()?;
        let mut total = Duration::ZERO;
        let runs = d.summaries();
        for s in &runs {
            total += s.elapsed;
        }
        let Some(s) = self.current() else {
            return Ok(json!({ "state": d.state().name(), "runs": 0 }));
        };
        let m = &s.metrics;
        let mut by_type = serde_json::Map::new();
        for ty in 0u16..128 {
            let c = m.msgs_by_type[usize::from(ty)];
            if c > 0 {
                by_type.insert(
                    virtio_milk::protocol::type_name(ty).to_ascii_lowercase(),
                    json!(c),
                );
            }
        }
        Ok(json!({
            "state": d.state().name(),
            "policy": s.policy,
            "run_elapsed_ms": s.elapsed.as_millis() as u64,
            "ended_runs": runs.len(),
            "ended_runs_ms": total.as_millis() as u64,
            "session_id": s.session_id,
            "counters": counters(&s),
            "messages_by_type": Value::Object(by_type),
            "injected": m.injected,
            "discarded_on_start": m.discarded_on_start,
            "dropped_old_decisions": m.dropped_old_decisions,
            "session_sent": m.session_sent,
            "engine": {
                "event_chains": s.engine.event_chains,
                "records_in": s.engine.records_in,
                "records_out": s.engine.records_out,
                "decision_chains": s.engine.decision_chains,
                "decision_queue_empty": s.engine.decision_queue_empty,
                "interrupts": s.engine.interrupts,
                "interrupts_suppressed": s.engine.interrupts_suppressed,
            },
            "latency": {
                "event_to_decision": hist(&m.latency),
                "decision_to_ack": hist(&m.apply_latency),
                "swap_stall": hist(&m.swap_stall),
                "swap_blackout": hist(&m.swap_blackout),
                "decision_gap": hist(&m.decision_gap),
            },
        }))
    }

    fn swap(&self, policy: Option<&str>, socket: Option<&str>) -> Result<Value, String> {
        match (policy, socket) {
            (Some(_), Some(_)) => Err("swap takes a policy or a socket, not both".into()),
            (None, None) => Err("swap needs a policy (NAME[:PARAMS]) or a socket".into()),
            (None, Some(sock)) => {
                let r = self
                    .remote
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                match r {
                    Some(r) => r.swap_to_socket(sock),
                    None => Err("swap --socket needs milk-vmm's vhost-user frontend \
                                 (--policy-socket), which this VM does not use"
                        .into()),
                }
            }
            (Some(spec), None) => {
                let d = self.device()?;
                let r = milk_policies::resolve(spec).map_err(|e| e.to_string())?;
                let from = d.policy();
                let live = d.set_policy(&r.spec, r.factory);
                Ok(json!({
                    "from": from,
                    "to": r.spec,
                    "swapped_live": live,
                    "state": d.state().name(),
                }))
            }
        }
    }
}
