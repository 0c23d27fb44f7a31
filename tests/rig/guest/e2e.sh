# shellcheck shell=bash
# Guest-side end-to-end runner: starts pmem-agent in the guest and drives it
# over its sockets with our CSI client (pmemctl), so that scenarios exercise
# the real daemon against the guest's kernel (sim backend now; the direct
# and LVM modes on the emulated NVDIMMs once they exist).
#
#   agent_start [AGENT-ARG...]   start the daemon, wait until Probe is ready
#   agent_stop                   SIGTERM, wait, report the exit status
#   csi ARG...                   pmemctl --endpoint <csi socket> csi ARG...
#   pmemctl_csi ARG...           pmemctl --endpoint <csi socket> ARG...
#   pmemctl_admin ARG...         pmemctl --admin-endpoint <admin socket> ARG...
#
# Settings (environment):
#   E2E_BACKEND    --backend value (default sim)
#   E2E_STATE_DIR  --state-dir (default /var/lib/pmem-agent)
#   E2E_NODE_ID    --node-id (default rig-node)
#   E2E_AGENT_ARGS extra daemon arguments (word-split)
# The daemon's log is $RIG_RESULTS/agent.log (in --artifacts; its tail is
# printed when a step fails).

E2E_RUN_DIR=/run/pmem-agent
E2E_CSI_SOCK=$E2E_RUN_DIR/csi.sock
E2E_ADMIN_SOCK=$E2E_RUN_DIR/admin.sock
E2E_CSI=unix://$E2E_CSI_SOCK
E2E_ADMIN=unix://$E2E_ADMIN_SOCK
E2E_BACKEND=${E2E_BACKEND:-sim}
E2E_STATE_DIR=${E2E_STATE_DIR:-/var/lib/pmem-agent}
E2E_NODE_ID=${E2E_NODE_ID:-rig-node}
E2E_LOG=${RIG_RESULTS:-/tmp}/agent.log
AGENT_PID=

have_agent() { command -v pmem-agent >/dev/null && command -v pmemctl >/dev/null; }

pmemctl_csi() { pmemctl --endpoint "$E2E_CSI" "$@"; }
pmemctl_admin() { pmemctl --admin-endpoint "$E2E_ADMIN" "$@"; }
csi() { pmemctl --endpoint "$E2E_CSI" csi "$@"; }

agent_log_tail() {
    echo "# pmem-agent log (last ${1:-40} lines):"
    tail -n "${1:-40}" "$E2E_LOG" 2>/dev/null | sed 's/^/#   /'
}

agent_start() {
    have_agent || fail "pmem-agent/pmemctl are not in the guest (build them: cargo build --bins)"
    mkdir -p "$E2E_RUN_DIR" "$E2E_STATE_DIR"
    local args=(--endpoint "$E2E_CSI" --admin-endpoint "$E2E_ADMIN" --state-dir "$E2E_STATE_DIR"
        --node-id "$E2E_NODE_ID" --backend "$E2E_BACKEND" --log-format text)
    # shellcheck disable=SC2206
    args+=(${E2E_AGENT_ARGS:-} "$@")
    log "starting pmem-agent ${args[*]}"
    pmem-agent "${args[@]}" >>"$E2E_LOG" 2>&1 &
    AGENT_PID=$!
    on_exit agent_stop_quiet
    local t0=$SECONDS
    until pmemctl_csi identity >/dev/null 2>&1; do
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then
            local rc=0
            wait "$AGENT_PID" || rc=$?
            AGENT_PID=
            agent_log_tail
            fail "pmem-agent exited with status $rc during startup"
        fi
        if ((SECONDS - t0 > ${E2E_START_TIMEOUT:-30})); then
            agent_log_tail
            fail "pmem-agent not ready after ${E2E_START_TIMEOUT:-30}s"
        fi
        sleep 0.1
    done
    ok "pmem-agent ready (pid $AGENT_PID, $((SECONDS - t0))s)"
}

# agent_stop: graceful stop; fails the scenario when the daemon does not exit
# within 10 s or exits non-zero.
agent_stop() {
    [[ -n $AGENT_PID ]] || return 0
    local pid=$AGENT_PID rc=0 i
    AGENT_PID=
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        agent_log_tail
        fail "pmem-agent did not stop within 10s of SIGTERM"
    fi
    wait "$pid" || rc=$?
    if ((rc != 0)); then
        agent_log_tail
        fail "pmem-agent exited with status $rc after SIGTERM"
    fi
    ok "pmem-agent stopped cleanly"
}

# For the exit hook: stop without counting a check.
agent_stop_quiet() {
    [[ -n $AGENT_PID ]] || return 0
    kill -TERM "$AGENT_PID" 2>/dev/null
    sleep 0.5
    kill -KILL "$AGENT_PID" 2>/dev/null
    AGENT_PID=
    agent_log_tail 20
}

# ---- helpers shared by the e2e scenarios

# holds WHAT CMD...: a check on a condition, without an output to show.
holds() {
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

# ms_since T0: milliseconds since $EPOCHREALTIME was T0.
ms_since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%d", (b - a) * 1000 }'; }

# vol ID: the admin API's JSON for a volume.
vol() { pmemctl_admin --json volume "$1"; }

# wait_erased ID: DeleteVolume returns with the volume's extent `erasing`;
# waits until the background eraser zeroed it and removed the row (the
# extent is free then).
vol_gone() { ! vol "$1" >/dev/null 2>&1; }
wait_erased() {
    wait_for 300 vol_gone "$1" || fail "volume $1 still erasing after 300 s: $(vol "$1" | jq -c .)"
}

# delete ID: DeleteVolume, then wait for the background erase.
delete_erased() {
    csi delete "$1" >/dev/null || return 1
    wait_erased "$1"
}

# create NAME SIZE [ARGS...]: CreateVolume (eraseAfter false unless ARGS
# say otherwise); prints the JSON answer.
create() {
    local name=$1 size=$2
    shift 2
    [[ " $* " == *" --erase-after "* ]] || set -- --erase-after false "$@"
    pmemctl_csi --json csi create "$name" --size "$size" "$@"
}

# mount_state NAMESPACE: mounts the foreign namespace that keeps the agent's
# state directory across reboots.
mount_state() {
    local ns=$1 dev
    dev=/dev/$(ns_blockdev "$ns")
    [[ -b $dev ]] || fail "state namespace $ns has no block device"
    mkdir -p "$E2E_STATE_DIR"
    mount "$dev" "$E2E_STATE_DIR"
    on_exit umount_if_mounted "$E2E_STATE_DIR"
}
