// SPDX-License-Identifier: Apache-2.0
/*
 * milk-mix: a starvation mix that checks its own results.
 *
 * Runs, together, for the given time (default 4 s):
 *   - YIELDERS sched_yield() loops (they never block),
 *   - FORKERS fork-and-wait loops (each child exits with a known status),
 *   - PAIRS pipe ping-pong pairs (each round trip echoes a sequence number),
 * two of each by default. Each is its own process; counters live in a
 * shared anonymous mapping. A scheduler that lets the yielding tasks keep
 * their CPUs starves the others, which shows as low fork and round-trip
 * counts.
 *
 * Prints one line at the end (wrapped here):
 *
 *   milk-mix: ms=4000 seconds=4 elapsed_ms=4003 yields=N forks=N
 *     roundtrips=N pipe_rtts=N yielders=2 forkers=2 pairs=2
 *     min_yield=N min_fork=N min_pipe=N errors=0
 *
 * (roundtrips and pipe_rtts are the same count; min_* is the slowest
 * worker of each kind) and exits 0 only if every worker ran correctly:
 * every forked child's status was the one it was given, every echo carried
 * the sequence number that was sent and every worker exited 0.
 *
 * With -p PID_MAX, /proc/sys/kernel/pid_max is set first (and restored at
 * the end), so the forkers reuse pids within the run.
 *
 * Usage: milk-mix [-s SECONDS | -d DURATION_MS] [-y YIELDERS] [-f FORKERS]
 *                 [-P PAIRS] [-p PID_MAX]
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "workload.h"

#define MAX_PER_KIND 16

struct shared {
	int stop;
	unsigned long yields[MAX_PER_KIND];
	unsigned long forks[MAX_PER_KIND];
	unsigned long rtts[MAX_PER_KIND];
	unsigned long errors;
};

static struct shared *sh;

/* The counters are shared between processes: relaxed atomics, no tearing. */
#define LOAD(x)		__atomic_load_n(&(x), __ATOMIC_RELAXED)
#define STORE(x, v)	__atomic_store_n(&(x), (v), __ATOMIC_RELAXED)
#define ERROR()		__atomic_fetch_add(&sh->errors, 1, __ATOMIC_RELAXED)

static void yield_loop(int i)
{
	while (!LOAD(sh->stop)) {
		sched_yield();
		STORE(sh->yields[i], LOAD(sh->yields[i]) + 1);
	}
	_exit(0);
}

static void fork_loop(int i)
{
	unsigned long n = 0;

	while (!LOAD(sh->stop)) {
		int want = (int)(n % 100) + 1, status;
		pid_t c = fork();

		if (c < 0) {
			if (errno == EAGAIN || errno == EINTR)
				continue;
			ERROR();
			_exit(1);
		}
		if (c == 0)
			_exit(want);
		while (waitpid(c, &status, 0) < 0) {
			if (errno != EINTR) {
				ERROR();
				_exit(1);
			}
		}
		if (!WIFEXITED(status) || WEXITSTATUS(status) != want) {
			ERROR();
			_exit(1);
		}
		STORE(sh->forks[i], ++n);
	}
	_exit(0);
}

static int xfer(int fd, unsigned long *v, int wr)
{
	char *p = (char *)v;
	size_t done = 0;

	while (done < sizeof(*v)) {
		ssize_t r = wr ? write(fd, p + done, sizeof(*v) - done) :
				 read(fd, p + done, sizeof(*v) - done);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		done += r;
	}
	return 0;
}

/* The echo side: returns every value it reads, ends at end of file. */
static void ponger(int in, int out)
{
	unsigned long v;

	while (xfer(in, &v, 0) == 0) {
		if (xfer(out, &v, 1)) {
			ERROR();
			_exit(1);
		}
	}
	_exit(0);
}

static void pinger(int i, int out, int in)
{
	unsigned long seq = 0, back;

	while (!LOAD(sh->stop)) {
		seq++;
		if (xfer(out, &seq, 1) || xfer(in, &back, 0) || back != seq) {
			ERROR();
			_exit(1);
		}
		STORE(sh->rtts[i], seq);
	}
	close(out);
	_exit(0);
}

static pid_t spawn(void (*fn)(int), int i)
{
	pid_t p = fork();

	if (p < 0) {
		perror("milk-mix: fork");
		exit(1);
	}
	if (p == 0)
		fn(i);
	return p;
}

static void spawn_pair(int i, pid_t *ping, pid_t *pong)
{
	int to_pong[2], to_ping[2];

	if (pipe(to_pong) || pipe(to_ping)) {
		perror("milk-mix: pipe");
		exit(1);
	}
	*pong = fork();
	if (*pong < 0) {
		perror("milk-mix: fork");
		exit(1);
	}
	if (*pong == 0) {
		close(to_pong[1]);
		close(to_ping[0]);
		ponger(to_pong[0], to_ping[1]);
	}
	*ping = fork();
	if (*ping < 0) {
		perror("milk-mix: fork");
		exit(1);
	}
	if (*ping == 0) {
		close(to_pong[0]);
		close(to_ping[1]);
		pinger(i, to_pong[1], to_ping[0]);
	}
	close(to_pong[0]);
	close(to_pong[1]);
	close(to_ping[0]);
	close(to_ping[1]);
}

