#!/usr/bin/env bash
# Linux boot checks of the vmm binary, run INSIDE the nested test host (ci/vmm-boot-test
# starts it through ci/testhost-run). For each case it boots a guest image, drives the
# guest agent over the console and checks:
#   - the kernel reaches init (console output reaches the host),
#   - virtio_mmio bound the LNRO0005 device (/sys/bus/platform/drivers/virtio-mmio/),
#   - the virtio device is visible (device id 4, the entropy device) and the vCPU count,
#   - `poweroff -f` ends the VMM with status 0, `reboot -f` with status 2.
# It also reports boot-to-init times: host wall time from process start to the kernel's
# "Run /init" line, and the guest's own timestamp on that line.
#
#   linux-boot.sh [--vmm PATH] [--qemu] CASE...
#   CASE = KERNEL:CPUS:ACTION, e.g. 6.1:1:poweroff 6.12:2:reboot
#   --qemu  also time QEMU (-machine q35 and -machine microvm) on the same images
#
# Prints "linux-boot: N passed, M failed" and exits non-zero if any case failed.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
IMAGES=${GUEST_DIR:-$ROOT/target/guest}/images
VMM=${CARGO_TARGET_DIR:-$ROOT/target}/release/vmm
QEMU=0
cases=()
while [ $# -gt 0 ]; do
    case "$1" in
    --vmm) VMM=$2; shift 2 ;;
    --qemu) QEMU=1; shift ;;
    *) cases+=("$1"); shift ;;
    esac
done
[ ${#cases[@]} -gt 0 ] || cases=(6.1:1:poweroff 6.1:2:reboot 6.12:1:reboot 6.12:2:poweroff)
LOGDIR=${LOGDIR:-${GUEST_DIR:-$ROOT/target/guest}/results/linux-boot}
mkdir -p "$LOGDIR"
FIFODIR=$(mktemp -d /tmp/linux-boot.XXXXXX) # fifos: not on the 9p share
trap 'rm -rf "$FIFODIR"' EXIT
MEM=512M
CMDLINE="console=ttyS0 panic=-1"
TIMEOUT=${BOOT_TIMEOUT:-240}

passed=0
failed=0
results=()

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# drive NAME EXPECTED_CPUS ACTION CMD... : runs CMD as a coprocess, drives the agent.
# Sets: R_INIT_MS R_GUEST_INIT R_READY_MS R_BOUND R_DEVID R_CPUS R_STATUS R_LASTLINE
drive() {
    local name=$1 want_cpus=$2 action=$3
    shift 3
    local log=$LOGDIR/$name.log
    R_INIT_MS="" R_GUEST_INIT="" R_READY_MS="" R_BOUND="" R_DEVID="" R_CPUS="" R_STATUS=""
    local start step=0 line deadline rc pid in out
    local fin=$FIFODIR/$name.in fout=$FIFODIR/$name.out
    rm -f "$fin" "$fout" "$log"
    mkfifo "$fin" "$fout"
    start=$(now_ms)
    deadline=$((start + TIMEOUT * 1000))
    "$@" <"$fin" >"$fout" 2>&1 &
    pid=$!
    exec {in}>"$fin" {out}<"$fout"
    send() { echo "$*" >&"$in"; }
    while :; do
        if IFS= read -r -t 10 line <&"$out"; then
            line=${line%$'\r'}
            echo "$line" >>"$log"
            case "$line" in
            *"Run /init as init process"*)
                R_INIT_MS=$(($(now_ms) - start))
                R_GUEST_INIT=$(echo "$line" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p') ;;
            "AGENT ready"*)
                R_READY_MS=$(($(now_ms) - start))
                send "sh ls /sys/bus/platform/drivers/virtio-mmio/"
                step=1 ;;
            "AGENT out msg=LNRO0005:"*) R_BOUND=${line#AGENT out msg=} ;;
            "AGENT out msg=devid="*) R_DEVID=${line#AGENT out msg=devid=} ;;
            "AGENT out msg=cpus="*) R_CPUS=${line#AGENT out msg=cpus=} ;;
            "AGENT done cmd=sh"*)
                case $step in
                1) send "sh echo devid=\$(cat /sys/bus/virtio/devices/virtio0/device)"; step=2 ;;
                2) send "sh echo cpus=\$(grep -c ^processor /proc/cpuinfo)"; step=3 ;;
                3) send "$action"; step=4 ;;
                esac ;;
            esac
        else
            rc=$?
            # > 128: timed out waiting for a line; otherwise end of output.
            [ $rc -gt 128 ] || break
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            # The evidence first: the VMM's state dump (vCPUs, serial, interrupt
            # controllers) on its stderr, which goes to the same log.
            echo "linux-boot: $name: timed out after ${TIMEOUT}s; asking the VMM for its state (SIGUSR1)" >>"$log"
            kill -USR1 "$pid" 2>/dev/null
            while IFS= read -r -t 5 line <&"$out"; do
                echo "${line%$'\r'}" >>"$log"
                case "$line" in "vmm-dump: end"*) break ;; esac
            done
            echo "linux-boot: $name: timed out after ${TIMEOUT}s, killing it" >>"$log"
            kill "$pid" 2>/dev/null
            break
        fi
    done
    exec {in}>&- {out}<&-
    wait "$pid" 2>/dev/null
    R_STATUS=$?
    rm -f "$fin" "$fout"
    R_LASTLINE=$(tail -n 1 "$log" 2>/dev/null)
}

