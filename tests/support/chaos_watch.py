"""What a killed run left running, seen from outside: its processes, its qemu, its libvirt domains.

Each inner run of the chaos test carries a unique token in its environment, which every process
it forks inherits (ssh masters, qemu-img, a private podman service); qemu is started by libvirtd
and does not inherit it, so it is found by its `-name guest=<domain>` argument instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TOKEN_ENV = "PFTD_CHAOS_TOKEN"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError:  # the process ended while we looked, or is not ours to read
        return b""


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def state(pid: int) -> str | None:
    """The process state letter (R, S, Z, ...), or None when the process is gone."""
    stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not stat:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def running(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie waits for its parent, it does not run)."""
    return state(pid) not in (None, "Z", "X")


def tagged_processes(token: str) -> dict[int, str]:
    """Live processes whose environment carries this run's token: pid -> command line."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found: dict[int, str] = {}
    for pid in _pids():
        if pid == os.getpid():
            continue
        if needle + b"\0" in _read(f"/proc/{pid}/environ") + b"\0" and running(pid):
            found[pid] = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace")[:160]
    return found


def qemu_processes(domain_prefix: str) -> dict[int, str]:
    """qemu processes of domains whose name starts with `domain_prefix`: pid -> domain name."""
    found: dict[int, str] = {}
    marker = b"guest=" + domain_prefix.encode()
    for pid in _pids():
        cmdline = _read(f"/proc/{pid}/cmdline")
        if b"qemu" not in cmdline[:200] or marker not in cmdline:
            continue
        arg = next(a for a in cmdline.split(b"\0") if marker in a)
        name = arg.split(b"guest=", 1)[1].split(b",", 1)[0].decode()
        if running(pid):
            found[pid] = name
    return found


def active_domains(conn: Any, prefix: str, workdir: Path) -> list[str]:
    """Active libvirt domains named `prefix...`, or any fcdev domain whose disks live under `workdir`."""
    import libvirt

    names = []
    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            name = dom.name()
            if not name.startswith("fcdev-"):
                continue
            if (prefix and name.startswith(prefix)) or str(workdir) in dom.XMLDesc(0):
                names.append(name)
        except libvirt.libvirtError:  # destroyed while we looked: not active any more
            continue
    return names


def domain_running(conn: Any, prefix: str) -> bool:
    """True when a domain named `prefix...` is running (started: not paused while libvirt starts it)."""
    import libvirt

    for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
        try:
            if dom.name().startswith(prefix) and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
                return True
        except libvirt.libvirtError:  # gone while we looked
            continue
    return False


def wait_until(done: Callable[[], bool], timeout: float, poll: float = 0.05) -> float | None:
    """Seconds until `done()` held, or None if it never did within `timeout`."""
    start = time.monotonic()
    while True:
        if done():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(poll)
