"""Label and field selectors and RFC 6902 JSON patch, as the fake's list and patch calls need them."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

from tests.support.flightctl_fake.status import Reply

_REQ = re.compile(r"^\s*(!?)\s*([A-Za-z0-9._/-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9._-]*)"
                  r"|\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def label_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """Kubernetes-style label selector: k=v, k==v, k!=v, k, !k, k in (a,b), k notin (a,b)."""
    parts = [p for p in re.split(r",(?![^()]*\))", selector) if p.strip()]
    requirements: list[tuple[str, str, set[str]]] = []
    for part in parts:
        match = _REQ.match(part)
        if match is None:
            raise Reply(400, f"failed to parse label selector {selector!r}")
        neg, key, op, value, set_op, values = match.groups()
        if neg and (op or set_op):
            raise Reply(400, f"failed to parse label selector {selector!r}")
        if op:
            requirements.append(("!=" if op == "!=" else "=", key, {value}))
        elif set_op:
            requirements.append((set_op, key, {v.strip() for v in values.split(",") if v.strip()}))
        else:
            requirements.append(("!exists" if neg else "exists", key, set()))

    def matches(labels: dict[str, str]) -> bool:
        for op, key, values in requirements:
            value = labels.get(key)
            ok = {"=": value in values, "in": value in values, "!=": value not in values,
                  "notin": value not in values, "exists": key in labels, "!exists": key not in labels}[op]
            if not ok:
                return False
        return True

    return matches


def field_matcher(selector: str) -> Callable[[str], bool]:
    """The one field selector these flows need: metadata.name=X / ==X / !=X, comma-joined (AND)."""
    tests: list[tuple[bool, str]] = []
    for part in (p.strip() for p in selector.split(",") if p.strip()):
        match = re.fullmatch(r"metadata\.name\s*(==|=|!=)\s*(\S+)", part)
        if match is None:
            raise Reply(400, f"unknown or unsupported field selector {part!r} (the emulator knows metadata.name)")
        tests.append((match.group(1) != "!=", match.group(2)))
    return lambda name: all((name == value) is wanted for wanted, value in tests)


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise Reply(400, f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        if isinstance(doc, list):
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            doc = doc[part]
        else:
            raise KeyError(part)
    return doc


def apply_json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/replace/test on a copy; upstream lets only metadata.labels and spec change."""
    out = copy.deepcopy(doc)
    for op in ops:
        parts = _pointer(op["path"])
        if not (parts[:2] == ["metadata", "labels"] or parts[:1] == ["spec"]):
            raise Reply(400, "metadata.labels and spec are the only fields that can be patched")
        try:
            parent = _walk(out, parts[:-1])
            last = parts[-1]
            kind = op["op"]
            if kind == "test":
                if _walk(out, parts) != op.get("value"):
                    raise Reply(400, f"test operation failed at {op['path']}")
            elif kind in ("add", "replace"):
                if isinstance(parent, list):
                    index = len(parent) if last == "-" else int(last)
                    if kind == "add":
                        parent.insert(index, op.get("value"))
                    else:
                        parent[index] = op.get("value")
                else:
                    if kind == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = op.get("value")
            elif kind == "remove":
                if isinstance(parent, list):
                    del parent[int(last)]
                else:
                    del parent[last]
            else:
                raise Reply(400, f"unsupported patch operation {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise Reply(400, f"patch path {op['path']} does not exist") from None
    return out
