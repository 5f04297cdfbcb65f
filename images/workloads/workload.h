/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Helpers shared by the guest workloads (each workload is one static
 * binary; this header is compiled into each of them).
 */
#ifndef MILK_WORKLOAD_H
#define MILK_WORKLOAD_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Parses a decimal argument or exits with status 2 naming @what. */
static inline unsigned long workload_parse(const char *prog, const char *s,
					   const char *what)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 10);
	if (errno || *end || end == s) {
		fprintf(stderr, "%s: bad %s: %s\n", prog, what, s);
		exit(2);
	}
	return v;
}

/* CLOCK_MONOTONIC in milliseconds. */
static inline long long workload_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

#endif /* MILK_WORKLOAD_H */
