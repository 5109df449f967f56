"""Content-addressed artifact store shared by xdist workers and runs.

Bytes become a verified, immutable file exactly once per cache: `obtain()` checks the index,
takes a per-key file lock, checks again, lets the producer write a temp file, fsyncs and verifies
it, then renames it into `objects/`. The index entry is written last, so a crash at any point
leaves at most a temp file under `tmp/`, never a half-written file under a final name.

Layout under the root:
  objects/<2 hex>/<sha256>.<kind>       the artifact, read-only
  objects/<2 hex>/<sha256>.<kind>.json  sidecar: source(s), size, digest, created, last used
  index/<hash of key>.json              source identity -> digest
  locks/<hash of key>.lock              single-flight lock per source identity
  tmp/                                  temp and resumable partial files
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_flightctl_device.core.formats import read_manifest
from pytest_flightctl_device.errors import ArtifactError, MissingToolError

KINDS = ("qcow2", "bundle", "file")
_EXT = {"qcow2": "qcow2", "bundle": "tar", "file": "bin"}
_CHUNK = 1 << 20

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _writer_gone(temp: Path, prefix: str) -> bool:
    """True when `temp` is named `<prefix><pid>.<...>` and that pid no longer runs."""
    pid = temp.name.removeprefix(prefix).split(".", 1)[0]
    return temp.name.startswith(prefix) and pid.isdigit() and not _alive(int(pid))


def _drop_dead_temps(path: Path) -> None:
    """Remove temps of `path` whose writer was killed between write and rename (kill -9)."""
    prefix = f".{path.name}."
    for temp in path.parent.glob(glob.escape(prefix) + "*"):
        if _writer_gone(temp, prefix):
            temp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically replace `path` with `data` (unique temp name, fsync, rename).

    A writer killed before its rename leaves `.<name>.<pid>.<hex>`; the next write of the same
    file removes it, so a sidecar or index entry never leaks a temp for good.
    """
    _drop_dead_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as handle:
        json.dump(data, handle, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with path.open() as handle:
            data = json.load(handle)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# -- verification by kind --------------------------------------------------------------------


def qemu_img() -> str:
    path = shutil.which("qemu-img")
    if path is None:
        raise MissingToolError("qemu-img is not installed; install qemu-utils (Debian) or qemu-img (Fedora).")
    return path


def qcow2_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` of `path`; ArtifactError when qemu-img cannot read it."""
    result = subprocess.run(
        [qemu_img(), "info", "--output=json", "--force-share", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise ArtifactError(f"{path} is not a readable disk image ({reason}); give a qcow2 file.")
    info: dict[str, Any] = json.loads(result.stdout)
    return info


def check_qcow2(path: Path) -> None:
    """The file is a qcow2 whose metadata `qemu-img check` finds consistent (leaks are harmless)."""
    fmt = qcow2_info(path).get("format")
    if fmt != "qcow2":
        raise ArtifactError(f"{path} is a {fmt} image, not a qcow2; give the qcow2 disk image.")
    result = subprocess.run(
        [qemu_img(), "check", "--force-share", "-f", "qcow2", str(path)],
        capture_output=True, text=True, check=False,
    )
    if result.returncode not in (0, 3):  # 3: leaked clusters only, the data is intact
        reason = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["check failed"]
        raise ArtifactError(f"{path} failed `qemu-img check` ({reason[0]}); fetch the qcow2 again.")


def _problem(entry: Entry) -> Problem | None:
    """Why an object is not what its name and kind promise, or None when it is."""
    try:
        digest = sha256_file(entry.path)
        if digest != entry.digest:
            raise ArtifactError(f"content has sha256 {digest}, not {entry.digest}")
        check_kind(entry.path, entry.kind)
    except ArtifactError as exc:
        return Problem(entry.path, str(exc))
    return None


def bundle_tags(path: Path) -> list[str]:
    """RepoTags of a `podman save -m` (docker-archive) tar, read from its manifest.json."""
    tags = [tag for entry in read_manifest(path) for tag in entry.tags]
    if not tags:
        raise ArtifactError(
            f"{path} has no manifest.json with RepoTags; give a bundle made by `podman save -m` of tagged images."
        )
    return tags


def check_kind(path: Path, kind: str) -> None:
    if kind == "qcow2":
        check_qcow2(path)
    elif kind == "bundle":
        bundle_tags(path)


# -- the store -------------------------------------------------------------------------------


class Cache:
    """A directory of verified artifacts, safe for concurrent processes on one host."""

    def __init__(self, root: Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.objects = self.root / "objects"
        self.index = self.root / "index"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"

    def _ensure(self) -> None:
        for directory in (self.objects, self.index, self.locks, self.tmp):
            directory.mkdir(parents=True, exist_ok=True)

    def partial(self, key: str, suffix: str = "part") -> Path:
        """A stable temp path for `key`: a producer may resume what a killed process left there."""
        self._ensure()
        return self.tmp / f"{_key_name(key)}.{suffix}"

    def object_path(self, digest: str, kind: str) -> Path:
        return self.objects / digest[:2] / f"{digest}.{_EXT[kind]}"

    def lock(self, key: str) -> FileLock:
        self._ensure()
        return FileLock(str(self.locks / f"{_key_name(key)}.lock"))

    def lookup(self, key: str) -> Path | None:
        """The object recorded for `key`, or None; marks it used and held by this process."""
        entry = _read_json(self.index / f"{_key_name(key)}.json")
        if not entry or entry.get("key") != key:
            return None
        path = self.object_path(str(entry["digest"]), str(entry["kind"]))
        try:
            _hold(path)
        except FileNotFoundError:  # pruned or never finished: produce it again
            return None
        self._touch(path)
        return path

    def find_digest(self, digest: str, kind: str) -> Path | None:
        """An object with this content, whatever source put it there."""
        path = self.object_path(digest, kind)
        return path if path.is_file() else None

    def obtain(
        self,
        key: str,
        produce: Callable[[Path], str | None],
        *,
        kind: str,
        expected_sha256: str | None = None,
        source: str = "",
        waiting: Callable[[], None] | None = None,
    ) -> Path:
        """The verified object for `key`, produced at most once across processes.

        `produce(tmp)` writes the artifact to `tmp` and may return its sha256 when it hashed the
        bytes on the way (saves a second read); `waiting` is called when another process holds
        the lock, so the caller can say why nothing happens.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        expected = expected_sha256.lower().removeprefix("sha256:") if expected_sha256 else None
        found = self.lookup(key)
        if found is None and expected and (found := self.find_digest(expected, kind)):
            self._record(key, expected, kind, source, found)
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
            return self._produce(key, produce, kind=kind, expected=expected, source=source)
        finally:
            lock.release()

    def _produce(
        self, key: str, produce: Callable[[Path], str | None], *, kind: str, expected: str | None,
        source: str,
    ) -> Path:
        for stale in self.tmp.glob(f"{_key_name(key)}.*.new"):  # left by a killed producer
            stale.unlink(missing_ok=True)
        self._drop_dead_producers()
        self._clean_tmp()  # partials of keys nobody asked for again in a day (a killed run's download)
        tmp = self.tmp / f"{_key_name(key)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new"
        try:
            digest = produce(tmp)
            if not tmp.is_file():
                raise ArtifactError(f"{source or key} produced no file; report this as a bug.")
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
            if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                digest = sha256_file(tmp)  # the producer did not hash on the way (or returned junk)
            if expected and digest != expected:
                raise ArtifactError(
                    f"{source or key} has sha256 {digest}, not the expected {expected}; "
                    "check the sha256 option or the source."
                )
            check_kind(tmp, kind)
            final = self.object_path(digest, kind)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_file():
                tmp.unlink()
            else:
                tmp.chmod(0o444)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
        finally:
            tmp.unlink(missing_ok=True)
        self._record(key, digest, kind, source, final)
        self._touch(final)
        _hold(final)
        return final

    def _record(self, key: str, digest: str, kind: str, source: str, path: Path) -> None:
        sidecar = Path(f"{path}.json")
        now = time.time()
        data = _read_json(sidecar) or {"digest": digest, "kind": kind, "size": path.stat().st_size,
                                        "created": now, "sources": [], "keys": []}
        if source and source not in data["sources"]:
            data["sources"].append(source)
        if key not in data["keys"]:
            data["keys"].append(key)
        data["last_used"] = now
        _write_json(sidecar, data)
        _write_json(self.index / f"{_key_name(key)}.json", {"key": key, "digest": digest, "kind": kind})

    def _touch(self, path: Path) -> None:
        sidecar = Path(f"{path}.json")
        data = _read_json(sidecar)
        if data is not None:
            data["last_used"] = time.time()
            with contextlib.suppress(OSError):
                _write_json(sidecar, data)

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
            data = _read_json(Path(f"{path}.json")) or {}
            stat = path.stat()
            result.append(Entry(
                path=path, digest=path.name.split(".")[0], kind=str(data.get("kind", "file")),
                size=stat.st_size, sources=tuple(data.get("sources", ())), keys=tuple(data.get("keys", ())),
                created=float(data.get("created", stat.st_mtime)),
                last_used=float(data.get("last_used", stat.st_mtime)),
            ))
        return sorted(result, key=lambda entry: entry.last_used)

    def _drop_dead_producers(self) -> None:
        """Remove `<key>.<pid>.<hex>.new` files of any key whose producer was killed: never resumed."""
        for stale in self.tmp.glob("*.new"):
            if _writer_gone(stale, stale.name.split(".", 1)[0] + "."):
                stale.unlink(missing_ok=True)

    def sweep_dead_temps(self) -> list[Path]:
        """Remove every temp a killed process left outside its rename: json temps, `.new` files."""
        found = [p for p in self.tmp.glob("*.new") if _writer_gone(p, p.name.split(".", 1)[0] + ".")]
        for directory in (self.index, self.root / "verified", *self.objects.glob("*")):
            for temp in directory.glob(".*"):
                target = temp.name[1:].rsplit(".", 2)[0]
                if temp.is_file() and _writer_gone(temp, f".{target}."):
                    found.append(temp)
        for path in found:
            path.unlink(missing_ok=True)
        return found

    def check(self) -> list[Problem]:
        """Re-hash and re-check every object, changing nothing (an audit; verify() also repairs)."""
        return [problem for entry in self.entries() if (problem := _problem(entry)) is not None]

    def verify(self) -> list[Problem]:
        """Re-hash and re-check every object; the ones that fail are removed and reported.

        Temps of killed writers are removed on the way (they are not objects, so not reported).
        """
        self.sweep_dead_temps()
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
        self._clean_tmp()
        return removed

    def _remove(self, entry: Entry) -> None:
        for key in entry.keys:
            index = self.index / f"{_key_name(key)}.json"
            data = _read_json(index)
            if data and data.get("digest") == entry.digest:
                index.unlink(missing_ok=True)
        Path(f"{entry.path}.json").unlink(missing_ok=True)
        entry.path.unlink(missing_ok=True)

    def _clean_tmp(self, older_than: float = 86400.0) -> None:
        """Drop temp files older than a day whose producer is gone (no lock held on their key)."""
        now = time.time()
        for path in self.tmp.glob("*"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > older_than:
                    lock = FileLock(str(self.locks / f"{path.name.split('.')[0]}.lock"))
                    with contextlib.suppress(TimeoutError), lock.acquire(timeout=0):
                        path.unlink()
