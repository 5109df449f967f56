"""The file formats the plugin accepts, checked before anything trusts them: qcow2 and images bundle.

The cache stores bytes and knows no format: a caller hands `Cache.obtain` one of the `Format`s
here (QCOW2, BUNDLE, FILE), whose check runs on the new bytes before they get a final name.

A bundle's manifest.json (docker-archive, `podman save -m`) is hostile input (a pull request's
artifact, a URL): every entry must be an object whose Config and Layers are paths inside the
archive and whose RepoTags is a list of image references. Anything else is one ArtifactError
sentence; the manifest is never extracted, and an absurdly large or deeply nested one is refused
unread. A qcow2 is read by `qemu-img` (found by `qemu_img()`, the one lookup of it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_flightctl_device.errors import ArtifactError, MissingToolError


def qemu_img() -> str:
    """The qemu-img binary, or MissingToolError naming the package to install."""
    path = shutil.which("qemu-img")
    if path is None:
        raise MissingToolError("qemu-img is not installed; install qemu-utils (Debian) or qemu-img (Fedora).")
    return path


def qcow2_info(path: Path) -> dict[str, Any]:
    """`qemu-img info` of `path`; ArtifactError when qemu-img cannot read it."""
    result = subprocess.run([qemu_img(), "info", "--output=json", "--force-share", str(path)],
                            capture_output=True, text=True, check=False)
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
    result = subprocess.run([qemu_img(), "check", "--force-share", "-f", "qcow2", str(path)],
                            capture_output=True, text=True, check=False)
    if result.returncode not in (0, 3):  # 3: leaked clusters only, the data is intact
        reason = (result.stderr.strip() or result.stdout.strip()).splitlines()[-1:] or ["check failed"]
        raise ArtifactError(f"{path} failed `qemu-img check` ({reason[0]}); fetch the qcow2 again.")


def bundle_tags(path: Path) -> list[str]:
    """RepoTags of a `podman save -m` (docker-archive) tar, read from its manifest.json."""
    tags = [tag for entry in read_manifest(path) for tag in entry.tags]
    if not tags:
        raise ArtifactError(
            f"{path} has no manifest.json with RepoTags; give a bundle made by `podman save -m` of tagged images."
        )
    return tags


@dataclass(frozen=True)
class Format:
    """A check to run on new bytes, with the name the cache records and its objects' file suffix."""

    name: str
    suffix: str
    check: Callable[[Path], object]

    def __call__(self, path: Path) -> None:
        self.check(path)


QCOW2 = Format("qcow2", "qcow2", check_qcow2)
BUNDLE = Format("bundle", "tar", bundle_tags)
FILE = Format("file", "bin", lambda _path: None)  # any bytes: only the sha256 is checked
FORMATS = {fmt.name: fmt for fmt in (QCOW2, BUNDLE, FILE)}


@dataclass(frozen=True)
class ManifestEntry:
    image_id: str
    tags: tuple[str, ...]
    # Where the image's parts lie in the archive (a push reads them straight from the bundle).
    config: str = field(default="", compare=False)
    layers: tuple[str, ...] = field(default=(), compare=False)


MANIFEST_MAX_BYTES = 16 << 20  # podman writes a few hundred bytes per image; refuse to slurp more


def read_manifest(bundle: Path) -> list[ManifestEntry]:
    """The images a docker-archive claims (its manifest.json), or ArtifactError in one sentence."""
    problem = "it has no manifest.json"
    try:
        with tarfile.open(bundle, "r:") as tar:
            for member in tar:
                if not _is_manifest(member):
                    continue
                if member.size > MANIFEST_MAX_BYTES:
                    problem = f"its manifest.json is {member.size} bytes, more than a manifest can be"
                    break
                handle = tar.extractfile(member)
                try:
                    raw = json.load(handle) if handle else None
                    entries = [_entry(item) for item in raw] if isinstance(raw, list) else []
                except (ValueError, RecursionError) as exc:
                    why = str(exc) if isinstance(exc, _Malformed) else ""
                    entries, problem = [], f"its manifest.json is malformed{why}"
                    break
                if entries:
                    return entries
                problem = "its manifest.json lists no tagged images"
                break
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        problem = f"it cannot be read as a tar ({exc.__class__.__name__})"
    raise ArtifactError(f"{bundle} is not a docker-archive images bundle ({problem}); give the tar "
                        "written by `flightctl-device bundle` or `podman save -m`.")


class _Malformed(ValueError):
    """A manifest entry of the wrong shape; str() is the reason, appended after "malformed"."""


def _is_manifest(member: tarfile.TarInfo) -> bool:
    """The archive's top-level manifest.json (also as ./manifest.json), a regular file."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name == "manifest.json" and member.isfile()


def _inside(path: str) -> bool:
    """A member path that stays inside the archive: relative, no '..', no backslash tricks."""
    parts = path.replace("\\", "/").split("/")
    return bool(path) and not path.startswith(("/", "\\")) and ".." not in parts and "\0" not in path


def _entry(item: Any) -> ManifestEntry:
    if not isinstance(item, dict):
        raise _Malformed(f": an entry is a {type(item).__name__}, not an object")
    config = item.get("Config")
    if not isinstance(config, str) or not _inside(config):
        raise _Malformed(": an entry's Config is not a path inside the archive")
    image_id = config.rsplit("/", 1)[-1].removesuffix(".json").removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", image_id):
        raise _Malformed(": an entry's Config does not name an image ID")
    layers = item.get("Layers")
    if layers is not None and (not isinstance(layers, list)
                               or not all(isinstance(p, str) and _inside(p) for p in layers)):
        raise _Malformed(": an entry's Layers are not paths inside the archive")
    tags = item.get("RepoTags")
    if tags is None:
        tags = []
    if not isinstance(tags, list) or not all(_is_tag(t) for t in tags):
        raise _Malformed(": an entry's RepoTags is not a list of image references")
    return ManifestEntry(image_id, tuple(tags), config, tuple(layers or ()))


def _is_tag(tag: object) -> bool:
    return isinstance(tag, str) and 0 < len(tag) <= 4096 and tag.isprintable() and not any(
        c.isspace() for c in tag)
