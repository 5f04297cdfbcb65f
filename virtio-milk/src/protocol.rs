//! The virtio-milk wire protocol, version 2: device identity, feature bits, config space and
//! the fixed-size little-endian records exchanged on the event and decision queues.
//!
//! This file is the Rust mirror of `include/virtio_milk.h`; `docs/protocol.md` is the prose.
//! Every record is exactly [`RECORD_SIZE`] bytes (one cache line) and starts with a
//! [`Header`]. Layouts are checked at compile time here and against the C header by the
//! `c_header_layout_matches_rust` test, which compiles the header with gcc.
//!
//! Nothing in this module touches guest memory: [`parse_record`] takes a byte array the
//! queue engine has already copied out of the guest, so a guest changing memory under us
//! cannot make validation and use disagree.
//!
//! Version 2 is not compatible with version 1. A record whose header carries another
//! version is refused with [`ProtoError::BadVersion`]; the runtime turns the first such
//! record into one clear error and a GOODBYE with [`BYE_VERSION`].

use std::fmt;
use std::mem::{offset_of, size_of};

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// virtio device ID of virtio-milk. See docs/protocol.md ("Device ID") for why 58.
pub const VIRTIO_ID_MILK: u32 = 58;

/// Protocol version carried in every record header and in the config space.
pub const PROTOCOL_VERSION: u8 = 2;
/// Size of every record.
pub const RECORD_SIZE: usize = 64;
/// Upper bound on records per buffer the device advertises (config `max_batch`).
pub const MAX_BATCH: usize = 64;
/// Number of CPUs an allowed-CPU mask can describe.
pub const MAX_CPUS: u32 = 64;
/// Queues per guest CPU: event queue (guest -> host) and decision queue (host -> guest).
pub const QUEUES_PER_CPU: u16 = 2;
/// Length of a task's `comm`, as in Linux `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// Default host heartbeat period advertised in the config space.
pub const DEFAULT_HEARTBEAT_MS: u32 = 100;

/// Standard feature bit: virtio 1.0+ device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Standard feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
/// Device feature bit: the host sends HEARTBEAT records; the guest may watchdog them.
pub const VIRTIO_MILK_F_HEARTBEAT: u32 = 0;
/// Device feature bit: buffers may carry more than one record (up to config `max_batch`).
pub const VIRTIO_MILK_F_BATCH: u32 = 1;

/// Feature bits the device offers.
pub const DEVICE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_MILK_F_HEARTBEAT)
    | (1 << VIRTIO_MILK_F_BATCH);

/// Event queue index of a guest CPU.
pub const fn event_queue_index(cpu: u16) -> u16 {
    cpu * QUEUES_PER_CPU
}

/// Decision queue index of a guest CPU.
pub const fn decision_queue_index(cpu: u16) -> u16 {
    cpu * QUEUES_PER_CPU + 1
}

/// Message types (`Header::msg_type`).
pub mod msg {
    /// Session start (both directions).
    pub const HELLO: u16 = 0x01;
    /// Liveness (both directions).
    pub const HEARTBEAT: u16 = 0x02;
    /// Session end (both directions).
    pub const GOODBYE: u16 = 0x03;
    /// A task entered sched_ext (guest -> host).
    pub const TASK_NEW: u16 = 0x10;
    /// A task is runnable and waits for a RUN (guest -> host).
    pub const TASK_WAKEUP: u16 = 0x11;
    /// A task went to sleep (guest -> host).
    pub const TASK_BLOCKED: u16 = 0x12;
    /// A task lost its CPU, is runnable and waits (guest -> host).
    pub const TASK_PREEMPT: u16 = 0x13;
    /// A task yielded, is runnable and waits (guest -> host).
    pub const TASK_YIELD: u16 = 0x14;
    /// A task exited (guest -> host).
    pub const TASK_DEAD: u16 = 0x15;
    /// A task's allowed CPUs changed (guest -> host).
    pub const TASK_AFFINITY: u16 = 0x16;
    /// A task's weight changed (guest -> host).
    pub const TASK_PRIORITY: u16 = 0x17;
    /// A task left sched_ext for another class, still alive (guest -> host).
    pub const TASK_DEPARTED: u16 = 0x18;
    /// A task started running (opt-in, guest -> host).
    pub const TASK_RUNNING: u16 = 0x19;
    /// The guest dispatched a task itself (guest -> host).
    pub const TASK_FALLBACK: u16 = 0x1a;
    /// A CPU went idle (guest -> host).
    pub const CPU_IDLE: u16 = 0x20;
    /// A CPU left idle (guest -> host).
    pub const CPU_BUSY: u16 = 0x21;
    /// Periodic tick (opt-in, guest -> host).
    pub const CPU_TICK: u16 = 0x22;
    /// A higher sched class took the CPU (guest -> host).
    pub const CPU_RELEASE: u16 = 0x23;
    /// The CPU is back for sched_ext (guest -> host).
    pub const CPU_ACQUIRE: u16 = 0x24;
    /// Outcome of a decision (guest -> host).
    pub const ACK: u16 = 0x30;
    /// Decision: run a task on a CPU (host -> guest).
    pub const RUN: u16 = 0x40;
    /// Decision: take the CPU from its task (host -> guest).
    pub const PREEMPT: u16 = 0x41;
}

/// TASK_WAKEUP arg: woken up.
pub const WAKE_WAKEUP: u32 = 0;
/// TASK_WAKEUP arg: first enqueue after TASK_NEW.
pub const WAKE_NEW: u32 = 1;
/// TASK_WAKEUP arg: re-enqueued after a property change.
pub const WAKE_RESTORE: u32 = 2;
/// TASK_PREEMPT arg: slice used up.
pub const PREEMPT_SLICE: u32 = 0;
/// TASK_PREEMPT arg: host PREEMPT, or RUN with [`RUN_F_PREEMPT`].
pub const PREEMPT_HOST: u32 = 1;
/// TASK_PREEMPT arg: a higher sched class took the CPU.
pub const PREEMPT_CLASS: u32 = 2;
/// TASK_PREEMPT arg: any other reschedule.
pub const PREEMPT_OTHER: u32 = 3;
/// TASK_FALLBACK arg: waited fallback_ms for a RUN.
pub const FALLBACK_STARVED: u32 = 0;
/// TASK_FALLBACK arg: its event could not be sent.
pub const FALLBACK_SEND: u32 = 1;

/// Decision flag: RUN preempts the CPU's current task.
pub const RUN_F_PREEMPT: u32 = 1 << 0;
/// Host HELLO flag: send CPU_TICK every `tick_us`.
pub const HELLO_F_TICK: u32 = 1 << 0;
/// Host HELLO flag: send TASK_RUNNING records.
pub const HELLO_F_RUNNING: u32 = 1 << 1;
/// Every HELLO flag this version knows.
pub const HELLO_FLAGS_ALL: u32 = HELLO_F_TICK | HELLO_F_RUNNING;

/// GOODBYE counter: orderly stop.
pub const BYE_STOP: u64 = 0;
/// GOODBYE counter (guest): host silent for host_timeout_ms.
pub const BYE_SILENT: u64 = 1;
/// GOODBYE counter (host): a new HELLO follows.
pub const BYE_RESYNC: u64 = 2;
/// GOODBYE counter: the peer speaks another protocol version.
pub const BYE_VERSION: u64 = 3;

/// A guest task identity: generation in bits 32-63 (never 0), pid in bits 0-31. Never
/// reused within a boot, so a reused pid is a different task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Gtid(pub u64);

impl Gtid {
    /// The gtid of `pid` in generation `generation`.
    pub const fn new(pid: u32, generation: u32) -> Self {
        Gtid(((generation as u64) << 32) | pid as u64)
    }

    /// The pid part (initial pid namespace).
    pub const fn pid(self) -> u32 {
        self.0 as u32
    }

    /// The generation part.
    pub const fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Whether this can name a task: pid and generation both non-zero.
    pub const fn is_valid(self) -> bool {
        self.pid() != 0 && self.generation() != 0
    }
}

impl fmt::Display for Gtid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pid(), self.generation())
    }
}

