"""The stand-in agent (a fake of flightctl-agent) run on the host against the emulator, no VM.

The script runs as it would in the guest, stdlib only (`python -I -S`: no site-packages), rooted in
a temp dir through FLIGHTCTL_STANDIN_ROOT, its systemd notify socket a real unix datagram socket
the test listens on. Everything is asserted through the API as a suite would see it. The image a
device updates to lives in a real registry (Debian's docker-registry) on 127.0.0.1 and is inspected
by the real skopeo.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flightctl.api.device_api import DeviceApi
from flightctl.api.enrollmentrequest_api import EnrollmentrequestApi
from flightctl.exceptions import ConflictException
from flightctl.models.device import Device
from flightctl.models.enrollment_request_approval import EnrollmentRequestApproval

from tests.support import standin_agent
from tests.support.flightctl_emulator import FlightctlEmulator, user_client
from tests.support.flightctl_fake.pki import ScratchCA, device_name_for
from tests.support.helpers import require_tool

SCRIPT = Path(standin_agent.__file__)


def independent_name(key: ec.EllipticCurvePrivateKey) -> str:
    """The name as upstream's Go computes it, written out again here from the definition."""
    numbers = key.public_key().public_numbers()
    x = numbers.x.to_bytes(32, "big").lstrip(b"\0")
    y = numbers.y.to_bytes(32, "big").lstrip(b"\0")
    return base64.b32hexencode(hashlib.sha256(x + y).digest()).decode().replace("=", "").lower()


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))


def test_device_name_matches_an_independent_computation(tmp_path: Path) -> None:
    require_tool("openssl")
    key = ec.generate_private_key(ec.SECP256R1())
    _write_key(key, tmp_path / "agent.key")
    name = standin_agent.device_name(tmp_path / "agent.key")
    assert name == independent_name(key) == device_name_for(key.public_key())
    assert re.fullmatch(r"[0-9a-v]{52}", name)


def test_device_name_drops_leading_zero_bytes_like_go(tmp_path: Path) -> None:
    require_tool("openssl")
    for _ in range(5000):  # about 1 key in 128 has a coordinate below 2**248
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        if numbers.x < 1 << 248 or numbers.y < 1 << 248:
            break
    else:
        raise AssertionError("no key with a leading zero byte in 5000 tries")
    _write_key(key, tmp_path / "agent.key")
    padded = numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")
    with_zeros = base64.b32hexencode(hashlib.sha256(padded).digest()).decode().rstrip("=").lower()
    name = standin_agent.device_name(tmp_path / "agent.key")
    assert name == independent_name(key)
    assert name != with_zeros


def test_parse_yaml_reads_the_agent_configs_it_is_given() -> None:
    emu = FlightctlEmulator(ui_endpoint="https://ui.example")
    extra = {"spec-fetch-interval": "0m2s", "status-update-interval": "0m2s",
             "system-info-custom": ["siteName", "emptyValue"]}
    written = emu.agent_config_yaml(server="https://127.0.0.1:7443", extra=extra)
    for text in (written.decode(), yaml.safe_dump(yaml.safe_load(written), indent=4)):
        assert standin_agent.parse_yaml(text) == yaml.safe_load(text)
    assert standin_agent.duration("0m2s", 9) == 2 and standin_agent.duration("1m30s", 9) == 90


def test_inspect_without_skopeo_is_a_failure(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "skopeo is not installed" in standin_agent.inspect("quay.io/flightctl/flightctl-device:v2")


def test_the_unit_is_type_notify_and_restarts() -> None:
    unit = standin_agent.UNIT
    assert "Type=notify" in unit and "Restart=always" in unit and "RestartSec=5" in unit
    assert standin_agent.SCRIPT_PATH in unit and standin_agent.UNIT_NAME == "flightctl-agent.service"
    files = {path: (content, mode) for path, content, mode in standin_agent.guest_files()}
    assert files[standin_agent.SCRIPT_PATH] == (SCRIPT.read_bytes(), 0o755)
    assert files["/etc/systemd/system/flightctl-agent.service"][0] == unit.encode()
    # Started by its path unit, never WantedBy=multi-user.target: no boot waits for an enrollment.
    assert "[Install]" not in unit and not re.search(r"^WantedBy=", unit, re.MULTILINE)
    path_unit = files["/etc/systemd/system/flightctl-agent.path"][0].decode()
    assert "PathExists=/etc/flightctl/config.yaml" in path_unit and "WantedBy=multi-user.target" in path_unit


def test_the_script_imports_only_the_standard_library() -> None:
    source = SCRIPT.read_text()
    imported = set(re.findall(r"^(?:import|from) (\w+)", source, re.MULTILINE)) - {"__future__"}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)


