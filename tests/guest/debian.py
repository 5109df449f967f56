"""The Debian test guest: a real systemd + cloud-init + OpenSSH system standing in for the device image.

`mmdebstrap --variant=minbase bookworm` with the packages below pinned to the versions in the cache
key, then the customize hook (files/debian) adds the settings of a flightctl device image: NoCloud as
the only datasource, ed25519 host keys generated at first boot, `user`/`user` with passwordless sudo,
systemd-networkd with DHCP, and the stand-in agent (tests/support/standin_agent.py, a FAKE of
flightctl-agent) as flightctl-agent.service, started by flightctl-agent.path once cloud-init has
written /etc/flightctl/config.yaml (the unit's comment says why). Booted through
SYSLINUX (BIOS) or syslinux.efi (UEFI) from a FAT partition like the tiny guest (disk.py);
`net.ifnames=0` names the NIC eth0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.guest import apt, disk
from tests.support import standin_agent

FILES = Path(__file__).parent / "files" / "debian"
SUITE = "bookworm"
MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
GUEST_PACKAGES = [
    "systemd-sysv", "udev", "dbus", "initramfs-tools", "cloud-init", "openssh-server", "sudo",
    "iproute2", "isc-dhcp-client", "less",
    "skopeo",  # a real containers/image client honouring registries.conf.d (registry tests)
    "openssl",  # the stand-in agent makes its key and CSR with the openssl CLI
]
BOOT_PACKAGES = ["syslinux-efi", "syslinux-common"]  # BOOTX64.EFI for UEFI boots, from the mirror too
PACKAGES = GUEST_PACKAGES + BOOT_PACKAGES
HOST_PACKAGES = [*disk.HOST_TOOLS, "mmdebstrap"]
APPEND = "root=LABEL=fcdev-root rw console=ttyS0,115200 net.ifnames=0"
EXCLUDES = ["/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
            "/usr/share/lintian/*", "/usr/share/bug/*", "/usr/share/i18n/*", "/lib/udev/hwdb.d/*",
            "/usr/lib/udev/hwdb.d/*"]


def recipe_files() -> list[Path]:
    """Every file whose bytes shape the image (for the cache key)."""
    return sorted(p for p in FILES.rglob("*") if p.is_file())  # standin_agent.py: a link to tests/support


def _stage_agent(staging: Path) -> Path:
    """The stand-in agent's files (script, service, path unit) as a tree the customize hook copies."""
    for guest_path, content, mode in standin_agent.guest_files():
        target = staging / guest_path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    return staging


def _mmdebstrap(pins: dict[str, str], root: Path, agent: Path) -> None:
    q = shlex.quote
    cmd = [
        "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory", "--quiet",
        "--aptopt=APT::Install-Recommends \"false\"",
        f"--include={','.join(f'{n}={v}' for n, v in sorted(pins.items()))}",
        *[f"--dpkgopt=path-exclude={p}" for p in EXCLUDES],
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        f"--setup-hook=sh {q(str(FILES / 'setup.sh'))} \"$1\" {q(str(FILES / 'rootfs'))}",
        f"--customize-hook=sh {q(str(FILES / 'customize.sh'))} \"$1\" {q(str(FILES / 'rootfs'))} {q(str(agent))}",
        SUITE, str(root), *MIRRORS,
    ]
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", LC_ALL="C.UTF-8")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")


def build(versions: dict[str, str], deb_dir: Path, work: Path, out_qcow2: Path) -> None:
    """Build the Debian guest image at `out_qcow2` from the pinned `versions`, using `work` as scratch."""
    if os.geteuid() != 0:
        raise RuntimeError("the debian guest is built with `mmdebstrap --mode=root`; run the build as root")
    kernel_pkg = next(n for n in versions if re.fullmatch(r"linux-image-\d.*-cloud-amd64", n))
    pins = {n: versions[n] for n in [*GUEST_PACKAGES, "linux-image-cloud-amd64", kernel_pkg]}
    root = work / "root"
    _mmdebstrap(pins, root, _stage_agent(work / "agent"))
    root.chmod(0o755)
    boot = work / "boot"
    boot.mkdir()
    vmlinuz = next((root / "boot").glob("vmlinuz-*"))
    initrd = next((root / "boot").glob("initrd.img-*"))
    shutil.copyfile(vmlinuz, boot / "vmlinuz")
    shutil.move(initrd, boot / "initrd.img")  # generated, owned by no package: not needed on the root
    for link in ("initrd.img", "initrd.img.old"):
        (root / link).unlink(missing_ok=True)
    debs = apt.download({n: versions[n] for n in BOOT_PACKAGES}, deb_dir)
    efi = work / "efi"
    for name in BOOT_PACKAGES:
        apt.extract(debs[name], efi)
    spec = disk.DiskSpec(kernel=boot / "vmlinuz", initrd=boot / "initrd.img", append=APPEND,
                         root_dir=root, fat_mib=64, root_free_mib=512,
                         syslinux_efi=efi / "usr/lib/SYSLINUX.EFI/efi64/syslinux.efi",
                         ldlinux_e64=efi / "usr/lib/syslinux/modules/efi64/ldlinux.e64")
    disk.assemble(spec, work, out_qcow2)
