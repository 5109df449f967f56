"""Loopback ports for SSH forwards, handed out race-free across processes.

A port picked by bind(0) is free only until someone else binds it. We hold a host-wide file
lock from the pick until qemu has bound the port (the domain has started), so two pytest-xdist
workers can never pick the same one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def port_reservation(lock_path: Path) -> Iterator[int]:
    """Yield a free 127.0.0.1 port; hold the lock until the caller's block (which binds it) ends."""
    with FileLock(str(lock_path)):
        yield free_loopback_port()
