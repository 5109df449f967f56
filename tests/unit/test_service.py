"""The service package without a VM: client.yaml, the connection check's sentences against the real
client and the flightctl emulator on 127.0.0.1 (a FAKE of the service), the update retries, and the
wait rules with a fake clock."""

from __future__ import annotations

import base64
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_flightctl_device.errors import ConfigError, DeviceStateError, ServiceConnectionError
from pytest_flightctl_device.service import connection, enrolled, lifecycle, waits
from pytest_flightctl_device.settings import Settings
from tests.support.flightctl_emulator import FlightctlEmulator
from tests.support.flightctl_fake.pki import ScratchCA


@pytest.fixture
def emu() -> Iterator[FlightctlEmulator]:
    with FlightctlEmulator() as emulator:
        yield emulator
        assert emulator.errors == []


def _service(emu: FlightctlEmulator, **changes: Any) -> connection.ServiceSettings:
    base = connection.ServiceSettings(server=emu.user_url, ca_pem=emu.ca_pem.decode(), token=emu.token,
                                      origin=f"--device-flightctl-api {emu.user_url}",
                                      ca_origin="--device-flightctl-ca /x/ca.crt", token_origin="FLIGHTCTL_TOKEN")
    return dataclasses.replace(base, **changes)


# -- client.yaml and where the settings come from ---------------------------------------------------


def test_client_yaml_as_flightctl_login_writes_it(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("PEM-CA\n")
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump({
        "service": {"server": "https://api.example:3443/", "certificate-authority": "ca.crt"},
        "authentication": {"access-token": "tok-access", "id-token": "tok-id"}, "organization": "o"}))
    file = connection.read_client_config(path, "x")
    assert (file.server, file.ca_pem, file.token, file.insecure) == ("https://api.example:3443", "PEM-CA\n",
                                                                    "tok-access", False)
    assert "tok-access" not in repr(file)
    doc = yaml.safe_load(path.read_text())
    doc["authentication"]["token-to-use"] = "id"
    doc["service"] = {"server": "https://api.example:3443", "insecureSkipVerify": True,
                      "certificate-authority-data": base64.b64encode(b"DATA-CA").decode()}
    path.write_text(yaml.safe_dump(doc))
    file = connection.read_client_config(path, "x")
    assert (file.ca_pem, file.token, file.insecure) == ("DATA-CA", "tok-id", True)


@pytest.mark.parametrize(("text", "why"), [("- a list\n", "not a YAML mapping"), ("service: [1]\n", "mappings"),
                                           ("service: {server: ftp://x}\n", r"not an http\(s\) URL"),
                                           ("{unclosed\n", "not YAML")])
