//! The control socket server: a Unix stream socket (mode 0600) served by one thread, one
//! client at a time, one JSON request per line (see [`crate::proto`]).
//!
//! Whatever a client sends, the VM keeps running: a malformed, unknown or oversized request
//! gets an error reply and changes nothing; a client that disconnects mid-line is forgotten
//! (its partial request is never carried out); a second client while one is still connected
//! after [`BUSY_GRACE`] gets an error reply and is closed; an idle client is closed after
//! [`IDLE_TIMEOUT`].

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::proto::{parse_request, Reply, MAX_LINE};
use crate::target::VmControl;

/// A connected client that sends nothing for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a new client waits for the connected one to finish before it is refused.
pub const BUSY_GRACE: Duration = Duration::from_millis(500);

/// Control socket errors.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The path is taken by a live socket or another file.
    #[error("control socket {0}: in use")]
    InUse(PathBuf),
    /// Creating, binding or configuring the socket failed.
    #[error("control socket {0}: {1}")]
    Io(PathBuf, io::Error),
}

/// Where the control socket goes without `--api-sock`: `$XDG_RUNTIME_DIR/milk/` if set,
/// else `/run/milk/`, named after the process (`milk-vmm-<pid>.sock`).
pub fn default_socket_path() -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run"));
    dir.join("milk")
        .join(format!("milk-vmm-{}.sock", std::process::id()))
}

/// A running control socket; dropping it stops serving and removes the socket file.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn prepare(path: &Path) -> Result<(), ControlError> {
    let io_err = |e| ControlError::Io(path.to_owned(), e);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(e)),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ControlError::InUse(path.to_owned()));
            }
            // Left behind by a VMM that died: take it over.
            std::fs::remove_file(path).map_err(io_err)
        }
        Ok(_) => Err(ControlError::InUse(path.to_owned())),
    }
}

impl ControlServer {
    /// Binds `path` (mode 0600; a stale socket left by a dead VMM is replaced, a live one
    /// or another file is refused) and serves `vm` on a new thread.
    pub fn bind(path: &Path, vm: Arc<VmControl>) -> Result<Self, ControlError> {
        let io_err = |e| ControlError::Io(path.to_owned(), e);
        prepare(path)?;
        let listener = UnixListener::bind(path).map_err(io_err)?;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            let _ = std::fs::remove_file(path);
            return Err(io_err(e));
        }
        listener.set_nonblocking(true).map_err(io_err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("milk-control".into())
            .spawn(move || accept_loop(listener, vm, stop2))
            .map_err(io_err)?;
        Ok(ControlServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

fn accept_loop(listener: UnixListener, vm: Arc<VmControl>, stop: Arc<AtomicBool>) {
    let busy = Arc::new(AtomicBool::new(false));
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(listener.as_raw_fd(), 100) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        // A client that just hung up may not have been noticed yet: give it a moment.
        let mut waited = Duration::ZERO;
        while busy.load(Ordering::Acquire) && waited < BUSY_GRACE {
            std::thread::sleep(Duration::from_millis(5));
            waited += Duration::from_millis(5);
        }
        if busy.swap(true, Ordering::AcqRel) {
            log::info!("control socket: refusing a second client");
            let mut s = stream;
            let _ = s.set_nonblocking(false);
            let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = s.write_all(
                Reply::error("busy: another client is connected; try again")
                    .to_line()
                    .as_bytes(),
            );
            continue;
        }
        clients.retain(|h| !h.is_finished());
        let vm = vm.clone();
        let busy2 = busy.clone();
        let stop2 = stop.clone();
        match std::thread::Builder::new()
            .name("milk-control-client".into())
            .spawn(move || {
                if let Err(e) = serve_client(stream, &vm, &stop2) {
                    log::debug!("control client: {e}");
                }
                busy2.store(false, Ordering::Release);
            }) {
            Ok(h) => clients.push(h),
            Err(e) => {
                log::warn!("control socket: cannot serve a client: {e}");
                busy.store(false, Ordering::Release);
            }
        }
    }
    for h in clients {
        let _ = h.join();
    }
}

/// Serves one client until it disconnects, misbehaves, idles out, or the server stops.
fn serve_client(mut s: UnixStream, vm: &VmControl, stop: &AtomicBool) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut line: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    let mut idle = Duration::ZERO;
    loop {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
        let n = match s.read(&mut buf) {
            Ok(0) => {
                if !line.is_empty() {
                    log::info!(
                        "control client left mid-request ({} bytes ignored)",
                        line.len()
                    );
                }
                return Ok(());
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                idle += Duration::from_millis(200);
                if idle >= IDLE_TIMEOUT {
                    let _ = s.write_all(Reply::error("idle timeout").to_line().as_bytes());
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        idle = Duration::ZERO;
        let mut rest = &buf[..n];
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            line.extend_from_slice(&rest[..pos]);
            rest = &rest[pos + 1..];
            if line.len() > MAX_LINE {
                break;
            }
            let reply = answer(&line, vm);
            line.clear();
            s.write_all(reply.to_line().as_bytes())?;
        }
        line.extend_from_slice(rest);
        if line.len() > MAX_LINE {
            // The rest of this line cannot be told from the next request: close.
            let msg = format!("request line longer than {MAX_LINE} bytes; closing");
            s.write_all(Reply::error(msg).to_line().as_bytes())?;
            return Ok(());
        }
    }
}

fn answer(line: &[u8], vm: &VmControl) -> Reply {
    let Ok(text) = std::str::from_utf8(line) else {
        return Reply::error("request is not UTF-8");
    };
    let text = text.trim();
    if text.is_empty() {
        return Reply::error("empty request");
    }
    let req = match parse_request(text) {
        Ok(r) => r,
        Err(e) => return Reply::error(e),
    };
    log::info!("control: {}", req.name());
    match vm.handle(&req) {
        Ok(v) => Reply::ok(v),
        Err(e) => Reply::error(e),
    }
}
