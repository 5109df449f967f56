"""Waiting on a Device as the service reports it: Online, a new rendered version, or a failure.

Pure logic over the Device as JSON (`model.to_dict()`, upstream's camelCase keys) and an injected
clock, so the rules (what counts as applied, what fails fast) are tested without a service. They
follow upstream's e2e harness (WaitForDeviceNewRenderedVersion): the agent reports the rendered
version it runs in `status.config.renderedVersion`, and an applied update leaves the `Updating`
condition False with reason `Updated`. An update that failed shows reason `Error` (or a rollback)
naming the version it tried, with `status.updated.status` OutOfDate.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pytest_flightctl_device.errors import DeviceStateError

RENDERED_VERSION = "device-controller/renderedVersion"
FAILED_REASONS = ("Error", "RollingBack", "RolledBack")
POLL_S = 1.0

T = TypeVar("T")


@dataclass
class Clock:
    """time.monotonic and time.sleep, replaceable by a fake in tests."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def _status(device: Mapping[str, Any]) -> Mapping[str, Any]:
    return device.get("status") or {}


def condition(device: Mapping[str, Any], kind: str) -> Mapping[str, Any] | None:
    return next((c for c in _status(device).get("conditions") or [] if c.get("type") == kind), None)


def summary(device: Mapping[str, Any]) -> str:
    return str((_status(device).get("summary") or {}).get("status") or "")


def reported_version(device: Mapping[str, Any]) -> int:
    """The rendered version the agent reports it runs (0: none yet)."""
    text = str((_status(device).get("config") or {}).get("renderedVersion") or "")
    return int(text) if text.isdigit() else 0


def wanted_version(device: Mapping[str, Any]) -> int:
    """The rendered version the service wants the device at (its annotation)."""
    text = str(((device.get("metadata") or {}).get("annotations") or {}).get(RENDERED_VERSION) or "")
    return int(text) if text.isdigit() else 0


def describe(device: Mapping[str, Any] | None) -> str:
    """The device's state in one line: summary, updated, rendered versions and every condition."""
    if device is None:
        return "the service reported no device"
    status = _status(device)
    parts = [f"summary {summary(device) or '?'}",
             f"updated {(status.get('updated') or {}).get('status') or '?'}"
             + (f" ({status['updated']['info']})" if (status.get("updated") or {}).get("info") else ""),
             f"renderedVersion reported {reported_version(device)}, wanted {wanted_version(device)}"]
    for c in status.get("conditions") or []:
        text = f"{c.get('type')}={c.get('status')}"
        if c.get("reason"):
            text += f" reason {c.get('reason')}"
        if c.get("message"):
            text += f": {c.get('message')}"
        parts.append(text)
    return "; ".join(parts)


def is_online(device: Mapping[str, Any]) -> bool:
    return summary(device) == "Online"


def rebooting(device: Mapping[str, Any]) -> bool:
    """The agent said it is rebooting into an update (Updating reason Rebooting, or summary Rebooting)."""
    updating = condition(device, "Updating") or {}
    return updating.get("reason") == "Rebooting" or summary(device) == "Rebooting"


def update_verdict(device: Mapping[str, Any], target: int) -> bool:
    """True once `target` is applied; False while it is on its way; DeviceStateError when it failed."""
    updating = condition(device, "Updating") or {}
    reason = str(updating.get("reason") or "")
    message = str(updating.get("message") or "")
    if reason in FAILED_REASONS and re.search(rf"(?<!\d){target}(?!\d)", message):
        raise DeviceStateError(f"the update to renderedVersion {target} failed: {describe(device)}")
    if reason in FAILED_REASONS and reported_version(device) < target and "rollback" in message.lower():
        raise DeviceStateError(f"the device rolled back instead of applying renderedVersion {target}: "
                               f"{describe(device)}")
    return (reported_version(device) >= target and updating.get("status") == "False" and reason == "Updated")


def wait_until(probe: Callable[[], T], done: Callable[[T], bool], *, timeout: float, what: str,
               explain: Callable[[T | None], str], clock: Clock | None = None,
               interval: float = POLL_S, transient: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `probe` until `done(value)`; `done` may raise to fail fast. On timeout, one sentence
    `{what} within N s` plus `explain(last value)`; errors of the `transient` types are retried (the
    last one is quoted)."""
    clock = clock or Clock()
    deadline = clock.now() + timeout
    last: T | None = None
    error: BaseException | None = None
    while True:
        try:
            last = probe()
            error = None
            if done(last):
                return last
        except transient as exc:
            error = exc
        if clock.now() >= deadline:
            detail = explain(last)
            if error is not None:
                detail += f"; last error: {' '.join(str(error).split())[:300]}"
            raise DeviceStateError(f"{what} within {timeout:.0f} s; {detail}")
        clock.sleep(min(interval, max(0.0, deadline - clock.now())))
