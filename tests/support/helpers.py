"""Helpers shared by the project's own tests."""

from __future__ import annotations

import http.server
import os
import shutil
import socketserver
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest


def required() -> bool:
    """True when a missing prerequisite must fail the test (CI sets FLIGHTCTL_DEVICE_REQUIRE=1)."""
    return os.environ.get("FLIGHTCTL_DEVICE_REQUIRE", "").strip().lower() in ("1", "true", "yes", "on")


def missing(reason: str) -> None:
    """Skip with `reason` locally; fail under FLIGHTCTL_DEVICE_REQUIRE=1, where nothing may skip."""
    if required():
        pytest.fail(f"FLIGHTCTL_DEVICE_REQUIRE=1 and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of executable `name`, or skip/fail (see missing()) naming the tool."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (not found on PATH)")
        raise AssertionError("unreachable")
    return path


def require_registry() -> str:
    """The distribution registry binary, or skip/fail (see missing()) naming the package to install."""
    from pytest_flightctl_device.errors import MissingToolError
    from pytest_flightctl_device.images import registry

    try:
        return registry.find_binary()
    except MissingToolError as exc:
        missing(str(exc))
        raise AssertionError("unreachable") from None


HELLO = "hello from the host\n"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = HELLO.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serving(server: socketserver.TCPServer) -> Iterator[int]:
    """Serve `server` (bound to 127.0.0.1) on a thread for the block; yield its port; stop it after."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hello_server() -> Iterator[int]:
    """A loopback HTTP service answering every GET with HELLO: a host service for a guest to reach."""
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)) as port:
        yield port


def domain_names(uri: str) -> set[str]:
    """The names of every domain libvirt at `uri` runs now (what a leak check looks at)."""
    from pytest_flightctl_device.devices.domain import open_libvirt

    conn = open_libvirt(uri)
    try:
        return {dom.name() for dom in conn.listAllDomains()}
    finally:
        conn.close()


def scratch_pool(conn: Any, name: str, path: Path) -> Any:
    """A dir storage pool of a test's or benchmark's own at `path`, defined, built and started."""
    from pytest_flightctl_device.devices.volumes import pool_xml

    pool = conn.storagePoolDefineXML(pool_xml(name, str(path)), 0)
    pool.build(0)
    pool.create(0)
    return pool


def remove_pool(pool: Any, path: Path) -> None:
    """Undo scratch_pool(): every volume, the pool and its directory (the plugin's own pools stay)."""
    for vol in pool.listAllVolumes(0):
        vol.delete(0)
    pool.destroy()
    pool.undefine()
    shutil.rmtree(path, ignore_errors=True)


def fresh_cache_dir(tmp_path: Path, accel_file: Path) -> Path:
    """A fresh plugin cache under tmp_path (so a fresh private registry), with the host's KVM verdict
    copied in so no probe is redone."""
    cache = tmp_path / "cache"
    cache.mkdir()
    if accel_file.is_file():
        shutil.copyfile(accel_file, cache / "accel.json")
    return cache
