//! A fake guest for host-only tests of the vhost-user daemon: a virtio-milk driver on
//! memfd-backed memory (shareable with the daemon like a VM's RAM), driving real rings
//! through `virtio_milk::loopback::DriverQueue`, and a helper to run `milk-policy`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use milk_policy_daemon::frontend::{DeviceSetup, RingSetup};
use virtio_milk::loopback::{DriverQueue, LoopbackMemory};
use virtio_milk::metrics::monotonic_ns;
use virtio_milk::protocol::{
    msg, pack_name, parse_record, AckInfo, AckStatus, DecisionInfo, Direction, EventInfo, Gtid,
    Message, SessionInfo, TaskEventKind, TaskNewInfo, DEVICE_FEATURES, RECORD_SIZE, WAKE_NEW,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const QUEUE_SIZE: u16 = 256;

struct Task {
    seq: u64,
    runnable: bool,
}

/// The fake guest. Single-threaded: call [`FakeGuest::step`] in a loop.
pub struct FakeGuest {
    pub cpus: u16,
    pub mem: GuestMemoryMmap<()>,
    lm: LoopbackMemory,
    queues: Vec<DriverQueue>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    tasks: HashMap<Gtid, Task>,
    pending: Vec<Vec<[u8; RECORD_SIZE]>>,
    /// Current session (0: none).
    pub session: u64,
    /// Every HELLO's session id, in order.
    pub hellos: Vec<u64>,
    /// Host monotonic ns of every GOODBYE.
    pub goodbyes: Vec<u64>,
    /// Whether the fake scheduler is on (HELLO taken, no GOODBYE since).
    pub enabled: bool,
    /// Host monotonic ns of every RUN applied.
    pub run_times: Vec<u64>,
    pub rejected: [u64; AckStatus::COUNT],
    pub protocol_errors: u64,
}

fn memfd_memory(size: u64) -> GuestMemoryMmap<()> {
    let name = CString::new("fake-guest-ram").unwrap();
    // SAFETY: valid NUL-terminated name and flags; checked below.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fd was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    GuestMemoryMmap::from_ranges_with_files(vec![(
        GuestAddress(0),
        size as usize,
        Some(FileOffset::from_arc(Arc::new(file), 0)),
    )])
    .unwrap()
}

impl FakeGuest {
    pub fn new(cpus: u16, tasks: u32) -> Self {
        let lm = LoopbackMemory::new(cpus, QUEUE_SIZE, RECORD_SIZE as u32).unwrap();
        let size = lm.end().next_multiple_of(4096);
        let mem = memfd_memory(size);
        let queues = lm.driver_queues(true);
        let n = queues.len();
        let ev = || EventFd::new(EFD_NONBLOCK).unwrap();
        let mut g = FakeGuest {
            cpus,
            mem,
            lm,
            queues,
            kicks: (0..n).map(|_| ev()).collect(),
            calls: (0..n).map(|_| ev()).collect(),
            tasks: (0..tasks)
                .map(|i| {
                    (
                        Gtid::new(1000 + i, 1),
                        Task {
                            seq: 0,
                            runnable: false,
                        },
                    )
                })
                .collect(),
            pending: vec![Vec::new(); usize::from(cpus)],
            session: 0,
            hellos: Vec::new(),
            goodbyes: Vec::new(),
            enabled: false,
            run_times: Vec::new(),
            rejected: [0; AckStatus::COUNT],
            protocol_errors: 0,
        };
        for cpu in 0..cpus {
            let q = usize::from(cpu) * 2 + 1;
            while g.queues[q].free_descs() > 0 {
                g.post_decision(q);
            }
            g.publish(q);
        }
        g
    }

