//! The virtio-milk wire protocol: device identity, feature bits, config space and the
//! fixed-size little-endian records exchanged on the event and decision queues.
//!
//! This file is the Rust mirror of `include/virtio_milk.h`; `docs/protocol.md` is the prose.
//! Every record is exactly [`RECORD_SIZE`] bytes (one cache line) and starts with a
//! [`Header`]. Layouts are checked at compile time here and against the C header by the
//! `c_header_layout_matches_rust` test, which compiles the header with gcc.
//!
//! Nothing in this module touches guest memory: [`parse_record`] takes a byte array the
//! queue engine has already copied out of the guest, so a guest changing memory under us
//! cannot make validation and use disagree.

use std::mem::{offset_of, size_of};

use vm_memory::{ByteValued, Le16, Le32, Le64};

/// virtio device ID of virtio-milk. See docs/protocol.md ("Device ID") for why 58.
pub const VIRTIO_ID_MILK: u32 = 58;

/// Protocol version carried in every record header and in the config space.
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of every record in protocol version 1.
pub const RECORD_SIZE: usize = 64;
/// Upper bound on records per buffer the device advertises (config `max_batch`).
pub const MAX_BATCH: usize = 64;
/// Number of CPUs an allowed-CPU mask can describe in protocol version 1.
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
    /// A task joined the scheduler (guest -> host).
    pub const TASK_NEW: u16 = 0x10;
    /// A task became runnable (wakeup or first enqueue) (guest -> host).
    pub const TASK_WAKEUP: u16 = 0x11;
    /// A task blocked (guest -> host).
    pub const TASK_BLOCKED: u16 = 0x12;
    /// A running task was preempted and is still runnable (guest -> host).
    pub const TASK_PREEMPT: u16 = 0x13;
    /// A running task yielded and is still runnable (guest -> host).
    pub const TASK_YIELD: u16 = 0x14;
    /// A task left the scheduler (exit or class change) (guest -> host).
    pub const TASK_DEAD: u16 = 0x15;
    /// A task's allowed CPUs changed (guest -> host).
    pub const TASK_AFFINITY: u16 = 0x16;
    /// A task's weight/nice changed (guest -> host).
    pub const TASK_PRIORITY: u16 = 0x17;
    /// A CPU went idle (guest -> host).
    pub const CPU_IDLE: u16 = 0x20;
    /// A CPU left idle on its own (guest -> host).
    pub const CPU_BUSY: u16 = 0x21;
    /// Result of applying a decision (guest -> host).
    pub const ACK: u16 = 0x30;
    /// Decision: run a task on a CPU (host -> guest).
    pub const RUN: u16 = 0x40;
    /// Decision: preempt whatever runs on a CPU (host -> guest).
    pub const PREEMPT: u16 = 0x41;
}

/// Ack status codes (`Ack::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum AckStatus {
    /// Decision applied.
    Ok = 0,
    /// The decision's seq is older than the task's current seq.
    Stale = 1,
    /// No such task.
    NoTask = 2,
    /// The CPU is not allowed for the task, or offline, or out of range.
    BadCpu = 3,
    /// The task is not runnable (blocked, running, or dead).
    NotRunnable = 4,
}

impl AckStatus {
    /// Number of status codes.
    pub const COUNT: usize = 5;
    /// All statuses, indexed by their numeric value.
    pub const ALL: [AckStatus; Self::COUNT] = [
        AckStatus::Ok,
        AckStatus::Stale,
        AckStatus::NoTask,
        AckStatus::BadCpu,
        AckStatus::NotRunnable,
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
        }
    }
}

/// Device configuration space (read-only for the driver).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Number of guest CPUs the device serves; one queue pair per CPU.
    pub num_cpus: Le32,
    /// Highest protocol version the device speaks.
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
    /// Record length in bytes, header included; [`RECORD_SIZE`] in version 1.
    pub len: Le16,
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// Reserved, must be zero.
    pub flags: u8,
    /// Events/acks: CPU the record was produced on. Decisions: target CPU.
    pub cpu: Le16,
}

