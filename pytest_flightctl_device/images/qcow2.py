"""bootc-image-builder: turn the base image into a qcow2, and the cache key of that result.

bib runs privileged with the host's container storage mounted (it reads the image from there,
overlay driver only) and an output directory at /output, and writes qcow2/disk.qcow2. Its result
depends only on the base image, the builder and the config, so those make the cache key: a second
request for the same three is a cache hit and runs nothing.
"""

from __future__ import annotations

import collections
import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any

from pytest_flightctl_device.errors import ConfigError, PodmanError
from pytest_flightctl_device.images.podman import Podman, Progress
from pytest_flightctl_device.settings import Settings

TAIL_LINES = 25
ROOTFS = "xfs"


def builder_image_id(conn: Podman, settings: Settings, progress: Progress) -> str:
    """The builder's image ID, pulling it once when the store lacks it."""
    image_id = conn.image_id(settings.bib_image)
    if image_id is None:
        progress(f"pulling {settings.bib_image}")
        try:
            conn.client.images.pull(settings.bib_image)
        except Exception as exc:  # podman-py raises APIError/ImageNotFound/transport errors
            raise PodmanError(f"could not pull the bootc-image-builder image {settings.bib_image} "
                              f"({exc}); pull it by hand or give --device-bib-image.") from None
        image_id = conn.image_id(settings.bib_image)
    if image_id is None:
        raise PodmanError(f"the bootc-image-builder image {settings.bib_image} is not in podman; "
                          "pull it or give --device-bib-image.")
    return image_id


def cache_key(base_image_id: str, bib_ref: str, bib_image_id: str, config: Path | None) -> str:
    """Cache key of a qcow2: base image ID + builder (ref and ID) + config.toml content + rootfs."""
    config_sha = hashlib.sha256(config.read_bytes()).hexdigest() if config else "none"
    parts = f"base={base_image_id}|bib={bib_ref}@{bib_image_id}|config={config_sha}|rootfs={ROOTFS}"
    return "qcow2-build:" + hashlib.sha256(parts.encode()).hexdigest()


def command(ref: str, config: bool) -> list[str]:
    """bib's arguments: `build --type qcow2 --rootfs xfs --progress verbose [--config] <ref>`."""
    args = ["build", "--type", "qcow2", "--rootfs", ROOTFS, "--progress", "verbose"]
    if config:
        args += ["--config", "/config.toml"]
    return [*args, ref]


def storage_root(conn: Podman) -> str:
    """The graph root bib must see; it reads images through the overlay driver only."""
    store = conn.info().get("store", {})
    driver = store.get("graphDriverName")
    if driver != "overlay":
        raise PodmanError(f"podman's storage driver is {driver}, and bootc-image-builder needs overlay; "
                          "set driver = \"overlay\" in storage.conf.")
    return str(store["graphRoot"])


def build(conn: Podman, ref: str, dest: Path, settings: Settings, progress: Progress) -> Path:
    """Run bib on `ref`; move its qcow2/disk.qcow2 to `dest` (same filesystem as the scratch dir)."""
    if settings.bib_config is not None and not settings.bib_config.is_file():
        raise ConfigError(f"--device-bib-config {settings.bib_config} is not a file; give a config.toml.")
    out = dest.parent / f".{dest.name}.bib-output"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        _run(conn, ref, out, settings, progress)
        disk = out / "qcow2" / "disk.qcow2"
        if not disk.is_file():
            found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
            raise PodmanError(f"bootc-image-builder {settings.bib_image} exited 0 but wrote no "
                              f"qcow2/disk.qcow2 (found: {', '.join(found) or 'nothing'}); "
                              "check the builder image and its output above.")
        disk.replace(dest)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return dest


def _run(conn: Podman, ref: str, out: Path, settings: Settings, progress: Progress) -> None:
    mounts: list[dict[str, Any]] = [
        {"type": "bind", "source": storage_root(conn), "target": "/var/lib/containers/storage"},
        {"type": "bind", "source": str(out), "target": "/output"},
    ]
    if settings.bib_config is not None:
        mounts.append({"type": "bind", "source": str(settings.bib_config), "target": "/config.toml",
                       "read_only": True})
    args = command(ref, settings.bib_config is not None)
    progress(f"bootc-image-builder {' '.join(args)} (image {settings.bib_image})")
    container = conn.client.containers.create(
        settings.bib_image, command=args, privileged=True, mounts=mounts,
        security_opt=["label=type:unconfined_t"], labels={"io.flightctl.device.role": "bib"},
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        try:
            container.kill()
        except Exception:  # already gone
            return

    timer = threading.Timer(settings.bib_timeout, expire)
    try:
        container.start()
        timer.start()
        pending = b""
        for chunk in container.logs(stream=True, follow=True, stdout=True, stderr=True):
            pending += chunk if isinstance(chunk, bytes) else str(chunk).encode()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                tail.append(text)
                progress(f"[bib] {text}")
        if pending:
            tail.append(pending.decode(errors="replace"))
        code = int(container.wait())
    finally:
        timer.cancel()
        try:
            container.remove(force=True)
        except Exception:  # removal failure must not hide the build's own result
            progress(f"could not remove bib container {container.id[:12]}")
    quoted = "\n".join(f"    {line}" for line in tail)
    if timed_out.is_set():
        raise PodmanError(f"bootc-image-builder ran longer than --device-bib-timeout "
                          f"{settings.bib_timeout:.0f} s and was stopped; raise the timeout or check "
                          f"the builder. Last lines:\n{quoted}")
    if code != 0:
        raise PodmanError(f"bootc-image-builder exited {code} building a qcow2 of {ref}; fix the "
                          f"cause shown in its last lines:\n{quoted}")
