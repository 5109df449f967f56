"""Every body the fake accepts or sends must parse with flightctl-client's own pydantic models and
carry no key they do not know, so the fake cannot drift from upstream's schema."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flightctl.models.device import Device
from flightctl.models.device_list import DeviceList
from flightctl.models.enrollment_request import EnrollmentRequest
from flightctl.models.enrollment_request_approval_status import EnrollmentRequestApprovalStatus
from flightctl.models.enrollment_request_list import EnrollmentRequestList
from flightctl.models.status import Status
from flightctl.models.version import Version
from pydantic import BaseModel, ValidationError

from tests.support.flightctl_fake.status import Reply


def validate(model: type[BaseModel], body: Any, what: str) -> None:
    """`body` must parse with the client's model and carry no key the model does not know."""
    if not isinstance(body, dict):
        raise Reply(400, f"{what}: expected a JSON object")
    try:
        parsed = model.from_dict(body)  # type: ignore[attr-defined]
    except (ValidationError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise Reply(400, f"{what}: " + " ".join(str(exc).splitlines()[:3])) from None
    unknown = list(_unknown_keys(body, parsed.to_dict(), ""))
    if unknown:
        raise Reply(400, f"{what}: unknown field(s) {', '.join(unknown)}")


def _unknown_keys(given: Any, known: Any, where: str) -> Iterator[str]:
    if isinstance(given, dict) and isinstance(known, dict):
        for key, value in given.items():
            if value is None:
                continue
            if key not in known:
                yield f"{where}.{key}".lstrip(".")
            else:
                yield from _unknown_keys(value, known[key], f"{where}.{key}")
    elif isinstance(given, list) and isinstance(known, list):
        for index, (a, b) in enumerate(zip(given, known, strict=False)):
            yield from _unknown_keys(a, b, f"{where}[{index}]")


_RESPONSE_MODELS: dict[str, type[BaseModel]] = {
    "Device": Device, "DeviceList": DeviceList, "EnrollmentRequest": EnrollmentRequest,
    "EnrollmentRequestList": EnrollmentRequestList, "Status": Status,
}


def check_response(body: Any) -> None:
    """Every response body parses with the client's model for its kind."""
    if not isinstance(body, dict):
        raise ValueError(f"response body is {type(body).__name__}")
    kind = body.get("kind")
    if kind in _RESPONSE_MODELS:
        model: type[BaseModel] = _RESPONSE_MODELS[kind]
    elif "approvedBy" in body:
        model = EnrollmentRequestApprovalStatus
    elif set(body) == {"version"}:
        model = Version
    else:
        raise ValueError(f"response body of unknown shape: keys {sorted(body)}")
    try:
        validate(model, body, f"response {model.__name__}")
    except Reply as exc:
        raise ValueError(exc.message) from None