/// Ack status codes (`Ack::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AckStatus {
    /// RUN: the task started running on the CPU. PREEMPT: the kick was issued.
    Ok = 0,
    /// The decision's seq is not the task's current seq.
    Stale = 1,
    /// Unknown gtid (or the pid now belongs to another generation).
    NoTask = 2,
    /// The CPU is not allowed for the task, or offline, or out of range.
    BadCpu = 3,
    /// The task is not runnable (blocked, running, or dead).
    NotRunnable = 4,
    /// Accepted, but the kernel dropped the dispatch (a new event for the task follows).
    Dropped = 5,
}

impl AckStatus {
    /// Number of status codes.
    pub const COUNT: usize = 6;
    /// All statuses, indexed by their numeric value.
    pub const ALL: [AckStatus; Self::COUNT] = [
        AckStatus::Ok,
        AckStatus::Stale,
        AckStatus::NoTask,
        AckStatus::BadCpu,
        AckStatus::NotRunnable,
        AckStatus::Dropped,
    ];

    /// Decode a wire status.
    pub fn from_wire(v: u32) -> Option<Self> {
        Self::ALL.get(usize::try_from(v).ok()?).copied()
    }

    /// Short upper-case name as in the C header.
    pub fn name(self) -> &'static str {
        match self {
            AckStatus::Ok => "OK",
            AckStatus::Stale => "STALE",
            AckStatus::NoTask => "NO_TASK",
            AckStatus::BadCpu => "BAD_CPU",
            AckStatus::NotRunnable => "NOT_RUNNABLE",
            AckStatus::Dropped => "DROPPED",
        }
    }
}

/// Device configuration space (read-only for the driver).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Number of guest CPUs the device serves; one queue pair per CPU.
    pub num_cpus: Le32,
    /// [`PROTOCOL_VERSION`]; a driver speaking another version refuses the device.
    pub version: Le16,
    /// Records per buffer the device accepts and writes at most.
    pub max_batch: Le16,
    /// Size of one record ([`RECORD_SIZE`]).
    pub record_size: Le16,
    /// Queues per CPU ([`QUEUES_PER_CPU`]); queue `2c` events, `2c+1` decisions.
    pub queues_per_cpu: Le16,
    /// Host heartbeat period; the guest watchdog uses a multiple of it.
    pub heartbeat_ms: Le32,
}

impl Config {
    /// Config space for `num_cpus` CPUs with default limits.
    pub fn new(num_cpus: u32) -> Self {
        Config {
            num_cpus: num_cpus.into(),
            version: u16::from(PROTOCOL_VERSION).into(),
            max_batch: (MAX_BATCH as u16).into(),
            record_size: (RECORD_SIZE as u16).into(),
            queues_per_cpu: QUEUES_PER_CPU.into(),
            heartbeat_ms: DEFAULT_HEARTBEAT_MS.into(),
        }
    }
}

/// Common record header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// One of [`msg`].
    pub msg_type: Le16,
    /// Record length in bytes, header included: [`RECORD_SIZE`].
    pub len: Le16,
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// Reserved, must be zero.
    pub flags: u8,
    /// Task events: `task_cpu(p)`; CPU events and ACK: that CPU; decisions: target CPU;
    /// session records: 0.
    pub cpu: Le16,
}

impl Header {
    /// A version-2 header.
    pub fn new(msg_type: u16, cpu: u16) -> Self {
        Header {
            msg_type: msg_type.into(),
            len: (RECORD_SIZE as u16).into(),
            version: PROTOCOL_VERSION,
            flags: 0,
            cpu: cpu.into(),
        }
    }
}

/// Task events (WAKEUP, BLOCKED, PREEMPT, YIELD, DEAD, DEPARTED, RUNNING, FALLBACK) and CPU
/// events (IDLE, BUSY, TICK, RELEASE, ACQUIRE).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    /// Common header.
    pub hdr: Header,
    /// Task; CPU events: the CPU's current sched_ext task or 0.
    pub gtid: Le64,
    /// Task seq after this event (CPU events: 0).
    pub seq: Le64,
    /// Guest clock (CLOCK_MONOTONIC).
    pub ts_ns: Le64,
    /// The task's total CPU time (`sum_exec_runtime`).
    pub runtime_ns: Le64,
    /// WAKEUP/PREEMPT/YIELD: SCX_ENQ_* flags as enqueue saw them.
    pub enq_flags: Le64,
    /// PREEMPT/YIELD/TICK/RUNNING: slice left.
    pub slice_ns: Le64,
    /// WAKE_*, PREEMPT_*, FALLBACK_*, or 0.
    pub arg: Le32,
    /// CPU that produced the record.
    pub src_cpu: Le16,
    /// Reserved, zero.
    pub reserved: Le16,
}

/// TASK_NEW.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskNew {
    /// Common header.
    pub hdr: Header,
    /// Task.
    pub gtid: Le64,
    /// 1.
    pub seq: Le64,
    /// Guest clock.
    pub ts_ns: Le64,
    /// Task name, NUL padded (not necessarily NUL terminated).
    pub comm: [u8; COMM_LEN],
    /// Allowed CPUs, bit n = CPU n.
    pub cpus_allowed: Le64,
    /// Thread group id.
    pub tgid: Le32,
    /// `p->scx.weight`, 1..10000.
    pub weight: Le16,
    /// Nice, two's complement, -20..19.
    pub nice: Le16,
}

/// TASK_AFFINITY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskAffinity {
    /// Common header.
    pub hdr: Header,
    /// Task.
    pub gtid: Le64,
    /// Task seq after this event.
    pub seq: Le64,
    /// Guest clock.
    pub ts_ns: Le64,
    /// New allowed CPUs, bit n = CPU n.
    pub cpus_allowed: Le64,
    /// Reserved, zero.
    pub reserved: [u8; 24],
}

/// TASK_PRIORITY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskPriority {
    /// Common header.
    pub hdr: Header,
    /// Task.
    pub gtid: Le64,
    /// Task seq after this event.
    pub seq: Le64,
    /// Guest clock.
    pub ts_ns: Le64,
    /// New `p->scx.weight`, 1..10000.
    pub weight: Le32,
    /// New nice value, two's complement.
    pub nice: Le32,
    /// Reserved, zero.
    pub reserved: [u8; 24],
}

/// HELLO, HEARTBEAT, GOODBYE (both directions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// Common header.
    pub hdr: Header,
    /// Sender's view of the number of CPUs.
    pub num_cpus: Le32,
    /// Sender's heartbeat period in ms (0: sends none).
    pub heartbeat_ms: Le32,
    /// Session id chosen by the host in its HELLO; echoed by the guest (0 before).
    pub session_id: Le64,
    /// Sender timestamp in ns.
    pub ts_ns: Le64,
    /// HEARTBEAT: sequence; GOODBYE: `BYE_*`.
    pub counter: Le64,
    /// HELLO: policy name (host) or "linux" (guest), NUL padded.
    pub name: [u8; 16],
    /// Host HELLO: `HELLO_F_*` wanted; guest HELLO: granted.
    pub flags: Le32,
    /// Host HELLO: wanted CPU_TICK period; guest: granted.
    pub tick_us: Le32,
}

/// RUN and PREEMPT decisions (host -> guest).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Common header; `cpu` is the target CPU.
    pub hdr: Header,
    /// RUN: task; PREEMPT: expected current task or 0.
    pub gtid: Le64,
    /// Task seq the decision is based on (PREEMPT: 0).
    pub seq: Le64,
    /// Host clock, echoed in measurements only.
    pub ts_ns: Le64,
    /// RUN: slice, 0 = guest default; capped by the guest.
    pub slice_ns: Le64,
    /// Echoed in the ack.
    pub cookie: Le64,
    /// `RUN_F_*`.
    pub flags: Le32,
    /// Reserved, zero.
    pub reserved: [u8; 12],
}

/// ACK (guest -> host): the outcome of one decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Common header; `cpu` is the CPU that applied or rejected.
    pub hdr: Header,
    /// Decision's gtid.
    pub gtid: Le64,
    /// Decision's seq.
    pub seq: Le64,
    /// Guest clock when the decision was applied or rejected.
    pub ts_ns: Le64,
    /// Decision's cookie.
    pub cookie: Le64,
    /// One of [`AckStatus`].
    pub status: Le32,
    /// Decision's type (RUN or PREEMPT).
    pub decision_type: Le16,
    /// Decision's target CPU.
    pub target_cpu: Le16,
    /// Reserved, zero.
    pub reserved: [u8; 16],
}

