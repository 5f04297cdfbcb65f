//! A fake QEMU for the transport tests: the client side of QEMU's ivshmem
//! protocol, and a guest driver playing on the shared memory it receives.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use milk_ivshmem::proto::recv_msg;
use milk_ivshmem::shm::{SharedMem, SHM_SIZE};
use milk_ivshmem::{Regs, TransportConfig};

/// What a QEMU ivshmem-doorbell device holds after the handshake.
pub struct FakeQemu {
    pub sock: UnixStream,
    pub id: i64,
    pub regs: Regs,
    /// `peers[vector]`: the host peer's eventfds (the doorbell writes these).
    pub host: Vec<OwnedFd>,
    pub host_peer: i64,
    /// Our own eventfds: the host writes them to interrupt us.
    pub irq: Vec<OwnedFd>,
}

pub fn write_fd(fd: &OwnedFd, v: u64) {
    // SAFETY: writing 8 bytes from a live u64 to a descriptor we own.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&v as *const u64).cast(), 8) };
    assert_eq!(n, 8, "eventfd write");
}

/// Non-blocking read of an eventfd counter (0 if not signalled).
pub fn read_fd(fd: &OwnedFd) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    if unsafe { libc::poll(&mut p, 1, 0) } != 1 {
        return 0;
    }
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into a live u64 from a descriptor we own.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    assert_eq!(n, 8);
    v
}

/// Waits up to `t` for `fd` to be signalled; returns its counter.
pub fn wait_fd(fd: &OwnedFd, t: Duration) -> u64 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, t.as_millis() as i32) };
    if r == 1 {
        read_fd(fd)
    } else {
        0
    }
}

impl FakeQemu {
    /// Connects and reads the handshake exactly as QEMU expects it.
    pub fn connect(t: &TransportConfig, vectors: usize) -> FakeQemu {
        let sock = UnixStream::connect(&t.socket_path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let next = || recv_msg(&sock).unwrap().expect("server closed early");
        let (v, fd) = next();
        assert_eq!((v, fd.is_none()), (0, true), "protocol version");
        let (id, fd) = next();
        assert!(fd.is_none() && (0..=65535).contains(&id), "client id {id}");
        let (v, shm_fd) = next();
        assert_eq!(v, -1, "shared memory message");
        let file = File::from(shm_fd.expect("shared memory fd"));
        assert_eq!(file.metadata().unwrap().len(), SHM_SIZE as u64);
        let regs = Regs::new(Arc::new(SharedMem::map(file, SHM_SIZE).unwrap())).unwrap();
        let mut host = Vec::new();
        let mut host_peer = -1;
        for _ in 0..vectors {
            let (peer, fd) = next();
            assert_ne!(peer, id);
            assert!(host_peer == -1 || host_peer == peer);
            host_peer = peer;
            host.push(fd.expect("host peer eventfd"));
        }
        let mut irq = Vec::new();
        for _ in 0..vectors {
            let (me, fd) = next();
            assert_eq!(me, id, "interrupt set-up carries our own id");
            irq.push(fd.expect("own eventfd"));
        }
        FakeQemu {
            sock,
            id,
            regs,
            host,
            host_peer,
            irq,
        }
    }

    /// The guest rings doorbell `(peer << 16) | vector`: QEMU writes that eventfd.
    pub fn doorbell(&self, peer: i64, vector: usize) {
        assert_eq!(peer, self.host_peer, "only the host peer exists");
        write_fd(&self.host[vector], 1);
    }

    /// One driver request: bump req_seq, ring vector 0, poll for the ack.
    pub fn request(&self) -> Duration {
        let seq = self.regs.req_seq().wrapping_add(1);
        self.regs.set_req_seq(seq);
        let t0 = Instant::now();
        self.doorbell(i64::from(self.regs.host_peer()), 0);
        while self.regs.ack_seq() != seq {
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "request {seq} not acked"
            );
            std::hint::spin_loop();
        }
        t0.elapsed()
    }

    pub fn set_status(&self, s: u32) -> u32 {
        self.regs.set_status(s);
        self.request();
        self.regs.status()
    }
}
