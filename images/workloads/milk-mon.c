// SPDX-License-Identifier: Apache-2.0
/*
 * milk-mon: watches sched_ext and the MiLK bridge, printing a line on every
 * change, with timestamps, so a host can measure how fast the guest falls
 * back to CFS and comes back.
 *
 * Every INTERVAL_MS (default 10) it reads /sys/kernel/sched_ext/state and
 * /sys/kernel/milk/{state,enables,disables,host_goodbyes,host_timeouts};
 * when any of them differs from the previous sample it prints
 *
 *   milk-mon: t_ms=1234 prev_ms=1224 scx=disabled milk=waiting-for-host
 *             enables=1 disables=1 goodbyes=1 timeouts=0
 *
 * (one line) where t_ms is this sample's CLOCK_MONOTONIC time and prev_ms
 * the previous sample's: the change happened in (prev_ms, t_ms]. The first
 * line is printed at start with prev_ms=t_ms. Runs until killed, or for
 * DURATION_MS if given.
 *
 * Usage: milk-mon [-i INTERVAL_MS] [-d DURATION_MS]
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

#define FIELDS 6

static const char *const paths[FIELDS] = {
	"/sys/kernel/sched_ext/state",
	"/sys/kernel/milk/state",
	"/sys/kernel/milk/enables",
	"/sys/kernel/milk/disables",
	"/sys/kernel/milk/host_goodbyes",
	"/sys/kernel/milk/host_timeouts",
};

static const char *const names[FIELDS] = {
	"scx", "milk", "enables", "disables", "goodbyes", "timeouts",
};

static void read_field(const char *path, char *buf, size_t len)
{
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY);
	if (fd < 0) {
		snprintf(buf, len, "absent");
		return;
	}
	n = read(fd, buf, len - 1);
	close(fd);
	if (n <= 0) {
		snprintf(buf, len, "unreadable");
		return;
	}
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
}

int main(int argc, char **argv)
{
	char cur[FIELDS][32], prev[FIELDS][32];
	unsigned long interval_ms = 10, duration_ms = 0;
	long long start, prev_ms, t;
	int opt, i, first = 1;

	while ((opt = getopt(argc, argv, "i:d:h")) != -1) {
		switch (opt) {
		case 'i': interval_ms = workload_parse("milk-mon", optarg, "interval"); break;
		case 'd': duration_ms = workload_parse("milk-mon", optarg, "duration"); break;
		default:
			fprintf(stderr, "usage: milk-mon [-i INTERVAL_MS] [-d DURATION_MS]\n");
			return opt == 'h' ? 0 : 2;
		}
	}
	if (interval_ms == 0)
		interval_ms = 1;
	memset(prev, 0, sizeof(prev));
	start = prev_ms = workload_now_ms();
	for (;;) {
		struct timespec ts = {
			.tv_sec = interval_ms / 1000,
			.tv_nsec = (interval_ms % 1000) * 1000000,
		};
		int changed = first;

		t = workload_now_ms();
		for (i = 0; i < FIELDS; i++) {
			read_field(paths[i], cur[i], sizeof(cur[i]));
			if (strcmp(cur[i], prev[i]))
				changed = 1;
		}
		if (changed) {
			printf("milk-mon: t_ms=%lld prev_ms=%lld", t, first ? t : prev_ms);
			for (i = 0; i < FIELDS; i++)
				printf(" %s=%s", names[i], cur[i]);
			printf("\n");
			fflush(stdout);
			memcpy(prev, cur, sizeof(prev));
			first = 0;
		}
		prev_ms = t;
		if (duration_ms && t - start >= (long long)duration_ms)
			return 0;
		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
	}
}
