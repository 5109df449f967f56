"""One test's enrolled device from boot to cleanup: what `enrolled_device` runs, in its order.

The order of the end matters: the VM stops first (a Device deleted under a running agent enrolls
again under the same name), then this test's Device goes, then its EnrollmentRequest (deleting an
ER whose Device exists is a 409). What a failed test's report shows (conditions, the agent's
journal) is taken while the VM still runs, so it is never read from a destroyed device.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

from pytest_flightctl_device.service.enrolled import TEST_ID_LABEL, EnrolledDevice, cleanup, enroll

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.factory import DeviceVMFactory
    from pytest_flightctl_device.devices.remap import RegistryRemap
    from pytest_flightctl_device.devices.request import VMRequest
    from pytest_flightctl_device.devices.vm import DeviceVM

JOURNAL_LINES = 50


def test_id(run_id: str, nodeid: str) -> str:
    """A label value unique to this test and run (and valid as a label value: 63 characters at most)."""
    return f"fcdev-{run_id}-{hashlib.sha256(nodeid.encode('utf-8')).hexdigest()[:12]}"


class Enrollment:
    """Boot, enroll, and later end one test's device; `sections()` is what its failed report shows."""

    def __init__(self, factory: DeviceVMFactory, client: Any, test_id: str) -> None:
        self.factory = factory
        self.client = client
        self.test_id = test_id
        self.vm: DeviceVM | None = None
        self.name: str | None = None  # the enrollment ID, once read
        self.device: EnrolledDevice | None = None
        self.kept: str | None = None  # how to reach a VM --device-keep-vm kept (with its Device and ER)
        self._sections: list[tuple[str, str]] | None = None

    def start(self, wanted: VMRequest, *, for_test: str, registry: RegistryRemap | None) -> EnrolledDevice:
        """Boot the device, approve its enrollment request with the labels, wait until it is Online.
        A failure on the way ends what was made (VM, Device, ER) before it is raised."""
        self.vm = vm = self.factory.create(wanted, for_test=for_test, registry=registry)
        try:
            self.name = vm.enrollment_id(timeout=vm.ready_timeout)
            self.device = enroll(vm, self.client, dict(wanted.labels), test_id=self.test_id,
                                 timeout=vm.ready_timeout, name=self.name)
        except BaseException:
            self.take_sections()
            self.finish(failed=True)
            raise
        return self.device

    def take_sections(self) -> None:
        """Read the conditions and the agent's journal tail now, while the VM runs (both redacted)."""
        sections: list[tuple[str, str]] = []
        if self.device is not None:
            sections.append((f"flightctl-device {self.device.name} device conditions", self.device.conditions()))
        if self.vm is not None:
            journal = "(the agent's journal could not be read)"
            with contextlib.suppress(Exception):  # a dead guest: the console section says why
                journal = self.vm.agent_journal(JOURNAL_LINES) or "(empty)"
            sections.append((f"flightctl-device {self.vm.name} agent journal (last {JOURNAL_LINES} lines)", journal))
        self._sections = sections

    def sections(self) -> list[tuple[str, str]]:
        if self._sections is None:
            self.take_sections()
        return list(self._sections or [])

    def finish(self, *, failed: bool) -> None:
        """Stop the VM (or keep it, with its Device and ER: then `kept` says how to reach them), then
        remove this test's Device and ER, nothing else."""
        if self.vm is None:
            return
        if failed and self._sections is None:
            self.take_sections()
        kept = self.factory.finish(self.vm, failed=failed)
        if kept:
            self.kept = f"{self.vm.name} (device {self.name}, label {TEST_ID_LABEL}={self.test_id}); {kept}"
            return
        cleanup(self.client, self.test_id, self.name)
