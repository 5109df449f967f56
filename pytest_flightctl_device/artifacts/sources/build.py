"""The local-build source (--device-build): images from containerfiles/, then bundle and qcow2.

The images are built once per process and under a file lock across processes (xdist workers wait
for the first build, then find every layer cached). The bundle is keyed by the built image IDs,
the qcow2 by base image ID + builder + config, so a rebuild that changed nothing is a cache hit.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from filelock import FileLock

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.core.formats import BUNDLE, QCOW2
from pytest_flightctl_device.images import build, podman, qcow2
from pytest_flightctl_device.images.podman import Progress
from pytest_flightctl_device.settings import Settings

_built: dict[Settings, build.BuiltImages] = {}
_built_lock = threading.Lock()


def built_images(settings: Settings, pod: podman.PodmanSession, progress: Progress) -> build.BuiltImages:
    """Build base and variants once for these settings (per process, and one process at a time)."""
    with _built_lock:
        if settings not in _built:
            plan = build.plan(settings)
            conn = pod.get()
            lock_dir = settings.locks_dir
            lock_dir.mkdir(parents=True, exist_ok=True)
            with FileLock(str(lock_dir / f"images-build-{conn.store_id()}.lock")):
                progress(f"building {', '.join(plan.ref(v) for v in plan.variants)}")
                _built[settings] = build.build_all(conn, plan, progress)
        return _built[settings]


def bundle_key(built: build.BuiltImages) -> str:
    text = "|".join(f"{built.refs[v]}={built.ids[v]}" for v in sorted(built.refs))
    return "bundle-build:" + hashlib.sha256(text.encode()).hexdigest()


def build_bundle(settings: Settings, cache: Cache, progress: Progress, pod: podman.PodmanSession) -> Path:
    """The bundle of the locally built images, exported once per set of image IDs."""
    built = built_images(settings, pod, progress)
    conn = pod.get()

    def produce(tmp: Path) -> None:
        build.export_bundle(conn, built, tmp, progress)

    return cache.obtain(bundle_key(built), produce, BUNDLE,
                        source=f"local build {built.refs['base']}")


def build_qcow2(settings: Settings, cache: Cache, progress: Progress, pod: podman.PodmanSession) -> Path:
    """The qcow2 of the locally built base image, made by bootc-image-builder once per key."""
    built = built_images(settings, pod, progress)
    return qcow2_of(settings, built.refs["base"], built.ids["base"], cache, progress, pod)


def qcow2_of(settings: Settings, ref: str, image_id: str, cache: Cache, progress: Progress,
             pod: podman.PodmanSession) -> Path:
    """The qcow2 of image `ref` (ID `image_id`) from the cache, or built by bib and cached."""
    conn = pod.get()
    bib_id = qcow2.builder_image_id(conn, settings, progress)
    key = qcow2.cache_key(image_id, settings.bib_image, bib_id, settings.bib_config)

    def produce(tmp: Path) -> None:
        qcow2.build(conn, ref, tmp, settings, progress)

    return cache.obtain(key, produce, QCOW2, source=f"bootc-image-builder of {ref}")
