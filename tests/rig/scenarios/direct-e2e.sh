# rig: agent=required boots=2 dimms=2 dimm-size=2G labels=1 timeout=900
# direct-e2e: pmem-agent --backend direct on two labeled emulated regions,
# driven with pmemctl; one libnvdimm namespace per volume.
#  boot 1: a foreign namespace (ndctl) carries the agent's state directory;
#          identity, regions, capacity; fsdax volume -> stage/publish with
#          DAX (or a manual dax mount when the Node service is missing);
#          FileIO -> sector mode; a deleted volume's namespace is kept
#          under the erasing marker and zeroed in the background, then
#          destroyed; busy delete refused; delete gives the space back;
#          the region alignment (16MiB at boot) set to 2MiB by the agent,
#          so required == limit of 512MiB and 1GiB give exactly that; a
#          sector volume of exactly 512MiB is OutOfRange with the two
#          nearest sizes, both of which are served exactly;
#          capacity exactness (maximum succeeds, one byte or one 2MiB step
#          more fails); kill -9 at two points of a create and restart: no
#          orphan, no lost volume; read-only /sys refused; raw block volume
#          published as the namespace's device; ephemeral inline volume
#          made at publish and destroyed at unpublish; sysfs vs ndctl
#          timings; both regions filled with maximum-size volumes, then one
#          more refused (ResourceExhausted); with udevd running, a
#          namespace made and destroyed by ndctl is noticed and capacity
#          follows it
#  boot 2: same DIMMs: the alignment is 16MiB again and the agent sets
#          2MiB at start; the state comes back, reconcile is clean, the data
#          written in boot 1 is intact, vol-a still exactly 512MiB; the ledger lost: refused at start,
#          rebuilt from the namespaces' markers (pmemctl ledger rebuild),
#          data intact; everything is deleted

# shellcheck disable=SC2034 # read by agent_start (guest/e2e.sh)
E2E_BACKEND=direct
# A single-tenant test node: volumes made with eraseAfter=false (the create
# helper's default) are not zeroed when deleted, which keeps filling and
# emptying both regions fast under TCG. The erase path runs for every volume
# made with --erase-after true (vol-e, the timings); the hostile suites on
# the host check the multi-tenant default.
# shellcheck disable=SC2034
E2E_AGENT_ARGS=--allow-unerased-reuse
MIB=$((1024 * 1024))
STATE_NS=rig-state

# ndctl's JSON for the namespace of volume ID (empty when there is none):
# named pmem-agent:<ledger short id>:ID (or pmem-agent:ID before identities).
ns_of() {
    ndctl list --namespaces | jq -c --arg id "$1" \
        '[.[]? // . | select((.name // "") | startswith("pmem-agent:") and endswith(":" + $id))][0] // empty'
}

# The size of our identity namespace in REGION (pmem-agent-id:<ledger id>).
id_ns_size() {
    ndctl list -N -r "$1" | jq -r '[.[]? // . | select((.name // "") | startswith("pmem-agent-id:"))][0].size // 0'
}

region_avail() { cat "/sys/bus/nd/devices/$1/available_size"; }

# Backend timings from the agent log (lines "namespace ready" / "destroyed namespace").
agent_ms() { grep "$1" "$E2E_LOG" | sed -n 's/.*ms=\([0-9]*\).*/\1/p' | tail -n "${2:-1}"; }

