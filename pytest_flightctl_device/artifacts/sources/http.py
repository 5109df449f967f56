"""Resumable HTTP download to a file, hashing on the way; and the plain-URL source.

The body goes to disk in 1 MiB chunks (flat memory) while sha256 is computed, so the cache
never reads the file a second time. After a dropped connection or a short body the transfer
resumes with `Range: bytes=N-`, and only a 206 whose Content-Range starts at N is appended;
anything else restarts from zero. Redirects are followed here, not by requests, and no
request made by this module carries an Authorization header.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.errors import ArtifactError

if TYPE_CHECKING:
    from pytest_flightctl_device.core.progress import Meter

CHUNK = 1 << 20
MeterFactory = Callable[[str, "int | None"], "Meter"]
_DROPS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
          http.client.HTTPException, ConnectionError, TimeoutError)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a write may be partial, e.g. near a full disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


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


class Expired(Exception):
    """The URL stopped working in a way a fresh URL fixes (signed URL expired)."""


@dataclass
class Transfer:
    """One download into `dest`, resumable across drops and across processes."""

    session: requests.Session
    url: Callable[[], str]
    dest: Path
    label: str
    expected_size: int | None = None
    refreshable: bool = False
    meter: MeterFactory | None = None
    attempts: int = 6
    backoff: float = 0.5
    trusted_partial: bool = False
    timeout: tuple[float, float] = (15.0, 60.0)
    requests_made: int = field(default=0, init=False)

    def run(self) -> str:
        """Download to `dest`; returns the sha256 hex of the complete file."""
        state = self.dest.with_name(self.dest.name + ".json")
        hasher, have = self._resume_point(state)
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
            if failures:
                time.sleep(min(self.backoff * 2 ** (failures - 1), 30.0))
            if stale:  # ask for a fresh signed URL only now, after the back-off, so it is still valid
                url, stale = self.url(), False
            headers = {"Range": f"bytes={have}-"} if have else {}
            validator = _read_state(state).get("validator")
            if have and validator and not self.refreshable:
                headers["If-Range"] = validator
            try:
                self.requests_made += 1
                response = self.session.get(url, headers=headers, stream=True, timeout=self.timeout,
                                            allow_redirects=False)
            except _DROPS:
                failures += 1
                continue
            except (requests.RequestException, ValueError) as exc:  # a URL requests cannot fetch
                raise ArtifactError(f"{self.label}: cannot download from {redact(url)} "
                                    f"({type(exc).__name__}); check the URL.") from None
            with response:
                status = response.status_code
                if status in (301, 302, 303, 307, 308) and "Location" in response.headers:
                    hops += 1
                    if hops > 10:
                        raise ArtifactError(f"{self.label}: {redact(url)} redirects in a loop; fix the URL.")
                    url = redirect_target(url, response.headers["Location"], self.label)
                    continue
                if status in (401, 403, 410) and self.refreshable:
                    stale = True  # the signed URL expired: a fresh one, then resume
                    failures += 1
                    continue
                if status == 429 or status >= 500:
                    failures += 1
                    continue
                if status == 416 and have:
                    hasher, have = self._restart()
                    continue
                if status not in (200, 206):
                    raise ArtifactError(
                        f"{self.label}: {redact(url)} answered HTTP {status}; check the URL and that it is "
                        "reachable from this host."
                    )
                if status == 206 and not _range_starts_at(response, have):
                    hasher, have = self._restart()
                    failures += 1
                    continue
                if status == 200 and have:
                    hasher, have = self._restart()  # the server ignored Range (or If-Range failed)
                if not have:
                    _write_state(state, response)
                length = response.headers.get("Content-Length")
                if self.expected_size is None and status == 200 and length and length.isdigit():
                    self.expected_size = int(length)
                    if meter:
                        meter.total = self.expected_size
                try:
                    have = self._append(response, hasher, have, meter)
                except _DROPS:
                    have = self.dest.stat().st_size
                    best, failures = (have, 0) if have > best else (best, failures + 1)
                    continue
                except requests.RequestException as exc:  # e.g. a Content-Encoding it cannot decode
                    self._restart()
                    raise ArtifactError(f"{self.label}: {redact(url)} sent a body that cannot be read "
                                        f"({type(exc).__name__}); check the server.") from None
                if self.expected_size is None:
                    break  # no size known: the end of the body is the end of the file
                best, failures = (have, 0) if have > best else (best, failures + 1)
        if self.expected_size is not None and have > self.expected_size:
            self._restart()
            raise ArtifactError(
                f"{self.label}: received {have} bytes, more than the {self.expected_size} announced; "
                "run again to download it afresh."
            )
        if meter:
            meter.finish()
        state.unlink(missing_ok=True)
        return hasher.hexdigest()

    def _resume_point(self, state: Path) -> tuple[hashlib._Hash, int]:
        hasher = hashlib.sha256()
        if not self.dest.exists():
            state.unlink(missing_ok=True)
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            self.dest.write_bytes(b"")
            return hasher, 0
        usable = self.trusted_partial or bool(_read_state(state).get("validator"))
        size = self.dest.stat().st_size
        if not usable or (self.expected_size is not None and size > self.expected_size):
            return self._restart()
        with self.dest.open("rb") as handle:  # a killed process left this: hash it and go on
            while chunk := handle.read(CHUNK):
                hasher.update(chunk)
        return hasher, size

    def _restart(self) -> tuple[hashlib._Hash, int]:
        with self.dest.open("wb"):
            pass
        return hashlib.sha256(), 0

    def _append(self, response: requests.Response, hasher: hashlib._Hash, have: int,
                meter: Meter | None) -> int:
        """Append the body to `dest`; returns the new size. Drops raise one of _DROPS."""
        raw = getattr(response.raw, "_fp", None)  # the http.client response under urllib3
        encoded = response.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
        if raw is None or encoded or not hasattr(raw, "readinto"):
            return self._append_slow(response, hasher, have, meter)
        return _Pipeline(self.dest, hasher).run(raw, have, meter)

    def _append_slow(self, response: requests.Response, hasher: hashlib._Hash, have: int,
                     meter: Meter | None) -> int:
        fd = os.open(self.dest, os.O_WRONLY | os.O_APPEND)
        try:
            for chunk in response.iter_content(CHUNK):
                write_all(fd, chunk)
                hasher.update(chunk)
                have += len(chunk)
                if meter:
                    meter.advance(len(chunk))
        finally:
            os.close(fd)
        return have


class _Pipeline:
    """Receive into reused buffers on this thread; write and hash on another (both release the GIL).

    Receiving with readinto() into preallocated buffers avoids a fresh bytes object per chunk,
    and overlapping the socket with disk and sha256 lets a 2-core machine keep up with curl.
    """

    BUFFERS = 8
    SIZE = 1 << 20
    FLUSH = SIZE

    def __init__(self, dest: Path, hasher: hashlib._Hash) -> None:
        self.dest = dest
        self.hasher = hasher
        self.full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(self.BUFFERS):
            self.free.put(bytearray(self.SIZE))
        self.error: BaseException | None = None

    def _sink(self, fd: int) -> None:
        while (item := self.full.get()) is not None:
            buffer, count = item
            if self.error is None:
                try:
                    view = memoryview(buffer)[:count]
                    write_all(fd, view)
                    self.hasher.update(view)
                except OSError as exc:
                    self.error = exc
            self.free.put(buffer)

    def run(self, raw: Any, have: int, meter: Meter | None) -> int:
        fd = os.open(self.dest, os.O_WRONLY | os.O_APPEND)
        sink = threading.Thread(target=self._sink, args=(fd,), daemon=True)
        sink.start()
        try:
            while self.error is None:
                buffer = self.free.get()
                view = memoryview(buffer)
                count = 0
                eof = False
                while count < self.FLUSH:  # hand over every MiB: a killed process keeps what it got
                    got = raw.readinto(view[count:])  # fills the slice unless the body ends
                    if not got:
                        eof = True
                        break
                    count += got
                if count:
                    self.full.put((buffer, count))
                    have += count
                    if meter:
                        meter.advance(count)
                else:
                    self.free.put(buffer)
                if eof:
                    break
        finally:
            self.full.put(None)
            sink.join()
            os.close(fd)
        if self.error is not None:
            raise ArtifactError(f"cannot write {self.dest} ({self.error}); free some disk space and run again.")
        return have


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


def _read_state(state: Path) -> dict[str, str]:
    try:
        data = json.loads(state.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(state: Path, response: requests.Response) -> None:
    """Remember the validator (ETag, else Last-Modified) so a later process may resume safely."""
    validator = response.headers.get("ETag") or response.headers.get("Last-Modified") or ""
    if validator.startswith("W/"):
        validator = ""  # weak validators may not be used with If-Range
    state.write_text(json.dumps({"validator": validator}))


def fetch_url(url: str, cache: Cache, *, kind: str, sha256: str | None,
              meter: MeterFactory | None = None, say: Callable[[str], None] | None = None) -> Path:
    """An http(s) URL downloaded once into the cache (keyed by the URL), verified as `kind`."""
    # the key never holds credentials or a signed query string in clear; a hash keeps URLs apart
    key = f"url:{redact(url)}#{hashlib.sha256(url.encode()).hexdigest()[:16]}"
    label = urlsplit(url).path.rsplit("/", 1)[-1] or redact(url)

    def produce(tmp: Path) -> str:
        partial = cache.partial(key)
        with new_session() as session:
            digest = Transfer(session, lambda: url, partial, label, meter=meter).run()
        os.replace(partial, tmp)
        return digest

    def waiting() -> None:
        if say:
            say(f"{label}: another process is downloading it; waiting")

    return cache.obtain(key, produce, kind=kind, expected_sha256=sha256, source=redact(url), waiting=waiting)
