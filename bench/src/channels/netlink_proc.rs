//! netlink, kernel -> user: the process-events connector (CONFIG_PROC_EVENTS,
//! built in, no module). The sender renames its thread with
//! prctl(PR_SET_NAME, "m<seq in hex>"); the kernel multicasts a
//! PROC_EVENT_COMM message to NETLINK_CONNECTOR group CN_IDX_PROC, where the
//! receiver waits in recv(2). The event carries only pid/tgid/comm, so the
//! 64 bytes travel in a shared ring and the receiver checks the seq in the
//! comm against the slot. Needs CAP_NET_ADMIN and the initial network namespace.

use crate::channel::{ChanError, Channel, MsgReceiver, MsgSender, Pair};
use crate::msg::Msg;
use crate::shm_ring::{ring, Consumer, Producer};
use crate::sys::{gettid, Fd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

const NETLINK_CONNECTOR: libc::c_int = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_CN_MCAST_IGNORE: u32 = 2;
/// Capability bit the kernel checks for PROC_CN_MCAST_LISTEN.
const CAP_NET_ADMIN: u32 = 12;
const PROC_EVENT_COMM: u32 = 0x200;
const NLMSG_HDR: usize = 16;
const CN_MSG_HDR: usize = 20;

pub struct NetlinkProc;

struct Tx {
    ring: Producer,
    tid: Arc<AtomicI32>,
}

struct Rx {
    fd: Fd,
    ring: Consumer,
    sender_tid: Arc<AtomicI32>,
    buf: Vec<u8>,
}

impl MsgSender for Tx {
    fn start(&mut self) -> Result<(), ChanError> {
        self.tid.store(gettid(), Ordering::Release);
        Ok(())
    }

    fn send(&mut self, m: &Msg) -> Result<(), ChanError> {
        self.ring.push(m);
        let mut name = [0u8; 16];
        let s = format!("m{:x}", m.seq());
        name[..s.len().min(15)].copy_from_slice(&s.as_bytes()[..s.len().min(15)]);
        // SAFETY: `name` is a NUL-terminated buffer of 16 bytes.
        if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) } != 0 {
            return Err(ChanError::last_os("prctl(PR_SET_NAME)"));
        }
        Ok(())
    }
}

/// Parses one netlink datagram; returns the seq of a matching COMM event.
fn parse_comm_event(d: &[u8], tgid: i32, tid: i32) -> Option<u64> {
    let u32_at = |o: usize| Some(u32::from_ne_bytes(d.get(o..o + 4)?.try_into().ok()?));
    let base = NLMSG_HDR + CN_MSG_HDR;
    if u32_at(NLMSG_HDR)? != CN_IDX_PROC || u32_at(base)? != PROC_EVENT_COMM {
        return None;
    }
    let (pid, ev_tgid) = (u32_at(base + 16)? as i32, u32_at(base + 20)? as i32);
    if ev_tgid != tgid || (tid != 0 && pid != tid) {
        return None;
    }
    let comm = d.get(base + 24..base + 40)?;
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    let text = std::str::from_utf8(&comm[..end]).ok()?;
    u64::from_str_radix(text.strip_prefix('m')?, 16).ok()
}

impl MsgReceiver for Rx {
    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<(), ChanError> {
        let tgid = std::process::id() as i32;
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.0, self.buf.as_mut_ptr().cast(), self.buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        return Err(ChanError::Protocol(
                            "netlink socket overrun (ENOBUFS): events dropped, no back-pressure"
                                .into(),
                        ))
                    }
                    _ => return Err(ChanError::io("recv netlink", e)),
                }
            }
            let tid = self.sender_tid.load(Ordering::Acquire);
            let Some(seq) = parse_comm_event(&self.buf[..n as usize], tgid, tid) else {
                continue;
            };
            let m = self.ring.pop().ok_or_else(|| {
                ChanError::Protocol(format!("event for seq {seq} but ring empty"))
            })?;
            if m.seq() & 0xff_ffff_ffff_ffff != seq {
                return Err(ChanError::Protocol(format!(
                    "event carried seq {seq}, ring slot holds {}",
                    m.seq()
                )));
            }
            out.push(m);
            return Ok(());
        }
    }
}

/// True if the effective capability set (from /proc/self/status) has `cap`.
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1 << cap) != 0)
}

impl Drop for Rx {
    fn drop(&mut self) {
        // Decrement the kernel's listener count, so proc events stop being
        // generated once nobody listens (best effort).
        let _ = mcast_ctl(&self.fd, PROC_CN_MCAST_IGNORE);
    }
}

