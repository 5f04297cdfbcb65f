//! Host-only loopback harness: a Rust thread plays the guest driver on shared memory.
//!
//! [`DriverQueue`] is a driver-side split virtqueue (writes descriptors and the available
//! ring, reads the used ring, honours EVENT_IDX for kicks and interrupts).
//! [`LoopbackMemory`] lays out all rings and buffers of a virtio-milk device in one
//! anonymous `GuestMemoryMmap`. [`run_loopback`] wires the real [`QueueEngine`] and
//! [`Runtime`] (on its own thread) with a policy to a simulated guest on the calling thread
//! and returns latency samples and throughput.
//!
//! # Simulated workload
//! `tasks` tasks on `num_cpus` CPUs. After HELLO every task is announced (TASK_NEW) and
//! woken (TASK_WAKEUP). Every RUN the guest receives is validated like the real guest does
//! (unknown pid -> NO_TASK, seq mismatch -> STALE, CPU not allowed -> BAD_CPU, task not
//! runnable -> NOT_RUNNABLE) and acknowledged; an applied RUN makes the task run for zero
//! time, block (TASK_BLOCKED) and wake again (TASK_WAKEUP) on the CPU it ran on. The guest
//! queues records per CPU and sends a buffer when `batch` records are pending, or earlier
//! when it found no new decision (so a closed loop never stalls on a partial batch).
//! Latency = time from creating the TASK_WAKEUP record to applying the matching RUN.
//!
//! # Example
//! ```no_run
//! # use virtio_milk::loopback::{run_loopback, LoopbackConfig, NotifyMode};
//! # fn policy() -> Box<dyn virtio_milk::policy::Policy> { unimplemented!() }
//! let stats = run_loopback(
//!     LoopbackConfig { batch: 8, mode: NotifyMode::Polling, ..Default::default() },
//!     policy(), // e.g. milk_policies::by_name("fifo").unwrap()
//! )
//! .unwrap();
//! println!("p50 {} ns, {:.0} msgs/s", stats.percentile_ns(50.0), stats.msgs_per_sec());
//! ```

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::metrics::{monotonic_ns, Summary};
use crate::policy::Policy;
use crate::protocol::{
    msg, pack_name, parse_record, AckInfo, AckStatus, DecisionInfo, Direction, EventInfo, Gtid,
    Message, SessionInfo, TaskEventKind, TaskNewInfo, MAX_BATCH, RECORD_SIZE, WAKE_NEW,
};
use crate::queue::{EngineConfig, EventFdInterrupt, QueueConfig, QueueEngine};
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError};
use crate::vring::HostRegions;

/// Descriptor flag: chain continues in `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Used ring flag: device asks for no kicks (without EVENT_IDX).
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

/// virtio's `vring_need_event`: does moving the index from `old` to `new` cross `event`?
pub fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Driver side of one split virtqueue in shared memory.
#[derive(Debug)]
pub struct DriverQueue {
    size: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    event_idx: bool,
    free: Vec<u16>,
    chains: Vec<Vec<u16>>,
    avail_idx: u16,
    published: u16,
    last_used: u16,
    /// Used elements naming a head we never posted (device bug).
    pub bad_used: u64,
    /// The rings mapped once ([`LoopbackMemory::driver_queues`]); `None`: every access
    /// goes through vm-memory.
    mapped: Option<MappedRings>,
}

/// Host pointers to one queue's rings, translated once; keeps the mapping alive.
struct MappedRings {
    _mem: GuestMemoryMmap,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
}

// SAFETY: the pointers point into `_mem`'s mapping, which this struct keeps alive; every
// access through them is atomic or volatile (the memory is shared with the device thread
// anyway), so moving the queue to another thread adds no hazard.
unsafe impl Send for MappedRings {}

impl std::fmt::Debug for MappedRings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MappedRings")
    }
}

impl MappedRings {
    fn new(mem: &GuestMemoryMmap, size: u16, cfg: QueueConfig) -> Option<Self> {
        let n = usize::from(size);
        let get = |addr: u64, len: usize| -> Option<*mut u8> {
            let s = mem.get_slice(GuestAddress(addr), len).ok()?;
            (s.len() == len).then(|| s.ptr_guard_mut().as_ptr())
        };
        if !cfg.desc_table.is_multiple_of(16)
            || !cfg.avail_ring.is_multiple_of(2)
            || !cfg.used_ring.is_multiple_of(4)
        {
            return None;
        }
        Some(MappedRings {
            _mem: mem.clone(),
            desc: get(cfg.desc_table, 16 * n)?,
            avail: get(cfg.avail_ring, 6 + 2 * n)?,
            used: get(cfg.used_ring, 6 + 8 * n)?,
        })
    }

