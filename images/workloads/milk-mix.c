// SPDX-License-Identifier: Apache-2.0
/*
 * milk-mix: a starvation mix that checks its own results.
 *
 * Runs, together, for SECONDS seconds:
 *   - two sched_yield() loops (they never block),
 *   - two fork-and-wait loops (each child exits with a known status),
 *   - two pipe ping-pong pairs (each round trip echoes a sequence number).
 * Each is its own process; counters live in a shared anonymous mapping.
 * A scheduler that lets the yielding tasks keep their CPUs starves the
 * others, which shows as low fork and round-trip counts.
 *
 * Prints one line at the end:
 *
 *   milk-mix: seconds=4 elapsed_ms=4003 yields=... forks=... pipe_rtts=...
 *     yield0=... yield1=... fork0=... fork1=... pipe0=... pipe1=... errors=0
 *
 * (one line; wrapped here) and exits 0 only if every worker ran correctly:
 * every forked child's status was the one it was given, every echo carried
 * the sequence number that was sent and every worker exited 0.
 *
 * Usage: milk-mix [-s SECONDS]
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

#define PAIRS 2

struct shared {
	int stop;
	unsigned long yields[PAIRS];
	unsigned long forks[PAIRS];
	unsigned long rtts[PAIRS];
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

int main(int argc, char **argv)
{
	unsigned long seconds = 4, yields, forks, rtts, errors;
	pid_t pids[4 * PAIRS];
	int opt, i, n = 0, failed = 0;
	long long t0, elapsed;

	while ((opt = getopt(argc, argv, "s:")) != -1) {
		switch (opt) {
		case 's':
			seconds = workload_parse(argv[0], optarg, "seconds");
			break;
		default:
			fprintf(stderr, "usage: %s [-s SECONDS]\n", argv[0]);
			return 2;
		}
	}
	if (seconds == 0 || seconds > 3600) {
		fprintf(stderr, "%s: seconds must be 1..3600\n", argv[0]);
		return 2;
	}
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE,
		  MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED) {
		perror("milk-mix: mmap");
		return 1;
	}
	memset((void *)sh, 0, sizeof(*sh));
	t0 = workload_now_ms();
	for (i = 0; i < PAIRS; i++) {
		pids[n++] = spawn(yield_loop, i);
		pids[n++] = spawn(fork_loop, i);
		spawn_pair(i, &pids[n], &pids[n + 1]);
		n += 2;
	}
	printf("milk-mix: start seconds=%lu workers=%d\n", seconds, n);
	fflush(stdout);
	/* The deadline is the clock's, not the sleep's: a late wakeup counts. */
	while (workload_now_ms() - t0 < (long long)seconds * 1000)
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
	errors = LOAD(sh->errors) + failed;
	yields = sh->yields[0] + sh->yields[1];
	forks = sh->forks[0] + sh->forks[1];
	rtts = sh->rtts[0] + sh->rtts[1];
	/* One line: the host parses it. */
	printf("milk-mix: seconds=%lu elapsed_ms=%lld", seconds, elapsed);
	printf(" yields=%lu forks=%lu pipe_rtts=%lu", yields, forks, rtts);
	printf(" yield0=%lu yield1=%lu", sh->yields[0], sh->yields[1]);
	printf(" fork0=%lu fork1=%lu", sh->forks[0], sh->forks[1]);
	printf(" pipe0=%lu pipe1=%lu", sh->rtts[0], sh->rtts[1]);
	printf(" errors=%lu\n", errors);
	return errors ? 1 : 0;
}
