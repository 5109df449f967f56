"""pytest hooks and fixtures: thin wiring over the library's factories."""

from __future__ import annotations

import os

import pytest

from .errors import ConfigError
from .settings import KNOBS, Settings

SETTINGS_KEY = pytest.StashKey[Settings]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flightctl-device", "flightctl device VMs and artifacts")
    for knob in KNOBS:
        if knob.flag:
            group.addoption(knob.cli, action="store_true", default=None, help=knob.help)
        elif knob.multi:
            group.addoption(knob.cli, action="append", default=None, metavar=knob.metavar,
                            help=knob.help)
        else:
            group.addoption(knob.cli, default=None, metavar=knob.metavar, help=knob.help)
        parser.addini(knob.ini, help=f"{knob.help} (same as {knob.cli})", default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "device(variant=..., memory_mib=..., vcpus=...): the device VM this test gets.",
    )
    cli = {knob.attr: config.getoption(knob.cli) for knob in KNOBS}
    ini = {knob.attr: config.getini(knob.ini) for knob in KNOBS}
    try:
        config.stash[SETTINGS_KEY] = Settings.resolve(cli, os.environ, ini)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None


def settings_of(config: pytest.Config) -> Settings:
    return config.stash[SETTINGS_KEY]


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = settings_of(config)
    return [f"flightctl-device: libvirt {settings.libvirt_uri}, accel {settings.accel}, "
            f"network {settings.network}, workdir {settings.workdir}"]


@pytest.fixture(scope="session")
def device_settings(request: pytest.FixtureRequest) -> Settings:
    """The resolved settings of this run."""
    return settings_of(request.config)


# -- artifacts: agent_images_bundle, agent_qcow2 ----------------------------------------------


# -- images: agent_images -----------------------------------------------------------------------


# -- device VMs: agent_config, device_vm_factory, device_vm ------------------------------------