    /// # Safety
    /// `off` must be even and `off + 2` within the ring `base` points to.
    unsafe fn u16_at(base: *mut u8, off: usize) -> &'static AtomicU16 {
        // SAFETY: per the contract, in bounds; ring starts are at least 2-aligned.
        unsafe { AtomicU16::from_ptr(base.add(off).cast()) }
    }
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at the given guest addresses.
    pub fn new(size: u16, cfg: QueueConfig, event_idx: bool) -> Self {
        DriverQueue {
            size,
            desc: GuestAddress(cfg.desc_table),
            avail: GuestAddress(cfg.avail_ring),
            used: GuestAddress(cfg.used_ring),
            event_idx,
            free: (0..size).rev().collect(),
            chains: vec![Vec::new(); usize::from(size)],
            avail_idx: 0,
            published: 0,
            last_used: 0,
            bad_used: 0,
            mapped: None,
        }
    }

    /// Like [`Self::new`], with the rings translated once to host pointers into `mem`
    /// (what the loopback's guest uses: no vm-memory translation per access). The `mem`
    /// argument of every other method must then be this same memory. Falls back to
    /// [`Self::new`] if a ring is not inside `mem` or misaligned.
    pub fn mapped(mem: &GuestMemoryMmap, size: u16, cfg: QueueConfig, event_idx: bool) -> Self {
        let mut q = Self::new(size, cfg, event_idx);
        if size.is_power_of_two() {
            q.mapped = MappedRings::new(mem, size, cfg);
        }
        q
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// The descriptor the next single-descriptor [`Self::add_chain`] will use as head.
    pub fn next_free_desc(&self) -> Option<u16> {
        self.free.last().copied()
    }

    /// Chains posted and not yet returned.
    pub fn in_flight(&self) -> usize {
        usize::from(self.size) - self.free.len()
    }

    /// Write descriptor `idx` verbatim (for hostile-driver tests).
    pub fn write_raw_desc<M: GuestMemory>(
        &self,
        mem: &M,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let slot = u64::from(idx % self.size);
        if let Some(m) = &self.mapped {
            let mut raw = [0u8; 16];
            raw[..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..].copy_from_slice(&next.to_le_bytes());
            // SAFETY: slot < size: the descriptor is inside the mapped table.
            unsafe { std::ptr::write_volatile(m.desc.add(16 * slot as usize).cast(), raw) };
            return;
        }
        let at = self.desc.unchecked_add(16 * slot);
        mem.write_obj(Descriptor::new(addr, len, flags, next), at)
            .expect("descriptor table is inside loopback memory");
    }

    /// Put `head` in the next available slot without any bookkeeping (hostile tests).
    pub fn push_avail_raw<M: GuestMemory>(&mut self, mem: &M, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        if let Some(m) = &self.mapped {
            // SAFETY: slot < size: the entry is inside the mapped avail ring.
            unsafe { MappedRings::u16_at(m.avail, 4 + 2 * slot as usize) }
                .store(head.to_le(), Ordering::Relaxed);
        } else {
            mem.write_obj(head.to_le(), self.avail.unchecked_add(4 + 2 * slot))
                .expect("avail ring is inside loopback memory");
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Set the shadow avail index to an arbitrary value (hostile tests).
    pub fn force_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
    }

    /// Post a chain of `(addr, len, device_writable)` segments. Returns the head, or `None`
    /// if there are not enough free descriptors. Not visible to the device until
    /// [`Self::publish`].
    pub fn add_chain<M: GuestMemory>(&mut self, mem: &M, segs: &[(u64, u32, bool)]) -> Option<u16> {
        if segs.is_empty() || segs.len() > self.free.len() {
            return None;
        }
        let ids: Vec<u16> = (0..segs.len()).filter_map(|_| self.free.pop()).collect();
        for (i, &(addr, len, writable)) in segs.iter().enumerate() {
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < ids.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            self.write_raw_desc(mem, ids[i], addr, len, flags, next);
        }
        let head = ids[0];
        self.chains[usize::from(head)] = ids;
        self.push_avail_raw(mem, head);
        Some(head)
    }

    /// Make posted chains visible (avail.idx store with release). Returns whether the
    /// device asked to be kicked for them (EVENT_IDX `avail_event`, or `NO_NOTIFY`).
    pub fn publish<M: GuestMemory>(&mut self, mem: &M) -> bool {
        let old = self.published;
        let new = self.avail_idx;
        if old == new {
            return false;
        }
        if let Some(m) = &self.mapped {
            // SAFETY: avail.idx at 2, avail_event at 4 + 8*size of the used ring, flags
            // at 0: all inside the mapped rings.
            unsafe { MappedRings::u16_at(m.avail, 2) }.store(new.to_le(), Ordering::Release);
            self.published = new;
            fence(Ordering::SeqCst);
            return if self.event_idx {
                let off = 4 + 8 * usize::from(self.size);
                // SAFETY: avail_event is the last u16 of the mapped used ring.
                let ev = unsafe { MappedRings::u16_at(m.used, off) }.load(Ordering::Relaxed);
                vring_need_event(u16::from_le(ev), new, old)
            } else {
                // SAFETY: the flags are the first u16 of the mapped used ring.
                let f = unsafe { MappedRings::u16_at(m.used, 0) }.load(Ordering::Relaxed);
                u16::from_le(f) & VRING_USED_F_NO_NOTIFY == 0
            };
        }
        mem.store(new.to_le(), self.avail.unchecked_add(2), Ordering::Release)
            .expect("avail ring is inside loopback memory");
        self.published = new;
        // The device's avail_event / flags must be read after the index store.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let at = self.used.unchecked_add(4 + 8 * u64::from(self.size));
            let ev: u16 = mem.load(at, Ordering::Relaxed).map_or(0, u16::from_le);
            vring_need_event(ev, new, old)
        } else {
            let flags: u16 = mem
                .load(self.used, Ordering::Relaxed)
                .map_or(0, u16::from_le);
            flags & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether the device returned chains we have not popped.
    pub fn has_used<M: GuestMemory>(&self, mem: &M) -> bool {
        if let Some(m) = &self.mapped {
            // SAFETY: used.idx is at offset 2 of the mapped used ring.
            let idx = unsafe { MappedRings::u16_at(m.used, 2) }.load(Ordering::Acquire);
            return u16::from_le(idx) != self.last_used;
        }
        let idx: u16 = mem
            .load(self.used.unchecked_add(2), Ordering::Acquire)
            .map_or(self.last_used, u16::from_le);
        idx != self.last_used
    }

    /// Pop one used element `(head, len)` and free its descriptors.
    pub fn pop_used<M: GuestMemory>(&mut self, mem: &M) -> Option<(u16, u32)> {
        loop {
            if !self.has_used(mem) {
                return None;
            }
            let slot = u64::from(self.last_used % self.size);
            let at = self.used.unchecked_add(4 + 8 * slot);
            let (id, len) = match &self.mapped {
                Some(m) => {
                    // SAFETY: slot < size: the 8-byte element is inside the mapped used
                    // ring; volatile read of a byte array needs no alignment.
                    let e: [u8; 8] = unsafe {
                        std::ptr::read_volatile(m.used.add(4 + 8 * slot as usize).cast())
                    };
                    (
                        u32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                        u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                    )
                }
                None => (
                    mem.read_obj(at).map_or(u32::MAX, u32::from_le),
                    mem.read_obj(at.unchecked_add(4)).map_or(0, u32::from_le),
                ),
            };
            self.last_used = self.last_used.wrapping_add(1);
            let chain = usize::try_from(id)
                .ok()
                .and_then(|i| self.chains.get_mut(i))
                .map(std::mem::take)
                .unwrap_or_default();
            if chain.is_empty() {
                self.bad_used += 1;
                continue;
            }
            self.free.extend(chain);
            return Some((id as u16, len));
        }
    }

    /// Ask for an interrupt when the next used element arrives (EVENT_IDX `used_event`, or
    /// clearing `VRING_AVAIL_F_NO_INTERRUPT`). Returns true if used elements are already
    /// pending (do not sleep then).
    pub fn enable_interrupts<M: GuestMemory>(&mut self, mem: &M) -> bool {
        if self.event_idx {
            let at = self.avail.unchecked_add(4 + 2 * u64::from(self.size));
            let _ = mem.store(self.last_used.to_le(), at, Ordering::Release);
        } else {
            let _ = mem.store(0u16, self.avail, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.has_used(mem)
    }

    /// Stop asking for interrupts while polling. With EVENT_IDX nothing needs writing
    /// (`used_event` is simply left behind); without it, set `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn disable_interrupts<M: GuestMemory>(&mut self, mem: &M) {
        if !self.event_idx {
            let _ = mem.store(
                crate::queue::VRING_AVAIL_F_NO_INTERRUPT.to_le(),
                self.avail,
                Ordering::Release,
            );
        }
    }
}

/// Where every ring and buffer of a loopback device lives.
pub struct LoopbackMemory {
    /// The shared "guest" memory.
    pub mem: GuestMemoryMmap,
    /// Per queue index: ring addresses and size (what a transport would hand the engine).
    pub queues: Vec<QueueConfig>,
    /// `mem` translated once, for the simulated guest's buffer copies.
    ram: HostRegions,
    buf_base: u64,
    buf_bytes: u64,
    queue_size: u16,
}

const RING_BASE: u64 = 0x1_0000;
const RING_STRIDE: u64 = 0x1_0000;

impl LoopbackMemory {
    /// Rings for `num_cpus` queue pairs of `queue_size` entries, and one buffer of
    /// `buf_bytes` per descriptor of every queue. `queue_size` must be a power of two
    /// <= 1024.
    pub fn new(num_cpus: u16, queue_size: u16, buf_bytes: u32) -> Result<Self, LoopbackError> {
        if !queue_size.is_power_of_two() || queue_size > 1024 || num_cpus == 0 {
            return Err(LoopbackError::Config("queue size or cpu count"));
        }
        let nq = u64::from(num_cpus) * 2;
        let mut queues = Vec::new();
        for q in 0..nq {
            let base = RING_BASE + q * RING_STRIDE;
            let desc = base;
            let avail = base + 16 * u64::from(queue_size);
            let used = avail + 0x1000;
            queues.push(QueueConfig {
                size: queue_size,
                desc_table: desc,
                avail_ring: avail,
                used_ring: used,
            });
        }
        let buf_base = RING_BASE + nq * RING_STRIDE;
        let buf_bytes = u64::from(buf_bytes.max(RECORD_SIZE as u32));
        let total = buf_base + nq * u64::from(queue_size) * buf_bytes;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), total as usize)])
            .map_err(|_| LoopbackError::Config("cannot map loopback memory"))?;
        Ok(LoopbackMemory {
            ram: HostRegions::new(&mem),
            mem,
            queues,
            buf_base,
            buf_bytes,
            queue_size,
        })
    }

    /// Address of the buffer owned by descriptor `desc` of queue `queue`.
    pub fn buffer(&self, queue: u16, desc: u16) -> u64 {
        self.buf_base
            + (u64::from(queue) * u64::from(self.queue_size) + u64::from(desc % self.queue_size))
                * self.buf_bytes
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> u32 {
        self.buf_bytes as u32
    }

    /// One past the last valid guest address.
    pub fn end(&self) -> u64 {
        self.buf_base + self.queues.len() as u64 * u64::from(self.queue_size) * self.buf_bytes
    }

    /// Driver-side queues for every queue index; their methods work on whatever memory
    /// they are given (e.g. another mapping with this layout).
    pub fn driver_queues(&self, event_idx: bool) -> Vec<DriverQueue> {
        self.queues
            .iter()
            .map(|q| DriverQueue::new(q.size, *q, event_idx))
            .collect()
    }

    /// [`Self::driver_queues`] with the rings mapped once into `self.mem`
    /// ([`DriverQueue::mapped`]): their methods must be given `self.mem`.
    pub fn mapped_driver_queues(&self, event_idx: bool) -> Vec<DriverQueue> {
        self.queues
            .iter()
            .map(|q| DriverQueue::mapped(&self.mem, q.size, *q, event_idx))
            .collect()
    }
}

