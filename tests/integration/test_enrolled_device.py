"""enrolled_device as a user gets it: pytest sessions (pytester subprocesses) against the flightctl
emulator (a FAKE of the service: none can run here) on 127.0.0.1, with real Debian devices running
the stand-in agent (a FAKE of flightctl-agent) under libvirt/qemu, which reach the emulator's agent
API through the VM's SSH reverse forward (`--device-host-forward`) and pull the variants from the
real registry through the remap (agent_registry).

One inner run with -n 2 and four enrolled devices covers: approve with labels and Online; a 409
during an update retried, then the update to v2 through the reboot; an image that does not exist
failing fast with the conditions quoted; a failed test's report with the device's conditions and
the agent's journal; teardown removing only each test's Device and ER; the token in no output.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.settings import Settings
from tests.support.flightctl_emulator import FlightctlEmulator, agent_request, user_client
from tests.support.flightctl_fake.pki import make_csr
from tests.support.helpers import fresh_cache_dir, require_registry
from tests.support.images.stand_ins import podman_conn
from tests.support.images.variants import variant_bundle

__all__ = ["podman_conn"]  # session fixture used below
pytest_plugins = ["pytester"]

INNER = """
import json
import os

import pytest

from pytest_flightctl_device import DeviceStateError

OUT = {out!r}


def record(key, **data):
    with open(os.path.join(OUT, key + ".json"), "w") as handle:
        json.dump(data, handle)


def labels_of(device):
    return dict(device.get().metadata.labels or {{}})


@pytest.mark.device(labels={{"site": "lab"}})
def test_conflict_then_update_to_v2(agent_registry, enrolled_device):
    device = enrolled_device.get()
    assert device.status.summary.status == "Online"
    boot_before = enrolled_device.vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    done = enrolled_device.update_image("v2")
    boot_after = enrolled_device.vm.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    status = done.status
    record("update", name=enrolled_device.name, labels=labels_of(enrolled_device),
           image=enrolled_device.get().spec.os.image, wanted=enrolled_device.vm.image("v2"),
           reported=status.config.rendered_version, os_image=status.os.image,
           rebooted=boot_before != boot_after, test_id=enrolled_device.test_id)


def test_missing_image_fails_fast(agent_registry, enrolled_device):
    missing = enrolled_device.vm.image("v2").replace(":v2-", ":no-such-")
    with pytest.raises(DeviceStateError) as caught:
        enrolled_device.update_image(missing)
    record("missing", name=enrolled_device.name, message=str(caught.value), image=missing)


@pytest.mark.device(labels={{"n": "3"}})
def test_online_with_labels(enrolled_device):
    record("plain", name=enrolled_device.name, labels=labels_of(enrolled_device),
           summary=enrolled_device.get().status.summary.status)


def test_a_failure_reports_conditions_and_journal(enrolled_device):
    record("failing", name=enrolled_device.name)
    pytest.fail("deliberate failure, for the report sections")
"""


@pytest.fixture
def emu() -> Iterator[FlightctlEmulator]:
    with FlightctlEmulator(long_poll_seconds=5.0) as emulator:
        yield emulator
        assert emulator.errors == []



def _service_options(emu: FlightctlEmulator, tmp_path: Path) -> list[str]:
    ca = tmp_path / "service-ca.crt"
    ca.write_bytes(emu.ca_pem)
    return [f"--device-flightctl-api={emu.user_url}", f"--device-flightctl-ca={ca}"]


def _bystander(emu: FlightctlEmulator, tmp_path: Path) -> str:
    """Another test's ER and Device (another test-id), which no teardown here may touch."""
    from flightctl.api.enrollmentrequest_api import EnrollmentrequestApi
    from flightctl.models.enrollment_request_approval import EnrollmentRequestApproval

    device_name, csr, _key = make_csr()
    body = {"apiVersion": "flightctl.io/v1beta1", "kind": "EnrollmentRequest", "metadata": {"name": device_name},
            "spec": {"csr": csr, "labels": {}}}
    code, _ = agent_request(emu, "POST", "/api/v1/enrollmentrequests", body, cert_pem=emu.enrollment_cert_pem,
                            key_pem=emu.enrollment_key_pem)
    assert code == 201
    with user_client(emu, tmp_path / "bystander-ca.crt") as client:
        EnrollmentrequestApi(client).approve_enrollment_request(device_name, EnrollmentRequestApproval(
            approved=True, labels={"test-id": "someone-else"}))
    return device_name


