"""Stand-ins for what cannot be pulled here, and the session fixtures the image tests share.

- A base image: `podman import` (the API's /images/import) of a busybox-static rootfs, standing in
  for the bootc base that lives in a registry.
- A FAKE bootc-image-builder image (tests/support/images/bib): that base plus qemu-img and its libraries
  and a script honouring bib's command-line contract; it writes a real qcow2.
Every image gets a per-session name under localhost/pftd-test-<id>/ and is removed by that name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import MissingToolError
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing, require_tool

HERE = Path(__file__).resolve().parent
TEST_CONTAINERFILES = HERE / "containerfiles"
BIB_DIR = HERE / "bib"


def busybox_rootfs_tar(dest: Path) -> Path:
    """A tar of a rootfs holding only busybox-static and its applet links."""
    busybox = shutil.which("busybox")
    if busybox is None:
        missing("busybox is not installed (apt-get install busybox-static)")
        raise AssertionError("unreachable")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    with tarfile.open(dest, "w") as tar:
        for name in ("bin", "etc", "tmp", "proc", "sys", "dev", "var", "usr", "usr/bin"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        for name in ("sleep", "false", "true", "env"):  # units and scripts name /usr/bin/...
            link = tarfile.TarInfo(f"usr/bin/{name}")
            link.type, link.linkname = tarfile.SYMTYPE, "../../bin/busybox"
            tar.addfile(link)
    return dest


def import_image(conn: podman.Podman, tar: Path, ref: str) -> str:
    """`podman import` through the API; returns the image ID."""
    with tar.open("rb") as handle:
        response = conn.api.post("/images/import", params={"reference": ref}, data=handle,
                                 headers={"Content-Type": "application/x-tar"})
    assert response.status_code == 200, response.text
    image_id = conn.image_id(ref)
    assert image_id is not None
    return image_id


def qemu_img_tree(dest: Path) -> None:
    """qemu-img and every library `ldd` lists, at their own paths under `dest`."""
    qemu_img = require_tool("qemu-img")
    listing = subprocess.run(["ldd", qemu_img], capture_output=True, text=True, check=True).stdout
    files = [qemu_img]
    for line in listing.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            files.append(parts[2])
        elif parts and parts[0].startswith("/"):  # the dynamic loader
            files.append(parts[0])
    for name in files:
        target = dest / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(name), target)


def build_image(conn: podman.Podman, context: Path, containerfile: str, ref: str,
                buildargs: dict[str, str]) -> str:
    """A plain API build of a test helper image; returns the image ID."""
    tar_path = context.parent / f"{context.name}.context.tar"
    with tarfile.open(tar_path, "w") as tar:
        for entry in sorted(context.iterdir()):
            tar.add(entry, arcname=entry.name)
    with tar_path.open("rb") as handle:
        response = conn.api.post("/build", params={"dockerfile": containerfile, "t": ref,
                                                   "buildargs": json.dumps(buildargs),
                                                   "pullpolicy": "never"},
                                 data=handle, headers={"Content-Type": "application/x-tar"})
    lines = [json.loads(raw) for raw in response.text.splitlines() if raw.strip()]
    errors = [item["error"] for item in lines if "error" in item]
    assert response.status_code == 200 and not errors, (response.text[-2000:])
    image_id = conn.image_id(ref)
    assert image_id is not None
    return image_id


def remove_images(conn: podman.Podman, refs: list[str]) -> None:
    """Remove exactly these images, by name."""
    for ref in refs:
        conn.api.delete(f"/images/{ref}", params={"force": True})


def remove_repo(conn: podman.Podman, prefix: str) -> None:
    """Remove every tag under `prefix` (this session's own repository names only)."""
    remove_images(conn, [tag for tag in conn.tag_ids() if tag.startswith(prefix)])


# -- session fixtures (import them into a test module) ------------------------------------------


@pytest.fixture(scope="session")
def podman_conn() -> Iterator[podman.Podman]:
    require_tool("podman")
    try:
        conn = podman.connect(Settings())
    except MissingToolError as exc:
        missing(str(exc))
        raise AssertionError("unreachable") from exc
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def test_repo(podman_conn: podman.Podman) -> Iterator[str]:
    """A repository prefix no one else uses; everything under it is removed at the end."""
    prefix = f"localhost/pftd-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    remove_repo(podman_conn, prefix)


@pytest.fixture(scope="session")
def busybox_base(podman_conn: podman.Podman, test_repo: str,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """The imported stand-in for the bootc base image; returns its ref."""
    ref = f"{test_repo}/busybox:latest"
    tar = busybox_rootfs_tar(tmp_path_factory.mktemp("rootfs") / "rootfs.tar")
    import_image(podman_conn, tar, ref)
    return ref


@pytest.fixture(scope="session")
def bib_stand_in(podman_conn: podman.Podman, busybox_base: str, test_repo: str,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    """The FAKE bootc-image-builder image; returns its ref."""
    context = tmp_path_factory.mktemp("bib") / "context"
    context.mkdir()
    shutil.copy2(BIB_DIR / "Containerfile", context / "Containerfile")
    shutil.copy2(BIB_DIR / "bootc-image-builder", context / "bootc-image-builder")
    qemu_img_tree(context / "qemu")
    ref = f"{test_repo}/bib:latest"
    build_image(podman_conn, context, "Containerfile", ref, {"BASE_IMAGE": busybox_base})
    return ref
