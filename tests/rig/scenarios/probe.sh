# rig: agent=none dimms=2
# Development probe: show what the guest sees.
log "kernel $(uname -r), uptime $(rig_uptime)"
ls /sys/bus/nd/devices/
ndctl list -RN
head -n 3 /proc/meminfo
ok "probe"
