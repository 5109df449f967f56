"""The flightctl API emulator driven by the real flightctl-client, as the plugin's fixtures will use it.

The emulator is a fake (no flightctl server can run here); these tests pin it to upstream's
behaviour as read in upstream's spec and server code: paths, status codes, the Status body,
resourceVersion conflicts, approval semantics, the two listeners' authentication.
"""

from __future__ import annotations

import base64
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flightctl.api.device_api import DeviceApi
from flightctl.api.enrollmentrequest_api import EnrollmentrequestApi
from flightctl.api.version_api import VersionApi
from flightctl.exceptions import ApiException, BadRequestException, ConflictException, NotFoundException
from flightctl.models.device import Device
from flightctl.models.device_status import DeviceStatus
from flightctl.models.enrollment_request_approval import EnrollmentRequestApproval
from flightctl.models.patch_request_inner import PatchRequestInner

from pytest_flightctl_device.devices.agent import load_agent_config
from tests.support.flightctl_emulator import RENDERED_VERSION, FlightctlEmulator, agent_request, user_client
from tests.support.flightctl_fake.pki import device_name_for, make_csr
from tests.support.flightctl_fake.query import label_matcher


@pytest.fixture
def emu() -> Iterator[FlightctlEmulator]:
    emulator = FlightctlEmulator(long_poll_seconds=0.5).start()
    try:
        yield emulator
    finally:
        emulator.stop()
    assert emulator.errors == []
    assert emulator.token not in repr(emulator.requests)


@pytest.fixture
def client(emu: FlightctlEmulator, tmp_path: Path) -> Any:
    return user_client(emu, tmp_path / "ca.crt")


def _enroll(emu: FlightctlEmulator, labels: dict[str, str] | None = None) -> tuple[str, Any]:
    """Create an EnrollmentRequest through the agent API with the enrollment certificate."""
    name, csr, key = make_csr()
    body = {"apiVersion": "flightctl.io/v1beta1", "kind": "EnrollmentRequest", "metadata": {"name": name},
            "spec": {"csr": csr, "labels": labels or {}}}
    code, answer = agent_request(emu, "POST", "/api/v1/enrollmentrequests", body,
                                 cert_pem=emu.enrollment_cert_pem, key_pem=emu.enrollment_key_pem)
    assert code == 201, answer
    return name, key


def _dev(body: dict[str, Any]) -> Device:
    device = Device.from_dict(body)
    assert device is not None
    return device


def _st(device: Device) -> DeviceStatus:
    assert device.status is not None
    return device.status


def _rendered(device: Device) -> str:
    assert device.metadata.annotations is not None
    return device.metadata.annotations[RENDERED_VERSION]


def _patch(op: dict[str, Any]) -> PatchRequestInner:
    inner = PatchRequestInner.from_dict(op)
    assert inner is not None
    return inner


def _text(exc: pytest.ExceptionInfo[ApiException]) -> str:
    return str(exc.value.body)


def _approve(client: Any, name: str, labels: dict[str, str]) -> Any:
    return EnrollmentrequestApi(client).approve_enrollment_request(
        name, EnrollmentRequestApproval(approved=True, labels=labels))


def _device_cert(emu: FlightctlEmulator, name: str, key: Any) -> tuple[bytes, bytes]:
    code, er = agent_request(emu, "GET", f"/api/v1/enrollmentrequests/{name}",
                             cert_pem=emu.enrollment_cert_pem, key_pem=emu.enrollment_key_pem)
    assert code == 200
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return er["status"]["certificate"].encode("ascii"), key_pem


