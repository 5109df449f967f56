"""Helpers shared by the project's own tests."""

from __future__ import annotations

import os
import shutil

import pytest


def required() -> bool:
    """True when a missing prerequisite must fail the test (CI sets FLIGHTCTL_DEVICE_REQUIRE=1)."""
    return os.environ.get("FLIGHTCTL_DEVICE_REQUIRE", "").strip().lower() in ("1", "true", "yes", "on")


def missing(reason: str) -> None:
    """Skip with `reason` locally; fail under FLIGHTCTL_DEVICE_REQUIRE=1, where nothing may skip."""
    if required():
        pytest.fail(f"FLIGHTCTL_DEVICE_REQUIRE=1 and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of executable `name`, or skip/fail (see missing()) naming the tool."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed (not found on PATH)")
        raise AssertionError("unreachable")
    return path