// SAFETY: all of these are repr(C) structs made only of integer and byte-array fields with
// no padding (checked by the const assertions below), so any byte pattern is a valid value.
unsafe impl ByteValued for Config {}
// SAFETY: see above.
unsafe impl ByteValued for Header {}
// SAFETY: see above.
unsafe impl ByteValued for TaskEvent {}
// SAFETY: see above.
unsafe impl ByteValued for TaskNew {}
// SAFETY: see above.
unsafe impl ByteValued for TaskAffinity {}
// SAFETY: see above.
unsafe impl ByteValued for TaskPriority {}
// SAFETY: see above.
unsafe impl ByteValued for Session {}
// SAFETY: see above.
unsafe impl ByteValued for Decision {}
// SAFETY: see above.
unsafe impl ByteValued for Ack {}

/// Size of a field, for layout tables.
#[doc(hidden)]
pub const fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// One field of a wire struct: C struct name, C field name, offset, size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldLayout {
    /// C struct tag, e.g. `virtio_milk_hdr`.
    pub c_struct: &'static str,
    /// C field name.
    pub c_field: &'static str,
    /// Offset in bytes.
    pub offset: usize,
    /// Size in bytes.
    pub size: usize,
}

/// Layout of one wire struct.
#[derive(Clone, Copy, Debug)]
pub struct StructLayout {
    /// C struct tag.
    pub c_struct: &'static str,
    /// `sizeof`.
    pub size: usize,
    /// Every field, in declaration order.
    pub fields: &'static [FieldLayout],
}

macro_rules! wire_layout {
    ($ty:ty, $cname:literal, { $($field:ident => $cfield:literal),* $(,)? }) => {
        StructLayout {
            c_struct: $cname,
            size: size_of::<$ty>(),
            fields: &[$(FieldLayout {
                c_struct: $cname,
                c_field: $cfield,
                offset: offset_of!($ty, $field),
                size: field_size(|s: &$ty| &s.$field),
            }),*],
        }
    };
}

/// Layout of every wire struct, as the C header must have it.
pub const LAYOUTS: &[StructLayout] = &[
    wire_layout!(Config, "virtio_milk_config", {
        num_cpus => "num_cpus", version => "version", max_batch => "max_batch",
        record_size => "record_size", queues_per_cpu => "queues_per_cpu",
        heartbeat_ms => "heartbeat_ms",
    }),
    wire_layout!(Header, "virtio_milk_hdr", {
        msg_type => "type", len => "len", version => "version", flags => "flags", cpu => "cpu",
    }),
    wire_layout!(TaskEvent, "virtio_milk_task_event", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns",
        runtime_ns => "runtime_ns", enq_flags => "enq_flags", slice_ns => "slice_ns",
        arg => "arg", src_cpu => "src_cpu", reserved => "reserved",
    }),
    wire_layout!(TaskNew, "virtio_milk_task_new", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns", comm => "comm",
        cpus_allowed => "cpus_allowed", tgid => "tgid", weight => "weight", nice => "nice",
    }),
    wire_layout!(TaskAffinity, "virtio_milk_task_affinity", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns",
        cpus_allowed => "cpus_allowed", reserved => "reserved",
    }),
    wire_layout!(TaskPriority, "virtio_milk_task_priority", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns",
        weight => "weight", nice => "nice", reserved => "reserved",
    }),
    wire_layout!(Session, "virtio_milk_session", {
        hdr => "hdr", num_cpus => "num_cpus", heartbeat_ms => "heartbeat_ms",
        session_id => "session_id", ts_ns => "ts_ns", counter => "counter", name => "name",
        flags => "flags", tick_us => "tick_us",
    }),
    wire_layout!(Decision, "virtio_milk_decision", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns", slice_ns => "slice_ns",
        cookie => "cookie", flags => "flags", reserved => "reserved",
    }),
    wire_layout!(Ack, "virtio_milk_ack", {
        hdr => "hdr", gtid => "gtid", seq => "seq", ts_ns => "ts_ns", cookie => "cookie",
        status => "status", decision_type => "decision_type", target_cpu => "target_cpu",
        reserved => "reserved",
    }),
];

/// Every numeric constant of the C header with its Rust value, for the header test.
pub const C_CONSTANTS: &[(&str, u64)] = &[
    ("VIRTIO_ID_MILK", VIRTIO_ID_MILK as u64),
    ("VIRTIO_MILK_PROTO_VERSION", PROTOCOL_VERSION as u64),
    ("VIRTIO_MILK_RECORD_SIZE", RECORD_SIZE as u64),
    ("VIRTIO_MILK_MAX_BATCH", MAX_BATCH as u64),
    ("VIRTIO_MILK_MAX_CPUS", MAX_CPUS as u64),
    ("VIRTIO_MILK_QUEUES_PER_CPU", QUEUES_PER_CPU as u64),
    ("VIRTIO_MILK_COMM_LEN", COMM_LEN as u64),
    ("VIRTIO_MILK_EVENT_VQ(3)", event_queue_index(3) as u64),
    ("VIRTIO_MILK_DECISION_VQ(3)", decision_queue_index(3) as u64),
    ("VIRTIO_MILK_F_HEARTBEAT", VIRTIO_MILK_F_HEARTBEAT as u64),
    ("VIRTIO_MILK_F_BATCH", VIRTIO_MILK_F_BATCH as u64),
    (
        "VIRTIO_MILK_GTID_PID(0x0000000700000009ULL)",
        Gtid(0x0000_0007_0000_0009).pid() as u64,
    ),
    (
        "VIRTIO_MILK_GTID_GEN(0x0000000700000009ULL)",
        Gtid(0x0000_0007_0000_0009).generation() as u64,
    ),
    ("VIRTIO_MILK_MSG_HELLO", msg::HELLO as u64),
    ("VIRTIO_MILK_MSG_HEARTBEAT", msg::HEARTBEAT as u64),
    ("VIRTIO_MILK_MSG_GOODBYE", msg::GOODBYE as u64),
    ("VIRTIO_MILK_MSG_TASK_NEW", msg::TASK_NEW as u64),
    ("VIRTIO_MILK_MSG_TASK_WAKEUP", msg::TASK_WAKEUP as u64),
    ("VIRTIO_MILK_MSG_TASK_BLOCKED", msg::TASK_BLOCKED as u64),
    ("VIRTIO_MILK_MSG_TASK_PREEMPT", msg::TASK_PREEMPT as u64),
    ("VIRTIO_MILK_MSG_TASK_YIELD", msg::TASK_YIELD as u64),
    ("VIRTIO_MILK_MSG_TASK_DEAD", msg::TASK_DEAD as u64),
    ("VIRTIO_MILK_MSG_TASK_AFFINITY", msg::TASK_AFFINITY as u64),
    ("VIRTIO_MILK_MSG_TASK_PRIORITY", msg::TASK_PRIORITY as u64),
    ("VIRTIO_MILK_MSG_TASK_DEPARTED", msg::TASK_DEPARTED as u64),
    ("VIRTIO_MILK_MSG_TASK_RUNNING", msg::TASK_RUNNING as u64),
    ("VIRTIO_MILK_MSG_TASK_FALLBACK", msg::TASK_FALLBACK as u64),
    ("VIRTIO_MILK_MSG_CPU_IDLE", msg::CPU_IDLE as u64),
    ("VIRTIO_MILK_MSG_CPU_BUSY", msg::CPU_BUSY as u64),
    ("VIRTIO_MILK_MSG_CPU_TICK", msg::CPU_TICK as u64),
    ("VIRTIO_MILK_MSG_CPU_RELEASE", msg::CPU_RELEASE as u64),
    ("VIRTIO_MILK_MSG_CPU_ACQUIRE", msg::CPU_ACQUIRE as u64),
    ("VIRTIO_MILK_MSG_ACK", msg::ACK as u64),
    ("VIRTIO_MILK_MSG_RUN", msg::RUN as u64),
    ("VIRTIO_MILK_MSG_PREEMPT", msg::PREEMPT as u64),
    ("VIRTIO_MILK_WAKE_WAKEUP", WAKE_WAKEUP as u64),
    ("VIRTIO_MILK_WAKE_NEW", WAKE_NEW as u64),
    ("VIRTIO_MILK_WAKE_RESTORE", WAKE_RESTORE as u64),
    ("VIRTIO_MILK_PREEMPT_SLICE", PREEMPT_SLICE as u64),
    ("VIRTIO_MILK_PREEMPT_HOST", PREEMPT_HOST as u64),
    ("VIRTIO_MILK_PREEMPT_CLASS", PREEMPT_CLASS as u64),
    ("VIRTIO_MILK_PREEMPT_OTHER", PREEMPT_OTHER as u64),
    ("VIRTIO_MILK_FALLBACK_STARVED", FALLBACK_STARVED as u64),
    ("VIRTIO_MILK_FALLBACK_SEND", FALLBACK_SEND as u64),
    ("VIRTIO_MILK_ACK_OK", AckStatus::Ok as u64),
    ("VIRTIO_MILK_ACK_STALE", AckStatus::Stale as u64),
    ("VIRTIO_MILK_ACK_NO_TASK", AckStatus::NoTask as u64),
    ("VIRTIO_MILK_ACK_BAD_CPU", AckStatus::BadCpu as u64),
    (
        "VIRTIO_MILK_ACK_NOT_RUNNABLE",
        AckStatus::NotRunnable as u64,
    ),
    ("VIRTIO_MILK_ACK_DROPPED", AckStatus::Dropped as u64),
    ("VIRTIO_MILK_RUN_F_PREEMPT", RUN_F_PREEMPT as u64),
    ("VIRTIO_MILK_HELLO_F_TICK", HELLO_F_TICK as u64),
    ("VIRTIO_MILK_HELLO_F_RUNNING", HELLO_F_RUNNING as u64),
    ("VIRTIO_MILK_BYE_STOP", BYE_STOP),
    ("VIRTIO_MILK_BYE_SILENT", BYE_SILENT),
    ("VIRTIO_MILK_BYE_RESYNC", BYE_RESYNC),
    ("VIRTIO_MILK_BYE_VERSION", BYE_VERSION),
];

