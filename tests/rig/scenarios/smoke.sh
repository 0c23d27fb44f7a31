# rig: agent=required dimms=2 dimm-size=2G labels=1
# smoke: the rig's kernel really has what the host lacks, and pmem-agent runs
# in it.
#  1. libnvdimm regions of the emulated DIMMs in /sys/bus/nd, labeled
#  2. an fsdax namespace -> /dev/pmemN, xfs mounted with -o dax, DAX
#     confirmed from /proc/mounts and per file (statx), data survives a
#     remount
#  3. device-mapper: LVM on a second namespace, ext4 on the LV with DAX
#  4. a devdax namespace -> /dev/daxN.M
#  5. namespaces destroyed, region space back
#  6. pmem-agent (sim backend) started in the guest and driven over its
#     sockets with pmemctl: identity (Probe ready), regions, capacity,
#     create and delete a volume, graceful stop

GIB=$((1024 * 1024 * 1024))

# ---- 1. regions
log "regions"
mapfile -t R < <(regions)
expect_eq "regions in /sys/bus/nd (one per DIMM)" "${#R[@]}" "$RIG_DIMMS"
for r in "${R[@]}"; do
    expect_eq "$(basename "$r") size" "$(<"$r/size")" "$RIG_DIMM_SIZE"
    expect_eq "$(basename "$r") is labeled (nstype 5)" "$(<"$r/nstype")" 5
    expect_eq "$(basename "$r") all space available" "$(<"$r/available_size")" "$RIG_DIMM_SIZE"
done

# ---- 2. fsdax + xfs + DAX
log "fsdax namespace on region0, xfs with -o dax"
ns=$(ns_create region0 512M rig-xfs)
indent <<<"$ns"
dev=/dev/$(jq -r .blockdev <<<"$ns")
expect_eq "namespace rig-xfs mode" "$(jq -r .mode <<<"$ns")" fsdax
check "$dev is a block device" test -b "$dev"
check "mkfs.xfs $dev" mkfs.xfs -q -f "$dev"
check "mount -o dax xfs: dax in /proc/mounts" mount_dax "$dev" /mnt/xfs xfs
on_exit umount_if_mounted /mnt/xfs
grep " /mnt/xfs " /proc/mounts | indent
dd if=/dev/urandom of=/mnt/xfs/data bs=1M count=8 status=none
sum=$(sha256sum </mnt/xfs/data)
# STATX_ATTR_DAX (0x200000) says the file is accessed through DAX.
attrs=$(xfs_io -r -c 'statx -r' /mnt/xfs/data | awk '$1 == "stat.attributes" { print $3 }')
if (( (attrs & 0x200000) != 0 )); then ok "file on xfs uses DAX (statx attributes $attrs)"; else fail "file on xfs is not DAX (statx attributes $attrs)"; fi
check "umount xfs" umount /mnt/xfs
check "remount xfs with -o dax" mount_dax "$dev" /mnt/xfs xfs
expect_eq "file contents survive the remount" "$(sha256sum </mnt/xfs/data)" "$sum"
check "umount xfs" umount /mnt/xfs

# ---- 3. LVM (device-mapper) + ext4 + DAX
log "LVM on an fsdax namespace on region1, ext4 with -o dax"
ns=$(ns_create region1 1G rig-lvm)
pv=/dev/$(jq -r .blockdev <<<"$ns")
check "pvcreate $pv" pvcreate -q "$pv"
check "vgcreate rigvg" vgcreate -q rigvg "$pv"
check "lvcreate rigvg/lv0" lvcreate -q -y -L 256M -n lv0 rigvg
on_exit "! vgs rigvg >/dev/null 2>&1 || vgchange -q -an rigvg"
check "/dev/rigvg/lv0 exists (no udev)" test -b /dev/rigvg/lv0
dmsetup table rigvg-lv0 | indent
check "mkfs.ext4 -b 4096 on the LV (DAX needs page-sized blocks)" mkfs.ext4 -q -F -b 4096 /dev/rigvg/lv0
check "mount -o dax ext4 on LVM: dax in /proc/mounts" mount_dax /dev/rigvg/lv0 /mnt/ext4 ext4
on_exit umount_if_mounted /mnt/ext4
grep " /mnt/ext4 " /proc/mounts | indent
echo "hello from the rig" >/mnt/ext4/hello
check "umount ext4" umount /mnt/ext4
check "lvremove, vgremove, pvremove" bash -c 'lvremove -q -y rigvg/lv0 && vgremove -q -y rigvg && pvremove -q -y '"$pv"

# ---- 4. devdax
log "devdax namespace on region1"
ns=$(ns_create region1 256M rig-devdax devdax)
chardev=/dev/$(jq -r '.daxregion.devices[0].chardev' <<<"$ns")
expect_eq "namespace rig-devdax mode" "$(jq -r .mode <<<"$ns")" devdax
check "$chardev is a character device" test -c "$chardev"

# ---- 5. destroy
log "destroying the namespaces"
check "ndctl destroy-namespace all" ndctl destroy-namespace -f all
for r in "${R[@]}"; do
    expect_eq "$(basename "$r") space back" "$(<"$r/available_size")" "$RIG_DIMM_SIZE"
done

# ---- 6. pmem-agent
log "pmem-agent (sim backend) in the guest"
agent_start
out=$(pmemctl_csi identity)
indent <<<"$out"
ok "pmemctl identity: Probe ready"
check "pmemctl regions (admin socket)" pmemctl_admin regions
pmemctl_admin regions | indent
check "pmemctl csi capacity" csi capacity
csi capacity | indent
out=$(pmemctl_csi --json csi create rig-vol --size 1GiB) || fail "pmemctl csi create rig-vol --size 1GiB"
indent <<<"$out"
ok "pmemctl csi create rig-vol --size 1GiB"
vol=$(jq -r '.volume_id // empty' <<<"$out")
[[ -n $vol ]] || fail "no volume_id in the CreateVolume answer"
expect_eq "volume capacity" "$(jq -r .capacity_bytes <<<"$out")" "$GIB"
pmemctl_admin volumes | indent
check "pmemctl csi delete $vol" csi delete "$vol"
agent_stop
