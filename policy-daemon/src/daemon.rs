//! Serving one frontend connection: what the `milk-policy` binary does, as a library so
//! tests and tools can run a daemon on a thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BackendConfig, BackendError, MilkBackend};
use crate::stats::StatsServer;

/// Daemon errors.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Bad configuration (cpu count, policy).
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {err}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        err: String,
    },
    /// The vhost-user framework failed.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// A daemon bound to its socket, not yet serving.
pub struct Listening {
    listener: Listener,
    backend: Arc<MilkBackend>,
    socket: PathBuf,
    stats: StatsServer,
}

/// Bind `socket` (an existing file there is replaced) for a backend with `cfg`.
pub fn listen(socket: &Path, cfg: BackendConfig) -> Result<Listening, DaemonError> {
    let (policy, cpus) = (cfg.policy.clone(), cfg.num_cpus);
    let backend = Arc::new(MilkBackend::new(cfg)?);
    let stats = StatsServer::start(socket, backend.clone(), policy, cpus).map_err(|e| {
        DaemonError::Listen {
            path: crate::stats::stats_path(socket),
            err: e.to_string(),
        }
    })?;
    let listener = Listener::new(socket, true).map_err(|e| DaemonError::Listen {
        path: socket.to_owned(),
        err: e.to_string(),
    })?;
    Ok(Listening {
        listener,
        backend,
        socket: socket.to_owned(),
        stats,
    })
}

impl Listening {
    /// The backend (counters, events).
    pub fn backend(&self) -> Arc<MilkBackend> {
        self.backend.clone()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The stats socket path (`<socket>.stats`).
    pub fn stats_socket(&self) -> &Path {
        self.stats.path()
    }

    /// Accept one frontend and serve it until it hangs up; a runtime still running then
    /// stops with GOODBYE. Returns the backend for its summaries.
    pub fn serve_one(mut self) -> Result<Arc<MilkBackend>, DaemonError> {
        let mut daemon = VhostUserDaemon::new(
            "milk-policy".into(),
            self.backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        log::info!("frontend connected on {}", self.socket.display());
        let res = daemon.wait();
        self.backend.shutdown();
        // Joins the worker thread: returns only because the backend has an exit event.
        drop(daemon);
        if let Err(e) = res {
            log::info!("connection ended: {e}");
        }
        Ok(self.backend)
    }
}
