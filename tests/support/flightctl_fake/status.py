"""Upstream's Status body and the early answer that carries one (api/core/v1beta1/error.go)."""

from __future__ import annotations

import datetime as dt
from http import HTTPStatus
from typing import Any

API_VERSION = "flightctl.io/v1beta1"


class Reply(Exception):
    """An early answer: a Status body with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def status_body(code: int, message: str) -> dict[str, Any]:
    """Upstream's Status body (api/core/v1beta1/error.go): Reason is the HTTP status text."""
    return {"apiVersion": API_VERSION, "kind": "Status", "status": "Success" if code < 400 else "Failure",
            "code": code, "reason": HTTPStatus(code).phrase, "message": message}


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