# --- the whole flow against the emulator ----------------------------------------------------------


class Notify:
    """$NOTIFY_SOCKET as systemd provides it: a unix datagram socket the test reads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def receive(self, timeout: float) -> str | None:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode()
        except TimeoutError:
            return None

    def close(self) -> None:
        self.sock.close()


class StandIn:
    """One run of the agent script, its stdout kept like the journal keeps it."""

    def __init__(self, root: Path, notify: Notify, env: dict[str, str], journal: list[str]) -> None:
        self.lines = journal
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", str(SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FLIGHTCTL_STANDIN_ROOT": str(root),
                 "NOTIFY_SOCKET": str(notify.path), **env})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.reader.join(timeout=5)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Registry:
    address: str  # host:port
    ca_file: Path  # trusted by skopeo through SSL_CERT_FILE (Go's system pool honours it)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    """A real TLS registry (Debian's docker-registry) on 127.0.0.1 holding one tiny image."""
    binary = require_tool("docker-registry")
    skopeo = require_tool("skopeo")
    port = _free_port()
    ca = ScratchCA()
    cert, key = ca.keypair("localhost", server=True)
    for file_name, data in (("registry.crt", cert), ("registry.key", key), ("registry-ca.crt", ca.pem)):
        (tmp_path / file_name).write_bytes(data)
    config = tmp_path / "registry.yml"
    config.write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "error"},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry-data")}},
        "http": {"addr": f"127.0.0.1:{port}", "tls": {"certificate": str(tmp_path / "registry.crt"),
                                                       "key": str(tmp_path / "registry.key")}}}))
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def up() -> bool:
            try:
                context = ssl.create_default_context(cafile=str(tmp_path / "registry-ca.crt"))
                with urllib.request.urlopen(f"https://127.0.0.1:{port}/v2/", timeout=1,
                                            context=context) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for("the registry to answer", up, timeout=20)
        layout = _oci_layout(tmp_path / "oci")
        subprocess.run([skopeo, "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:v2",
                        f"docker://127.0.0.1:{port}/flightctl/flightctl-device:v2"], check=True, timeout=60)
        yield Registry(f"127.0.0.1:{port}", tmp_path / "registry-ca.crt")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _oci_layout(directory: Path) -> Path:
    """The smallest OCI image: one empty layer, a config, a manifest tagged v2."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layer_path = directory / "layer.tar"
    with tarfile.open(layer_path, "w"):
        pass
    layer = layer_path.read_bytes()
    layer_path.unlink()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [blob(layer)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": blob(layer),
                    "size": len(layer)}]}).encode()
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": blob(manifest), "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": "v2"}}]}))
    return directory


def _statuses(emu: FlightctlEmulator, name: str) -> list[tuple[str, str, str]]:
    """(status, reason, message) of the Updating condition in every status the agent pushed."""
    seen = []
    for request in list(emu.requests):
        if request.listener == "agent" and request.method == "PUT" and request.path.endswith(f"/{name}/status"):
            cond = next(c for c in request.body["status"]["conditions"] if c["type"] == "Updating")
            seen.append((cond["status"], cond["reason"], cond["message"]))
    return seen


def test_enroll_online_failed_update_then_update_through_a_reboot(tmp_path: Path, registry: Registry) -> None:
    require_tool("openssl")
    short = Path(os.environ.get("TMPDIR", "/tmp"))
    root = tmp_path / "root"
    (root / "etc/flightctl").mkdir(parents=True)
    env = {"SSL_CERT_FILE": str(registry.ca_file)}
    with FlightctlEmulator(long_poll_seconds=1.0) as emu:
        (root / "etc/flightctl/config.yaml").write_bytes(emu.agent_config_yaml(
            extra={"spec-fetch-interval": "0m1s", "status-update-interval": "0m1s"}))
        client = user_client(emu, tmp_path / "ca.crt")
        devices = DeviceApi(client)
        journal: list[str] = []
        notify = Notify(short / f"fcdev-notify-{os.getpid()}-{time.monotonic_ns()}")
        agent = StandIn(root, notify, env, journal)
        try:
            # enrollment: the journal line and the banner carry /enroll/<name>, as upstream's e2e reads them
            line = wait_for("the /enroll/ line", lambda: next((x for x in agent.lines if "/enroll/" in x), None))
            match = re.search(r"/enroll/(\w+)", line)
            assert match is not None
            name = match.group(1)
            banner = root / "etc/issue.d/flightctl-banner.issue"
            assert f"{emu.ui_endpoint}/enroll/{name}" in banner.read_text()
            key = serialization.load_pem_private_key((root / "var/lib/flightctl/certs/agent.key").read_bytes(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey) and independent_name(key) == name
            wait_for("the enrollment request", lambda: emu.enrollment_request(name))
            assert notify.receive(timeout=1.5) is None  # not ready before approval

            EnrollmentrequestApi(client).approve_enrollment_request(
                name, EnrollmentRequestApproval(approved=True, labels={"test-id": "abc"}))
            assert "READY=1" in (notify.receive(timeout=15) or "")
            assert f"{emu.ui_endpoint}/manage/{name}" in banner.read_text()

            def online() -> Any:
                status = devices.get_device(name).status
                return status is not None and status.summary.status == "Online" and status

            status = wait_for("Online", online)
            assert status.config.rendered_version == "1"
            assert _statuses(emu, name)[-1] == ("False", "Updated", "Updated to desired renderedVersion: 1")

            # an image that does not exist: inspect fails, the device reports it and stays on version 1
            _set_image(devices, name, f"{registry.address}/flightctl/flightctl-device:missing")
            wait_for("the failure", lambda: any(s[1] == "Error" for s in _statuses(emu, name)))
            failed = devices.get_device(name).status
            assert failed is not None
            assert (failed.updated.status, failed.config.rendered_version) == ("OutOfDate", "1")
            assert "Failed to update to renderedVersion: 2" in (failed.updated.info or "")
            assert "manifest unknown" in (failed.updated.info or "")  # the image, not TLS or the network
            assert [s[1] for s in _statuses(emu, name)][-4:] == ["Preparing", "ReadyToUpdate", "ApplyingUpdate",
                                                                 "Error"]
            assert failed.summary.status == "Online"

            # a real image: the reasons through Rebooting, the process "reboots" (exits), comes back Updated
            image = f"{registry.address}/flightctl/flightctl-device:v2"
            _set_image(devices, name, image)
            assert agent.proc.wait(timeout=30) == 0
            rebooting = devices.get_device(name).status
            assert rebooting is not None and rebooting.summary.status == "Rebooting"
            assert [s[1] for s in _statuses(emu, name)][-4:] == ["Preparing", "ReadyToUpdate", "ApplyingUpdate",
                                                                 "Rebooting"]
            agent.stop()
            posts = [r for r in emu.requests if r.method == "POST"]
            agent = StandIn(root, notify, env, journal)
            assert "READY=1" in (notify.receive(timeout=15) or "")
            assert f"/manage/{name}" in banner.read_text()

            def updated() -> Any:
                status = devices.get_device(name).status
                return status is not None and status.config.rendered_version == "3" and status

            done = wait_for("rendered version 3", updated)
            assert (done.summary.status, done.updated.status, done.os.image) == ("Online", "UpToDate", image)
            assert _statuses(emu, name)[-1] == ("False", "Updated", "Updated to desired renderedVersion: 3")
            assert [r for r in emu.requests if r.method == "POST"] == posts  # no second enrollment
        finally:
            agent.stop()
            print("stand-in agent output:", *journal, sep="\n")  # shown when the test fails
            notify.close()
            notify.path.unlink(missing_ok=True)
        assert emu.errors == []
        for secret in (emu.token, emu.enrollment_key_pem.decode().splitlines()[1]):
            assert secret not in "\n".join(journal)


def _set_image(devices: DeviceApi, name: str, image: str) -> None:
    """Read, change, replace; retried on 409 as upstream's UpdateDeviceWithRetries does (the agent's
    status pushes change the resourceVersion in between)."""
    for _ in range(10):
        body = devices.get_device(name).to_dict()
        body["spec"] = {"os": {"image": image}}
        device = Device.from_dict(body)
        assert device is not None
        try:
            devices.replace_device(name, device)
            return
        except ConflictException:
            continue
    raise AssertionError("10 conflicts in a row replacing the device")


def test_four_agents_at_once_and_a_deleted_device_re_enrolls(tmp_path: Path) -> None:
    """Four devices on one emulator (its store is shared by threads); then the teardown-order fact:
    a Device deleted under a running agent comes back as a new EnrollmentRequest of the same name."""
    require_tool("openssl")
    short = Path(os.environ.get("TMPDIR", "/tmp"))
    with FlightctlEmulator(long_poll_seconds=1.0) as emu:
        client = user_client(emu, tmp_path / "ca.crt")
        devices, ers = DeviceApi(client), EnrollmentrequestApi(client)
        journal: list[str] = []
        agents: list[StandIn] = []
        notifies: list[Notify] = []
        try:
            for index in range(4):
                root = tmp_path / f"root{index}"
                (root / "etc/flightctl").mkdir(parents=True)
                (root / "etc/flightctl/config.yaml").write_bytes(emu.agent_config_yaml(
                    extra={"spec-fetch-interval": "0m1s", "status-update-interval": "0m1s"}))
                notifies.append(Notify(short / f"fcdev-notify-{os.getpid()}-{time.monotonic_ns()}"))
                agents.append(StandIn(root, notifies[-1], {}, journal))
            names = wait_for("four enrollment requests", lambda: (
                [er.metadata.name for er in ers.list_enrollment_requests().items] if
                len(ers.list_enrollment_requests().items) == 4 else None))
            for index, name in enumerate(names):
                ers.approve_enrollment_request(name, EnrollmentRequestApproval(
                    approved=True, labels={"test-id": f"t{index}"}))
            for notify in notifies:
                assert "READY=1" in (notify.receive(timeout=15) or "")

            def all_online() -> bool:
                items = devices.list_devices().items
                return len(items) == 4 and all(d.status is not None and d.status.summary.status == "Online"
                                               for d in items)

            wait_for("four devices Online", all_online)
            assert [d.metadata.name for d in devices.list_devices(label_selector="test-id=t2").items] == [names[2]]

            gone = names[0]
            devices.delete_device(gone)
            ers.delete_enrollment_request(gone)
            again = wait_for("the same name enrolling again", lambda: emu.enrollment_request(gone))
            assert not again["status"]["conditions"]  # a fresh request, waiting for approval
            assert any(f"{gone} is gone from the service" in line for line in journal)
        finally:
            for agent in agents:
                agent.stop()
            for notify in notifies:
                notify.close()
                notify.path.unlink(missing_ok=True)
            print("stand-in agents output:", *journal, sep="\n")
        assert emu.errors == []


def test_a_config_without_a_service_writes_the_banner_and_waits_for_a_change(tmp_path: Path) -> None:
    """No restart loop on a config the agent cannot enroll with: banner, one line, then wait."""
    require_tool("openssl")
    config = tmp_path / "etc/flightctl/config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("enrollment-service:\n  enrollment-ui-endpoint: https://ui.example.test/\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FLIGHTCTL_STANDIN_ROOT": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-I", "-S", str(SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        banner = tmp_path / "etc/issue.d/flightctl-banner.issue"
        deadline = time.monotonic() + 30
        while not banner.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert re.search(r"https://ui\.example\.test/enroll/[0-9a-v]{52}\n", banner.read_text())
        time.sleep(0.5)
        assert proc.poll() is None  # waiting, not exited (systemd would restart it every 5 s)
        config.write_text(config.read_text() + "# changed\n")
        assert proc.wait(timeout=15) == 1
        assert "is not a usable agent config (KeyError: 'service')" in (proc.stdout.read() if proc.stdout else "")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
