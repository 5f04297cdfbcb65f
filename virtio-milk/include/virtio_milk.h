/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * virtio_milk.h - wire format of the virtio-milk device (MiLK).
 *
 * Canonical definition shared by the guest driver (drivers/virtio/virtio_milk.c and the
 * sched_ext bridge) and the host (virtio-milk/src/protocol.rs mirrors it; a test compiles
 * this header and compares every offset and size with the Rust layout).
 * Prose: docs/protocol.md.
 *
 * Every record is VIRTIO_MILK_RECORD_SIZE (64) bytes, little endian, and starts with
 * struct virtio_milk_hdr. A buffer carries 1..max_batch records back to back.
 * Queue 2c is CPU c's event queue (driver -> device), queue 2c+1 its decision queue
 * (device -> driver, the driver pre-posts device-writable buffers).
 */
#ifndef _UAPI_LINUX_VIRTIO_MILK_H
#define _UAPI_LINUX_VIRTIO_MILK_H

#ifndef VIRTIO_MILK_FORCE_FALLBACK_TYPES
#include <linux/types.h>
#else
/* User space without kernel uapi headers. */
#include <stdint.h>
typedef uint8_t __u8;
typedef uint16_t __le16;
typedef uint32_t __le32;
typedef uint64_t __le64;
#endif

/* Device ID (not assigned by the virtio spec; see docs/protocol.md). */
#define VIRTIO_ID_MILK			58

#define VIRTIO_MILK_PROTO_VERSION	1
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

/* Message types (struct virtio_milk_hdr.type). */
#define VIRTIO_MILK_MSG_HELLO		0x01	/* both directions */
#define VIRTIO_MILK_MSG_HEARTBEAT	0x02	/* both directions */
#define VIRTIO_MILK_MSG_GOODBYE		0x03	/* both directions */
#define VIRTIO_MILK_MSG_TASK_NEW	0x10	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_WAKEUP	0x11	/* guest -> host, a.k.a. RUNNABLE */
#define VIRTIO_MILK_MSG_TASK_BLOCKED	0x12	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_PREEMPT	0x13	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_YIELD	0x14	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_DEAD	0x15	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_AFFINITY	0x16	/* guest -> host */
#define VIRTIO_MILK_MSG_TASK_PRIORITY	0x17	/* guest -> host */
#define VIRTIO_MILK_MSG_CPU_IDLE	0x20	/* guest -> host */
#define VIRTIO_MILK_MSG_CPU_BUSY	0x21	/* guest -> host */
#define VIRTIO_MILK_MSG_ACK		0x30	/* guest -> host */
#define VIRTIO_MILK_MSG_RUN		0x40	/* host -> guest */
#define VIRTIO_MILK_MSG_PREEMPT		0x41	/* host -> guest */

/* Ack status (struct virtio_milk_ack.status). */
#define VIRTIO_MILK_ACK_OK		0
#define VIRTIO_MILK_ACK_STALE		1	/* decision seq != task's current seq */
#define VIRTIO_MILK_ACK_NO_TASK		2	/* unknown pid */
#define VIRTIO_MILK_ACK_BAD_CPU		3	/* not allowed, offline or out of range */
#define VIRTIO_MILK_ACK_NOT_RUNNABLE	4	/* blocked, running or dead */

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
	__le16 cpu;		/* events: producing CPU; decisions: target CPU */
};

/* TASK_WAKEUP, TASK_BLOCKED, TASK_PREEMPT, TASK_YIELD, TASK_DEAD, CPU_IDLE, CPU_BUSY. */
struct virtio_milk_task_event {
	struct virtio_milk_hdr hdr;
	__le32 pid;		/* CPU_IDLE: 0; CPU_BUSY: task now running or 0 */
	__le32 arg;		/* wake/preempt flags, 0 if unused */
	__le64 seq;		/* task seq after this event (CPU_*: 0) */
	__le64 ts_ns;		/* sender clock, informational */
	__u8 reserved[32];
};

struct virtio_milk_task_new {
	struct virtio_milk_hdr hdr;
	__le32 pid;
	__le32 tgid;
	__le64 seq;
	__le64 ts_ns;
	char comm[VIRTIO_MILK_COMM_LEN];	/* NUL padded */
	__le64 cpus_allowed;	/* bit n = CPU n */
	__le32 weight;		/* p->scx.weight */
	__le32 nice;		/* two's complement */
};

struct virtio_milk_task_affinity {
	struct virtio_milk_hdr hdr;
	__le32 pid;
	__le32 pad;
	__le64 seq;
	__le64 ts_ns;
	__le64 cpus_allowed;
	__u8 reserved[24];
};

struct virtio_milk_task_priority {
	struct virtio_milk_hdr hdr;
	__le32 pid;
	__le32 pad;
	__le64 seq;
	__le64 ts_ns;
	__le32 weight;
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
	__le64 counter;		/* HEARTBEAT: counter; GOODBYE: reason */
	char name[16];		/* HELLO: policy name (host) or "linux" */
	__u8 reserved[8];
};

/* RUN and PREEMPT (host -> guest). */
struct virtio_milk_decision {
	struct virtio_milk_hdr hdr;	/* hdr.cpu = target CPU */
	__le32 pid;		/* RUN: task; PREEMPT: expected current task or 0 */
	__le32 flags;		/* reserved, 0 */
	__le64 seq;		/* task seq this decision is based on */
	__le64 slice_ns;	/* RUN: slice, 0 = default */
	__le64 cookie;		/* echoed in the ack */
	__le64 ts_ns;		/* host clock */
	__u8 reserved[16];
};

/* ACK (guest -> host). */
struct virtio_milk_ack {
	struct virtio_milk_hdr hdr;	/* hdr.cpu = CPU that applied/rejected */
	__le32 pid;
	__le32 status;		/* VIRTIO_MILK_ACK_* */
	__le64 seq;
	__le64 ts_ns;
	__le64 cookie;
	__le16 decision_type;	/* VIRTIO_MILK_MSG_RUN or _PREEMPT */
	__le16 target_cpu;
	__u8 reserved[20];
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

/* Layout checks; the Rust side asserts the same numbers. */
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
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, pid, 8);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_event, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, comm, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, cpus_allowed, 48);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_new, nice, 60);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_affinity, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_task_priority, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_session, name, 40);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, slice_ns, 24);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_decision, cookie, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, status, 12);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, seq, 16);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, cookie, 32);
VIRTIO_MILK_ASSERT_OFF(virtio_milk_ack, decision_type, 40);

#undef VIRTIO_MILK_ASSERT_SIZE
#undef VIRTIO_MILK_ASSERT_OFF

#endif /* _UAPI_LINUX_VIRTIO_MILK_H */
