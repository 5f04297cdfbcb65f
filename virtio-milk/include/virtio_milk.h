/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * virtio_milk.h - wire format of the virtio-milk device, protocol version 2
 *
 * virtio-milk carries a guest scheduler's events to a scheduling policy
 * outside the guest and the policy's decisions back. Every record is
 * VIRTIO_MILK_RECORD_SIZE (64) bytes, little endian, and starts with
 * struct virtio_milk_hdr; a buffer carries 1..max_batch records back to
 * back. Queue 2c is CPU c's event queue (driver -> device), queue 2c+1 its
 * decision queue (device -> driver, the driver pre-posts device-writable
 * buffers).
 *
 * Version 2 is not compatible with version 1: a peer that sees another
 * version in the config space or in a record refuses the session.
 */
#ifndef _UAPI_LINUX_VIRTIO_MILK_H
#define _UAPI_LINUX_VIRTIO_MILK_H

#include <linux/types.h>

/* Device ID (not assigned by the virtio specification). */
#define VIRTIO_ID_MILK			58

#define VIRTIO_MILK_PROTO_VERSION	2
#define VIRTIO_MILK_RECORD_SIZE		64
#define VIRTIO_MILK_MAX_BATCH		64
#define VIRTIO_MILK_MAX_CPUS		64
#define VIRTIO_MILK_QUEUES_PER_CPU	2
#define VIRTIO_MILK_COMM_LEN		16

/* Queue index helpers. */
#define VIRTIO_MILK_EVENT_VQ(cpu)	((cpu) * VIRTIO_MILK_QUEUES_PER_CPU)
#define VIRTIO_MILK_DECISION_VQ(cpu)	((cpu) * VIRTIO_MILK_QUEUES_PER_CPU + 1)

/* Device-specific feature bits (VIRTIO_F_VERSION_1 and VIRTIO_RING_F_EVENT_IDX too). */
#define VIRTIO_MILK_F_HEARTBEAT		0	/* host sends HEARTBEAT records */
#define VIRTIO_MILK_F_BATCH		1	/* >1 record per buffer allowed */

/*
 * Task identity: the gtid. Bits 0-31 are the pid in the initial pid
 * namespace, bits 32-63 a generation the guest draws from a global counter
 * when the task enters the scheduler (never 0). A gtid is never reused
 * within a boot, so a reused pid cannot alias a dead task.
 */
#define VIRTIO_MILK_GTID_PID(gtid)	((__u32)((gtid) & 0xffffffffULL))
#define VIRTIO_MILK_GTID_GEN(gtid)	((__u32)((gtid) >> 32))

/* Message types (struct virtio_milk_hdr.type). */
#define VIRTIO_MILK_MSG_HELLO		0x01	/* both directions */
#define VIRTIO_MILK_MSG_HEARTBEAT	0x02	/* both directions */
#define VIRTIO_MILK_MSG_GOODBYE		0x03	/* both directions */
#define VIRTIO_MILK_MSG_TASK_NEW	0x10	/* g->h: task entered sched_ext */
#define VIRTIO_MILK_MSG_TASK_WAKEUP	0x11	/* g->h: runnable, waits for a RUN */
#define VIRTIO_MILK_MSG_TASK_BLOCKED	0x12	/* g->h: went to sleep */
#define VIRTIO_MILK_MSG_TASK_PREEMPT	0x13	/* g->h: lost its CPU, runnable, waits */
#define VIRTIO_MILK_MSG_TASK_YIELD	0x14	/* g->h: yielded, runnable, waits */
#define VIRTIO_MILK_MSG_TASK_DEAD	0x15	/* g->h: exited */
#define VIRTIO_MILK_MSG_TASK_AFFINITY	0x16	/* g->h: allowed CPUs changed */
#define VIRTIO_MILK_MSG_TASK_PRIORITY	0x17	/* g->h: weight changed */
#define VIRTIO_MILK_MSG_TASK_DEPARTED	0x18	/* g->h: left sched_ext, still alive */
#define VIRTIO_MILK_MSG_TASK_RUNNING	0x19	/* g->h: started running (opt-in) */
#define VIRTIO_MILK_MSG_TASK_FALLBACK	0x1a	/* g->h: guest dispatched it itself */
#define VIRTIO_MILK_MSG_CPU_IDLE	0x20	/* g->h: CPU went idle */
#define VIRTIO_MILK_MSG_CPU_BUSY	0x21	/* g->h: CPU left idle */
#define VIRTIO_MILK_MSG_CPU_TICK	0x22	/* g->h: periodic tick (opt-in) */
#define VIRTIO_MILK_MSG_CPU_RELEASE	0x23	/* g->h: a higher class took the CPU */
#define VIRTIO_MILK_MSG_CPU_ACQUIRE	0x24	/* g->h: the CPU is back for sched_ext */
#define VIRTIO_MILK_MSG_ACK		0x30	/* g->h: outcome of a decision */
#define VIRTIO_MILK_MSG_RUN		0x40	/* h->g: run a task on a CPU */
#define VIRTIO_MILK_MSG_PREEMPT		0x41	/* h->g: take the CPU from its task */

