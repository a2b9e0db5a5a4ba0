#!/bin/busybox sh
# PID 1 of the guest (L2) image: loads the virtio modules, then runs the test agent.
# The agent reads commands line by line from the serial console (ttyS0) and answers with
# machine-readable lines "AGENT <kind> key=value ... [msg=free text to end of line]".
# Protocol: guest-tests/README.md. Every command ends with "AGENT done cmd=<name> ...".

/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /data /tmp
# tmpfs sizes default to 50% of the RAM at mount time; the data must be able to grow into
# hotplugged memory, so give an explicit, generous limit.
mount -t tmpfs -o size=64g,mode=0755 data /data
mount -t tmpfs tmpfs /tmp

if [ -c /dev/ttyS0 ]; then
    exec </dev/ttyS0 >/dev/ttyS0 2>&1
fi
# Commands come from a program, not a person: no echo, no CR on output.
stty -echo -onlcr 2>/dev/null

up() { read -r UP _ </proc/uptime; }

say() {
    up
    echo "AGENT $* t=$UP"
}

# MemTotal before virtio_mem can add anything (after a reboot with a request pending, the
# driver plugs memory as soon as it probes).
BOOT_MEMTOTAL=0
while read -r k v _; do
    [ "$k" = "MemTotal:" ] && BOOT_MEMTOTAL=$v
done </proc/meminfo

# Modules, in dependency order (etc/modules lists "name status" from the builder:
# status "module" = lib/modules/<name>.ko, "builtin" = compiled into the kernel).
while read -r name status; do
    [ -z "$name" ] && continue
    if [ "$status" = builtin ]; then
        say "module name=$name status=builtin"
    elif insmod "/lib/modules/$name.ko" 2>/tmp/insmod.err; then
        say "module name=$name status=loaded"
    else
        say "module name=$name status=failed msg=$(tr '\n' ' ' </tmp/insmod.err)"
    fi
done </etc/modules

meminfo_kb() { # $1 = field name (MemTotal, MemFree, ...)
    while read -r k v _; do
        if [ "$k" = "$1:" ]; then echo "$v"; return; fi
    done </proc/meminfo
    echo 0
}

block_size_hex() { cat /sys/devices/system/memory/block_size_bytes 2>/dev/null || echo 0; }

report_meminfo() {
    say "meminfo memtotal_kb=$(meminfo_kb MemTotal) memfree_kb=$(meminfo_kb MemFree) memavail_kb=$(meminfo_kb MemAvailable) shmem_kb=$(meminfo_kb Shmem)"
}

report_blocks() {
    say "blocksize bytes=0x$(block_size_hex) auto_online=$(cat /sys/devices/system/memory/auto_online_blocks 2>/dev/null)"
    for d in /sys/devices/system/memory/memory*; do
        [ -d "$d" ] || continue
        id=${d##*/memory}
        state=$(cat "$d/state" 2>/dev/null)
        zones=$(cat "$d/valid_zones" 2>/dev/null | tr ' ' ',')
        echo "AGENT block id=$id state=$state zones=$zones"
    done
}

report_zones() {
    # /proc/zoneinfo: "Node 0, zone   Normal" then "present N" / "managed N" (4 KiB pages).
    zone=""
    while read -r a b c d _; do
        case "$a" in
        Node) zone=$d ;;
        present) [ -n "$zone" ] && present=$b ;;
        managed)
            [ -n "$zone" ] && echo "AGENT zone name=$zone present_pages=$present managed_pages=$b"
            zone="" ;;
        esac
    done </proc/zoneinfo
}

