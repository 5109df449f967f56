"""--device-registry's bad cases against real servers: a TLS distribution registry (scratch CA), a plain
one spoken to over TLS, and a registry that refuses (401); each fails in one sentence naming the option."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.images import publish, push, registry
from pytest_flightctl_device.images.registry import RegistryError
from pytest_flightctl_device.settings import Settings
from tests.support.flightctl_fake.pki import ScratchCA
from tests.support.helpers import missing
from tests.support.images.archive import Spec, write_archive

REPO = "quay.io/flightctl/flightctl-device"


@pytest.fixture
def binary() -> str:
    try:
        return registry.find_binary()
    except Exception as exc:
        missing(str(exc))
        raise


@pytest.fixture
def tls_registry(tmp_path: Path, binary: str) -> Iterator[tuple[str, ScratchCA]]:
    """The real distribution registry serving TLS with a scratch CA's certificate for 127.0.0.1."""
    ca = ScratchCA()
    cert, key = ca.keypair("127.0.0.1", server=True)
    (tmp_path / "tls.crt").write_bytes(cert)
    (tmp_path / "tls.key").write_bytes(key)
    port = registry._free_port()
    config = {"version": "0.1", "log": {"level": "error", "accesslog": {"disabled": True}},
              "storage": {"filesystem": {"rootdirectory": str(tmp_path / "data")}},
              "http": {"addr": f"127.0.0.1:{port}", "secret": "s",
                       "tls": {"certificate": str(tmp_path / "tls.crt"), "key": str(tmp_path / "tls.key")}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = subprocess.Popen([binary, "serve", str(tmp_path / "config.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=registry._registry_env())
    try:
        (tmp_path / "ca.crt").write_bytes(ca.pem)
        deadline = time.monotonic() + 20
        while True:
            try:
                publish.check(push.Target(f"127.0.0.1:{port}", tls=True, ca_file=tmp_path / "ca.crt"))
                break
            except RegistryError:
                assert time.monotonic() < deadline and proc.poll() is None, "the TLS registry did not start"
                time.sleep(0.1)
        yield f"127.0.0.1:{port}", ca
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def settings(**cli: object) -> Settings:
    return Settings.resolve(cli, {}, {})


def test_a_tls_registry_needs_its_ca(tls_registry: tuple[str, ScratchCA], tmp_path: Path) -> None:
    address, _ca = tls_registry
    target, login = publish.target_of(settings(registry=address), {})
    with pytest.raises(RegistryError, match=rf"^--device-registry {address} presents a certificate this host does "
                                            r"not trust \(.*\); give the CA that signed it with "
                                            r"--device-registry-ca FILE\.$"):
        publish.check(target, login)
    other = tmp_path / "other-ca.crt"
    other.write_bytes(ScratchCA().pem)
    target, login = publish.target_of(settings(registry=address, registry_ca=str(other)), {})
    with pytest.raises(RegistryError, match=rf"--device-registry-ca {other} is not the CA that signed it"):
        publish.check(target, login)
    target, login = publish.target_of(settings(registry=f"{address}/ci", registry_ca=str(tmp_path / "ca.crt")), {})
    publish.check(target, login)
    bundle = tmp_path / "bundle.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t1",), (4 << 10,))])
    result = push.push_bundle(bundle, target, tmp_path / "state")
    assert result.counters.blobs_sent == 2
    assert next(iter(result.images)).refs == {f"{REPO}:base-t1": f"{address}/ci/flightctl/flightctl-device:base-t1"}


def test_tls_to_a_plain_http_registry_points_at_insecure(tmp_path: Path, binary: str) -> None:
    with registry.acquire(tmp_path / "registry") as lease:
        target, login = publish.target_of(settings(registry=lease.address), {})
        with pytest.raises(RegistryError, match=rf"^--device-registry {lease.address} does not speak TLS \(.*\); "
                                                r"if it serves plain HTTP, add --device-registry-insecure\.$"):
            publish.check(target, login)
        target, login = publish.target_of(settings(registry=lease.address, registry_insecure=True), {})
        publish.check(target, login)


class _Refuses(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="test"')
        self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_registry_that_refuses_says_log_in(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        chosen = settings(registry=address, registry_insecure=True)
        target, login = publish.target_of(chosen, {"REGISTRY_AUTH_FILE": str(tmp_path / "none.json")})
        refused = (rf"^--device-registry {address} refused access \(HTTP 401\); log in "
                   rf"with `podman login {address}` \(REGISTRY_AUTH_FILE is honoured\)\.$")
        with pytest.raises(RegistryError, match=refused):
            publish.check(target, login)
        token = base64.b64encode(b"user:wrong-password").decode()
        auth = tmp_path / "auth.json"
        auth.write_text(json.dumps({"auths": {address: {"auth": token}}}))
        target, login = publish.target_of(chosen, {"REGISTRY_AUTH_FILE": str(auth)})
        assert target.auth == f"Basic {token}" and token not in repr(target)
        with pytest.raises(RegistryError, match=rf"refused the login in {auth} \(HTTP 401\); log in again") as info:
            publish.check(target, login)
        assert token not in str(info.value)
    finally:
        server.shutdown()
        server.server_close()
