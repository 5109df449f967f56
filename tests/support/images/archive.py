"""Docker-archive bundles written in Python, laid out as `podman save -m` lays them out.

Layers are uncompressed tars stored as `<sha256>.tar`, configs as `<image id>.json` (the ID is
the config's sha256) with the layers' diff_ids, and a manifest.json listing Config, RepoTags and
Layers. Tests of the push that need no podman (or need a big bundle fast) use these; the podman
tests check the same code against bundles podman itself wrote.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Spec:
    """One image: its tags and its layers, each given as {path: bytes} (or a size of random bytes)."""

    tags: tuple[str, ...]
    layers: tuple[dict[str, bytes] | int, ...]


def layer_tar(files: dict[str, bytes] | int) -> bytes:
    if isinstance(files, int):
        files = {"var/blob.bin": os.urandom(files)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_archive(dest: Path, specs: Sequence[Spec], *,
                  shared: Sequence[dict[str, bytes] | int] = ()) -> dict[str, str]:
    """Write the bundle; every image gets the `shared` layers first. Returns tag -> image ID."""
    blobs: dict[str, bytes] = {}
    shared_digests = []
    for files in shared:
        data = layer_tar(files)
        digest = hashlib.sha256(data).hexdigest()
        blobs[f"{digest}.tar"] = data
        shared_digests.append(digest)
    manifest = []
    ids: dict[str, str] = {}
    for spec in specs:
        digests = list(shared_digests)
        for files in spec.layers:
            data = layer_tar(files)
            digest = hashlib.sha256(data).hexdigest()
            blobs[f"{digest}.tar"] = data
            digests.append(digest)
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "config": {"Labels": {"tags": " ".join(spec.tags)}},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in digests]},
            "history": [{"created_by": "tests.support.images.archive"} for _ in digests],
        }).encode()
        image_id = hashlib.sha256(config).hexdigest()
        blobs[f"{image_id}.json"] = config
        manifest.append({"Config": f"{image_id}.json", "RepoTags": list(spec.tags),
                         "Layers": [f"{d}.tar" for d in digests]})
        ids.update({tag: image_id for tag in spec.tags})
    with tarfile.open(dest, "w") as tar:
        for name, data in [*blobs.items(), ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return ids
