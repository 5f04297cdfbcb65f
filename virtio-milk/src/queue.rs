//! Device-side virtqueue engine for virtio-milk.
//!
//! Holds one event queue and one decision queue per guest CPU (split virtqueues,
//! [`crate::vring::DeviceRing`]) over any `vm-memory` guest memory whose regions have host
//! mappings. The rings are translated to host pointers once, when the engine is built (an
//! engine lives for one activation: a reset builds a new one), and validated then. It pops event chains, copies their
//! bytes out of guest memory, validates them strictly and hands decoded [`Message`]s to the
//! caller; it writes decisions into buffers the guest pre-posted on the decision queues.
//!
//! Transport agnostic: the transport (virtio-mmio in milk-vmm, ivshmem for QEMU, shared
//! memory in the loopback harness) supplies each queue's addresses and size, an [`EventFd`]
//! that becomes readable on every driver kick (several queues may share it), and an
//! [`Interrupt`] to signal used buffers.
//!
//! Nothing the guest writes can panic this code or make it access memory outside guest RAM:
//! every guest-controlled index is reduced modulo the queue size or bounds-checked, every
//! guest-controlled length is bounded before use, every buffer address is checked against
//! the region table ([`crate::vring::HostRegions`], falling back to vm-memory's `Bytes`,
//! which returns an error instead of faulting), and malformed input is counted in
//! [`EngineStats`] and dropped.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

use crate::protocol::{
    decision_queue_index, event_queue_index, parse_record, Direction, Message, ProtoError,
    MAX_BATCH, MAX_CPUS, RECORD_SIZE,
};
use crate::vring::{DeviceRing, HostRegions, RingLayout};

/// Most descriptors of one decision chain the engine writes into (a full batch in
/// single-record buffers).
const MAX_DECISION_DESCS: usize = MAX_BATCH;

/// Avail ring flag: the driver does not want interrupts (without EVENT_IDX).
pub const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// Where the driver placed one split virtqueue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Queue size (power of two, <= `max_size`).
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

/// Position of one split virtqueue, as vhost-user's `GET/SET_VRING_BASE` carry it: the next
/// available-ring slot the device will read and the next used-ring slot it will write.
/// Exporting it from one engine and importing it into another hands a live queue over
/// without the driver noticing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    /// Next available-ring index to read.
    pub next_avail: u16,
    /// Next used-ring index to write.
    pub next_used: u16,
}

/// How the engine signals the driver that a queue has used buffers (irqfd, MSI-X, ...).
pub trait Interrupt: Send {
    /// Signal used buffers on queue `queue_index`.
    fn signal(&self, queue_index: u16) -> io::Result<()>;
}

impl<F: Fn(u16) -> io::Result<()> + Send> Interrupt for F {
    fn signal(&self, queue_index: u16) -> io::Result<()> {
        self(queue_index)
    }
}

/// An [`Interrupt`] that writes one eventfd for every queue (e.g. a KVM irqfd).
pub struct EventFdInterrupt(pub EventFd);

impl Interrupt for EventFdInterrupt {
    fn signal(&self, _queue_index: u16) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Engine setup errors.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// CPU count is zero or above the protocol limit.
    #[error("unsupported cpu count {0}")]
    CpuCount(u32),
    /// Wrong number of queue configs.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// 2 * num_cpus.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// A queue's size or addresses are invalid for this memory.
    #[error("queue {0} configuration is invalid")]
    InvalidQueue(u16),
    /// A ring position to import is impossible for this queue (used ahead of avail, or
    /// more than a ring apart).
    #[error("queue {0}: impossible ring position")]
    BadRingState(u16),
    /// Waiting on the kick eventfd failed.
    #[error("kick wait failed: {0}")]
    Kick(io::Error),
}

/// Why a chain or record was dropped. Indexes [`EngineStats::malformed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Malformed {
    /// The available ring index moved by more than the queue size (the queue is then
    /// ignored until the device is reset).
    AvailIndex = 0,
    /// Chain ends in a descriptor that claims a successor that cannot be read.
    BrokenChain,
    /// Event chain contains a device-writable descriptor.
    WritableInEventChain,
    /// Decision chain contains a device-readable descriptor.
    ReadableInDecisionChain,
    /// Event chain longer than `max_batch` records.
    TooLong,
    /// Event chain empty or not a whole number of records.
    BadChainLength,
    /// A descriptor points outside guest memory.
    BadAddress,
    /// Decision buffer smaller than one record.
    DecisionBufferTooSmall,
    /// The chain head index is out of range (cannot be returned).
    BadHead,
    /// Record header length wrong.
    RecordLength,
    /// Record version wrong.
    RecordVersion,
    /// Record type unknown or wrong direction.
    RecordType,
    /// Anything else wrong inside a record (cpu, pid, mask, status, flags).
    RecordField,
}

