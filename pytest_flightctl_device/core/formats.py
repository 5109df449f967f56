"""The manifest.json of a docker-archive images bundle (`podman save -m`): read it, trust nothing in it.

A bundle may come from anywhere (a pull request's artifact, a URL), so its manifest is hostile
input: every entry must be an object whose Config and Layers are paths inside the archive and
whose RepoTags is a list of image references. Anything else is one ArtifactError sentence; the
manifest is never extracted, and an absurdly large or deeply nested one is refused unread.
"""

from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_flightctl_device.errors import ArtifactError


@dataclass(frozen=True)
class ManifestEntry:
    image_id: str
    tags: tuple[str, ...]


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
    return ManifestEntry(image_id, tuple(tags))


def _is_tag(tag: object) -> bool:
    return isinstance(tag, str) and 0 < len(tag) <= 4096 and tag.isprintable() and not any(
        c.isspace() for c in tag)
