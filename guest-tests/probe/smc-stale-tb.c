/* smc-stale-tb.c: does the CPU this runs on keep executing code that another CPU has
 * already rewritten, after the protocol the x86 manuals give for cross-modifying code?
 *
 * A writer thread (CPU 0) rewrites the immediate of `mov eax, imm32; ret` in an RWX page
 * with the values 1, 2, 3, ..., and after each store publishes the value it wrote. An
 * executor thread (CPU 1) calls that code in a loop: it reads the published value,
 * executes a serializing instruction (CPUID) and calls the code. Intel SDM vol. 3,
 * 9.1.3 ("Handling Self- and Cross-Modifying Code"): once the executor has seen the flag
 * and serialized, it must execute the new code, so the call returns at least the
 * published value. A smaller value is a stale instruction: on real CPUs never; under
 * QEMU 7.2's multi-threaded TCG, a translation block built from the old bytes stays
 * cached after the store (the writer's TLB entry loses its "page holds code" mark in a
 * race, or the store lands after its own invalidation: the three races that
 * ci/patches/qemu-7.2-smc-stale-tb.patch names), which is how the test host's guests ran
 * an `int3` Linux had already replaced (`Oops: int3`).
 *
 * Output, one line: "smc-probe: writes=N calls=M stale=K first=..." ; exit 0 when K is
 * 0, 1 when some call returned a stale value, 2 when the probe could not run. Built and
 * run inside the test host by ci/testhost-smc-probe; the first argument is the run time
 * in seconds (default 20).
 */
#include "probe.h"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* The immediate sits 4-aligned (offset 4) so that each rewrite is one aligned store, as
 * Linux's text_poke of one byte is. */
#define ENTRY 3
#define IMM 4

typedef uint32_t (*code_fn)(void);

static uint8_t *code;
static uint32_t published;
static uint32_t acked;
static int stop;
static uint64_t calls, stale;
static uint32_t first_seen, first_expected, last_seen, last_expected;

static void serialize(void)
{
    uint32_t a = 0, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d)::"memory");
}

static void *executor(void *arg)
{
    (void)arg;
    if (pin(1) != 0) {
        fprintf(stderr, "smc-probe: cannot pin the executor to CPU 1\n");
        exit(2);
    }
    code_fn fn = (code_fn)(void *)(code + ENTRY);
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        uint32_t expected = __atomic_load_n(&published, __ATOMIC_ACQUIRE);
        serialize();
        uint32_t seen = fn();
        calls++;
        if (seen < expected) {
            if (stale++ == 0) {
                first_seen = seen;
                first_expected = expected;
            }
            last_seen = seen;
            last_expected = expected;
        }
        __atomic_store_n(&acked, expected, __ATOMIC_RELEASE);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 20;
    code = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS,
                -1, 0);
    if (code == MAP_FAILED) {
        perror("smc-probe: mmap RWX");
        return 2;
    }
    memset(code, 0x90, 4096);
    code[ENTRY] = 0xb8; /* mov eax, imm32 */
    __atomic_store_n((uint32_t *)(code + IMM), 0, __ATOMIC_RELAXED);
    code[IMM + 4] = 0xc3; /* ret */
    if (pin(0) != 0) {
        fprintf(stderr, "smc-probe: cannot pin the writer to CPU 0 (needs 2 CPUs)\n");
        return 2;
    }
    pthread_t thread;
    if (pthread_create(&thread, NULL, executor, NULL) != 0) {
        fprintf(stderr, "smc-probe: cannot start the executor thread\n");
        return 2;
    }
    double end = now() + seconds;
    uint32_t value = 0;
    while (now() < end) {
        value++;
        __atomic_store_n((uint32_t *)(code + IMM), value, __ATOMIC_RELAXED);
        __atomic_store_n(&published, value, __ATOMIC_RELEASE);
        /* Lock-step: the next store waits until the executor has checked this one, so a
         * stale translation is caught before the next store would replace it. */
        double give_up = now() + 5;
        while (__atomic_load_n(&acked, __ATOMIC_ACQUIRE) < value) {
            if (now() > give_up) {
                fprintf(stderr, "smc-probe: the executor stopped answering\n");
                return 2;
            }
        }
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    pthread_join(thread, NULL);
    printf("smc-probe: writes=%u calls=%llu stale=%llu", value, (unsigned long long)calls,
           (unsigned long long)stale);
    if (stale)
        printf(" first=(returned %u after %u was published) last=(returned %u after %u)",
               first_seen, first_expected, last_seen, last_expected);
    printf("\n");
    return stale ? 1 : 0;
}
