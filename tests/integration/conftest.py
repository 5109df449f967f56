"""Factories over the test guests, for the integration tests of device VMs.

Every VM these tests boot runs isolated (qemu restrict=on): nothing leaves this machine.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.devices.agent import AgentConfig
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.errors import MissingToolError
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing

FactoryMaker = Callable[..., DeviceVMFactory]


@pytest.fixture(scope="session")
def make_factory(device_settings: Settings, agent_config: AgentConfig) -> Iterator[FactoryMaker]:
    """make_factory(base_image, **setting_changes): a factory closed at the end of the session."""
    made: list[DeviceVMFactory] = []

    def make(base_image: Path, *, agent: AgentConfig | None = None, **changes: object) -> DeviceVMFactory:
        settings = dataclasses.replace(device_settings, network="isolated", **changes)
        factory = DeviceVMFactory(settings, base_image=base_image, agent=agent or agent_config,
                                  run_id=secrets.token_hex(4), worker="t")
        try:
            factory.check()
        except MissingToolError as exc:
            missing(str(exc))
        made.append(factory)
        return factory

    yield make
    for factory in made:
        factory.close()


@pytest.fixture(scope="session")
def tiny_factory(make_factory: FactoryMaker, tiny_guest: Path) -> DeviceVMFactory:
    return make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0)