// Compile-time layout checks (the C header has the same numbers as _Static_assert).
const _: () = {
    assert!(size_of::<Config>() == 16);
    assert!(size_of::<Header>() == 8);
    assert!(offset_of!(Header, msg_type) == 0);
    assert!(offset_of!(Header, len) == 2);
    assert!(offset_of!(Header, version) == 4);
    assert!(offset_of!(Header, flags) == 5);
    assert!(offset_of!(Header, cpu) == 6);
    assert!(size_of::<TaskEvent>() == RECORD_SIZE);
    assert!(size_of::<TaskNew>() == RECORD_SIZE);
    assert!(size_of::<TaskAffinity>() == RECORD_SIZE);
    assert!(size_of::<TaskPriority>() == RECORD_SIZE);
    assert!(size_of::<Session>() == RECORD_SIZE);
    assert!(size_of::<Decision>() == RECORD_SIZE);
    assert!(size_of::<Ack>() == RECORD_SIZE);
    // Fields every task-carrying record shares, so a receiver can read gtid/seq generically.
    assert!(offset_of!(TaskEvent, gtid) == 8 && offset_of!(TaskEvent, seq) == 16);
    assert!(offset_of!(TaskNew, gtid) == 8 && offset_of!(TaskNew, seq) == 16);
    assert!(offset_of!(TaskAffinity, gtid) == 8 && offset_of!(TaskAffinity, seq) == 16);
    assert!(offset_of!(TaskPriority, gtid) == 8 && offset_of!(TaskPriority, seq) == 16);
    assert!(offset_of!(Decision, gtid) == 8 && offset_of!(Decision, seq) == 16);
    assert!(offset_of!(Ack, gtid) == 8 && offset_of!(Ack, seq) == 16);
    assert!(offset_of!(TaskEvent, runtime_ns) == 32);
    assert!(offset_of!(TaskEvent, enq_flags) == 40);
    assert!(offset_of!(TaskEvent, slice_ns) == 48);
    assert!(offset_of!(TaskEvent, arg) == 56);
    assert!(offset_of!(TaskEvent, src_cpu) == 60);
    assert!(offset_of!(TaskNew, comm) == 32);
    assert!(offset_of!(TaskNew, cpus_allowed) == 48);
    assert!(offset_of!(TaskNew, tgid) == 56);
    assert!(offset_of!(TaskNew, weight) == 60);
    assert!(offset_of!(TaskNew, nice) == 62);
    assert!(offset_of!(TaskAffinity, cpus_allowed) == 32);
    assert!(offset_of!(TaskPriority, weight) == 32);
    assert!(offset_of!(Session, name) == 40);
    assert!(offset_of!(Session, flags) == 56);
    assert!(offset_of!(Session, tick_us) == 60);
    assert!(offset_of!(Decision, slice_ns) == 32);
    assert!(offset_of!(Decision, cookie) == 40);
    assert!(offset_of!(Decision, flags) == 48);
    assert!(offset_of!(Ack, cookie) == 32);
    assert!(offset_of!(Ack, status) == 40);
    assert!(offset_of!(Ack, decision_type) == 44);
    assert!(offset_of!(Ack, target_cpu) == 46);
    // No hidden padding: the fields of every struct add up to its size.
    let mut i = 0;
    while i < LAYOUTS.len() {
        let l = &LAYOUTS[i];
        let mut sum = 0;
        let mut j = 0;
        while j < l.fields.len() {
            sum += l.fields[j].size;
            j += 1;
        }
        assert!(sum == l.size);
        i += 1;
    }
};

/// Why a record was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ProtoError {
    /// Header length is not [`RECORD_SIZE`].
    #[error("bad record length {0}")]
    BadLength(u16),
    /// Header version is not [`PROTOCOL_VERSION`].
    #[error("peer speaks virtio-milk v{0}, this side speaks v{PROTOCOL_VERSION}")]
    BadVersion(u8),
    /// Reserved header flags set.
    #[error("reserved header flags {0:#x} set")]
    BadFlags(u8),
    /// Unknown message type, or one not allowed in this direction.
    #[error("unexpected message type {0:#x}")]
    BadType(u16),
    /// CPU number out of range.
    #[error("cpu {0} out of range")]
    BadCpu(u16),
    /// A task record whose gtid has a zero pid or generation.
    #[error("bad task id {0:#x}")]
    BadGtid(u64),
    /// Allowed-CPU mask is empty or names CPUs that do not exist.
    #[error("bad allowed-cpu mask {0:#x}")]
    BadMask(u64),
    /// Unknown ack status.
    #[error("unknown ack status {0}")]
    BadStatus(u32),
    /// An `arg` value the message type does not define.
    #[error("bad argument {1} for message type {0:#x}")]
    BadArg(u16, u32),
    /// Unknown decision or HELLO flags.
    #[error("unknown record flags {0:#x}")]
    BadRecordFlags(u32),
}

/// Task events, all carried by [`TaskEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskEventKind {
    /// TASK_WAKEUP: runnable, waits for a RUN (`arg`: `WAKE_*`).
    Wakeup,
    /// TASK_BLOCKED.
    Blocked,
    /// TASK_PREEMPT: lost its CPU, runnable, waits (`arg`: `PREEMPT_*`).
    Preempt,
    /// TASK_YIELD: yielded, runnable, waits.
    Yield,
    /// TASK_DEAD: exited.
    Dead,
    /// TASK_DEPARTED: left sched_ext for another class, still alive.
    Departed,
    /// TASK_RUNNING: started running (opt-in).
    Running,
    /// TASK_FALLBACK: the guest dispatched it itself (`arg`: `FALLBACK_*`); it now runs on
    /// `hdr.cpu`.
    Fallback,
}

impl TaskEventKind {
    /// Every kind.
    pub const ALL: [TaskEventKind; 8] = [
        TaskEventKind::Wakeup,
        TaskEventKind::Blocked,
        TaskEventKind::Preempt,
        TaskEventKind::Yield,
        TaskEventKind::Dead,
        TaskEventKind::Departed,
        TaskEventKind::Running,
        TaskEventKind::Fallback,
    ];

    /// Wire type.
    pub const fn msg_type(self) -> u16 {
        match self {
            TaskEventKind::Wakeup => msg::TASK_WAKEUP,
            TaskEventKind::Blocked => msg::TASK_BLOCKED,
            TaskEventKind::Preempt => msg::TASK_PREEMPT,
            TaskEventKind::Yield => msg::TASK_YIELD,
            TaskEventKind::Dead => msg::TASK_DEAD,
            TaskEventKind::Departed => msg::TASK_DEPARTED,
            TaskEventKind::Running => msg::TASK_RUNNING,
            TaskEventKind::Fallback => msg::TASK_FALLBACK,
        }
    }

