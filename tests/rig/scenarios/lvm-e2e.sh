# rig: agent=required boots=2 dimms=2 dimm-size=2G labels=1 timeout=900
# lvm-e2e: pmem-agent --backend lvm on two labeled emulated regions, driven
# with pmemctl; one volume group per region on fsdax namespaces of ours,
# one logical volume per volume.
#  boot 1: a foreign namespace carries the agent's state directory; the
#          agent makes its namespaces, PVs (2 MiB aligned) and VGs;
#          xfs volume staged/published with DAX on the LV, then grown
#          online with its data intact; fragmentation: A+C fits after A
#          and C are deleted and erased (and GetCapacity said so); a deleted
#          volume's LV is renamed erasing-<id> at once and zeroed, then
#          removed, in the background; kill -9 right after lvcreate, right
#          after the delete's lvrename and right after the eraser's
#          lvremove, restart: no orphan, no lost volume, the erase resumes;
#          per-operation times and lvm invocations
#  boot 2: same DIMMs: volume groups found and activated, reconcile clean,
#          data intact; the ledger lost: refused at start, rebuilt with
#          pmemctl ledger rebuild (dry run, --apply), data intact;
#          everything deleted

# shellcheck disable=SC2034 # read by agent_start (guest/e2e.sh)
E2E_BACKEND=lvm
# A single-tenant test node (see direct-e2e): eraseAfter=false volumes are
# not zeroed at delete; the erase path runs for --erase-after true volumes.
# shellcheck disable=SC2034
E2E_AGENT_ARGS=--allow-unerased-reuse
MIB=$((1024 * 1024))
STATE_NS=rig-state
export RUST_LOG=info,pmem_allocator::lvm=debug

ext4_without_dax() { grep -q " $1 ext4 " /proc/mounts && ! dax_mounted "$1"; }
not_in() { ! tr ' ' '\n' <<<"$1" | grep -qx -- "$2"; }
avail() { pmemctl_admin --json regions | jq -r --arg r "$1" '.[] | select(.id == $r) | .available_bytes'; }
lvm_calls() { grep -c "lvm command" "$E2E_LOG" || true; }
our_lvs() { lvs --noheadings -o lv_name -S lv_tags=pmem-agent | awk '{print $1}' | sort; }

# A command prefix for lvm that stops for good right after one subcommand,
# so the agent can be killed exactly there.
PAUSER=/tmp/lvm-pause
cat >"$PAUSER" <<'EOF'
#!/bin/bash
# lvm-pause: runs "$@" (lvm SUB ...); pauses after it when SUB is $PAUSE_SUB.
"$@"
rc=$?
if [[ ${2:-} == "${PAUSE_SUB:-}" ]]; then echo $$ >/tmp/lvm-paused; exec sleep 3600; fi
exit $rc
EOF
chmod +x "$PAUSER"

