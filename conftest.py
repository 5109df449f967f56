"""The repository's own test set-up (not the plugin).

The real flightctl device image cannot be had on a development or CI machine without a
registry, so in this repository a device boots one of the small test guests built from Debian
packages by tests/guest/ whenever no qcow2 source is given. Users of the plugin never see this.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("flightctl-device-selftest", "this repository's own reliability tests")
    group.addoption("--soak-boots", type=int, default=30,
                    help="sequential boots in the soak test (CI: 30, ~4 min under TCG; more for a longer soak)")
    group.addoption("--chaos-kills", type=int, default=20, help="kill -9 rounds in the chaos test")


@pytest.fixture(scope="session")
def soak_boots(request: pytest.FixtureRequest) -> int:
    """How many boots the soak test does (--soak-boots; CI keeps the default)."""
    return int(request.config.getoption("--soak-boots"))


@pytest.fixture(scope="session")
def chaos_kills(request: pytest.FixtureRequest) -> int:
    """How many kill -9 rounds the chaos test does (--chaos-kills)."""
    return int(request.config.getoption("--chaos-kills"))


def _guest(kind: str) -> Path:
    from tests.guest.build import build_guest

    try:
        return build_guest(kind)  # type: ignore[arg-type]
    except FileNotFoundError as exc:
        missing(f"cannot build the {kind} test guest: {exc.filename or exc} is not installed")
        raise


@pytest.fixture(scope="session")
def tiny_guest() -> Path:
    """The busybox + dropbear guest: boots in seconds, for lifecycle tests."""
    return _guest("tiny")


@pytest.fixture(scope="session")
def debian_guest() -> Path:
    """The Debian bookworm guest with systemd and real cloud-init."""
    return _guest("debian")


def _source_given(settings: Settings) -> bool:
    return bool(settings.qcow2 or settings.build or settings.github_run or settings.github_pr
                or settings.github_ref)


@pytest.fixture(scope="session")
def agent_qcow2(request: pytest.FixtureRequest, device_settings: Settings) -> Path:
    """The embedded default here: the Debian test guest, unless a qcow2 source was given."""
    if _source_given(device_settings):
        from pytest_flightctl_device.plugin import _guarded

        artifacts = request.getfixturevalue("device_artifacts")
        return _guarded(device_settings, artifacts.qcow2)
    return _guest("debian")
