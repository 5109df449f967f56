"""What an e2e suite copies: fixtures built on device_vm.

The plugin is loaded by its entry point; nothing here is needed to get a device. This file adds
one fixture most suites want: the agent's enrollment banner, which appears once the agent has
read the config that cloud-init injected at boot.
"""

from __future__ import annotations

import pytest

from pytest_flightctl_device.devices.vm import DeviceVM

BANNER = "/etc/issue.d/flightctl-banner.issue"


@pytest.fixture
def agent_banner(device_vm: DeviceVM) -> str:
    """The agent's enrollment banner (.../enroll/<device>), waited for up to 120 s."""
    device_vm.run(f"timeout 120 sh -c 'until test -s {BANNER}; do sleep 1; done'", timeout=130)
    return device_vm.run(f"cat {BANNER}").stdout
