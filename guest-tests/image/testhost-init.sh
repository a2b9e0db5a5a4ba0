#!/bin/busybox sh
# PID 1 of the nested test host (L1), started by ci/testhost-run.
# Mounts the host's / (9p tag "host", read-only) at /host, the writable shares
# (9p tags rw0, rw1, ... at the host paths given by th.rw=PATH:PATH...) on top of it,
# loads kvm_amd, chroots into /host and runs the script th.script=PATH with bash.
# Prints "TESTHOST-EXIT status=N" and writes N to th.status=PATH, then powers off.

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1

fail() {
    echo "TESTHOST-ERROR $*"
    echo "TESTHOST-EXIT status=125"
    poweroff -f
}

script=""
status_file=""
rw=""
keep=""
kvm_amd_opts=""
pin=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    th.script=*) script=${arg#th.script=} ;;
    th.status=*) status_file=${arg#th.status=} ;;
    th.rw=*) rw=${arg#th.rw=} ;;
    th.keep=*) keep=${arg#th.keep=} ;;
    th.kvm_amd=*) kvm_amd_opts=$(echo "${arg#th.kvm_amd=}" | tr ',' ' ') ;;
    th.pin=*) pin=${arg#th.pin=} ;;
    esac
done

# The kernel booted on one CPU (maxcpus=1, so that nothing ran the code it rewrote while
# booting); the others come up now, before anything runs on them.
for cpu in /sys/devices/system/cpu/cpu[0-9]*; do
    [ -f "$cpu/online" ] && [ "$(cat "$cpu/online")" = 0 ] && echo 1 >"$cpu/online"
done
ncpu=$(grep -c '^processor' /proc/cpuinfo)

# The heartbeat: a line every 2 s on the second serial port (ttyS1) from each L1 CPU, by
# a loop pinned to that CPU that is not the command, so ci/testhost-run can tell a hung
# test host (no CPU beats) from a command that is only quiet (the beats go on), and one
# CPU of L1 that stopped (its timer lost: that CPU's beats stop, the others' go on) from
# both. Each line carries the CPU, L1's uptime and load, and how many bytes L1's console
# UART (ttyS0, which carries the command's output) has sent and received.
if [ -c /dev/ttyS1 ]; then
    cpu=0
    while [ "$cpu" -lt "$ncpu" ]; do
        # shellcheck disable=SC2016
        taskset "$(printf '%x' $((1 << cpu)))" sh -c '
            while :; do
                read -r up _ </proc/uptime
                read -r l1 _ </proc/loadavg
                uart=$(grep "^0:" /proc/tty/driver/serial 2>/dev/null | grep -o "[tr]x:[0-9]*" | tr "\n" " ")
                echo "hb cpu=$1 uptime=$up load=$l1 ttyS0 $uart"
                sleep 2
            done' hb "$cpu" >/dev/ttyS1 2>&1 &
        cpu=$((cpu + 1))
    done
fi

while read -r name status; do
    [ -z "$name" ] && continue
    [ "$status" = builtin ] && continue
    opts=""
    [ "$name" = kvm-amd ] && opts=$kvm_amd_opts
    # shellcheck disable=SC2086
    insmod "/lib/modules/$name.ko" $opts || echo "TESTHOST-WARN insmod $name $opts failed"
done </etc/modules
echo "TESTHOST-INFO kernel=$(uname -r) cpus=$ncpu kvm_amd: ${kvm_amd_opts:-defaults}"
[ -n "$script" ] || fail "no th.script= on the kernel command line"

mkdir -p /host /orig
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /host ||
    fail "cannot mount the host share (tag host)"
# The host's /tmp stays reachable under /orig/tmp: a tmpfs goes on /tmp, and paths that
# must stay visible (th.keep=, the caller's directory when it lives in /tmp) are bound
# back on top of it.
mkdir -p /orig/tmp
mount -o bind /host/tmp /orig/tmp
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm 2>/dev/null
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t tmpfs tmpfs /host/tmp
mount -t tmpfs tmpfs /host/run
mount -t hugetlbfs hugetlbfs /host/dev/hugepages 2>/dev/null
for path in $(echo "$keep" | tr ':' ' '); do
    case "$path" in
    /tmp/*)
        mkdir -p "/host$path"
        mount -o bind "/orig$path" "/host$path" || fail "cannot keep $path visible"
        ;;
    esac
done
# Writable shares last, so they sit on top of everything above.
i=0
for path in $(echo "$rw" | tr ':' ' '); do
    mkdir -p "/host$path" 2>/dev/null
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=mmap "rw$i" "/host$path" ||
        fail "cannot mount writable share rw$i at $path"
    i=$((i + 1))
done

[ -c /host/dev/kvm ] || echo "TESTHOST-WARN /dev/kvm missing after loading kvm_amd"

# Hold KVM's APIC static keys on before any guest starts (ci/testhost-run says why); its
# ready line comes once they are held.
if [ -n "$pin" ]; then
    # Created before the job starts, so that the first check does not race its redirection.
    : >/pin.out
    chroot /host "$pin" >>/pin.out 2>&1 &
    i=0
    while ! grep -q "pinned" /pin.out && [ "$i" -lt 100 ] && kill -0 $! 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
    done
    grep -q "pinned" /pin.out || echo "TESTHOST-WARN kvm static keys not pinned: $(cat /pin.out)"
    cat /pin.out
fi

chroot /host /bin/bash "$script"
status=$?
echo "TESTHOST-EXIT status=$status"
[ -n "$status_file" ] && echo "$status" >"/host$status_file"
sync
i=0
for path in $(echo "$rw" | tr ':' ' '); do
    umount "/host$path" 2>/dev/null
done
poweroff -f
