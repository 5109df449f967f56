"""The private podman service (started when nothing answers, stopped by its own PID) and the two
ways a bundle gets loaded: read by a service on this host, uploaded to any other."""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import require_tool
from tests.support.images.stand_ins import podman_conn

__all__ = ["podman_conn"]  # the session fixture used below


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_private_service_for_the_session_then_stopped(tmp_path: Path) -> None:
    require_tool("podman")
    conn = podman.connect(Settings(), env={}, default_url=f"unix://{tmp_path}/absent.sock")
    service = conn.service
    assert service is not None
    pid, socket_dir = service.pid, Path(conn.url.removeprefix("unix://")).parent
    assert _alive(pid) and socket_dir.is_dir()
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1:4] == [b"system", b"service", b"--time=0"]
    assert conn.info()["store"]["graphRoot"]
    assert isinstance(conn.tag_ids(), dict)
    conn.close()
    assert not _alive(pid) and not socket_dir.exists()


def test_an_answering_service_is_reused_not_started(tmp_path: Path) -> None:
    require_tool("podman")
    first = podman.connect(Settings(), env={}, default_url=f"unix://{tmp_path}/absent.sock")
    try:
        with podman.connect(Settings(podman_url=first.url), env={}) as second:
            assert second.service is None and second.url == first.url
            assert second.store_id() == first.store_id()
    finally:
        first.close()


def test_private_service_dies_with_a_killed_owner(tmp_path: Path) -> None:
    """kill -9 of pytest must not leave its private podman service (or its socket dir) behind."""
    import signal
    import subprocess
    import sys
    import time

    require_tool("podman")
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
conn = podman.connect(Settings(), env={{}}, default_url="unix://{tmp_path}/absent.sock")
print(conn.service.pid, conn.url, flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        pid_text, url = child.stdout.readline().split()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    pid, socket_dir = int(pid_text), Path(url.removeprefix("unix://")).parent
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), "the private podman service outlived its killed owner"
    assert socket_dir.is_dir()  # a dead owner cannot clean up; the next private service sweeps it
    with podman.connect(Settings(), env={}, default_url=f"unix://{tmp_path}/absent.sock") as conn:
        assert conn.service is not None
    assert not socket_dir.exists()


# -- bundle load: read by a service on this host, uploaded to any other -------------------------


def _two_image_bundle(conn: podman.Podman, repo: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A docker-archive of two different images, the first under two tags; their tags are then
    removed from the store. Returns the bundle and tag -> image ID."""
    from tests.support.images.stand_ins import busybox_rootfs_tar, import_image, remove_images

    first = busybox_rootfs_tar(tmp_path / "one.tar")
    second = tmp_path / "two.tar"
    second.write_bytes(first.read_bytes())
    with tarfile.open(second, "a") as tar:  # another layer, another image ID
        note = tmp_path / "note"
        note.write_text(str(tmp_path))
        tar.add(note, arcname="etc/note")
    ids = {f"{repo}/load:one": import_image(conn, first, f"{repo}/load:one"),
           f"{repo}/load:two": import_image(conn, second, f"{repo}/load:two")}
    conn.api.post(f"/images/{repo}/load:one/tag", params={"repo": f"{repo}/load", "tag": "also"})
    ids[f"{repo}/load:also"] = ids[f"{repo}/load:one"]
    bundle = conn.export([f"{repo}/load:one", f"{repo}/load:also", f"{repo}/load:two"], tmp_path / "b.tar")
    remove_images(conn, list(ids))
    assert not set(ids) & set(conn.tag_ids())
    return bundle, ids


def _loaded(conn: podman.Podman, ids: dict[str, str]) -> dict[str, str | None]:
    present = conn.tag_ids()
    return {tag: present.get(tag) for tag in ids}


@pytest.fixture
def repo(podman_conn: podman.Podman) -> Iterator[str]:
    import uuid

    from tests.support.images.stand_ins import remove_repo

    prefix = f"localhost/pftd-test-{uuid.uuid4().hex[:8]}"
    yield prefix
    remove_repo(podman_conn, prefix)


def test_a_local_service_reads_the_bundle_itself(podman_conn: podman.Podman, repo: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, ids = _two_image_bundle(podman_conn, repo, tmp_path)
    count = len(podman.read_manifest(bundle))

    def no_upload(_bundle: Path) -> list[str]:
        raise AssertionError("a service on this host must read the bundle, not get it uploaded")

    monkeypatch.setattr(podman_conn, "load_stream", no_upload)
    loaded = podman_conn.load(bundle, count)
    assert set(loaded) == set(ids.values())
    assert _loaded(podman_conn, ids) == ids  # every tag, the bundle's own image IDs
    containers = podman_conn.api.get("/containers/json", params={"all": True, "external": True}).json()
    left = [c["Names"] for c in containers if c.get("ImageID", "").removeprefix("sha256:") in ids.values()
            or c.get("Image") in ids]
    assert left == [], "the FROM-only builds left their working containers behind"


def test_the_upload_gives_the_same_images(podman_conn: podman.Podman, repo: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    bundle, ids = _two_image_bundle(podman_conn, repo, tmp_path)
    monkeypatch.setattr(podman_conn, "server_side_load", False)
    podman_conn.load(bundle, len(podman.read_manifest(bundle)))
    assert _loaded(podman_conn, ids) == ids


def test_a_service_that_cannot_see_the_bundle_gets_it_uploaded(podman_conn: podman.Podman, repo: str,
                                                               tmp_path: Path) -> None:
    """A service in another mount namespace (as behind a socket forwarded from a VM) has no such
    path: the server-side read fails and the upload loads the same images."""
    import subprocess
    import time

    from tests.support.helpers import missing

    require_tool("unshare")
    if os.getuid() != 0:
        missing("a podman service in its own mount namespace needs root (unshare --mount)")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    bundle, ids = _two_image_bundle(podman_conn, repo, hidden)
    count = len(podman.read_manifest(bundle))
    sock = tmp_path / "elsewhere.sock"
    with (tmp_path / "service.log").open("wb") as log:
        service = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             'mount -t tmpfs tmpfs "$1" && exec podman system service --time=0 "unix://$2"',
             "sh", str(hidden), str(sock)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not (sock.exists() and podman._answers(f"unix://{sock}", timeout=2.0)):
            assert service.poll() is None and time.monotonic() < deadline, (tmp_path / "service.log").read_text()
            time.sleep(0.1)
        with podman.Podman(f"unix://{sock}") as elsewhere:
            with pytest.raises(PodmanError, match="no such file or directory"):
                elsewhere.load_local(bundle, count)
            elsewhere.load(bundle, count)
        assert _loaded(podman_conn, ids) == ids
    finally:
        service.terminate()  # the service this test started, by its handle
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def test_a_missing_image_index_is_podmans_own_sentence(podman_conn: podman.Podman, repo: str,
                                                       tmp_path: Path) -> None:
    bundle, _ids = _two_image_bundle(podman_conn, repo, tmp_path)
    with pytest.raises(PodmanError, match=r"could not read image 2 of .*Invalid source index @2"):
        podman_conn.load_local(bundle, 3)