/* TASK_WAKEUP arg: why the task became runnable. */
#define VIRTIO_MILK_WAKE_WAKEUP		0	/* woken up */
#define VIRTIO_MILK_WAKE_NEW		1	/* first enqueue after TASK_NEW */
#define VIRTIO_MILK_WAKE_RESTORE	2	/* re-enqueued after a property change */

/* TASK_PREEMPT arg: why the task lost its CPU. */
#define VIRTIO_MILK_PREEMPT_SLICE	0	/* slice used up */
#define VIRTIO_MILK_PREEMPT_HOST	1	/* host PREEMPT, or RUN with F_PREEMPT */
#define VIRTIO_MILK_PREEMPT_CLASS	2	/* a higher sched class took the CPU */
#define VIRTIO_MILK_PREEMPT_OTHER	3	/* any other reschedule */

/* TASK_FALLBACK arg: why the guest dispatched the task without the host. */
#define VIRTIO_MILK_FALLBACK_STARVED	0	/* waited fallback_ms for a RUN */
#define VIRTIO_MILK_FALLBACK_SEND	1	/* its event could not be sent */

/* Ack status (struct virtio_milk_ack.status). */
#define VIRTIO_MILK_ACK_OK		0	/* RUN: task started running on the CPU */
#define VIRTIO_MILK_ACK_STALE		1	/* decision seq != task's current seq */
#define VIRTIO_MILK_ACK_NO_TASK		2	/* unknown gtid */
#define VIRTIO_MILK_ACK_BAD_CPU		3	/* not allowed, offline or out of range */
#define VIRTIO_MILK_ACK_NOT_RUNNABLE	4	/* blocked, running or dead */
#define VIRTIO_MILK_ACK_DROPPED		5	/* accepted, but the kernel dropped it */

/* struct virtio_milk_decision.flags */
#define VIRTIO_MILK_RUN_F_PREEMPT	(1U << 0)	/* RUN: preempt the CPU's current task */

/* struct virtio_milk_session.flags, host HELLO: what the policy subscribes to. */
#define VIRTIO_MILK_HELLO_F_TICK	(1U << 0)	/* CPU_TICK every tick_us */
#define VIRTIO_MILK_HELLO_F_RUNNING	(1U << 1)	/* TASK_RUNNING records */

/* GOODBYE counter: why the sender ends the session. */
#define VIRTIO_MILK_BYE_STOP		0	/* orderly stop */
#define VIRTIO_MILK_BYE_SILENT		1	/* guest: host silent for host_timeout_ms */
#define VIRTIO_MILK_BYE_RESYNC		2	/* host: a new HELLO follows */
#define VIRTIO_MILK_BYE_VERSION		3	/* peer speaks another protocol version */

