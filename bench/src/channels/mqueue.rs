//! POSIX message queue: mq_send/mq_receive of 64-byte messages.

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::{Msg, MSG_SIZE};
use std::ffi::CString;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

pub struct MQueue;

struct Mqd(libc::mqd_t);

impl Drop for Mqd {
    fn drop(&mut self) {
        // SAFETY: we own this queue descriptor and close it once.
        unsafe { libc::mq_close(self.0) };
    }
}

struct Tx(Arc<Mqd>);
struct Rx(Arc<Mqd>, [u8; 256]);

impl MsgSender for Tx {
    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        loop {
            // SAFETY: the buffer is valid for MSG_SIZE bytes.
            let r = unsafe { libc::mq_send(self.0 .0, m.0.as_ptr().cast(), MSG_SIZE, 0) };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ChanError::io("mq_send", e));
            }
        }
    }
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        loop {
            // SAFETY: the buffer is valid for its full length, which is at
            // least the queue's mq_msgsize as mq_receive requires.
            let n = unsafe {
                libc::mq_receive(
                    self.0 .0,
                    self.1.as_mut_ptr().cast(),
                    self.1.len(),
                    std::ptr::null_mut(),
                )
            };
            if n >= 0 {
                let m = Msg::from_slice(&self.1[..n as usize])
                    .ok_or_else(|| ChanError::Protocol(format!("short mq message ({n} B)")))?;
                out.push(m);
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(ChanError::io("mq_receive", e));
            }
        }
    }
}

fn open_queue(name: &CString, maxmsg: libc::c_long) -> Result<Mqd, std::io::Error> {
    // SAFETY: mq_attr is plain old data.
    let mut attr: libc::mq_attr = unsafe { std::mem::zeroed() };
    attr.mq_maxmsg = maxmsg;
    attr.mq_msgsize = MSG_SIZE as libc::c_long;
    // SAFETY: `name` is NUL-terminated and `attr` outlives the call.
    let q = unsafe {
        libc::mq_open(
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
            0o600 as libc::mode_t,
            &attr as *const libc::mq_attr,
        )
    };
    if q < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(Mqd(q))
    }
}

impl Channel for MQueue {
    fn name(&self) -> String {
        "posix mqueue".into()
    }
    fn describe(&self) -> String {
        "mq_send/mq_receive of 64 B; blocking both ways".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "/milk-bench-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let cname = CString::new(name).map_err(|_| ChanError::Protocol("queue name".into()))?;
        // Deeper queues need CAP_SYS_RESOURCE beyond fs.mqueue.msg_max.
        let q = open_queue(&cname, 256)
            .or_else(|_| open_queue(&cname, 10))
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSYS) => {
                    ChanError::Unavailable("kernel built without POSIX_MQUEUE".into())
                }
                _ => ChanError::io("mq_open", e),
            })?;
        // SAFETY: `cname` is NUL-terminated; the open descriptor stays valid.
        unsafe { libc::mq_unlink(cname.as_ptr()) };
        let q = Arc::new(q);
        Ok((Box::new(Tx(q.clone())), Box::new(Rx(q, [0; 256]))))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mqueue_delivers_all_in_order() {
        crate::runner::check_channel(&super::MQueue);
    }
}
