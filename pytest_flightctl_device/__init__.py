"""pytest-flightctl-device: real flightctl devices (libvirt VMs) as pytest fixtures.

The one import path for what users touch: ``from pytest_flightctl_device import DeviceVM, ...``.
Names load on first use, so importing the plugin pulls in neither libvirt nor podman.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.agent import AgentConfig, AgentFile
    from pytest_flightctl_device.devices.factory import DeviceVMFactory
    from pytest_flightctl_device.devices.request import VMRequest
    from pytest_flightctl_device.devices.ssh import CommandResult
    from pytest_flightctl_device.devices.vm import DeviceVM
    from pytest_flightctl_device.errors import (
        AgentConfigError,
        ArtifactError,
        BootError,
        ConfigError,
        DeviceError,
        DeviceStateError,
        GitHubError,
        GuestCommandError,
        MissingToolError,
        PodmanError,
        ServiceConnectionError,
    )
    from pytest_flightctl_device.images.podman import LoadedImages
    from pytest_flightctl_device.service.enrolled import EnrolledDevice
    from pytest_flightctl_device.settings import Settings

_WHERE = {
    "AgentConfig": "devices.agent", "AgentFile": "devices.agent", "CommandResult": "devices.ssh",
    "DeviceVM": "devices.vm", "DeviceVMFactory": "devices.factory", "VMRequest": "devices.request",
    "LoadedImages": "images.podman", "Settings": "settings", "EnrolledDevice": "service.enrolled",
    **{name: "errors" for name in ("AgentConfigError", "ArtifactError", "BootError", "ConfigError", "DeviceError",
                                   "DeviceStateError", "GitHubError", "GuestCommandError", "MissingToolError",
                                   "PodmanError", "ServiceConnectionError")},
}
__all__ = [
    "AgentConfig",
    "AgentConfigError",
    "AgentFile",
    "ArtifactError",
    "BootError",
    "CommandResult",
    "ConfigError",
    "DeviceError",
    "DeviceStateError",
    "DeviceVM",
    "DeviceVMFactory",
    "EnrolledDevice",
    "GitHubError",
    "GuestCommandError",
    "LoadedImages",
    "MissingToolError",
    "PodmanError",
    "ServiceConnectionError",
    "Settings",
    "VMRequest",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
