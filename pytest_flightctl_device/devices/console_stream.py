"""A remote device's serial console, drained from libvirt's console stream into a local file.

A domain on another host cannot write its console to a file here, so it gets a pty serial and
we read it through virDomainOpenConsole. A thread drains the stream continuously (a guest must
never block on a full pty) and appends to the same console.log a local boot has, so the
readiness, failure and report code reads one kind of file whatever the host. The domain is
started paused and resumed only once the stream is open: qemu drops pty output nobody reads,
and the firmware's and kernel's first lines matter to the KVM probe and to failure reports.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

CHUNK = 64 * 1024


class ConsoleStream:
    """Drains one domain's console stream into `path` until the domain or the stream ends."""

    def __init__(self, conn: Any, dom: Any, path: Path) -> None:
        self.conn = conn
        self.dom = dom
        self.path = path
        self._stream: Any = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        """Open the console (forcibly: a stale reader from a killed run may hold it) and drain it."""
        import libvirt

        self._stream = self.conn.newStream(0)
        self.dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self.path.touch(mode=0o600)
        self._thread = threading.Thread(target=self._drain, name=f"fcdev-console-{self.dom.name()}",
                                        daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        stream = self._stream
        with open(self.path, "ab", buffering=0) as out:
            while not self._stopping.is_set():
                try:
                    data = stream.recv(CHUNK)
                except Exception:  # the domain went away, or stop() aborted the stream
                    return
                if isinstance(data, int):  # -2: would block (only for non-blocking streams)
                    continue
                if not data:  # end of stream: the console closed
                    return
                out.write(data)

    def stop(self) -> None:
        """End the drain (the domain is being destroyed, or is gone); never raises."""
        self._stopping.set()
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.abort()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