fn subscribe(fd: &Fd) -> Result<(), ChanError> {
    mcast_ctl(fd, PROC_CN_MCAST_LISTEN)
}

fn mcast_ctl(fd: &Fd, op: u32) -> Result<(), ChanError> {
    // nlmsghdr + cn_msg + struct proc_input { mcast_op, event_type }
    let payload = 8usize;
    let total = NLMSG_HDR + CN_MSG_HDR + payload;
    let mut b = vec![0u8; total];
    b[0..4].copy_from_slice(&(total as u32).to_ne_bytes());
    b[4..6].copy_from_slice(&(libc::NLMSG_DONE as u16).to_ne_bytes());
    b[12..16].copy_from_slice(&std::process::id().to_ne_bytes());
    b[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
    b[20..24].copy_from_slice(&CN_VAL_PROC.to_ne_bytes());
    b[32..34].copy_from_slice(&(payload as u16).to_ne_bytes());
    b[36..40].copy_from_slice(&op.to_ne_bytes());
    b[40..44].copy_from_slice(&PROC_EVENT_COMM.to_ne_bytes());
    // SAFETY: `b` is valid for reads of its length.
    let r = unsafe { libc::send(fd.0, b.as_ptr().cast(), b.len(), 0) };
    if r < 0 {
        return Err(ChanError::last_os("send proc connector mcast op"));
    }
    Ok(())
}

impl Channel for NetlinkProc {
    fn name(&self) -> String {
        "netlink proc connector".into()
    }
    fn describe(&self) -> String {
        "prctl(PR_SET_NAME) makes the kernel multicast a PROC_EVENT_COMM netlink message (comm = seq, 64 B in shared ring); receiver in recv(2)".into()
    }
    fn open(&self) -> Result<Pair, ChanError> {
        // Without it the kernel refuses the subscription, and says so only
        // in a multicast ack we could not receive: check up front.
        if !has_capability(CAP_NET_ADMIN) {
            return Err(ChanError::Unavailable(
                "listening to proc events needs CAP_NET_ADMIN".into(),
            ));
        }
        // SAFETY: socket takes no pointers.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_CONNECTOR,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPROTONOSUPPORT) | Some(libc::EAFNOSUPPORT) => {
                    ChanError::Unavailable("kernel built without CONFIG_CONNECTOR".into())
                }
                _ => ChanError::io("socket(NETLINK_CONNECTOR)", e),
            });
        }
        let fd = Fd(fd);
        // SAFETY: sockaddr_nl is plain old data.
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = CN_IDX_PROC;
        // SAFETY: `sa` is a valid sockaddr_nl of the given size.
        let r = unsafe {
            libc::bind(
                fd.0,
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) => ChanError::Unavailable(
                    "joining CN_IDX_PROC needs CAP_NET_ADMIN in the initial netns".into(),
                ),
                _ => ChanError::io("bind netlink", e),
            });
        }
        let size: libc::c_int = 8 << 20;
        // SAFETY: `size` is a valid c_int option value; failure is harmless
        // (the ring bounds in-flight events anyway).
        unsafe {
            libc::setsockopt(
                fd.0,
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                4,
            )
        };
        subscribe(&fd)?;
        let (p, c) = ring(256);
        let tid = Arc::new(AtomicI32::new(0));
        Ok((
            Box::new(Tx {
                ring: p,
                tid: tid.clone(),
            }),
            Box::new(Rx {
                fd,
                ring: c,
                sender_tid: tid,
                buf: vec![0; 4096],
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_proc_delivers_all_in_order() {
        crate::runner::check_channel(&NetlinkProc);
    }

    #[test]
    fn parses_only_our_comm_events() {
        let mut d = vec![0u8; NLMSG_HDR + CN_MSG_HDR + 40];
        let base = NLMSG_HDR + CN_MSG_HDR;
        d[16..20].copy_from_slice(&CN_IDX_PROC.to_ne_bytes());
        d[base..base + 4].copy_from_slice(&PROC_EVENT_COMM.to_ne_bytes());
        d[base + 16..base + 20].copy_from_slice(&7i32.to_ne_bytes());
        d[base + 20..base + 24].copy_from_slice(&5i32.to_ne_bytes());
        d[base + 24..base + 28].copy_from_slice(b"m1f\0");
        assert_eq!(parse_comm_event(&d, 5, 7), Some(0x1f));
        assert_eq!(parse_comm_event(&d, 6, 7), None, "other process");
        assert_eq!(parse_comm_event(&d, 5, 8), None, "other thread");
        d[base + 24..base + 28].copy_from_slice(b"bash");
        assert_eq!(parse_comm_event(&d, 5, 7), None, "not ours");
    }
}
