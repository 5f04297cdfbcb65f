//! The daemon's stats socket: `<socket>.stats` beside its vhost-user socket (mode 0600).
//! Each connection gets one JSON line and is closed:
//!
//! ```json
//! {"pid":4242,"policy":"fifo","cpus":2,"state":"running","runs":1,"ended_runs":0,
//!  "ended_runs_ms":0,"run":{...milk_control::report::run_metrics...}}
//! ```
//!
//! `state` is `running` (a runtime serves the rings) or `idle`; `run` is the running
//! runtime (at most a snapshot period old), else the last one that ended, else null.
//! milk-vmm's vhost-user frontend reads it for `milkctl status` / `metrics`
//! ([`query`]); vhost-user itself has no message for counters.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::backend::MilkBackend;

/// How often the accept loop looks at its stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The stats socket of the daemon listening on `socket`.
pub fn stats_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".stats");
    PathBuf::from(p)
}

/// The stats reply of `backend` (see the module docs).
pub fn stats(backend: &MilkBackend, policy: &str, cpus: u32) -> Value {
    let ended = backend.summaries();
    let live = backend.snapshot();
    let running = backend.is_running();
    let run = live
        .as_ref()
        .or(ended.last())
        .map(milk_control::report::run_metrics)
        .unwrap_or(Value::Null);
    let ended_ms: u128 = ended.iter().map(|s| s.elapsed.as_millis()).sum();
    json!({
        "pid": std::process::id(),
        "policy": live.as_ref().map_or(policy, |s| s.policy.as_str()),
        "cpus": cpus,
        "state": if running { "running" } else { "idle" },
        "runs": ended.len() + usize::from(running),
        "ended_runs": ended.len(),
        "ended_runs_ms": ended_ms as u64,
        "run": run,
    })
}

/// Serves the stats socket until dropped (the file is removed then).
pub struct StatsServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StatsServer {
    /// Binds `stats_path(socket)` (a file left there is replaced) for `backend`.
    pub fn start(
        socket: &Path,
        backend: Arc<MilkBackend>,
        policy: String,
        cpus: u32,
    ) -> std::io::Result<Self> {
        let path = stats_path(socket);
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("milk-policy-stats".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((mut c, _)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_write_timeout(Some(Duration::from_secs(1)));
                            let mut line = stats(&backend, &policy, cpus).to_string();
                            line.push('\n');
                            let _ = c.write_all(line.as_bytes());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(POLL)
                        }
                        Err(e) => {
                            log::warn!("stats socket: {e}");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })?;
        Ok(StatsServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StatsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Errors reading a daemon's stats.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// Connecting or reading failed.
    #[error("stats socket {path}: {err}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: std::io::Error,
    },
    /// The reply was not one JSON object.
    #[error("stats socket {path}: bad reply: {msg}")]
    Bad {
        /// Socket path.
        path: PathBuf,
        /// Why.
        msg: String,
    },
}

/// Reads the stats of the daemon listening on `socket` (waits at most `timeout`).
pub fn query(socket: &Path, timeout: Duration) -> Result<Value, StatsError> {
    let path = stats_path(socket);
    let io = |err| StatsError::Io {
        path: path.clone(),
        err,
    };
    let c = UnixStream::connect(&path).map_err(io)?;
    c.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).map_err(io)?;
    let v: Value = serde_json::from_str(line.trim_end()).map_err(|e| StatsError::Bad {
        path: path.clone(),
        msg: e.to_string(),
    })?;
    if !v.is_object() {
        return Err(StatsError::Bad {
            path,
            msg: "not an object".into(),
        });
    }
    Ok(v)
}
