#!/bin/sh
# mmdebstrap setup hook of the Debian test guest: the initramfs settings must exist before the kernel
# package builds its initrd. $1 = the new root, $2 = files/debian/rootfs.
set -eu
mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/usr/share/initramfs-tools/modules.d"
cp "$2/etc/initramfs-tools/conf.d/fcdev" "$1/etc/initramfs-tools/conf.d/fcdev"
cp "$2/usr/share/initramfs-tools/modules.d/fcdev" "$1/usr/share/initramfs-tools/modules.d/fcdev"