    fn from_msg(ty: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.msg_type() == ty)
    }

    /// Largest `arg` value the kind defines.
    const fn max_arg(self) -> u32 {
        match self {
            TaskEventKind::Wakeup => WAKE_RESTORE,
            TaskEventKind::Preempt => PREEMPT_OTHER,
            TaskEventKind::Fallback => FALLBACK_SEND,
            _ => 0,
        }
    }
}

/// CPU events, carried by [`TaskEvent`] with seq 0 and the CPU's current task (or 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuEventKind {
    /// CPU_IDLE.
    Idle,
    /// CPU_BUSY.
    Busy,
    /// CPU_TICK (opt-in).
    Tick,
    /// CPU_RELEASE: a higher sched class took the CPU.
    Release,
    /// CPU_ACQUIRE: the CPU is back for sched_ext.
    Acquire,
}

impl CpuEventKind {
    /// Every kind.
    pub const ALL: [CpuEventKind; 5] = [
        CpuEventKind::Idle,
        CpuEventKind::Busy,
        CpuEventKind::Tick,
        CpuEventKind::Release,
        CpuEventKind::Acquire,
    ];

    /// Wire type.
    pub const fn msg_type(self) -> u16 {
        match self {
            CpuEventKind::Idle => msg::CPU_IDLE,
            CpuEventKind::Busy => msg::CPU_BUSY,
            CpuEventKind::Tick => msg::CPU_TICK,
            CpuEventKind::Release => msg::CPU_RELEASE,
            CpuEventKind::Acquire => msg::CPU_ACQUIRE,
        }
    }

    fn from_msg(ty: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.msg_type() == ty)
    }
}

/// Decoded [`TaskEvent`] body (task and CPU events).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventInfo {
    /// `hdr.cpu`: task events `task_cpu(p)`, CPU events that CPU.
    pub cpu: u16,
    /// Task (CPU events: current task or `Gtid(0)`).
    pub gtid: Gtid,
    /// Task seq after this event (CPU events: 0).
    pub seq: u64,
    /// Guest clock.
    pub ts_ns: u64,
    /// The task's total CPU time.
    pub runtime_ns: u64,
    /// SCX_ENQ_* flags.
    pub enq_flags: u64,
    /// Slice left.
    pub slice_ns: u64,
    /// `WAKE_*`, `PREEMPT_*`, `FALLBACK_*`, 0.
    pub arg: u32,
    /// CPU that produced the record.
    pub src_cpu: u16,
}

/// Decoded TASK_NEW.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskNewInfo {
    /// `task_cpu(p)`.
    pub cpu: u16,
    /// Task.
    pub gtid: Gtid,
    /// Seq (1).
    pub seq: u64,
    /// Guest clock.
    pub ts_ns: u64,
    /// Name, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// Allowed CPUs.
    pub cpus_allowed: u64,
    /// Thread group.
    pub tgid: u32,
    /// Weight, 1..10000 (100 = nice 0).
    pub weight: u32,
    /// Nice.
    pub nice: i32,
}

/// Decoded TASK_AFFINITY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityInfo {
    /// `task_cpu(p)`.
    pub cpu: u16,
    /// Task.
    pub gtid: Gtid,
    /// Seq.
    pub seq: u64,
    /// Guest clock.
    pub ts_ns: u64,
    /// Allowed CPUs.
    pub cpus_allowed: u64,
}

/// Decoded TASK_PRIORITY.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriorityInfo {
    /// `task_cpu(p)`.
    pub cpu: u16,
    /// Task.
    pub gtid: Gtid,
    /// Seq.
    pub seq: u64,
    /// Guest clock.
    pub ts_ns: u64,
    /// Weight.
    pub weight: u32,
    /// Nice.
    pub nice: i32,
}

/// Decoded session record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionInfo {
    /// Sender CPU.
    pub cpu: u16,
    /// Sender's CPU count.
    pub num_cpus: u32,
    /// Sender's heartbeat period.
    pub heartbeat_ms: u32,
    /// Session id.
    pub session_id: u64,
    /// Sender timestamp.
    pub ts_ns: u64,
    /// HEARTBEAT sequence / GOODBYE reason.
    pub counter: u64,
    /// Name, NUL padded.
    pub name: [u8; 16],
    /// HELLO: `HELLO_F_*`.
    pub flags: u32,
    /// HELLO: tick period in us.
    pub tick_us: u32,
}

/// Decoded ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckInfo {
    /// CPU that applied or rejected the decision.
    pub cpu: u16,
    /// Decision's gtid.
    pub gtid: Gtid,
    /// Decision's seq.
    pub seq: u64,
    /// Guest timestamp.
    pub ts_ns: u64,
    /// Decision's cookie.
    pub cookie: u64,
    /// Outcome.
    pub status: AckStatus,
    /// RUN or PREEMPT.
    pub decision_type: u16,
    /// Decision's target CPU.
    pub target_cpu: u16,
}

/// Decoded RUN/PREEMPT decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionInfo {
    /// Target CPU.
    pub cpu: u16,
    /// RUN: task; PREEMPT: expected current task or `Gtid(0)`.
    pub gtid: Gtid,
    /// Task seq the decision is based on (PREEMPT: 0).
    pub seq: u64,
    /// Host timestamp.
    pub ts_ns: u64,
    /// RUN slice (0: guest default).
    pub slice_ns: u64,
    /// Cookie echoed in the ack.
    pub cookie: u64,
    /// `RUN_F_*`.
    pub flags: u32,
}

/// A validated message, decoded to native integers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// HELLO.
    Hello(SessionInfo),
    /// HEARTBEAT.
    Heartbeat(SessionInfo),
    /// GOODBYE.
    Goodbye(SessionInfo),
    /// TASK_NEW.
    TaskNew(TaskNewInfo),
    /// TASK_WAKEUP / BLOCKED / PREEMPT / YIELD / DEAD / DEPARTED / RUNNING / FALLBACK.
    Task(TaskEventKind, EventInfo),
    /// CPU_IDLE / BUSY / TICK / RELEASE / ACQUIRE.
    Cpu(CpuEventKind, EventInfo),
    /// TASK_AFFINITY.
    TaskAffinity(AffinityInfo),
    /// TASK_PRIORITY.
    TaskPriority(PriorityInfo),
    /// ACK.
    Ack(AckInfo),
    /// RUN decision.
    Run(DecisionInfo),
    /// PREEMPT decision.
    Preempt(DecisionInfo),
}

/// Which side produced a record; decides which types are legal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Event queue: guest -> host.
    GuestToHost,
    /// Decision queue: host -> guest.
    HostToGuest,
}