impl Malformed {
    /// Number of reasons.
    pub const COUNT: usize = 13;
    /// All reasons by index.
    pub const ALL: [Malformed; Self::COUNT] = [
        Malformed::AvailIndex,
        Malformed::BrokenChain,
        Malformed::WritableInEventChain,
        Malformed::ReadableInDecisionChain,
        Malformed::TooLong,
        Malformed::BadChainLength,
        Malformed::BadAddress,
        Malformed::DecisionBufferTooSmall,
        Malformed::BadHead,
        Malformed::RecordLength,
        Malformed::RecordVersion,
        Malformed::RecordType,
        Malformed::RecordField,
    ];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            Malformed::AvailIndex => "avail_index",
            Malformed::BrokenChain => "broken_chain",
            Malformed::WritableInEventChain => "writable_in_event_chain",
            Malformed::ReadableInDecisionChain => "readable_in_decision_chain",
            Malformed::TooLong => "too_long",
            Malformed::BadChainLength => "bad_chain_length",
            Malformed::BadAddress => "bad_address",
            Malformed::DecisionBufferTooSmall => "decision_buffer_too_small",
            Malformed::BadHead => "bad_head",
            Malformed::RecordLength => "record_length",
            Malformed::RecordVersion => "record_version",
            Malformed::RecordType => "record_type",
            Malformed::RecordField => "record_field",
        }
    }

    fn from_proto(e: ProtoError) -> Self {
        match e {
            ProtoError::BadLength(_) => Malformed::RecordLength,
            ProtoError::BadVersion(_) => Malformed::RecordVersion,
            ProtoError::BadType(_) => Malformed::RecordType,
            _ => Malformed::RecordField,
        }
    }
}

/// Engine counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Event chains consumed (valid or not).
    pub event_chains: u64,
    /// Valid records delivered to the caller.
    pub records_in: u64,
    /// Decision records written to the guest.
    pub records_out: u64,
    /// Decision buffers used.
    pub decision_chains: u64,
    /// Dropped input by reason.
    pub malformed: [u64; Malformed::COUNT],
    /// Times a decision queue ran out of guest buffers while decisions were waiting
    /// (counted once per episode, not per retry).
    pub decision_queue_empty: u64,
    /// Decisions dropped because a CPU's backlog was full.
    pub backlog_overflow: u64,
    /// Interrupts signalled.
    pub interrupts: u64,
    /// Interrupts suppressed by EVENT_IDX.
    pub interrupts_suppressed: u64,
    /// Interrupt callbacks that returned an error.
    pub interrupt_errors: u64,
    /// Protocol version of the latest record refused for its version (0: none yet).
    pub last_bad_version: u8,
}

impl EngineStats {
    /// Total malformed count.
    pub fn malformed_total(&self) -> u64 {
        self.malformed.iter().sum()
    }
}

/// Engine parameters.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// Guest CPUs (queue pairs).
    pub num_cpus: u32,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// Records per buffer accepted/written (<= [`MAX_BATCH`]).
    pub max_batch: usize,
    /// Decisions buffered per CPU while the guest has no decision buffer posted.
    pub backlog_limit: usize,
    /// Largest queue size the device offers.
    pub max_queue_size: u16,
}

impl EngineConfig {
    /// Defaults for `num_cpus` CPUs.
    pub fn new(num_cpus: u32) -> Self {
        EngineConfig {
            num_cpus,
            event_idx: true,
            max_batch: MAX_BATCH,
            backlog_limit: 4096,
            max_queue_size: 1024,
        }
    }
}