/* Writes @v to pid_max; the old value goes to @old. 0 on success. */
static int set_pid_max(unsigned long v, unsigned long *old)
{
	FILE *f = fopen("/proc/sys/kernel/pid_max", "r+");
	int ok;

	if (!f)
		return -1;
	ok = fscanf(f, "%lu", old) == 1 && fseek(f, 0, SEEK_SET) == 0;
	ok = ok && fprintf(f, "%lu\n", v) > 0;
	return fclose(f) || !ok ? -1 : 0;
}

/* Sum and minimum of @n counters. */
static unsigned long total(const unsigned long *c, int n, unsigned long *min)
{
	unsigned long sum = 0;
	int i;

	*min = 0;
	for (i = 0; i < n; i++) {
		sum += c[i];
		if (i == 0 || c[i] < *min)
			*min = c[i];
	}
	return sum;
}

static void print_usage(void)
{
	fprintf(stderr, "usage: milk-mix [-s SECONDS | -d DURATION_MS] [-y YIELDERS] ");
	fprintf(stderr, "[-f FORKERS] [-P PAIRS] [-p PID_MAX]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	unsigned long ms = 4000, ny = 2, nf = 2, np = 2, pid_max = 0, old_max = 0;
	unsigned long yields, forks, rtts, errors, min_y, min_f, min_p;
	pid_t pids[4 * MAX_PER_KIND];
	int opt, i, n = 0, failed = 0;
	long long t0, elapsed;

	while ((opt = getopt(argc, argv, "s:d:y:f:P:p:")) != -1) {
		switch (opt) {
		case 's':
			ms = workload_parse("milk-mix", optarg, "seconds");
			if (ms == 0 || ms > 3600)
				print_usage();
			ms *= 1000;
			break;
		case 'd':
			ms = workload_parse("milk-mix", optarg, "duration");
			break;
		case 'y':
			ny = workload_parse("milk-mix", optarg, "yielders");
			break;
		case 'f':
			nf = workload_parse("milk-mix", optarg, "forkers");
			break;
		case 'P':
			np = workload_parse("milk-mix", optarg, "pairs");
			break;
		case 'p':
			pid_max = workload_parse("milk-mix", optarg, "pid_max");
			break;
		default:
			print_usage();
		}
	}
	if (ms == 0 || ms > 3600000 || ny > MAX_PER_KIND || nf > MAX_PER_KIND ||
	    np > MAX_PER_KIND) {
		fprintf(stderr, "milk-mix: 1..3600 s, at most %d of each kind\n",
			MAX_PER_KIND);
		return 2;
	}
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
		  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		perror("milk-mix: mmap");
		return 1;
	}
	memset(sh, 0, sizeof(*sh));
	if (pid_max && set_pid_max(pid_max, &old_max)) {
		perror("milk-mix: pid_max");
		return 1;
	}
	t0 = workload_now_ms();
	for (i = 0; i < (int)MAX_PER_KIND; i++) {
		if (i < (int)ny)
			pids[n++] = spawn(yield_loop, i);
		if (i < (int)nf)
			pids[n++] = spawn(fork_loop, i);
		if (i < (int)np) {
			spawn_pair(i, &pids[n], &pids[n + 1]);
			n += 2;
		}
	}
	printf("milk-mix: start ms=%lu workers=%d\n", ms, n);
	fflush(stdout);
	/* The deadline is the clock's, not the sleep's: a late wakeup counts. */
	while (workload_now_ms() - t0 < (long long)ms)
		usleep(20000);
	STORE(sh->stop, 1);
	elapsed = workload_now_ms() - t0;
	for (i = 0; i < n; i++) {
		int status = 0;
		pid_t r;

		while ((r = waitpid(pids[i], &status, 0)) < 0 && errno == EINTR)
			;
		if (r < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
			failed++;
	}
	if (pid_max && set_pid_max(old_max, &pid_max))
		failed++;
	errors = LOAD(sh->errors) + failed;
	yields = total(sh->yields, ny, &min_y);
	forks = total(sh->forks, nf, &min_f);
	rtts = total(sh->rtts, np, &min_p);
	/* One line: the host parses it. */
	printf("milk-mix: ms=%lu seconds=%lu elapsed_ms=%lld", ms, ms / 1000,
	       elapsed);
	printf(" yields=%lu forks=%lu roundtrips=%lu pipe_rtts=%lu", yields,
	       forks, rtts, rtts);
	printf(" yielders=%lu forkers=%lu pairs=%lu", ny, nf, np);
	printf(" min_yield=%lu min_fork=%lu min_pipe=%lu", min_y, min_f, min_p);
	printf(" errors=%lu\n", errors);
	return errors ? 1 : 0;
}