    /// What a VMM would hand the frontend.
    pub fn setup(&self) -> DeviceSetup {
        DeviceSetup {
            mem: self.mem.clone(),
            acked_features: DEVICE_FEATURES,
            rings: self
                .lm
                .queues
                .iter()
                .enumerate()
                .map(|(i, q)| RingSetup {
                    cfg: *q,
                    kick: self.kicks[i].try_clone().unwrap(),
                    call: self.calls[i].try_clone().unwrap(),
                })
                .collect(),
        }
    }

    pub fn num_tasks(&self) -> usize {
        self.tasks.len()
    }

    fn post_decision(&mut self, q: usize) {
        let Some(next) = self.queues[q].next_free_desc() else {
            return;
        };
        let addr = self.lm.buffer(q as u16, next);
        self.queues[q].add_chain(&self.mem, &[(addr, RECORD_SIZE as u32, true)]);
    }

    fn publish(&mut self, q: usize) {
        if self.queues[q].publish(&self.mem) {
            let _ = self.kicks[q].write(1);
        }
    }

    fn queue(&mut self, cpu: u16, m: Message) {
        self.pending[usize::from(cpu)].push(m.encode());
    }

    fn announce_all(&mut self) {
        let now = monotonic_ns();
        let cpus = self.cpus;
        let mut gtids: Vec<Gtid> = self.tasks.keys().copied().collect();
        gtids.sort_unstable();
        for gtid in gtids {
            let home = (gtid.pid() % u32::from(cpus)) as u16;
            let t = self.tasks.get_mut(&gtid).unwrap();
            t.seq += 1;
            let new = Message::TaskNew(TaskNewInfo {
                cpu: home,
                gtid,
                seq: t.seq,
                ts_ns: now,
                comm: pack_name("fake"),
                cpus_allowed: u64::MAX >> (64 - u32::from(cpus)),
                tgid: gtid.pid(),
                weight: 100,
                nice: 0,
            });
            t.seq += 1;
            t.runnable = true;
            let wake = Message::Task(
                TaskEventKind::Wakeup,
                EventInfo {
                    cpu: home,
                    gtid,
                    seq: t.seq,
                    ts_ns: now,
                    arg: WAKE_NEW,
                    src_cpu: home,
                    ..Default::default()
                },
            );
            self.queue(home, new);
            self.queue(home, wake);
        }
    }

    fn ack(&mut self, d: DecisionInfo, ty: u16, status: AckStatus) {
        if status != AckStatus::Ok {
            self.rejected[status as usize] += 1;
        }
        self.queue(
            d.cpu,
            Message::Ack(AckInfo {
                cpu: d.cpu,
                gtid: d.gtid,
                status,
                seq: d.seq,
                ts_ns: monotonic_ns(),
                cookie: d.cookie,
                decision_type: ty,
                target_cpu: d.cpu,
            }),
        );
    }

    fn handle(&mut self, raw: &[u8; RECORD_SIZE]) {
        let m = match parse_record(raw, Direction::HostToGuest, u32::from(self.cpus)) {
            Ok(m) => m,
            Err(_) => {
                self.protocol_errors += 1;
                return;
            }
        };
        match m {
            Message::Hello(s) => {
                self.hellos.push(s.session_id);
                if s.session_id != self.session || !self.enabled {
                    self.session = s.session_id;
                    self.enabled = true;
                    let echo = Message::Hello(SessionInfo {
                        cpu: 0,
                        num_cpus: u32::from(self.cpus),
                        session_id: s.session_id,
                        ts_ns: monotonic_ns(),
                        name: pack_name("fake-guest"),
                        ..Default::default()
                    });
                    self.queue(0, echo);
                    self.announce_all();
                }
            }
            Message::Goodbye(_) => {
                self.goodbyes.push(monotonic_ns());
                self.enabled = false;
            }
            Message::Heartbeat(_) => {}
            Message::Run(d) => {
                let status = match self.tasks.get(&d.gtid) {
                    None => AckStatus::NoTask,
                    Some(t) if t.seq != d.seq => AckStatus::Stale,
                    Some(t) if !t.runnable => AckStatus::NotRunnable,
                    Some(_) if !self.enabled => AckStatus::NotRunnable,
                    Some(_) => AckStatus::Ok,
                };
                self.ack(d, msg::RUN, status);
                if status != AckStatus::Ok {
                    return;
                }
                let now = monotonic_ns();
                self.run_times.push(now);
                let t = self.tasks.get_mut(&d.gtid).unwrap();
                // Runs for no time, blocks, wakes again on the CPU it ran on.
                let ev = |seq| EventInfo {
                    cpu: d.cpu,
                    gtid: d.gtid,
                    seq,
                    ts_ns: now,
                    src_cpu: d.cpu,
                    ..Default::default()
                };
                t.seq += 1;
                let blocked = Message::Task(TaskEventKind::Blocked, ev(t.seq));
                t.seq += 1;
                let wake = Message::Task(TaskEventKind::Wakeup, ev(t.seq));
                self.queue(d.cpu, blocked);
                self.queue(d.cpu, wake);
            }
            Message::Preempt(d) => self.ack(d, msg::PREEMPT, AckStatus::Ok),
            _ => self.protocol_errors += 1,
        }
    }