/// Who waits how.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NotifyMode {
    /// Device sleeps on the kick eventfd as soon as it is idle; the guest sleeps on the
    /// interrupt eventfd. Notifications are suppressed with EVENT_IDX while busy.
    Notification,
    /// Device and guest spin on the rings; no kicks or interrupts in steady state.
    Polling,
    /// Both sides spin for this long after their last work, then sleep as in
    /// `Notification` (the runtime's default behaviour, with its default 50 µs).
    Hybrid(Duration),
}

/// Loopback run parameters.
#[derive(Clone, Debug)]
pub struct LoopbackConfig {
    /// Simulated guest CPUs (queue pairs).
    pub num_cpus: u16,
    /// Simulated tasks.
    pub tasks: u32,
    /// Records per event buffer (1..=64); decision buffers hold as many.
    pub batch: usize,
    /// Notification or polling.
    pub mode: NotifyMode,
    /// Stop after this many RUN decisions were applied.
    pub runs: u64,
    /// Entries per virtqueue.
    pub queue_size: u16,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// Give up after this long.
    pub timeout: Duration,
    /// Host heartbeat period.
    pub heartbeat: Option<Duration>,
}

impl Default for LoopbackConfig {
    fn default() -> Self {
        LoopbackConfig {
            num_cpus: 4,
            tasks: 16,
            batch: 8,
            mode: NotifyMode::Notification,
            runs: 20_000,
            queue_size: 256,
            event_idx: true,
            timeout: Duration::from_secs(60),
            heartbeat: Some(Duration::from_millis(100)),
        }
    }
}

