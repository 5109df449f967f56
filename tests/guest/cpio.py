"""A deterministic gzip'd newc cpio archive (an initramfs) from a directory tree.

Written here rather than with cpio(1) so that owners (root), times (0) and order (sorted) are fixed:
the same inputs give the same bytes.
"""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path


def _header(ino: int, mode: int, nlink: int, size: int, name: bytes) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + name + b"\0"
    return head + b"\0" * (-len(head) % 4)


def _entry(ino: int, mode: int, nlink: int, name: str, data: bytes) -> bytes:
    return _header(ino, mode, nlink, len(data), name.encode()) + data + b"\0" * (-len(data) % 4)


def newc_gzip(root: Path, out: Path) -> None:
    """Archive everything under `root` (paths relative to it) into `out`, gzip level 6, mtime 0."""
    chunks: list[bytes] = []
    ino = 1
    paths = sorted(p for p in root.rglob("*"))
    for path in paths:
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            chunks.append(_entry(ino, stat.S_IFLNK | 0o777, 1, rel, os.readlink(path).encode()))
        elif stat.S_ISDIR(st.st_mode):
            chunks.append(_entry(ino, stat.S_IFDIR | perm, 2, rel, b""))
        elif stat.S_ISREG(st.st_mode):
            chunks.append(_entry(ino, stat.S_IFREG | perm, 1, rel, path.read_bytes()))
        else:
            raise ValueError(f"{path}: only files, directories and symlinks go into an initramfs")
        ino += 1
    chunks.append(_entry(0, 0, 1, "TRAILER!!!", b""))
    with out.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        gz.write(b"".join(chunks))
