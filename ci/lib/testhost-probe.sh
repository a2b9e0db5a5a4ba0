# Sourced by ci/testhost-smc-probe and ci/testhost-ignne-probe (which define die()): builds
# guest-tests/probe/NAME.c and runs it in a test host with 2 L1 CPUs.
#
#   testhost_probe NAME SECONDS CONFIG QEMU RETRIES [ci/testhost-run OPTIONS...]
#
# QEMU, when not empty, replaces the configuration's emulator (TESTHOST_QEMU). Sets
# probe_out (everything printed, without CRs), probe_status (ci/testhost-run's exit
# status), probe_qemu (the binary ci/testhost-run says it started) and probe_version;
# probe_last and probe_result then read probe_out.
testhost_probe() {
    local name=$1 seconds=$2 config=$3 qemu=$4 retries=$5 work=$GUEST_DIR/probes
    local run_env=()
    shift 5
    command -v gcc >/dev/null || die "gcc not found"
    mkdir -p "$work"
    gcc -O2 -Wall -Wextra -Werror -pthread -o "$work/$name" "guest-tests/probe/$name.c" ||
        die "building the probe failed"
    [ -z "$qemu" ] || run_env=(TESTHOST_QEMU="$qemu")
    probe_status=0
    probe_out=$(env "${run_env[@]}" ci/testhost-run --retries "$retries" --cpus 2 \
        --timeout $((seconds + 600)) --config "$config" "$@" -- "$work/$name" "$seconds" 2>&1 |
        tr -d '\r') || probe_status=$?
    probe_qemu=$(printf '%s\n' "$probe_out" | grep -a '^ci/testhost-run: qemu=' | tail -n 1 |
        sed -E 's/^ci\/testhost-run: qemu=([^ ]*).*/\1/' || true)
    [ -n "$probe_qemu" ] ||
        die "ci/testhost-run did not name the QEMU it ran (exit $probe_status): $(printf '%s\n' "$probe_out" | tail -n 5)"
    probe_version=$("$probe_qemu" --version 2>/dev/null | head -n 1) || probe_version="version unknown"
}

# Prints the last match of the extended regular expression $1 in probe_out (only the
# matched part, so '^name: .*' for a whole line), nothing when none.
probe_last() {
    printf '%s\n' "$probe_out" | grep -aoE "$1" | tail -n 1 || true
}

# As probe_last, but a probe that printed no such line dies with ci/testhost-run's exit
# status and the last lines printed, which say what went wrong instead.
probe_result() {
    local line
    line=$(probe_last "$1")
    [ -n "$line" ] ||
        die "no result from the probe (exit $probe_status): $(printf '%s\n' "$probe_out" | tail -n 5)"
    printf '%s\n' "$line"
}