impl Header {
    /// A version-1 header.
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

/// TASK_WAKEUP, TASK_BLOCKED, TASK_PREEMPT, TASK_YIELD, TASK_DEAD, CPU_IDLE, CPU_BUSY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskEvent {
    /// Common header.
    pub hdr: Header,
    /// Task pid; for CPU_IDLE 0, for CPU_BUSY the task now running (0 if unknown).
    pub pid: Le32,
    /// Type-specific argument (wake flags, preempt reason); 0 if unused.
    pub arg: Le32,
    /// The task's sequence number after this event (CPU_*: 0).
    pub seq: Le64,
    /// Sender timestamp in ns (sender's clock; echoed for latency measurement only).
    pub ts_ns: Le64,
    /// Reserved, zero.
    pub reserved: [u8; 32],
}

/// TASK_NEW.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskNew {
    /// Common header.
    pub hdr: Header,
    /// Task pid (kernel TID).
    pub pid: Le32,
    /// Thread group id.
    pub tgid: Le32,
    /// The task's sequence number after this event.
    pub seq: Le64,
    /// Sender timestamp in ns.
    pub ts_ns: Le64,
    /// Task name, NUL padded (not necessarily NUL terminated).
    pub comm: [u8; COMM_LEN],
    /// Allowed CPUs, bit n = CPU n.
    pub cpus_allowed: Le64,
    /// Load weight (sched_ext's 1..10000 scale, 100 = nice 0).
    pub weight: Le32,
    /// Nice value, two's complement.
    pub nice: Le32,
}

/// TASK_AFFINITY.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskAffinity {
    /// Common header.
    pub hdr: Header,
    /// Task pid.
    pub pid: Le32,
    /// Reserved, zero.
    pub pad: Le32,
    /// The task's sequence number after this event.
    pub seq: Le64,
    /// Sender timestamp in ns.
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
    /// Task pid.
    pub pid: Le32,
    /// Reserved, zero.
    pub pad: Le32,
    /// The task's sequence number after this event.
    pub seq: Le64,
    /// Sender timestamp in ns.
    pub ts_ns: Le64,
    /// New load weight.
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
    /// HEARTBEAT: counter; GOODBYE: reason (0 = orderly).
    pub counter: Le64,
    /// HELLO: policy name (host) or "linux" (guest), NUL padded.
    pub name: [u8; 16],
    /// Reserved, zero.
    pub reserved: [u8; 8],
}

/// RUN and PREEMPT decisions (host -> guest).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// Common header; `cpu` is the target CPU.
    pub hdr: Header,
    /// RUN: task to run. PREEMPT: task expected to be running (0: whatever runs).
    pub pid: Le32,
    /// Reserved, zero.
    pub flags: Le32,
    /// The task's sequence number the decision was based on (ghOSt barrier).
    pub seq: Le64,
    /// RUN: time slice in ns (0: guest default). PREEMPT: 0.
    pub slice_ns: Le64,
    /// Host-chosen id echoed in the ACK.
    pub cookie: Le64,
    /// Host timestamp in ns when the decision was made.
    pub ts_ns: Le64,
    /// Reserved, zero.
    pub reserved: [u8; 16],
}