/// Loopback failures.
#[derive(Debug, thiserror::Error)]
pub enum LoopbackError {
    /// Bad configuration.
    #[error("bad loopback config: {0}")]
    Config(&'static str),
    /// Engine or eventfd setup failed.
    #[error("setup failed: {0}")]
    Setup(String),
    /// The run did not finish in time.
    #[error("timed out after {applied} applied runs")]
    Timeout {
        /// Runs applied before giving up.
        applied: u64,
    },
    /// The runtime thread failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
}

/// Results of one loopback run.
#[derive(Clone, Debug)]
pub struct LoopbackStats {
    /// Event -> decision-applied latency of every applied RUN, in ns, in arrival order.
    pub latencies_ns: Vec<u64>,
    /// From the first wakeups to the end of the run.
    pub elapsed: Duration,
    /// RUN decisions the guest applied.
    pub runs_applied: u64,
    /// Records the guest sent.
    pub records_sent: u64,
    /// Records the guest received.
    pub records_received: u64,
    /// Event buffers the guest posted.
    pub event_buffers: u64,
    /// Kicks (eventfd writes) the guest did.
    pub kicks: u64,
    /// Times the guest slept on the interrupt eventfd.
    pub guest_sleeps: u64,
    /// Decisions the guest refused, by [`AckStatus`] (index 0 = OK stays 0).
    pub rejected: [u64; AckStatus::COUNT],
    /// Decision records the guest found malformed or on the wrong queue.
    pub guest_protocol_errors: u64,
    /// HEARTBEAT records received from the host.
    pub heartbeats: u64,
    /// HELLO records received from the host.
    pub hellos: u64,
    /// The host runtime's summary (counters, host-side latency).
    pub host: Summary,
}

impl LoopbackStats {
    /// Exact percentile of the latency samples (0 if none).
    pub fn percentile_ns(&self, p: f64) -> u64 {
        if self.latencies_ns.is_empty() {
            return 0;
        }
        let mut v = self.latencies_ns.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[rank.clamp(1, v.len()) - 1]
    }

