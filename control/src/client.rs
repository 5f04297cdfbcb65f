//! A control socket client (what `milkctl` uses).

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{Reply, Request};

/// Client errors.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Could not connect.
    #[error("cannot connect to {0}: {1}")]
    Connect(PathBuf, io::Error),
    /// The connection failed mid-request.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection without a reply.
    #[error("the VMM closed the connection without replying")]
    NoReply,
    /// The reply is not a reply.
    #[error("unreadable reply: {0}")]
    BadReply(String),
}

/// One connection to a control socket.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects to the socket at `path`; every reply must come within `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// Sends one raw line (a newline is added) and reads one reply line.
    pub fn raw(&mut self, line: &str) -> Result<Reply, ClientError> {
        self.stream.write_all(line.as_bytes())?;
        self.stream.write_all(b"\n")?;
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(ClientError::NoReply);
        }
        serde_json::from_str(reply.trim_end()).map_err(|e| ClientError::BadReply(e.to_string()))
    }

    /// Sends `req` and reads its reply.
    pub fn request(&mut self, req: &Request) -> Result<Reply, ClientError> {
        let line = serde_json::to_string(req).map_err(|e| ClientError::BadReply(e.to_string()))?;
        self.raw(&line)
    }
}
