"""Build (once, cached) the project's test guests: `tiny` and `debian` qcow2 images.

The real flightctl device image (CentOS bootc) cannot be had here, so the tests boot guests built
from Debian packages. An image is keyed by sha256 over the recipe files and the exact Debian package
versions used; a cache hit is a few stat calls. Builds happen in a temp dir and appear under their
final name by one rename; a file lock makes concurrent builders (pytest-xdist workers) build once.

    python -m tests.guest.build tiny|debian [--cache-dir DIR] [--prune]    # prints the qcow2 path
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Literal

from filelock import FileLock

from tests.guest import apt, debian, tiny

Kind = Literal["tiny", "debian"]
CACHE_ENV = "FLIGHTCTL_DEVICE_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/tmp/flightctl-device-guests")
IMAGE_NAME = "disk.qcow2"
_HERE = Path(__file__).parent
_SHARED = [_HERE / "build.py", _HERE / "apt.py", _HERE / "disk.py", _HERE / "cpio.py"]
_RECIPES: dict[str, ModuleType] = {"tiny": tiny, "debian": debian}


def default_cache_dir() -> Path:
    """$FLIGHTCTL_DEVICE_GUEST_CACHE, else /var/tmp/flightctl-device-guests."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env) if env else DEFAULT_CACHE


def _log(msg: str) -> None:
    print(f"[guest] {msg}", file=sys.stderr, flush=True)


def _mkdir_0755(path: Path) -> None:
    """Create `path` world-readable: libvirt's qemu (user libvirt-qemu) opens the image as a backing file."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)


def cache_key(kind: Kind, cache_dir: Path) -> tuple[str, dict[str, str]]:
    """sha256 over the recipe files' names and bytes and the pinned package versions."""
    recipe = _RECIPES[kind]
    versions = apt.resolve(recipe.PACKAGES, cache_dir / "apt", host=recipe.HOST_PACKAGES)
    digest = hashlib.sha256(kind.encode())
    for path in [*_SHARED, Path(recipe.__file__ or ""), *recipe.recipe_files()]:
        digest.update(path.relative_to(_HERE).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(versions, sort_keys=True).encode())
    return digest.hexdigest(), versions


def build_guest(kind: Kind, cache_dir: Path | None = None) -> Path:
    """The qcow2 of guest `kind`, built on first use; never written afterwards (use overlays)."""
    if kind not in _RECIPES:
        raise ValueError(f"unknown guest kind {kind!r}; use one of {', '.join(_RECIPES)}")
    cache = default_cache_dir() if cache_dir is None else cache_dir
    _mkdir_0755(cache)
    key, versions = cache_key(kind, cache)
    name = f"{kind}-{key[:20]}"
    final = cache / name
    image = final / IMAGE_NAME
    if image.is_file():
        return image
    with FileLock(str(cache / f".{name}.lock")):
        if image.is_file():
            return image
        for stale in cache.glob(f".build-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=cache))
        try:
            work, out = tmp / "work", tmp / "out"
            work.mkdir()
            _mkdir_0755(out)
            started = time.monotonic()
            _log(f"building the {kind} guest ({name}); packages: {len(versions)} pinned")
            _RECIPES[kind].build(versions, cache / "debs", work, out / IMAGE_NAME)
            seconds = round(time.monotonic() - started, 1)
            (out / IMAGE_NAME).chmod(0o644)
            size = (out / IMAGE_NAME).stat().st_size
            manifest = {"kind": kind, "key": key, "versions": versions, "build_seconds": seconds,
                        "size_bytes": size}
            (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            (out / "manifest.json").chmod(0o644)
            os.rename(out, final)
            _log(f"built {image} in {seconds} s, {size / 2**20:.1f} MiB")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return image


def prune(kind: Kind, keep: Path) -> list[Path]:
    """Remove the cached images of `kind` other than `keep` (older recipes); returns what went.

    Only for a cache no running VM uses: an overlay whose backing image is removed stops working.
    """
    removed: list[Path] = []
    for entry in sorted(keep.parent.parent.glob(f"{kind}-*")):
        if entry.is_dir() and entry != keep.parent:
            with FileLock(str(entry.parent / f".{entry.name}.lock")):
                shutil.rmtree(entry)
            (entry.parent / f".{entry.name}.lock").unlink(missing_ok=True)
            removed.append(entry)
    return removed


def main(argv: list[str] | None = None) -> int:
    """CLI: build (or find) a guest and print its qcow2 path on stdout."""
    parser = argparse.ArgumentParser(prog="python -m tests.guest.build", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(_RECIPES))
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"default: ${CACHE_ENV} or {DEFAULT_CACHE}")
    parser.add_argument("--prune", action="store_true",
                        help="then delete this kind's images built from other recipes (no VM may use them)")
    args = parser.parse_args(argv)
    try:
        image = build_guest(args.kind, args.cache_dir)
        if args.prune:
            for entry in prune(args.kind, image):
                _log(f"removed {entry}")
        print(image)
    except (apt.AptError, RuntimeError, OSError) as exc:
        print(f"error: cannot build the {args.kind} guest: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