check() { # name condition message
    if eval "$2"; then
        return 0
    fi
    echo "linux-boot: $1: FAILED: $3" >&2
    return 1
}

for c in "${cases[@]}"; do
    IFS=: read -r kver cpus action <<<"$c"
    img=$IMAGES/guest-$kver
    name=vmm-$kver-${cpus}cpu-$action
    want_status=0
    [ "$action" = reboot ] && want_status=2
    # No retry: a guest that hangs under our VMM is a failure of ours until proven
    # otherwise; the log keeps the VMM's state dump taken at the timeout.
    drive "$name" "$cpus" "$action" "$VMM" run --kernel "$img/vmlinuz" --initrd "$img/initrd.img" \
        --cmdline "$CMDLINE" --memory "$MEM" --cpus "$cpus"
    ok=1
    check "$name" '[ -n "$R_INIT_MS" ]' "kernel never reached init (see $LOGDIR/$name.log)" || ok=0
    check "$name" '[ -n "$R_READY_MS" ]' "guest agent never became ready" || ok=0
    check "$name" '[ -n "$R_BOUND" ]' "virtio_mmio did not bind an LNRO0005 device" || ok=0
    check "$name" '[ "$R_DEVID" = 0x0004 ]' "virtio0 device id '$R_DEVID', want 0x0004" || ok=0
    check "$name" '[ "$R_CPUS" = "$cpus" ]' "guest sees '$R_CPUS' CPUs, want $cpus" || ok=0
    check "$name" '[ "$R_STATUS" = "$want_status" ]' "vmm exit status $R_STATUS after $action, want $want_status (last line: $R_LASTLINE)" || ok=0
    if [ $ok = 1 ]; then
        passed=$((passed + 1))
        echo "linux-boot: $name: ok (bound $R_BOUND, exit $R_STATUS)"
    else
        failed=$((failed + 1))
        tail -n 30 "$LOGDIR/$name.log" >&2
    fi
    results+=("$(printf '%-28s init %6s ms wall, guest %ss; agent ready %6s ms' "$name" "${R_INIT_MS:--}" "${R_GUEST_INIT:--}" "${R_READY_MS:--}")")
done

if [ $QEMU = 1 ]; then
    for c in "${cases[@]}"; do
        IFS=: read -r kver cpus _ <<<"$c"
        img=$IMAGES/guest-$kver
        for machine in q35 microvm; do
            name=qemu-$machine-$kver-${cpus}cpu
            drive "$name" "$cpus" poweroff qemu-system-x86_64 -enable-kvm -cpu host -machine "$machine" \
                -m "$MEM" -smp "$cpus" -nodefaults -no-user-config -display none -serial stdio \
                -monitor none -no-reboot -kernel "$img/vmlinuz" -initrd "$img/initrd.img" \
                -append "$CMDLINE"
            results+=("$(printf '%-28s init %6s ms wall, guest %ss; agent ready %6s ms' "$name" "${R_INIT_MS:--}" "${R_GUEST_INIT:--}" "${R_READY_MS:--}")")
        done
    done
fi

echo "linux-boot: boot-to-init times (test host under TCG, nested KVM; memory $MEM):"
for r in "${results[@]}"; do echo "  $r"; done
echo "linux-boot: logs in $LOGDIR"
echo "linux-boot: $passed passed, $failed failed"
[ $failed = 0 ]