case $RIG_BOOT in
1)
    # ---- the agent's state lives on a foreign namespace, so it survives the reboot
    log "a foreign namespace for the agent's state (ndctl, region1)"
    t0=$EPOCHREALTIME
    ns_create region1 64M "$STATE_NS" >/dev/null
    ndctl_create_ms=$(ms_since "$t0")
    check "mkfs.ext4 on $STATE_NS" mkfs.ext4 -q -F "/dev/$(ns_blockdev "$STATE_NS")"
    mount_state "$STATE_NS"

    # ---- read-only sysfs is refused with a hint
    log "read-only /sys"
    mkdir -p /mnt/rosys
    mount --bind /sys /mnt/rosys && mount -o remount,bind,ro /mnt/rosys
    out=$(timeout 20 pmem-agent --backend direct --sysfs-root /mnt/rosys --state-dir /tmp/ro-state \
        --endpoint unix:///tmp/ro-csi.sock --admin-endpoint unix:///tmp/ro-admin.sock 2>&1) && fail "pmem-agent started on a read-only /sys"
    grep -q "mounted read-only" <<<"$out" || { indent <<<"$out"; fail "no read-only hint"; }
    ok "read-only sysfs refused: $(grep -o 'mounted read-only[^;]*' <<<"$out" | head -n 1)"
    umount /mnt/rosys

    # ---- the region alignment as the kernel takes it (before the agent)
    log "region alignment: boot default and what the kernel accepts"
    ra=/sys/bus/nd/devices/region0/align
    expect_eq "region0 boots with the 16MiB alignment" "$(cat "$ra")" 0x1000000
    echo 3145728 >"$ra" 2>/dev/null && fail "the kernel took a 3MiB (not a power of two) alignment"
    ok "3MiB alignment refused (EINVAL)"
    check "the kernel takes a 4KiB alignment" sh -c "echo 4096 >$ra"
    check "and 16MiB again" sh -c "echo 16777216 >$ra"

    # ---- start
    agent_start
    for r in region0 region1; do
        expect_eq "$r alignment lowered to 2MiB by the agent" "$(cat /sys/bus/nd/devices/$r/align)" 0x200000
    done
    grep "region namespace alignment set" "$E2E_LOG" | sed 's/.*INFO //' | indent
    check "describe says direct" grep -q "direct backend: one libnvdimm namespace per volume" "$E2E_LOG"
    regions=$(pmemctl_admin --json regions)
    pmemctl_admin regions | indent
    expect_eq "two regions, backend direct" "$(jq -r '[.[] | .backend] | join(",")' <<<"$regions")" "direct,direct"
    # ---- the ledger's identity: one raw identity namespace per region
    lid=$(pmemctl_admin --json ledger status | jq -r .ledger_id)
    for r in region0 region1; do
        expect_eq "$r has our identity namespace for ledger $lid" \
            "$(ndctl list -N -r "$r" | jq -r '[.[]? // . | select((.name // "") | startswith("pmem-agent-id:"))] | map(.name) | join(",")')" \
            "pmem-agent-id:$lid"
    done
    id0=$(id_ns_size region0)
    id1=$(id_ns_size region1)
    holds "the identity namespaces are small ($id0, $id1 bytes)" test "$id0" -gt 0 -a "$id0" -le $((64 * MIB))
    expect_eq "region0 available excludes the identity namespace" \
        "$(jq -r '.[] | select(.id == "region0") | .available_bytes' <<<"$regions")" $((2048 * MIB - id0))
    expect_eq "region1 available excludes the foreign and the identity namespace" \
        "$(jq -r '.[] | select(.id == "region1") | .available_bytes' <<<"$regions")" $((2048 * MIB - 64 * MIB - id1))
    cap=$(pmemctl_csi --json csi capacity)
    indent <<<"$cap"
    # fsdax: the extent minus the memmap (64 bytes per 4 KiB page, 2 MiB
    # aligned); the exact maximum is created below (vol-max).
    expect_eq "maximum_volume_size is region0's largest allocatable" "$(jq -r .maximum_volume_size <<<"$cap")" \
        "$(jq -r '.[] | select(.id == "region0") | .largest_allocatable_bytes' <<<"$regions")"
    # 2111832064 is the usable size of all 2GiB; 2046MiB (after the 2MiB
    # identity) has the same page map offset, hence the same usable size.
    holds "identity costs region0's maximum at most one 2MiB unit" \
        test "$(jq -r .maximum_volume_size <<<"$cap")" -le 2111832064 -a "$(jq -r .maximum_volume_size <<<"$cap")" -ge $((2111832064 - 2 * MIB))

    # ---- an fsdax volume
    log "AppDirect volume of exactly 512MiB (required == limit) -> fsdax namespace"
    t0=$EPOCHREALTIME
    out=$(create vol-a 512MiB --limit 512MiB) || fail "create vol-a (required == limit == 512MiB)"
    create_ms=$(ms_since "$t0")
    indent <<<"$out"
    va=$(jq -r .volume_id <<<"$out")
    cap_a=$(jq -r .capacity_bytes <<<"$out")
    ns=$(ns_of "$va")
    [[ -n $ns ]] || { ndctl list -N | indent; fail "no namespace named pmem-agent:$va"; }
    indent <<<"$ns"
    expect_eq "vol-a namespace mode" "$(jq -r .mode <<<"$ns")" fsdax
    expect_eq "vol-a namespace align" "$(jq -r .align <<<"$ns")" 2097152
    dev_a=$(vol "$va" | jq -r .device)
    expect_eq "vol-a device is the namespace's block device" "$dev_a" "/dev/$(jq -r .blockdev <<<"$ns")"
    expect_eq "vol-a capacity_bytes is exactly the block device size" "$(blockdev --getsize64 "$dev_a")" "$cap_a"
    expect_eq "vol-a capacity_bytes is exactly 512MiB" "$cap_a" $((512 * MIB))
    expect_eq "ndctl size is the usable size" "$(jq -r .size <<<"$ns")" "$cap_a"
    expect_eq "vol-a's namespace is 522MiB (page map 10MiB)" "$(cat "/sys/bus/nd/devices/$(jq -r .dev <<<"$ns")/size")" $((522 * MIB))

    # ---- stage / publish with DAX through the Node service (or by hand)
    log "stage and publish vol-a"
    mkdir -p /mnt/stage-a /mnt/pub-a
    if out=$(csi stage "$va" /mnt/stage-a --fs xfs 2>&1); then
        ok "NodeStageVolume vol-a"
        check "staged with dax (/proc/mounts)" dax_mounted /mnt/stage-a
        check "NodePublishVolume vol-a" csi publish "$va" /mnt/stage-a /mnt/pub-a --fs xfs
        check "published with dax (/proc/mounts)" dax_mounted /mnt/pub-a
        grep -E " /mnt/(stage|pub)-a " /proc/mounts | indent
        dd if=/dev/urandom of=/mnt/pub-a/data bs=1M count=4 status=none
        sha256sum </mnt/pub-a/data >/mnt/pub-a/data.sha256
        e=$(csi delete "$va" 2>&1) && fail "deleting a published volume succeeded"
        ok "delete of a published volume refused: $e"
        check "NodeUnpublishVolume" csi unpublish "$va" /mnt/pub-a
        check "NodeUnstageVolume" csi unstage "$va" /mnt/stage-a
        node_service=1
    else
        ok "# SKIP Node service not usable yet ($out); mounting by hand"
        check "mkfs.xfs $dev_a" mkfs.xfs -q -f "$dev_a"
        check "mount -o dax $dev_a: dax in /proc/mounts" mount_dax "$dev_a" /mnt/stage-a xfs
        dd if=/dev/urandom of=/mnt/stage-a/data bs=1M count=4 status=none
        sha256sum </mnt/stage-a/data >/mnt/stage-a/data.sha256
        e=$(pmemctl_csi csi delete "$va" 2>&1) && fail "deleting a mounted volume succeeded"
        grep -q "in use" <<<"$e" || fail "unexpected error deleting a mounted volume: $e"
        ok "delete of a mounted volume refused: $e"
        check "umount" umount /mnt/stage-a
        node_service=0
    fi
    echo "$node_service" >"$E2E_STATE_DIR/rig-node-service"
    echo "$va" >"$E2E_STATE_DIR/rig-vol-a"

    # ---- FileIO -> sector mode
    log "FileIO volume -> sector namespace"
    out=$(create vol-s 64MiB --usage FileIO) || fail "create vol-s"
    vs=$(jq -r .volume_id <<<"$out")
    ns=$(ns_of "$vs")
    indent <<<"$ns"
    expect_eq "vol-s namespace mode" "$(jq -r .mode <<<"$ns")" sector
    expect_eq "vol-s sector size" "$(jq -r .sector_size <<<"$ns")" 4096
    dev_s=$(vol "$vs" | jq -r .device)
    holds "vol-s device $dev_s is a BTT (pmemX.Ys)" grep -Eq '^/dev/pmem[0-9]+(\.[0-9]+)?s$' <<<"$dev_s"
    expect_eq "vol-s capacity_bytes is exactly the block device size" "$(blockdev --getsize64 "$dev_s")" "$(jq -r .capacity_bytes <<<"$out")"

    # ---- 1GiB exactly; sector mode has no round sizes: the two nearest
    log "round sizes: 1GiB fsdax exactly; 512MiB sector answered with the two nearest"
    out=$(create vol-g 1GiB --limit 1GiB) || fail "create vol-g (required == limit == 1GiB)"
    vg=$(jq -r .volume_id <<<"$out")
    expect_eq "vol-g capacity_bytes is exactly 1GiB" "$(jq -r .capacity_bytes <<<"$out")" $((1024 * MIB))
    expect_eq "vol-g block device is exactly 1GiB" "$(blockdev --getsize64 "$(vol "$vg" | jq -r .device)")" $((1024 * MIB))
    v=$(vol "$vg")
    expect_eq "vol-g's namespace is 1042MiB" "$(jq -r .size_bytes <<<"$v")" $((1042 * MIB))
    ok "vol-g's namespace at offset $(($(jq -r .offset_bytes <<<"$v") / MIB))MiB of $(jq -r .region <<<"$v")"
    check "delete vol-g" delete_erased "$vg"
    e=$(create vol-s512 512MiB --limit 512MiB --usage FileIO 2>&1) && fail "a sector volume of exactly 512MiB was created: $e"
    holds "sector 512MiB exactly is OutOfRange: $e" grep -q "OutOfRange.*nearest sizes this node can serve are" <<<"$e"
    mapfile -t nearest < <(grep -o '([0-9]* bytes)' <<<"$e" | tr -dc '0-9\n')
    below=${nearest[0]:-0} above=${nearest[1]:-0}
    holds "the nearest sizes bracket 512MiB ($below < $((512 * MIB)) < $above)" test "$below" -lt $((512 * MIB)) -a "$above" -gt $((512 * MIB))
    near=()
    for n in "$below" "$above"; do
        out=$(create "vol-s$n" "$n" --limit "$n" --usage FileIO) || fail "create a sector volume of exactly $n"
        id=$(jq -r .volume_id <<<"$out")
        expect_eq "sector volume of exactly $n: capacity_bytes" "$(jq -r .capacity_bytes <<<"$out")" "$n"
        expect_eq "sector volume of exactly $n: block device" "$(blockdev --getsize64 "$(vol "$id" | jq -r .device)")" "$n"
        near+=("$(vol "$id" | jq -r .size_bytes)")
        check "delete the sector volume of $n" delete_erased "$id"
    done
    expect_eq "their namespaces are one 2MiB unit apart (${near[*]}): nothing between is servable" $((near[1] - near[0])) $((2 * MIB))
    # The kernel takes no namespace size between two units.
    seed=$(cat /sys/bus/nd/devices/region0/namespace_seed)
    cat /proc/sys/kernel/random/uuid >"/sys/bus/nd/devices/$seed/uuid"
    echo $((near[0] + 4096)) >"/sys/bus/nd/devices/$seed/size" 2>/dev/null && fail "the kernel took a namespace size of ${near[0]} + 4KiB"
    echo 0 >"/sys/bus/nd/devices/$seed/size" || true # frees the uuid
    ok "a namespace size of ${near[0]} + 4KiB refused by the kernel (EINVAL: not a multiple of the 2MiB alignment)"

    # ---- no expansion in direct mode: not advertised, Unimplemented
    e=$(csi expand "$vs" 128MiB 2>&1) && fail "ControllerExpandVolume succeeded in direct mode"
    holds "ControllerExpandVolume is Unimplemented: $e" grep -q Unimplemented <<<"$e"

    # ---- eraseAfter: the namespace is zeroed before it is destroyed
    log "eraseAfter"
    out=$(create vol-e 64MiB --erase-after true) || fail "create vol-e"
    ve=$(jq -r .volume_id <<<"$out")
    v=$(vol "$ve")
    re=$(jq -r .region <<<"$v")
    ns_size=$(jq -r .size_bytes <<<"$v")
    ns_off=$(jq -r .offset_bytes <<<"$v")
    dev_e=$(jq -r .device <<<"$v")
    dd if=/dev/urandom of="$dev_e" bs=1M count=4 oflag=direct status=none
    dd if=/dev/urandom of="$dev_e" bs=1M count=1 seek=$(($(blockdev --getsize64 "$dev_e") / MIB - 1)) oflag=direct status=none
    t0=$EPOCHREALTIME
    check "delete vol-e (eraseAfter)" csi delete "$ve"
    erase_ms=$(ms_since "$t0")
    holds "vol-e's namespace lost its volume marker at once" test -z "$(ns_of "$ve")"
    wait_erased "$ve"
    ok "vol-e erased in the background: $(grep -o "erased namespace.*" "$E2E_LOG" | tail -n 1)"
    holds "the erasing namespace is destroyed" test -z "$(ns_json "pmem-agent-erasing:$ve")"
    # A raw namespace of the same size lands on the same extent (first fit).
    raw=$(ndctl create-namespace -r "$re" -s "$ns_size" -m raw -n erase-check) || fail "ndctl create raw erase-check"
    raw_dev=$(jq -r .dev <<<"$raw")
    raw_off=$(($(cat "/sys/bus/nd/devices/$raw_dev/resource") - $(cat "/sys/bus/nd/devices/$re/resource")))
    expect_eq "the raw namespace covers vol-e's extent" "$raw_off" "$ns_off"
    check "vol-e's whole extent reads back as zeros" cmp -n "$ns_size" /dev/zero "/dev/$(jq -r .blockdev <<<"$raw")"
    check "ndctl destroy-namespace erase-check" ndctl destroy-namespace -f "$raw_dev"

    # ---- delete gives the space back
    log "delete"
    out=$(create vol-tmp 128MiB) || fail "create vol-tmp"
    vt=$(jq -r .volume_id <<<"$out")
    rt=$(vol "$vt" | jq -r .region)
    before=$(region_avail "$rt")
    t0=$EPOCHREALTIME
    check "delete vol-tmp" csi delete "$vt"
    delete_ms=$(ms_since "$t0")
    wait_erased "$vt"
    holds "vol-tmp's namespace is gone" test -z "$(ns_of "$vt")"
    after=$(region_avail "$rt")
    holds "region $rt space back ($before -> $after)" test "$after" -gt "$before"

    # ---- raw block: the published path is the namespace's block device
    log "raw block volume"
    out=$(create vol-b 128MiB --block) || fail "create vol-b (block)"
    vb=$(jq -r .volume_id <<<"$out")
    cap_b=$(jq -r .capacity_bytes <<<"$out")
    dev_b=$(vol "$vb" | jq -r .device)
    mkdir -p /mnt/stage-b
    check "NodeStageVolume vol-b (block)" csi stage "$vb" /mnt/stage-b --block
    check "NodePublishVolume vol-b (block)" csi publish "$vb" /mnt/stage-b /mnt/pub-b --block
    holds "/mnt/pub-b is a block device" test -b /mnt/pub-b
    expect_eq "/mnt/pub-b is the namespace's device" "$(stat -c %t:%T /mnt/pub-b)" "$(stat -c %t:%T "$dev_b")"
    expect_eq "/mnt/pub-b size is capacity_bytes" "$(blockdev --getsize64 /mnt/pub-b)" "$cap_b"
    dd if=/dev/urandom of=/tmp/blk.data bs=1M count=2 status=none
    # Head and tail, through the published path; read back through the namespace.
    dd if=/tmp/blk.data of=/mnt/pub-b bs=1M oflag=direct conv=fsync status=none
    dd if=/tmp/blk.data of=/mnt/pub-b bs=1M seek=$((cap_b / MIB - 2)) oflag=direct conv=fsync status=none
    check "data written through /mnt/pub-b is on $dev_b (head)" cmp -n $((2 * MIB)) /tmp/blk.data "$dev_b"
    check "data written through /mnt/pub-b is on $dev_b (tail)" cmp -n $((2 * MIB)) /tmp/blk.data "$dev_b" 0 $((cap_b - 2 * MIB))
    check "NodeUnpublishVolume vol-b" csi unpublish "$vb" /mnt/pub-b
    holds "/mnt/pub-b is gone" test ! -e /mnt/pub-b
    check "NodeUnstageVolume vol-b" csi unstage "$vb" /mnt/stage-b
    check "delete vol-b" csi delete "$vb"
    holds "vol-b's namespace is gone" test -z "$(ns_of "$vb")"
    wait_erased "$vb"

    # ---- a CSI ephemeral inline volume: made at publish, gone at unpublish
    log "ephemeral inline volume"
    eph=csi-rig-$RANDOM$RANDOM
    mkdir -p /mnt/eph
    check "NodePublishVolume $eph (ephemeral, 64Mi ext4)" csi publish "$eph" '' /mnt/eph --fs ext4 \
        --ephemeral --context size=64Mi --context eraseAfter=false \
        --context csi.storage.k8s.io/pod.name=rig-pod
    v=$(pmemctl_admin --json volumes | jq -c --arg n "$eph" '.[] | select(.name == $n)')
    [[ -n $v ]] || fail "no volume named $eph"
    ve=$(jq -r .id <<<"$v")
    expect_eq "$eph is ephemeral" "$(jq -r .persistency <<<"$v")" ephemeral
    expect_eq "$eph namespace mode" "$(ns_of "$ve" | jq -r .mode)" fsdax
    check "$eph mounted with dax (/proc/mounts)" dax_mounted /mnt/eph
    grep " /mnt/eph " /proc/mounts | indent
    echo ephemeral >/mnt/eph/file && sync
    check "NodeUnpublishVolume $eph" csi unpublish "$eph" /mnt/eph
    holds "/mnt/eph is no longer a mount point" sh -c '! mountpoint -q /mnt/eph'
    holds "$eph's namespace is gone" test -z "$(ns_of "$ve")"
    expect_eq "$eph is gone from the ledger" \
        "$(pmemctl_admin --json volumes | jq --arg n "$eph" '[.[] | select(.name == $n)] | length')" 0
    wait_erased "$ve"

    # ---- capacity exactness
    log "capacity exactness"
    cap=$(pmemctl_csi --json csi capacity)
    max=$(jq -r .maximum_volume_size <<<"$cap")
    for more in $((max + 1)) $((max + 2 * MIB)); do
        if e=$(create vol-more "$more" 2>&1); then
            fail "a volume of $more (maximum $max) was created"
        fi
        ok "maximum + $((more - max)) bytes refused: $e"
    done
    out=$(create vol-max "$max" --limit "$max") || fail "create vol-max of exactly the maximum $max (required == limit)"
    vm=$(jq -r .volume_id <<<"$out")
    expect_eq "vol-max capacity_bytes is the maximum" "$(jq -r .capacity_bytes <<<"$out")" "$max"
    expect_eq "vol-max block device is the maximum" "$(blockdev --getsize64 "$(vol "$vm" | jq -r .device)")" "$max"
    check "delete vol-max" csi delete "$vm"
    wait_erased "$vm"

    # ---- kill -9 in the middle of creates, restart
    grep -q PMEM_AGENT_TEST_PAUSE_AT "$(command -v pmem-agent)" ||
        fail "pmem-agent lacks the crash-test pause points: build with --features pmem-agent/test-hooks"
    for step in after-size after-bind; do
        log "crash: kill -9 $step"
        agent_stop
        PMEM_AGENT_TEST_PAUSE_AT=$step agent_start
        pmemctl_csi --json csi create "crash-$step" --size 96MiB --erase-after false >/dev/null 2>&1 &
        client=$!
        wait_for 30 grep -q "PMEM_AGENT_TEST_PAUSE_AT: pausing" "$E2E_LOG" || fail "the create never reached $step"
        sed -i 's/PMEM_AGENT_TEST_PAUSE_AT: pausing/PMEM_AGENT_TEST_PAUSE_AT: paused/' "$E2E_LOG"
        kill -9 "$AGENT_PID"
        wait "$AGENT_PID" 2>/dev/null || true
        AGENT_PID=
        wait "$client" 2>/dev/null || true
        ok "agent killed with SIGKILL $step"
        ndctl list -N | jq -c '.[] | {dev, mode, size, name}' | indent
        agent_start
        out=$(pmemctl_admin --json volumes)
        v=$(jq -c --arg n "crash-$step" '.[] | select(.name == $n)' <<<"$out")
        [[ -n $v ]] || fail "volume crash-$step lost"
        expect_eq "crash-$step finished by reconciliation" "$(jq -r .state <<<"$v")" ready
        id=$(jq -r .id <<<"$v")
        expect_eq "crash-$step namespace mode" "$(ns_of "$id" | jq -r .mode)" fsdax
        expect_eq "no orphan namespaces" "$(pmemctl_admin --json orphans | jq length)" 0
        again=$(create "crash-$step" 96MiB) || fail "retry of crash-$step"
        expect_eq "the retried CreateVolume returns the same volume" "$(jq -r .volume_id <<<"$again")" "$id"
    done
    expect_eq "namespaces: state + 2 identity + vol-a + vol-s + 2 crash volumes" "$(ndctl list -N | jq length)" 7

    # ---- sysfs vs ndctl timings (same size, same guest)
    log "timings: our sysfs path vs ndctl (256MiB fsdax, TCG guest)"
    ours_c=() ours_d=() nd_c=() nd_d=() agent_c=() agent_d=() erase_d=()
    for i in 1 2 3; do
        t0=$EPOCHREALTIME
        out=$(create "timing-$i" 256MiB --erase-after true) || fail "create timing-$i"
        ours_c+=("$(ms_since "$t0")")
        agent_c+=("$(agent_ms 'namespace ready')")
        t0=$EPOCHREALTIME
        id=$(jq -r .volume_id <<<"$out")
        csi delete "$id" >/dev/null
        ours_d+=("$(ms_since "$t0")")
        wait_erased "$id"
        agent_d+=("$(agent_ms 'destroyed namespace')")
        erase_d+=("$(agent_ms 'erased namespace')")
        t0=$EPOCHREALTIME
        # --force: ndctl refuses fsdax starts that are not 16MiB aligned
        # (cross-arch compatibility), which our 2MiB layout leaves.
        ndctl create-namespace -r region0 -s 256M -m fsdax -n "nd-timing-$i" --force >/dev/null
        nd_c+=("$(ms_since "$t0")")
        t0=$EPOCHREALTIME
        ndctl destroy-namespace -f "$(ns_json "nd-timing-$i" | jq -r .dev)" >/dev/null
        nd_d+=("$(ms_since "$t0")")
    done
    {
        echo "create fsdax 256MiB: pmemctl->agent (gRPC, ledger, sysfs) ${ours_c[*]} ms; backend alone ${agent_c[*]} ms; ndctl create-namespace ${nd_c[*]} ms"
        echo "delete:              pmemctl->agent (retire) ${ours_d[*]} ms; background zeroing ${erase_d[*]} ms, destroy ${agent_d[*]} ms; ndctl destroy-namespace ${nd_d[*]} ms"
        echo "first volume: create ${create_ms} ms, delete ${delete_ms} ms; delete with eraseAfter of 64MiB ${erase_ms} ms; ndctl create of the state namespace ${ndctl_create_ms} ms"
    } | tee "$RIG_RESULTS/timings.txt" | indent
    ok "timings measured"

    # ---- fill both regions with volumes of exactly the reported maximum
    log "capacity exactness until both regions are full"
    # A hole between two volumes, so that one fill volume must go into it.
    fill=()
    for h in 1 2 3; do
        out=$(create "hole-$h" 96MiB) || fail "create hole-$h"
        fill+=("$(jq -r .volume_id <<<"$out")")
    done
    check "delete hole-2 (a hole between hole-1 and hole-3)" delete_erased "${fill[1]}"
    fill=("${fill[0]}" "${fill[2]}")
    max=0
    for i in $(seq 1 24); do
        cap=$(pmemctl_csi --json csi capacity)
        max=$(jq -r '.maximum_volume_size // 0' <<<"$cap")
        ((max > 0)) || break
        largest=$(pmemctl_admin --json regions | jq '[.[].largest_allocatable_bytes] | max')
        expect_eq "fill-$i: GetCapacity maximum is the largest region's" "$max" "$largest"
        # Raw block: a filesystem minimum (xfs 300 MiB) would round small fills up.
        out=$(create "fill-$i" "$max" --block) || fail "create fill-$i of exactly the maximum $max"
        expect_eq "fill-$i capacity_bytes is the maximum" "$(jq -r .capacity_bytes <<<"$out")" "$max"
        fill+=("$(jq -r .volume_id <<<"$out")")
    done
    ((max == 0)) || fail "the maximum is still $max after $((${#fill[@]} - 2)) fill volumes"
    pmemctl_admin regions | indent
    expect_eq "GetCapacity: nothing available" "$(jq -r .available_capacity <<<"$cap")" 0
    expect_eq "no region can hold another volume" \
        "$(pmemctl_admin --json regions | jq -c '[.[].largest_allocatable_bytes]')" "[0,0]"
    min=$(jq -r '.minimum_volume_size // 0' <<<"$cap")
    ((min > 0)) || min=1
    e=$(create fill-more "$min" --block 2>&1) && fail "a volume of $min was created on full regions"
    grep -q ResourceExhausted <<<"$e" || fail "the create on full regions failed with something else: $e"
    ok "one more volume of the minimum size ($min bytes) refused: $e"
    for id in "${fill[@]}"; do
        csi delete "$id" >/dev/null || fail "delete $id"
    done
    for id in "${fill[@]}"; do
        wait_erased "$id"
    done
    ok "deleted the $((${#fill[@]} - 2)) volumes that filled both regions, and hole-1, hole-3"

    # ---- device events: with udevd running, an operator's ndctl is noticed
    log "device events through udev"
    agent_stop
    /usr/lib/systemd/systemd-udevd --daemon >/dev/null 2>&1 || fail "start systemd-udevd"
    on_exit udevadm control --exit
    wait_for 10 test -S /run/udev/control || fail "udevd made no control socket"
    agent_start
    check "the agent watches udev" grep -q "watching udev for nd and block device events" "$E2E_LOG"
    # Our own create and delete are events too, but nothing foreign changed.
    out=$(create vol-ev 64MiB) || fail "create vol-ev"
    dev_ev=$(vol "$(jq -r .volume_id <<<"$out")" | jq -r .device)
    holds "udevd has a database entry for $dev_ev (the create waits for it)" \
        test -e "/run/udev/data/b$((16#$(stat -c %t "$dev_ev"))):$((16#$(stat -c %T "$dev_ev")))"
    expect_eq "the create did not time out waiting for udevd" "$(grep -c "udevd has not processed" "$E2E_LOG" || true)" 0
    check "delete vol-ev" delete_erased "$(jq -r .volume_id <<<"$out")"
    sleep 1
    expect_eq "our own volume is not reported as foreign" "$(grep -Ec "foreign device (appeared|went away)" "$E2E_LOG" || true)" 0
    free0() { pmemctl_admin --json regions | jq '.[] | select(.id == "region0") | .available_bytes'; }
    before=$(free0)
    ndctl create-namespace --region=region0 --size=32M --name=operator-ns --mode=fsdax --force >/dev/null
    op=$(ns_json operator-ns | jq -r .dev)
    wait_for 15 grep -q "foreign device appeared.* device=$op " "$E2E_LOG" ||
        fail "the agent did not notice namespace $op made by ndctl"
    ok "the agent noticed $op made by ndctl: $(grep -o "foreign device appeared.*" "$E2E_LOG" | tail -n 1)"
    expect_eq "region0 no longer offers the operator's 32MiB" "$(free0)" $((before - 32 * MIB))
    ndctl destroy-namespace -f "$op" >/dev/null
    wait_for 15 grep -q "foreign device went away.* device=$op " "$E2E_LOG" ||
        fail "the agent did not notice namespace $op destroyed by ndctl"
    ok "the agent noticed $op destroyed by ndctl"
    expect_eq "region0 offers the 32MiB again" "$(free0)" "$before"

    pmemctl_admin volumes | indent
    agent_stop
    ;;
2)
    log "boot 2: the same DIMMs"
    for r in region0 region1; do
        expect_eq "$r is back at the kernel's 16MiB alignment after the reboot" "$(cat /sys/bus/nd/devices/$r/align)" 0x1000000
    done
    mount_state "$STATE_NS"
    ok "state namespace $STATE_NS mounted again"
    agent_start
    for r in region0 region1; do
        expect_eq "$r alignment set to 2MiB again at start" "$(cat /sys/bus/nd/devices/$r/align)" 0x200000
    done
    # The kernel may number the namespaces differently after a boot, so the
    # start-up reconciliation may record new device names; nothing else.
    line=$(grep "startup reconciliation done" "$E2E_LOG")
    indent <<<"$line"
    holds "startup reconciliation: no orphans, nothing missing, no errors" \
        grep -q "orphans=0 foreign=1 missing=0 errors=0" <<<"$line"
    if grep -q "actions=0" <<<"$line"; then
        ok "startup reconciliation: nothing to do"
    else
        grep "reconcile: reconcile: " "$E2E_LOG" | sed "s/.*reconcile: reconcile: //" | indent
        other=$(grep "reconcile: reconcile: " "$E2E_LOG" | grep -vc "device is now" || true)
        expect_eq "startup reconciliation only recorded new device names" "$other" 0
    fi
    rec=$(pmemctl_admin --json reconcile)
    indent <<<"$rec"
    expect_eq "reconcile: no actions" "$(jq '.actions | length' <<<"$rec")" 0
    expect_eq "reconcile: no orphans" "$(jq '.orphans | length' <<<"$rec")" 0
    expect_eq "reconcile: nothing missing" "$(jq '.missing | length' <<<"$rec")" 0
    jq -r '.foreign[0].owner' <<<"$rec" | grep -q "named \"$STATE_NS\"" || fail "the state namespace is not reported foreign"
    ok "reconcile: the state namespace is foreign"
    vols=$(pmemctl_admin --json volumes)
    pmemctl_admin volumes | indent
    expect_eq "four volumes, all ready" "$(jq -r '[.[] | select(.state == "ready")] | length' <<<"$vols")" 4
    va=$(cat "$E2E_STATE_DIR/rig-vol-a")
    dev_a=$(vol "$va" | jq -r .device)
    check "vol-a device $dev_a exists" test -b "$dev_a"
    expect_eq "vol-a is still exactly 512MiB (the info block's data offset)" "$(blockdev --getsize64 "$dev_a")" $((512 * MIB))
    check "mount -o dax vol-a" mount_dax "$dev_a" /mnt/check-a xfs
    on_exit umount_if_mounted /mnt/check-a
    expect_eq "data written in boot 1 intact" "$(sha256sum </mnt/check-a/data)" "$(cat /mnt/check-a/data.sha256)"
    check "umount vol-a" umount /mnt/check-a

    # ---- a lost ledger is refused and rebuilt from the namespaces' markers
    log "lost ledger: refusal and pmemctl ledger rebuild"
    agent_stop
    lost_ledger_rebuild 4
    expect_eq "rebuilt vol-a keeps its extent" "$(vol "$va" | jq -r .offset_bytes)" "$(jq -r .offset_bytes <<<"$(jq -c --arg id "$va" '.[] | select(.id == $id)' <<<"$vols")")"
    check "mount -o dax rebuilt vol-a" mount_dax "$(vol "$va" | jq -r .device)" /mnt/check-a xfs
    expect_eq "data intact after the rebuild" "$(sha256sum </mnt/check-a/data)" "$(cat /mnt/check-a/data.sha256)"
    check "umount vol-a" umount /mnt/check-a
    vols=$(pmemctl_admin --json volumes)
    for id in $(jq -r '.[].id' <<<"$vols"); do
        check "delete $id" delete_erased "$id"
    done
    out=$(create vol-r 512MiB --limit 512MiB) || fail "create 512MiB exactly after the reboot"
    expect_eq "after the reboot 512MiB exactly is served: capacity_bytes" "$(jq -r .capacity_bytes <<<"$out")" $((512 * MIB))
    check "delete vol-r" delete_erased "$(jq -r .volume_id <<<"$out")"
    expect_eq "only the foreign and our identity namespaces are left" \
        "$(ndctl list -N | jq -r '[.[].name | select(startswith("pmem-agent-id:") | not)] | join(",")')" "$STATE_NS"
    agent_stop
    ;;
esac