def _left(emu: FlightctlEmulator, tmp_path: Path) -> tuple[set[str], set[str]]:
    """The names of every Device and ER the service still holds."""
    from flightctl.api.device_api import DeviceApi
    from flightctl.api.enrollmentrequest_api import EnrollmentrequestApi

    with user_client(emu, tmp_path / "left-ca.crt") as client:
        devices = {d.metadata.name for d in DeviceApi(client).list_devices().items}
        ers = {e.metadata.name for e in EnrollmentrequestApi(client).list_enrollment_requests().items}
    return devices, ers


def test_four_enrolled_devices_under_xdist(pytester: pytest.Pytester, podman_conn: Any, debian_guest: Path,
                                          emu: FlightctlEmulator, tmp_path: Path, device_settings: Settings,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    require_registry()
    repo = f"quay.io/pftd-test-{uuid.uuid4().hex[:8]}"
    made = variant_bundle(podman_conn, repo, tmp_path / "build", tag="t1", variants=("base", "v2"))
    out = tmp_path / "out"
    out.mkdir()
    pytester.makepyfile(test_inner=INNER.format(out=str(out)))
    agent_config = tmp_path / "agent-config.yaml"
    agent_config.write_bytes(emu.agent_config_yaml(extra={"spec-fetch-interval": "0m2s",
                                                          "status-update-interval": "0m2s"}))
    bystander = _bystander(emu, tmp_path)
    emu.fail_next_replaces(1)  # the first update's replace meets a conflict
    monkeypatch.setenv("FLIGHTCTL_TOKEN", emu.token)
    agent_port = emu.agent_url.rsplit(":", 1)[1]
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "-rA", f"--device-qcow2={debian_guest}",
        f"--device-bundle={made.path}", f"--device-cache-dir={fresh_cache_dir(tmp_path, device_settings.accel_file)}",
        "--device-network", "isolated", f"--device-image-repo={repo}/device", "--device-variants", "base,v2",
        f"--device-agent-config={agent_config}", f"--device-host-forward={agent_port}",
        "--device-memory-mib", "768", "--device-vcpus", "1", *_service_options(emu, tmp_path))
    text = result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=3, failed=1)
    seen = {path.stem: json.loads(path.read_text()) for path in out.glob("*.json")}
    assert sorted(seen) == ["failing", "missing", "plain", "update"]
    assert len({entry["name"] for entry in seen.values()}) == 4  # four devices, four names

    update = seen["update"]
    assert update["labels"]["site"] == "lab" and update["labels"]["test-id"] == update["test_id"]
    assert update["image"] == update["wanted"] == update["os_image"] and update["rebooted"] is True
    assert update["reported"] == "2"
    conflicted = [r for r in emu.requests if r.method == "PUT" and r.path.startswith("/api/v1/devices/")
                  and r.listener == "user"]
    assert [r.status for r in conflicted][:1] == [409] and {r.status for r in conflicted} == {409, 200}

    missing = seen["missing"]
    assert missing["message"].startswith("the update to renderedVersion 2 failed: ")  # fast, not a timeout
    assert "Updating=False reason Error" in missing["message"] and missing["image"] in missing["message"]

    assert seen["plain"]["summary"] == "Online" and seen["plain"]["labels"]["n"] == "3"
    assert seen["plain"]["labels"]["test-id"].startswith("fcdev-")
    assert seen["plain"]["labels"]["test-id"] != update["test_id"]

    failing = seen["failing"]["name"]
    assert f"flightctl-device {failing} device conditions" in text and "summary Online" in text
    assert "agent journal (last 50 lines)" in text and f"/enroll/{failing}" in text

    # Teardown: each test's Device and ER are gone; the bystander's stay; the token showed nowhere.
    assert _left(emu, tmp_path) == ({bystander}, {bystander})
    assert emu.token not in text
    for path in pytester.path.rglob("*"):
        if path.is_file() and path.stat().st_size < 50 << 20:
            assert emu.token.encode() not in path.read_bytes(), path


def test_a_refused_token_fails_before_any_device_boots(pytester: pytest.Pytester, emu: FlightctlEmulator,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_inner="def test_x(enrolled_device):\n    pass\n\n"
                                   "def test_y(enrolled_device):\n    pass\n")
    monkeypatch.setenv("FLIGHTCTL_TOKEN", "not-the-t0ken")
    qcow2 = tmp_path / "never-booted.qcow2"
    qcow2.write_bytes(b"not a disk: nothing may boot it")
    # -rN: no short summary, whose lines CI=true makes whole (each would repeat the sentence)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN", f"--device-qcow2={qcow2}",
                                           *_service_options(emu, tmp_path))
    result.assert_outcomes(errors=2)
    text = result.stdout.str()
    assert text.count("refused the token from FLIGHTCTL_TOKEN (401 Unauthorized)") == 2
    assert "not-the-t0ken" not in text and "device VM(s) booted" not in text
    assert [r.path for r in emu.requests] == ["/api/v1/version"]  # checked once, then nothing