    /// Messages per second in both directions.
    pub fn msgs_per_sec(&self) -> f64 {
        (self.records_sent + self.records_received) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SimState {
    Blocked,
    Runnable,
}

struct SimTask {
    gtid: Gtid,
    seq: u64,
    state: SimState,
    home: u16,
    allowed: u64,
    wake_ns: u64,
}

struct Guest<'a> {
    lm: &'a LoopbackMemory,
    cfg: &'a LoopbackConfig,
    queues: Vec<DriverQueue>,
    kick: EventFd,
    irq: EventFd,
    /// Indexed by pid - PID_BASE.
    tasks: Vec<SimTask>,
    pending: Vec<Vec<[u8; RECORD_SIZE]>>,
    session: u64,
    stopping: bool,
    stats: GuestCounters,
    latencies: Vec<u64>,
}

#[derive(Default)]
struct GuestCounters {
    runs_applied: u64,
    records_sent: u64,
    records_received: u64,
    event_buffers: u64,
    kicks: u64,
    sleeps: u64,
    rejected: [u64; AckStatus::COUNT],
    protocol_errors: u64,
    heartbeats: u64,
    hellos: u64,
}

const PID_BASE: u32 = 1000;

impl Guest<'_> {
    /// The task a decision names, if the guest has it.
    fn task_index(&self, gtid: Gtid) -> Option<usize> {
        let i = gtid.pid().checked_sub(PID_BASE)? as usize;
        (self.tasks.get(i)?.gtid == gtid).then_some(i)
    }

    fn queue_record(&mut self, cpu: u16, m: Message) {
        self.pending[usize::from(cpu)].push(m.encode());
    }

    fn post_decision_buffers(&mut self) {
        let bytes = (self.cfg.batch * RECORD_SIZE) as u32;
        for cpu in 0..self.cfg.num_cpus {
            let q = usize::from(cpu) * 2 + 1;
            while self.queues[q].free_descs() > 0 {
                self.repost_decision(cpu, bytes);
            }
            self.publish(q);
        }
    }

    fn repost_decision(&mut self, cpu: u16, bytes: u32) {
        let q = usize::from(cpu) * 2 + 1;
        // Single-descriptor chains: the head is the descriptor, which owns its buffer.
        // Peek the descriptor the queue will hand out next to know its buffer.
        let Some(&next) = self.queues[q].free.last() else {
            return;
        };
        let addr = self.lm.buffer(q as u16, next);
        let lm = self.lm;
        self.queues[q].add_chain(&lm.mem, &[(addr, bytes, true)]);
    }

    fn publish(&mut self, q: usize) {
        let lm = self.lm;
        if self.queues[q].publish(&lm.mem) {
            self.stats.kicks += 1;
            let _ = self.kick.write(1);
        }
    }

