"""Shared pieces of the hostile-input tests: bounded hypothesis settings, a jail, the error check.

Every hostile case runs with its target directory inside a fresh temporary directory (the
"jail"); afterwards nothing may have appeared in the jail outside the directories the case
allowed, so a path traversal that writes a file is caught even when no exception says so.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, settings

from pytest_flightctl_device.errors import DeviceError

# No example database: a test run must not leave .hypothesis/ in the repository.
BOUNDED = settings(deadline=None, database=None, derandomize=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

def tree(root: Path) -> set[str]:
    """Every path under `root` (files, dirs, symlinks), relative, without following links."""
    found: set[str] = set()
    for top, dirs, files in os.walk(root, followlinks=False):
        for name in [*dirs, *files]:
            found.add(os.path.relpath(os.path.join(top, name), root))
    return found


@contextmanager
def jail(*allowed: str) -> Iterator[Path]:
    """A temp dir; on exit, every new entry in it must lie under one of the `allowed` subdirs."""
    with tempfile.TemporaryDirectory(prefix="fcdev-hostile-") as name:
        root = Path(name)
        for sub in allowed:
            (root / sub).mkdir(parents=True, exist_ok=True)
        before = tree(root)
        yield root
        escaped = sorted(p for p in tree(root) - before
                         if not any(p == a or p.startswith(a.rstrip("/") + "/") for a in allowed))
        assert not escaped, f"written outside {allowed}: {escaped}"


def clear_error(exc: BaseException, *secrets: str) -> None:
    """`exc` is the library's own kind of error, one readable sentence, without any secret."""
    assert isinstance(exc, DeviceError), f"{type(exc).__name__} escaped: {exc!r}"
    message = str(exc)
    assert message.strip(), "empty error message"
    assert len(message) < 4000, f"error message of {len(message)} characters"
    for secret in secrets:
        if secret:
            assert secret not in message, "a secret appears in the error message"