/* Device configuration space. */
struct virtio_milk_config {
	__le32 num_cpus;	/* queue pairs = guest CPUs served */
	__le16 version;		/* VIRTIO_MILK_PROTO_VERSION */
	__le16 max_batch;	/* max records per buffer */
	__le16 record_size;	/* VIRTIO_MILK_RECORD_SIZE */
	__le16 queues_per_cpu;	/* VIRTIO_MILK_QUEUES_PER_CPU */
	__le32 heartbeat_ms;	/* host heartbeat period */
};

/* Common record header. */
struct virtio_milk_hdr {
	__le16 type;		/* VIRTIO_MILK_MSG_* */
	__le16 len;		/* whole record incl. header: VIRTIO_MILK_RECORD_SIZE */
	__u8 version;		/* VIRTIO_MILK_PROTO_VERSION */
	__u8 flags;		/* reserved, 0 */
	/*
	 * Task events: task_cpu(p); CPU events and ACK: that CPU;
	 * decisions: the target CPU; session records: 0.
	 */
	__le16 cpu;
};

/*
 * TASK_WAKEUP, TASK_BLOCKED, TASK_PREEMPT, TASK_YIELD, TASK_DEAD,
 * TASK_DEPARTED, TASK_RUNNING, TASK_FALLBACK, and the CPU events CPU_IDLE,
 * CPU_BUSY, CPU_TICK, CPU_RELEASE, CPU_ACQUIRE (gtid = the CPU's current
 * sched_ext task or 0, seq = 0).
 */
struct virtio_milk_task_event {
	struct virtio_milk_hdr hdr;
	__le64 gtid;
	__le64 seq;		/* task seq after this event (CPU events: 0) */
	__le64 ts_ns;		/* guest clock (CLOCK_MONOTONIC) */
	__le64 runtime_ns;	/* task's total CPU time (sum_exec_runtime) */
	__le64 enq_flags;	/* WAKEUP/PREEMPT/YIELD: SCX_ENQ_* as enqueue saw them */
	__le64 slice_ns;	/* PREEMPT/YIELD/TICK/RUNNING: slice left */
	__le32 arg;		/* VIRTIO_MILK_WAKE_*, _PREEMPT_*, _FALLBACK_*, 0 */
	__le16 src_cpu;		/* CPU that produced the record */
	__le16 reserved;
};

/* TASK_NEW. */
struct virtio_milk_task_new {
	struct virtio_milk_hdr hdr;
	__le64 gtid;
	__le64 seq;		/* 1 */
	__le64 ts_ns;
	char comm[VIRTIO_MILK_COMM_LEN];	/* NUL padded */
	__le64 cpus_allowed;	/* bit n = CPU n */
	__le32 tgid;
	__le16 weight;		/* p->scx.weight, 1..10000 */
	__le16 nice;		/* two's complement, -20..19 */
};

/* TASK_AFFINITY. */
struct virtio_milk_task_affinity {
	struct virtio_milk_hdr hdr;
	__le64 gtid;
	__le64 seq;
	__le64 ts_ns;
	__le64 cpus_allowed;	/* bit n = CPU n */
	__u8 reserved[24];
};

/* TASK_PRIORITY. */
struct virtio_milk_task_priority {
	struct virtio_milk_hdr hdr;
	__le64 gtid;
	__le64 seq;
	__le64 ts_ns;
	__le32 weight;		/* p->scx.weight, 1..10000 */
	__le32 nice;		/* two's complement */
	__u8 reserved[24];
};

