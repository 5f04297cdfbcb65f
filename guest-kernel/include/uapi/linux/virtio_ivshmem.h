/* SPDX-License-Identifier: (GPL-2.0 WITH Linux-syscall-note) OR BSD-3-Clause */
/*
 * virtio_ivshmem.h - a virtio transport over the ivshmem-doorbell PCI device
 *
 * The device's shared memory (BAR2) starts with struct virtio_ivshmem_regs,
 * the virtio "register file". The virtqueues themselves live in guest RAM;
 * the device side maps guest RAM (like vhost-user does).
 *
 * Doorbell vectors, driver -> device (written to the host peer):
 *   0      register request: the driver updated fields, then bumped req_seq;
 *          the device processes them and sets ack_seq = req_seq.
 *   1 + n  notification for queue n.
 * MSI-X vectors, device -> driver:
 *   0      configuration change
 *   1 + n  used buffers in queue n
 * The ivshmem device therefore needs vectors = 1 + num_queues.
 *
 * config_generation is a seqcount: a device changing config makes it odd
 * first and even again when done; the driver's copy is consistent when it
 * read the same even value before and after it.
 */
#ifndef _UAPI_LINUX_VIRTIO_IVSHMEM_H
#define _UAPI_LINUX_VIRTIO_IVSHMEM_H

#include <linux/types.h>

#define VIRTIO_IVSHMEM_MAGIC		0x4b4c494d	/* "MILK" in memory */
#define VIRTIO_IVSHMEM_VERSION		1
#define VIRTIO_IVSHMEM_MAX_QUEUES	128
#define VIRTIO_IVSHMEM_CONFIG_SIZE	192
#define VIRTIO_IVSHMEM_REGS_SIZE	0x1100

#define VIRTIO_IVSHMEM_VECTOR_CONFIG	0
#define VIRTIO_IVSHMEM_VECTOR_QUEUE(n)	(1 + (n))

/* One virtqueue; written by the driver unless marked "device". */
struct virtio_ivshmem_queue {
	__le16 num_max;		/* device: largest size, 0 = no such queue */
	__le16 num;		/* queue size chosen by the driver */
	__le16 ready;		/* 1 = the device may use the queue */
	__le16 reserved;
	__le64 desc;		/* guest physical address of the descriptor table */
	__le64 driver;		/* ... of the driver (available) ring */
	__le64 device;		/* ... of the device (used) ring */
};

struct virtio_ivshmem_regs {
	__le32 magic;			/* 0x00 device: VIRTIO_IVSHMEM_MAGIC */
	__le32 version;			/* 0x04 device: VIRTIO_IVSHMEM_VERSION */
	__le32 device_id;		/* 0x08 device: virtio device ID */
	__le32 vendor_id;		/* 0x0c device */
	__le64 device_features;		/* 0x10 device: offered features */
	__le64 driver_features;		/* 0x18 driver: accepted features */
	__le32 status;			/* 0x20 driver (device: see docs) */
	__le32 config_generation;	/* 0x24 device */
	__le32 num_queues;		/* 0x28 device */
	__le32 host_peer;		/* 0x2c device: ivshmem ID to ring */
	__le32 req_seq;			/* 0x30 driver: bumped per request */
	__le32 ack_seq;			/* 0x34 device: last request processed */
	__le32 config_size;		/* 0x38 device: valid bytes in config */
	__le32 isr;			/* 0x3c reserved, 0 */
	__u8 config[VIRTIO_IVSHMEM_CONFIG_SIZE];	/* 0x40 device config */
	struct virtio_ivshmem_queue queues[VIRTIO_IVSHMEM_MAX_QUEUES]; /* 0x100 */
};

#define VIRTIO_IVSHMEM_ASSERT(cond, msg) _Static_assert(cond, msg)
VIRTIO_IVSHMEM_ASSERT(sizeof(struct virtio_ivshmem_queue) == 32, "queue size");
VIRTIO_IVSHMEM_ASSERT(__builtin_offsetof(struct virtio_ivshmem_regs, config) == 0x40,
		      "config offset");
VIRTIO_IVSHMEM_ASSERT(__builtin_offsetof(struct virtio_ivshmem_regs, queues) == 0x100,
		      "queues offset");
VIRTIO_IVSHMEM_ASSERT(sizeof(struct virtio_ivshmem_regs) == VIRTIO_IVSHMEM_REGS_SIZE,
		      "regs size");

#endif /* _UAPI_LINUX_VIRTIO_IVSHMEM_H */