case $RIG_BOOT in
1)
    log "a foreign namespace for the agent's state (ndctl, region1)"
    ns_create region1 64M "$STATE_NS" >/dev/null
    check "mkfs.ext4 on $STATE_NS" mkfs.ext4 -q -F "/dev/$(ns_blockdev "$STATE_NS")"
    mount_state "$STATE_NS"

    # ---- start with half of each region: namespaces, PVs and VGs are made
    t0=$EPOCHREALTIME
    agent_start --lvm-percentage 50
    setup_ms=$(ms_since "$t0")
    check "describe says lvm" grep -q "lvm backend: volume groups pmem-region0, pmem-region1" "$E2E_LOG"
    half=$(vgs --noheadings --units b --nosuffix -o vg_size pmem-region0 | xargs)
    holds "region0's volume group holds about half the region ($half bytes)" test "$half" -gt $((900 * MIB)) -a "$half" -lt $((1024 * MIB))
    agent_stop
    # ---- the whole region: a second namespace extends each volume group
    agent_start
    ndctl list -N | jq -c '.[] | {dev, mode, size, name}' | indent
    for r in region0 region1; do
        ns=$(ndctl list -N -r "$r" | jq -c '[.[] | select(.name | startswith("pmem-agent-lvm:"))]')
        expect_eq "$r: two namespaces of ours" "$(jq length <<<"$ns")" 2
        expect_eq "$r: they are fsdax" "$(jq -r '[.[].mode] | unique | join(",")' <<<"$ns")" fsdax
    done
    full=$(vgs --noheadings --units b --nosuffix -o vg_size pmem-region0 | xargs)
    holds "region0's volume group grew to the whole region ($half -> $full bytes)" test "$full" -gt $((1900 * MIB))
    vgs -o vg_name,vg_tags,vg_extent_size,vg_size,vg_free --units b | indent
    pvs -o pv_name,vg_name,pe_start --units b | indent
    expect_eq "our volume groups are tagged" "$(vgs --noheadings -o vg_name -S vg_tags=pmem-agent | awk '{print $1}' | sort | xargs)" "pmem-region0 pmem-region1"
    lid=$(pmemctl_admin --json ledger status | jq -r .ledger_id)
    expect_eq "our volume groups carry the ledger's identity tag" \
        "$(vgs --noheadings -o vg_name -S "vg_tags=pmem-agent-ledger.$lid" | awk '{print $1}' | sort | xargs)" "pmem-region0 pmem-region1"
    expect_eq "extent size 4 MiB" "$(vgs --noheadings --units b --nosuffix -o vg_extent_size pmem-region0 | xargs)" $((4 * MIB))
    starts=$(pvs --noheadings --units b --nosuffix -o pe_start -S vg_tags=pmem-agent | xargs)
    expect_eq "four PVs of ours" "$(wc -w <<<"$starts")" 4
    for s in $starts; do
        holds "pe_start $s is a multiple of 2 MiB" test $((s % (2 * MIB))) -eq 0
    done
    pv_names=$(pvs --noheadings -o pv_name -S vg_tags=pmem-agent | xargs)
    holds "the state namespace is not one of our PVs ($pv_names)" not_in "$pv_names" "/dev/$(ns_blockdev "$STATE_NS")"
    regions=$(pmemctl_admin --json regions)
    pmemctl_admin regions | indent
    expect_eq "two regions, backend lvm" "$(jq -r '[.[] | .backend] | join(",")' <<<"$regions")" "lvm,lvm"
    cap=$(pmemctl_csi --json csi capacity)
    indent <<<"$cap"
    r0=$(vgs --noheadings --units b --nosuffix -o vg_free pmem-region0 | xargs)
    expect_eq "maximum_volume_size is region0's free extents" "$(jq -r .maximum_volume_size <<<"$cap")" "$r0"

    # ---- an xfs volume with DAX on the LV, then grown online
    log "AppDirect volume on an LV, staged and published with DAX"
    t0=$EPOCHREALTIME
    calls0=$(lvm_calls)
    out=$(create vol-a 320MiB) || fail "create vol-a"
    create_ms=$(ms_since "$t0")
    create_calls=$(($(lvm_calls) - calls0))
    indent <<<"$out"
    va=$(jq -r .volume_id <<<"$out")
    dev_a=$(vol "$va" | jq -r .device)
    expect_eq "vol-a device is its LV" "$(readlink -f "$dev_a")" "$(readlink -f "$(lvs --noheadings -o lv_path "$(vol "$va" | jq -r .region | sed 's/^/pmem-/')/$va" | xargs)")"
    expect_eq "vol-a LV is tagged" "$(lvs --noheadings -o lv_tags "$(vol "$va" | jq -r .region | sed 's/^/pmem-/')/$va" | xargs)" pmem-agent
    expect_eq "vol-a capacity_bytes is the LV size" "$(blockdev --getsize64 "$dev_a")" "$(jq -r .capacity_bytes <<<"$out")"
    mkdir -p /mnt/stage-a /mnt/pub-a
    check "NodeStageVolume vol-a (xfs)" csi stage "$va" /mnt/stage-a --fs xfs
    check "staged with dax on the LV (/proc/mounts)" dax_mounted /mnt/stage-a
    check "NodePublishVolume vol-a" csi publish "$va" /mnt/stage-a /mnt/pub-a --fs xfs
    check "published with dax" dax_mounted /mnt/pub-a
    grep -E " /mnt/(stage|pub)-a " /proc/mounts | indent
    dd if=/dev/urandom of=/mnt/pub-a/data bs=1M count=8 status=none
    sha256sum </mnt/pub-a/data >/mnt/pub-a/data.sha256
    before=$(df -B1 --output=size /mnt/pub-a | tail -n 1 | xargs)
    t0=$EPOCHREALTIME
    calls0=$(lvm_calls)
    check "ControllerExpandVolume + NodeExpandVolume to 640MiB while mounted" csi expand "$va" 640MiB --node-path /mnt/pub-a
    expand_ms=$(ms_since "$t0")
    expand_calls=$(($(lvm_calls) - calls0))
    after=$(df -B1 --output=size /mnt/pub-a | tail -n 1 | xargs)
    holds "xfs grew online ($before -> $after bytes)" test "$after" -gt $((before + 200 * MIB))
    expect_eq "vol-a LV is 640MiB" "$(blockdev --getsize64 "$dev_a")" $((640 * MIB))
    expect_eq "data intact after the growth" "$(sha256sum </mnt/pub-a/data)" "$(cat /mnt/pub-a/data.sha256)"
    check "still dax after the growth" dax_mounted /mnt/pub-a
    e=$(csi delete "$va" 2>&1) && fail "deleting a published volume succeeded"
    ok "delete of a published volume refused: $e"
    check "NodeUnpublishVolume" csi unpublish "$va" /mnt/pub-a
    check "NodeUnstageVolume" csi unstage "$va" /mnt/stage-a
    echo "$va" >"$E2E_STATE_DIR/rig-vol-a"

    # ---- raw block: the LV itself at the target path
    log "raw block volume"
    out=$(create vol-b 64MiB --block) || fail "create vol-b"
    vb=$(jq -r .volume_id <<<"$out")
    mkdir -p /mnt/stage-b
    check "NodeStageVolume vol-b (block)" csi stage "$vb" /mnt/stage-b --block
    check "NodePublishVolume vol-b (block)" csi publish "$vb" /mnt/stage-b /mnt/pub-b --block
    holds "/mnt/pub-b is a block device" test -b /mnt/pub-b
    expect_eq "/mnt/pub-b is 64MiB" "$(blockdev --getsize64 /mnt/pub-b)" $((64 * MIB))
    head -c $((4 * MIB)) /dev/urandom >/tmp/blk
    dd if=/tmp/blk of=/mnt/pub-b bs=1M oflag=direct status=none
    expect_eq "data read back through the LV" "$(head -c $((4 * MIB)) "$(vol "$vb" | jq -r .device)" | sha256sum)" "$(sha256sum </tmp/blk)"
    check "NodeUnpublishVolume vol-b" csi unpublish "$vb" /mnt/pub-b
    check "NodeUnstageVolume vol-b" csi unstage "$vb" /mnt/stage-b
    # Held open (not exclusively) by a process: the delete is refused and
    # the volume stays ready, so no descriptor can write behind the erase.
    dev_vb=$(vol "$vb" | jq -r .device)
    exec 7<"$dev_vb"
    e=$(csi delete "$vb" 2>&1) && fail "deleting an open LV succeeded"
    ok "delete of an open LV refused: $e"
    expect_eq "vol-b is still ready" "$(vol "$vb" | jq -r .state)" ready
    exec 7<&-
    check "delete vol-b" delete_erased "$vb"

    # ---- FileIO: ext4 without DAX
    log "FileIO volume: ext4 without dax"
    out=$(create vol-f 64MiB --usage FileIO --fs ext4) || fail "create vol-f"
    vfi=$(jq -r .volume_id <<<"$out")
    mkdir -p /mnt/stage-f /mnt/pub-f
    check "NodeStageVolume vol-f (ext4)" csi stage "$vfi" /mnt/stage-f --fs ext4
    check "NodePublishVolume vol-f" csi publish "$vfi" /mnt/stage-f /mnt/pub-f --fs ext4
    holds "vol-f is ext4 mounted without dax" ext4_without_dax /mnt/pub-f
    check "NodeUnpublishVolume vol-f" csi unpublish "$vfi" /mnt/pub-f
    check "NodeUnstageVolume vol-f" csi unstage "$vfi" /mnt/stage-f
    check "delete vol-f" delete_erased "$vfi"

    # ---- fragmentation: A+C fits after deleting A and C
    log "fragmentation"
    # Fill region1 so that A..D all land in region0.
    f=$(avail region1)
    out=$(create fill-r1 "$f") || fail "fill region1 with $f bytes"
    vf=$(jq -r .volume_id <<<"$out")
    expect_eq "fill-r1 is in region1" "$(vol "$vf" | jq -r .region)" region1
    a0=$(avail region0)
    unit=$((a0 / 4 / (4 * MIB) * (4 * MIB)))
    ids=()
    for n in A B C; do
        out=$(create "frag-$n" "$unit") || fail "create frag-$n"
        ids+=("$(jq -r .volume_id <<<"$out")")
    done
    out=$(create frag-D "$(avail region0)") || fail "create frag-D with the rest"
    vd=$(jq -r .volume_id <<<"$out")
    expect_eq "region0 is full" "$(avail region0)" 0
    check "delete A" delete_erased "${ids[0]}"
    check "delete C" delete_erased "${ids[2]}"
    lvs -o lv_name,seg_pe_ranges pmem-region0 | indent
    max=$(pmemctl_csi --json csi capacity | jq -r .maximum_volume_size)
    expect_eq "GetCapacity: the largest volume is A+C" "$max" $((2 * unit))
    out=$(create frag-AC $((2 * unit))) || fail "a volume of size A+C was refused"
    vac=$(jq -r .volume_id <<<"$out")
    ok "a volume of A+C = $((2 * unit)) bytes was created in the fragmented region"
    lvs -o lv_name,seg_pe_ranges "pmem-region0/$vac" | indent
    t0=$EPOCHREALTIME
    calls0=$(lvm_calls)
    check "delete frag-AC" csi delete "$vac"
    delete_ms=$(ms_since "$t0")
    delete_calls=$(($(lvm_calls) - calls0))
    wait_erased "$vac"
    for id in "${ids[1]}" "$vd" "$vf"; do check "delete $id" delete_erased "$id"; done

    # ---- eraseAfter: zeroed through the LV before lvremove
    out=$(create vol-e 64MiB --erase-after true) || fail "create vol-e"
    ve=$(jq -r .volume_id <<<"$out")
    dev_e=$(vol "$ve" | jq -r .device)
    dd if=/dev/urandom of="$dev_e" bs=1M count=64 oflag=direct status=none
    t0=$EPOCHREALTIME
    check "delete vol-e (eraseAfter)" csi delete "$ve"
    erase_ms=$(ms_since "$t0")
    holds "vol-e's LV lost its name at once" not_in "$(our_lvs | xargs)" "$ve"
    t0=$EPOCHREALTIME
    wait_erased "$ve"
    zero_ms=$(ms_since "$t0")
    holds "vol-e's LV is zeroed and removed in the background" not_in "$(our_lvs | xargs)" "erasing-$ve"

    # ---- kill -9 right after lvcreate and right after lvremove
    for sub in lvcreate lvrename lvremove; do
        log "crash: kill -9 right after $sub"
        if [[ $sub != lvcreate ]]; then
            out=$(create "crash-$sub" 32MiB --erase-after true) || fail "create crash-$sub"
            victim=$(jq -r .volume_id <<<"$out")
        fi
        agent_stop
        rm -f /tmp/lvm-paused
        PAUSE_SUB=$sub agent_start --lvm-command-prefix "$PAUSER"
        if [[ $sub == lvcreate ]]; then
            pmemctl_csi --json csi create crash-new --size 32MiB --erase-after false >/dev/null 2>&1 &
        else
            pmemctl_csi csi delete "$victim" >/dev/null 2>&1 &
        fi
        client=$!
        wait_for 30 test -e /tmp/lvm-paused || fail "the agent never ran $sub"
        kill -9 "$AGENT_PID"
        wait "$AGENT_PID" 2>/dev/null || true
        AGENT_PID=
        kill -9 "$(cat /tmp/lvm-paused)" 2>/dev/null || true
        wait "$client" 2>/dev/null || true
        ok "agent killed with SIGKILL right after $sub"
        agent_start
        expect_eq "no orphan LVs" "$(pmemctl_admin --json orphans | jq length)" 0
        if [[ $sub == lvcreate ]]; then
            v=$(pmemctl_admin --json volumes | jq -c '.[] | select(.name == "crash-new")')
            [[ -n $v ]] || fail "volume crash-new lost"
            expect_eq "crash-new finished by reconciliation" "$(jq -r .state <<<"$v")" ready
            id=$(jq -r .id <<<"$v")
            again=$(create crash-new 32MiB) || fail "retry of crash-new"
            expect_eq "the retried CreateVolume returns the same volume" "$(jq -r .volume_id <<<"$again")" "$id"
            check "delete crash-new" delete_erased "$id"
        else
            # Interrupted in DeleteVolume (lvrename) or in the eraser
            # (lvremove): reconciliation and the eraser finish it.
            check "the retried DeleteVolume succeeds" csi delete "$victim"
            wait_erased "$victim"
            holds "crash-$sub's LV is gone" not_in "$(our_lvs | xargs)" "erasing-$victim"
        fi
    done
    expect_eq "only vol-a's LV is left" "$(our_lvs | xargs)" "$va"

    # ---- per-operation times (TCG guest)
    {
        echo "agent start with namespace + PV + VG setup: ${setup_ms} ms"
        echo "create 320MiB: ${create_ms} ms, ${create_calls} lvm invocations"
        echo "expand 320->640MiB online (controller + xfs_growfs): ${expand_ms} ms, ${expand_calls} lvm invocations"
        echo "delete (A+C, no erase): ${delete_ms} ms, ${delete_calls} lvm invocations"
        echo "delete 64MiB: ${erase_ms} ms (returns after lvrename); background zeroing + lvremove: ${zero_ms} ms"
    } | tee "$RIG_RESULTS/timings.txt" | indent
    ok "timings measured"
    agent_stop
    ;;
