//! Wire format of QEMU's ivshmem client-server protocol (QEMU's
//! `docs/specs/ivshmem-spec.txt`, "The ivshmem Client-Server Protocol"):
//! every message is one 8-byte little-endian signed integer, optionally with
//! one file descriptor attached as `SCM_RIGHTS`.
//!
//! The server only sends; QEMU only receives. [`recv_msg`] exists for tests
//! and tools that play the client.

use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// Protocol version the server announces first.
pub const PROTOCOL_VERSION: i64 = 0;
/// The message value that accompanies the shared-memory descriptor.
pub const SHM_MSG: i64 = -1;

/// Room for one descriptor's control message.
fn cmsg_space() -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(size_of::<RawFd>() as u32) as usize }
}

/// Sends one message, with `fd` attached if given. Retries on `EINTR`.
pub fn send_msg(sock: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    let bytes = value.to_le_bytes();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let space = cmsg_space();
        debug_assert!(space <= size_of::<[u64; 4]>());
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points at `cbuf`, which is large enough and aligned
        // for one cmsghdr carrying one int (CMSG_SPACE above), so CMSG_FIRSTHDR
        // is non-null and CMSG_DATA points inside `cbuf`.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` points at `iov`/`bytes` and `cbuf`, all alive for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n as usize != bytes.len() {
            // An 8-byte send on a stream socket is not split in practice; if it
            // were, the stream would be out of sync with a descriptor attached.
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short send: {n} of 8 bytes"),
            ));
        }
        return Ok(());
    }
}

/// Receives one message and the descriptor attached to it, if any.
///
/// Returns `Ok(None)` at end of stream (the peer closed the connection).
pub fn recv_msg(sock: &UnixStream) -> io::Result<Option<(i64, Option<OwnedFd>)>> {
    let mut bytes = [0u8; 8];
    let mut got = 0usize;
    let mut fd = None;
    while got < bytes.len() {
        let mut iov = libc::iovec {
            iov_base: bytes[got..].as_mut_ptr().cast(),
            iov_len: bytes.len() - got,
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: plain old data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 8]>() as _;
        // SAFETY: `msg` points at live buffers of the stated sizes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages the kernel just wrote into
        // `cbuf`, with the length it reported in msg_controllen.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    for i in 0..payload / size_of::<RawFd>() {
                        let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        // The kernel installed this descriptor for us: we own it.
                        let owned = OwnedFd::from_raw_fd(raw);
                        if fd.is_none() {
                            fd = Some(owned);
                        } // extra descriptors are closed by dropping `owned`
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "control message truncated",
            ));
        }
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a message",
                ))
            };
        }
        got += n as usize;
    }
    Ok(Some((i64::from_le_bytes(bytes), fd)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn value_and_descriptor_round_trip() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"through the socket").unwrap();
        send_msg(&a, -1, Some(f.as_fd())).unwrap();
        send_msg(&a, 0x1234_5678_9abc, None).unwrap();
        let (v, fd) = recv_msg(&b).unwrap().unwrap();
        assert_eq!(v, -1);
        let mut g = std::fs::File::from(fd.unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the socket");
        let (v, fd) = recv_msg(&b).unwrap().unwrap();
        assert_eq!(v, 0x1234_5678_9abc);
        assert!(fd.is_none());
        drop(a);
        assert!(recv_msg(&b).unwrap().is_none());
    }

    #[test]
    fn a_torn_message_is_an_error() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[1, 2, 3]).unwrap();
        drop(a);
        assert_eq!(
            recv_msg(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
