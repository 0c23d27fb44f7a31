# shellcheck shell=bash
# Building the rig's parts from Debian packages, cached under $RIG_CACHE:
#   qemu/      qemu-system-x86 + firmware, unpacked (not installed: it conflicts
#              with newer qemu-utils); its runtime libraries are apt-installed.
#   kernel/    Debian's linux-image-amd64: uncompressed vmlinux (PVH boot) and
#              the modules the guest needs, with their dependencies.
#   initramfs/ base-<key>.cpio: busybox, bash, ndctl, lvm2, xfsprogs, e2fsprogs,
#              util-linux, kmod and jq from the host, with their libraries.
# Per run, a small overlay cpio (init, guest scripts, scenario, agent
# binaries) is appended to the cached base; see build_overlay.
#
# Bump a component's version below when the way it is built changes.

readonly RIG_QEMU_BUILD=1
readonly RIG_KERNEL_BUILD=1
readonly RIG_INITRAMFS_BUILD=1

# Host packages the rig itself uses, and whose binaries go into the guest.
readonly RIG_HOST_PKGS=(busybox-static bash ndctl daxctl lvm2 dmsetup xfsprogs e2fsprogs util-linux
    kmod cpio jq binutils python3 coreutils udev)

# Modules loaded at every boot (with dependencies). xfs and ext4 load on
# demand through the kernel's request_module (/sbin/modprobe in the guest).
readonly RIG_BOOT_MODULES=(nfit nd_pmem nd_btt dax_pmem device_dax dm_mod loop)
# Modules available in the guest.
readonly RIG_MODULES=("${RIG_BOOT_MODULES[@]}" kmem xfs ext4 dm_snapshot dm_thin_pool
    dm_crypt virtio_pci virtio_blk)

RIG_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# ---------------------------------------------------------------- QEMU

