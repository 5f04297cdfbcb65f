/*
 * milk-vmm test guest: freestanding, no interrupts, everything polled.
 *
 * 1. prints a banner and the kernel command line it was given,
 * 2. finds the virtio-mmio device announced there (virtio_mmio.device=4K@0x...:IRQ),
 * 3. initialises it (reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queue 0,
 *    config space, DRIVER_OK),
 * 4. does one queue round trip with the VMM's echo device (which upper-cases),
 * 5. checks and acknowledges InterruptStatus, resets the device,
 * 6. prints "MILK-RESULT status=<n>" (0 = all checks passed, else the failing
 *    step) and resets the machine through the i8042 controller (or, where
 *    there is none, by a triple fault).
 *
 * When the device is virtio-milk (milk-vmm --policy NAME) instead of echo,
 * steps 4-5 are a scheduling round trip with the host policy (milk_test()):
 * config read, one CPU's event + decision queues, host HELLO, guest HELLO,
 * TASK_NEW + TASK_WAKEUP of a fake task, the host's RUN for it, an OK ACK.
 */
#include <stdint.h>

/* <linux/types.h> (the uapi typedefs) is all the header needs, freestanding too. */
#include "virtio_milk.h"

#define COM1 0x3f8

#define VIRTIO_MAGIC 0x74726976u
#define ECHO_DEVICE_ID 0x7e57u
#define ECHO_F_UPPER 1u

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC_LOW 0x080
#define R_QUEUE_DESC_HIGH 0x084
#define R_QUEUE_DRIVER_LOW 0x090
#define R_QUEUE_DRIVER_HIGH 0x094
#define R_QUEUE_DEVICE_LOW 0x0a0
#define R_QUEUE_DEVICE_HIGH 0x0a4
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1u
#define S_DRIVER 2u
#define S_DRIVER_OK 4u
#define S_FEATURES_OK 8u
#define S_NEEDS_RESET 0x40u

#define QSIZE 4
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QSIZE];
	uint16_t used_event;
};

struct used_elem {
	uint32_t id;
	uint32_t len;
};

struct used {
	uint16_t flags;
	uint16_t idx;
	struct used_elem ring[QSIZE];
	uint16_t avail_event;
};

static struct desc descs[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(2)));
static struct used used __attribute__((aligned(4)));
static char request[] = "hello from the milk test guest";
static char response[64];

void *memset(void *d, int c, unsigned long n)
{
	unsigned char *p = d;
	while (n--)
		*p++ = (unsigned char)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	unsigned char *p = d;
	const unsigned char *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline uint8_t inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void mb(void)
{
	__asm__ volatile("mfence" : : : "memory");
}

static void putc(char c)
{
	int spins = 100000;
	while (!(inb(COM1 + 5) & 0x20) && --spins)
		;
	outb(COM1, (uint8_t)c);
}

static void puts(const char *s)
{
	while (*s) {
		if (*s == '\n')
			putc('\r');
		putc(*s++);
	}
}

static void putdec(uint64_t v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts(&buf[i]);
}

static void puthex(uint64_t v)
{
	char buf[19];
	int i = 18;
	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 15];
		v >>= 4;
	} while (v);
	buf[--i] = 'x';
	buf[--i] = '0';
	puts(&buf[i]);
}

static uint64_t mmio_base;

static uint32_t rd(uint32_t off)
{
	return *(volatile uint32_t *)(uintptr_t)(mmio_base + off);
}

static void wr(uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(uintptr_t)(mmio_base + off) = v;
}