/// ACK (guest -> host): the outcome of one decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Common header; `cpu` is where the ack was produced.
    pub hdr: Header,
    /// Decision's pid.
    pub pid: Le32,
    /// One of [`AckStatus`].
    pub status: Le32,
    /// Decision's seq.
    pub seq: Le64,
    /// Guest timestamp in ns when the decision was applied or rejected.
    pub ts_ns: Le64,
    /// Decision's cookie.
    pub cookie: Le64,
    /// Decision's type (RUN or PREEMPT).
    pub decision_type: Le16,
    /// Decision's target CPU.
    pub target_cpu: Le16,
    /// Reserved, zero.
    pub reserved: [u8; 20],
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
        hdr => "hdr", pid => "pid", arg => "arg", seq => "seq", ts_ns => "ts_ns",
        reserved => "reserved",
    }),
    wire_layout!(TaskNew, "virtio_milk_task_new", {
        hdr => "hdr", pid => "pid", tgid => "tgid", seq => "seq", ts_ns => "ts_ns",
        comm => "comm", cpus_allowed => "cpus_allowed", weight => "weight", nice => "nice",
    }),
    wire_layout!(TaskAffinity, "virtio_milk_task_affinity", {
        hdr => "hdr", pid => "pid", pad => "pad", seq => "seq", ts_ns => "ts_ns",
        cpus_allowed => "cpus_allowed", reserved => "reserved",
    }),
    wire_layout!(TaskPriority, "virtio_milk_task_priority", {
        hdr => "hdr", pid => "pid", pad => "pad", seq => "seq", ts_ns => "ts_ns",
        weight => "weight", nice => "nice", reserved => "reserved",
    }),
    wire_layout!(Session, "virtio_milk_session", {
        hdr => "hdr", num_cpus => "num_cpus", heartbeat_ms => "heartbeat_ms",
        session_id => "session_id", ts_ns => "ts_ns", counter => "counter", name => "name",
        reserved => "reserved",
    }),
    wire_layout!(Decision, "virtio_milk_decision", {
        hdr => "hdr", pid => "pid", flags => "flags", seq => "seq", slice_ns => "slice_ns",
        cookie => "cookie", ts_ns => "ts_ns", reserved => "reserved",
    }),
    wire_layout!(Ack, "virtio_milk_ack", {
        hdr => "hdr", pid => "pid", status => "status", seq => "seq", ts_ns => "ts_ns",
        cookie => "cookie", decision_type => "decision_type", target_cpu => "target_cpu",
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
    ("VIRTIO_MILK_F_HEARTBEAT", VIRTIO_MILK_F_HEARTBEAT as u64),
    ("VIRTIO_MILK_F_BATCH", VIRTIO_MILK_F_BATCH as u64),
    ("VIRTIO_MILK_EVENT_VQ(3)", event_queue_index(3) as u64),
    ("VIRTIO_MILK_DECISION_VQ(3)", decision_queue_index(3) as u64),
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
    ("VIRTIO_MILK_MSG_CPU_IDLE", msg::CPU_IDLE as u64),
    ("VIRTIO_MILK_MSG_CPU_BUSY", msg::CPU_BUSY as u64),
    ("VIRTIO_MILK_MSG_ACK", msg::ACK as u64),
    ("VIRTIO_MILK_MSG_RUN", msg::RUN as u64),
    ("VIRTIO_MILK_MSG_PREEMPT", msg::PREEMPT as u64),
    ("VIRTIO_MILK_ACK_OK", AckStatus::Ok as u64),
    ("VIRTIO_MILK_ACK_STALE", AckStatus::Stale as u64),
    ("VIRTIO_MILK_ACK_NO_TASK", AckStatus::NoTask as u64),
    ("VIRTIO_MILK_ACK_BAD_CPU", AckStatus::BadCpu as u64),
    (
        "VIRTIO_MILK_ACK_NOT_RUNNABLE",
        AckStatus::NotRunnable as u64,
    ),
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
    // Fields every task-carrying record shares, so a receiver can read pid/seq generically.
    assert!(offset_of!(TaskEvent, pid) == 8 && offset_of!(TaskEvent, seq) == 16);
    assert!(offset_of!(TaskNew, pid) == 8 && offset_of!(TaskNew, seq) == 16);
    assert!(offset_of!(TaskAffinity, pid) == 8 && offset_of!(TaskAffinity, seq) == 16);
    assert!(offset_of!(TaskPriority, pid) == 8 && offset_of!(TaskPriority, seq) == 16);
    assert!(offset_of!(Decision, pid) == 8 && offset_of!(Decision, seq) == 16);
    assert!(offset_of!(Ack, pid) == 8 && offset_of!(Ack, seq) == 16);
    assert!(offset_of!(TaskNew, comm) == 32);
    assert!(offset_of!(TaskNew, cpus_allowed) == 48);
    assert!(offset_of!(TaskNew, nice) == 60);
    assert!(offset_of!(Decision, slice_ns) == 24);
    assert!(offset_of!(Decision, cookie) == 32);
    assert!(offset_of!(Ack, status) == 12);
    assert!(offset_of!(Ack, cookie) == 32);
    assert!(offset_of!(Ack, decision_type) == 40);
    assert!(offset_of!(Session, name) == 40);
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
    #[error("bad protocol version {0}")]
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
    /// Task message with pid 0.
    #[error("task message with pid 0")]
    BadPid,
    /// Allowed-CPU mask is empty or names CPUs that do not exist.
    #[error("bad allowed-cpu mask {0:#x}")]
    BadMask(u64),
    /// Unknown ack status.
    #[error("unknown ack status {0}")]
    BadStatus(u32),
}

/// Kinds of task events that only carry pid and seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaskEventKind {
    /// TASK_WAKEUP.
    Wakeup,
    /// TASK_BLOCKED.
    Blocked,
    /// TASK_PREEMPT.
    Preempt,
    /// TASK_YIELD.
    Yield,
    /// TASK_DEAD.
    Dead,
}

