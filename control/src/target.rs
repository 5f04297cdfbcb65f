//! What the control socket acts on: one VM (its engine, boot, stop) and its virtio-milk
//! device's control handle. [`VmControl::handle`] carries out one request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virtio_milk::control::{DeviceState, PolicyControl};
use virtio_milk::metrics::Summary;

use crate::proto::Request;
use crate::report::{counters, merge, run_metrics};

/// A policy in another process (a `milk-policy` vhost-user daemon): planned swaps to
/// another daemon and the daemon's counters. milk-vmm's vhost-user frontend implements it
/// (both engines); without one, `swap --socket` is refused.
pub trait RemotePolicy: Send + Sync {
    /// Hand the queues to the daemon at `socket`; the result is the reply's `result`.
    fn swap_to_socket(&self, socket: &str) -> Result<Value, String>;
    /// The frontend's view and the current daemon's stats.
    fn status(&self) -> RemoteStatus;
}

/// What [`RemotePolicy::status`] reports.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteStatus {
    /// `inactive` (the guest driver has not started the device), `disconnected` (the
    /// daemon hung up; waiting for one), `unreachable` (connected, but its stats socket
    /// did not answer), or the daemon's own state (`running`, `idle`).
    pub state: String,
    /// The `daemon` object: socket, pid, connected, hangups, reconnects, swaps.
    pub daemon: Value,
    /// The daemon's stats reply (`milk_policy_daemon::stats`): policy, cpus, runs,
    /// ended_runs, ended_runs_ms, and `run` ([`run_metrics`] of its runtime, or null).
    pub stats: Option<Value>,
}

/// Stops the VM (asynchronously: the VM's main loop ends soon after).
pub type StopFn = Box<dyn Fn() -> Result<(), String> + Send + Sync>;

/// One VM as the control socket sees it.
pub struct VmControl {
    engine: String,
    boot_id: String,
    started: Instant,
    device: Option<Arc<dyn PolicyControl>>,
    remote: Mutex<Option<Arc<dyn RemotePolicy>>>,
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

    /// The policy runs in another process: `swap --socket` hands the queues to another
    /// daemon, `status` and `metrics` report the daemon's counters.
    pub fn set_remote(&self, r: Arc<dyn RemotePolicy>) {
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

    fn remote(&self) -> Option<Arc<dyn RemotePolicy>> {
        self.remote
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn device(&self) -> Result<&Arc<dyn PolicyControl>, String> {
        self.device.as_ref().ok_or_else(|| {
            if self.remote().is_some() {
                "the policy runs in a milk-policy daemon (--policy-socket): pause and \
                 resume need an in-process policy (--policy); use swap --socket"
                    .into()
            } else {
                "this VM has no virtio-milk device (started without --policy)".into()
            }
        })
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
            match self.remote() {
                Some(r) => remote_status(&mut v, &r.status()),
                None => v["state"] = json!("none"),
            }
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
        if self.device.is_none() {
            if let Some(r) = self.remote() {
                return Ok(remote_metrics(&r.status()));
            }
        }
        let d = self.device()?;
        let mut total = Duration::ZERO;
        let runs = d.summaries();
        for s in &runs {
            total += s.elapsed;
        }
        let Some(s) = self.current() else {
            return Ok(json!({ "state": d.state().name(), "runs": 0 }));
        };
        let mut v = json!({
            "state": d.state().name(),
            "ended_runs": runs.len(),
            "ended_runs_ms": total.as_millis() as u64,
        });
        merge(&mut v, &run_metrics(&s));
        Ok(v)
    }

    fn swap(&self, policy: Option<&str>, socket: Option<&str>) -> Result<Value, String> {
        match (policy, socket) {
            (Some(_), Some(_)) => Err("swap takes a policy or a socket, not both".into()),
            (None, None) => Err("swap needs a policy (NAME[:PARAMS]) or a socket".into()),
            (None, Some(sock)) => match self.remote() {
                Some(r) => r.swap_to_socket(sock),
                None => Err("swap --socket needs milk-vmm's vhost-user frontend \
                                 (--policy-socket), which this VM does not use"
                    .into()),
            },
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

/// `status` of a VM whose policy runs in a daemon: the frontend's state and the daemon's
/// policy, runs, session and counters (the same fields as an in-process device).
fn remote_status(v: &mut Value, r: &RemoteStatus) {
    v["state"] = json!(r.state);
    v["daemon"] = r.daemon.clone();
    let Some(st) = &r.stats else {
        return;
    };
    for k in ["policy", "cpus", "runs"] {
        v[k] = st[k].clone();
    }
    let run = &st["run"];
    if run.is_object() {
        for k in ["session_id", "session_established", "tasks", "counters"] {
            v[k] = run[k].clone();
        }
    }
}

/// `metrics` of a VM whose policy runs in a daemon: the daemon's running (else last)
/// runtime, as for an in-process device, plus the `daemon` object.
fn remote_metrics(r: &RemoteStatus) -> Value {
    let mut v = json!({ "state": r.state, "daemon": r.daemon });
    let Some(st) = &r.stats else {
        v["runs"] = json!(0);
        return v;
    };
    let run = &st["run"];
    if !run.is_object() {
        v["runs"] = json!(0);
        return v;
    }
    v["ended_runs"] = st["ended_runs"].clone();
    v["ended_runs_ms"] = st["ended_runs_ms"].clone();
    merge(&mut v, run);
    v
}
