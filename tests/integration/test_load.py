"""Load: `pytest -n 4` over 12 device tests, as a CI test job runs them.

One inner pytest run (a subprocess with four xdist workers) boots 12 tiny-guest devices with
--device-max-vms 2. The qcow2 and the images bundle come from a loopback HTTP server that counts
its GETs, so "fetched once" is seen where it happens. Every inner test records its VM's name and
port, whether its worker loaded the bundle, when it asked for a VM, when the VM was ready, how
long the boot took, and when the VM's slot was freed (after its domain was destroyed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing
from tests.support.images.stand_ins import busybox_rootfs_tar, import_image, podman_conn, remove_images, test_repo

__all__ = ["podman_conn", "test_repo"]  # session fixtures used below

pytest_plugins = ["pytester"]

TESTS = 12
WORKERS = 4
MAX_VMS = 2
TAG = "load1"

INNER_CONFTEST = '''
"""Stamps for the load test: when a test asked for its VM, and when that VM's slot was freed."""
import os, pathlib, time

import pytest

from pytest_flightctl_device.devices import slots

OUT = pathlib.Path(os.environ["PFTD_LOAD_OUT"])
_freed: list[float] = []
_release = slots.Slot.release


def _stamped_release(self):
    # The VM's domain is already destroyed here; the next VM can start only after this.
    _freed.append(time.time())
    _release(self)


slots.Slot.release = _stamped_release


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    (OUT / f"{item.name}.asked").write_text(repr(time.time()))
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    try:
        return (yield)
    finally:
        if _freed:
            (OUT / f"{item.name}.freed").write_text(repr(_freed.pop()))
'''

INNER_TESTS = f'''
import json, os, pathlib, time

import pytest

OUT = pathlib.Path(os.environ["PFTD_LOAD_OUT"])


@pytest.mark.parametrize("n", range({TESTS}))
def test_device(agent_images, agent_qcow2, device_vm, n):
    ready = time.time()
    assert device_vm.run("hostname").stdout.strip() == device_vm.name
    assert device_vm.run("echo $((6 * 7))").stdout == "42\\n"
    time.sleep(1.0)  # hold the device a moment, as a real test would
    (OUT / f"test_device[{{n}}].json").write_text(json.dumps({{
        "name": device_vm.name, "port": device_vm.ssh_port, "ready": ready,
        "boot_seconds": device_vm.boot_seconds, "loaded": agent_images.loaded,
        "tags": list(agent_images.tags), "qcow2": str(agent_qcow2),
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
    }}))
