"""The watchdog that destroys a killed process's reverted templates (--device-fresh snapshot).

libvirt 9.0 drops VIR_DOMAIN_START_AUTODESTROY from a domain reverted to a snapshot (measured: a
kill -9 left a reverted template running, an unreverted one went), so the pool runs this small
child process: it reads "+NAME" / "-NAME" lines on stdin and, at end of file (its parent exited,
however), destroys the named domains still running, except one kept on purpose (keep='1' in
its metadata, janitor.METADATA_NS). The janitor's sweep remains the backstop for its files.

    python -m pytest_flightctl_device.devices.reaper URI
"""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import IO, Any

from pytest_flightctl_device.devices.janitor import METADATA_NS


def _destroy_unless_kept(conn: Any, name: str) -> None:
    import libvirt

    try:
        dom = conn.lookupByName(name)
        metadata = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        if "keep='1'" in metadata or 'keep="1"' in metadata:
            return
        dom.destroy()
    except libvirt.libvirtError:
        pass  # already gone: the goal


def _connect(uri: str) -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt.open(uri)


def watch(uri: str, lines: IO[str]) -> None:
    """Collect names until end of file, then destroy what is left (in parallel: each takes ~1.5 s).

    The connection is opened with the first name, not at end of file: after a kill -9 the 2 s a
    domain may outlive its owner go to destroying it, not to importing libvirt and connecting."""
    names: set[str] = set()
    conn: Any = None
    for line in lines:
        line = line.strip()
        if line.startswith("+"):
            names.add(line[1:])
            if conn is None:
                conn = _connect(uri)
        elif line.startswith("-"):
            names.discard(line[1:])
    if not names or conn is None:
        if conn is not None:
            conn.close()
        return
    try:
        conn.getLibVersion()
    except Exception:  # the connection died while we waited (libvirtd restarted): a new one
        conn = _connect(uri)
    threads = [threading.Thread(target=_destroy_unless_kept, args=(conn, name)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)
    conn.close()


class Reaper:
    """The parent's side: a child process told which domains to destroy if this process dies."""

    def __init__(self, uri: str) -> None:
        self._proc = subprocess.Popen([sys.executable, "-m", "pytest_flightctl_device.devices.reaper", uri],
                                      stdin=subprocess.PIPE, text=True, close_fds=True,
                                      stdout=subprocess.DEVNULL, start_new_session=True)
        self._lock = threading.Lock()

    def _send(self, line: str) -> None:
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                self._proc.stdin.write(line + "\n")
                self._proc.stdin.flush()

    def watch(self, name: str) -> None:
        self._send(f"+{name}")

    def forget(self, name: str) -> None:
        self._send(f"-{name}")

    def close(self) -> None:
        """Every watched domain was forgotten or stopped: end the child (by its PID, ours)."""
        with self._lock:
            if self._proc.stdin is not None and not self._proc.stdin.closed:
                self._proc.stdin.close()
        try:
            self._proc.wait(30.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


if __name__ == "__main__":
    watch(sys.argv[1], sys.stdin)
