"""EnrolledDevice: a booted device approved into the flightctl service, and its cleanup.

The flow of upstream's e2e harness (EnrollAndWaitForOnlineStatus, UpdateDeviceWithRetries,
WaitForDeviceNewRenderedVersion) on flightctl-client: read the enrollment ID from the device, wait
for its EnrollmentRequest, approve it with the test's labels, wait until the Device is Online. An
update is read-modify-replace, retried on 409; an OS image update is waited for through the reboot
it causes. Cleanup removes this test's Device (by its test-id label) and then its EnrollmentRequest
(by name: an ER's metadata.labels stay empty), after the VM is stopped (a running agent whose Device
is deleted enrolls again; deleting an ER whose Device exists is a 409).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pytest_flightctl_device.devices.vm import DeviceVM
from pytest_flightctl_device.errors import DeviceStateError
from pytest_flightctl_device.service import waits
from pytest_flightctl_device.service.waits import Clock

TEST_ID_LABEL = "test-id"
CONFLICT_RETRIES = 10
IMAGE_REF = re.compile(r"[/:@]")


def _api(client: Any) -> tuple[Any, Any]:
    from flightctl.api.device_api import DeviceApi
    from flightctl.api.enrollmentrequest_api import EnrollmentrequestApi

    return DeviceApi(client), EnrollmentrequestApi(client)


def _transient() -> tuple[type[BaseException], ...]:
    """What a poll retries: the service answering 5xx or 404 (not there yet), or not answering."""
    import urllib3
    from flightctl.exceptions import NotFoundException, ServiceException

    return (NotFoundException, ServiceException, urllib3.exceptions.HTTPError, OSError)


class EnrolledDevice:
    """A device enrolled for one test: `.name`, `.vm`, `.get()`, `.update()`, `.update_image()`, `.wait_for()`."""

    def __init__(self, vm: DeviceVM, client: Any, name: str, test_id: str, *, timeout: float,
                 clock: Clock | None = None) -> None:
        self.vm = vm
        self.name = name
        self.test_id = test_id
        self.timeout = timeout
        self._client = client
        self._devices, self._ers = _api(client)
        self._clock = clock or Clock()

    def get(self) -> Any:
        """The Device, fresh from the API (flightctl.models.device.Device)."""
        return self._devices.get_device(self.name)

    def update(self, change: Callable[[Any], Any]) -> Any:
        """Read, apply `change(device)` (edit in place or return a new Device), replace; a 409 (someone
        else changed it since the read) is retried on a fresh copy. Returns the replaced Device."""
        from flightctl.exceptions import ConflictException

        for attempt in range(CONFLICT_RETRIES):
            device = self.get()
            changed = change(device)
            device = device if changed is None else changed
            try:
                return self._devices.replace_device(self.name, device)
            except ConflictException:
                if attempt == CONFLICT_RETRIES - 1:
                    raise DeviceStateError(f"device {self.name}: the service answered 409 Conflict to "
                                           f"{CONFLICT_RETRIES} replaces in a row; something else keeps "
                                           "changing the Device.") from None
                self._clock.sleep(min(0.2 * (attempt + 1), 2.0))
        raise AssertionError("unreachable")

    def wait_for(self, predicate: Callable[[Any], bool], timeout: float | None = None,
                 what: str = "the condition") -> Any:
        """Poll the Device until `predicate(device)` holds; on timeout quote its conditions."""
        return waits.wait_until(self.get, predicate, timeout=timeout or self.timeout,
                                what=f"device {self.name} did not reach {what}",
                                explain=lambda d: waits.describe(_json(d)), clock=self._clock,
                                transient=_transient())

    def update_image(self, variant: str, timeout: float | None = None) -> Any:
        """Set spec.os.image to `vm.image(variant)` (a variant name; a full reference is used as it is),
        then wait until the agent reports the new rendered version as Updated, through the reboot an
        OS update causes; fail fast, conditions quoted, when it fails or rolls back."""
        from flightctl.models.device_spec import DeviceSpec
        from flightctl.models.image_or_catalog_item_ref_spec import ImageOrCatalogItemRefSpec

        image = variant if IMAGE_REF.search(variant) else self.vm.image(variant)
        limit = timeout or self.timeout
        before = self.get()
        old_image = ((before.spec.os.image if before.spec and before.spec.os else None) or "")
        since = self.vm.console_mark()

        def set_image(device: Any) -> None:
            if device.spec is None:
                device.spec = DeviceSpec()
            device.spec.os = ImageOrCatalogItemRefSpec(image=image)

        replaced = self.update(set_image)
        target = waits.wanted_version(_json(replaced))
        what = f"renderedVersion {target} (os image {image})"
        if image == old_image:
            return self.wait_for_version(target, limit, what)
        # The agent reboots into the new image and reports Updated only after the boot; it reaches the
        # service again once the device's forwards are back, which the reboot wait reopens.
        seen = self.wait_for_version(target, limit, what, or_rebooting=True)
        if waits.update_verdict(_json(seen), target):
            return seen
        self.vm.wait_rebooted(since, limit)
        return self.wait_for_version(target, limit, what)

    def wait_for_version(self, target: int, timeout: float, what: str, *, or_rebooting: bool = False) -> Any:
        def done(device: Any) -> bool:
            data = _json(device)
            return waits.update_verdict(data, target) or (or_rebooting and waits.rebooting(data))

        return waits.wait_until(self.get, done, timeout=timeout,
                                what=f"device {self.name} did not report {what} as Updated",
                                explain=lambda d: waits.describe(_json(d)), clock=self._clock,
                                transient=_transient())

    def conditions(self) -> str:
        """The device's state for a report: summary, updated status, versions, conditions."""
        try:
            return waits.describe(_json(self.get()))
        except Exception as exc:  # the report must not fail on an unreachable service
            return f"the service could not be asked ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"


