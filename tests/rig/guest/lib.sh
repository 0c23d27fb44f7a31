# shellcheck shell=bash
# Helpers for guest scenarios (sourced by /rig/run-scenario before the
# scenario). Environment from /init:
#   RIG_BOOT, RIG_BOOTS   this boot's number (1-based) and the boot count
#   RIG_DIMMS, RIG_LABELS emulated DIMMs and whether labels were written
#   RIG_DIMM_SIZE         bytes of each DIMM's region
#   RIG_RESULTS           directory saved to the host with --artifacts
#
# Output conventions: "ok N - what" / "not ok N - what" per check (counted by
# the host), "## text" for progress.

ND=/sys/bus/nd/devices
RIG_CHECKS=0
RIG_FAILED=0
RIG_CLEANUPS=()

# Indent a command's output as a comment: cmd | indent
indent() { sed 's/^/#   /'; }

log() { printf '## [%s] %s\n' "$(rig_uptime)" "$*"; }
rig_uptime() { local up _; read -r up _ </proc/uptime; echo "${up}s"; }

# ok WHAT / not_ok WHAT
ok() {
    RIG_CHECKS=$((RIG_CHECKS + 1))
    printf 'ok %d - %s\n' "$RIG_CHECKS" "$*"
}
not_ok() {
    RIG_CHECKS=$((RIG_CHECKS + 1))
    RIG_FAILED=$((RIG_FAILED + 1))
    printf 'not ok %d - %s\n' "$RIG_CHECKS" "$*"
}

# fail WHAT: a failed check that ends the scenario.
fail() {
    not_ok "$*"
    exit 1
}

# check WHAT CMD [ARG...]: run CMD; a failure ends the scenario (after
# printing the command's output).
check() {
    local what=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    if ((rc == 0)); then
        ok "$what"
    else
        printf '%s\n' "$out" | sed 's/^/#   /'
        fail "$what (exit $rc: $*)"
    fi
}

# expect_eq WHAT ACTUAL EXPECTED
expect_eq() {
    if [[ $2 == "$3" ]]; then
        ok "$1"
    else
        fail "$1: got '$2', expected '$3'"
    fi
}

# Register a command run at exit (last registered runs first).
on_exit() { RIG_CLEANUPS+=("$*"); }

rig_on_error() {
    local rc=$1 line=$2 cmd=$3
    printf '# error: line %s: %s (exit %s)\n' "$line" "$cmd" "$rc"
}

rig_on_exit() {
    local rc=$1 i
    set +e
    trap - ERR
    for ((i = ${#RIG_CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${RIG_CLEANUPS[i]}" || printf '# cleanup failed: %s\n' "${RIG_CLEANUPS[i]}"
    done
    if ((rc != 0)); then
        echo "# dmesg (last 30 lines):"
        dmesg | tail -n 30 | sed 's/^/#   /'
        dmesg >"$RIG_RESULTS/dmesg-on-failure.txt" 2>/dev/null
    fi
    printf '# boot %s: %d checks, %d failed, exit %d\n' "$RIG_BOOT" "$RIG_CHECKS" "$RIG_FAILED" "$rc"
    exit "$rc"
}

# Wait up to SECONDS for a command to succeed: wait_for SECONDS CMD [ARG...]
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

# --- NVDIMM helpers --------------------------------------------------------

# Region directories, sorted: /sys/bus/nd/devices/region0 ...
regions() { ls -d "$ND"/region* 2>/dev/null | sort -V; }

# ns_create REGION SIZE NAME [MODE]: an fsdax (default) namespace; prints
# ndctl's JSON.
ns_create() {
    local region=$1 size=$2 name=$3 mode=${4:-fsdax}
    ndctl create-namespace --region="$region" --size="$size" --name="$name" --mode="$mode"
}

# The block device of the namespace named NAME ("" if none).
ns_blockdev() {
    ndctl list --namespaces | jq -r --arg n "$1" '[.[]? // . | select(.name == $n)][0].blockdev // empty'
}

# ns_json NAME: ndctl's JSON for the namespace named NAME.
ns_json() {
    ndctl list --namespaces | jq -c --arg n "$1" '[.[]? // . | select(.name == $n)][0] // empty'
}

# mount_dax DEV DIR [FSTYPE]: mount with -o dax and confirm DAX from
# /proc/mounts (ext4 prints nothing about DAX in the kernel log).
mount_dax() {
    local dev=$1 dir=$2 fstype=${3:-}
    mkdir -p "$dir"
    mount ${fstype:+-t "$fstype"} -o dax "$dev" "$dir"
    dax_mounted "$dir"
}

# umount_if_mounted DIR (for on_exit).
umount_if_mounted() { ! mountpoint -q "$1" || umount "$1"; }

# dax_mounted DIR: true when DIR is mounted with dax (dax=always or dax).
dax_mounted() {
    awk -v d="$1" '$2 == d { n = split($4, o, ","); for (i = 1; i <= n; i++) if (o[i] == "dax" || o[i] == "dax=always") f = 1 } END { exit !f }' /proc/mounts
}

# Modules can be loaded on demand too: mount does it through request_module.
rig_modprobe() { modprobe -a "$@"; }
