// SPDX-License-Identifier: Apache-2.0
/*
 * milk-work: a scheduler workload that checks its own results.
 *
 * Starts THREADS threads; each runs ROUNDS rounds of a compute burst
 * (an integer hash chain of WORK steps) followed by a sleep of SLEEP_US
 * microseconds, so the scheduler sees a steady mix of wakeups, runs and
 * blocks. Every thread's final hash is compared against the same chain
 * computed once in the main thread. Prints a start marker as the threads
 * are created (hosts use it to act mid-workload):
 *
 *   milk-work: start pid=123 threads=64
 *
 * and one summary line at the end:
 *
 *   milk-work: threads=64 rounds=20 ok=64 bad=0 wakeups=1280 elapsed_ms=...
 *
 * and exits 0 only if every thread finished with the right value.
 *
 * Usage: milk-work [-t THREADS] [-r ROUNDS] [-w WORK] [-s SLEEP_US]
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "workload.h"

struct worker {
	pthread_t thread;
	unsigned int id;
	uint64_t result;
	unsigned long wakeups;
};

static unsigned int rounds = 20;
static unsigned long work = 20000;
static unsigned long sleep_us = 1000;

static uint64_t burst(uint64_t x, unsigned long steps)
{
	unsigned long i;

	for (i = 0; i < steps; i++) {
		x ^= x >> 33;
		x *= 0xff51afd7ed558ccdULL;
		x ^= x >> 29;
		x += i;
	}
	return x;
}

static uint64_t expected(unsigned int id)
{
	uint64_t x = id + 1;
	unsigned int r;

	for (r = 0; r < rounds; r++)
		x = burst(x, work);
	return x;
}

static void *run(void *arg)
{
	struct worker *w = arg;
	struct timespec ts = {
		.tv_sec = sleep_us / 1000000,
		.tv_nsec = (sleep_us % 1000000) * 1000,
	};
	uint64_t x = w->id + 1;
	unsigned int r;

	for (r = 0; r < rounds; r++) {
		x = burst(x, work);
		if (sleep_us) {
			while (nanosleep(&ts, &ts) && errno == EINTR)
				;
			ts.tv_sec = sleep_us / 1000000;
			ts.tv_nsec = (sleep_us % 1000000) * 1000;
			w->wakeups++;
		}
	}
	w->result = x;
	return NULL;
}

int main(int argc, char **argv)
{
	unsigned long threads = 64, i, ok = 0, wakeups = 0;
	struct timespec t0, t1;
	struct worker *ws;
	int opt;

	while ((opt = getopt(argc, argv, "t:r:w:s:h")) != -1) {
		switch (opt) {
		case 't': threads = workload_parse("milk-work", optarg, "thread count"); break;
		case 'r': rounds = workload_parse("milk-work", optarg, "round count"); break;
		case 'w': work = workload_parse("milk-work", optarg, "work"); break;
		case 's': sleep_us = workload_parse("milk-work", optarg, "sleep"); break;
		default:
			fprintf(stderr, "usage: milk-work [-t THREADS] [-r ROUNDS] [-w WORK] [-s SLEEP_US]\n");
			return opt == 'h' ? 0 : 2;
		}
	}
	if (threads == 0 || threads > 4096) {
		fprintf(stderr, "milk-work: thread count must be 1..4096\n");
		return 2;
	}

	ws = calloc(threads, sizeof(*ws));
	if (!ws) {
		perror("milk-work: calloc");
		return 1;
	}
	printf("milk-work: start pid=%d threads=%lu\n", (int)getpid(), threads);
	fflush(stdout);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (i = 0; i < threads; i++) {
		ws[i].id = i;
		if (pthread_create(&ws[i].thread, NULL, run, &ws[i])) {
			perror("milk-work: pthread_create");
			return 1;
		}
	}
	for (i = 0; i < threads; i++)
		pthread_join(ws[i].thread, NULL);
	clock_gettime(CLOCK_MONOTONIC, &t1);

	for (i = 0; i < threads; i++) {
		if (ws[i].result == expected(ws[i].id))
			ok++;
		else
			fprintf(stderr, "milk-work: thread %lu wrong result\n", i);
		wakeups += ws[i].wakeups;
	}
	printf("milk-work: threads=%lu rounds=%u ok=%lu bad=%lu wakeups=%lu elapsed_ms=%ld\n",
	       threads, rounds, ok, threads - ok, wakeups,
	       (long)((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000));
	free(ws);
	return ok == threads ? 0 : 1;
}