def _agent_status(name: str, *, rendered: str, reason: str = "Updated", status: str = "False",
                  message: str = "") -> dict[str, Any]:
    return {"apiVersion": "flightctl.io/v1beta1", "kind": "Device", "metadata": {"name": name}, "status": {
        "conditions": [{"type": "Updating", "status": status, "reason": reason, "message": message,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}],
        "systemInfo": {"architecture": "amd64", "bootID": "b", "operatingSystem": "linux", "agentVersion": "t"},
        "applications": [], "applicationsSummary": {"status": "NoApplications"},
        "resources": {"cpu": "Healthy", "disk": "Healthy", "memory": "Healthy"},
        "integrity": {"status": "Unsupported"}, "config": {"renderedVersion": rendered},
        "os": {"image": "", "imageDigest": ""}, "updated": {"status": "Unknown"},
        "summary": {"status": "Unknown"}, "lifecycle": {"status": "Enrolled"}}}


# --- user API: authentication and version -----------------------------------------------------------


def test_version_with_the_real_client(client: Any) -> None:
    assert VersionApi(client).get_version().version.startswith("v")


def test_missing_token_is_400_and_wrong_token_is_401(emu: FlightctlEmulator, tmp_path: Path) -> None:
    with pytest.raises(BadRequestException) as missing:
        VersionApi(user_client(emu, tmp_path / "ca.crt", token="")).get_version()
    assert missing.value.status == 400
    assert "failed to get auth token" in _text(missing)
    with pytest.raises(ApiException) as wrong:
        VersionApi(user_client(emu, tmp_path / "ca.crt", token="not-the-token")).get_version()
    assert wrong.value.status == 401
    assert '"kind": "Status"' in _text(wrong) and '"reason": "Unauthorized"' in _text(wrong)
    assert [r.identity for r in emu.requests] == ["no-token", "bad-token"]


def test_user_api_refuses_a_client_that_does_not_trust_its_ca(emu: FlightctlEmulator, tmp_path: Path) -> None:
    from flightctl.api_client import ApiClient
    from flightctl.configuration import Configuration

    config = Configuration(host=emu.user_url + "/api/v1")
    config.retries = 0
    api = ApiClient(config, header_name="Authorization", header_value=f"Bearer {emu.token}")
    with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
        VersionApi(api).get_version()


# --- enrollment and approval ----------------------------------------------------------------------


def test_enroll_approve_and_issue_the_device_certificate(emu: FlightctlEmulator, client: Any) -> None:
    name, _key = _enroll(emu, labels={"agent": "yes"})
    ers = EnrollmentrequestApi(client).list_enrollment_requests()
    assert [er.metadata.name for er in ers.items] == [name]
    assert not ers.items[0].metadata.labels  # an ER's metadata.labels stay empty

    approval = _approve(client, name, {"test-id": "abc"})
    assert approval.approved and approval.approved_by
    assert approval.labels == {"test-id": "abc", "agent": "yes"}  # merged with the agent's labels

    with pytest.raises(BadRequestException) as again:
        _approve(client, name, {"test-id": "abc"})
    assert "already approved" in _text(again)

    er_status = EnrollmentrequestApi(client).get_enrollment_request(name).status
    assert er_status is not None and er_status.certificate is not None
    assert [(c.type, c.status, c.reason) for c in er_status.conditions] == [("Approved", "True", "ManuallyApproved")]
    cert = x509.load_pem_x509_certificate(er_status.certificate.encode())
    assert cert.subject.rfc4514_string() == f"CN=device:{name}"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(emu.ca_pem))
    assert device_name_for(cert.public_key()) == name  # type: ignore[arg-type]

    device = DeviceApi(client).get_device(name)
    assert device.metadata.labels == {"test-id": "abc", "agent": "yes"}
    assert _st(device).summary.status == "Unknown"  # not seen yet
    assert _st(device).lifecycle.status == "Enrolled"


def test_create_er_refuses_a_csr_that_does_not_match_the_name(emu: FlightctlEmulator) -> None:
    name, csr, _ = make_csr(cn="someone-else")
    body = {"apiVersion": "flightctl.io/v1beta1", "kind": "EnrollmentRequest", "metadata": {"name": name},
            "spec": {"csr": csr}}
    code, answer = agent_request(emu, "POST", "/api/v1/enrollmentrequests", body,
                                 cert_pem=emu.enrollment_cert_pem, key_pem=emu.enrollment_key_pem)
    assert code == 400 and answer["kind"] == "Status" and "common name" in answer["message"]


