"""A device's agent gets its enrollment config and certs at boot, never from the image."""

from __future__ import annotations

import hashlib

from pytest_flightctl_device.devices.agent import AgentConfig
from pytest_flightctl_device.devices.vm import DeviceVM


def test_agent_has_enrollment_config(device_vm: DeviceVM, agent_config: AgentConfig,
                                     agent_banner: str) -> None:
    out = device_vm.run("sudo cat /etc/flightctl/config.yaml").stdout
    assert "enrollment-service" in out
    # Real cloud-init wrote every file with the owner and mode the agent expects ...
    for injected in agent_config.files:
        stat = device_vm.run(f"sudo stat -c '%U:%G %a' {injected.path}").stdout.split()
        assert stat == [injected.owner, f"{injected.mode:o}"], injected.path
        digest = device_vm.run(f"sudo sha256sum {injected.path}").stdout.split()[0]
        assert digest == hashlib.sha256(injected.content).hexdigest(), injected.path
    # ... and the agent read it: its banner names this device's enrollment URL.
    assert "/enroll/" in agent_banner
