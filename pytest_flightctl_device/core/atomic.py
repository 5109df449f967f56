"""One atomic write for every file the plugin leaves for others to read.

Temp file in the same directory (named after its writer: `.NAME.PID-START.HEX.tmp`), fsync,
rename over the destination, fsync the directory. A reader sees the old file or the new one,
never half of one; a writer killed before its rename leaves a temp that `sweep_temps` removes
once that very process is gone (PID plus start time, so a reused PID does not protect it).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pytest_flightctl_device.core.liveness import Owner

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<owner>\d+-\d+)\.[0-9a-f]{8}\.tmp$")


def temp_path(dest: Path) -> Path:
    """A fresh temp name beside `dest` that says which process writes it."""
    return dest.with_name(f".{dest.name}.{Owner.current().token}.{secrets.token_hex(4)}.tmp")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(dest: Path, *, mode: int = 0o644,
                 check: Callable[[Path], object] | None = None) -> Iterator[BinaryIO]:
    """Yield a binary handle; on a clean exit the bytes replace `dest` atomically, else vanish.

    The temp is created with `mode` (0600 for anything secret), so no other user ever sees it
    with wider permissions. `check(temp)` runs on the synced bytes before the rename: what fails
    it (a truncated stream, say) never gets the final name.
    """
    tmp = temp_path(dest)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if check is not None:
            check(tmp)
        os.chmod(tmp, mode)  # the umask may have narrowed it
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def write_atomic(dest: Path, data: bytes | str, *, mode: int = 0o644) -> None:
    """Replace `dest` with `data` atomically (text is written as UTF-8)."""
    with atomic_write(dest, mode=mode) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def sweep_temps(directory: Path, name: str | None = None) -> int:
    """Remove temps in `directory` (of file `name`, or of any file) whose writer is gone."""
    removed = 0
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None or (name is not None and match["name"] != name):
            continue
        owner = Owner.from_token(match["owner"])
        if owner is not None and not owner.alive():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed += 1
    return removed