/// The device-side queue engine. See the module documentation.
pub struct QueueEngine<M: GuestMemory> {
    mem: M,
    /// `mem`'s regions translated once (buffer copies); vm-memory for what it refuses.
    ram: HostRegions,
    cfg: EngineConfig,
    events: Vec<DeviceRing>,
    decisions: Vec<DeviceRing>,
    backlog: Vec<VecDeque<[u8; RECORD_SIZE]>>,
    starved: Vec<bool>,
    /// Per queue index: the driver corrupted the ring; ignored until reset.
    broken: Vec<bool>,
    kick: EventFd,
    extra_kicks: Vec<EventFd>,
    pollfds: Vec<libc::pollfd>,
    irq: Box<dyn Interrupt>,
    stats: EngineStats,
    buf: Vec<u8>,
}

impl<M: GuestMemory> QueueEngine<M> {
    /// Activate the engine on queues the driver configured. `queues[i]` is queue index `i`
    /// (event queue of CPU `i/2` for even `i`, decision queue for odd `i`).
    pub fn new(
        mem: M,
        cfg: EngineConfig,
        queues: &[QueueConfig],
        kick: EventFd,
        irq: Box<dyn Interrupt>,
    ) -> Result<Self, EngineError> {
        if cfg.num_cpus == 0 || cfg.num_cpus > MAX_CPUS {
            return Err(EngineError::CpuCount(cfg.num_cpus));
        }
        let expected = cfg.num_cpus as usize * 2;
        if queues.len() != expected {
            return Err(EngineError::QueueCount {
                expected,
                got: queues.len(),
            });
        }
        let mut events = Vec::new();
        let mut decisions = Vec::new();
        for (i, qc) in queues.iter().enumerate() {
            let idx = i as u16;
            let layout = RingLayout {
                size: qc.size,
                desc_table: qc.desc_table,
                avail_ring: qc.avail_ring,
                used_ring: qc.used_ring,
            };
            let q = DeviceRing::new(&mem, layout, cfg.max_queue_size, cfg.event_idx)
                .map_err(|_| EngineError::InvalidQueue(idx))?;
            if i % 2 == 0 {
                events.push(q);
            } else {
                decisions.push(q);
            }
        }
        let max_batch = cfg.max_batch.clamp(1, MAX_BATCH);
        Ok(QueueEngine {
            ram: HostRegions::new(&mem),
            mem,
            cfg: EngineConfig { max_batch, ..cfg },
            events,
            decisions,
            backlog: vec![VecDeque::new(); expected / 2],
            starved: vec![false; expected / 2],
            broken: vec![false; expected],
            kick,
            extra_kicks: Vec::new(),
            pollfds: Vec::new(),
            irq,
            stats: EngineStats::default(),
            buf: vec![0u8; max_batch * RECORD_SIZE],
        })
    }

    /// The position of every queue, indexed by queue index (2c event, 2c+1 decision).
    /// Decisions still in the backlog are not part of it: they were never given to the
    /// driver.
    pub fn ring_state(&self) -> Vec<RingState> {
        (0..self.events.len() * 2)
            .map(|i| {
                let q = self.queue(i);
                RingState {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                }
            })
            .collect()
    }

    /// Continue every queue from `states` (one per queue index, e.g. from
    /// [`Self::ring_state`] of the engine that served the queues before). Each entry must
    /// be one a device could have reached: `next_used <= next_avail` and at most one ring
    /// of entries apart (wrapping arithmetic); otherwise nothing changes.
    pub fn set_ring_state(&mut self, states: &[RingState]) -> Result<(), EngineError> {
        let n = self.events.len() * 2;
        if states.len() != n {
            return Err(EngineError::QueueCount {
                expected: n,
                got: states.len(),
            });
        }
        for (i, st) in states.iter().enumerate() {
            let size = self.queue(i).size();
            if st.next_avail.wrapping_sub(st.next_used) > size {
                return Err(EngineError::BadRingState(i as u16));
            }
        }
        for (i, st) in states.iter().enumerate() {
            self.queue_mut(i).set_position(st.next_avail, st.next_used);
        }
        Ok(())
    }

    /// Ring positions recovered from guest memory alone, for a device that lost its own
    /// (its process died): each queue continues at the used index the driver can see.
    /// This engine completes every chain in order and right after taking it (events are
    /// consumed whole, decision buffers are used as they are filled), so nothing was taken
    /// without being returned and `next_avail == next_used == used.idx`. A chain that was
    /// taken but not returned before the crash is taken again.
    pub fn ring_state_from_memory(&self) -> Result<Vec<RingState>, EngineError> {
        (0..self.events.len() * 2)
            .map(|i| {
                let used = self.queue(i).used_idx_in_memory();
                Ok(RingState {
                    next_avail: used,
                    next_used: used,
                })
            })
            .collect()
    }

