"""The content-addressed cache: once-only production, nothing half-written, verification, pruning."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.core.atomic import temp_path
from pytest_flightctl_device.core.formats import BUNDLE, FILE, QCOW2
from pytest_flightctl_device.errors import ArtifactError
from tests.support.helpers import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]


def writer(data: bytes, calls: list[int] | None = None):  # type: ignore[no-untyped-def]
    def produce(tmp: Path) -> None:
        if calls is not None:
            calls.append(1)
        tmp.write_bytes(data)

    return produce


def leftovers(cache: Cache) -> list[Path]:
    """Files under final names (objects, index) and temp files."""
    return [p for p in cache.root.rglob("*") if p.is_file() and "locks" not in p.parts]


def bundle_bytes(tags: list[str]) -> bytes:
    buffer = io.BytesIO()
    manifest = json.dumps([{"Config": "b" * 64 + ".json", "RepoTags": tags, "Layers": []}]).encode()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return buffer.getvalue()


def test_obtain_produces_once_and_is_read_only(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    calls: list[int] = []
    path = cache.obtain("url:x", writer(b"hello", calls), FILE, source="x")
    again = cache.obtain("url:x", writer(b"other", calls), FILE)
    assert path == again and path.read_bytes() == b"hello" and calls == [1]
    assert path.name.startswith(hashlib.sha256(b"hello").hexdigest())
    assert path.stat().st_mode & 0o222 == 0
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar["size"] == 5 and sidecar["sources"] == ["x"] and sidecar["last_used"] >= sidecar["created"]
    assert cache.lookup("url:x") == path and cache.lookup("url:y") is None


def test_failing_producer_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def produce(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise ArtifactError("connection lost")

    with pytest.raises(ArtifactError, match="connection lost"):
        cache.obtain("url:x", produce, FILE)
    assert leftovers(cache) == []


def test_wrong_sha256_is_refused(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    with pytest.raises(ArtifactError) as info:
        cache.obtain("url:x", writer(b"hello"), FILE, expected_sha256="0" * 64, source="http://h/x")
    assert "http://h/x" in str(info.value) and "0" * 64 in str(info.value)
    assert leftovers(cache) == []


def test_same_content_from_two_sources_is_stored_once(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    first = cache.obtain("url:a", writer(b"same"), FILE)
    second = cache.obtain("url:b", writer(b"same"), FILE)
    assert first == second and len(cache.entries()) == 1
    assert set(cache.entries()[0].keys) == {"url:a", "url:b"}


def test_known_digest_skips_production(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    path = cache.obtain("url:a", writer(b"same"), FILE)
    calls: list[int] = []
    digest = hashlib.sha256(b"same").hexdigest()
    assert cache.obtain("url:mirror", writer(b"same", calls), FILE, expected_sha256=digest) == path
    assert calls == []


def test_bundle_needs_repo_tags(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    good = cache.obtain("url:good", writer(bundle_bytes(["q.io/a:b"])), BUNDLE)
    assert good.suffix == ".tar"
    with pytest.raises(ArtifactError, match="RepoTags"):
        cache.obtain("url:bad", writer(bundle_bytes([])), BUNDLE)
    with pytest.raises(ArtifactError, match="not a docker-archive images bundle"):
        cache.obtain("url:junk", writer(b"\x00junk" * 300), BUNDLE)
    assert len(cache.entries()) == 1


def test_qcow2_is_checked_with_qemu_img(tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    cache = Cache(tmp_path / "cache")
    for fmt in ("qcow2", "raw"):
        subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(tmp_path / fmt), "8M"], check=True)
    path = cache.obtain("url:q", writer((tmp_path / "qcow2").read_bytes()), QCOW2)
    assert path.suffix == ".qcow2"
    with pytest.raises(ArtifactError, match="raw image, not a qcow2"):
        cache.obtain("url:r", writer((tmp_path / "raw").read_bytes()), QCOW2)
    broken = bytearray((tmp_path / "qcow2").read_bytes())
    broken[4:8] = b"\x00\x00\x00\x63"  # impossible qcow2 version
    with pytest.raises(ArtifactError):
        cache.obtain("url:b", writer(bytes(broken)), QCOW2)


def test_threads_wanting_one_key_produce_once(tmp_path: Path) -> None:
    cache_paths: list[Path] = []
    calls: list[int] = []
    waits: list[int] = []

    def slow(tmp: Path) -> None:
        calls.append(1)
        time.sleep(0.3)
        tmp.write_bytes(b"slow")

    def want() -> None:
        cache_paths.append(Cache(tmp_path).obtain("url:s", slow, FILE, waiting=lambda: waits.append(1)))

    threads = [threading.Thread(target=want) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(set(cache_paths)) == 1 and len(cache_paths) == 4
    assert waits  # the others were told they wait


def populate_in_child(root: Path, items: dict[str, bytes]) -> None:
    """Fill the cache from another process, which then exits: its holds end with it."""
    script = ("import sys, time\nfrom pathlib import Path\nfrom pytest_flightctl_device.artifacts.cache import Cache\n"
              "from pytest_flightctl_device.core.formats import FILE\n"
              f"c = Cache(Path({str(root)!r}))\n")
    for key, data in items.items():
        script += f"c.obtain({key!r}, lambda t: t.write_bytes({data!r}), FILE)\ntime.sleep(0.05)\n"
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT)


def test_prune_removes_least_recently_used_not_held(tmp_path: Path) -> None:
    populate_in_child(tmp_path, {"url:old": b"o" * 1000, "url:mid": b"m" * 1000, "url:new": b"n" * 1000})
    cache = Cache(tmp_path)
    held = cache.lookup("url:old")  # this live process now holds the oldest: it must survive
    assert held is not None
    removed = cache.prune(2000)
    assert [e.keys for e in removed] == [("url:mid",)]
    assert cache.lookup("url:mid") is None and cache.lookup("url:new") is not None and held.exists()


def test_verify_removes_tampered_objects(tmp_path: Path) -> None:
    populate_in_child(tmp_path, {"url:a": b"a" * 100, "url:b": b"b" * 100})
    cache = Cache(tmp_path)
    victim = cache.entries()[0].path
    victim.chmod(0o644)
    victim.write_bytes(b"tampered")
    audit = cache.check()  # reports, changes nothing
    assert [p.path for p in audit] == [victim] and len(cache.entries()) == 2 and victim.exists()
    problems = cache.verify()
    assert [p.path for p in problems] == [victim] and "sha256" in problems[0].reason
    assert len(cache.entries()) == 1 and not victim.exists()


def test_same_bytes_under_two_formats_are_two_objects(tmp_path: Path) -> None:
    """The object a digest names is reused only when it passed the same check."""
    cache = Cache(tmp_path)
    data = bundle_bytes(["q.io/a:b"])
    plain = cache.obtain("url:plain", writer(data), FILE)
    digest = hashlib.sha256(data).hexdigest()
    bundle = cache.obtain("url:bundle", writer(data), BUNDLE, expected_sha256=digest)
    assert plain != bundle and (plain.suffix, bundle.suffix) == (".bin", ".tar")
    assert sorted(e.kind for e in cache.entries()) == ["bundle", "file"]
    assert cache.lookup("url:plain") == plain and cache.lookup("url:bundle") == bundle


def dead_writers_temp(dest: Path) -> Path:
    """A temp of `dest` named after a process that has exited: what a kill before the rename leaves."""
    code = ("import sys; from pathlib import Path; from pytest_flightctl_device.core.atomic import temp_path;"
            "t = temp_path(Path(sys.argv[1])); t.write_text('killed'); print(t)")
    return Path(subprocess.run([sys.executable, "-c", code, str(dest)], check=True, capture_output=True,
                               text=True, cwd=REPO_ROOT).stdout.strip())


def test_one_sweep_removes_dead_writers_temps_and_old_partials_only(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    path = cache.obtain("url:x", writer(b"hello"), FILE)
    dead = [dead_writers_temp(d) for d in (cache.tmp / "k", cache.index / "k.json", Path(f"{path}.json"))]
    live = temp_path(cache.index / "mine.json")
    live.write_text("a live writer's")
    old, fresh, busy = cache.partial("url:old"), cache.partial("url:fresh", "zip"), cache.partial("url:busy")
    for partial in (old, fresh, busy):
        partial.write_bytes(b"part")
    for partial in (old, busy):
        os.utime(partial, (time.time() - 2 * 86400,) * 2)
    with cache.lock("url:busy"):  # a live producer resuming it holds its key's lock
        held = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                               "from pytest_flightctl_device.artifacts.cache import Cache; "
                               "print(Cache(Path(sys.argv[1])).sweep())", str(tmp_path)],
                              check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    assert held.stdout.strip() == "4"
    assert not any(p.exists() for p in (*dead, old))
    assert live.exists() and fresh.exists() and busy.exists() and path.exists()
    assert cache.sweep() == 1 and not busy.exists()  # its lock is free now
    live.unlink()


def test_a_producer_killed_before_its_rename_leaks_nothing_after_the_next_obtain(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.tmp.mkdir(parents=True)
    stray = dead_writers_temp(cache.tmp / "any-key")
    cache.obtain("url:x", writer(b"hello"), FILE)
    assert not stray.exists()
    assert [p.name for p in cache.tmp.iterdir()] == []


def test_verify_re_hashes_only(tmp_path: Path) -> None:
    """An object passed its format's check before it got its name: a re-hash proves the same bytes."""
    cache = Cache(tmp_path)
    path = cache.obtain("url:b", writer(bundle_bytes(["q.io/a:b"])), BUNDLE)
    assert cache.check() == [] and cache.verify() == [] and path.exists()
