"""A small multi-image bundle for registry tests: variants sharing a base, as a real bundle has.

A busybox rootfs imported into podman is the root; `base` adds a layer on it and each variant adds
its own layer on `base`, so the variants share every layer but their last. Payloads are random
(incompressible, unique per call) and sized by the caller: kilobytes for a quick test, hundreds of
MiB for a measurement. The images are exported with `podman save -m`'s API and then removed from
the store, so a test can load the bundle back and compare image IDs.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pytest_flightctl_device.images import podman
from tests.support.images.stand_ins import build_image, busybox_rootfs_tar, import_image, remove_images

VARIANTS = ("base", "v2", "v3", "v4")


@dataclass(frozen=True)
class VariantBundle:
    path: Path
    image_ids: dict[str, str]  # tag -> image ID (hex), as podman had them before the export
    root: str  # the imported busybox image's ref (removed too)

    @property
    def tags(self) -> list[str]:
        return list(self.image_ids)


def _payload(dest: Path, size: int) -> None:
    with dest.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            out.write(block)
            left -= len(block)


def variant_bundle(conn: podman.Podman, repo: str, work: Path, *, tag: str = "t1",
                   base_bytes: int = 64 << 10, variant_bytes: int = 16 << 10,
                   variants: tuple[str, ...] = VARIANTS) -> VariantBundle:
    """Build `repo/device:<variant>-<tag>` for each variant over a shared base, export, untag."""
    work.mkdir(parents=True, exist_ok=True)
    root = f"{repo}/root:latest"
    import_image(conn, busybox_rootfs_tar(work / "rootfs.tar"), root)
    ids: dict[str, str] = {}
    built: list[str] = []
    try:
        for variant in variants:
            context = work / f"ctx-{variant}"
            shutil.rmtree(context, ignore_errors=True)
            context.mkdir()
            _payload(context / "payload", base_bytes if variant == "base" else variant_bytes)
            parent = root if variant == "base" else f"{repo}/device:base-{tag}"
            (context / "Containerfile").write_text(
                f"ARG BASE_IMAGE\nFROM ${{BASE_IMAGE}}\nCOPY payload /var/payload-{variant}\n"
                f'LABEL io.flightctl.device.variant="{variant}"\n')
            ref = f"{repo}/device:{variant}-{tag}"
            ids[ref] = build_image(conn, context, "Containerfile", ref, {"BASE_IMAGE": parent})
            built.append(ref)
            shutil.rmtree(context)
        bundle = conn.export(built, work / f"bundle-{tag}.tar")
    finally:
        remove_images(conn, [*reversed(built), root])
    return VariantBundle(bundle, ids, root)
