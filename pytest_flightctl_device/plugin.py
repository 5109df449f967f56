"""pytest hooks and fixtures: thin wiring over the library's factories."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, TypeVar

import pytest

from .errors import ConfigError
from .settings import KNOBS, Settings

SETTINGS_KEY = pytest.StashKey[Settings]()
_T = TypeVar("_T")


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

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .artifacts import Artifacts


def _artifact_progress(config: pytest.Config) -> Callable[[str], None] | None:
    """Progress lines on the terminal reporter, written around output capture (never into a test)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return None

    def emit(text: str) -> None:
        import contextlib

        quiet = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with quiet:
            reporter.write_line(f"flightctl-device: {text}")

    return emit


def _artifact(settings: Settings, get: Callable[[], _T]) -> _T:
    """Run `get`; a missing tool skips (an error under --device-require), other errors fail short."""
    from .errors import DeviceError, MissingToolError

    try:
        return get()
    except MissingToolError as exc:
        if settings.require:
            pytest.fail(f"{exc} (--device-require is set, so this is an error)", pytrace=False)
        pytest.skip(str(exc))
    except DeviceError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def device_artifacts(request: pytest.FixtureRequest) -> Artifacts:
    """This session's artifacts; nothing is resolved, fetched or checked until a fixture asks."""
    from .artifacts import Artifacts

    config = request.config
    tty = bool(getattr(config.get_terminal_writer(), "hasmarkup", False))
    return Artifacts(settings_of(config), progress=_artifact_progress(config), interval=2.0 if tty else 5.0)


@pytest.fixture(scope="session")
def agent_images_bundle(request: pytest.FixtureRequest, device_artifacts: Artifacts) -> Path:
    """The verified images bundle tar (`podman save -m`), fetched once for all workers."""
    return _artifact(settings_of(request.config), device_artifacts.bundle)


@pytest.fixture(scope="session")
def agent_qcow2(request: pytest.FixtureRequest, device_artifacts: Artifacts) -> Path:
    """The verified qcow2 disk image, fetched once for all workers; treat it as read-only."""
    return _artifact(settings_of(request.config), device_artifacts.qcow2)



# -- images: agent_images -----------------------------------------------------------------------


# -- device VMs: agent_config, device_vm_factory, device_vm ------------------------------------
