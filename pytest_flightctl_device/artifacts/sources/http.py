"""Resumable HTTP download into a sink, hashing on the way; ranged reads; the plain-URL source.

A `Transfer` receives the body into reused 1 MiB buffers and hands every buffer to each of
its sink's consumers, each on its own thread (writing, sha256, CRC32 ... all release the GIL,
so a 2-core machine keeps up with curl), with flat memory. After a dropped connection or a short
body it resumes with `Range: bytes=N-`, and only a 206 whose Content-Range starts at N is
taken; anything else restarts the sink from zero. Redirects are followed here, not by
requests, and no request made by this module carries an Authorization header.
"""

from __future__ import annotations

import ctypes
import hashlib
import http.client
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.core.atomic import write_atomic
from pytest_flightctl_device.core.formats import FORMATS
from pytest_flightctl_device.errors import ArtifactError

if TYPE_CHECKING:
    from pytest_flightctl_device.core.progress import Meter

CHUNK = 1 << 20
MeterFactory = Callable[[str, "int | None"], "Meter"]
Consumer = Callable[[memoryview, int], None]
"""Takes the next bytes of the body and their offset in it; runs on its own thread."""
_DROPS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
          http.client.HTTPException, ConnectionError, TimeoutError)
_REDIRECTS = (301, 302, 303, 307, 308)
_EXPIRED = (401, 403, 410)  # what a signed URL answers once it has expired


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may be partial, e.g. near a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from libc, which Python's os module does not offer; None elsewhere."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()


class Writeback:
    """Starts the kernel writing a growing file's dirty pages every STEP bytes (without waiting).

    Otherwise a GiB sits dirty in RAM until the final fsync, which then writes it all while
    everything waits; started early, the disk works while the download goes on.
    """

    STEP = 32 << 20

    def __init__(self, fd: int, size: int = 0) -> None:
        self.fd = fd
        self.started = size

    def wrote(self, size: int) -> None:
        """The file is now `size` bytes long."""
        if _SYNC_FILE_RANGE is not None and size - self.started >= self.STEP:
            _SYNC_FILE_RANGE(self.fd, self.started, size - self.started, 2)  # SYNC_FILE_RANGE_WRITE
            self.started = size


def redact(url: str) -> str:
    """The URL without user info or query string (where signed URLs keep their signatures).

    Total: a URL too broken to split (bad IPv6 literal, port that is not a number) still gives
    a string for an error message, never an exception.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = parts.netloc.rsplit("@", 1)[-1]
        port = netloc.rsplit(":", 1)[1] if ":" in netloc and not netloc.endswith("]") else ""
        if port:
            host = f"{host}:{port}" if port.isdigit() else f"{host}:<bad port>"
        text = urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<an unparsable URL>"
    return text if len(text) <= 300 else text[:300] + "..."


def new_session() -> requests.Session:
    """A Session whose adapters never retry on their own (this module decides) and keep a pool."""
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=4, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "pytest-flightctl-device"
    session.headers["Accept-Encoding"] = "identity"  # byte offsets must match the file for Range
    session.trust_env = False  # no netrc credentials, no proxies picked up behind our back
    return session


def backoff_delay(failures: int, base: float, cap: float = 30.0) -> float:
    """Seconds to wait before the next attempt after `failures` failures in a row (0 for the first)."""
    return 0.0 if failures <= 0 else min(base * 2 ** (failures - 1), cap)


class Sink(Protocol):
    """Where a Transfer's body goes. `position` is the resume point: bytes of the body taken."""

    position: int

    def open(self) -> int:
        """Prepare (resuming what a killed process left, if the sink can); returns `position`."""

    def restart(self) -> None:
        """Forget everything taken so far: the body starts again at byte 0."""

    def before(self, view: memoryview, offset: int) -> None:
        """Called on the receiving thread with each buffer before any consumer sees it."""

    def consumers(self) -> Sequence[Consumer]:
        """Each gets every buffer, in order, on a thread of its own."""

    def validator(self) -> str:
        """An ETag/Last-Modified remembered by `started` for If-Range, or ""."""

    def started(self, response: requests.Response) -> None:
        """A body starts at byte 0 with this response."""

    def finish(self) -> str:
        """The complete body was taken; returns its sha256 hex."""

    def close(self) -> None:
        """Release files (also after an error)."""