    fn queue(&self, index: usize) -> &DeviceRing {
        if index.is_multiple_of(2) {
            &self.events[index / 2]
        } else {
            &self.decisions[index / 2]
        }
    }

    fn queue_mut(&mut self, index: usize) -> &mut DeviceRing {
        if index.is_multiple_of(2) {
            &mut self.events[index / 2]
        } else {
            &mut self.decisions[index / 2]
        }
    }

    /// Number of CPUs served.
    pub fn num_cpus(&self) -> u32 {
        self.cfg.num_cpus
    }

    /// Engine parameters.
    pub fn config(&self) -> EngineConfig {
        self.cfg
    }

    /// Counters so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    fn count(&mut self, why: Malformed) {
        self.stats.malformed[why as usize] += 1;
    }

    /// Pop every available event chain on every event queue, validate it and append the
    /// decoded messages to `out` as `(queue_cpu, message)`. Returns the number of chains
    /// consumed. Malformed chains/records are counted and dropped.
    pub fn poll_events(&mut self, out: &mut Vec<(u16, Message)>) -> usize {
        let mut chains_total = 0;
        for cpu in 0..self.events.len() {
            let n = self.poll_event_queue(cpu, out);
            chains_total += n;
            if n > 0 {
                self.maybe_signal(event_queue_index(cpu as u16), false, cpu);
            }
        }
        chains_total
    }

    fn poll_event_queue(&mut self, cpu: usize, out: &mut Vec<(u16, Message)>) -> usize {
        if self.broken[2 * cpu] || !self.events[cpu].has_avail() {
            return 0;
        }
        let limit = self.cfg.max_batch * RECORD_SIZE;
        let num_cpus = self.cfg.num_cpus;
        let mut consumed = 0;
        // At most one ring's worth per pass: a driver that keeps posting cannot starve the
        // other queues or keep us here forever.
        let budget = usize::from(self.events[cpu].size());
        while consumed < budget {
            // One chain at a time: re-reads avail.idx, bounded by the queue size.
            let head = match self.events[cpu].pop() {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => {
                    // The driver broke the ring (avail.idx jumped past the queue size): the
                    // queue is unusable until the device is reset; count it once and stop
                    // looking at it instead of spinning on it.
                    self.count(Malformed::AvailIndex);
                    self.broken[2 * cpu] = true;
                    break;
                }
            };
            consumed += 1;
            self.stats.event_chains += 1;
            let mut len = 0usize;
            let mut verdict: Option<Malformed> = None;
            let mut last_has_next = false;
            let mut ndesc = 0;
            for desc in self.events[cpu].chain(head) {
                ndesc += 1;
                last_has_next = desc.has_next();
                if desc.is_write_only() {
                    verdict = Some(Malformed::WritableInEventChain);
                    break;
                }
                let dlen = desc.len as usize;
                if len + dlen > limit {
                    verdict = Some(Malformed::TooLong);
                    break;
                }
                let dst = &mut self.buf[len..len + dlen];
                if !self.ram.read(desc.addr, dst)
                    && self.mem.read_slice(dst, GuestAddress(desc.addr)).is_err()
                {
                    verdict = Some(Malformed::BadAddress);
                    break;
                }
                len += dlen;
            }
            if verdict.is_none() && last_has_next {
                verdict = Some(Malformed::BrokenChain);
            }
            if verdict.is_none() && (ndesc == 0 || len == 0 || !len.is_multiple_of(RECORD_SIZE)) {
                verdict = Some(Malformed::BadChainLength);
            }
            match verdict {
                Some(why) => self.count(why),
                None => {
                    for rec in self.buf[..len].chunks_exact(RECORD_SIZE) {
                        // chunks_exact yields exactly RECORD_SIZE bytes.
                        let mut raw = [0u8; RECORD_SIZE];
                        raw.copy_from_slice(rec);
                        match parse_record(&raw, Direction::GuestToHost, num_cpus) {
                            Ok(m) => {
                                self.stats.records_in += 1;
                                out.push((cpu as u16, m));
                            }
                            Err(e) => {
                                if let ProtoError::BadVersion(v) = e {
                                    self.stats.last_bad_version = v;
                                }
                                self.stats.malformed[Malformed::from_proto(e) as usize] += 1;
                            }
                        }
                    }
                }
            }
            if self.events[cpu].add_used(head, 0).is_err() {
                self.count(Malformed::BadHead);
                // Unreturnable: skip its used slot too, so `ring_state` stays importable.
                self.events[cpu].skip_used();
            }
        }
        // One used.idx store for the whole pass.
        self.events[cpu].publish_used();
        consumed
    }

    fn maybe_signal(&mut self, queue_index: u16, decision: bool, cpu: usize) {
        let q = if decision {
            &mut self.decisions[cpu]
        } else {
            &mut self.events[cpu]
        };
        if q.needs_notification() {
            self.stats.interrupts += 1;
            if self.irq.signal(queue_index).is_err() {
                self.stats.interrupt_errors += 1;
            }
        } else {
            self.stats.interrupts_suppressed += 1;
        }
    }

    /// Queue a decision record for `cpu`'s decision queue (written by [`Self::flush`]).
    /// Returns false (and counts it) if the CPU's backlog is full or `cpu` is out of range.
    pub fn push_decision(&mut self, cpu: u16, rec: [u8; RECORD_SIZE]) -> bool {
        let limit = self.cfg.backlog_limit;
        match self.backlog.get_mut(usize::from(cpu)) {
            Some(b) if b.len() < limit => {
                b.push_back(rec);
                true
            }
            _ => {
                self.stats.backlog_overflow += 1;
                false
            }
        }
    }

    /// Take every decision still waiting for a guest buffer, as `(cpu, record)` in queue
    /// order per CPU (e.g. to keep some and [`Self::push_decision`] them back).
    pub fn take_backlog(&mut self) -> Vec<(u16, [u8; RECORD_SIZE])> {
        let mut out = Vec::with_capacity(self.backlog_len());
        for (cpu, b) in self.backlog.iter_mut().enumerate() {
            out.extend(b.drain(..).map(|r| (cpu as u16, r)));
        }
        out
    }

    /// Drop every decision still waiting for a guest buffer; returns how many.
    pub fn clear_backlog(&mut self) -> usize {
        let n = self.backlog_len();
        for b in &mut self.backlog {
            b.clear();
        }
        n
    }

    /// Queue indexes the driver corrupted (ignored until the device is reset).
    pub fn broken_queues(&self) -> Vec<u16> {
        (0..self.broken.len() as u16)
            .filter(|&i| self.broken[usize::from(i)])
            .collect()
    }

    /// Decisions waiting for a guest buffer.
    pub fn backlog_len(&self) -> usize {
        self.backlog.iter().map(VecDeque::len).sum()
    }

    /// Write queued decisions into the guest's posted decision buffers, as many records per
    /// buffer as fit (up to `max_batch`), and signal the guest. Returns records written.
    pub fn flush(&mut self) -> usize {
        let mut written = 0;
        for cpu in 0..self.decisions.len() {
            if self.backlog[cpu].is_empty() {
                continue;
            }
            let w = self.flush_cpu(cpu);
            written += w;
            if w > 0 {
                self.maybe_signal(decision_queue_index(cpu as u16), true, cpu);
            }
            if self.backlog[cpu].is_empty() {
                self.starved[cpu] = false;
            } else {
                // Out of buffers: ask the driver to kick us when it posts more (re-armed at
                // the current position every time, counted once per episode).
                if !self.starved[cpu] {
                    self.starved[cpu] = true;
                    self.stats.decision_queue_empty += 1;
                }
                self.decisions[cpu].enable_notification();
            }
        }
        written
    }

    fn flush_cpu(&mut self, cpu: usize) -> usize {
        let mut written = 0;
        while !self.backlog[cpu].is_empty() && !self.broken[2 * cpu + 1] {
            let head = match self.decisions[cpu].pop() {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => {
                    self.count(Malformed::AvailIndex);
                    self.broken[2 * cpu + 1] = true;
                    break;
                }
            };
            let mut descs = [(0u64, 0usize); MAX_DECISION_DESCS];
            let mut ndesc = 0;
            let mut verdict = None;
            let mut last_has_next = false;
            let mut cap = 0usize;
            for desc in self.decisions[cpu].chain(head) {
                last_has_next = desc.has_next();
                if !desc.is_write_only() {
                    verdict = Some(Malformed::ReadableInDecisionChain);
                    break;
                }
                // Descriptors past what a full batch can use are walked (the chain must
                // still be well formed) but not kept.
                if ndesc < MAX_DECISION_DESCS {
                    cap = cap.saturating_add(desc.len as usize);
                    descs[ndesc] = (desc.addr, desc.len as usize);
                    ndesc += 1;
                }
            }
            if verdict.is_none() && last_has_next {
                verdict = Some(Malformed::BrokenChain);
            }
            let nrec = (cap / RECORD_SIZE)
                .min(self.cfg.max_batch)
                .min(self.backlog[cpu].len());
            if verdict.is_none() && nrec == 0 {
                verdict = Some(Malformed::DecisionBufferTooSmall);
            }
            let mut used_len = 0u32;
            if let Some(why) = verdict {
                self.count(why);
            } else {
                // Stage the records contiguously, then scatter them over the descriptors.
                let total = nrec * RECORD_SIZE;
                for (i, rec) in self.backlog[cpu].iter().take(nrec).enumerate() {
                    self.buf[i * RECORD_SIZE..(i + 1) * RECORD_SIZE].copy_from_slice(rec);
                }
                let mut off = 0;
                let mut ok = true;
                for &(addr, dlen) in &descs[..ndesc] {
                    if off == total {
                        break;
                    }
                    let n = dlen.min(total - off);
                    let src = &self.buf[off..off + n];
                    if !self.ram.write(addr, src)
                        && self.mem.write_slice(src, GuestAddress(addr)).is_err()
                    {
                        ok = false;
                        break;
                    }
                    off += n;
                }
                if ok {
                    self.backlog[cpu].drain(..nrec);
                    written += nrec;
                    used_len = total as u32;
                    self.stats.records_out += nrec as u64;
                    self.stats.decision_chains += 1;
                } else {
                    self.count(Malformed::BadAddress);
                }
            }
            if self.decisions[cpu].add_used(head, used_len).is_err() {
                self.count(Malformed::BadHead);
                self.decisions[cpu].skip_used();
            }
        }
        self.decisions[cpu].publish_used();
        written
    }

    /// Stop asking for kicks on the event queues (we are polling).
    pub fn disable_notifications(&mut self) {
        for q in &mut self.events {
            q.disable_notification();
        }
    }

    /// Ask for kicks again. Returns true if work arrived meanwhile (then keep polling).
    pub fn enable_notifications(&mut self) -> bool {
        let mut pending = false;
        for q in &mut self.events {
            pending |= q.enable_notification();
        }
        pending
    }

    /// Also wake up on `fd` (for transports with one notification eventfd per queue, e.g.
    /// one ivshmem doorbell vector or one KVM ioeventfd datamatch per queue).
    pub fn add_kick_fd(&mut self, fd: EventFd) {
        self.extra_kicks.push(fd);
    }

    /// Sleep until the driver kicks (any kick eventfd) or `timeout` passes. Returns true on
    /// a kick; every signalled eventfd is drained.
    pub fn wait_kick(&mut self, timeout: Duration) -> Result<bool, EngineError> {
        self.pollfds.clear();
        for fd in std::iter::once(&self.kick).chain(&self.extra_kicks) {
            self.pollfds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: `pollfds` is a valid array of `len` pollfd structs that lives for the whole
        // call; the kernel only writes the `revents` fields.
        let r = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                ms,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(EngineError::Kick(e));
        }
        let mut kicked = false;
        for (pfd, fd) in self
            .pollfds
            .iter()
            .zip(std::iter::once(&self.kick).chain(&self.extra_kicks))
        {
            if pfd.revents & libc::POLLIN != 0 {
                kicked = true;
                // Drain the counter. A non-blocking eventfd drained by someone else in the
                // meantime returns EAGAIN, which is harmless here.
                match fd.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(EngineError::Kick(e)),
                }
            }
        }
        Ok(kicked)
    }

    /// A clone of the kick eventfd (for transports that register it, e.g. as ioeventfd).
    pub fn kick_fd(&self) -> io::Result<EventFd> {
        self.kick.try_clone()
    }
}
