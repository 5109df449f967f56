"""A FAKE of the flightctl service for tests: no flightctl server can run on this machine.

It serves, on 127.0.0.1 only, the two listeners upstream runs: the user API (bearer token; a
missing token is a 400 "failed to get auth token", a wrong one a 401) and the agent API (TLS 1.3,
a client certificate signed by its CA: the enrollment certificate, then the `device:<name>`
certificate it issues at approval). It covers what the e2e flows use: version, enrollment requests
(agent create/get, user list/get/delete/approve), devices (list with labelSelector, get, replace
with resourceVersion conflicts, JSON patch, delete, status, rendered long-poll) and computes the
service-side summary/updated status as upstream's service does. Paths, status codes, the Status
body and its messages follow upstream's OpenAPI spec and server code.

It cannot drift from the real schema: every request body it accepts and every response body it
sends is validated with flightctl-client's own pydantic models (generated from upstream's spec),
including a check that no key is unknown to them. A response that fails is an emulator bug: it is
answered 500 and kept in `errors`, which a test asserts empty.
"""

from __future__ import annotations

import base64
import copy
import hmac
import json
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from flightctl.models.device import Device
from flightctl.models.enrollment_request import EnrollmentRequest
from flightctl.models.enrollment_request_approval import EnrollmentRequestApproval
from flightctl.models.patch_request_inner import PatchRequestInner

from tests.support.flightctl_fake.pki import ScratchCA, csr_public_key
from tests.support.flightctl_fake.query import apply_json_patch, field_matcher, label_matcher
from tests.support.flightctl_fake.schema import check_response, validate
from tests.support.flightctl_fake.status import API_VERSION, Reply, now_iso, status_body

RENDERED_VERSION = "device-controller/renderedVersion"
ENROLLMENT_CN = "client-enrollment"
APPROVER = "emulator-admin"
SERVICE_VERSION = "v1.3.0-emulator"
CONFLICT_MESSAGE = "the object has been modified; please apply your changes to the latest version and try again"
HEALTHY = "Device's system resources are healthy."
REBOOTING = "Device is rebooting."
OUT_OF_DATE = "Device has not been updated to the latest device spec"


@dataclass(frozen=True)
class Recorded:
    """One request as the emulator saw it; never the token (only whether it matched)."""

    listener: str  # "user" or "agent"
    method: str
    path: str
    query: dict[str, list[str]]
    status: int
    identity: str  # "token", "no-token", "bad-token", or the client certificate's CN
    body: Any = field(default=None, repr=False)


# --- the emulator ----------------------------------------------------------------------------------