static int starts_with(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

/* Finds "virtio_mmio.device=<size>@0x<addr>:<irq>" and returns addr (0 if none). */
static uint64_t find_device(const char *cmdline)
{
	const char *key = "virtio_mmio.device=";
	for (const char *s = cmdline; s && *s; s++) {
		if ((s == cmdline || s[-1] == ' ') && starts_with(s, key)) {
			s += 19;
			while (*s && *s != '@')
				s++;
			if (!starts_with(s, "@0x"))
				return 0;
			s += 3;
			uint64_t v = 0;
			for (;;) {
				char c = *s++;
				if (c >= '0' && c <= '9')
					v = v * 16 + (uint64_t)(c - '0');
				else if (c >= 'a' && c <= 'f')
					v = v * 16 + (uint64_t)(c - 'a' + 10);
				else
					break;
			}
			return v;
		}
	}
	return 0;
}

static void finish(int status)
{
	puts("MILK-RESULT status=");
	putdec((uint64_t)status);
	puts("\n");
	/* Pulse the CPU reset line through the i8042 controller. */
	outb(0x64, 0xfe);
	/* No i8042 (e.g. QEMU microvm): triple-fault with an empty IDT. */
	static const struct {
		uint16_t limit;
		uint64_t base;
	} __attribute__((packed)) no_idt = { 0, 0 };
	__asm__ volatile("lidt %0; int3" : : "m"(no_idt));
	for (;;)
		__asm__ volatile("cli; hlt");
}

#define CHECK(step, cond, what)                      \
	do {                                         \
		if (!(cond)) {                       \
			puts("test-guest: FAILED: "); \
			puts(what);                  \
			puts("\n");                  \
			finish(step);                \
		}                                    \
	} while (0)

/* ---- virtio-milk round trip ------------------------------------------ */

#define MQ 8 /* entries per milk queue */
#define FAKE_PID 4242u
#define FAKE_GEN 1u
#define FAKE_GTID (((__u64)FAKE_GEN << 32) | FAKE_PID)
#define SPIN_LIMIT 20000000ul

struct milk_vq {
	struct desc desc[MQ] __attribute__((aligned(16)));
	struct {
		uint16_t flags;
		uint16_t idx;
		uint16_t ring[MQ];
		uint16_t used_event;
	} avail __attribute__((aligned(2)));
	struct {
		uint16_t flags;
		uint16_t idx;
		struct used_elem ring[MQ];
		uint16_t avail_event;
	} used __attribute__((aligned(4)));
	uint16_t last_used;
	union virtio_milk_record buf[MQ] __attribute__((aligned(64)));
};

static struct milk_vq evq, dvq;
static uint64_t milk_session;
static unsigned milk_hellos, milk_runs, milk_others;
static struct virtio_milk_decision milk_run;

static void vq_setup(uint32_t index, struct milk_vq *q)
{
	wr(R_QUEUE_SEL, index);
	CHECK(110, rd(R_QUEUE_READY) == 0, "milk queue already ready");
	CHECK(111, rd(R_QUEUE_NUM_MAX) >= MQ, "milk queue too small");
	wr(R_QUEUE_NUM, MQ);
	wr(R_QUEUE_DESC_LOW, (uint32_t)(uintptr_t)q->desc);
	wr(R_QUEUE_DESC_HIGH, 0);
	wr(R_QUEUE_DRIVER_LOW, (uint32_t)(uintptr_t)&q->avail);
	wr(R_QUEUE_DRIVER_HIGH, 0);
	wr(R_QUEUE_DEVICE_LOW, (uint32_t)(uintptr_t)&q->used);
	wr(R_QUEUE_DEVICE_HIGH, 0);
	wr(R_QUEUE_READY, 1);
	CHECK(112, rd(R_QUEUE_READY) == 1, "milk queue not ready");
}

/* Makes buffer `i` of `q` available (device-writable for the decision queue). */
static void vq_post(struct milk_vq *q, uint16_t i, int writable)
{
	q->desc[i].addr = (uint64_t)(uintptr_t)&q->buf[i];
	q->desc[i].len = VIRTIO_MILK_RECORD_SIZE;
	q->desc[i].flags = writable ? DESC_F_WRITE : 0;
	q->desc[i].next = 0;
	q->avail.ring[q->avail.idx % MQ] = i;
	mb();
	q->avail.idx++;
	mb();
}

static void hdr(struct virtio_milk_hdr *h, uint16_t type)
{
	h->type = type;
	h->len = VIRTIO_MILK_RECORD_SIZE;
	h->version = VIRTIO_MILK_PROTO_VERSION;
	h->flags = 0;
	h->cpu = 0;
}

/* Sends one record on the event queue (one record per buffer, no batching). */
static void send_record(const union virtio_milk_record *r)
{
	uint16_t i = evq.avail.idx % MQ;
	evq.buf[i] = *r;
	vq_post(&evq, i, 0);
	wr(R_QUEUE_NOTIFY, VIRTIO_MILK_EVENT_VQ(0));
}

/* Consumes used decision buffers, re-posting each; true once `want` holds. */
static void poll_decisions(void)
{
	while (*(volatile uint16_t *)&dvq.used.idx != dvq.last_used) {
		mb();
		struct used_elem e = dvq.used.ring[dvq.last_used % MQ];
		dvq.last_used++;
		CHECK(120, e.id < MQ, "decision used id out of range");
		CHECK(121, e.len == VIRTIO_MILK_RECORD_SIZE, "decision used length");
		const union virtio_milk_record *r = &dvq.buf[e.id];
		CHECK(122, r->hdr.len == VIRTIO_MILK_RECORD_SIZE &&
				   r->hdr.version == VIRTIO_MILK_PROTO_VERSION,
		      "decision record header");
		switch (r->hdr.type) {
		case VIRTIO_MILK_MSG_HELLO:
			milk_hellos++;
			milk_session = r->session.session_id;
			CHECK(123, r->session.num_cpus == 1, "host HELLO num_cpus");
			puts("milk: host HELLO, policy ");
			{
				char name[17];
				memcpy(name, r->session.name, 16);
				name[16] = 0;
				puts(name);
			}
			puts("\n");
			break;
		case VIRTIO_MILK_MSG_RUN:
			milk_runs++;
			milk_run = r->decision;
			break;
		default:
			milk_others++; /* HEARTBEAT and the like */
			break;
		}
		vq_post(&dvq, (uint16_t)e.id, 1);
		wr(R_QUEUE_NOTIFY, VIRTIO_MILK_DECISION_VQ(0));
	}
}

#define WAIT_FOR(step, cond, what)                                   \
	do {                                                         \
		unsigned long spins_ = 0;                            \
		while (!(cond) && spins_++ < SPIN_LIMIT)             \
			poll_decisions();                            \
		CHECK(step, cond, what);                             \
	} while (0)

/* "testguest.linger": after the milk round trip keep the device running and spin. */
static int linger;

static void milk_test(void)
{
	union virtio_milk_record r;

	puts("virtio-milk device\n");
	wr(R_STATUS, 0);
	CHECK(100, rd(R_STATUS) == 0, "reset did not clear status");
	wr(R_STATUS, S_ACKNOWLEDGE);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(R_DEVICE_FEATURES_SEL, 1);
	uint32_t f_hi = rd(R_DEVICE_FEATURES);
	CHECK(101, f_hi & 1, "VIRTIO_F_VERSION_1 not offered");
	wr(R_DRIVER_FEATURES_SEL, 0);
	wr(R_DRIVER_FEATURES, 0); /* no heartbeat/batch/event-idx: one record per buffer */
	wr(R_DRIVER_FEATURES_SEL, 1);
	wr(R_DRIVER_FEATURES, 1);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	CHECK(102, rd(R_STATUS) & S_FEATURES_OK, "device refused FEATURES_OK");

	/* struct virtio_milk_config, read as aligned 32-bit words. */
	uint32_t num_cpus = rd(R_CONFIG + 0);
	uint32_t w1 = rd(R_CONFIG + 4), w2 = rd(R_CONFIG + 8);
	puts("milk: config num_cpus=");
	putdec(num_cpus);
	puts(" version=");
	putdec(w1 & 0xffff);
	puts(" record_size=");
	putdec(w2 & 0xffff);
	puts("\n");
	CHECK(103, num_cpus == 1, "config num_cpus (run with one vCPU)");
	CHECK(104, (w1 & 0xffff) == VIRTIO_MILK_PROTO_VERSION, "config version");
	CHECK(105, (w2 & 0xffff) == VIRTIO_MILK_RECORD_SIZE, "config record_size");
	CHECK(106, (w2 >> 16) == VIRTIO_MILK_QUEUES_PER_CPU, "config queues_per_cpu");

	vq_setup(VIRTIO_MILK_EVENT_VQ(0), &evq);
	vq_setup(VIRTIO_MILK_DECISION_VQ(0), &dvq);
	/* Pre-post every decision buffer. */
	for (uint16_t i = 0; i < MQ; i++)
		vq_post(&dvq, i, 1);

	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	uint32_t st = rd(R_STATUS);
	CHECK(107, (st & S_DRIVER_OK) && !(st & S_NEEDS_RESET), "milk device not live");

	WAIT_FOR(130, milk_hellos > 0, "no HELLO from the host");

	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_HELLO);
	r.session.num_cpus = 1;
	r.session.session_id = milk_session;
	memcpy(r.session.name, "test-guest", 10);
	send_record(&r);

	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_TASK_NEW);
	r.task_new.gtid = FAKE_GTID;
	r.task_new.tgid = FAKE_PID;
	r.task_new.seq = 1;
	memcpy(r.task_new.comm, "fake-task", 9);
	r.task_new.cpus_allowed = 1;
	r.task_new.weight = 100;
	send_record(&r);

	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_TASK_WAKEUP);
	r.event.gtid = FAKE_GTID;
	r.event.seq = 2;
	r.event.arg = VIRTIO_MILK_WAKE_NEW;
	send_record(&r);

	WAIT_FOR(131, milk_runs > 0, "no RUN decision from the host");
	puts("milk: RUN pid=");
	putdec(VIRTIO_MILK_GTID_PID(milk_run.gtid));
	puts(" gen=");
	putdec(VIRTIO_MILK_GTID_GEN(milk_run.gtid));
	puts(" cpu=");
	putdec(milk_run.hdr.cpu);
	puts(" seq=");
	putdec(milk_run.seq);
	puts(" slice_ns=");
	putdec(milk_run.slice_ns);
	puts("\n");
	CHECK(132, milk_run.gtid == FAKE_GTID, "RUN for another task");
	CHECK(133, milk_run.hdr.cpu == 0, "RUN on another CPU");
	CHECK(134, milk_run.seq == 2, "RUN with the wrong seq");

	memset(&r, 0, sizeof(r));
	hdr(&r.hdr, VIRTIO_MILK_MSG_ACK);
	r.ack.gtid = milk_run.gtid;
	r.ack.status = VIRTIO_MILK_ACK_OK;
	r.ack.seq = milk_run.seq;
	r.ack.cookie = milk_run.cookie;
	r.ack.decision_type = VIRTIO_MILK_MSG_RUN;
	r.ack.target_cpu = milk_run.hdr.cpu;
	send_record(&r);

	/* The host consumed all four records (HELLO, TASK_NEW, TASK_WAKEUP, ACK). */
	WAIT_FOR(135, *(volatile uint16_t *)&evq.used.idx == 4, "events not consumed");
	CHECK(136, rd(R_INTERRUPT_STATUS) & 1, "InterruptStatus has no used-buffer bit");
	wr(R_INTERRUPT_ACK, 1);
	CHECK(137, (rd(R_INTERRUPT_STATUS) & 1) == 0, "InterruptACK did not clear the bit");
	puts("milk: round trip ok (");
	putdec(milk_others);
	puts(" other host records)\n");

	if (linger) {
		puts("milk: lingering\n");
		for (;;)
			__asm__ volatile("pause");
	}
	wr(R_STATUS, 0);
	CHECK(138, rd(R_STATUS) == 0, "milk device reset");
	finish(0);
}

