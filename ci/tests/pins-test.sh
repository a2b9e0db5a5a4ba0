#!/usr/bin/env bash
# Tests ci/lib/pins.sh's fallback for pinned Debian versions that left the archive.
set -euo pipefail
cd "$(dirname "$0")/../.."
. ci/lib/pins.sh
fails=0
check() { # name expected actual
    if [ "$2" = "$3" ]; then echo "ok   $1"; else echo "FAIL $1: expected '$2', got '$3'"; fails=$((fails + 1)); fi
}
offered='qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3
qemu-system-x86 1:7.2+dfsg-7+deb12u15
linux-image-6.1.0-57-cloud-amd64 6.1.193-1
linux-image-6.1.0-58-cloud-amd64 6.1.194-1
linux-image-6.1.0-58-cloud-amd64 6.1.194-2
linux-image-6.12.120+deb13-cloud-amd64 6.12.120-1'

got=$(echo "$offered" | pin_choose qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3 2>/dev/null)
check "an offered pin is used" "qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3" "$got"

warn=$(echo "$offered" | pin_choose qemu-system-x86 1:7.2+dfsg-7+deb12u99 2>&1 >/dev/null)
got=$(echo "$offered" | pin_choose qemu-system-x86 1:7.2+dfsg-7+deb12u99 2>/dev/null)
check "a gone pin falls back to the newest version" "qemu-system-x86 1:7.2+dfsg-7+deb12u18+b3" "$got"
check "the fallback warns" "WARNING: pinned qemu-system-x86=1:7.2+dfsg-7+deb12u99 not offered, using qemu-system-x86=1:7.2+dfsg-7+deb12u18+b3" "$warn"

got=$(echo "$offered" | pin_choose linux-image-6.1.0-56-cloud-amd64 6.1.192-2 'linux-image-6\.1\.0-[0-9]+-cloud-amd64' 2>/dev/null)
check "a gone kernel ABI falls back within its series" "linux-image-6.1.0-58-cloud-amd64 6.1.194-2" "$got"

got=$(echo "$offered" | pin_choose linux-image-6.12.118+deb13-cloud-amd64 6.12.118-1 'linux-image-6\.12\.[0-9]+\+deb13-cloud-amd64' 2>/dev/null)
check "the 6.12 series falls back to 6.12" "linux-image-6.12.120+deb13-cloud-amd64 6.12.120-1" "$got"

rc=0
echo "$offered" | pin_choose busybox-static 1:1.35.0-4 2>/dev/null || rc=$?
check "nothing to fall back to fails" "1" "$rc"

[ "$fails" = 0 ] && echo "pins-test: 6 passed, 0 failed" || { echo "pins-test: $((6 - fails)) passed, $fails failed"; exit 1; }