impl TaskEventKind {
    /// Wire type.
    pub fn msg_type(self) -> u16 {
        match self {
            TaskEventKind::Wakeup => msg::TASK_WAKEUP,
            TaskEventKind::Blocked => msg::TASK_BLOCKED,
            TaskEventKind::Preempt => msg::TASK_PREEMPT,
            TaskEventKind::Yield => msg::TASK_YIELD,
            TaskEventKind::Dead => msg::TASK_DEAD,
        }
    }
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
    TaskNew {
        /// Producing CPU.
        cpu: u16,
        /// Task pid.
        pid: u32,
        /// Thread group.
        tgid: u32,
        /// Sequence number.
        seq: u64,
        /// Sender timestamp.
        ts_ns: u64,
        /// Name.
        comm: [u8; COMM_LEN],
        /// Allowed CPUs.
        cpus_allowed: u64,
        /// Weight.
        weight: u32,
        /// Nice.
        nice: i32,
    },
    /// TASK_WAKEUP / BLOCKED / PREEMPT / YIELD / DEAD.
    Task {
        /// Which event.
        kind: TaskEventKind,
        /// Producing CPU.
        cpu: u16,
        /// Task pid.
        pid: u32,
        /// Type-specific argument.
        arg: u32,
        /// Sequence number.
        seq: u64,
        /// Sender timestamp.
        ts_ns: u64,
    },
    /// TASK_AFFINITY.
    TaskAffinity {
        /// Producing CPU.
        cpu: u16,
        /// Task pid.
        pid: u32,
        /// Sequence number.
        seq: u64,
        /// Sender timestamp.
        ts_ns: u64,
        /// Allowed CPUs.
        cpus_allowed: u64,
    },
    /// TASK_PRIORITY.
    TaskPriority {
        /// Producing CPU.
        cpu: u16,
        /// Task pid.
        pid: u32,
        /// Sequence number.
        seq: u64,
        /// Sender timestamp.
        ts_ns: u64,
        /// Weight.
        weight: u32,
        /// Nice.
        nice: i32,
    },
    /// CPU_IDLE.
    CpuIdle {
        /// The idle CPU.
        cpu: u16,
        /// Sender timestamp.
        ts_ns: u64,
    },
    /// CPU_BUSY.
    CpuBusy {
        /// The CPU.
        cpu: u16,
        /// Task now running (0: unknown).
        pid: u32,
        /// Sender timestamp.
        ts_ns: u64,
    },
    /// ACK.
    Ack {
        /// CPU the ack was produced on.
        cpu: u16,
        /// Decision's pid.
        pid: u32,
        /// Outcome.
        status: AckStatus,
        /// Decision's seq.
        seq: u64,
        /// Guest timestamp.
        ts_ns: u64,
        /// Decision's cookie.
        cookie: u64,
        /// RUN or PREEMPT.
        decision_type: u16,
        /// Decision's target CPU.
        target_cpu: u16,
    },
    /// RUN decision.
    Run(DecisionInfo),
    /// PREEMPT decision.
    Preempt(DecisionInfo),
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
    /// Counter / reason.
    pub counter: u64,
    /// Name, NUL padded.
    pub name: [u8; 16],
}

