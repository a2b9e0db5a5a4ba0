/* probe.h: what the test host's C probes (smc-stale-tb.c, ignne-race.c) share. Each
 * probe is one translation unit built by ci/lib/testhost-probe.sh, so these are static.
 * Include it first: it defines _GNU_SOURCE, which pthread_setaffinity_np needs before any
 * system header. */
#ifndef PROBE_H
#define PROBE_H

#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <time.h>

/* Pins the calling thread to one CPU: the races the probes measure are between two
 * given L1 CPUs (the first CPU is special in the IGNNE one), so the scheduler must not
 * move them. Returns pthread_setaffinity_np's status (non-zero with fewer CPUs). */
static inline int pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* Seconds on the monotonic clock. */
static inline double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

#endif
