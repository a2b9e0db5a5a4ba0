/* ignne-race.c: does an FPU state load on one CPU undo what the first CPU's SVM
 * instructions did? The test host's lost wake-up, made to happen in seconds.
 *
 * QEMU 7.2's TCG models the chipset's IGNNE# pin as a bit in the first CPU's hflags2,
 * and every FPU environment load (FLDENV, FRSTOR, FXRSTOR, XRSTOR), on any vCPU's
 * thread, clears it with a plain read-modify-write of that CPU's hflags2, no lock, while
 * the first CPU's own thread changes SVM's GIF, HIF and VINTR in the same word at each
 * CLGI, VMRUN, #VMEXIT and STGI. A write-back that lands over an STGI leaves L1's CPU 0
 * with GIF clear: no interrupt, NMI or IPI reaches it again, and at its next idle `hlt`
 * it stops for good (seen as an L1 CPU halted with hflags2=0 by ci/testhost-run); one
 * that lands over a #VMEXIT leaves VINTR and HIF set, and L1 takes interrupts with IF=0
 * (an L1 hang). ci/patches/qemu-7.2-ignne-first-cpu-race.patch makes that write atomic.
 *
 * Here one thread, pinned to L1's CPU 0, runs a one-vCPU KVM guest that exits at each
 * instruction pair (`out 0x10, al; jmp back`), so L1's KVM runs CLGI, VMRUN and STGI
 * thousands of times a second there, and sleeps 100 us after each exit, so that CPU 0
 * goes idle with whatever GIF the last STGI left. Another, pinned to CPU 1, runs FXRSTOR
 * in a loop. A lost STGI stops CPU 0: the run count stops moving.
 *
 * Output, one line: "ignne-probe: runs=N fxrstors=M in S s" and exit 0 when CPU 0 kept
 * going, "ignne-probe: CPU 0 stopped after N runs ..." and exit 1 when it stopped (that
 * line may never get out, CPU 0 being gone: ci/testhost-ignne-probe also counts the test
 * host's own l1-cpu-stall or l1-hang as a stop), 2 when the probe could not run. Built
 * and run inside the test host by ci/testhost-ignne-probe; the first argument is the run
 * time in seconds (default 20).
 */
#include "probe.h"
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* Shared between the two threads through __atomic loads and stores: the guest thread
 * alone writes runs and failure, the main thread alone writes stop. */
static uint64_t runs;
static int stop;
static const char *failure;

static void fail(const char *why)
{
    __atomic_store_n(&failure, why, __ATOMIC_RELEASE);
}

static const char *failed(void)
{
    return __atomic_load_n(&failure, __ATOMIC_ACQUIRE);
}

/* CPU 0: a KVM guest in real mode at address 0 that exits to this thread at each OUT. */
static void *guest_loop(void *arg)
{
    static const uint8_t code[] = { 0xe6, 0x10, 0xeb, 0xfc }; /* out 0x10, al; jmp -4 */
    struct timespec pause = { 0, 100 * 1000 };
    struct kvm_userspace_memory_region region = { 0 };
    struct kvm_sregs sregs;
    struct kvm_regs regs = { 0 };
    struct kvm_run *run;
    int kvm, vm, vcpu, size;
    uint8_t *mem;

    (void)arg;
    if (pin(0) != 0) {
        fail("cannot pin to CPU 0");
        return NULL;
    }
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        fail("cannot open /dev/kvm");
        return NULL;
    }
    vm = ioctl(kvm, KVM_CREATE_VM, 0);
    mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (vm < 0 || mem == MAP_FAILED) {
        fail("cannot create the VM or its memory");
        return NULL;
    }
    memcpy(mem, code, sizeof(code));
    region.memory_size = 0x1000;
    region.userspace_addr = (uintptr_t)mem;
    vcpu = ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) == 0 ? ioctl(vm, KVM_CREATE_VCPU, 0) : -1;
    size = vcpu >= 0 ? ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0) : -1;
    run = size > 0 ? mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0) : MAP_FAILED;
    if (run == MAP_FAILED || ioctl(vcpu, KVM_GET_SREGS, &sregs) != 0) {
        fail("cannot create the vCPU");
        return NULL;
    }
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    regs.rip = 0;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) != 0 || ioctl(vcpu, KVM_SET_REGS, &regs) != 0) {
        fail("cannot set the vCPU's registers");
        return NULL;
    }
    while (!__atomic_load_n(&stop, __ATOMIC_ACQUIRE)) {
        if (ioctl(vcpu, KVM_RUN, 0) != 0 || run->exit_reason != KVM_EXIT_IO) {
            fail("KVM_RUN failed or exited for something else than the OUT");
            return NULL;
        }
        __atomic_store_n(&runs, runs + 1, __ATOMIC_RELEASE);
        nanosleep(&pause, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    static uint8_t area[512] __attribute__((aligned(16)));
    double seconds = argc > 1 ? atof(argv[1]) : 20, start, last_move;
    uint64_t fxrstors = 0, seen = 0;
    pthread_t guest;

    if (pin(1) != 0) {
        printf("ignne-probe: cannot pin to CPU 1 (needs 2 CPUs)\n");
        return 2;
    }
    __asm__ volatile("fxsave64 %0" : "=m"(area));
    if (pthread_create(&guest, NULL, guest_loop, NULL) != 0) {
        printf("ignne-probe: cannot start the guest thread\n");
        return 2;
    }
    start = last_move = now();
    while (now() - start < seconds) {
        for (int i = 0; i < 10000; i++)
            __asm__ volatile("fxrstor64 %0" ::"m"(area));
        fxrstors += 10000;
        const char *why = failed();
        if (why) {
            printf("ignne-probe: %s\n", why);
            return 2;
        }
        uint64_t latest = __atomic_load_n(&runs, __ATOMIC_ACQUIRE);
        if (latest != seen) {
            seen = latest;
            last_move = now();
        } else if (seen == 0 && now() - start > 10) {
            /* Creating the VM takes milliseconds: no first run is a setup problem. */
            printf("ignne-probe: the guest thread made no KVM run in 10 s\n");
            return 2;
        } else if (seen > 0 && now() - last_move > 5) {
            printf("ignne-probe: CPU 0 stopped after %llu runs (none for 5 s; %llu fxrstors)\n",
                   (unsigned long long)seen, (unsigned long long)fxrstors);
            fflush(stdout);
            _exit(1);
        }
    }
    __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
    pthread_join(guest, NULL);
    const char *why = failed();
    if (why) {
        printf("ignne-probe: %s\n", why);
        return 2;
    }
    printf("ignne-probe: runs=%llu fxrstors=%llu in %.0f s\n", (unsigned long long)runs,
           (unsigned long long)fxrstors, seconds);
    return runs > 0 ? 0 : 2;
}