def test_a_bad_client_yaml_is_one_sentence_naming_the_option(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "client.yaml"
    path.write_text(text)
    settings = Settings(flightctl_client_config=path)
    with pytest.raises(ConfigError, match=rf"^--device-flightctl-client-config {path} is not a flightctl client "
                                          rf"config \(.*{why}.*\); give the client.yaml"):
        connection.resolve(settings, {})


def test_options_and_env_win_over_the_default_client_yaml(tmp_path: Path) -> None:
    default = tmp_path / "cfg" / "flightctl" / "client.yaml"
    default.parent.mkdir(parents=True)
    default.write_text(yaml.safe_dump({"service": {"server": "https://file:1"},
                                       "authentication": {"access-token": "from-file"}}))
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    assert connection.default_client_config(env) == default
    got = connection.resolve(Settings(), env)
    assert (got.server, got.token, got.origin) == ("https://file:1", "from-file",
                                                   f"--device-flightctl-client-config {default}")
    ca = tmp_path / "ca.pem"
    ca.write_text("CA")
    got = connection.resolve(Settings(flightctl_api="https://opt:2", flightctl_ca=ca),
                             {**env, "FLIGHTCTL_TOKEN": "from-env"})
    assert (got.server, got.token, got.token_origin, got.ca_pem) == ("https://opt:2", "from-env", "FLIGHTCTL_TOKEN",
                                                                      "CA")
    assert "from-env" not in repr(got)


def test_no_service_at_all_says_which_options_to_give(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"enrolled_device needs a flightctl service; give --device-flightctl-api "
                                          r"URL \(the token in FLIGHTCTL_TOKEN\) or --device-flightctl-client-config"):
        connection.resolve(Settings(), {"HOME": str(tmp_path)})


# -- the check: one sentence per failure -------------------------------------------------------------


def test_check_passes_and_the_client_sends_the_bearer_token(emu: FlightctlEmulator) -> None:
    assert connection.check(_service(emu)) == "v1.3.0-emulator"
    assert [r.identity for r in emu.requests] == ["token"]


def test_unreachable_names_the_api_option() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        service = connection.ServiceSettings(server=f"https://127.0.0.1:{port}", token="t0ken-secret",
                                             origin=f"--device-flightctl-api https://127.0.0.1:{port}")
        with pytest.raises(ServiceConnectionError) as caught:
            connection.check(service)
    text = str(caught.value)
    assert text.startswith(f"The flightctl service at https://127.0.0.1:{port} (from --device-flightctl-api ")
    assert "is unreachable (" in text and "check --device-flightctl-api" in text
    assert "t0ken-secret" not in text and text.count(". ") == 0


def test_an_untrusted_certificate_names_the_ca_option(emu: FlightctlEmulator) -> None:
    other = ScratchCA().pem.decode()
    for service, trusted in ((_service(emu, ca_pem=other), "the CA from --device-flightctl-ca /x/ca.crt"),
                             (_service(emu, ca_pem=None, ca_origin=None), "the system's CAs")):
        with pytest.raises(ServiceConnectionError, match=rf"presented a TLS certificate that {trusted} do not trust "
                                                         r"\(.*\); give the CA that signed it with "
                                                         r"--device-flightctl-ca FILE\.$"):
            connection.check(service)


def test_a_refused_or_missing_token_names_flightctl_token(emu: FlightctlEmulator) -> None:
    with pytest.raises(ServiceConnectionError) as caught:
        connection.check(_service(emu, token="wrong-t0ken"))
    assert str(caught.value).endswith("refused the token from FLIGHTCTL_TOKEN (401 Unauthorized); set "
                                      "FLIGHTCTL_TOKEN to a valid token or log in again with `flightctl login`.")
    assert "wrong-t0ken" not in str(caught.value)
    with pytest.raises(ServiceConnectionError, match=r"asks for a token and none was given; set FLIGHTCTL_TOKEN"):
        connection.check(_service(emu, token=None, token_origin=None))


# -- EnrolledDevice.update: read-modify-replace, 409 retried ---------------------------------------


def test_update_retries_conflicts_on_a_fresh_copy(emu: FlightctlEmulator) -> None:
    from flightctl.api.device_api import DeviceApi
    from flightctl.models.device import Device

    with connection.api_client(_service(emu)) as client:
        DeviceApi(client).replace_device("dev1", Device.from_dict(
            {"apiVersion": "flightctl.io/v1beta1", "kind": "Device", "metadata": {"name": "dev1"},
             "spec": {"os": {"image": "quay.io/a/b:1"}}}))
        device = enrolled.EnrolledDevice(None, client, "dev1", "t1", timeout=5,  # type: ignore[arg-type]
                                         clock=waits.Clock(sleep=lambda _s: None))
        emu.fail_next_replaces(2)
        seen: list[str | None] = []

        def change(d: Any) -> None:
            seen.append(d.metadata.resource_version)
            d.spec.os.image = "quay.io/a/b:2"

        replaced = device.update(change)
        assert replaced.spec.os.image == "quay.io/a/b:2"
        puts = [r.status for r in emu.requests if r.method == "PUT"]
        assert puts == [201, 409, 409, 200] and len(seen) == 3
        emu.fail_next_replaces(enrolled.CONFLICT_RETRIES)
        with pytest.raises(DeviceStateError, match="409 Conflict to 10 replaces in a row"):
            device.update(change)


def test_cleanup_deletes_only_this_tests_device_and_er(emu: FlightctlEmulator) -> None:
    from flightctl.api.device_api import DeviceApi
    from flightctl.models.device import Device

    with connection.api_client(_service(emu)) as client:
        for name, test_id in (("mine", "t-1"), ("other", "t-2")):
            DeviceApi(client).replace_device(name, Device.from_dict(
                {"apiVersion": "flightctl.io/v1beta1", "kind": "Device",
                 "metadata": {"name": name, "labels": {"test-id": test_id}}}))
        assert enrolled.cleanup(client, "t-1", "no-such-er") == ["Device mine"]
        assert emu.device("mine") is None and emu.device("other") is not None


def test_test_id_is_a_label_value_unique_per_test_and_run() -> None:
    ids = {lifecycle.test_id(run, node) for run in ("r1", "r2") for node in ("t.py::a", "t.py::b")}
    assert len(ids) == 4
    assert all(len(value) <= 63 and value.replace("-", "").isalnum() for value in ids)


class _Named:
    name = "fcdev-vm"


class _RecordingFactory:
    """Records the order of the end: the VM must stop before the Device and ER are deleted."""

    def __init__(self, emu: FlightctlEmulator, log: list[str]) -> None:
        self.emu, self.log = emu, log

    def finish(self, vm: Any, *, failed: bool) -> str | None:
        self.log.append(f"vm stopped (device still there: {self.emu.device('mine') is not None})")
        return "kept" if failed else None


def test_enrollment_stops_the_vm_before_removing_the_device(emu: FlightctlEmulator) -> None:
    from flightctl.api.device_api import DeviceApi
    from flightctl.models.device import Device

    log: list[str] = []
    with connection.api_client(_service(emu)) as client:
        DeviceApi(client).replace_device("mine", Device.from_dict(
            {"apiVersion": "flightctl.io/v1beta1", "kind": "Device",
             "metadata": {"name": "mine", "labels": {"test-id": "t-9"}}}))
        lease = lifecycle.Enrollment(_RecordingFactory(emu, log), client, "t-9")  # type: ignore[arg-type]
        lease.vm, lease.name, lease._sections = _Named(), "mine", []  # type: ignore[assignment]
        lease.finish(failed=True)  # kept: its Device stays
        assert emu.device("mine") is not None and lease.kept and "test-id=t-9" in lease.kept
        lease.finish(failed=False)
    assert log == ["vm stopped (device still there: True)"] * 2
    assert emu.device("mine") is None


# -- the wait rules -------------------------------------------------------------------------------------


class FakeClock(waits.Clock):
    def __init__(self) -> None:
        self.t = 0.0
        super().__init__(now=lambda: self.t, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.t += max(seconds, 0.001)


def _device(reported: int, wanted: int, reason: str, status: str = "False", message: str = "",
            summary: str = "Online", updated: str = "UpToDate") -> dict[str, Any]:
    return {"metadata": {"annotations": {waits.RENDERED_VERSION: str(wanted)}},
            "status": {"config": {"renderedVersion": str(reported)}, "summary": {"status": summary},
                       "updated": {"status": updated},
                       "conditions": [{"type": "Updating", "status": status, "reason": reason, "message": message}]}}


def test_update_verdict_waits_then_passes_and_fails_fast_on_this_versions_error() -> None:
    assert waits.update_verdict(_device(2, 3, "Updated", updated="OutOfDate"), 3) is False  # not picked up yet
    assert waits.update_verdict(_device(2, 3, "ApplyingUpdate", "True"), 3) is False
    assert waits.rebooting(_device(2, 3, "Rebooting", "True", summary="Rebooting"))
    assert waits.update_verdict(_device(3, 3, "Updated"), 3) is True
    stale = _device(2, 4, "Error", message="Failed to update to renderedVersion: 3: no such image")
    assert waits.update_verdict(stale, 4) is False  # an older failure is not this update's
    failed = _device(3, 4, "Error", message="Failed to update to renderedVersion: 4: no such image",
                     updated="OutOfDate")
    with pytest.raises(DeviceStateError, match=r"the update to renderedVersion 4 failed: summary Online; "
                                               r"updated OutOfDate; .*Updating=False reason Error: Failed to "
                                               r"update to renderedVersion: 4: no such image"):
        waits.update_verdict(failed, 4)


def test_wait_until_retries_transient_errors_and_quotes_the_last_state() -> None:
    clock = FakeClock()
    answers: list[Any] = [OSError("refused"), _device(1, 2, "ApplyingUpdate", "True"), _device(2, 2, "Updated")]

    def probe() -> Any:
        item = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(item, Exception):
            raise item
        return item

    got = waits.wait_until(probe, lambda d: waits.update_verdict(d, 2), timeout=30, what="x",
                           explain=waits.describe, clock=clock, transient=(OSError,))
    assert waits.reported_version(got) == 2 and clock.t < 5
    clock = FakeClock()
    with pytest.raises(DeviceStateError, match=r"^device d did not reach Online within 10 s; summary Offline; "
                                               r".*; last error: refused$") as caught:
        calls = iter([_device(1, 1, "Updated", summary="Offline")])

        def flaky() -> Any:
            try:
                return next(calls)
            except StopIteration:
                raise OSError("refused") from None

        waits.wait_until(flaky, waits.is_online, timeout=10, what="device d did not reach Online",
                         explain=waits.describe, clock=clock, transient=(OSError,))
    assert 10 <= clock.t < 11.5 and "Offline" in str(caught.value)


def test_the_plugin_and_the_service_package_import_no_flightctl_client() -> None:
    import subprocess
    import sys

    code = ("import sys, pytest_flightctl_device.plugin, pytest_flightctl_device.service.enrolled, "
            "pytest_flightctl_device.service.connection, pytest_flightctl_device.service.waits\n"
            "print(sorted(m for m in sys.modules if m == 'flightctl' or m.startswith(('flightctl.', 'pydantic'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_waits_read_the_clients_models_as_the_apis_json(emu: FlightctlEmulator) -> None:
    """to_dict() keeps Enum objects; the waits see the strings the API sends."""
    from flightctl.api.device_api import DeviceApi
    from flightctl.models.device import Device

    with connection.api_client(_service(emu)) as client:
        DeviceApi(client).replace_device("dev1", Device.from_dict(
            {"apiVersion": "flightctl.io/v1beta1", "kind": "Device", "metadata": {"name": "dev1"}}))

        def report(status: dict[str, Any]) -> None:
            status["lastSeen"] = "2026-01-01T00:00:00Z"
            status["config"]["renderedVersion"] = "1"
            status["conditions"] = [{"type": "Updating", "status": "False", "reason": "Updated",
                                     "message": "Updated to desired renderedVersion: 1",
                                     "lastTransitionTime": "2026-01-01T00:00:00Z"}]

        emu.set_device_status("dev1", report)
        device = enrolled.EnrolledDevice(None, client, "dev1", "t1", timeout=5)  # type: ignore[arg-type]
        got = device.wait_for(lambda d: waits.is_online(enrolled._json(d)), what="Online")
        assert waits.update_verdict(enrolled._json(got), 1) is True
        assert "summary Online; updated UpToDate" in device.conditions()


def test_the_api_option_says_what_a_flightctl_url_looks_like() -> None:
    with pytest.raises(ConfigError, match=r"^--device-flightctl-api 'api:3443' is not an http\(s\) URL; give the "
                                          r"flightctl API as https://host:port\.$"):
        Settings.resolve({"flightctl_api": "api:3443"}, {}, {})
