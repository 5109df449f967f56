"""The formats the cache is handed: qcow2 read by the real qemu-img, bundles by their manifest."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_flightctl_device.core import formats
from pytest_flightctl_device.core.formats import BUNDLE, FILE, FORMATS, QCOW2, bundle_tags, qcow2_info, read_manifest
from pytest_flightctl_device.errors import ArtifactError, MissingToolError
from tests.support.helpers import require_tool


def qemu_image(path: Path, fmt: str = "qcow2") -> Path:
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", fmt, str(path), "8M"], check=True)
    return path


def bundle(path: Path, tags: list[str]) -> Path:
    manifest = json.dumps([{"Config": "c" * 64 + ".json", "RepoTags": tags, "Layers": ["l/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_the_one_qemu_img_lookup_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Path(formats.qemu_img()).name == "qemu-img"
    monkeypatch.setenv("PATH", "")
    with pytest.raises(MissingToolError, match=r"install qemu-utils \(Debian\) or qemu-img \(Fedora\)"):
        formats.qemu_img()


def test_a_real_qcow2_passes_and_reports_its_size(tmp_path: Path) -> None:
    disk = qemu_image(tmp_path / "disk.qcow2")
    QCOW2(disk)
    assert qcow2_info(disk)["virtual-size"] == 8 << 20


def test_a_raw_image_and_a_text_file_are_not_qcow2(tmp_path: Path) -> None:
    raw = qemu_image(tmp_path / "disk.img", "raw")
    text = tmp_path / "notes.qcow2"
    text.write_text("not a disk image\n")
    for path in (raw, text):
        with pytest.raises(ArtifactError) as info:
            QCOW2(path)
        assert str(info.value) == f"{path} is a raw image, not a qcow2; give the qcow2 disk image."


def test_a_qcow2_with_a_broken_header_fails_in_one_sentence(tmp_path: Path) -> None:
    disk = qemu_image(tmp_path / "disk.qcow2")
    data = bytearray(disk.read_bytes())
    data[4:8] = b"\x00\x00\x00\x63"  # an impossible qcow2 version
    disk.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        QCOW2(disk)
    message = str(info.value)
    assert message.startswith(f"{disk} is not a readable disk image (") and "\n" not in message


def test_a_bundle_needs_tagged_images(tmp_path: Path) -> None:
    good = bundle(tmp_path / "good.tar", ["quay.io/x/y:base"])
    assert bundle_tags(good) == ["quay.io/x/y:base"]
    assert [entry.image_id for entry in read_manifest(good)] == ["c" * 64]
    BUNDLE(good)
    with pytest.raises(ArtifactError, match=r"no manifest\.json with RepoTags"):
        BUNDLE(bundle(tmp_path / "untagged.tar", []))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x00junk" * 300)
    with pytest.raises(ArtifactError, match=r"is not a docker-archive images bundle \(it cannot be read as a tar"):
        BUNDLE(junk)


def test_formats_have_distinct_names_and_suffixes(tmp_path: Path) -> None:
    """The cache records a format by name and stores its objects under its suffix: neither may clash."""
    assert FORMATS == {"qcow2": QCOW2, "bundle": BUNDLE, "file": FILE}
    assert len({fmt.suffix for fmt in FORMATS.values()}) == len(FORMATS)
    anything = tmp_path / "any"
    anything.write_bytes(b"\x00\xff")
    FILE(anything)  # only the sha256 is ever checked for a plain file