class FlightctlEmulator:
    """The fake service: start(), use `.user_url`/`.agent_url`/`.token`/`.ca_pem`, stop()."""

    def __init__(self, *, token: str | None = None, long_poll_seconds: float = 2.0,
                 ui_endpoint: str | None = None) -> None:
        self.token = token or secrets.token_urlsafe(24)
        self.long_poll_seconds = long_poll_seconds
        self._ui = ui_endpoint
        self._ca = ScratchCA()
        self.ca_pem = self._ca.pem
        self.enrollment_cert_pem, self.enrollment_key_pem = self._ca.keypair(ENROLLMENT_CN)
        self._server_cert, self._server_key = self._ca.keypair("localhost", server=True)
        self._lock = threading.Condition()
        self._devices: dict[str, dict[str, Any]] = {}
        self._ers: dict[str, dict[str, Any]] = {}
        self._rv = 0
        self._fail_replaces: list[int] = []
        self._stopping = False
        self.requests: list[Recorded] = []
        self.errors: list[str] = []
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # --- lifecycle ---

    def start(self) -> FlightctlEmulator:
        self._tmp = tempfile.TemporaryDirectory(prefix="fcemu-")
        cert = Path(self._tmp.name, "server.crt")
        key = Path(self._tmp.name, "server.key")
        ca = Path(self._tmp.name, "ca.crt")
        cert.write_bytes(self._server_cert)
        key.write_bytes(self._server_key)
        ca.write_bytes(self.ca_pem)
        user_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        user_ctx.load_cert_chain(cert, key)
        agent_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        agent_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        agent_ctx.load_cert_chain(cert, key)
        agent_ctx.load_verify_locations(cafile=str(ca))
        agent_ctx.verify_mode = ssl.CERT_REQUIRED
        for listener, ctx in (("user", user_ctx), ("agent", agent_ctx)):
            server = _Server(("127.0.0.1", 0), _Handler, emulator=self, listener=listener, context=ctx)
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                      name=f"fcemu-{listener}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FlightctlEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _port(self, index: int) -> int:
        if len(self._servers) != 2:
            raise RuntimeError("the flightctl emulator is not running; call start() first")
        port: int = self._servers[index].server_address[1]
        return port

    @property
    def user_url(self) -> str:
        return f"https://127.0.0.1:{self._port(0)}"

    @property
    def agent_url(self) -> str:
        return f"https://127.0.0.1:{self._port(1)}"

    @property
    def ui_endpoint(self) -> str:
        return self._ui or self.user_url

    # --- what a test sets up ---

    def agent_config_yaml(self, *, server: str | None = None, extra: dict[str, Any] | None = None) -> bytes:
        """An agent config.yaml like `flightctl certificate request --output embedded` writes."""
        def b64(data: bytes) -> str:
            return base64.b64encode(data).decode("ascii")

        doc: dict[str, Any] = {"enrollment-service": {
            "authentication": {"client-certificate-data": b64(self.enrollment_cert_pem),
                               "client-key-data": b64(self.enrollment_key_pem)},
            "service": {"certificate-authority-data": b64(self.ca_pem), "server": server or self.agent_url},
            "enrollment-ui-endpoint": self.ui_endpoint,
        }}
        doc.update(extra or {})
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1 << 30).encode("utf-8")

    def fail_next_replaces(self, count: int, code: int = 409) -> None:
        """The next `count` PUT /devices/{name} answer `code` (409: upstream's conflict message)."""
        with self._lock:
            self._fail_replaces.extend([code] * count)

    def device(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._devices.get(name)
            return copy.deepcopy(found) if found else None

    def enrollment_request(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._ers.get(name)
            return copy.deepcopy(found) if found else None

    def set_device_status(self, name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Change a device's reported status in place (validated), as if its agent had reported it."""
        with self._lock:
            device = self._devices[name]
            status = copy.deepcopy(device["status"])
            change(status)
            candidate = dict(device, status=status)
            validate(Device, candidate, "set_device_status")
            device["status"] = status
            self._service_side_status(device)
            self._bump(device)
            return copy.deepcopy(device)

    def wait_for_request(self, predicate: Callable[[Recorded], bool], timeout: float = 10.0) -> Recorded:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for item in list(self.requests):
                if predicate(item):
                    return item
            time.sleep(0.05)
        raise AssertionError("no matching request reached the emulator within "
                             f"{timeout} s; seen: {[(r.method, r.path, r.status) for r in self.requests]}")

    # --- store helpers (call with the lock held) ---

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._lock.notify_all()

    def _new_device(self, name: str, labels: dict[str, str], system_info: dict[str, Any] | None,
                    spec: dict[str, Any] | None = None, lifecycle: str = "Enrolled") -> dict[str, Any]:
        """A Device as upstream creates it: NewDeviceStatus() (api/core/v1beta1/constructors.go)."""
        zero = "0001-01-01T00:00:00Z"
        device: dict[str, Any] = {
            "apiVersion": API_VERSION, "kind": "Device",
            "metadata": {"name": name, "labels": dict(labels), "generation": 1, "creationTimestamp": now_iso(),
                         "annotations": {RENDERED_VERSION: "1"}},
            "status": {
                "conditions": [{"type": "Updating", "status": "Unknown", "reason": "", "message": "",
                                "lastTransitionTime": zero}],
                "systemInfo": system_info or {"architecture": "", "bootID": "", "operatingSystem": "",
                                              "agentVersion": ""},
                "applications": [], "applicationsSummary": {"status": "Unknown"},
                "resources": {"cpu": "Unknown", "disk": "Unknown", "memory": "Unknown"},
                "integrity": {"status": "Unknown"}, "config": {"renderedVersion": ""},
                "os": {"image": "", "imageDigest": ""}, "updated": {"status": "Unknown"},
                "summary": {"status": "Unknown"}, "lifecycle": {"status": lifecycle},
            },
        }
        if spec is not None:
            device["spec"] = copy.deepcopy(spec)
        self._bump(device)
        return device

    @staticmethod
    def _condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
        return next((c for c in status.get("conditions") or [] if c.get("type") == kind), None)

    def _service_side_status(self, device: dict[str, Any]) -> None:
        """What upstream's UpdateServiceSideStatus derives from the agent's report (no fleets)."""
        status = device["status"]
        if not status.get("lastSeen"):
            return  # never seen: summary and updated stay Unknown, as upstream leaves them
        updating = self._condition(status, "Updating")
        resources = status.get("resources") or {}
        if updating and updating["status"] == "True" and updating.get("reason") == "Rebooting":
            status["summary"] = {"status": "Rebooting", "info": REBOOTING}
        elif "Critical" in resources.values():
            status["summary"] = {"status": "Error", "info": "resources are critical"}
        elif "Warning" in resources.values():
            status["summary"] = {"status": "Degraded", "info": "resources are degraded"}
        else:
            status["summary"] = {"status": "Online", "info": HEALTHY}
        wanted = device["metadata"]["annotations"][RENDERED_VERSION]
        if updating and updating["status"] == "True":
            status["updated"] = {"status": "Updating",
                                 "info": updating.get("message") or "Device is updating to the latest device spec."}
        elif status["config"].get("renderedVersion") != wanted:
            info = OUT_OF_DATE + "."
            if updating and updating.get("reason") == "Error" and updating.get("message"):
                info = f"{OUT_OF_DATE}: {updating['message']}"
            status["updated"] = {"status": "OutOfDate", "info": info}
        else:
            status["updated"] = {"status": "UpToDate", "info": "Device was updated to the latest device spec."}

    @staticmethod
    def _rendered(device: dict[str, Any]) -> dict[str, Any]:
        meta = device["metadata"]
        body: dict[str, Any] = {"apiVersion": API_VERSION, "kind": "Device",
                                "metadata": {"name": meta["name"],
                                             "annotations": {RENDERED_VERSION: meta["annotations"][RENDERED_VERSION]}}}
        if device.get("spec") is not None:
            body["spec"] = copy.deepcopy(device["spec"])
        return body

    # --- request handling (the dispatcher) ---

    def handle(self, listener: str, method: str, path: str, query: dict[str, list[str]], identity: str,
               body: Any) -> tuple[int, Any]:
        """Answer one authenticated request: (HTTP status, JSON body or None)."""
        parts = [unquote(p) for p in path.split("/") if p]
        if parts[:2] != ["api", "v1"]:
            raise Reply(404, f"path {path} not found")
        route = parts[2:]
        if listener == "agent":
            return self._agent(method, route, query, identity, body)
        return self._user(method, route, query, body)

    def _agent(self, method: str, route: list[str], query: dict[str, list[str]], identity: str,
               body: Any) -> tuple[int, Any]:
        enrolling = not identity.startswith("device:")
        if route[:1] == ["enrollmentrequests"]:
            if not enrolling:
                raise Reply(401, "Unauthorized")
            if method == "POST" and len(route) == 1:
                return self._create_er(body)
            if method == "GET" and len(route) == 2:
                return self._get_er(route[1])
        elif route[:1] == ["devices"] and len(route) == 3:
            if enrolling or identity != f"device:{route[1]}":
                raise Reply(401, "Unauthorized")
            if method == "GET" and route[2] == "rendered":
                return self._get_rendered(route[1], query)
            if method == "PUT" and route[2] == "status":
                return self._replace_status(route[1], body, agent=True)
        raise Reply(404, "route not served by the agent API")

    def _user(self, method: str, route: list[str], query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        match (method, route):
            case ("GET", ["version"]):
                return 200, {"version": SERVICE_VERSION}
            case ("GET", ["enrollmentrequests"]):
                return 200, self._list("EnrollmentRequestList", self._ers, query)
            case ("GET", ["enrollmentrequests", name]):
                return self._get_er(name)
            case ("DELETE", ["enrollmentrequests", name]):
                return self._delete_er(name)
            case ("PUT", ["enrollmentrequests", name, "approval"]):
                return self._approve(name, body)
            case ("GET", ["devices"]):
                return 200, self._list("DeviceList", self._devices, query)
            case ("GET", ["devices", name]):
                return 200, self._get_device(name)
            case ("GET", ["devices", name, "status"]):
                return 200, self._get_device(name)
            case ("PUT", ["devices", name]):
                return self._replace_device(name, body)
            case ("PATCH", ["devices", name]):
                return self._patch_device(name, body)
            case ("DELETE", ["devices", name]):
                return self._delete_device(name)
            case ("PUT", ["devices", name, "status"]):
                return self._replace_status(name, body, agent=False)
            case ("GET", ["devices", name, "rendered"]):
                return self._get_rendered(name, query)
        raise Reply(404, "route not served by the emulator")

    # --- handlers ---

    def _list(self, kind: str, store: dict[str, dict[str, Any]], query: dict[str, list[str]]) -> dict[str, Any]:
        selector = (query.get("labelSelector") or [""])[0]
        matches = label_matcher(selector) if selector else (lambda _labels: True)
        names = field_matcher((query.get("fieldSelector") or [""])[0])
        with self._lock:
            items = [_public(o) for _, o in sorted(store.items())
                     if matches(o["metadata"].get("labels") or {}) and names(o["metadata"]["name"])]
        return {"apiVersion": API_VERSION, "kind": kind, "metadata": {}, "items": items}

    def _get_er(self, name: str) -> tuple[int, Any]:
        with self._lock:
            if name not in self._ers:
                raise Reply(404, f'EnrollmentRequest of name "{name}" not found')
            return 200, copy.deepcopy(self._ers[name])

    def _create_er(self, body: Any) -> tuple[int, Any]:
        validate(EnrollmentRequest, body, "EnrollmentRequest")
        name = (body.get("metadata") or {}).get("name")
        if not name:
            raise Reply(400, "metadata.name: Required value")
        csr_public_key(name, body["spec"]["csr"])
        with self._lock:
            if name in self._ers:
                raise Reply(409, "a resource with this name already exists")
            er = {"apiVersion": API_VERSION, "kind": "EnrollmentRequest",
                  "metadata": {"name": name, "creationTimestamp": now_iso(), "generation": 1},
                  "spec": copy.deepcopy(body["spec"]), "status": {"conditions": []}}
            self._ers[name] = er
            self._bump(er)
            return 201, copy.deepcopy(er)

    def _approve(self, name: str, body: Any) -> tuple[int, Any]:
        validate(EnrollmentRequestApproval, body, "EnrollmentRequestApproval")
        with self._lock:
            er = self._ers.get(name)
            if er is None:
                raise Reply(404, f'EnrollmentRequest of name "{name}" not found')
            approved = any(c["type"] == "Approved" and c["status"] == "True" for c in er["status"]["conditions"])
            if not body["approved"]:
                if er["status"].get("approval") is None:
                    raise Reply(400, "the emulator does not emulate denying an enrollment request")
                return 200, copy.deepcopy(er["status"]["approval"])
            if approved:
                raise Reply(400, "Enrollment request is already approved")
            if name in self._devices:
                raise Reply(500, f"error creating device from enrollment request: device {name} already exists "
                             "and cannot be overwritten during enrollment request approval")
            labels = dict(body.get("labels") or {})
            if not body.get("replaceLabels"):
                for key, value in (er["spec"].get("labels") or {}).items():
                    labels.setdefault(key, value)
            approval = {"approved": True, "labels": labels, "approvedBy": APPROVER, "approvedAt": now_iso()}
            if body.get("replaceLabels") is not None:
                approval["replaceLabels"] = body["replaceLabels"]
            key = csr_public_key(name, er["spec"]["csr"])
            er["status"]["certificate"] = self._ca.issue(f"device:{name}", key).decode("ascii")
            er["status"]["approval"] = approval
            er["status"]["conditions"].append({"type": "Approved", "status": "True", "reason": "ManuallyApproved",
                                               "message": f"Approved by {APPROVER}",
                                               "lastTransitionTime": now_iso()})
            self._bump(er)
            system_info = (er["spec"].get("deviceStatus") or {}).get("systemInfo")
            self._devices[name] = self._new_device(name, labels, system_info)
            return 200, copy.deepcopy(approval)

    def _delete_er(self, name: str) -> tuple[int, Any]:
        with self._lock:
            if name in self._devices:
                raise Reply(409, f'cannot delete ER "{name}": device exists')
            if self._ers.pop(name, None) is None:
                raise Reply(404, f'EnrollmentRequest of name "{name}" not found')
            return 200, status_body(200, "")

    def _get_device(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self._devices:
                raise Reply(404, f'Device of name "{name}" not found')
            return _public(self._devices[name])

    def _replace_device(self, name: str, body: Any) -> tuple[int, Any]:
        validate(Device, body, "Device")
        if (body.get("metadata") or {}).get("name") != name:
            raise Reply(400, "resource name specified in metadata does not match name in path")
        with self._lock:
            if self._fail_replaces:
                code = self._fail_replaces.pop(0)
                raise Reply(code, CONFLICT_MESSAGE if code == 409 else "injected failure")
            current = self._devices.get(name)
            if current is None:
                device = self._new_device(name, body["metadata"].get("labels") or {}, None,
                                          body.get("spec"), lifecycle="Unknown")
                self._devices[name] = device
                return 201, _public(device)
            incoming_rv = body["metadata"].get("resourceVersion")
            if incoming_rv is not None and incoming_rv != current["metadata"].get("resourceVersion"):
                raise Reply(409, CONFLICT_MESSAGE)
            self._set_spec(current, body.get("spec"))
            if body["metadata"].get("labels") is not None:
                current["metadata"]["labels"] = dict(body["metadata"]["labels"])
            self._service_side_status(current)
            self._bump(current)
            return 200, _public(current)

    def _set_spec(self, device: dict[str, Any], spec: Any) -> None:
        if spec is None or spec == device.get("spec"):
            return
        device["spec"] = copy.deepcopy(spec)
        meta = device["metadata"]
        meta["generation"] = int(meta.get("generation") or 0) + 1
        meta["annotations"][RENDERED_VERSION] = str(int(meta["annotations"][RENDERED_VERSION]) + 1)

    def _patch_device(self, name: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, list):
            raise Reply(400, "a JSON patch is a list of operations")
        for op in body:
            validate(PatchRequestInner, op, "PatchRequest")
        with self._lock:
            current = self._devices.get(name)
            if current is None:
                raise Reply(404, f'Device of name "{name}" not found')
            patched = apply_json_patch(current, body)
            validate(Device, patched, "patched Device")
            self._set_spec(current, patched.get("spec"))
            current["metadata"]["labels"] = patched["metadata"].get("labels") or {}
            self._service_side_status(current)
            self._bump(current)
            return 200, _public(current)

    def _delete_device(self, name: str) -> tuple[int, Any]:
        with self._lock:
            if self._devices.pop(name, None) is None:
                raise Reply(404, f'Device of name "{name}" not found')
            self._lock.notify_all()
            return 200, status_body(200, "")

    def _replace_status(self, name: str, body: Any, *, agent: bool) -> tuple[int, Any]:
        validate(Device, body, "Device")
        if body.get("status") is None:
            raise Reply(400, "status: Required value")
        with self._lock:
            current = self._devices.get(name)
            if current is None:
                raise Reply(404, f'Device of name "{name}" not found')
            status = copy.deepcopy(body["status"])
            if agent:
                status["lastSeen"] = now_iso()
                status["lifecycle"] = current["status"].get("lifecycle") or status.get("lifecycle")
            current["status"] = status
            self._service_side_status(current)
            self._bump(current)
            return 200, _public(current)

    def _get_rendered(self, name: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        known = next(iter(query.get("knownRenderedVersion") or []), None)
        deadline = time.monotonic() + self.long_poll_seconds
        with self._lock:
            while True:
                device = self._devices.get(name)
                if device is None:
                    raise Reply(404, f'Device of name "{name}" not found')
                version = device["metadata"]["annotations"][RENDERED_VERSION]
                if known is None or known != version:
                    return 200, self._rendered(device)
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return 204, None
                self._lock.wait(left)


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy as the API returns it: status.lastSeen is kept by the service but "not returned by the
    API" (upstream's spec); upstream serves it at /devices/{name}/lastseen instead."""
    out = copy.deepcopy(obj)
    if isinstance(out.get("status"), dict):
        out["status"].pop("lastSeen", None)
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 emulator: FlightctlEmulator, listener: str, context: ssl.SSLContext) -> None:
        self.emulator = emulator
        self.listener = listener
        self.context = context
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # TLS handshakes a test makes fail on purpose (no client cert) are not errors


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        # TLS in the connection's own thread, so a client that never finishes a handshake blocks nobody.
        self.request.settimeout(30)
        self.request = self.server.context.wrap_socket(self.request, server_side=True)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _identity(self) -> str:
        if self.server.listener == "agent":
            cert = self.connection.getpeercert() or {}
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
            return ""
        header = self.headers.get("Authorization") or ""
        if not header.startswith("Bearer ") or not header[7:].strip():
            return "no-token"
        given = header[7:].strip().encode()
        return "token" if hmac.compare_digest(given, self.server.emulator.token.encode()) else "bad-token"

    def _serve(self) -> None:
        emulator = self.server.emulator
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        identity = self._identity()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        code: int
        answer: Any
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise Reply(400, "request body is not JSON") from None
            if identity == "no-token":
                raise Reply(400, "failed to get auth token")
            if identity == "bad-token":
                raise Reply(401, "failed to validate token")
            code, answer = emulator.handle(self.server.listener, self.command, split.path, query, identity, body)
        except Reply as reply:
            code, answer = reply.code, status_body(reply.code, reply.message)
        except Exception as exc:  # an emulator bug: answer 500 and let the test see it
            emulator.errors.append(f"{self.command} {split.path}: {type(exc).__name__}: {exc}")
            code, answer = 500, status_body(500, f"emulator error: {type(exc).__name__}")
        if answer is not None:
            try:
                check_response(answer)
            except ValueError as exc:
                emulator.errors.append(f"{self.command} {split.path}: invalid response: {exc}")
                code, answer = 500, status_body(500, "emulator produced an invalid response")
        emulator.requests.append(Recorded(self.server.listener, self.command, split.path, query, code,
                                          identity, body))
        data = b"" if answer is None else json.dumps(answer).encode("utf-8")
        self.send_response(code)
        if answer is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = _serve


# --- clients for tests -------------------------------------------------------------------------------


def user_client(emulator: FlightctlEmulator, ca_file: Path, *, token: str | None = None) -> Any:
    """flightctl-client's ApiClient against the user API: host + /api/v1, a default Bearer header.

    `token=""` sends no Authorization header at all. The generated calls declare no auth, so
    Configuration.access_token would be ignored; the header is the way the real client is used.
    """
    from flightctl.api_client import ApiClient
    from flightctl.configuration import Configuration

    ca_file.write_bytes(emulator.ca_pem)
    config = Configuration(host=emulator.user_url + "/api/v1")
    config.ssl_ca_cert = str(ca_file)
    value = emulator.token if token is None else token
    if not value:
        return ApiClient(config)
    return ApiClient(config, header_name="Authorization", header_value=f"Bearer {value}")


def agent_request(emulator: FlightctlEmulator, method: str, path: str, body: Any = None, *,
                  cert_pem: bytes | None, key_pem: bytes | None, timeout: float = 30,
                  tls_max: ssl.TLSVersion | None = None) -> tuple[int, Any]:
    """One request to the agent API with a client certificate (None: none), like an agent makes."""
    import http.client

    ctx = ssl.create_default_context(cadata=emulator.ca_pem.decode("ascii"))
    if tls_max is not None:
        ctx.maximum_version = tls_max
    with tempfile.TemporaryDirectory(prefix="fcemu-client-") as tmp:
        if cert_pem is not None and key_pem is not None:
            Path(tmp, "c.pem").write_bytes(cert_pem)
            Path(tmp, "k.pem").write_bytes(key_pem)
            ctx.load_cert_chain(Path(tmp, "c.pem"), Path(tmp, "k.pem"))
        port = int(emulator.agent_url.rsplit(":", 1)[1])
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode("utf-8")
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
        finally:
            conn.close()


