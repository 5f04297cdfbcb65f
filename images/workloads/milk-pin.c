// SPDX-License-Identifier: Apache-2.0
/*
 * milk-pin: a task pinned to one CPU that checks it is never run elsewhere.
 *
 * Pins itself with sched_setaffinity() to CPU (default 0), prints
 *
 *   milk-pin: pid=123 cpu=1
 *
 * (hosts use the pid to aim decisions at a task whose allowed mask is a
 * single CPU), then for DURATION_MS alternates a short compute burst and a
 * SLEEP_US sleep, checking sched_getcpu() after every wakeup. Ends with
 *
 *   milk-pin: done pid=123 cpu=1 iterations=N wrong_cpu=0
 *
 * and exits 0 only if it never ran on another CPU.
 *
 * Usage: milk-pin [-c CPU] [-d DURATION_MS] [-s SLEEP_US]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

int main(int argc, char **argv)
{
	unsigned long cpu = 0, duration_ms = 3000, sleep_us = 1000;
	unsigned long iterations = 0, wrong = 0, i;
	volatile uint64_t x = 1;
	long long end;
	cpu_set_t set;
	int opt;

	while ((opt = getopt(argc, argv, "c:d:s:h")) != -1) {
		switch (opt) {
		case 'c': cpu = workload_parse("milk-pin", optarg, "cpu"); break;
		case 'd': duration_ms = workload_parse("milk-pin", optarg, "duration"); break;
		case 's': sleep_us = workload_parse("milk-pin", optarg, "sleep"); break;
		default:
			fprintf(stderr, "usage: milk-pin [-c CPU] [-d DURATION_MS] [-s SLEEP_US]\n");
			return opt == 'h' ? 0 : 2;
		}
	}
	if (cpu >= CPU_SETSIZE) {
		fprintf(stderr, "milk-pin: cpu out of range\n");
		return 2;
	}
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set)) {
		perror("milk-pin: sched_setaffinity");
		return 1;
	}
	printf("milk-pin: pid=%d cpu=%lu\n", (int)getpid(), cpu);
	fflush(stdout);

	end = workload_now_ms() + (long long)duration_ms;
	do {
		struct timespec ts = {
			.tv_sec = sleep_us / 1000000,
			.tv_nsec = (sleep_us % 1000000) * 1000,
		};

		for (i = 0; i < 2000; i++)
			x = x * 6364136223846793005ULL + 1442695040888963407ULL;
		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
		if ((unsigned long)sched_getcpu() != cpu)
			wrong++;
		iterations++;
	} while (workload_now_ms() < end);

	printf("milk-pin: done pid=%d cpu=%lu iterations=%lu wrong_cpu=%lu\n",
	       (int)getpid(), cpu, iterations, wrong);
	return wrong ? 1 : 0;
}