# Sets QEMU_BIN and QEMU_FW_ARGS.
# shellcheck disable=SC2034  # used by tests/rig/run
build_qemu() {
    local dir=$RIG_CACHE/qemu
    local stamp=$dir/.done-$RIG_QEMU_BUILD
    if [[ ! -f $stamp ]]; then
        say "qemu: downloading qemu-system-x86 from Debian"
        rm -rf "$dir"
        mkdir -p "$dir/debs"
        apt_download "$dir/debs" qemu-system-x86 qemu-system-common qemu-system-data seabios
        local deb
        for deb in "$dir"/debs/*.deb; do
            dpkg-deb -x "$deb" "$dir/root" || setup_error "dpkg-deb -x $deb failed"
        done
        # Runtime libraries from the packages' Depends (not the qemu packages
        # themselves, which we only unpack).
        local deps
        deps=$(dpkg-deb -f "$(deb_of "$dir/debs" qemu-system-x86)" Depends | tr ',' '\n' | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' |
            grep -v -E '^(qemu-|seabios$|ipxe-qemu$|$)' | sort -u)
        # shellcheck disable=SC2086
        ensure_pkgs $deps
        touch "$stamp"
    fi
    QEMU_BIN=$dir/root/usr/bin/qemu-system-x86_64
    [[ -x $QEMU_BIN ]] || setup_error "qemu: $QEMU_BIN missing (remove $dir and retry)"
    if ldd "$QEMU_BIN" | grep -q 'not found'; then
        # The cache survived but the libraries did not (e.g. a new machine).
        rm -f "$stamp"
        warn "qemu: runtime libraries missing, reinstalling"
        build_qemu
        return
    fi
    QEMU_FW_ARGS=(-L "$dir/root/usr/share/qemu" -L "$dir/root/usr/share/seabios")
}

# ---------------------------------------------------------------- kernel

# Sets KERNEL_VERSION, KERNEL_DIR (vmlinux, modules/lib/modules/VERSION).
build_kernel() {
    local dir=$RIG_CACHE/kernel
    local stamp=$dir/.done-$RIG_KERNEL_BUILD
    if [[ ! -f $stamp ]]; then
        rm -rf "$dir"
        mkdir -p "$dir/debs"
        apt_update_once
        local image
        image=$(apt-cache depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [[ -n $image ]] || setup_error "kernel: cannot resolve linux-image-amd64"
        say "kernel: downloading $image from Debian"
        apt_download "$dir/debs" "$image"
        local tree=$dir/tree
        dpkg-deb -x "$(deb_of "$dir/debs" "$image")" "$tree" ||
            setup_error "kernel: dpkg-deb -x failed"
        local version
        version=$(basename "$(ls -d "$tree"/lib/modules/*/ | head -n 1)")
        [[ -n $version ]] || setup_error "kernel: no modules directory in $image"
        say "kernel: extracting vmlinux from vmlinuz-$version"
        python3 "$RIG_LIB_DIR/kernel.py" extract-vmlinux \
            "$tree/boot/vmlinuz-$version" "$dir/vmlinux" ||
            setup_error "kernel: cannot extract vmlinux (need it for PVH boot)"
        cp "$tree/boot/config-$version" "$dir/config"
        # Module dependencies: depmod the full tree once, then copy the
        # closure of the modules we want.
        depmod -b "$tree" "$version" || setup_error "kernel: depmod failed"
        local mods=$dir/modules/lib/modules/$version m
        mkdir -p "$mods"
        local files
        files=$(for m in "${RIG_MODULES[@]}"; do
            modprobe -C /nonexistent -d "$tree" -S "$version" --show-depends "$m" ||
                setup_error "kernel: module $m not found"
        done | awk '$1 == "insmod" { print $2 }' | sort -u)
        local f rel
        for f in $files; do
            rel=${f#"$tree"/lib/modules/"$version"/}
            mkdir -p "$mods/$(dirname "$rel")"
            cp "$f" "$mods/$rel"
        done
        cp "$tree/lib/modules/$version"/modules.{builtin,builtin.modinfo,order} "$mods/"
        # Signature checking costs ~20% of the load time under TCG; the
        # kernel loads unsigned modules (it only taints).
        find "$mods" -name '*.ko' -exec python3 "$RIG_LIB_DIR/kernel.py" strip-modsig {} + ||
            setup_error "kernel: strip-modsig failed"
        depmod -b "$dir/modules" "$version" || setup_error "kernel: depmod (subset) failed"
        rm -rf "$tree"
        echo "$version" >"$dir/version"
        touch "$stamp"
    fi
    KERNEL_DIR=$dir
    KERNEL_VERSION=$(cat "$dir/version")
}

# ---------------------------------------------------------------- initramfs

# Copy a host executable (resolving symlinks) and its shared libraries into
# the staging root $1, at the same path.
stage_binary() {
    local root=$1 bin=$2 real
    real=$(readlink -f "$bin")
    [[ -x $real ]] || setup_error "initramfs: $bin missing on the host"
    install -D -m 0755 "$real" "$root$bin"
    stage_libs "$root" "$real"
}