def test_create_er_twice_is_a_conflict_and_bodies_are_schema_checked(emu: FlightctlEmulator) -> None:
    name, csr, _ = make_csr()
    body: dict[str, Any] = {"apiVersion": "flightctl.io/v1beta1", "kind": "EnrollmentRequest",
                            "metadata": {"name": name}, "spec": {"csr": csr}}

    def post(body: dict[str, Any]) -> tuple[int, Any]:
        return agent_request(emu, "POST", "/api/v1/enrollmentrequests", body,
                             cert_pem=emu.enrollment_cert_pem, key_pem=emu.enrollment_key_pem)

    assert post(body)[0] == 201
    code, answer = post(body)
    assert (code, answer["reason"]) == (409, "Conflict")
    body["spec"]["csrr"] = "typo"
    code, answer = post(body)
    assert code == 400 and "spec.csrr" in answer["message"]
    body["spec"] = {}
    code, answer = post(body)
    assert code == 400 and "csr" in answer["message"]


# --- devices: list, replace, conflicts, patch, delete ----------------------------------------------


def test_label_selector_finds_only_this_tests_devices(emu: FlightctlEmulator, client: Any) -> None:
    mine, _ = _enroll(emu)
    other, _ = _enroll(emu)
    _approve(client, mine, {"test-id": "abc", "site": "lab"})
    _approve(client, other, {"test-id": "xyz"})
    api = DeviceApi(client)
    assert [d.metadata.name for d in api.list_devices(label_selector="test-id=abc").items] == [mine]
    assert [d.metadata.name for d in api.list_devices(label_selector="test-id!=abc").items] == [other]
    assert {d.metadata.name for d in api.list_devices().items} == {mine, other}
    assert [d.metadata.name for d in api.list_devices(label_selector="site,test-id in (abc,def)").items] == [mine]
    with pytest.raises(BadRequestException):
        api.list_devices(label_selector="test-id=abc=d")
    assert [d.metadata.name for d in api.list_devices(field_selector=f"metadata.name={other}").items] == [other]
    assert [er.metadata.name for er in EnrollmentrequestApi(client).list_enrollment_requests(
        field_selector=f"metadata.name!={other}").items] == [mine]
    with pytest.raises(BadRequestException):
        api.list_devices(field_selector="status.summary.status=Online")


@pytest.mark.parametrize(("selector", "labels", "expected"), [
    ("a=b", {"a": "b"}, True), ("a==b", {"a": "c"}, False), ("a!=b", {}, True), ("a", {"a": ""}, True),
    ("!a", {"a": "x"}, False), ("a notin (x,y)", {"a": "z"}, True), ("a,b=c", {"a": "1", "b": "c"}, True),
])
def test_label_matcher(selector: str, labels: dict[str, str], expected: bool) -> None:
    assert label_matcher(selector)(labels) is expected


def test_replace_bumps_the_rendered_version_and_stale_versions_conflict(emu: FlightctlEmulator,
                                                                         client: Any) -> None:
    name, _ = _enroll(emu)
    _approve(client, name, {"test-id": "abc"})
    api = DeviceApi(client)
    device = api.get_device(name)
    assert _rendered(device) == "1"
    stale = _dev(device.to_dict())
    body = device.to_dict()
    body["spec"] = {"os": {"image": "quay.io/flightctl/flightctl-device:v2"}}
    replaced = api.replace_device(name, _dev(body))
    assert _rendered(replaced) == "2"
    assert replaced.metadata.generation == 2
    assert replaced.metadata.resource_version != device.metadata.resource_version

    stale.spec = replaced.spec
    with pytest.raises(ConflictException) as conflict:
        api.replace_device(name, stale)
    assert "the object has been modified" in _text(conflict)

    again = api.replace_device(name, replaced)  # same spec: no new rendered version
    assert _rendered(again) == "2"


