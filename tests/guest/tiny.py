"""The tiny test guest: Debian's cloud kernel, busybox, dropbear and a FAKE cloud-init (sh + awk).

Boots in seconds under TCG. Everything comes from Debian .debs unpacked with dpkg-deb (no chroot, no
maintainer scripts); the recipe files are under files/tiny. What is fake (see README.md): cloud-init
(a NoCloud reader for the plugin's #cloud-config subset), sudo (every login user is uid 0) and bash
(busybox ash).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.guest import apt, cpio, disk

FILES = Path(__file__).parent / "files" / "tiny"
# Packages unpacked into the root file system (dropbear's and sftp-server's shared libraries too).
ROOT_PACKAGES = [
    "busybox-static", "dropbear-bin", "openssh-sftp-server",
    "libc6", "libcrypt1", "libtomcrypt1", "libtommath1", "libgmp10", "zlib1g",
]
BOOT_PACKAGES = ["syslinux-efi", "syslinux-common"]
PACKAGES = ROOT_PACKAGES + BOOT_PACKAGES
HOST_PACKAGES = disk.HOST_TOOLS
# Modules the initramfs loads (with their dependencies): disk, NIC, seed CD-ROM, entropy.
MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_scsi", "sd_mod", "sr_mod", "isofs", "virtio_rng"]
APPEND = "root=LABEL=fcdev-root rw console=ttyS0,115200"
DROP = ["usr/share/doc", "usr/share/man", "usr/share/lintian", "usr/share/locale", "usr/share/info",
        "usr/lib/x86_64-linux-gnu/gconv", "usr/share/bug"]


def recipe_files() -> list[Path]:
    """Every file whose bytes shape the image (for the cache key)."""
    return sorted(p for p in FILES.rglob("*") if p.is_file())


def _copy_tree(src: Path, dest: Path) -> None:
    """Copy recipe files with explicit modes (git keeps only the exec bit): 0755 or 0644, shadow 0600."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            target.chmod(0o755)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.copyfile(path, target)
        target.chmod(0o755 if os.access(path, os.X_OK) else 0o644)
    shadow = dest / "etc" / "shadow"
    if shadow.exists():
        shadow.chmod(0o600)


def _busybox_links(root: Path) -> None:
    """One symlink per busybox applet, where the packages put no real program."""
    out = subprocess.run([str(root / "bin" / "busybox"), "--list-full"],
                         capture_output=True, text=True, check=True).stdout
    for rel in out.split():
        link = root / rel
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _check_libraries(root: Path, programs: list[str]) -> None:
    """Fail the build if a program needs a shared library the image lacks."""
    loader = root / "lib64" / "ld-linux-x86-64.so.2"
    libpath = f"{root}/lib/x86_64-linux-gnu:{root}/usr/lib/x86_64-linux-gnu"
    for program in programs:
        out = subprocess.run([str(loader), "--library-path", libpath, "--list", str(root / program)],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            match = re.search(r"=> (\S+)", line)
            if match and not match.group(1).startswith(str(root)):
                raise RuntimeError(f"tiny guest: {program} needs {line.strip()}, which no recipe package ships")


def _module_deps(moddir: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Module name -> file and name -> dependencies, read from each .ko's modinfo `depends=`."""
    files: dict[str, Path] = {}
    deps: dict[str, list[str]] = {}
    for ko in moddir.rglob("*.ko"):
        name = ko.stem.replace("-", "_")
        files[name] = ko
        match = re.search(rb"\0depends=([^\0]*)\0", ko.read_bytes())
        deps[name] = [d for d in (match.group(1).decode().split(",") if match else []) if d]
    return files, deps


def _load_order(wanted: list[str], deps: dict[str, list[str]]) -> list[str]:
    """Dependencies first (depth-first), each module once."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in deps:
            raise RuntimeError(f"tiny guest: kernel module {name} is not in the kernel package")
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    for name in wanted:
        visit(name)
    return order


def _initramfs(kernel_root: Path, busybox: Path, work: Path) -> Path:
    """A small initramfs: busybox, /init and the modules needed to find the root and the seed."""
    moddir = next((kernel_root / "lib" / "modules").iterdir())
    files, deps = _module_deps(moddir)
    tree = work / "initramfs"
    (tree / "bin").mkdir(parents=True)
    shutil.copyfile(busybox, tree / "bin" / "busybox")
    (tree / "bin" / "busybox").chmod(0o755)
    (tree / "bin" / "sh").symlink_to("busybox")
    shutil.copyfile(FILES / "initramfs" / "init", tree / "init")
    (tree / "init").chmod(0o755)
    lines: list[str] = []
    for name in _load_order(MODULES, deps):
        rel = files[name].relative_to(moddir)
        (tree / "lib" / "modules" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(files[name], tree / "lib" / "modules" / rel)
        lines.append(rel.as_posix())
    (tree / "lib" / "modules" / "load-order").write_text("\n".join(lines) + "\n")
    for d in ("dev", "proc", "sys", "newroot"):
        (tree / d).mkdir()
    out = work / "initrd.img"
    cpio.newc_gzip(tree, out)
    return out


def build(versions: dict[str, str], deb_dir: Path, work: Path, out_qcow2: Path) -> None:
    """Build the tiny guest image at `out_qcow2` from the pinned `versions`, using `work` as scratch."""
    kernel_pkg = next(n for n in versions if re.fullmatch(r"linux-image-\d.*-cloud-amd64", n))
    debs = apt.download({n: versions[n] for n in [*PACKAGES, kernel_pkg]}, deb_dir)
    root = work / "root"
    root.mkdir()
    root.chmod(0o755)
    for name in ROOT_PACKAGES:
        apt.extract(debs[name], root)
    for rel in DROP:
        shutil.rmtree(root / rel, ignore_errors=True)
    _busybox_links(root)
    _copy_tree(FILES / "rootfs", root)
    for rel, mode in [("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777),
                      ("root", 0o700), ("home/user", 0o755), ("var/lib/cloud", 0o755),
                      ("etc/dropbear", 0o755), ("mnt", 0o755), ("var/log", 0o755),
                      ("var/tmp", 0o1777)]:
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel).chmod(mode)
    sftp = root / "usr" / "lib" / "sftp-server"  # where dropbear looks for it
    if not sftp.exists():
        sftp.symlink_to("openssh/sftp-server")
    _check_libraries(root, ["usr/sbin/dropbear", "usr/bin/dropbearkey", "usr/lib/openssh/sftp-server"])

    kernel_root = work / "kernel"
    apt.extract(debs[kernel_pkg], kernel_root)
    boot = work / "boot"
    for name in BOOT_PACKAGES:
        apt.extract(debs[name], boot)
    vmlinuz = next((kernel_root / "boot").glob("vmlinuz-*"))
    initrd = _initramfs(kernel_root, root / "bin" / "busybox", work)
    spec = disk.DiskSpec(
        kernel=vmlinuz, initrd=initrd, append=APPEND, root_dir=root, fat_mib=32, root_free_mib=64,
        syslinux_efi=boot / "usr/lib/SYSLINUX.EFI/efi64/syslinux.efi",
        ldlinux_e64=boot / "usr/lib/syslinux/modules/efi64/ldlinux.e64",
    )
    disk.assemble(spec, work, out_qcow2)
