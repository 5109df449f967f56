"""The private podman service: started when nothing answers, stopped by its own PID."""

from __future__ import annotations

import os
from pathlib import Path

from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import require_tool


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