def test_injected_conflicts_then_success(emu: FlightctlEmulator, client: Any) -> None:
    name, _ = _enroll(emu)
    _approve(client, name, {})
    api = DeviceApi(client)
    emu.fail_next_replaces(2)
    outcomes = []
    for _ in range(3):
        device = api.get_device(name)
        body = device.to_dict()
        body["spec"] = {"os": {"image": "img:v3"}}
        try:
            api.replace_device(name, _dev(body))
            outcomes.append("ok")
        except ConflictException:
            outcomes.append("409")
    assert outcomes == ["409", "409", "ok"]
    assert [r.status for r in emu.requests if r.method == "PUT" and r.path == f"/api/v1/devices/{name}"] \
        == [409, 409, 200]


def test_json_patch_labels_and_spec_only(emu: FlightctlEmulator, client: Any) -> None:
    name, _ = _enroll(emu)
    _approve(client, name, {"test-id": "abc"})
    api = DeviceApi(client)
    patched = api.patch_device(name, [
        _patch({"op": "add", "path": "/metadata/labels/site", "value": "lab"}),
        _patch({"op": "add", "path": "/spec", "value": {"os": {"image": "img:v2"}}}),
    ])
    assert patched.metadata.labels == {"test-id": "abc", "site": "lab"}
    assert patched.spec is not None and patched.spec.os is not None
    assert patched.spec.os.image == "img:v2"
    assert _rendered(patched) == "2"
    with pytest.raises(BadRequestException):
        api.patch_device(name, [_patch(
            {"op": "replace", "path": "/status/summary/status", "value": "Online"})])


def test_delete_order_er_conflicts_while_the_device_exists(emu: FlightctlEmulator, client: Any) -> None:
    name, _ = _enroll(emu)
    _approve(client, name, {"test-id": "abc"})
    ers, devices = EnrollmentrequestApi(client), DeviceApi(client)
    with pytest.raises(ConflictException) as conflict:
        ers.delete_enrollment_request(name)
    assert "device exists" in _text(conflict)
    assert devices.delete_device(name).status == "Success"
    assert ers.delete_enrollment_request(name).status == "Success"
    with pytest.raises(NotFoundException):
        devices.get_device(name)
    with pytest.raises(NotFoundException):
        ers.get_enrollment_request(name)


# --- agent API: mTLS, rendered long-poll, status ----------------------------------------------------


def test_agent_api_requires_a_client_certificate_and_tls13(emu: FlightctlEmulator) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        agent_request(emu, "GET", "/api/v1/enrollmentrequests/x", cert_pem=None, key_pem=None)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        agent_request(emu, "GET", "/api/v1/enrollmentrequests/x", cert_pem=emu.enrollment_cert_pem,
                      key_pem=emu.enrollment_key_pem, tls_max=ssl.TLSVersion.TLSv1_2)
    code, _ = agent_request(emu, "GET", "/api/v1/enrollmentrequests/x", cert_pem=emu.enrollment_cert_pem,
                            key_pem=emu.enrollment_key_pem)
    assert code == 404


def test_device_certificate_only_reaches_its_own_device(emu: FlightctlEmulator, client: Any) -> None:
    name, key = _enroll(emu)
    other, _ = _enroll(emu)
    _approve(client, name, {})
    _approve(client, other, {})
    cert, key_pem = _device_cert(emu, name, key)
    assert agent_request(emu, "GET", f"/api/v1/devices/{name}/rendered", cert_pem=cert, key_pem=key_pem)[0] == 200
    assert agent_request(emu, "GET", f"/api/v1/devices/{other}/rendered", cert_pem=cert, key_pem=key_pem)[0] == 401
    code, _ = agent_request(emu, "GET", f"/api/v1/devices/{name}/rendered",
                            cert_pem=emu.enrollment_cert_pem, key_pem=emu.enrollment_key_pem)
    assert code == 401