    fn announce_all(&mut self) {
        let now = monotonic_ns();
        for i in 0..self.tasks.len() {
            let t = &mut self.tasks[i];
            let gtid = t.gtid;
            t.seq += 1;
            let new = Message::TaskNew(TaskNewInfo {
                cpu: t.home,
                gtid,
                seq: t.seq,
                ts_ns: now,
                comm: pack_name(&format!("sim{}", gtid.pid())),
                cpus_allowed: t.allowed,
                tgid: gtid.pid(),
                weight: 100,
                nice: 0,
            });
            t.seq += 1;
            t.state = SimState::Runnable;
            t.wake_ns = now;
            let wake = Message::Task(
                TaskEventKind::Wakeup,
                EventInfo {
                    cpu: t.home,
                    gtid,
                    seq: t.seq,
                    ts_ns: now,
                    arg: WAKE_NEW,
                    src_cpu: t.home,
                    ..Default::default()
                },
            );
            let home = t.home;
            self.queue_record(home, new);
            self.queue_record(home, wake);
        }
    }

    fn handle_decision(&mut self, queue_cpu: u16, raw: &[u8; RECORD_SIZE]) {
        let m = match parse_record(raw, Direction::HostToGuest, u32::from(self.cfg.num_cpus)) {
            Ok(m) => m,
            Err(_) => {
                self.stats.protocol_errors += 1;
                return;
            }
        };
        self.stats.records_received += 1;
        match m {
            Message::Hello(s) => {
                self.stats.hellos += 1;
                if s.session_id != self.session {
                    self.session = s.session_id;
                    let hello = Message::Hello(SessionInfo {
                        cpu: 0,
                        num_cpus: u32::from(self.cfg.num_cpus),
                        session_id: s.session_id,
                        ts_ns: monotonic_ns(),
                        name: pack_name("loopback"),
                        ..Default::default()
                    });
                    self.queue_record(0, hello);
                    self.announce_all();
                }
            }
            Message::Heartbeat(_) => self.stats.heartbeats += 1,
            Message::Goodbye(_) => {}
            Message::Run(d) => {
                if d.cpu != queue_cpu {
                    self.stats.protocol_errors += 1;
                }
                self.apply_run(d);
            }
            Message::Preempt(d) => {
                // Tasks block as soon as they run, so nothing is ever running.
                self.ack(d, msg::PREEMPT, AckStatus::Ok);
            }
            _ => self.stats.protocol_errors += 1,
        }
    }

