"""A remote device's serial console, drained from libvirt's console stream into a local file.

A domain on another host cannot write its console to a file here, so it gets a pty serial and
we read it through virDomainOpenConsole. The stream is non-blocking and drained by callbacks on
libvirt's event loop (one thread per process, started before the first remote connection), so
the guest never blocks on a full pty and no call of ours waits inside the stream while another
thread (a destroy, a volume delete) uses the same connection: a blocking recv there deadlocked
a domain destroy on the remote driver. What it reads is appended to the same console.log a local
boot has, so the readiness, failure and report code reads one kind of file whatever the host.
The domain is started paused and resumed only once the stream is open: qemu drops pty output
nobody reads, and the firmware's and kernel's first lines matter to the KVM probe and reports.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import IO, Any

CHUNK = 64 * 1024
_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    """libvirt's default event loop, run by a daemon thread; must precede the connections using it."""
    global _loop_started
    import libvirt

    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="fcdev-libvirt-events", daemon=True).start()
        _loop_started = True


class ConsoleStream:
    """Drains one domain's console stream into `path` until the domain or the stream ends."""

    def __init__(self, conn: Any, dom: Any, path: Path) -> None:
        self.conn = conn
        self.dom = dom
        self.path = path
        self._stream: Any = None
        self._out: IO[bytes] | None = None
        self._lock = threading.Lock()
        self._done = False

    def start(self) -> None:
        """Open the console (forcibly: a stale reader from a killed run may hold it) and drain it."""
        import libvirt

        ensure_event_loop()
        self._out = open(self.path, "ab", buffering=0)  # noqa: SIM115 - closed by _finish()
        self._stream = self.conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        self.dom.openConsole(None, self._stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        self._stream.eventAddCallback(libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR
                                      | libvirt.VIR_STREAM_EVENT_HANGUP, self._on_event, None)

    def _on_event(self, stream: Any, events: int, _opaque: object) -> None:
        import libvirt

        with self._lock:
            if self._done or self._out is None:
                return
            if events & libvirt.VIR_STREAM_EVENT_READABLE:
                while True:
                    try:
                        data = stream.recv(CHUNK)
                    except libvirt.libvirtError:
                        self._finish(abort=True)
                        return
                    if data == -2:  # nothing more for now
                        break
                    if not data:  # the console closed
                        self._finish(abort=False)
                        return
                    self._out.write(data)
            if events & (libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP):
                self._finish(abort=True)

    def _finish(self, *, abort: bool) -> None:
        """End the stream and close the file (called with the lock held); never raises."""
        self._done = True
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.eventRemoveCallback()
            with contextlib.suppress(Exception):
                if abort:
                    self._stream.abort()
                else:
                    self._stream.finish()
        if self._out is not None:
            self._out.close()
            self._out = None

    def stop(self) -> None:
        """End the drain (before the domain is destroyed, or once it is gone); never raises."""
        with self._lock:
            if not self._done:
                self._finish(abort=True)