/// Copy a name into a NUL-padded fixed buffer (truncating).
pub fn pack_name<const N: usize>(name: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let b = name.as_bytes();
    let n = b.len().min(N);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// Printable form of a NUL-padded name.
pub fn unpack_name(name: &[u8]) -> String {
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

fn read_rec<T: ByteValued + Default>(raw: &[u8; RECORD_SIZE]) -> T {
    // Every record struct is RECORD_SIZE bytes (const-asserted), so the copy is in bounds;
    // copying into an owned value also avoids any alignment demand on `raw`.
    let mut v = T::default();
    v.as_mut_slice().copy_from_slice(&raw[..size_of::<T>()]);
    v
}

fn check_mask(mask: u64, num_cpus: u32) -> Result<u64, ProtoError> {
    let valid = if num_cpus >= 64 {
        u64::MAX
    } else {
        (1u64 << num_cpus) - 1
    };
    if mask == 0 || mask & !valid != 0 {
        return Err(ProtoError::BadMask(mask));
    }
    Ok(mask)
}

fn task_gtid(g: Le64) -> Result<Gtid, ProtoError> {
    let g = Gtid(g.into());
    if g.is_valid() {
        Ok(g)
    } else {
        Err(ProtoError::BadGtid(g.0))
    }
}

/// A gtid that may be 0 ("none"), otherwise must be valid.
fn optional_gtid(g: Le64) -> Result<Gtid, ProtoError> {
    match u64::from(g) {
        0 => Ok(Gtid(0)),
        _ => task_gtid(g),
    }
}

fn check_cpu(cpu: u16, num_cpus: u32) -> Result<u16, ProtoError> {
    if u32::from(cpu) < num_cpus {
        Ok(cpu)
    } else {
        Err(ProtoError::BadCpu(cpu))
    }
}

/// The version byte of a raw record, whatever else it holds (for refusal messages).
pub fn record_version(raw: &[u8; RECORD_SIZE]) -> u8 {
    raw[offset_of!(Header, version)]
}

/// Validate and decode one record received in `dir` from a peer with `num_cpus` CPUs.
///
/// Total over all inputs: returns an error for anything malformed, never panics.
pub fn parse_record(
    raw: &[u8; RECORD_SIZE],
    dir: Direction,
    num_cpus: u32,
) -> Result<Message, ProtoError> {
    let hdr: Header = {
        let mut h = Header::default();
        h.as_mut_slice()
            .copy_from_slice(&raw[..size_of::<Header>()]);
        h
    };
    // Version first: a v1 peer's records must be reported as such, whatever else differs.
    if hdr.version != PROTOCOL_VERSION {
        return Err(ProtoError::BadVersion(hdr.version));
    }
    let len = u16::from(hdr.len);
    if usize::from(len) != RECORD_SIZE {
        return Err(ProtoError::BadLength(len));
    }
    if hdr.flags != 0 {
        return Err(ProtoError::BadFlags(hdr.flags));
    }
    let ty = u16::from(hdr.msg_type);
    let cpu = check_cpu(u16::from(hdr.cpu), num_cpus)?;
    let guest = dir == Direction::GuestToHost;
    let event = |r: &TaskEvent, gtid: Gtid| -> Result<EventInfo, ProtoError> {
        Ok(EventInfo {
            cpu,
            gtid,
            seq: r.seq.into(),
            ts_ns: r.ts_ns.into(),
            runtime_ns: r.runtime_ns.into(),
            enq_flags: r.enq_flags.into(),
            slice_ns: r.slice_ns.into(),
            arg: r.arg.into(),
            src_cpu: check_cpu(r.src_cpu.into(), num_cpus)?,
        })
    };
    if guest {
        if let Some(kind) = TaskEventKind::from_msg(ty) {
            let r: TaskEvent = read_rec(raw);
            let e = event(&r, task_gtid(r.gtid)?)?;
            if e.arg > kind.max_arg() {
                return Err(ProtoError::BadArg(ty, e.arg));
            }
            return Ok(Message::Task(kind, e));
        }
        if let Some(kind) = CpuEventKind::from_msg(ty) {
            let r: TaskEvent = read_rec(raw);
            let e = event(&r, optional_gtid(r.gtid)?)?;
            if e.arg != 0 {
                return Err(ProtoError::BadArg(ty, e.arg));
            }
            return Ok(Message::Cpu(kind, e));
        }
    }
    let session = |r: Session| -> Result<SessionInfo, ProtoError> {
        let flags: u32 = r.flags.into();
        if flags & !HELLO_FLAGS_ALL != 0 {
            return Err(ProtoError::BadRecordFlags(flags));
        }
        Ok(SessionInfo {
            cpu,
            num_cpus: r.num_cpus.into(),
            heartbeat_ms: r.heartbeat_ms.into(),
            session_id: r.session_id.into(),
            ts_ns: r.ts_ns.into(),
            counter: r.counter.into(),
            name: r.name,
            flags,
            tick_us: r.tick_us.into(),
        })
    };
    match (ty, guest) {
        (msg::HELLO, _) => Ok(Message::Hello(session(read_rec(raw))?)),
        (msg::HEARTBEAT, _) => Ok(Message::Heartbeat(session(read_rec(raw))?)),
        (msg::GOODBYE, _) => Ok(Message::Goodbye(session(read_rec(raw))?)),
        (msg::TASK_NEW, true) => {
            let r: TaskNew = read_rec(raw);
            Ok(Message::TaskNew(TaskNewInfo {
                cpu,
                gtid: task_gtid(r.gtid)?,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                comm: r.comm,
                cpus_allowed: check_mask(r.cpus_allowed.into(), num_cpus)?,
                tgid: r.tgid.into(),
                weight: u16::from(r.weight).into(),
                nice: i32::from(u16::from(r.nice) as i16),
            }))
        }
        (msg::TASK_AFFINITY, true) => {
            let r: TaskAffinity = read_rec(raw);
            Ok(Message::TaskAffinity(AffinityInfo {
                cpu,
                gtid: task_gtid(r.gtid)?,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                cpus_allowed: check_mask(r.cpus_allowed.into(), num_cpus)?,
            }))
        }
        (msg::TASK_PRIORITY, true) => {
            let r: TaskPriority = read_rec(raw);
            Ok(Message::TaskPriority(PriorityInfo {
                cpu,
                gtid: task_gtid(r.gtid)?,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                weight: r.weight.into(),
                nice: u32::from(r.nice) as i32,
            }))
        }
        (msg::ACK, true) => {
            let r: Ack = read_rec(raw);
            let st: u32 = r.status.into();
            let status = AckStatus::from_wire(st).ok_or(ProtoError::BadStatus(st))?;
            let target_cpu: u16 = r.target_cpu.into();
            // The guest echoes the decision's CPU: a BAD_CPU ack may name a CPU
            // that does not exist (that is why it was rejected).
            if u32::from(target_cpu) >= num_cpus && status != AckStatus::BadCpu {
                return Err(ProtoError::BadCpu(target_cpu));
            }
            let decision_type: u16 = r.decision_type.into();
            if decision_type != msg::RUN && decision_type != msg::PREEMPT {
                return Err(ProtoError::BadType(decision_type));
            }
            Ok(Message::Ack(AckInfo {
                cpu,
                gtid: Gtid(r.gtid.into()),
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                cookie: r.cookie.into(),
                status,
                decision_type,
                target_cpu,
            }))
        }
        (msg::RUN, false) | (msg::PREEMPT, false) => {
            let r: Decision = read_rec(raw);
            let flags: u32 = r.flags.into();
            let allowed = if ty == msg::RUN { RUN_F_PREEMPT } else { 0 };
            if flags & !allowed != 0 {
                return Err(ProtoError::BadRecordFlags(flags));
            }
            let gtid = if ty == msg::RUN {
                task_gtid(r.gtid)?
            } else {
                optional_gtid(r.gtid)?
            };
            let d = DecisionInfo {
                cpu,
                gtid,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                slice_ns: r.slice_ns.into(),
                cookie: r.cookie.into(),
                flags,
            };
            Ok(if ty == msg::RUN {
                Message::Run(d)
            } else {
                Message::Preempt(d)
            })
        }
        _ => Err(ProtoError::BadType(ty)),
    }
}

fn to_record<T: ByteValued>(v: &T) -> [u8; RECORD_SIZE] {
    let mut out = [0u8; RECORD_SIZE];
    let s = v.as_slice();
    out[..s.len()].copy_from_slice(s);
    out
}

fn event_record(ty: u16, e: &EventInfo) -> [u8; RECORD_SIZE] {
    to_record(&TaskEvent {
        hdr: Header::new(ty, e.cpu),
        gtid: e.gtid.0.into(),
        seq: e.seq.into(),
        ts_ns: e.ts_ns.into(),
        runtime_ns: e.runtime_ns.into(),
        enq_flags: e.enq_flags.into(),
        slice_ns: e.slice_ns.into(),
        arg: e.arg.into(),
        src_cpu: e.src_cpu.into(),
        reserved: 0.into(),
    })
}

impl Message {
    /// Encode as one wire record.
    pub fn encode(&self) -> [u8; RECORD_SIZE] {
        let session = |ty: u16, s: &SessionInfo| {
            to_record(&Session {
                hdr: Header::new(ty, s.cpu),
                num_cpus: s.num_cpus.into(),
                heartbeat_ms: s.heartbeat_ms.into(),
                session_id: s.session_id.into(),
                ts_ns: s.ts_ns.into(),
                counter: s.counter.into(),
                name: s.name,
                flags: s.flags.into(),
                tick_us: s.tick_us.into(),
            })
        };
        let decision = |ty: u16, d: &DecisionInfo| {
            to_record(&Decision {
                hdr: Header::new(ty, d.cpu),
                gtid: d.gtid.0.into(),
                seq: d.seq.into(),
                ts_ns: d.ts_ns.into(),
                slice_ns: d.slice_ns.into(),
                cookie: d.cookie.into(),
                flags: d.flags.into(),
                reserved: [0; 12],
            })
        };
        match self {
            Message::Hello(s) => session(msg::HELLO, s),
            Message::Heartbeat(s) => session(msg::HEARTBEAT, s),
            Message::Goodbye(s) => session(msg::GOODBYE, s),
            Message::TaskNew(t) => to_record(&TaskNew {
                hdr: Header::new(msg::TASK_NEW, t.cpu),
                gtid: t.gtid.0.into(),
                seq: t.seq.into(),
                ts_ns: t.ts_ns.into(),
                comm: t.comm,
                cpus_allowed: t.cpus_allowed.into(),
                tgid: t.tgid.into(),
                weight: (t.weight.min(u32::from(u16::MAX)) as u16).into(),
                nice: (t.nice.clamp(i16::MIN.into(), i16::MAX.into()) as i16 as u16).into(),
            }),
            Message::Task(kind, e) => event_record(kind.msg_type(), e),
            Message::Cpu(kind, e) => event_record(kind.msg_type(), e),
            Message::TaskAffinity(a) => to_record(&TaskAffinity {
                hdr: Header::new(msg::TASK_AFFINITY, a.cpu),
                gtid: a.gtid.0.into(),
                seq: a.seq.into(),
                ts_ns: a.ts_ns.into(),
                cpus_allowed: a.cpus_allowed.into(),
                reserved: [0; 24],
            }),
            Message::TaskPriority(p) => to_record(&TaskPriority {
                hdr: Header::new(msg::TASK_PRIORITY, p.cpu),
                gtid: p.gtid.0.into(),
                seq: p.seq.into(),
                ts_ns: p.ts_ns.into(),
                weight: p.weight.into(),
                nice: (p.nice as u32).into(),
                reserved: [0; 24],
            }),
            Message::Ack(a) => to_record(&Ack {
                hdr: Header::new(msg::ACK, a.cpu),
                gtid: a.gtid.0.into(),
                seq: a.seq.into(),
                ts_ns: a.ts_ns.into(),
                cookie: a.cookie.into(),
                status: (a.status as u32).into(),
                decision_type: a.decision_type.into(),
                target_cpu: a.target_cpu.into(),
                reserved: [0; 16],
            }),
            Message::Run(d) => decision(msg::RUN, d),
            Message::Preempt(d) => decision(msg::PREEMPT, d),
        }
    }

    /// Wire type of this message.
    pub fn msg_type(&self) -> u16 {
        match self {
            Message::Hello(_) => msg::HELLO,
            Message::Heartbeat(_) => msg::HEARTBEAT,
            Message::Goodbye(_) => msg::GOODBYE,
            Message::TaskNew(_) => msg::TASK_NEW,
            Message::Task(kind, _) => kind.msg_type(),
            Message::Cpu(kind, _) => kind.msg_type(),
            Message::TaskAffinity(_) => msg::TASK_AFFINITY,
            Message::TaskPriority(_) => msg::TASK_PRIORITY,
            Message::Ack(_) => msg::ACK,
            Message::Run(_) => msg::RUN,
            Message::Preempt(_) => msg::PREEMPT,
        }
    }
}

/// Short name of a message type, for metrics and logs.
pub fn type_name(ty: u16) -> &'static str {
    match ty {
        msg::HELLO => "HELLO",
        msg::HEARTBEAT => "HEARTBEAT",
        msg::GOODBYE => "GOODBYE",
        msg::TASK_NEW => "TASK_NEW",
        msg::TASK_WAKEUP => "TASK_WAKEUP",
        msg::TASK_BLOCKED => "TASK_BLOCKED",
        msg::TASK_PREEMPT => "TASK_PREEMPT",
        msg::TASK_YIELD => "TASK_YIELD",
        msg::TASK_DEAD => "TASK_DEAD",
        msg::TASK_AFFINITY => "TASK_AFFINITY",
        msg::TASK_PRIORITY => "TASK_PRIORITY",
        msg::TASK_DEPARTED => "TASK_DEPARTED",
        msg::TASK_RUNNING => "TASK_RUNNING",
        msg::TASK_FALLBACK => "TASK_FALLBACK",
        msg::CPU_IDLE => "CPU_IDLE",
        msg::CPU_BUSY => "CPU_BUSY",
        msg::CPU_TICK => "CPU_TICK",
        msg::CPU_RELEASE => "CPU_RELEASE",
        msg::CPU_ACQUIRE => "CPU_ACQUIRE",
        msg::ACK => "ACK",
        msg::RUN => "RUN",
        msg::PREEMPT => "PREEMPT",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Gtid = Gtid::new(42, 3);

    fn ev(cpu: u16, gtid: Gtid, seq: u64) -> EventInfo {
        EventInfo {
            cpu,
            gtid,
            seq,
            ts_ns: 6,
            runtime_ns: 1_000,
            enq_flags: 1 << 40,
            slice_ns: 700,
            arg: 0,
            src_cpu: 0,
        }
    }

    fn all_guest_messages() -> Vec<Message> {
        let mut v = vec![
            Message::Hello(SessionInfo {
                cpu: 0,
                num_cpus: 4,
                heartbeat_ms: 100,
                session_id: 7,
                ts_ns: 1,
                counter: 0,
                name: pack_name("linux"),
                flags: HELLO_F_TICK,
                tick_us: 1000,
            }),
            Message::Heartbeat(SessionInfo {
                counter: 9,
                ..Default::default()
            }),
            Message::Goodbye(SessionInfo {
                counter: BYE_SILENT,
                ..Default::default()
            }),
            Message::TaskNew(TaskNewInfo {
                cpu: 1,
                gtid: G,
                seq: 1,
                ts_ns: 5,
                comm: pack_name("worker"),
                cpus_allowed: 0b1010,
                tgid: 40,
                weight: 10000,
                nice: -20,
            }),
            Message::TaskAffinity(AffinityInfo {
                cpu: 0,
                gtid: G,
                seq: 3,
                ts_ns: 7,
                cpus_allowed: 1,
            }),
            Message::TaskPriority(PriorityInfo {
                cpu: 0,
                gtid: G,
                seq: 4,
                ts_ns: 8,
                weight: 1024,
                nice: 19,
            }),
            Message::Ack(AckInfo {
                cpu: 1,
                gtid: G,
                status: AckStatus::Dropped,
                seq: 4,
                ts_ns: 11,
                cookie: 77,
                decision_type: msg::RUN,
                target_cpu: 2,
            }),
        ];
        for kind in TaskEventKind::ALL {
            let mut e = ev(2, G, 5);
            e.arg = kind.max_arg();
            e.src_cpu = 3;
            v.push(Message::Task(kind, e));
        }
        for kind in CpuEventKind::ALL {
            v.push(Message::Cpu(
                kind,
                EventInfo {
                    seq: 0,
                    ..ev(3, G, 0)
                },
            ));
            v.push(Message::Cpu(
                kind,
                EventInfo {
                    seq: 0,
                    ..ev(3, Gtid(0), 0)
                },
            ));
        }
        v
    }

    #[test]
    fn gtid_parts() {
        let g = Gtid::new(0xdead_beef, 7);
        assert_eq!(g.0, 0x0000_0007_dead_beef);
        assert_eq!((g.pid(), g.generation()), (0xdead_beef, 7));
        assert!(g.is_valid());
        assert!(!Gtid::new(5, 0).is_valid());
        assert!(!Gtid::new(0, 5).is_valid());
        assert_eq!(g.to_string(), format!("{}/7", 0xdead_beefu32));
    }

    #[test]
    fn ack_target_cpu_out_of_range_only_with_bad_cpu() {
        let ack = |status, target_cpu| {
            Message::Ack(AckInfo {
                cpu: 0,
                gtid: G,
                status,
                seq: 1,
                ts_ns: 0,
                cookie: 7,
                decision_type: msg::RUN,
                target_cpu,
            })
        };
        // The guest echoes a nonexistent CPU it rejected.
        let m = ack(AckStatus::BadCpu, 7);
        assert_eq!(parse_record(&m.encode(), Direction::GuestToHost, 2), Ok(m));
        // Any other status naming a nonexistent CPU is malformed.
        for st in [
            AckStatus::Ok,
            AckStatus::Stale,
            AckStatus::NoTask,
            AckStatus::Dropped,
        ] {
            assert_eq!(
                parse_record(&ack(st, 7).encode(), Direction::GuestToHost, 2),
                Err(ProtoError::BadCpu(7))
            );
        }
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_guest_messages() {
            let raw = m.encode();
            assert_eq!(parse_record(&raw, Direction::GuestToHost, 4), Ok(m.clone()));
            assert_eq!(u16::from_le_bytes([raw[0], raw[1]]), m.msg_type());
            assert_ne!(type_name(m.msg_type()), "UNKNOWN");
        }
        let d = DecisionInfo {
            cpu: 3,
            gtid: G,
            seq: 11,
            slice_ns: 3_000_000,
            cookie: 5,
            ts_ns: 1,
            flags: RUN_F_PREEMPT,
        };
        let p = DecisionInfo {
            flags: 0,
            gtid: Gtid(0),
            ..d
        };
        for m in [
            Message::Run(d),
            Message::Preempt(p),
            Message::Preempt(DecisionInfo { flags: 0, ..d }),
        ] {
            assert_eq!(parse_record(&m.encode(), Direction::HostToGuest, 4), Ok(m));
        }
    }

    #[test]
    fn wire_bytes_are_little_endian() {
        let raw = Message::Task(
            TaskEventKind::Blocked,
            EventInfo {
                cpu: 0x0102,
                gtid: Gtid(0x0102_0304_0a0b_0c0d),
                seq: 0x1122334455667788,
                runtime_ns: 0x99,
                arg: 0,
                src_cpu: 0x0304,
                ..Default::default()
            },
        )
        .encode();
        assert_eq!(&raw[0..2], &[0x12, 0x00]);
        assert_eq!(&raw[2..4], &[64, 0]);
        assert_eq!(raw[4], PROTOCOL_VERSION);
        assert_eq!(raw[4], 2);
        assert_eq!(&raw[6..8], &[0x02, 0x01]);
        assert_eq!(
            &raw[8..16],
            &[0x0d, 0x0c, 0x0b, 0x0a, 0x04, 0x03, 0x02, 0x01]
        );
        assert_eq!(
            &raw[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(raw[32], 0x99);
        assert_eq!(&raw[60..62], &[0x04, 0x03]);
    }

    #[test]
    fn v1_records_are_refused_by_version() {
        // A v1 CPU_IDLE as the v1 guest sent it: same header, version byte 1.
        let mut r = Message::Cpu(CpuEventKind::Idle, EventInfo::default()).encode();
        r[4] = 1;
        assert_eq!(record_version(&r), 1);
        let e = parse_record(&r, Direction::GuestToHost, 4).unwrap_err();
        assert_eq!(e, ProtoError::BadVersion(1));
        assert_eq!(
            e.to_string(),
            "peer speaks virtio-milk v1, this side speaks v2"
        );
        // Version is checked before anything else, so a v1 record of any shape is named.
        r[2] = 32;
        r[0] = 0x7f;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadVersion(1))
        );
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let good = Message::Cpu(CpuEventKind::Idle, EventInfo::default()).encode();
        let mut r = good;
        r[2] = 32;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadLength(32))
        );
        let mut r = good;
        r[5] = 1;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadFlags(1))
        );
        let mut r = good;
        r[0] = 0x7f;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadType(0x7f))
        );
        let mut r = good;
        r[6] = 4;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadCpu(4))
        );
        let mut r = good;
        r[60] = 4;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadCpu(4)),
            "src_cpu out of range"
        );
        // Decisions may not arrive on an event queue, events not on a decision queue.
        let run = Message::Run(DecisionInfo {
            gtid: G,
            ..Default::default()
        })
        .encode();
        assert_eq!(
            parse_record(&run, Direction::GuestToHost, 4),
            Err(ProtoError::BadType(msg::RUN))
        );
        assert_eq!(
            parse_record(&good, Direction::HostToGuest, 4),
            Err(ProtoError::BadType(msg::CPU_IDLE))
        );
    }

    #[test]
    fn malformed_bodies_are_rejected() {
        let mut m = all_guest_messages()[3].clone();
        if let Message::TaskNew(t) = &mut m {
            t.cpus_allowed = 1 << 4;
        }
        assert_eq!(
            parse_record(&m.encode(), Direction::GuestToHost, 4),
            Err(ProtoError::BadMask(1 << 4))
        );
        // A task event needs pid and generation; a CPU event may carry no task.
        for g in [Gtid(0), Gtid::new(9, 0), Gtid::new(0, 9)] {
            let wake = Message::Task(TaskEventKind::Wakeup, ev(0, g, 1));
            assert_eq!(
                parse_record(&wake.encode(), Direction::GuestToHost, 4),
                Err(ProtoError::BadGtid(g.0))
            );
        }
        let busy = Message::Cpu(CpuEventKind::Busy, ev(0, Gtid::new(9, 0), 0));
        assert_eq!(
            parse_record(&busy.encode(), Direction::GuestToHost, 4),
            Err(ProtoError::BadGtid(9))
        );
        // Arguments outside what each type defines.
        for (kind, bad) in [
            (TaskEventKind::Wakeup, WAKE_RESTORE + 1),
            (TaskEventKind::Preempt, PREEMPT_OTHER + 1),
            (TaskEventKind::Fallback, FALLBACK_SEND + 1),
            (TaskEventKind::Blocked, 1),
        ] {
            let mut e = ev(0, G, 1);
            e.arg = bad;
            assert_eq!(
                parse_record(&Message::Task(kind, e).encode(), Direction::GuestToHost, 4),
                Err(ProtoError::BadArg(kind.msg_type(), bad))
            );
        }
        let mut ack = all_guest_messages()[6].encode();
        ack[40] = 9;
        assert_eq!(
            parse_record(&ack, Direction::GuestToHost, 4),
            Err(ProtoError::BadStatus(9))
        );
        // Unknown decision and HELLO flags.
        let mut d = DecisionInfo {
            gtid: G,
            flags: 2,
            ..Default::default()
        };
        assert_eq!(
            parse_record(&Message::Run(d).encode(), Direction::HostToGuest, 4),
            Err(ProtoError::BadRecordFlags(2))
        );
        d.flags = RUN_F_PREEMPT;
        assert_eq!(
            parse_record(&Message::Preempt(d).encode(), Direction::HostToGuest, 4),
            Err(ProtoError::BadRecordFlags(RUN_F_PREEMPT))
        );
        let hello = Message::Hello(SessionInfo {
            flags: 1 << 7,
            ..Default::default()
        });
        assert_eq!(
            parse_record(&hello.encode(), Direction::HostToGuest, 4),
            Err(ProtoError::BadRecordFlags(1 << 7))
        );
    }

    #[test]
    fn task_new_weight_and_nice_are_16_bit_on_the_wire() {
        let m = all_guest_messages()[3].encode();
        assert_eq!(&m[60..62], &10000u16.to_le_bytes());
        assert_eq!(&m[62..64], &(-20i16).to_le_bytes());
    }

    #[test]
    fn every_byte_pattern_is_handled() {
        // Walk a cheap pseudo-random sequence of records; parse must never panic.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut r = [0u8; RECORD_SIZE];
            for b in r.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Make some of them plausible so the body checks run too.
            r[0] = [0x01, 0x02, 0x03, 0x20, 0x21, 0x22, 0x30, 0x12][(x % 8) as usize];
            r[1] = 0;
            r[2] = 64;
            r[3] = 0;
            r[4] = 2;
            r[5] = 0;
            r[7] = 0;
            r[61] = 0;
            r[56..60].fill(0);
            if parse_record(&r, Direction::GuestToHost, 64).is_ok() {
                ok += 1;
            }
            let _ = parse_record(&r, Direction::HostToGuest, 3);
        }
        assert!(ok > 0, "some random records must have valid types");
    }

    #[test]
    fn mask_edges() {
        assert_eq!(check_mask(u64::MAX, 64), Ok(u64::MAX));
        assert_eq!(check_mask(0, 64), Err(ProtoError::BadMask(0)));
        assert_eq!(check_mask(0b11, 2), Ok(0b11));
        assert_eq!(check_mask(0b100, 2), Err(ProtoError::BadMask(0b100)));
    }
}