def test_rendered_long_poll_204_then_new_version(emu: FlightctlEmulator, client: Any) -> None:
    name, key = _enroll(emu)
    _approve(client, name, {})
    cert, key_pem = _device_cert(emu, name, key)
    path = f"/api/v1/devices/{name}/rendered"
    code, body = agent_request(emu, "GET", path, cert_pem=cert, key_pem=key_pem)
    assert code == 200 and body["metadata"]["annotations"][RENDERED_VERSION] == "1"
    started = time.monotonic()
    assert agent_request(emu, "GET", path + "?knownRenderedVersion=1", cert_pem=cert, key_pem=key_pem)[0] == 204
    assert time.monotonic() - started >= 0.4

    emu.long_poll_seconds = 10
    result: dict[str, Any] = {}

    def poll() -> None:
        result["answer"] = agent_request(emu, "GET", path + "?knownRenderedVersion=1", cert_pem=cert,
                                         key_pem=key_pem)

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.3)
    device = DeviceApi(client).get_device(name).to_dict()
    device["spec"] = {"os": {"image": "img:v2"}}
    started = time.monotonic()
    DeviceApi(client).replace_device(name, _dev(device))
    thread.join(timeout=10)
    code, body = result["answer"]
    assert code == 200 and time.monotonic() - started < 5
    assert body["metadata"]["annotations"][RENDERED_VERSION] == "2"
    assert body["spec"]["os"]["image"] == "img:v2"


def test_agent_status_drives_summary_and_updated(emu: FlightctlEmulator, client: Any) -> None:
    name, key = _enroll(emu)
    _approve(client, name, {})
    cert, key_pem = _device_cert(emu, name, key)
    path = f"/api/v1/devices/{name}/status"
    api = DeviceApi(client)

    def put(body: dict[str, Any]) -> int:
        return agent_request(emu, "PUT", path, body, cert_pem=cert, key_pem=key_pem)[0]

    assert put(_agent_status(name, rendered="1")) == 200
    seen = _st(api.get_device_status(name))
    assert (seen.summary.status, seen.updated.status) == ("Online", "UpToDate")
    assert seen.last_seen is None  # "not returned by the API" (upstream's spec), though the service keeps it
    assert emu.device(name)["status"]["lastSeen"]  # type: ignore[index]

    assert put(_agent_status(name, rendered="1", status="True", reason="Rebooting", message="rebooting")) == 200
    assert _st(api.get_device(name)).summary.status == "Rebooting"

    device = api.get_device(name).to_dict()
    device["spec"] = {"os": {"image": "img:missing"}}
    api.replace_device(name, _dev(device))
    assert put(_agent_status(name, rendered="1", reason="Error", message="Failed to update to renderedVersion: 2")) \
        == 200
    status = _st(api.get_device(name))
    assert status.updated.status == "OutOfDate"
    assert "Failed to update to renderedVersion: 2" in (status.updated.info or "")

    bad = _agent_status(name, rendered="1")
    bad["status"]["summary"]["colour"] = "green"
    assert put(bad) == 400

    changed = emu.set_device_status(name, lambda s: s["resources"].update(disk="Critical"))
    assert changed["status"]["summary"]["status"] == "Error"


def test_agent_config_passes_the_plugins_own_validation(emu: FlightctlEmulator, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(emu.agent_config_yaml(extra={"spec-fetch-interval": "0m2s"}))
    config = load_agent_config(config=path)
    assert config.server == emu.agent_url
    doc = yaml.safe_load(path.read_text())
    assert base64.b64decode(doc["enrollment-service"]["service"]["certificate-authority-data"]) == emu.ca_pem
    assert doc["spec-fetch-interval"] == "0m2s"