2)
    log "boot 2: the same DIMMs"
    mount_state "$STATE_NS"
    agent_start
    line=$(grep "startup reconciliation done" "$E2E_LOG")
    indent <<<"$line"
    holds "startup reconciliation: no orphans, nothing missing, no errors" \
        grep -q "orphans=0 foreign=0 missing=0 errors=0" <<<"$line"
    lvs -o lv_name,vg_name,lv_attr,lv_tags | indent
    va=$(cat "$E2E_STATE_DIR/rig-vol-a")
    dev_a=$(vol "$va" | jq -r .device)
    holds "vol-a's LV is active again ($dev_a)" test -b "$dev_a"
    rec=$(pmemctl_admin --json reconcile)
    expect_eq "reconcile: no actions" "$(jq '.actions | length' <<<"$rec")" 0
    expect_eq "reconcile: nothing missing" "$(jq '.missing | length' <<<"$rec")" 0
    mkdir -p /mnt/check-a
    check "mount -o dax vol-a" mount_dax "$dev_a" /mnt/check-a xfs
    on_exit umount_if_mounted /mnt/check-a
    expect_eq "data written in boot 1 intact" "$(sha256sum </mnt/check-a/data)" "$(cat /mnt/check-a/data.sha256)"
    check "umount vol-a" umount /mnt/check-a

    # ---- a lost ledger is refused and rebuilt from the LVs' tags
    log "lost ledger: refusal and pmemctl ledger rebuild"
    agent_stop
    lost_ledger_rebuild 1
    expect_eq "rebuilt vol-a is ready" "$(vol "$va" | jq -r .state)" ready
    dev_a=$(vol "$va" | jq -r .device)
    check "mount -o dax rebuilt vol-a" mount_dax "$dev_a" /mnt/check-a xfs
    expect_eq "data intact after the rebuild" "$(sha256sum </mnt/check-a/data)" "$(cat /mnt/check-a/data.sha256)"
    check "umount vol-a" umount /mnt/check-a
    check "delete vol-a" delete_erased "$va"
    expect_eq "no LVs of ours left" "$(our_lvs | xargs)" ""
    agent_stop
    ;;
esac
