#!/bin/sh
# mmdebstrap customize hook of the Debian test guest: $1 = the new root, $2 = files/debian/rootfs,
# $3 = the stand-in agent's files (staged by debian.py from tests/support/standin_agent.py).
set -eu
umask 022
root=$1
# Explicit modes: a git checkout keeps only the exec bit.
copy_tree() {
    (cd "$1" && find . -type f) | while IFS= read -r f; do
        mkdir -p "$root/$(dirname "$f")"
        cp "$1/$f" "$root/$f"
        if [ -x "$1/$f" ]; then chmod 0755 "$root/$f"; else chmod 0644 "$root/$f"; fi
    done
}
copy_tree "$2"
copy_tree "$3"
chmod 0440 "$root/etc/sudoers.d/fcdev-user"
chroot "$root" useradd --create-home --shell /bin/bash --groups sudo user
echo 'user:user' | chroot "$root" chpasswd
chroot "$root" systemctl enable systemd-networkd.service flightctl-agent.path
# Boot speed under TCG (1 vCPU): no timers, no pseudo file systems and module loads nobody uses here.
chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    e2scrub_reap.service systemd-pstore.service systemd-hwdb-update.service \
    modprobe@loop.service modprobe@dm_mod.service modprobe@fuse.service modprobe@drm.service \
    modprobe@efi_pstore.service dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount \
    sys-kernel-tracing.mount sys-fs-fuse-connections.mount
# The udev hardware database only names vendors and models: not needed in a test VM (~10 MB).
rm -f "$root/etc/udev/hwdb.bin" "$root/usr/lib/udev/hwdb.bin"
# Each guest is a new machine: no host keys, no machine id in the image.
rm -f "$root"/etc/ssh/ssh_host_*
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