/// Decoded RUN/PREEMPT decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecisionInfo {
    /// Target CPU.
    pub cpu: u16,
    /// Task.
    pub pid: u32,
    /// Task sequence number the decision is based on.
    pub seq: u64,
    /// Slice (RUN).
    pub slice_ns: u64,
    /// Cookie echoed in the ack.
    pub cookie: u64,
    /// Host timestamp.
    pub ts_ns: u64,
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

fn nonzero_pid(pid: Le32) -> Result<u32, ProtoError> {
    match u32::from(pid) {
        0 => Err(ProtoError::BadPid),
        p => Ok(p),
    }
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
    let len = u16::from(hdr.len);
    if usize::from(len) != RECORD_SIZE {
        return Err(ProtoError::BadLength(len));
    }
    if hdr.version != PROTOCOL_VERSION {
        return Err(ProtoError::BadVersion(hdr.version));
    }
    if hdr.flags != 0 {
        return Err(ProtoError::BadFlags(hdr.flags));
    }
    let ty = u16::from(hdr.msg_type);
    let cpu = u16::from(hdr.cpu);
    if u32::from(cpu) >= num_cpus {
        return Err(ProtoError::BadCpu(cpu));
    }
    let guest = dir == Direction::GuestToHost;
    let session = |r: Session| SessionInfo {
        cpu,
        num_cpus: r.num_cpus.into(),
        heartbeat_ms: r.heartbeat_ms.into(),
        session_id: r.session_id.into(),
        ts_ns: r.ts_ns.into(),
        counter: r.counter.into(),
        name: r.name,
    };
    let task_kind = match ty {
        msg::TASK_WAKEUP => Some(TaskEventKind::Wakeup),
        msg::TASK_BLOCKED => Some(TaskEventKind::Blocked),
        msg::TASK_PREEMPT => Some(TaskEventKind::Preempt),
        msg::TASK_YIELD => Some(TaskEventKind::Yield),
        msg::TASK_DEAD => Some(TaskEventKind::Dead),
        _ => None,
    };
    if let (Some(kind), true) = (task_kind, guest) {
        let r: TaskEvent = read_rec(raw);
        return Ok(Message::Task {
            kind,
            cpu,
            pid: nonzero_pid(r.pid)?,
            arg: r.arg.into(),
            seq: r.seq.into(),
            ts_ns: r.ts_ns.into(),
        });
    }
    match (ty, guest) {
        (msg::HELLO, _) => Ok(Message::Hello(session(read_rec(raw)))),
        (msg::HEARTBEAT, _) => Ok(Message::Heartbeat(session(read_rec(raw)))),
        (msg::GOODBYE, _) => Ok(Message::Goodbye(session(read_rec(raw)))),
        (msg::TASK_NEW, true) => {
            let r: TaskNew = read_rec(raw);
            Ok(Message::TaskNew {
                cpu,
                pid: nonzero_pid(r.pid)?,
                tgid: r.tgid.into(),
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                comm: r.comm,
                cpus_allowed: check_mask(r.cpus_allowed.into(), num_cpus)?,
                weight: r.weight.into(),
                nice: u32::from(r.nice) as i32,
            })
        }
        (msg::TASK_AFFINITY, true) => {
            let r: TaskAffinity = read_rec(raw);
            Ok(Message::TaskAffinity {
                cpu,
                pid: nonzero_pid(r.pid)?,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                cpus_allowed: check_mask(r.cpus_allowed.into(), num_cpus)?,
            })
        }
        (msg::TASK_PRIORITY, true) => {
            let r: TaskPriority = read_rec(raw);
            Ok(Message::TaskPriority {
                cpu,
                pid: nonzero_pid(r.pid)?,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                weight: r.weight.into(),
                nice: u32::from(r.nice) as i32,
            })
        }
        (msg::CPU_IDLE, true) => {
            let r: TaskEvent = read_rec(raw);
            Ok(Message::CpuIdle {
                cpu,
                ts_ns: r.ts_ns.into(),
            })
        }
        (msg::CPU_BUSY, true) => {
            let r: TaskEvent = read_rec(raw);
            Ok(Message::CpuBusy {
                cpu,
                pid: r.pid.into(),
                ts_ns: r.ts_ns.into(),
            })
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
            Ok(Message::Ack {
                cpu,
                pid: r.pid.into(),
                status,
                seq: r.seq.into(),
                ts_ns: r.ts_ns.into(),
                cookie: r.cookie.into(),
                decision_type,
                target_cpu,
            })
        }
        (msg::RUN, false) | (msg::PREEMPT, false) => {
            let r: Decision = read_rec(raw);
            let d = DecisionInfo {
                cpu,
                pid: r.pid.into(),
                seq: r.seq.into(),
                slice_ns: r.slice_ns.into(),
                cookie: r.cookie.into(),
                ts_ns: r.ts_ns.into(),
            };
            if ty == msg::RUN {
                if d.pid == 0 {
                    return Err(ProtoError::BadPid);
                }
                Ok(Message::Run(d))
            } else {
                Ok(Message::Preempt(d))
            }
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
                reserved: [0; 8],
            })
        };
        let decision = |ty: u16, d: &DecisionInfo| {
            to_record(&Decision {
                hdr: Header::new(ty, d.cpu),
                pid: d.pid.into(),
                flags: 0.into(),
                seq: d.seq.into(),
                slice_ns: d.slice_ns.into(),
                cookie: d.cookie.into(),
                ts_ns: d.ts_ns.into(),
                reserved: [0; 16],
            })
        };
        match self {
            Message::Hello(s) => session(msg::HELLO, s),
            Message::Heartbeat(s) => session(msg::HEARTBEAT, s),
            Message::Goodbye(s) => session(msg::GOODBYE, s),
            Message::TaskNew {
                cpu,
                pid,
                tgid,
                seq,
                ts_ns,
                comm,
                cpus_allowed,
                weight,
                nice,
            } => to_record(&TaskNew {
                hdr: Header::new(msg::TASK_NEW, *cpu),
                pid: (*pid).into(),
                tgid: (*tgid).into(),
                seq: (*seq).into(),
                ts_ns: (*ts_ns).into(),
                comm: *comm,
                cpus_allowed: (*cpus_allowed).into(),
                weight: (*weight).into(),
                nice: (*nice as u32).into(),
            }),
            Message::Task {
                kind,
                cpu,
                pid,
                arg,
                seq,
                ts_ns,
            } => to_record(&TaskEvent {
                hdr: Header::new(kind.msg_type(), *cpu),
                pid: (*pid).into(),
                arg: (*arg).into(),
                seq: (*seq).into(),
                ts_ns: (*ts_ns).into(),
                reserved: [0; 32],
            }),
            Message::TaskAffinity {
                cpu,
                pid,
                seq,
                ts_ns,
                cpus_allowed,
            } => to_record(&TaskAffinity {
                hdr: Header::new(msg::TASK_AFFINITY, *cpu),
                pid: (*pid).into(),
                pad: 0.into(),
                seq: (*seq).into(),
                ts_ns: (*ts_ns).into(),
                cpus_allowed: (*cpus_allowed).into(),
                reserved: [0; 24],
            }),
            Message::TaskPriority {
                cpu,
                pid,
                seq,
                ts_ns,
                weight,
                nice,
            } => to_record(&TaskPriority {
                hdr: Header::new(msg::TASK_PRIORITY, *cpu),
                pid: (*pid).into(),
                pad: 0.into(),
                seq: (*seq).into(),
                ts_ns: (*ts_ns).into(),
                weight: (*weight).into(),
                nice: (*nice as u32).into(),
                reserved: [0; 24],
            }),
            Message::CpuIdle { cpu, ts_ns } => to_record(&TaskEvent {
                hdr: Header::new(msg::CPU_IDLE, *cpu),
                ts_ns: (*ts_ns).into(),
                ..Default::default()
            }),
            Message::CpuBusy { cpu, pid, ts_ns } => to_record(&TaskEvent {
                hdr: Header::new(msg::CPU_BUSY, *cpu),
                pid: (*pid).into(),
                ts_ns: (*ts_ns).into(),
                ..Default::default()
            }),
            Message::Ack {
                cpu,
                pid,
                status,
                seq,
                ts_ns,
                cookie,
                decision_type,
                target_cpu,
            } => to_record(&Ack {
                hdr: Header::new(msg::ACK, *cpu),
                pid: (*pid).into(),
                status: (*status as u32).into(),
                seq: (*seq).into(),
                ts_ns: (*ts_ns).into(),
                cookie: (*cookie).into(),
                decision_type: (*decision_type).into(),
                target_cpu: (*target_cpu).into(),
                reserved: [0; 20],
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
            Message::TaskNew { .. } => msg::TASK_NEW,
            Message::Task { kind, .. } => kind.msg_type(),
            Message::TaskAffinity { .. } => msg::TASK_AFFINITY,
            Message::TaskPriority { .. } => msg::TASK_PRIORITY,
            Message::CpuIdle { .. } => msg::CPU_IDLE,
            Message::CpuBusy { .. } => msg::CPU_BUSY,
            Message::Ack { .. } => msg::ACK,
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
        msg::CPU_IDLE => "CPU_IDLE",
        msg::CPU_BUSY => "CPU_BUSY",
        msg::ACK => "ACK",
        msg::RUN => "RUN",
        msg::PREEMPT => "PREEMPT",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_guest_messages() -> Vec<Message> {
        vec![
            Message::Hello(SessionInfo {
                cpu: 0,
                num_cpus: 4,
                heartbeat_ms: 100,
                session_id: 7,
                ts_ns: 1,
                counter: 0,
                name: pack_name("linux"),
            }),
            Message::Heartbeat(SessionInfo {
                counter: 9,
                ..Default::default()
            }),
            Message::Goodbye(SessionInfo::default()),
            Message::TaskNew {
                cpu: 1,
                pid: 42,
                tgid: 40,
                seq: 1,
                ts_ns: 5,
                comm: pack_name("worker"),
                cpus_allowed: 0b1010,
                weight: 100,
                nice: -5,
            },
            Message::Task {
                kind: TaskEventKind::Wakeup,
                cpu: 2,
                pid: 42,
                arg: 3,
                seq: 2,
                ts_ns: 6,
            },
            Message::Task {
                kind: TaskEventKind::Dead,
                cpu: 3,
                pid: 42,
                arg: 0,
                seq: 9,
                ts_ns: 6,
            },
            Message::TaskAffinity {
                cpu: 0,
                pid: 42,
                seq: 3,
                ts_ns: 7,
                cpus_allowed: 1,
            },
            Message::TaskPriority {
                cpu: 0,
                pid: 42,
                seq: 4,
                ts_ns: 8,
                weight: 1024,
                nice: 19,
            },
            Message::CpuIdle { cpu: 3, ts_ns: 9 },
            Message::CpuBusy {
                cpu: 3,
                pid: 5,
                ts_ns: 10,
            },
            Message::Ack {
                cpu: 1,
                pid: 42,
                status: AckStatus::Stale,
                seq: 4,
                ts_ns: 11,
                cookie: 77,
                decision_type: msg::RUN,
                target_cpu: 2,
            },
        ]
    }

    #[test]
    fn ack_target_cpu_out_of_range_only_with_bad_cpu() {
        let ack = |status, target_cpu| Message::Ack {
            cpu: 0,
            pid: 42,
            status,
            seq: 1,
            ts_ns: 0,
            cookie: 7,
            decision_type: msg::RUN,
            target_cpu,
        };
        // The guest echoes a nonexistent CPU it rejected.
        let m = ack(AckStatus::BadCpu, 7);
        assert_eq!(parse_record(&m.encode(), Direction::GuestToHost, 2), Ok(m));
        // Any other status naming a nonexistent CPU is malformed.
        for st in [AckStatus::Ok, AckStatus::Stale, AckStatus::NoTask] {
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
        }
        let d = DecisionInfo {
            cpu: 3,
            pid: 9,
            seq: 11,
            slice_ns: 3_000_000,
            cookie: 5,
            ts_ns: 1,
        };
        for m in [Message::Run(d), Message::Preempt(d)] {
            assert_eq!(parse_record(&m.encode(), Direction::HostToGuest, 4), Ok(m));
        }
    }

    #[test]
    fn wire_bytes_are_little_endian() {
        let raw = Message::Task {
            kind: TaskEventKind::Blocked,
            cpu: 0x0102,
            pid: 0x0a0b0c0d,
            arg: 0,
            seq: 0x1122334455667788,
            ts_ns: 0,
        }
        .encode();
        assert_eq!(&raw[0..2], &[0x12, 0x00]);
        assert_eq!(&raw[2..4], &[64, 0]);
        assert_eq!(raw[4], PROTOCOL_VERSION);
        assert_eq!(&raw[6..8], &[0x02, 0x01]);
        assert_eq!(&raw[8..12], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(
            &raw[16..24],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
    }

    #[test]
    fn malformed_headers_are_rejected() {
        let good = Message::CpuIdle { cpu: 0, ts_ns: 0 }.encode();
        let mut r = good;
        r[2] = 32;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadLength(32))
        );
        let mut r = good;
        r[4] = 2;
        assert_eq!(
            parse_record(&r, Direction::GuestToHost, 4),
            Err(ProtoError::BadVersion(2))
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
        // Decisions may not arrive on an event queue, events not on a decision queue.
        let run = Message::Run(DecisionInfo {
            pid: 1,
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
        if let Message::TaskNew { cpus_allowed, .. } = &mut m {
            *cpus_allowed = 1 << 4;
        }
        assert_eq!(
            parse_record(&m.encode(), Direction::GuestToHost, 4),
            Err(ProtoError::BadMask(1 << 4))
        );
        let wake0 = Message::Task {
            kind: TaskEventKind::Wakeup,
            cpu: 0,
            pid: 0,
            arg: 0,
            seq: 1,
            ts_ns: 0,
        };
        assert_eq!(
            parse_record(&wake0.encode(), Direction::GuestToHost, 4),
            Err(ProtoError::BadPid)
        );
        let mut ack = all_guest_messages()[10].encode();
        ack[12] = 9;
        assert_eq!(
            parse_record(&ack, Direction::GuestToHost, 4),
            Err(ProtoError::BadStatus(9))
        );
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
            r[2] = 64;
            r[3] = 0;
            r[4] = 1;
            r[5] = 0;
            r[7] = 0;
            r[1] = 0;
            if parse_record(&r, Direction::GuestToHost, 64).is_ok() {
                ok += 1;
            }
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