    fn ack(&mut self, d: DecisionInfo, ty: u16, status: AckStatus) {
        if status != AckStatus::Ok {
            self.stats.rejected[status as usize] += 1;
        }
        let cpu = d.cpu;
        self.queue_record(
            cpu,
            Message::Ack(AckInfo {
                cpu,
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

    fn apply_run(&mut self, d: DecisionInfo) {
        let now = monotonic_ns();
        let idx = self.task_index(d.gtid);
        let status = match idx.map(|i| &self.tasks[i]) {
            None => AckStatus::NoTask,
            Some(t) if t.seq != d.seq => AckStatus::Stale,
            Some(t) if d.cpu >= 64 || t.allowed & (1 << d.cpu) == 0 => AckStatus::BadCpu,
            Some(t) if t.state != SimState::Runnable => AckStatus::NotRunnable,
            Some(_) => AckStatus::Ok,
        };
        self.ack(d, msg::RUN, status);
        if status != AckStatus::Ok {
            return;
        }
        self.stats.runs_applied += 1;
        let stopping = self.stopping || self.stats.runs_applied >= self.cfg.runs;
        self.stopping = stopping;
        let Some(i) = idx else { return };
        let t = &mut self.tasks[i];
        self.latencies.push(now.saturating_sub(t.wake_ns));
        // The task runs for zero time, blocks, and (unless stopping) wakes again.
        t.seq += 1;
        t.state = SimState::Blocked;
        let ev = |seq, ts_ns| EventInfo {
            cpu: d.cpu,
            gtid: d.gtid,
            seq,
            ts_ns,
            src_cpu: d.cpu,
            ..Default::default()
        };
        let blocked = Message::Task(TaskEventKind::Blocked, ev(t.seq, now));
        let wake = if stopping {
            None
        } else {
            t.seq += 1;
            t.state = SimState::Runnable;
            t.wake_ns = monotonic_ns();
            Some(Message::Task(TaskEventKind::Wakeup, ev(t.seq, t.wake_ns)))
        };
        self.queue_record(d.cpu, blocked);
        if let Some(w) = wake {
            self.queue_record(d.cpu, w);
        }
    }

    /// Reap decision buffers; returns whether any arrived. The records a CPU's decisions
    /// produced (ACK, BLOCKED, WAKEUP) are sent right after that CPU's queue is drained,
    /// as the real guest's per-CPU driver flushes at the end of its callback; the decision
    /// buffers are reposted after that (the device has plenty meanwhile).
    fn reap_decisions(&mut self) -> bool {
        let mut any = false;
        let bytes = (self.cfg.batch * RECORD_SIZE) as u32;
        let lm = self.lm;
        for cpu in 0..self.cfg.num_cpus {
            let q = usize::from(cpu) * 2 + 1;
            let mut reaped = 0;
            while let Some((head, len)) = self.queues[q].pop_used(&lm.mem) {
                let len = len as usize;
                if len > bytes as usize || !len.is_multiple_of(RECORD_SIZE) {
                    self.stats.protocol_errors += 1;
                } else {
                    let base = lm.buffer(q as u16, head);
                    let mut raw = [0u8; RECORD_SIZE];
                    for i in 0..len / RECORD_SIZE {
                        if !lm.ram.read(base + (i * RECORD_SIZE) as u64, &mut raw) {
                            self.stats.protocol_errors += 1;
                            continue;
                        }
                        self.handle_decision(cpu, &raw);
                    }
                }
                reaped += 1;
            }
            if reaped == 0 {
                continue;
            }
            any = true;
            self.flush_cpu_events(cpu, true);
            for _ in 0..reaped {
                self.repost_decision(cpu, bytes);
            }
            self.publish(q);
        }
        any
    }

    fn reap_events(&mut self) {
        let lm = self.lm;
        for cpu in 0..self.cfg.num_cpus {
            let q = usize::from(cpu) * 2;
            while self.queues[q].pop_used(&lm.mem).is_some() {}
        }
    }

    /// Send pending records: full batches always, partial ones if `force`.
    fn flush_events(&mut self, force: bool) {
        for cpu in 0..self.cfg.num_cpus {
            self.flush_cpu_events(cpu, force);
        }
    }

    /// [`Self::flush_events`] for one CPU's event queue.
    fn flush_cpu_events(&mut self, cpu: u16, force: bool) {
        let batch = self.cfg.batch;
        let lm = self.lm;
        let c = usize::from(cpu);
        let q = c * 2;
        let mut posted = false;
        while self.pending[c].len() >= batch || (force && !self.pending[c].is_empty()) {
            let Some(&desc) = self.queues[q].free.last() else {
                break;
            };
            let n = self.pending[c].len().min(batch);
            let addr = lm.buffer(q as u16, desc);
            for (i, rec) in self.pending[c].drain(..n).enumerate() {
                let ok = lm.ram.write(addr + (i * RECORD_SIZE) as u64, &rec);
                debug_assert!(ok, "loopback buffer in memory");
            }
            self.queues[q].add_chain(&lm.mem, &[(addr, (n * RECORD_SIZE) as u32, false)]);
            self.stats.records_sent += n as u64;
            self.stats.event_buffers += 1;
            posted = true;
        }
        if posted {
            self.publish(q);
        }
    }

    fn idle(&self) -> bool {
        self.tasks.iter().all(|t| t.state == SimState::Blocked)
            && self.pending.iter().all(Vec::is_empty)
            && (0..self.cfg.num_cpus).all(|c| self.queues[usize::from(c) * 2].in_flight() == 0)
    }

    fn sleep(&mut self) {
        let lm = self.lm;
        let mut pending = false;
        for cpu in 0..self.cfg.num_cpus {
            pending |= self.queues[usize::from(cpu) * 2 + 1].enable_interrupts(&lm.mem);
        }
        if pending {
            return;
        }
        self.stats.sleeps += 1;
        let mut pfd = libc::pollfd {
            fd: self.irq.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd for the duration of the call and nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, 50) };
        if r > 0 {
            // Non-blocking eventfd: a racing reader can only make this return EAGAIN.
            let _ = self.irq.read();
        }
        for cpu in 0..self.cfg.num_cpus {
            self.queues[usize::from(cpu) * 2 + 1].disable_interrupts(&lm.mem);
        }
    }

    fn run(
        &mut self,
        deadline: Instant,
        hook: &mut dyn FnMut(u64),
    ) -> Result<Instant, LoopbackError> {
        // Wait for the host's HELLO (it triggers TASK_NEW + WAKEUP for every task).
        let mut started = None;
        let mut last_progress = Instant::now();
        let mut iter: u32 = 0;
        loop {
            iter = iter.wrapping_add(1);
            // Polling reads the clock on every 64th pass only: it was the most expensive
            // part of an idle pass.
            let check = self.cfg.mode != NotifyMode::Polling || iter.is_multiple_of(64);
            if check && Instant::now() > deadline {
                return Err(LoopbackError::Timeout {
                    applied: self.stats.runs_applied,
                });
            }
            let got = self.reap_decisions();
            hook(self.stats.runs_applied);
            if self.session != 0 && started.is_none() {
                started = Some(Instant::now());
            }
            self.reap_events();
            self.flush_events(!got);
            if started.is_some() && self.stopping && self.idle() {
                break;
            }
            if got {
                if self.cfg.mode != NotifyMode::Polling {
                    last_progress = Instant::now();
                }
                continue;
            }
            let spin = match self.cfg.mode {
                NotifyMode::Polling => true,
                NotifyMode::Notification => false,
                NotifyMode::Hybrid(d) => last_progress.elapsed() < d,
            };
            if spin {
                std::hint::spin_loop();
            } else if self.pending.iter().all(Vec::is_empty) {
                self.sleep();
                last_progress = Instant::now();
            }
        }
        Ok(started.unwrap_or_else(Instant::now))
    }
}

/// Run the loopback with `policy` on the device side; see the module docs for the workload.
pub fn run_loopback(
    cfg: LoopbackConfig,
    policy: Box<dyn Policy>,
) -> Result<LoopbackStats, LoopbackError> {
    run_loopback_with_swap(cfg, policy, None)
}

/// Like [`run_loopback`], but after `swap.0` applied runs the runtime switches to policy
/// `swap.1` while the guest keeps going (the guest must see only a pause).
pub fn run_loopback_with_swap(
    cfg: LoopbackConfig,
    policy: Box<dyn Policy>,
    mut swap: Option<(u64, Box<dyn Policy>)>,
) -> Result<LoopbackStats, LoopbackError> {
    if cfg.batch == 0 || cfg.batch > MAX_BATCH || cfg.tasks == 0 || cfg.num_cpus == 0 {
        return Err(LoopbackError::Config("batch, tasks or cpus out of range"));
    }
    if cfg.num_cpus > 64 {
        return Err(LoopbackError::Config("at most 64 cpus"));
    }
    let buf = (cfg.batch * RECORD_SIZE) as u32;
    let lm = LoopbackMemory::new(cfg.num_cpus, cfg.queue_size, buf)?;
    let setup = |e: std::io::Error| LoopbackError::Setup(e.to_string());
    let kick = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(setup)?;
    let mut ecfg = EngineConfig::new(u32::from(cfg.num_cpus));
    ecfg.event_idx = cfg.event_idx;
    ecfg.max_batch = cfg.batch;
    ecfg.max_queue_size = cfg.queue_size;
    let engine = QueueEngine::new(
        lm.mem.clone(),
        ecfg,
        &lm.queues,
        kick.try_clone().map_err(setup)?,
        Box::new(EventFdInterrupt(irq.try_clone().map_err(setup)?)),
    )
    .map_err(|e| LoopbackError::Setup(e.to_string()))?;
    let rcfg = RuntimeConfig {
        spin_budget: match cfg.mode {
            NotifyMode::Polling => None,
            NotifyMode::Notification => Some(Duration::ZERO),
            NotifyMode::Hybrid(d) => Some(d),
        },
        heartbeat: cfg.heartbeat,
        // The simulated guest never loses an ack: only a stalled thread (a loaded
        // machine) delays one, and giving up on it would only produce STALE retries.
        ack_timeout: cfg.timeout,
        ack_grace: cfg.timeout,
        ..Default::default()
    };
    let all = if cfg.num_cpus >= 64 {
        u64::MAX
    } else {
        (1u64 << cfg.num_cpus) - 1
    };
    let tasks = (0..cfg.tasks)
        .map(|i| SimTask {
            gtid: Gtid::new(PID_BASE + i, 1),
            seq: 0,
            state: SimState::Blocked,
            home: (i % u32::from(cfg.num_cpus)) as u16,
            allowed: all,
            wake_ns: 0,
        })
        .collect();
    let mut guest = Guest {
        lm: &lm,
        cfg: &cfg,
        queues: lm.mapped_driver_queues(cfg.event_idx),
        kick,
        irq,
        tasks,
        pending: vec![Vec::new(); usize::from(cfg.num_cpus)],
        session: 0,
        stopping: false,
        stats: GuestCounters::default(),
        latencies: Vec::with_capacity(cfg.runs as usize + 16),
    };
    guest.post_decision_buffers();
    let handle = Runtime::new(engine, policy, rcfg).spawn()?;
    let deadline = Instant::now() + cfg.timeout;
    let mut hook = |applied: u64| {
        if swap.as_ref().is_some_and(|(after, _)| applied >= *after) {
            if let Some((_, next)) = swap.take() {
                handle.swap_policy(next);
            }
        }
    };
    let result = guest.run(deadline, &mut hook);
    let end = Instant::now();
    let rt = handle.stop()?;
    let start = result?;
    let s = guest.stats;
    Ok(LoopbackStats {
        latencies_ns: guest.latencies,
        elapsed: end.duration_since(start),
        runs_applied: s.runs_applied,
        records_sent: s.records_sent,
        records_received: s.records_received,
        event_buffers: s.event_buffers,
        kicks: s.kicks,
        guest_sleeps: s.sleeps,
        rejected: s.rejected,
        guest_protocol_errors: s.protocol_errors,
        heartbeats: s.heartbeats,
        hellos: s.hellos,
        host: rt.summary(),
    })
}
