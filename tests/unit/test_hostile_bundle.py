"""Hostile images bundles: each manifest is read correctly or refused with an ArtifactError.

Property-based (hypothesis) over manifest.json shapes in a tar (missing RepoTags, wrong types,
strings where lists belong, path traversal and absolute paths in Config and Layers, huge tag
lists, deep nesting, arbitrary JSON and bytes) and over the tar itself (manifest.json as a
symlink, a directory or under '../', duplicates, truncated or corrupted headers). Both readers
are covered: the cache's check of a bundle (bundle_tags) and podman's (read_manifest). Nothing
is extracted: the test checks no file appears next to the bundle either.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from pytest_flightctl_device.core.formats import MANIFEST_MAX_BYTES, ManifestEntry, bundle_tags, read_manifest
from pytest_flightctl_device.errors import ArtifactError, DeviceError
from tests.support.hostile import BOUNDED, clear_error, jail

HEX = "0123456789abcdef" * 4
IDS = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4),
                    max_leaves=10)
TRAVERSAL = ["../" + HEX + ".json", "/etc/" + HEX + ".json", "a/../../" + HEX + ".json",
             "..\\" + HEX + ".json", "/" + HEX + ".json", "blobs/../../../" + HEX]
TAGS = st.lists(st.sampled_from(["quay.io/flightctl/flightctl-device:base-t", "r:v2-t", "localhost/x:y"])
                | st.text(max_size=30), max_size=6)


def tar_of(members: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar of (name, data, kind) members; kind is b"file", b"dir", b"symlink:<target>" or b"hard:<t>"."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            if kind == b"dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind.startswith(b"symlink:"):
                info.type, info.linkname = tarfile.SYMTYPE, kind[8:].decode()
                tar.addfile(info)
            elif kind.startswith(b"hard:"):
                info.type, info.linkname = tarfile.LNKTYPE, kind[5:].decode()
                tar.addfile(info)
            else:
                payload = data or b""
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def bundle(manifest: bytes) -> bytes:
    """A docker-archive-like tar: a config, a layer and `manifest` as manifest.json."""
    return tar_of([(f"{HEX}.json", b"{}", b"file"), ("layer.tar", b"x" * 512, b"file"),
                   ("manifest.json", manifest, b"file")])


def read_both(blob: bytes) -> tuple[list[ManifestEntry] | None, list[str] | None]:
    """Run both readers on `blob` in a jail; each gives its result or an ArtifactError (checked here)."""
    with jail("in") as root:
        path = root / "in" / "bundle.tar"
        path.write_bytes(blob)
        entries: list[ManifestEntry] | None = None
        tags: list[str] | None = None
        try:
            entries = read_manifest(path)
        except DeviceError as exc:
            clear_error(exc)
            assert isinstance(exc, ArtifactError)
        try:
            tags = bundle_tags(path)
        except DeviceError as exc:
            clear_error(exc)
            assert isinstance(exc, ArtifactError)
        assert sorted(p.name for p in (root / "in").iterdir()) == ["bundle.tar"]
        return entries, tags


def strictly_valid(manifest: Any) -> list[ManifestEntry] | None:
    """The entries a careful reader must return, computed independently; None when it must refuse."""
    if not isinstance(manifest, list):
        return None
    found = []
    for item in manifest:
        if not isinstance(item, dict) or not isinstance(item.get("Config"), str):
            return None
        config = item["Config"]
        parts = config.replace("\\", "/").split("/")
        if config.startswith(("/", "\\")) or ".." in parts or "\0" in config:
            return None
        image_id = parts[-1].removesuffix(".json").removeprefix("sha256:")
        if not re.fullmatch("[0-9a-f]{64}", image_id):
            return None
        layers = item.get("Layers")
        if layers is not None and not (isinstance(layers, list) and all(
                isinstance(x, str) and x and "\0" not in x and not x.startswith(("/", "\\"))
                and ".." not in x.replace("\\", "/").split("/") for x in layers)):
            return None
        tags = [] if item.get("RepoTags") is None else item["RepoTags"]
        if not isinstance(tags, list) or not all(
                isinstance(t, str) and t and t.isprintable() and not any(c.isspace() for c in t) for t in tags):
            return None
        found.append(ManifestEntry(image_id, tuple(tags)))
    return found or None


def _hostile_entry(data: st.DataObject) -> Any:
    entry: dict[str, Any] = {"Config": f"{data.draw(IDS)}.json", "RepoTags": data.draw(TAGS),
                             "Layers": ["layer.tar"]}
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(["Config", "RepoTags", "Layers"]))
        how = data.draw(st.sampled_from(["drop", "json", "traversal", "string", "huge", "null"]))
        if how == "drop":
            entry.pop(key, None)
        elif how == "json":
            entry[key] = data.draw(JSON)
        elif how == "traversal":
            value = data.draw(st.sampled_from(TRAVERSAL))
            entry[key] = value if key == "Config" else [value]
        elif how == "string":
            entry[key] = "quay.io/flightctl/flightctl-device:base-t" if key == "RepoTags" else "layer.tar"
        elif how == "huge":
            entry[key] = [f"r:{i}" for i in range(data.draw(st.sampled_from([1000, 20000])))]
        else:
            entry[key] = None
    return entry if data.draw(st.integers(0, 9)) else data.draw(JSON)


@BOUNDED
@given(data=st.data())
def test_manifest_shapes(data: st.DataObject) -> None:
    manifest: Any = [_hostile_entry(data) for _ in range(data.draw(st.integers(0, 3)))]
    if not data.draw(st.integers(0, 9)):
        manifest = data.draw(JSON)
    event("accepted" if check_manifest(manifest) else "refused")


@pytest.mark.parametrize("manifest", [
    [{"Config": f"{HEX}.json", "RepoTags": "quay.io/x:base-t"}],
    [{"Config": f"../../{HEX}.json", "RepoTags": ["r:base-t"]}],
    [{"Config": f"/var/lib/{HEX}.json", "RepoTags": ["r:base-t"]}],
    [{"Config": f"{HEX}.json", "RepoTags": ["r:base-t"], "Layers": ["../../../etc/shadow"]}],
    [{"Config": f"{HEX}.json", "RepoTags": ["r:base-t"], "Layers": "layer.tar"}],
    [{"Config": f"{HEX}.json", "RepoTags": [["r:base-t"]]}],
    [{"Config": f"{HEX}.json", "RepoTags": {"r:base-t": 1}}],
    [{"Config": f"{HEX}.json", "RepoTags": ["r:base-t\nr:v2-t"]}],
    [{"Config": 7, "RepoTags": ["r:base-t"]}],
    [{"Config": f"{HEX}.json", "RepoTags": [f"r:{i}" for i in range(50_000)]}],
    [{"Config": f"sha256:{HEX}", "RepoTags": None}, {"Config": f"blobs/{HEX}.json"}],
    {"Config": f"{HEX}.json", "RepoTags": ["r:base-t"]},
    ["not an object"],
])
def test_planted_manifests(manifest: Any) -> None:
    check_manifest(manifest)


def check_manifest(manifest: Any) -> bool:
    """Both readers on a bundle with this manifest; read_manifest's verdict must be the oracle's."""
    expected = strictly_valid(manifest)
    entries, tags = read_both(bundle(json.dumps(manifest).encode()))
    assert entries == expected, f"read_manifest gave {entries!r:.200} for {manifest!r:.300}"
    if tags is not None:  # the quick check (formats.bundle_tags) only has to not crash
        assert isinstance(tags, list) and tags
    return entries is not None


@BOUNDED
@given(raw=st.binary(max_size=2000) | st.text(max_size=500).map(str.encode)
       | st.integers(100, 900).map(lambda n: b"[" * n + b"]" * n))
@example(raw=b"[" * 100_000)
@example(raw=b'[{"Config": "' + HEX.encode() + b'.json", "RepoTags": ' + b"[" * 50_000 + b"]}]")
@example(raw=b"\xff\xfe[]")
@example(raw=b"")
def test_manifest_bytes(raw: bytes) -> None:
    try:
        expected = strictly_valid(json.loads(raw))
    except (ValueError, RecursionError):
        expected = None
    entries, _tags = read_both(bundle(raw))
    assert entries == expected


@BOUNDED
@given(kind=st.sampled_from(["symlink", "dir", "hardlink", "parent", "dot", "dotdot-dot", "twice", "absolute"]),
       target=st.sampled_from(["/etc/passwd", "../outside.json", "layer.tar", f"{HEX}.json"]))
def test_manifest_member_kinds(kind: str, target: str) -> None:
    good = json.dumps([{"Config": f"{HEX}.json", "RepoTags": ["r:base-t"]}]).encode()
    members: list[tuple[str, bytes | None, bytes]] = [(f"{HEX}.json", b"{}", b"file")]
    if kind == "symlink":
        members.append(("manifest.json", None, b"symlink:" + target.encode()))
    elif kind == "hardlink":
        members.append(("manifest.json", None, b"hard:" + target.encode()))
    elif kind == "dir":
        members.append(("manifest.json", None, b"dir"))
    elif kind == "parent":
        members.append(("../manifest.json", good, b"file"))
    elif kind == "dotdot-dot":
        members.append((".../manifest.json", good, b"file"))
    elif kind == "absolute":
        members.append(("/manifest.json", good, b"file"))
    elif kind == "dot":
        members.append(("./manifest.json", good, b"file"))
    else:
        members += [("manifest.json", good, b"file"), ("manifest.json", b"[]", b"file")]
    entries, _tags = read_both(tar_of(members))
    if kind in ("dot", "twice"):
        assert entries == [ManifestEntry(HEX, ("r:base-t",))]
    else:
        assert entries is None, f"took a {kind} as the manifest"


@BOUNDED
@given(flips=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 6000))
def test_corrupted_tar(flips: list[tuple[int, int]], cut: int | None) -> None:
    blob = bytearray(bundle(json.dumps([{"Config": f"{HEX}.json", "RepoTags": ["r:base-t"]}]).encode()))
    for where, value in flips:
        if where < len(blob):
            blob[where] = value
    data = bytes(blob[:cut] if cut is not None else blob)
    entries, _tags = read_both(data)
    event("accepted" if entries else "refused")
    if entries is not None:
        assert all(re.fullmatch("[0-9a-f]{64}", e.image_id) for e in entries)


def test_a_huge_manifest_is_refused_unread(tmp_path: Path) -> None:
    """A manifest.json of 16 MiB + 1 is refused from its tar header, before it is read."""
    path = tmp_path / "b.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = MANIFEST_MAX_BYTES + 1
        tar.addfile(info, io.BytesIO(b" " * info.size))
    with pytest.raises(ArtifactError, match="more than a manifest can be") as caught:
        read_manifest(path)
    clear_error(caught.value)
