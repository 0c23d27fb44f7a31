# rig: shell=1 agent=optional timeout=86400
# shell: an interactive bash in the guest, for trying things by hand. The
# DIMMs are set up (labels written unless --no-labels); pmem-agent and
# pmemctl are in PATH when built. Exit the shell (or Ctrl-D) to power off;
# Ctrl-A X kills the guest.
log "guest ready: $RIG_DIMMS emulated NVDIMM(s), kernel $(uname -r)"
echo "# try: ndctl list -RN; ndctl create-namespace -r region0 -s 1G -n demo; mkfs.xfs /dev/pmem0; mount -o dax /dev/pmem0 /mnt"
if have_agent; then
    echo "# agent: E2E helpers are not in the shell; start it with:"
    echo "#   pmem-agent --backend sim --state-dir /var/lib/pmem-agent --endpoint unix:///run/pmem-agent/csi.sock --admin-endpoint unix:///run/pmem-agent/admin.sock &"
    echo "#   pmemctl identity; pmemctl regions"
fi
