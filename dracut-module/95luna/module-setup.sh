#!/bin/bash
# dracut module 95luna: root=luna installs the node's OS image into $NEWROOT (/sysroot) with
# luna-agent once the network is up, then dracut switches root as usual.

# called by dracut
check() {
    # Only when asked for (--add luna / add_dracutmodules+=" luna ").
    return 255
}

# called by dracut
depends() {
    # network-legacy brings up BOOTIF (ip= static or dhcp) and calls our netroot handler.
    echo network-legacy
    return 0
}

# called by dracut
installkernel() {
    instmods tmpfs overlay xfs ext4 || :
    # root = disk: the ESP (vfat with its default code page and I/O charset: cp437 and, on
    # Debian's kernels (FAT_DEFAULT_IOCHARSET), ascii; without nls_ascii the ESP mount fails with
    # "IO charset ascii not found") and the usual disk controllers.
    instmods vfat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 || :
    instmods virtio_blk virtio_scsi sd_mod ahci nvme || :
    # ext4's metadata checksums (a soft dependency instmods may not follow)
    instmods crc32c crc32c_generic || :
    # root mode overlay: the image is a squashfs on a loop device under an overlayfs.
    instmods squashfs loop || :
    # setupbmc: the agent loads these to reach the BMC through /dev/ipmi0.
    instmods ipmi_msghandler ipmi_devintf ipmi_si || :
    return 0
}

luna_agent_binary() {
    local _bin
    for _bin in "${LUNA_AGENT_BIN:-}" /usr/lib/luna/luna-agent; do
        if [[ -n $_bin && -x $_bin ]]; then
            echo "$_bin"
            return 0
        fi
    done
    return 1
}

# called by dracut
install() {
    local _agent _tool
    if ! _agent=$(luna_agent_binary); then
        dfatal "95luna: luna-agent not found (set LUNA_AGENT_BIN or install /usr/lib/luna/luna-agent)"
        return 1
    fi
    # inst_binary: a static build needs nothing else, a dynamic one gets its libraries.
    inst_binary "$_agent" /usr/bin/luna-agent

    # What the agent and the group's scripts call. Optional ones only if the host has them.
    inst_multiple sh mount umount chroot sleep ip
    # root = disk: the default part-script needs sfdisk, partx, wipefs, mkfs.vfat, mkfs.ext4 and
    # udevadm; the agent needs blkid (filesystem UUIDs for fstab).
    for _tool in modprobe mkfs.ext4 mkfs.xfs mkfs.vfat mkfs.fat sfdisk partx parted wipefs blkid udevadm \
        tar zstd mkdir cat setsid reboot; do
        inst_multiple -o "$_tool"
    done
    # mkfs.ext4 with the host's defaults (the compiled-in ones may differ, e.g. features the
    # image's grub cannot read)
    [[ -e /etc/mke2fs.conf ]] && inst_simple /etc/mke2fs.conf

    # The TLS stack of the agent's HTTP clients (its own and librqbit's tracker client) refuses
    # to start without CA certificates, even for plain http: ship the host's bundle.
    local _ca
    for _ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt \
        /etc/ssl/ca-bundle.pem /etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem; do
        [[ -e $_ca ]] && inst_simple "$_ca"
    done

    inst_hook cmdline 90 "$moddir/parse-luna.sh"
    inst_hook mount 90 "$moddir/luna-mount.sh"
    inst_script "$moddir/lunaroot.sh" /sbin/lunaroot
    inst_simple "$moddir/luna-lib.sh" /lib/luna-lib.sh

    if dracut_module_included "systemd"; then
        inst_simple "$moddir/luna-sysroot.conf" "${systemdsystemconfdir:-/etc/systemd/system}/sysroot.mount.d/luna.conf"
    fi

    dracut_need_initqueue
}