# Copy the shared libraries (ldd) of ELF file $2 into staging root $1, at
# their /usr-merged paths (/lib and /lib64 are symlinks into /usr in the
# guest; an archive entry for a real /lib directory would replace them).
# Libraries listed in file $3 (optional: the base image's contents) are
# skipped.
stage_libs() {
    local root=$1 file=$2 skip=${3:-/dev/null} lib dest
    # Static binaries: ldd says "not a dynamic executable" and fails.
    ldd "$file" >/dev/null 2>&1 || return 0
    while read -r lib; do
        dest=$lib
        [[ $dest == /lib/* || $dest == /lib64/* ]] && dest=/usr$dest
        [[ -e $root$dest ]] && continue
        grep -qxF ".$dest" "$skip" && continue
        install -D -m 0755 "$(readlink -f "$lib")" "$root$dest"
    done < <(ldd "$file" | awk -v f="$file" '
        /not found/ { print "rig: warning: " f ": " $1 " not found" > "/dev/stderr"; next }
        $2 == "=>" && $3 ~ /^\// { print $3; next }
        $1 ~ /^\// { print $1 }')
}

# Sets INITRAMFS_BASE (an uncompressed newc cpio).
build_base_initramfs() {
    local dir=$RIG_CACHE/initramfs
    mkdir -p "$dir"
    # Key: the build recipe, this file, the kernel and the host packages'
    # versions. A host upgrade or a change here rebuilds the base.
    local key
    key=$({
        echo "$RIG_INITRAMFS_BUILD $KERNEL_VERSION"
        cat "$RIG_LIB_DIR/build.sh" "$RIG_LIB_DIR/../guest/lvm.conf"
        dpkg-query -W "${RIG_HOST_PKGS[@]}" strace 2>/dev/null
    } | sha256sum | cut -c1-16)
    INITRAMFS_BASE=$dir/base-$key.cpio
    [[ -f $INITRAMFS_BASE && -f ${INITRAMFS_BASE%.cpio}.list ]] && return 0

    say "initramfs: building base image from host binaries"
    local root
    root=$(mktemp -d "$dir/stage.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$root'" RETURN
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,run,tmp,mnt,root,var/tmp,rig/bin,bb}
    ln -s usr/bin "$root/bin"
    ln -s usr/sbin "$root/sbin"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"
    chmod 1777 "$root/tmp" "$root/var/tmp"

    # busybox: every applet as a link in /bb, last in PATH, so that real
    # binaries win (and scripts run with bash, not ash, which prefers applets).
    install -m 0755 /bin/busybox "$root/usr/bin/busybox"
    local applet
    for applet in $(/bin/busybox --list); do
        ln -s /usr/bin/busybox "$root/bb/$applet"
    done

    local b
    local bins=(
        /usr/bin/bash /usr/bin/ndctl /usr/bin/daxctl /usr/sbin/lvm /usr/sbin/dmsetup
        /usr/sbin/mkfs.xfs /usr/sbin/xfs_repair /usr/sbin/xfs_growfs /usr/sbin/xfs_db
        /usr/sbin/xfs_io /usr/sbin/xfs_spaceman /usr/sbin/xfs_admin /usr/sbin/xfs_info
        /usr/sbin/mke2fs /usr/sbin/e2fsck /usr/sbin/resize2fs /usr/sbin/tune2fs /usr/sbin/dumpe2fs
        /usr/bin/mount /usr/bin/umount /usr/sbin/blkid /usr/bin/lsblk /usr/sbin/losetup
        /usr/bin/fallocate /usr/bin/findmnt /usr/sbin/wipefs /usr/sbin/blockdev /usr/bin/flock
        /usr/bin/mountpoint /usr/bin/nsenter /usr/bin/unshare /usr/bin/setsid /usr/bin/dmesg
        /usr/sbin/fstrim /usr/bin/kmod /usr/bin/jq
        /usr/bin/dd /usr/bin/stat /usr/bin/truncate /usr/bin/timeout /usr/bin/sha256sum
        /usr/bin/sort /usr/bin/date /usr/bin/df /usr/bin/du /usr/bin/ls /usr/bin/cp
        /usr/bin/sync /usr/bin/env /usr/bin/cat /usr/bin/stty /usr/bin/udevadm
    )
    for b in "${bins[@]}"; do
        stage_binary "$root" "$b"
    done
    [[ -x /usr/bin/strace ]] && stage_binary "$root" /usr/bin/strace
    # glibc dlopens libgcc_s for thread cancellation and unwinding.
    local extra=/usr/lib/x86_64-linux-gnu/libgcc_s.so.1
    [[ -e $root$extra ]] || install -D -m 0755 "$(readlink -f "$extra")" "$root$extra"
    # Alias names of the copied binaries.
    for b in /usr/sbin/*; do
        if [[ -L $b && $(readlink "$b") == lvm ]]; then ln -sf lvm "$root$b"; fi
    done
    ln -s mke2fs "$root/usr/sbin/mkfs.ext4"
    ln -s mke2fs "$root/usr/sbin/mkfs.ext2"
    ln -s e2fsck "$root/usr/sbin/fsck.ext4"
    for b in modprobe insmod rmmod lsmod modinfo depmod; do
        ln -s ../bin/kmod "$root/usr/sbin/$b"
    done
    ln -s bash "$root/usr/bin/sh"
    # udevadm is udevd when called by this name; scenarios start it themselves.
    mkdir -p "$root/usr/lib/systemd"
    ln -s ../../bin/udevadm "$root/usr/lib/systemd/systemd-udevd"

    # Configuration.
    install -D -m 0644 "$RIG_LIB_DIR/../guest/lvm.conf" "$root/etc/lvm/lvm.conf"
    [[ -f /etc/mke2fs.conf ]] && cp /etc/mke2fs.conf "$root/etc/"
    printf 'root:x:0:0:root:/root:/bin/bash\n' >"$root/etc/passwd"
    printf 'root:x:0:\ndisk:x:6:\n' >"$root/etc/group"
    printf 'passwd: files\ngroup: files\n' >"$root/etc/nsswitch.conf"
    ln -s /proc/self/mounts "$root/etc/mtab"
    echo rig >"$root/etc/hostname"

    # Kernel modules.
    cp -a "$KERNEL_DIR/modules/lib/modules" "$root/usr/lib/"

    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort >"$INITRAMFS_BASE.list.tmp" &&
        cpio -o -H newc -R 0:0 --quiet <"$INITRAMFS_BASE.list.tmp" >"$INITRAMFS_BASE.tmp") ||
        setup_error "initramfs: cpio failed"
    mv "$INITRAMFS_BASE.list.tmp" "${INITRAMFS_BASE%.cpio}.list"
    mv "$INITRAMFS_BASE.tmp" "$INITRAMFS_BASE"
    # Older bases are dead weight.
    find "$dir" -maxdepth 1 -name 'base-*' ! -name "$(basename "${INITRAMFS_BASE%.cpio}").*" -delete
    say "initramfs: base $(du -h "$INITRAMFS_BASE" | cut -f1)"
}

# build_overlay OUT.cpio: the per-run part of the initramfs (/init, guest
# library, scenario, agent binaries and extra binaries). Uses RIG_SCENARIO_FILE,
# RIG_AGENT_BINS (paths) and RIG_EXTRA_BINS (paths).
build_overlay() {
    local out=$1 root f name
    root=$(mktemp -d "$RIG_RUN_DIR/overlay.XXXXXX")
    mkdir -p "$root/rig/bin"
    local guest=$RIG_LIB_DIR/../guest
    install -m 0755 "$guest/init" "$root/init"
    install -m 0644 "$guest/lib.sh" "$guest/e2e.sh" "$root/rig/"
    install -m 0755 "$guest/run-scenario" "$root/rig/"
    install -m 0644 "$RIG_SCENARIO_FILE" "$root/rig/scenario.sh"
    for f in "${RIG_AGENT_BINS[@]}" "${RIG_EXTRA_BINS[@]}"; do
        name=$(basename "$f")
        # Debug info is most of a debug build's size; the guest needs none.
        objcopy --strip-debug "$f" "$root/rig/bin/$name" 2>/dev/null || cp "$f" "$root/rig/bin/$name"
        chmod 0755 "$root/rig/bin/$name"
        stage_libs "$root" "$f" "${INITRAMFS_BASE%.cpio}.list"
    done
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --quiet >"$out") || setup_error "overlay cpio failed"
    rm -rf "$root"
}