report_iomem() {
    grep -i -E 'virtio' /proc/iomem | while read -r line; do
        range=${line%% : *}
        name=${line#* : }
        range=$(echo "$range" | tr -d ' ')
        echo "AGENT iomem start=0x${range%-*} end=0x${range#*-} msg=$name"
    done
}

report_dmesg() { # $1 = pattern (egrep), default: virtio_mem lines and bad signs; $2 = last N only
    pat=${1:-'virtio_mem|virtio-mem|WARNING:|BUG:|Oops|Call Trace|onlining denied|marking device broken|allocation failure|Out of memory|guest-agent:'}
    # The tail comes before the shell loop: a loop over every match costs a few ms a line
    # under nested emulation, and a soak's log grows by two matches a cycle.
    dmesg | grep -E "$pat" | tail -n "${2:-1000000}" | while read -r line; do
        echo "AGENT dmesg msg=$line"
    done
}

cmd_report() {
    report_meminfo
    report_blocks
    report_zones
    report_iomem
    report_dmesg
}

cmd_fill() { # $1 = MiB, $2 = "nosum" to skip the checksum
    n=${1:-0}
    rm -f /data/fill /data/fill.sum
    up; start=$UP
    # Random data (never zeros: a discarded page reads back as zeros and changes the sum).
    # A 4 MiB random seed appended after a per-chunk header (which shifts it, so pages
    # differ between chunks) is far cheaper than /dev/urandom for every byte. Appending
    # with cat, not through a pipe: pipes are slow in the nested guest.
    if ! dd if=/dev/urandom of=/tmp/seed bs=1M count=4 2>/tmp/dd.err; then
        say "fill ok=0 mib=$n msg=$(tr '\n' ' ' </tmp/dd.err)"
        return
    fi
    : >/data/fill
    i=0
    while [ "$i" -lt "$n" ]; do
        echo "chunk $i" >>/data/fill
        if ! cat /tmp/seed >>/data/fill 2>/tmp/dd.err; then
            rm -f /tmp/seed
            say "fill ok=0 mib=$n msg=at $i MiB: $(tr '\n' ' ' </tmp/dd.err)"
            return
        fi
        i=$((i + 4))
    done
    rm -f /tmp/seed
    up; written=$UP
    if [ "$2" = nosum ]; then
        say "fill ok=1 mib=$n t_start=$start t_written=$written"
        return
    fi
    sum=$(md5sum /data/fill)
    sum=${sum%% *}
    echo "$sum" >/data/fill.sum
    say "fill ok=1 mib=$n sum=$sum t_start=$start t_written=$written"
}

cmd_verify() {
    if [ ! -f /data/fill ]; then
        say "verify ok=0 msg=no data (run fill first)"
        return
    fi
    want=$(cat /data/fill.sum)
    sum=$(md5sum /data/fill)
    sum=${sum%% *}
    if [ "$sum" = "$want" ]; then
        say "verify ok=1 sum=$sum"
    else
        say "verify ok=0 sum=$sum want=$want"
    fi
}

cmd_online() { # $1 = online_movable | online_kernel | online
    how=${1:-online_movable}
    ok=0
    failed=0
    for d in /sys/devices/system/memory/memory*; do
        [ "$(cat "$d/state" 2>/dev/null)" = offline ] || continue
        if echo "$how" >"$d/state" 2>/dev/null; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
        fi
    done
    say "onlined how=$how count=$ok failed=$failed"
}

cmd_wait_mem() { # $1 = target MemTotal kB, $2 = timeout s, $3 = eq|ge|le
    target=$1
    timeout=${2:-60}
    how=${3:-eq}
    up; deadline=${UP%.*}
    deadline=$((deadline + timeout))
    while :; do
        m=$(meminfo_kb MemTotal)
        case "$how" in
        ge) [ "$m" -ge "$target" ] && break ;;
        le) [ "$m" -le "$target" ] && break ;;
        *) [ "$m" -eq "$target" ] && break ;;
        esac
        up
        if [ "${UP%.*}" -ge "$deadline" ]; then
            say "mem_timeout memtotal_kb=$m target_kb=$target"
            return
        fi
        sleep 0.02
    done
    # Mark the moment in the kernel log too, so latencies are measured on one clock
    # (printk time) against the driver's "requested size:" line.
    echo "guest-agent: mem_reached memtotal_kb=$m" >/dev/kmsg 2>/dev/null
    say "mem_reached memtotal_kb=$m target_kb=$target"
}

cmd_sh() {
    sh -c "$*" 2>&1 | while read -r line; do
        echo "AGENT out msg=$line"
    done
}

up
say "ready kernel=$(uname -r) boot_memtotal_kb=$BOOT_MEMTOTAL memtotal_kb=$(meminfo_kb MemTotal) blocksize=0x$(block_size_hex) cmdline=$(tr ' ' ',' </proc/cmdline)"

while :; do
    if ! read -r cmd args; then
        # Console closed or hung up: keep PID 1 alive, retry.
        sleep 1
        continue
    fi
    case "$cmd" in
    "") continue ;;
    ping) ;;
    report) cmd_report ;;
    meminfo) report_meminfo ;;
    blocks) report_blocks ;;
    zones) report_zones ;;
    iomem) report_iomem ;;
    dmesg) report_dmesg "$args" ;;
    dmesg_all) report_dmesg '.' ;;
    # The last N matching lines: a long soak asks after every resize, and the whole
    # log's matches grow with every cycle (over a serial console, quadratically).
    dmesg_tail) report_dmesg "${args#* }" "${args%% *}" ;;
    fill) cmd_fill $args ;;
    verify) cmd_verify ;;
    # Truncating with a builtin redirection frees the pages without forking: under
    # memory pressure (pressure scenario) a fork may be impossible.
    free) : >/data/fill; rm -f /data/fill /data/fill.sum ;;
    online_movable) cmd_online online_movable ;;
    online_kernel) cmd_online online_kernel ;;
    online) cmd_online online ;;
    wait_mem) cmd_wait_mem $args ;;
    sh) cmd_sh "$args" ;;
    mark) echo "guest-agent: $args" >/dev/kmsg ;;
    reboot) say "done cmd=reboot"; sync; reboot -f ;;
    poweroff) say "done cmd=poweroff"; sync; poweroff -f ;;
    *) say "error msg=unknown command: $cmd" ;;
    esac
    say "done cmd=$cmd"
done
