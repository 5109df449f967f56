"""Content-addressed artifact store shared by xdist workers and runs; it knows no file format.

Bytes become a verified, immutable file exactly once per cache: `obtain()` checks the index,
takes a per-key file lock, checks again, lets the producer write a temp file, fsyncs it, runs the
caller's check (a `core.formats.Format`) and renames it into `objects/`. The index entry is
written last, so a crash at any point leaves at most a temp file, never a half-written file
under a final name; `sweep()` is the one place that removes such temps.

Layout under the root:
  objects/<2 hex>/<sha256>.<suffix>       the artifact, read-only (suffix from its Format)
  objects/<2 hex>/<sha256>.<suffix>.json  sidecar: format name, source(s), size, created, last used
  index/<hash of key>.json                source identity -> digest and format name
  locks/<hash of key>.lock                single-flight lock per source identity
  tmp/                                    objects being produced, resumable partial downloads
  verified/<hash of identity>.json        sha256 of local files used in place (`local_sha256`)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_flightctl_device.core.atomic import fsync_dir, sweep_temps, temp_path, write_atomic
from pytest_flightctl_device.core.formats import Format
from pytest_flightctl_device.errors import ArtifactError

_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A resumable partial nobody asked for again in this long is a killed run's download: dropped.
PARTIAL_MAX_AGE_S = 86400.0

# Shared flocks on objects this process uses: prune never removes what a live run holds.
_HELD: dict[str, int] = {}


@dataclass(frozen=True)
class Entry:
    """One object in the cache, as the CLI lists it."""

    path: Path
    digest: str
    kind: str
    size: int
    sources: tuple[str, ...]
    keys: tuple[str, ...]
    created: float
    last_used: float


@dataclass(frozen=True)
class Problem:
    """An object that failed `check()` or `verify()`, and why."""

    path: Path
    reason: str


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (flat memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key_name(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:40]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, sort_keys=True))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open() as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _sidecar(path: Path) -> Path:
    return Path(f"{path}.json")


def _hold(path: Path) -> None:
    """Take a shared flock on `path` for the life of this process (prune skips held objects)."""
    name = str(path)
    if name in _HELD:
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[name] = fd


def _held_elsewhere(path: Path) -> bool:
    """True when any process (this one included) holds `path` with _hold()."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _problem(entry: Entry) -> Problem | None:
    """Why an object's bytes no longer hash to its name, or None when they do.

    Re-hashing is the whole check, on purpose: an object got its name only after its Format's
    check passed on exactly these bytes, so bytes that still hash to the name pass it again. The
    cache thus never looks a check up by name, and `cache verify` needs no qemu-img.
    """
    try:
        digest = sha256_file(entry.path)
    except OSError as exc:
        return Problem(entry.path, f"cannot be read ({exc.strerror})")
    if digest != entry.digest:
        return Problem(entry.path, f"content has sha256 {digest}, not {entry.digest}")
    return None


