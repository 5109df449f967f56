"""Assemble a bootable disk (MBR, FAT boot partition with SYSLINUX, ext4 root) without mounts.

No loop devices and no root-only mounts: the FAT partition is written through mtools at a byte
offset inside the raw image, SYSLINUX is installed with its mtools installer (`syslinux --offset`),
the ext4 root is populated by `mkfs.ext4 -d` at its offset, and `qemu-img convert` makes the qcow2.
Partition 1 has MBR type 0xEF and the active flag, so SeaBIOS boots it through syslinux's mbr.bin
and OVMF finds EFI/BOOT/BOOTX64.EFI on it when a syslinux.efi is given.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
MIB = 1024 * 1024
SYSLINUX_BIOS = Path("/usr/lib/syslinux")
SYSLINUX_EFI64_MODULES = Path("/usr/lib/syslinux/modules/efi64")
# Fixed identities keep the images reproducible; every guest is a throwaway overlay anyway.
DISK_ID = "0x66636476"
FAT_SERIAL = "0x66636230"
ROOT_UUID = "6663642d-7465-7374-2d67-756573742121"
ROOT_LABEL = "fcdev-root"
HOST_TOOLS = ["mtools", "syslinux", "syslinux-common", "e2fsprogs", "fdisk", "qemu-utils"]


@dataclass(frozen=True)
class DiskSpec:
    """What goes on the disk: boot files, the kernel command line and the root tree."""

    kernel: Path
    initrd: Path
    append: str
    root_dir: Path
    fat_mib: int = 64
    root_free_mib: int = 256
    syslinux_efi: Path | None = None
    ldlinux_e64: Path = SYSLINUX_EFI64_MODULES / "ldlinux.e64"
    extra_boot_files: dict[str, Path] = field(default_factory=dict)


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed with {proc.returncode}: {proc.stderr.strip()[-600:]}")


def _tree_mib(root: Path) -> int:
    """Bytes the tree needs on ext4, rounded up: 4 KiB per file/dir/link plus the data."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        total += 4096 * (1 + len(dirnames))
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            total += 4096 + ((st.st_size + 4095) // 4096) * 4096
    return (total + MIB - 1) // MIB


def syslinux_cfg(append: str) -> str:
    """One entry, no menu, no wait; SERIAL makes the loader's own lines visible on ttyS0."""
    return (
        "SERIAL 0 115200\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "DEFAULT linux\n"
        "LABEL linux\n"
        "  KERNEL /vmlinuz\n"
        "  INITRD /initrd.img\n"
        f"  APPEND {append}\n"
    )


def assemble(spec: DiskSpec, work: Path, out_qcow2: Path) -> None:
    """Write the raw disk in `work`, then convert it to `out_qcow2`."""
    fat_start = MIB
    fat_size = spec.fat_mib * MIB
    root_start = fat_start + fat_size
    root_mib = _tree_mib(spec.root_dir) * 5 // 4 + spec.root_free_mib
    root_size = root_mib * MIB
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(root_start + root_size + MIB)

    table = (
        f"label: dos\nlabel-id: {DISK_ID}\nunit: sectors\n"
        f"start={fat_start // SECTOR}, size={fat_size // SECTOR}, type=ef, bootable\n"
        f"start={root_start // SECTOR}, size={root_size // SECTOR}, type=83\n"
    )
    proc = subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(raw)],
                          input=table, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"sfdisk failed: {proc.stderr.strip()}")
    mbr = (SYSLINUX_BIOS / "mbr" / "mbr.bin").read_bytes()
    with raw.open("r+b") as f:
        f.write(mbr[:440])

    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", SOURCE_DATE_EPOCH="1700000000")
    img = f"{raw}@@{fat_start}"
    _run(["mformat", "-i", img, "-T", str(fat_size // SECTOR), "-h", "64", "-s", "32",
          "-H", str(fat_start // SECTOR), "-N", FAT_SERIAL[2:], "-v", "FCBOOT", "::"], env)
    _run(["syslinux", "--offset", str(fat_start), "--install", str(raw)], env)

    cfg = work / "syslinux.cfg"
    cfg.write_text(syslinux_cfg(spec.append))
    copies: list[tuple[Path, str]] = [
        (spec.kernel, "::/vmlinuz"), (spec.initrd, "::/initrd.img"), (cfg, "::/syslinux.cfg"),
    ]
    if spec.syslinux_efi is not None:
        _run(["mmd", "-i", img, "::/EFI", "::/EFI/BOOT"], env)
        copies += [
            (spec.syslinux_efi, "::/EFI/BOOT/BOOTX64.EFI"),
            (spec.ldlinux_e64, "::/EFI/BOOT/ldlinux.e64"),
            (cfg, "::/EFI/BOOT/syslinux.cfg"),
        ]
    copies += [(src, f"::/{dest}") for dest, src in spec.extra_boot_files.items()]
    for src, dest in copies:
        _run(["mcopy", "-i", img, "-o", str(src), dest], env)

    _run(["mkfs.ext4", "-F", "-q", "-L", ROOT_LABEL, "-U", ROOT_UUID, "-b", "4096",
          "-E", f"offset={root_start},hash_seed={ROOT_UUID},root_owner=0:0",
          "-d", str(spec.root_dir), str(raw), f"{root_mib}M"],
         dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000"))
    _run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out_qcow2)])
    raw.unlink()