'''


@dataclass
class CountingServer:
    """A loopback HTTP server for a few files that counts GETs and complete bodies per path."""

    files: dict[str, Path]
    gets: dict[str, int] = field(default_factory=dict)
    complete: dict[str, int] = field(default_factory=dict)
    ranged: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, server: ThreadingHTTPServer, name: str) -> str:
        return f"http://127.0.0.1:{server.server_address[1]}/{name}"


def _handler(state: CountingServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            with state.lock:
                state.gets[name] = state.gets.get(name, 0) + 1
                if self.headers.get("Range"):
                    state.ranged.append(name)
            path = state.files.get(name)
            if path is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            with path.open("rb") as handle:
                shutil.copyfileobj(handle, self.wfile, 1 << 20)
            with state.lock:
                state.complete[name] = state.complete.get(name, 0) + 1

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def served(tmp_path: Path, tiny_guest: Path, podman_conn: podman.Podman,
           test_repo: str) -> Iterator[tuple[CountingServer, ThreadingHTTPServer, list[str]]]:
    """The tiny guest's qcow2 and a bundle of four stand-in variant images, on 127.0.0.1.

    The bundle's tags are removed from podman before the inner run, so one worker must load it.
    """
    repo = f"{test_repo}/load"
    tags = [f"{repo}:{variant}-{TAG}" for variant in Settings().variants]
    image_id = import_image(podman_conn, busybox_rootfs_tar(tmp_path / "rootfs.tar"), tags[0])
    for tag in tags[1:]:
        name, version = tag.rsplit(":", 1)
        response = podman_conn.api.post(f"/images/{image_id}/tag", params={"repo": name, "tag": version})
        assert response.status_code < 300, response.text
    bundle = podman_conn.export(tags, tmp_path / "bundle.tar")
    remove_images(podman_conn, tags)
    assert not set(tags) & set(podman_conn.tag_ids())
    state = CountingServer({"disk.qcow2": tiny_guest, "bundle.tar": bundle})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, server, tags
    finally:
        server.shutdown()
        server.server_close()
        remove_images(podman_conn, tags)


@pytest.fixture
def shared_dir(device_settings: Settings) -> Iterator[Path]:
    """Cache and workdir of the inner run: private, and traversable by libvirt's qemu user (/tmp's
    pytest directories are 0700). The KVM verdict is copied so the inner run does not probe again."""
    base = Path(tempfile.mkdtemp(prefix="pftd-load-", dir="/var/tmp"))
    base.chmod(0o711)  # qemu must traverse to the cached qcow2, not list
    (base / "cache").mkdir(mode=0o711)
    verdict = device_settings.accel_file
    if verdict.is_file():
        shutil.copy2(verdict, base / "cache" / "accel.json")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The largest number of intervals that hold at one instant (an end before a start at a tie)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    alive = peak = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    return peak


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_twelve_device_tests_on_four_workers_share_artifacts_and_queue_for_two_slots(
        pytester: pytest.Pytester, served: tuple[CountingServer, ThreadingHTTPServer, list[str]],
        shared_dir: Path, tiny_guest: Path, podman_conn: podman.Podman, test_repo: str,
        device_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("xdist") is None:
        missing("pytest-xdist is not installed (pip install pytest-xdist)")
    state, server, tags = served
    out = pytester.path / "records"
    out.mkdir()
    monkeypatch.setenv("PFTD_LOAD_OUT", str(out))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_load_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", str(WORKERS),
        f"--device-qcow2={state.url(server, 'disk.qcow2')}",
        f"--device-bundle={state.url(server, 'bundle.tar')}",
        f"--device-image-repo={test_repo}/load", f"--device-image-tag={TAG}",
        f"--device-podman-url={podman_conn.url}",
        f"--device-cache-dir={shared_dir / 'cache'}", f"--device-workdir={shared_dir / 'work'}",
        "--device-max-vms", str(MAX_VMS), "--device-network", "isolated",
        "--device-memory-mib", "256", "--device-vcpus", "1", "--device-boot-timeout", "60",
        timeout=1500,
    )
    result.assert_outcomes(passed=TESTS)

    names = [f"test_device[{n}]" for n in range(TESTS)]
    records = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
    for name in names:
        records[name]["asked"] = float((out / f"{name}.asked").read_text())
        records[name]["freed"] = float((out / f"{name}.freed").read_text())
    vms = list(records.values())

    # Each artifact crossed the wire once, whole, and the bundle was loaded by exactly one worker.
    assert state.gets == {"disk.qcow2": 1, "bundle.tar": 1}, state.gets
    assert state.complete == {"disk.qcow2": 1, "bundle.tar": 1} and not state.ranged
    workers = {vm["worker"] for vm in vms}
    assert len(workers) > 1, f"xdist ran every test on one worker: {workers}"
    loads = {vm["worker"]: vm["loaded"] for vm in vms}
    assert sorted(loads.values()).count(True) == 1, loads
    assert all(vm["tags"] == tags for vm in vms) and set(tags) <= set(podman_conn.tag_ids())
    qcow2s = {vm["qcow2"] for vm in vms}
    assert len(qcow2s) == 1
    cached = Path(qcow2s.pop())
    assert cached.is_relative_to(shared_dir / "cache")
    assert hashlib.sha256(cached.read_bytes()).digest() == hashlib.sha256(tiny_guest.read_bytes()).digest()

    # Names never repeat; no two VMs that were up at the same time shared a port.
    assert len({vm["name"] for vm in vms}) == TESTS
    lives = {vm["name"]: (vm["ready"] - vm["boot_seconds"], vm["freed"]) for vm in vms}
    for a in vms:
        for b in vms:
            if a is not b and _overlaps(lives[a["name"]], lives[b["name"]]):
                assert a["port"] != b["port"], (a, b)

    # Never more than MAX_VMS devices booting or up at once, though more tests wanted one: they queued.
    assert all(vm["ready"] < vm["freed"] for vm in vms)
    peak_ready = _max_overlap([(vm["ready"], vm["freed"]) for vm in vms])
    peak_alive = _max_overlap(list(lives.values()))
    peak_wanted = _max_overlap([(vm["asked"], vm["freed"]) for vm in vms])
    print(json.dumps({"tests": TESTS, "workers": sorted(workers), "max_vms": MAX_VMS,
                      "peak_ready": peak_ready, "peak_booting_or_ready": peak_alive,
                      "peak_wanting_a_vm": peak_wanted, "ports": len({vm["port"] for vm in vms}),
                      "gets": state.gets, "loaded_by": [w for w, loaded in loads.items() if loaded],
                      "boot_seconds": sorted(round(vm["boot_seconds"], 1) for vm in vms)}))
    assert peak_alive <= MAX_VMS and peak_ready <= MAX_VMS
    assert peak_wanted > MAX_VMS, "no test ever waited for a slot, so the cap was not exercised"

    # The workers left no VM directory and no domain behind.
    assert not list((shared_dir / "work").glob("fcdev-*"))
    conn = open_libvirt(device_settings.libvirt_uri[0])
    try:
        run = "-".join(vms[0]["name"].split("-")[:2]) + "-"
        assert not [dom.name() for dom in conn.listAllDomains() if dom.name().startswith(run)]
    finally:
        conn.close()