void guest_main(const char *cmdline)
{
	puts("\nmilk test guest: hello\n");
	puts("cmdline: ");
	puts(cmdline ? cmdline : "(none)");
	puts("\n");

	/* "testguest.hang": spin forever (tests the VMM's timeout and signals). */
	for (const char *s = cmdline; s && *s; s++) {
		if ((s == cmdline || s[-1] == ' ') && starts_with(s, "testguest.hang")) {
			puts("test-guest: hanging\n");
			for (;;)
				__asm__ volatile("pause");
		}
		if ((s == cmdline || s[-1] == ' ') && starts_with(s, "testguest.linger"))
			linger = 1;
	}

	mmio_base = find_device(cmdline);
	CHECK(10, mmio_base != 0, "no virtio_mmio.device= on the command line");
	puts("virtio-mmio device at ");
	puthex(mmio_base);
	puts("\n");
	CHECK(11, rd(R_MAGIC) == VIRTIO_MAGIC, "bad magic");
	CHECK(12, rd(R_VERSION) == 2, "not a modern (version 2) transport");
	if (rd(R_DEVICE_ID) == VIRTIO_ID_MILK)
		milk_test();
	CHECK(13, rd(R_DEVICE_ID) == ECHO_DEVICE_ID, "not the echo device");

	wr(R_STATUS, 0);
	CHECK(20, rd(R_STATUS) == 0, "reset did not clear status");
	wr(R_STATUS, S_ACKNOWLEDGE);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
	wr(R_DEVICE_FEATURES_SEL, 0);
	uint32_t f_lo = rd(R_DEVICE_FEATURES);
	wr(R_DEVICE_FEATURES_SEL, 1);
	uint32_t f_hi = rd(R_DEVICE_FEATURES);
	CHECK(21, f_hi & 1, "VIRTIO_F_VERSION_1 not offered");
	CHECK(22, f_lo & ECHO_F_UPPER, "ECHO_F_UPPER not offered");
	wr(R_DRIVER_FEATURES_SEL, 0);
	wr(R_DRIVER_FEATURES, ECHO_F_UPPER);
	wr(R_DRIVER_FEATURES_SEL, 1);
	wr(R_DRIVER_FEATURES, 1);
	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
	CHECK(23, rd(R_STATUS) & S_FEATURES_OK, "device refused FEATURES_OK");

	wr(R_QUEUE_SEL, 0);
	CHECK(30, rd(R_QUEUE_READY) == 0, "queue 0 already ready");
	CHECK(31, rd(R_QUEUE_NUM_MAX) >= QSIZE, "queue 0 too small");
	wr(R_QUEUE_NUM, QSIZE);
	wr(R_QUEUE_DESC_LOW, (uint32_t)(uintptr_t)descs);
	wr(R_QUEUE_DESC_HIGH, 0);
	wr(R_QUEUE_DRIVER_LOW, (uint32_t)(uintptr_t)&avail);
	wr(R_QUEUE_DRIVER_HIGH, 0);
	wr(R_QUEUE_DEVICE_LOW, (uint32_t)(uintptr_t)&used);
	wr(R_QUEUE_DEVICE_HIGH, 0);
	wr(R_QUEUE_READY, 1);
	CHECK(32, rd(R_QUEUE_READY) == 1, "queue 0 not ready");

	CHECK(40, rd(R_CONFIG) == 4096, "config max_len");
	wr(R_CONFIG + 4, 0xc0ffee);
	CHECK(41, rd(R_CONFIG + 4) == 0xc0ffee, "config scratch");

	wr(R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
	uint32_t st = rd(R_STATUS);
	CHECK(42, (st & S_DRIVER_OK) && !(st & S_NEEDS_RESET), "device not live");
	puts("virtio: device live, features ");
	puthex(((uint64_t)f_hi << 32) | f_lo);
	puts("\n");

	/* One request: readable request buffer -> writable response buffer. */
	uint32_t req_len = sizeof(request) - 1;
	descs[0].addr = (uint64_t)(uintptr_t)request;
	descs[0].len = req_len;
	descs[0].flags = DESC_F_NEXT;
	descs[0].next = 1;
	descs[1].addr = (uint64_t)(uintptr_t)response;
	descs[1].len = sizeof(response);
	descs[1].flags = DESC_F_WRITE;
	descs[1].next = 0;
	avail.ring[0] = 0;
	mb();
	avail.idx = 1;
	mb();
	wr(R_QUEUE_NOTIFY, 0);

	unsigned long spins = 0;
	while (*(volatile uint16_t *)&used.idx == 0 && spins < 50000000ul)
		spins++;
	CHECK(50, *(volatile uint16_t *)&used.idx == 1, "no used buffer (timeout)");
	mb();
	CHECK(51, used.ring[0].id == 0, "used id");
	CHECK(52, used.ring[0].len == req_len, "used length");
	for (uint32_t i = 0; i < req_len; i++) {
		char want = request[i];
		if (want >= 'a' && want <= 'z')
			want = (char)(want - 'a' + 'A');
		CHECK(53, response[i] == want, "response is not the upper-cased request");
	}
	response[req_len] = 0;
	puts("echo: ");
	puts(response);
	puts("\n");

	CHECK(60, rd(R_INTERRUPT_STATUS) & 1, "InterruptStatus has no used-buffer bit");
	wr(R_INTERRUPT_ACK, 1);
	CHECK(61, (rd(R_INTERRUPT_STATUS) & 1) == 0, "InterruptACK did not clear the bit");

	wr(R_STATUS, 0);
	CHECK(62, rd(R_STATUS) == 0, "device reset");
	puts("virtio: round trip ok, polled ");
	putdec(spins);
	puts(" times\n");
	finish(0);
}