class Cache:
    """A directory of verified artifacts, safe for concurrent processes on one host."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.objects = self.root / "objects"
        self.index = self.root / "index"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        self.verified = self.root / "verified"

    def _ensure(self) -> None:
        for directory in (self.objects, self.index, self.locks, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)

    def partial(self, key: str, suffix: str = "part") -> Path:
        """A stable temp path for `key`: a producer may resume what a killed process left there."""
        self._ensure()
        return self.tmp / f"{_key_name(key)}.{suffix}"

    def lock(self, key: str) -> FileLock:
        self._ensure()
        return FileLock(str(self.locks / f"{_key_name(key)}.lock"))

    def find(self, digest: str, kind: str) -> Path | None:
        """The object with this content that passed the check named `kind`, whatever its source."""
        if not _SHA256.fullmatch(digest):
            return None
        for path in (self.objects / digest[:2]).glob(f"{digest}.*"):
            if path.suffix != ".json" and (_read_json(_sidecar(path)) or {}).get("kind") == kind:
                return path
        return None

    def lookup(self, key: str) -> Path | None:
        """The object recorded for `key`, or None; marks it used and held by this process."""
        entry = _read_json(self.index / f"{_key_name(key)}.json")
        if not entry or entry.get("key") != key:
            return None
        path = self.find(str(entry.get("digest")), str(entry.get("kind")))
        if path is None:  # pruned or never finished: produce it again
            return None
        try:
            _hold(path)
        except FileNotFoundError:  # pruned just now
            return None
        self._touch(path)
        return path

    def obtain(
        self,
        key: str,
        produce: Callable[[Path], str | None],
        verify: Format,
        *,
        expected_sha256: str | None = None,
        source: str = "",
        waiting: Callable[[], None] | None = None,
    ) -> Path:
        """The object for `key`, produced at most once across processes and checked by `verify`.

        `produce(tmp)` writes the artifact to `tmp` and may return its sha256 when it hashed the
        bytes on the way (saves a second read); `waiting` is called when another process holds
        the lock, so the caller can say why nothing happens.
        """
        expected = expected_sha256.lower().removeprefix("sha256:") if expected_sha256 else None
        found = self.lookup(key)
        if found is None and expected and (found := self.find(expected, verify.name)):
            self._record(key, expected, verify.name, source, found)
        if found is not None:
            return found
        lock = self.lock(key)
        try:
            lock.acquire(timeout=0)
        except TimeoutError:
            if waiting is not None:
                waiting()
            lock.acquire()
        try:
            found = self.lookup(key)
            if found is not None:
                return found
            return self._produce(key, produce, verify, expected=expected, source=source)
        finally:
            lock.release()

    def _produce(self, key: str, produce: Callable[[Path], str | None], verify: Format, *,
                 expected: str | None, source: str) -> Path:
        self.sweep()
        tmp = temp_path(self.tmp / _key_name(key))  # named after this process: swept once it is dead
        try:
            digest = produce(tmp)
            if not tmp.is_file():
                raise ArtifactError(f"{source or key} produced no file; report this as a bug.")
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            if not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
                digest = sha256_file(tmp)  # the producer did not hash on the way (or returned junk)
            if expected and digest != expected:
                raise ArtifactError(
                    f"{source or key} has sha256 {digest}, not the expected {expected}; "
                    "check the sha256 option or the source."
                )
            verify(tmp)
            final = self.objects / digest[:2] / f"{digest}.{verify.suffix}"
            final.parent.mkdir(parents=True, exist_ok=True)
            if not final.is_file():
                tmp.chmod(0o444)
                os.replace(tmp, final)
                fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        self._record(key, digest, verify.name, source, final)
        self._touch(final)
        _hold(final)
        return final

    def _record(self, key: str, digest: str, kind: str, source: str, path: Path) -> None:
        now = time.time()
        data = _read_json(_sidecar(path)) or {"digest": digest, "kind": kind, "size": path.stat().st_size,
                                               "created": now, "sources": [], "keys": []}
        if source and source not in data["sources"]:
            data["sources"].append(source)
        if key not in data["keys"]:
            data["keys"].append(key)
        data["last_used"] = now
        _write_json(_sidecar(path), data)
        _write_json(self.index / f"{_key_name(key)}.json", {"key": key, "digest": digest, "kind": kind})

    def _touch(self, path: Path) -> None:
        data = _read_json(_sidecar(path))
        if data is not None:
            data["last_used"] = time.time()
            with contextlib.suppress(OSError):
                _write_json(_sidecar(path), data)

    # -- local files used in place ---------------------------------------------------------------

    def local_sha256(self, path: Path) -> str:
        """The sha256 of a local file, hashed once per identity (path, device, inode, size, mtime).

        A multi-GiB file given by path is used in place, not copied in; what the cache remembers
        is only its digest, so a warm run does not read it again. A file changed while it was
        hashed is not remembered.
        """
        before = _identity(path)
        memo = self.verified / f"{hashlib.sha256(before.encode()).hexdigest()[:40]}.json"
        seen = _read_json(memo) or {}
        if seen.get("identity") == before and _SHA256.fullmatch(str(seen.get("sha256"))):
            return str(seen["sha256"])
        digest = sha256_file(path)
        if _identity(path) == before:
            self.verified.mkdir(parents=True, exist_ok=True)
            _write_json(memo, {"path": str(path), "identity": before, "sha256": digest})
        return digest

    # -- for the CLI and max size ---------------------------------------------------------------

    def _objects(self) -> Iterator[Path]:
        if not self.objects.is_dir():
            return
        for path in sorted(self.objects.glob("*/*")):
            if path.suffix != ".json" and not path.name.startswith("."):
                yield path

    def entries(self) -> list[Entry]:
        """Every object, least recently used first."""
        result = []
        for path in self._objects():
            data = _read_json(_sidecar(path)) or {}
            stat = path.stat()
            result.append(Entry(
                path=path, digest=path.name.split(".")[0], kind=str(data.get("kind", "file")),
                size=stat.st_size, sources=tuple(data.get("sources", ())), keys=tuple(data.get("keys", ())),
                created=float(data.get("created", stat.st_mtime)),
                last_used=float(data.get("last_used", stat.st_mtime)),
            ))
        return sorted(result, key=lambda entry: entry.last_used)

    def sweep(self, partial_max_age: float = PARTIAL_MAX_AGE_S) -> int:
        """The one temp sweeper; returns how many files it removed. Run before every production,
        by verify() and by prune().

        - atomic-write temps (objects being produced in tmp/, sidecars, index entries, remembered
          digests) whose writer process is gone: core.atomic.sweep_temps, by PID and start time;
        - resumable partials in tmp/ (a download's `.part`/`.zip` and its `.json` state) nobody
          resumed for `partial_max_age`, when no process holds their key's lock.
        """
        removed = sum(sweep_temps(directory) for directory in
                      (self.tmp, self.index, self.verified, *self.objects.glob("??")))
        now = time.time()
        for path in self.tmp.glob("*") if self.tmp.is_dir() else ():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > partial_max_age:
                    lock = FileLock(str(self.locks / f"{path.name.lstrip('.').split('.')[0]}.lock"))
                    with contextlib.suppress(TimeoutError), lock.acquire(timeout=0):
                        path.unlink()
                        removed += 1
        return removed

    def check(self) -> list[Problem]:
        """Re-hash every object, changing nothing (an audit; verify() also repairs)."""
        return [problem for entry in self.entries() if (problem := _problem(entry)) is not None]

    def verify(self) -> list[Problem]:
        """Re-hash every object; the ones that fail are removed and reported.

        Temps of killed writers are swept on the way (they are not objects, so not reported).
        """
        self.sweep()
        problems = []
        for entry in self.entries():
            problem = _problem(entry)
            if problem is not None:
                problems.append(problem)
                self._remove(entry)
        return problems

    def size(self) -> int:
        return sum(entry.size for entry in self.entries())

    def prune(self, max_bytes: int) -> list[Entry]:
        """Remove least recently used objects no live process holds until the total fits."""
        self._ensure()
        removed: list[Entry] = []
        entries = self.entries()
        total = sum(entry.size for entry in entries)
        for entry in entries:
            if total <= max_bytes:
                break
            if _held_elsewhere(entry.path):
                continue
            self._remove(entry)
            removed.append(entry)
            total -= entry.size
        self.sweep()
        return removed

    def _remove(self, entry: Entry) -> None:
        for key in entry.keys:
            index = self.index / f"{_key_name(key)}.json"
            data = _read_json(index)
            if data and data.get("digest") == entry.digest:
                index.unlink(missing_ok=True)
        _sidecar(entry.path).unlink(missing_ok=True)
        entry.path.unlink(missing_ok=True)


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"