/* HELLO, HEARTBEAT, GOODBYE (both directions). */
struct virtio_milk_session {
	struct virtio_milk_hdr hdr;
	__le32 num_cpus;
	__le32 heartbeat_ms;	/* sender's heartbeat period, 0 = none */
	__le64 session_id;	/* chosen by the host's HELLO, echoed by the guest */
	__le64 ts_ns;
	__le64 counter;		/* HEARTBEAT: sequence; GOODBYE: VIRTIO_MILK_BYE_* */
	char name[16];		/* HELLO: policy name (host) or "linux" */
	__le32 flags;		/* host HELLO: VIRTIO_MILK_HELLO_F_*; guest: granted ones */
	__le32 tick_us;		/* host HELLO: wanted CPU_TICK period; guest: granted one */
};

/* RUN and PREEMPT (host -> guest). */
struct virtio_milk_decision {
	struct virtio_milk_hdr hdr;	/* hdr.cpu = target CPU */
	__le64 gtid;		/* RUN: task; PREEMPT: expected current task or 0 */
	__le64 seq;		/* task seq this decision is based on (PREEMPT: 0) */
	__le64 ts_ns;		/* host clock, echoed in measurements only */
	__le64 slice_ns;	/* RUN: slice, 0 = guest default; capped by the guest */
	__le64 cookie;		/* echoed in the ack */
	__le32 flags;		/* VIRTIO_MILK_RUN_F_* */
	__u8 reserved[12];
};

/* ACK (guest -> host). */
struct virtio_milk_ack {
	struct virtio_milk_hdr hdr;	/* hdr.cpu = CPU that applied/rejected */
	__le64 gtid;
	__le64 seq;
	__le64 ts_ns;
	__le64 cookie;
	__le32 status;		/* VIRTIO_MILK_ACK_* */
	__le16 decision_type;	/* VIRTIO_MILK_MSG_RUN or _PREEMPT */
	__le16 target_cpu;
	__u8 reserved[16];
};

union virtio_milk_record {
	struct virtio_milk_hdr hdr;
	struct virtio_milk_task_event event;
	struct virtio_milk_task_new task_new;
	struct virtio_milk_task_affinity affinity;
	struct virtio_milk_task_priority priority;
	struct virtio_milk_session session;
	struct virtio_milk_decision decision;
	struct virtio_milk_ack ack;
	__u8 raw[VIRTIO_MILK_RECORD_SIZE];
};

/* Layout checks; the host side asserts the same numbers. */
#define VIRTIO_MILK_ASSERT_SIZE(t, n) \
	_Static_assert(sizeof(struct t) == (n), #t " size")
#define VIRTIO_MILK_ASSERT_OFF(t, f, n) \
	_Static_assert(__builtin_offsetof(struct t, f) == (n), #t "." #f " offset")

VIRTIO_MILK_ASSERT_SIZE(virtio_milk_config, 16);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_hdr, 8);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_hdr, len, 2);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_hdr, version, 4);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_hdr, cpu, 6);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_task_event, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_task_new, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_task_affinity, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_task_priority, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_session, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_decision, VIRTIO_MILK_RECORD_SIZE);
VIRTIO_MILK_ASSERT_SIZE(virtio_milk_ack, VIRTIO_MILK_RECORD_SIZE);
_Static_assert(sizeof(union virtio_milk_record) == VIRTIO_MILK_RECORD_SIZE, "record size");
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, gtid, 8);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, runtime_ns, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, enq_flags, 40);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, slice_ns, 48);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, arg, 56);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, src_cpu, 60);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, comm, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, cpus_allowed, 48);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, tgid, 56);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, weight, 60);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, nice, 62);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_affinity, cpus_allowed, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_priority, weight, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_session, name, 40);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_session, flags, 56);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_session, tick_us, 60);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, slice_ns, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, cookie, 40);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, flags, 48);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, cookie, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, status, 40);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, decision_type, 44);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, target_cpu, 46);

#undef VIRTIO_MILK_ASSERT_SIZE
#undef VIRTIO_MILK_ASSERT_OFF

#endif /* _UAPI_LINUX_VIRTIO_MILK_H */
