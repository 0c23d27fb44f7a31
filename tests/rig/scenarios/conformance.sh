# rig: agent=required boots=1 dimms=2 dimm-size=2G labels=1 timeout=360
# conformance: the CSI conformance cases (pmem-conformance, our rewrite of
# kubernetes-csi/csi-test pkg/sanity; see tests/conformance/cases.tsv)
# against pmem-agent --backend direct, then --backend lvm, on two labeled
# emulated regions of the guest's real libnvdimm. Budget: 6 minutes for both.
# The binary is not built into the rig: pass it in with
#   cargo build -p pmem-conformance
#   tests/rig/run conformance --extra-bin target/debug/pmem-conformance
# Each backend's report is in $RIG_RESULTS/conformance-<backend>.txt.

# A single-tenant test node (see direct-e2e): the cases' volumes are made
# with eraseAfter=false, so that they are not zeroed at delete under TCG.
# shellcheck disable=SC2034 # read by agent_start (guest/e2e.sh)
E2E_AGENT_ARGS=--allow-unerased-reuse
BUDGET_S=360

command -v pmem-conformance >/dev/null ||
    fail "pmem-conformance is not in the guest: cargo build -p pmem-conformance, then --extra-bin target/debug/pmem-conformance"

# conformance BACKEND: a fresh agent on BACKEND, the whole suite against it,
# the agent stopped. Reports the counts as checks.
conformance() {
    local backend=$1 out rc=0 t0=$SECONDS
    log "conformance against --backend $backend"
    E2E_BACKEND=$backend
    E2E_STATE_DIR=/var/lib/pmem-agent-$backend
    agent_start
    out=$RIG_RESULTS/conformance-$backend.txt
    # Staging and publish paths beneath the agent's kubelet root (/mnt).
    pmem-conformance --endpoint "$E2E_CSI" \
        --staging-dir /mnt/conformance/staging --target-dir /mnt/conformance/mount \
        --param eraseAfter=false --test-volume-size 512Mi --test-volume-expand-size 1Gi \
        >"$out" 2>&1 || rc=$?
    grep -E '^(not ok|MISSING)|^    ' "$out" | indent || true
    grep -E '^(upstream|pmem|time):' "$out" | indent
    local up
    up=$(sed -n 's/^upstream: //p' "$out")
    [[ -n $up ]] || { indent <"$out"; fail "$backend: pmem-conformance printed no summary (status $rc)"; }
    if ((rc == 0)); then
        ok "conformance on $backend: $up"
    else
        not_ok "conformance on $backend (status $rc): $up"
        CONF_FAILED+=("$backend")
    fi
    expect_eq "$backend: no volume left after the suite" "$(pmemctl_admin --json volumes | jq length)" 0
    agent_stop
    echo "$backend: $((SECONDS - t0)) s" >>"$RIG_RESULTS/conformance-times.txt"
    log "conformance on $backend took $((SECONDS - t0)) s"
}

CONF_FAILED=()
t_all=$SECONDS
conformance direct
# The next backend starts on empty regions: what the direct agent left
# (its identity namespaces) goes.
ndctl destroy-namespace all -f >/dev/null 2>&1 || true
# ndctl prints nothing for no namespace, an object for one, an array for more.
expect_eq "regions empty before lvm" \
    "$(ndctl list -N | jq -s '[.[] | if type == "array" then .[] else . end] | length')" 0
conformance lvm
total=$((SECONDS - t_all))
indent <"$RIG_RESULTS/conformance-times.txt"
# The budget is enforced by the boot's timeout (and CI's); here it is only printed.
log "conformance on direct and lvm: $total s (budget $BUDGET_S s)"
# Both backends ran; a failed one fails the scenario.
((${#CONF_FAILED[@]} == 0)) || fail "conformance failed on: ${CONF_FAILED[*]} (reports in \$RIG_RESULTS/conformance-<backend>.txt)"
