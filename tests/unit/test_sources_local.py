"""Local files used in place: their sha256 is remembered per file identity, their errors are one sentence."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.artifacts.sources.local import local_bundle, local_qcow2
from pytest_flightctl_device.errors import ConfigError
from tests.support.helpers import require_tool

LAYER = 32 << 20  # big enough that reading it shows in this process's I/O counters


def big_bundle(path: Path) -> Path:
    manifest = json.dumps([{"Config": "d" * 64 + ".json", "RepoTags": ["quay.io/x/y:base"], "Layers": []}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in (("manifest.json", manifest), ("layer.bin", b"a" * LAYER)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def bytes_read() -> int:
    """Bytes this process has read through read(2) and friends so far (/proc/self/io rchar)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


def read_during(call: Callable[[], None]) -> int:
    before = bytes_read()
    call()
    return bytes_read() - before


def test_a_verified_file_is_not_hashed_again_until_it_changes(tmp_path: Path) -> None:
    tar = big_bundle(tmp_path / "bundle.tar")
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    cache = Cache(tmp_path / "cache")

    def check() -> None:
        assert local_bundle(str(tar), sha256=digest, cache=cache) == tar.resolve()

    assert read_during(check) >= LAYER  # first time: hashed
    assert read_during(check) < LAYER // 4  # remembered: only the manifest is read
    stat = tar.stat()
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_during(check) >= LAYER  # a new mtime is another file: hashed again
    assert len(list(cache.verified.iterdir())) == 2  # one verdict per identity, no temp left
    assert all(json.loads(p.read_text())["sha256"] == digest for p in cache.verified.iterdir())


def test_a_changed_file_fails_naming_the_option_in_one_sentence(tmp_path: Path) -> None:
    tar = big_bundle(tmp_path / "bundle.tar")
    digest = hashlib.sha256(tar.read_bytes()).hexdigest()
    cache = Cache(tmp_path / "cache")
    local_bundle(str(tar), sha256=digest, cache=cache)
    with tar.open("r+b") as handle:  # same size, new content, new mtime
        handle.seek(-LAYER // 2, os.SEEK_END)
        handle.write(b"b")
    stat = tar.stat()
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ConfigError) as info:
        local_bundle(str(tar), sha256=digest, cache=cache)
    message = str(info.value)
    assert message == (f"{tar.resolve()} has sha256 {hashlib.sha256(tar.read_bytes()).hexdigest()}, not the "
                       f"{digest} given with --device-bundle-sha256; give the right file or digest.")


def test_a_file_that_is_no_disk_image_is_one_sentence(tmp_path: Path) -> None:
    require_tool("qemu-img")
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + b"\x00" * 100)  # qcow2 magic, broken header
    with pytest.raises(ConfigError) as info:
        local_qcow2(str(junk), option="--qcow2")
    assert str(info.value) == (f"--qcow2 {junk.resolve()} is a raw image, not a qcow2; convert it with "
                               "`qemu-img convert -O qcow2` or give a qcow2.")  # qemu-img probes junk as raw
    with pytest.raises(ConfigError) as info:
        local_qcow2(str(tmp_path / "absent.qcow2"))
    assert str(info.value) == (f"--device-qcow2 {tmp_path / 'absent.qcow2'} does not exist; "
                               "give the path of a qcow2 disk image.")
