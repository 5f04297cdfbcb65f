// SPDX-License-Identifier: Apache-2.0
/*
 * milk-mix: tasks that compete unfairly, to see whether any kind starves.
 *
 * Runs, for DURATION_MS, YIELDERS processes that call sched_yield() in a
 * loop, FORKERS processes that fork a child which exits at once and wait
 * for it, and PAIRS pairs of processes that bounce a byte over two pipes.
 * Each counts its iterations in shared memory; at the end all are killed
 * and one line is printed:
 *
 *   milk-mix: ms=4000 yields=N forks=N roundtrips=N yielders=2 forkers=2 pairs=2
 *
 * A scheduler that lets yielding tasks keep their CPUs starves the forkers
 * and the pipe pairs (whose every iteration needs a wakeup). Exit status 0
 * if every worker started and the counts were collected, 1 otherwise.
 *
 * With -p PID_MAX, /proc/sys/kernel/pid_max is set first (and restored at
 * the end), so the forkers reuse pids within the run.
 *
 * Usage: milk-mix [-d DURATION_MS] [-y YIELDERS] [-f FORKERS] [-P PAIRS]
 *                 [-p PID_MAX]
 */
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "workload.h"

#define MAX_WORKERS 64

enum kind { YIELD, FORK, PIPE, NR_KINDS };

struct shared {
	volatile uint64_t count[MAX_WORKERS];
	volatile int stop;
};

static struct shared *sh;

static void yielder(int slot)
{
	while (!sh->stop) {
		sched_yield();
		sh->count[slot]++;
	}
}

static void forker(int slot)
{
	while (!sh->stop) {
		pid_t c = fork();

		if (c == 0)
			_exit(0);
		if (c < 0 || waitpid(c, NULL, 0) != c)
			continue;
		sh->count[slot]++;
	}
}

static void pinger(int slot, int out, int in)
{
	char b = 0;

	while (!sh->stop) {
		if (write(out, &b, 1) != 1 || read(in, &b, 1) != 1)
			return;
		sh->count[slot]++;
	}
}

static void ponger(int out, int in)
{
	char b;

	while (read(in, &b, 1) == 1 && write(out, &b, 1) == 1)
		;
}

static int set_pid_max(unsigned long v, unsigned long *old)
{
	FILE *f = fopen("/proc/sys/kernel/pid_max", "r+");
	int ok;

	if (!f)
		return -1;
	ok = fscanf(f, "%lu", old) == 1;
	rewind(f);
	ok = ok && fprintf(f, "%lu\n", v) > 0;
	return fclose(f) == 0 && ok ? 0 : -1;
}

int main(int argc, char **argv)
{
	unsigned long duration_ms = 4000, n[NR_KINDS] = { 2, 2, 2 };
	unsigned long pid_max = 0, old_pid_max = 0;
	uint64_t total[NR_KINDS] = { 0 };
	enum kind kind_of[MAX_WORKERS];
	pid_t pids[2 * MAX_WORKERS];
	int npids = 0, nslots = 0, opt, i, failed = 0;
	unsigned long k, j;

	while ((opt = getopt(argc, argv, "d:y:f:P:p:h")) != -1) {
		switch (opt) {
		case 'd': duration_ms = workload_parse("milk-mix", optarg, "duration"); break;
		case 'y': n[YIELD] = workload_parse("milk-mix", optarg, "yielders"); break;
		case 'f': n[FORK] = workload_parse("milk-mix", optarg, "forkers"); break;
		case 'P': n[PIPE] = workload_parse("milk-mix", optarg, "pairs"); break;
		case 'p': pid_max = workload_parse("milk-mix", optarg, "pid_max"); break;
		default:
			fprintf(stderr, "usage: milk-mix [-d DURATION_MS] [-y YIELDERS] "
				"[-f FORKERS] [-P PAIRS] [-p PID_MAX]\n");
			return opt == 'h' ? 0 : 2;
		}
	}
	if (n[YIELD] + n[FORK] + n[PIPE] > MAX_WORKERS) {
		fprintf(stderr, "milk-mix: at most %d workers\n", MAX_WORKERS);
		return 2;
	}
	if (pid_max && set_pid_max(pid_max, &old_pid_max)) {
		perror("milk-mix: pid_max");
		return 1;
	}
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
		  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		perror("milk-mix: mmap");
		return 1;
	}

	for (k = 0; k < NR_KINDS; k++) {
		for (j = 0; j < n[k]; j++) {
			int slot = nslots++, a[2], b[2];
			pid_t c;

			kind_of[slot] = k;
			if (k == PIPE && (pipe(a) || pipe(b))) {
				perror("milk-mix: pipe");
				failed = 1;
				break;
			}
			c = fork();
			if (c == 0) {
				if (k == YIELD)
					yielder(slot);
				else if (k == FORK)
					forker(slot);
				else
					pinger(slot, a[1], b[0]);
				_exit(0);
			}
			if (c < 0) {
				failed = 1;
				break;
			}
			pids[npids++] = c;
			if (k != PIPE)
				continue;
			c = fork();
			if (c == 0) {
				ponger(b[1], a[0]);
				_exit(0);
			}
			if (c < 0) {
				failed = 1;
				break;
			}
			pids[npids++] = c;
			close(a[0]);
			close(a[1]);
			close(b[0]);
			close(b[1]);
		}
	}

	if (!failed)
		usleep(duration_ms * 1000);
	sh->stop = 1;
	for (i = 0; i < nslots; i++)
		total[kind_of[i]] += sh->count[i];
	for (i = 0; i < npids; i++)
		kill(pids[i], SIGKILL);
	for (i = 0; i < npids; i++)
		waitpid(pids[i], NULL, 0);
	if (pid_max && set_pid_max(old_pid_max, &pid_max))
		failed = 1;

	printf("milk-mix: ms=%lu yields=%llu forks=%llu roundtrips=%llu "
	       "yielders=%lu forkers=%lu pairs=%lu\n", duration_ms,
	       (unsigned long long)total[YIELD], (unsigned long long)total[FORK],
	       (unsigned long long)total[PIPE], n[YIELD], n[FORK], n[PIPE]);
	return failed;
}