def _json(device: Any) -> Mapping[str, Any]:
    """The Device as the API's JSON (camelCase, enums as their strings: to_dict() keeps Enum objects)."""
    if device is None:
        return {}
    data = device.model_dump(mode="json", by_alias=True, exclude_none=True) if hasattr(device, "model_dump") \
        else device
    return data if isinstance(data, Mapping) else {}


def enroll(vm: DeviceVM, client: Any, labels: Mapping[str, str], *, test_id: str, timeout: float,
           name: str | None = None, clock: Clock | None = None) -> EnrolledDevice:
    """Find vm's enrollment request (`name`: its enrollment ID, read from the device when None),
    approve it with `labels` plus test-id, wait until the Device is Online."""
    from flightctl.models.enrollment_request_approval import EnrollmentRequestApproval

    clock = clock or Clock()
    name = name or vm.enrollment_id(timeout=timeout)
    device = EnrolledDevice(vm, client, name, test_id, timeout=timeout, clock=clock)
    ers = device._ers

    def explain_er(_er: Any) -> str:
        return f"last lines of the agent's journal:\n{vm.agent_journal(20) or '(empty)'}"

    waits.wait_until(lambda: ers.get_enrollment_request(name), lambda er: er is not None, timeout=timeout,
                     what=f"device {vm.name}: no EnrollmentRequest {name} reached the service",
                     explain=explain_er, clock=clock, transient=_transient())
    approval = EnrollmentRequestApproval(approved=True, labels={**labels, TEST_ID_LABEL: test_id})
    ers.approve_enrollment_request(name, approval)
    device.wait_for(lambda d: waits.is_online(_json(d)), timeout, what="Online")
    return device


def cleanup(client: Any, test_id: str, er_name: str | None) -> list[str]:
    """Delete the Devices labelled test-id=`test_id`, then the ER `er_name`; returns what went.
    Only this test's resources: nothing is deleted by any other rule."""
    from flightctl.exceptions import NotFoundException

    devices, ers = _api(client)
    gone: list[str] = []
    listed = devices.list_devices(label_selector=f"{TEST_ID_LABEL}={test_id}")
    for item in listed.items or []:
        try:
            devices.delete_device(item.metadata.name)
            gone.append(f"Device {item.metadata.name}")
        except NotFoundException:
            pass
    if er_name:
        try:
            ers.delete_enrollment_request(er_name)
            gone.append(f"EnrollmentRequest {er_name}")
        except NotFoundException:
            pass
    return gone
