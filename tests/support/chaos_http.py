"""A plain HTTP file server on 127.0.0.1 for the chaos test: slow on demand, resumable.

It serves registered files with a strong ETag, `Range: bytes=N-` (206 + Content-Range) and
`If-Range`, like an ordinary artifact host, so a download killed mid-body can be resumed by the
next run. `throttle` (bytes per second, None for full speed) keeps a body in flight long
enough for a kill to land inside it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STEP = 64 * 1024


class SlowFileServer:
    """`with SlowFileServer() as server: server.add("/a/disk.qcow2", path)`; GETs are logged."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}
        self.etags: dict[str, str] = {}
        self.throttle: float | None = None
        self.log: list[tuple[str, str | None, int]] = []  # (path, Range header, status)
        self._server: ThreadingHTTPServer | None = None

    def add(self, url_path: str, file: Path) -> str:
        """Serve `file` at `url_path`; returns its full URL."""
        digest = hashlib.sha256()
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        self.files[url_path] = file
        self.etags[url_path] = f'"{digest.hexdigest()[:32]}"'
        return f"{self.url}{url_path}"

    @property
    def url(self) -> str:
        assert self._server is not None, "start the server with `with`"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> SlowFileServer:
        server = _QuietServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.files = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _QuietServer(ThreadingHTTPServer):
    """A client killed with -9 mid-body is the point of the exercise, not an error to print."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        owner: SlowFileServer = self.server.files  # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        requested = self.headers.get("Range")
        file = owner.files.get(path)
        if file is None:
            owner.log.append((path, requested, 404))
            self._empty(404)
            return
        size = file.stat().st_size
        etag = owner.etags[path]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", requested or "")
        if_range = self.headers.get("If-Range")
        if match and (if_range is None or if_range == etag):
            start = int(match.group(1))
            if start >= size:
                owner.log.append((path, requested, 416))
                self._empty(416, {"Content-Range": f"bytes */{size}"})
                return
        status = 206 if start else 200
        owner.log.append((path, requested, status))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        self._send(owner, file, start, size - start)

    def _empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, owner: SlowFileServer, file: Path, start: int, count: int) -> None:
        sent = 0
        with file.open("rb") as handle:
            while sent < count:
                step = count - sent if owner.throttle is None else min(count - sent, STEP)
                try:
                    done = os.sendfile(self.connection.fileno(), handle.fileno(), start + sent, step)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if done == 0:
                    return
                sent += done
                if owner.throttle:
                    time.sleep(done / owner.throttle)