class FileSink:
    """The body as a file, sha256 on the way; resumable across processes by its validator."""

    def __init__(self, dest: Path, *, trusted_partial: bool = False) -> None:
        self.dest = dest
        self.trusted_partial = trusted_partial
        self.state = dest.with_name(dest.name + ".json")
        self.hasher = hashlib.sha256()
        self.position = 0
        self._fd: int | None = None
        self._size = 0
        self._writeback: Writeback | None = None

    def open(self) -> int:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        usable = self.dest.exists() and (self.trusted_partial or bool(self.validator()))
        if not usable:
            self.state.unlink(missing_ok=True)
        self._fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | (0 if usable else os.O_TRUNC), 0o644)
        self.position = 0
        while usable and (chunk := os.read(self._fd, CHUNK)):  # a killed process left this: hash it
            self.hasher.update(chunk)
            self.position += len(chunk)
        self._size = self.position
        self._writeback = Writeback(self._fd, self._size)
        return self.position

    def restart(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        self.hasher, self.position, self._size = hashlib.sha256(), 0, 0
        self._writeback = Writeback(self._fd)

    def before(self, view: memoryview, offset: int) -> None:
        self.position = offset + len(view)

    def consumers(self) -> Sequence[Consumer]:
        return (self._write, self._hash)

    def _write(self, view: memoryview, _offset: int) -> None:
        assert self._fd is not None and self._writeback is not None
        write_all(self._fd, view)
        self._size += len(view)
        self._writeback.wrote(self._size)

    def _hash(self, view: memoryview, _offset: int) -> None:
        self.hasher.update(view)

    def validator(self) -> str:
        try:
            data = json.loads(self.state.read_text())
        except (OSError, ValueError):
            return ""
        value = data.get("validator") if isinstance(data, dict) else None
        return value if isinstance(value, str) else ""

    def started(self, response: requests.Response) -> None:
        """Remember the validator (ETag, else Last-Modified) so a later process may resume safely."""
        value = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
        if value.startswith("W/"):
            value = ""  # weak validators may not be used with If-Range
        write_atomic(self.state, json.dumps({"validator": value}))

    def finish(self) -> str:
        self.close()
        self.state.unlink(missing_ok=True)
        return self.hasher.hexdigest()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _FanOut:
    """Receive into reused buffers on this thread; every consumer reads each buffer on its own thread.

    A buffer goes back to the free list when the last consumer is done with it, so memory is
    BUFFERS x SIZE whatever the body's size, and a slow consumer slows the socket, not RAM.
    """

    BUFFERS = 16
    SIZE = 1 << 20

    def __init__(self, sink: Sink, label: str) -> None:
        self.sink = sink
        self.label = label
        self.consumers = list(sink.consumers())
        self.free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(self.BUFFERS):
            self.free.put(bytearray(self.SIZE))
        self.queues: list[queue.SimpleQueue[tuple[bytearray, int, int, list[int]] | None]] = [
            queue.SimpleQueue() for _ in self.consumers]
        self.lock = threading.Lock()
        self.error: BaseException | None = None

    def _work(self, consume: Consumer, inbox: queue.SimpleQueue[tuple[bytearray, int, int, list[int]] | None],
              ) -> None:
        while (item := inbox.get()) is not None:
            buffer, count, offset, readers = item
            if self.error is None:
                try:
                    consume(memoryview(buffer)[:count], offset)
                except BaseException as exc:  # handed to the receiving thread, which raises it
                    with self.lock:
                        self.error = self.error or exc
            with self.lock:
                readers[0] -= 1
                last = readers[0] == 0
            if last:
                self.free.put(buffer)

    def _dispatch(self, buffer: bytearray, count: int, offset: int) -> None:
        self.sink.before(memoryview(buffer)[:count], offset)
        readers = [len(self.queues)]
        for inbox in self.queues:
            inbox.put((buffer, count, offset, readers))

    def run(self, raw: Any, have: int, meter: Meter | None) -> int:
        """Pump `raw` (anything with readinto) to its end; returns the new offset. Drops re-raise."""
        threads = [threading.Thread(target=self._work, args=pair, daemon=True)
                   for pair in zip(self.consumers, self.queues, strict=True)]
        for thread in threads:
            thread.start()
        dropped: BaseException | None = None
        try:
            while self.error is None:
                buffer = self.free.get()
                view = memoryview(buffer)
                count = 0
                eof = False
                try:
                    while count < self.SIZE:  # hand over every MiB: a killed process keeps what it got
                        got = raw.readinto(view[count:])  # fills the slice unless the body ends
                        if not got:
                            eof = True
                            break
                        count += got
                except _DROPS as exc:  # keep what arrived before the drop, then resume after it
                    dropped, eof = exc, True
                if count:
                    self._dispatch(buffer, count, have)
                    have += count
                    if meter:
                        meter.advance(count)
                else:
                    self.free.put(buffer)
                if eof:
                    break
        finally:
            for inbox in self.queues:
                inbox.put(None)
            for thread in threads:
                thread.join()
        if isinstance(self.error, OSError):
            raise ArtifactError(f"{self.label}: cannot write the download ({self.error.strerror or self.error}); "
                                "free some disk space and run again.") from None
        if self.error is not None:
            raise self.error
        if dropped is not None:
            raise dropped
        return have


def pump(sink: Sink, raw: Any, label: str, have: int = 0, meter: Meter | None = None) -> int:
    """Feed everything `raw` yields into `sink` through its consumers (also for local files)."""
    return _FanOut(sink, label).run(raw, have, meter)


@dataclass
class Transfer:
    """One download into a sink, resumable across drops (and across processes, as the sink allows)."""

    session: requests.Session
    url: Callable[[], str]
    sink: Sink
    label: str
    expected_size: int | None = None
    refreshable: bool = False
    meter: MeterFactory | None = None
    attempts: int = 6
    backoff: float = 0.5
    timeout: tuple[float, float] = (15.0, 60.0)
    requests_made: int = field(default=0, init=False)

    def run(self) -> str:
        """Download the whole body into the sink; returns the sha256 hex of the body."""
        try:
            return self._run()
        finally:
            self.sink.close()

    def _restart(self) -> int:
        self.sink.restart()
        return 0

    def _run(self) -> str:
        sink = self.sink
        have = sink.open()
        if self.expected_size is not None and have > self.expected_size:
            have = self._restart()
        meter = self.meter(self.label, self.expected_size) if self.meter else None
        if meter:
            meter.start(have)
        url = self.url()
        stale = False
        failures = 0
        hops = 0
        best = have  # progress is a new high-water mark: a server that ignores Range and keeps
        # sending the same short body restarts from zero each time and must not loop forever
        while self.expected_size is None or have < self.expected_size:
            if failures >= self.attempts:
                raise ArtifactError(
                    f"{self.label}: download from {redact(url)} failed {failures} times in a row; "
                    "check the network or the server and run again (the partial file is kept)."
                )
            time.sleep(backoff_delay(failures, self.backoff))
            if stale:  # ask for a fresh signed URL only now, after the back-off, so it is still valid
                url, stale = self.url(), False
            headers = {"Range": f"bytes={have}-"} if have else {}
            validator = sink.validator() if have and not self.refreshable else ""
            if validator:
                headers["If-Range"] = validator
            try:
                self.requests_made += 1
                response = self.session.get(url, headers=headers, stream=True, timeout=self.timeout,
                                            allow_redirects=False)
            except _DROPS:
                failures += 1
                stale = self.refreshable  # a signed URL may expire while we back off: ask for a fresh one
                continue
            except (requests.RequestException, ValueError) as exc:  # a URL requests cannot fetch
                raise ArtifactError(f"{self.label}: cannot download from {redact(url)} "
                                    f"({type(exc).__name__}); check the URL.") from None
            with response:
                status = response.status_code
                if status in _REDIRECTS and "Location" in response.headers:
                    hops += 1
                    if hops > 10:
                        raise ArtifactError(f"{self.label}: {redact(url)} redirects in a loop; fix the URL.")
                    url = redirect_target(url, response.headers["Location"], self.label)
                    continue
                if status in _EXPIRED and self.refreshable:
                    stale = True  # the signed URL expired: a fresh one, then resume
                    failures += 1
                    continue
                if status == 429 or status >= 500:
                    failures += 1
                    continue
                if status == 416 and have:
                    have = self._restart()
                    continue
                if status not in (200, 206):
                    raise ArtifactError(
                        f"{self.label}: {redact(url)} answered HTTP {status}; check the URL and that it is "
                        "reachable from this host."
                    )
                if status == 206 and not _range_starts_at(response, have):
                    have = self._restart()
                    failures += 1
                    continue
                if status == 200 and have:
                    have = self._restart()  # the server ignored Range (or If-Range failed)
                if not have:
                    sink.started(response)
                length = response.headers.get("Content-Length")
                if self.expected_size is None and status == 200 and length and length.isdigit():
                    self.expected_size = int(length)
                    if meter:
                        meter.total = self.expected_size
                try:
                    have = self._append(response, have, meter)
                except _DROPS:
                    have = sink.position
                    best, failures = (have, 0) if have > best else (best, failures + 1)
                    stale = self.refreshable
                    continue
                except requests.RequestException as exc:  # e.g. a Content-Encoding it cannot decode
                    self._restart()
                    raise ArtifactError(f"{self.label}: {redact(url)} sent a body that cannot be read "
                                        f"({type(exc).__name__}); check the server.") from None
                if self.expected_size is None:
                    break  # no size known: the end of the body is the end of the file
                best, failures = (have, 0) if have > best else (best, failures + 1)
                stale = self.refreshable and have < self.expected_size  # a short body is a drop too
        if self.expected_size is not None and have > self.expected_size:
            self._restart()
            raise ArtifactError(
                f"{self.label}: received {have} bytes, more than the {self.expected_size} announced; "
                "run again to download it afresh."
            )
        digest = sink.finish()
        if meter:
            meter.finish()
        return digest

    def _append(self, response: requests.Response, have: int, meter: Meter | None) -> int:
        """Take the body into the sink; returns the new offset. Drops raise one of _DROPS."""
        raw = getattr(response.raw, "_fp", None)  # the http.client response under urllib3
        encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if raw is None or encoded or not hasattr(raw, "readinto"):
            return pump(self.sink, _Chunks(response), self.label, have, meter)
        return pump(self.sink, raw, self.label, have, meter)


class _Chunks:
    """readinto() over requests' decoded iterator (a body with a Content-Encoding)."""

    def __init__(self, response: requests.Response) -> None:
        self.chunks = response.iter_content(CHUNK)
        self.left = b""

    def readinto(self, view: memoryview) -> int:
        if not self.left:
            self.left = next(self.chunks, b"")
        count = min(len(view), len(self.left))
        view[:count] = self.left[:count]
        self.left = self.left[count:]
        return count


def fetch_range(session: requests.Session, url: Callable[[], str], start: int | None, end: int, label: str,
                *, refreshable: bool = False, attempts: int = 6, backoff: float = 0.5,
                timeout: tuple[float, float] = (15.0, 60.0)) -> tuple[bytes, int, int] | None:
    """Bytes `start`..`end` (inclusive) of the body, or its last `end` bytes when `start` is None.

    Returns (data, offset of data, total size from Content-Range), or None when the server
    ignores Range (answers 200). Retries drops and 5xx; a fresh URL after 401/403/410 when
    `refreshable`.
    """
    wanted = f"bytes={start}-{end}" if start is not None else f"bytes=-{end}"
    limit = end - start + 1 if start is not None else end
    current = url()
    failures = 0
    while failures < attempts:
        time.sleep(backoff_delay(failures, backoff))
        try:
            response = session.get(current, headers={"Range": wanted}, stream=True, timeout=timeout,
                                   allow_redirects=False)
        except _DROPS:
            failures += 1
            continue
        except (requests.RequestException, ValueError) as exc:
            raise ArtifactError(f"{label}: cannot download from {redact(current)} ({type(exc).__name__}); "
                                "check the URL.") from None
        with response:
            status = response.status_code
            if status == 200:
                return None
            if status in _EXPIRED and refreshable:
                failures += 1
                current = url()
                continue
            if status == 429 or status >= 500:
                failures += 1
                continue
            if status != 206:
                raise ArtifactError(f"{label}: {redact(current)} answered HTTP {status} to a ranged read; "
                                    "check the URL and that it is reachable from this host.")
            found = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", response.headers.get("Content-Range", "").strip())
            first, last, total = (int(found.group(n)) for n in (1, 2, 3)) if found else (0, -1, -1)
            if found is None or last < first or last >= total or last - first + 1 > limit or (
                    start is not None and first != start):
                raise ArtifactError(f"{label}: {redact(current)} answered a ranged read with a Content-Range "
                                    "that does not match the request; check the server.")
            try:
                data = response.raw.read(last - first + 2, decode_content=False)
            except _DROPS:
                failures += 1
                continue
            if len(data) != last - first + 1:
                failures += 1  # a short (dropped) or overlong body: ask again
                continue
            return data, first, total
    raise ArtifactError(f"{label}: a ranged read from {redact(current)} failed {failures} times in a row; "
                        "check the network or the server and run again.")


def redirect_target(url: str, location: str, label: str) -> str:
    """The absolute http(s) URL a redirect points to, or ArtifactError naming the redirecting URL."""
    try:
        target = urljoin(url, location.strip())
        scheme = urlsplit(target).scheme
    except ValueError:
        target, scheme = "", ""
    if scheme not in ("http", "https"):
        raise ArtifactError(f"{label}: {redact(url)} redirects to something that is not an http(s) URL; "
                            "fix the URL.")
    return target


def _range_starts_at(response: requests.Response, start: int) -> bool:
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    return match is not None and int(match.group(1)) == start


def fetch_url(url: str, cache: Cache, *, kind: str, sha256: str | None,
              meter: MeterFactory | None = None, say: Callable[[str], None] | None = None) -> Path:
    """An http(s) URL downloaded once into the cache (keyed by the URL), verified as `kind`."""
    # the key never holds credentials or a signed query string in clear; a hash keeps URLs apart
    key = f"url:{redact(url)}#{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    label = urlsplit(url).path.rsplit("/", 1)[-1] or redact(url)

    def produce(tmp: Path) -> str:
        partial = cache.partial(key)
        with new_session() as session:
            digest = Transfer(session, lambda: url, FileSink(partial), label, meter=meter).run()
        os.replace(partial, tmp)
        return digest

    def waiting() -> None:
        if say:
            say(f"{label}: another process is downloading it; waiting")

    return cache.obtain(key, produce, FORMATS[kind], expected_sha256=sha256, source=redact(url), waiting=waiting)