    /// One pass: take decisions, reclaim event buffers, send queued records.
    pub fn step(&mut self) {
        for c in &self.calls {
            let _ = c.read();
        }
        for cpu in 0..self.cpus {
            let q = usize::from(cpu) * 2 + 1;
            let mut any = false;
            while let Some((head, len)) = self.queues[q].pop_used(&self.mem) {
                any = true;
                if len as usize == RECORD_SIZE {
                    let mut raw = [0u8; RECORD_SIZE];
                    let at = GuestAddress(self.lm.buffer(q as u16, head));
                    self.mem.read_slice(&mut raw, at).unwrap();
                    self.handle(&raw);
                } else if len != 0 {
                    self.protocol_errors += 1;
                }
                self.post_decision(q);
            }
            if any {
                self.publish(q);
            }
        }
        for cpu in 0..self.cpus {
            let q = usize::from(cpu) * 2;
            while self.queues[q].pop_used(&self.mem).is_some() {}
            let recs = std::mem::take(&mut self.pending[usize::from(cpu)]);
            let mut left = Vec::new();
            for rec in recs {
                let Some(next) = self.queues[q].next_free_desc() else {
                    left.push(rec);
                    continue;
                };
                let addr = self.lm.buffer(q as u16, next);
                self.mem.write_slice(&rec, GuestAddress(addr)).unwrap();
                self.queues[q].add_chain(&self.mem, &[(addr, RECORD_SIZE as u32, false)]);
            }
            self.pending[usize::from(cpu)] = left;
            self.publish(q);
        }
    }

    /// Step until `pred` holds; false on timeout.
    pub fn run_until(&mut self, timeout: Duration, mut pred: impl FnMut(&Self) -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            self.step();
            if pred(self) {
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }

    /// Step for `d`.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(d, |_| false);
    }
}

/// A `milk-policy` child process.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    /// Start `milk-policy` on `socket` and wait for its ready line.
    pub fn start(socket: &Path, cpus: u16) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_milk-policy"))
            .args(["--policy", "fifo", "--cpus", &cpus.to_string(), "--json"])
            .arg("--socket")
            .arg(socket)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn milk-policy");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let first = lines.next().expect("ready line").unwrap();
        assert!(first.contains("listening on"), "{first}");
        // Keep the rest of its output flowing (the exit report).
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                eprintln!("milk-policy: {l}");
            }
        });
        Daemon {
            child,
            socket: socket.to_owned(),
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Wait for the daemon to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Largest gap between consecutive RUNs applied after `from_ns`.
pub fn max_gap_after(times: &[u64], from_ns: u64) -> u64 {
    let i = times.partition_point(|&t| t < from_ns).saturating_sub(1);
    times[i..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0)
}
