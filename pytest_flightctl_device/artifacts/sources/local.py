"""Local files given by path: checked and used in place, never copied.

A multi-GiB qcow2 or bundle on local disk gains nothing from a second copy in the cache, so it
is used where it is. What is remembered in the cache is only the verdict of an expensive check
(the sha256 of a big file, `Cache.local_sha256`), keyed by its identity: a warm run does not hash it again.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_flightctl_device.artifacts.cache import Cache, sha256_file
from pytest_flightctl_device.core.formats import bundle_tags, check_qcow2, qcow2_info
from pytest_flightctl_device.errors import ArtifactError, ConfigError


def _check_sha256(path: Path, expected: str, option: str, cache: Cache | None) -> None:
    digest = cache.local_sha256(path) if cache is not None else sha256_file(path)
    if digest != expected:
        raise ConfigError(
            f"{path} has sha256 {digest}, not the {expected} given with {option}; "
            "give the right file or digest."
        )


def _existing(text: str, option: str, what: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option} {path} does not exist; give the path of {what}.")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path} is not readable; fix its permissions or give another file.")
    return path.resolve()


def local_qcow2(text: str, *, sha256: str | None = None, cache: Cache | None = None,
                option: str = "--device-qcow2") -> Path:
    """A local qcow2 checked with `qemu-img info` (and its sha256 when given), used in place."""
    path = _existing(text, option, "a qcow2 disk image")
    try:
        fmt = qcow2_info(path).get("format")
    except ArtifactError:
        raise ConfigError(
            f"{option} {path} is not a disk image qemu-img can read; give a qcow2 disk image."
        ) from None
    if fmt != "qcow2":
        raise ConfigError(
            f"{option} {path} is a {fmt} image, not a qcow2; convert it with "
            f"`qemu-img convert -O qcow2` or give a qcow2."
        )
    if sha256:
        _check_sha256(path, sha256, f"{option}-sha256", cache)
        try:
            check_qcow2(path)
        except ArtifactError as exc:
            raise ConfigError(str(exc)) from None
    return path


def local_bundle(text: str, *, sha256: str | None = None, cache: Cache | None = None,
                 option: str = "--device-bundle") -> Path:
    """A local `podman save -m` tar checked for a manifest with RepoTags, used in place."""
    path = _existing(text, option, "a `podman save -m` images bundle tar")
    if sha256:
        _check_sha256(path, sha256, f"{option}-sha256", cache)
    try:
        bundle_tags(path)
    except ArtifactError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    return path
