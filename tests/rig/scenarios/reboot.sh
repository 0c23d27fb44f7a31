# rig: agent=none boots=2 dimms=2 dimm-size=2G labels=1
# reboot: what is on the NVDIMMs survives a reboot (the same backing files
# booted again, like a power cycle of a real machine).
#  boot 1: an fsdax namespace with xfs and a file on it; an LVM volume group
#          on a second namespace with ext4 and a file; clean shutdown
#  boot 2: the namespaces come back with the same names, modes and uuids,
#          the VG activates, both files are intact
# Run it with --backing-dir DIR to keep the DIMMs after the run, and again
# with --boots 1 on that DIR to inspect them.

case $RIG_BOOT in
1)
    log "boot 1: writing"
    ns=$(ns_create region0 512M rig-persist)
    dev=/dev/$(jq -r .blockdev <<<"$ns")
    uuid=$(jq -r .uuid <<<"$ns")
    check "mkfs.xfs $dev" mkfs.xfs -q -f "$dev"
    check "mount -o dax" mount_dax "$dev" /mnt/xfs xfs
    dd if=/dev/urandom of=/mnt/xfs/data bs=1M count=4 status=none
    sha256sum </mnt/xfs/data >/mnt/xfs/data.sha256
    echo "$uuid" >/mnt/xfs/namespace.uuid
    ok "wrote /mnt/xfs/data (namespace rig-persist, uuid $uuid)"
    check "umount xfs" umount /mnt/xfs

    ns=$(ns_create region1 512M rig-persist-lvm)
    pv=/dev/$(jq -r .blockdev <<<"$ns")
    check "pvcreate, vgcreate, lvcreate" bash -c "pvcreate -q $pv && vgcreate -q rigpvg $pv && lvcreate -q -y -L 128M -n lv0 rigpvg"
    check "mkfs.ext4" mkfs.ext4 -q -F -b 4096 /dev/rigpvg/lv0
    check "mount -o dax ext4" mount_dax /dev/rigpvg/lv0 /mnt/ext4 ext4
    echo "written in boot 1" >/mnt/ext4/marker
    check "umount ext4, deactivate the VG" bash -c "umount /mnt/ext4 && vgchange -q -an rigpvg"
    ;;
2)
    log "boot 2: checking"
    ns=$(ns_json rig-persist)
    [[ -n $ns ]] || { ndctl list -N | indent; fail "namespace rig-persist is gone after the reboot"; }
    ok "namespace rig-persist found after the reboot"
    indent <<<"$ns"
    expect_eq "rig-persist mode" "$(jq -r .mode <<<"$ns")" fsdax
    dev=/dev/$(jq -r .blockdev <<<"$ns")
    check "mount -o dax $dev" mount_dax "$dev" /mnt/xfs xfs
    on_exit umount_if_mounted /mnt/xfs
    expect_eq "rig-persist uuid unchanged" "$(jq -r .uuid <<<"$ns")" "$(cat /mnt/xfs/namespace.uuid)"
    expect_eq "file contents intact" "$(sha256sum </mnt/xfs/data)" "$(cat /mnt/xfs/data.sha256)"

    ns=$(ns_json rig-persist-lvm)
    [[ -n $ns ]] || fail "namespace rig-persist-lvm is gone after the reboot"
    ok "namespace rig-persist-lvm found after the reboot"
    check "vgchange -ay rigpvg (LVM metadata survived)" vgchange -q -ay rigpvg
    on_exit "! vgs rigpvg >/dev/null 2>&1 || vgchange -q -an rigpvg"
    check "mount -o dax the LV" mount_dax /dev/rigpvg/lv0 /mnt/ext4 ext4
    on_exit umount_if_mounted /mnt/ext4
    expect_eq "marker file on the LV intact" "$(cat /mnt/ext4/marker)" "written in boot 1"
    ;;
*)
    log "boot $RIG_BOOT: nothing to do"
    ;;
esac
