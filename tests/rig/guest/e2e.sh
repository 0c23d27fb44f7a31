# shellcheck shell=bash
# Guest-side end-to-end runner: starts pmem-agent in the guest and drives it
# over its sockets with our CSI client (pmemctl), so that scenarios exercise
# the real daemon against the guest's kernel (sim backend now; the direct
# and LVM modes on the emulated NVDIMMs once they exist).
#
#   agent_start [AGENT-ARG...]   start the daemon, wait until Probe is ready
#   agent_start_refused [ARG...] start it over a refused ledger: wait until
#                                the admin API answers in recovery
#   lost_ledger_rebuild N        (agent stopped) move the ledger aside, check
#                                the refusal, rebuild N volumes with
#                                pmemctl ledger rebuild (dry run, --apply)
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
        --node-id "$E2E_NODE_ID" --backend "$E2E_BACKEND" --log-format text
        # Staging and publish paths of the scenarios live under /mnt; the
        # agent confines every request path beneath its kubelet root.
        --kubelet-root "${E2E_KUBELET_ROOT:-/mnt}")
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

# agent_start_refused: like agent_start, for a daemon that must come up in
# recovery (ledger refused): waits until `pmemctl ledger status` reports it.
agent_start_refused() {
    mkdir -p "$E2E_RUN_DIR" "$E2E_STATE_DIR"
    local args=(--endpoint "$E2E_CSI" --admin-endpoint "$E2E_ADMIN" --state-dir "$E2E_STATE_DIR"
        --node-id "$E2E_NODE_ID" --backend "$E2E_BACKEND" --log-format text)
    # shellcheck disable=SC2206
    args+=(${E2E_AGENT_ARGS:-} "$@")
    log "starting pmem-agent ${args[*]} (expecting a refused ledger)"
    pmem-agent "${args[@]}" >>"$E2E_LOG" 2>&1 &
    AGENT_PID=$!
    on_exit agent_stop_quiet
    local t0=$SECONDS st
    # `ledger status` exits 1 while refused: that is what we wait for.
    until st=$(pmemctl_admin --json ledger status 2>/dev/null || true) &&
        [[ -n $(jq -r '.refused // empty' <<<"$st" 2>/dev/null) ]]; do
        if ! kill -0 "$AGENT_PID" 2>/dev/null; then
            AGENT_PID=
            agent_log_tail
            fail "pmem-agent exited instead of starting in recovery"
        fi
        if ((SECONDS - t0 > ${E2E_START_TIMEOUT:-30})); then
            agent_log_tail
            fail "pmem-agent did not report a refused ledger after ${E2E_START_TIMEOUT:-30}s"
        fi
        sleep 0.1
    done
    ok "pmem-agent in recovery (pid $AGENT_PID): $(jq -r .refused <<<"$st" | cut -c1-160)"
}

# lost_ledger_rebuild N: with the agent stopped, the ledger is lost (moved
# aside); the next start must refuse it, and `pmemctl ledger rebuild`
# must re-create exactly N volumes from the devices' markers.
lost_ledger_rebuild() {
    local n=$1 out dry
    mkdir -p "$E2E_STATE_DIR/lost"
    mv "$E2E_STATE_DIR"/ledger.db* "$E2E_STATE_DIR/lost/"
    agent_start_refused
    holds "Probe is not ready in recovery" bash -c "! pmemctl --endpoint $E2E_CSI identity >/dev/null"
    out=$(csi create after-loss --size 16MiB 2>&1) && fail "CreateVolume over a refused ledger succeeded"
    grep -q "FailedPrecondition" <<<"$out" && grep -q "pmemctl ledger rebuild" <<<"$out" ||
        { indent <<<"$out"; fail "CreateVolume over a refused ledger: wrong refusal"; }
    ok "CreateVolume refused with the recovery hint"
    check "the log says LEDGER REFUSED" grep -q "LEDGER REFUSED" "$E2E_LOG"
    dry=$(pmemctl_admin --json ledger rebuild) || fail "ledger rebuild (dry run)"
    expect_eq "dry run: nothing applied" "$(jq -r .applied <<<"$dry")" false
    expect_eq "dry run lists $n volumes" "$(jq '.volumes | length' <<<"$dry")" "$n"
    pmemctl_admin ledger rebuild | indent
    out=$(pmemctl_admin --json ledger rebuild --apply) || fail "ledger rebuild --apply"
    expect_eq "rebuild applied" "$(jq -r .applied <<<"$out")" true
    expect_eq "rebuilt $n volumes" "$(jq '.volumes | length' <<<"$out")" "$n"
    local t0=$SECONDS
    until pmemctl_csi identity >/dev/null 2>&1; do
        ((SECONDS - t0 > 30)) && { agent_log_tail; fail "not ready 30s after the rebuild"; }
        sleep 0.1
    done
    ok "ready after the rebuild"
    expect_eq "the ledger's volumes are the rebuilt ones" \
        "$(pmemctl_admin --json volumes | jq -r '[.[].id] | sort | join(",")')" \
        "$(jq -r '[.volumes[].id] | sort | join(",")' <<<"$out")"
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
