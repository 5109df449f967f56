#!/usr/bin/python3
"""A FAKE of flightctl-agent, doing what a suite can see: it runs in the Debian test guest.

The real agent needs a bootc CentOS image; the project's test guest is Debian, so this stand-in
plays its visible part, as upstream's agent does it (internal/agent): a `Type=notify` unit
(`UNIT` below) that reports READY=1 only once its EnrollmentRequest is approved; on first start
an ECDSA P-256 key and CSR made with the `openssl` CLI; the device name derived from the public
key like internal/agent/identity (lower-case base32hex, no padding, of sha256(X||Y) with Go's
big-int Bytes()); the banner /etc/issue.d/flightctl-banner.issue and the journal line with
`<enrollment-ui-endpoint>/enroll/<name>` (`/manage/<name>` once enrolled); the EnrollmentRequest
sent with the enrollment certificate from /etc/flightctl/config.yaml; then the rendered spec
long-polled and the status pushed with the issued certificate. A new `spec.os.image` walks the
Updating reasons Preparing, ReadyToUpdate, ApplyingUpdate (with `skopeo inspect --raw`), Rebooting,
records the pending version and reboots; after the boot it reports Updated. A failed inspect (or
no skopeo) reports Updating False, reason Error, and keeps the old rendered version (OutOfDate).

Stdlib-only Python 3.11 plus the `openssl` CLI: the guest has python3 for cloud-init, nothing more.
FLIGHTCTL_STANDIN_ROOT (default "/") roots every file path, for running it on a host in tests;
with a root other than "/" a reboot ends the process (exit 0) instead of running `systemctl reboot`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

UNIT = """\
# flightctl-agent stand-in: a test FAKE of flightctl-agent (tests/support/standin_agent.py).
# Type=notify like the real unit: READY=1 once its EnrollmentRequest is approved.
# Wiring: started by flightctl-agent.path as soon as cloud-init has written the config, not
# WantedBy=multi-user.target like the real unit. The real unit holds multi-user.target (and so
# cloud-final and the device's readiness) until it is enrolled: every test guest whose agent config
# points at no service would wait out the 90 s start timeout on each boot. The path unit is ordered
# before multi-user.target, the service it starts is not, so no boot waits for an enrollment.
# (After=cloud-final.service with WantedBy=multi-user.target is an ordering cycle systemd drops.)
# Nice=10: on a 1-vCPU TCG guest its Python start and key generation yield to cloud-init.
# Nothing is made at image build: key, CSR and device name come on the first start, so a clone
# of a guest taken before that start gets its own identity (`systemctl start flightctl-agent`).
[Unit]
Description=flightctl agent stand-in (a test fake of flightctl-agent)
ConditionPathExists=/etc/flightctl/config.yaml
StartLimitIntervalSec=5
StartLimitBurst=1000

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/python3 /usr/local/libexec/flightctl-standin-agent
Restart=always
RestartSec=5
Nice=10
"""
PATH_UNIT = """\
# Starts the flightctl-agent stand-in once cloud-init has written its config (see the service's
# comment for why it is not WantedBy=multi-user.target). To keep the agent from starting (e.g.
# before a snapshot), stop this unit first: a stopped service restarts while this unit runs.
[Unit]
Description=Start the flightctl agent stand-in once /etc/flightctl/config.yaml exists

[Path]
PathExists=/etc/flightctl/config.yaml
Unit=flightctl-agent.service

[Install]
WantedBy=multi-user.target
"""
UNIT_NAME = "flightctl-agent.service"
PATH_UNIT_NAME = "flightctl-agent.path"
SCRIPT_PATH = "/usr/local/libexec/flightctl-standin-agent"
AGENT_VERSION = "v1.3.0-standin"
API_VERSION = "flightctl.io/v1beta1"
RENDERED_VERSION = "device-controller/renderedVersion"

ROOT = Path(os.environ.get("FLIGHTCTL_STANDIN_ROOT", "/"))
CONFIG = ROOT / "etc/flightctl/config.yaml"
CERTS = ROOT / "var/lib/flightctl/certs"
KEY = CERTS / "agent.key"
CSR = CERTS / "agent.csr"
CERT = CERTS / "agent.crt"
STATE = ROOT / "var/lib/flightctl/standin-state.json"
BANNER = ROOT / "etc/issue.d/flightctl-banner.issue"


def log(message: str) -> None:
    """stdout goes to the journal under systemd; never a key or certificate."""
    print(message, flush=True)


# --- config -------------------------------------------------------------------------------------


def parse_yaml(text: str) -> dict[str, Any]:
    """The block-mapping YAML subset agent configs use (nested maps, one-line scalars, lists)."""
    root: dict[str, Any] = {}
    stack: list[tuple[int, Any]] = [(-1, root)]
    last_key: tuple[dict[str, Any], str] | None = None
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#") or raw.strip() in ("---", "..."):
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        while len(stack) > 1 and indent <= stack[-1][0] and not (line.startswith("- ") and indent == stack[-1][0]
                                                                     and isinstance(stack[-1][1], list)):
            stack.pop()
        if line.startswith("- ") or line == "-":
            container = stack[-1][1]
            if not isinstance(container, list) and last_key is not None:
                parent, key = last_key
                container = parent[key] = []
                stack.append((indent, container))
            if isinstance(container, list):
                container.append(_scalar(line[1:].strip()))
            continue
        key, _, value = line.partition(":")
        key = _scalar(key.strip())
        value = value.strip()
        parent = stack[-1][1]
        if not isinstance(parent, dict):
            continue
        if value:
            parent[key] = _scalar(value)
        else:
            parent[key] = {}
            stack.append((indent, parent[key]))
            last_key = (parent, key)
    return root


def _scalar(value: str) -> Any:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if value.startswith("[") and value.endswith("]"):
        return [_scalar(v.strip()) for v in value[1:-1].split(",") if v.strip()]
    return value


def duration(value: Any, default: float) -> float:
    """Go durations as agent configs write them: 0m2s, 30s, 1m."""
    if not isinstance(value, str) or not value:
        return default
    total, found = 0.0, False
    for number, unit in re.findall(r"([0-9.]+)(ms|h|m|s)", value):
        total += float(number) * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit]
        found = True
    return total if found else default


class Config:
    def __init__(self, doc: dict[str, Any]) -> None:
        service = doc["enrollment-service"]
        self.server = str(service["service"]["server"]).rstrip("/")
        self.ca_pem = base64.b64decode(service["service"]["certificate-authority-data"])
        self.cert_pem = base64.b64decode(service["authentication"]["client-certificate-data"])
        self.key_pem = base64.b64decode(service["authentication"]["client-key-data"])
        self.ui = str(service.get("enrollment-ui-endpoint") or "").rstrip("/")
        self.fetch_interval = duration(doc.get("spec-fetch-interval"), 60.0)
        self.status_interval = duration(doc.get("status-update-interval"), 60.0)


# --- identity -----------------------------------------------------------------------------------


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, check=True, capture_output=True).stdout


def device_name(key_path: Path) -> str:
    """internal/agent/identity: base32hex(sha256(X.Bytes() || Y.Bytes())), lower case, no padding."""
    der = openssl("ec", "-in", str(key_path), "-pubout", "-outform", "DER")
    point = der[-65:]  # a P-256 SubjectPublicKeyInfo ends with the uncompressed point 04 || X || Y
    if point[0] != 4:
        raise ValueError("agent key is not an uncompressed P-256 point")
    x, y = point[1:33].lstrip(b"\0"), point[33:65].lstrip(b"\0")  # Go's big.Int.Bytes() drops zeros
    digest = hashlib.sha256(x + y).digest()
    return base64.b32hexencode(digest).decode("ascii").rstrip("=").lower()


def ensure_identity() -> str:
    CERTS.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not KEY.exists():
        # written aside and renamed, as the real agent's key file appears: whole or not at all (a reader,
        # or this agent restarted after a kill, never sees an empty key)
        partial = KEY.with_name(KEY.name + ".tmp")
        partial.unlink(missing_ok=True)
        openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(partial))
        partial.chmod(0o600)
        os.replace(partial, KEY)
        CSR.unlink(missing_ok=True)
    name = device_name(KEY)
    if not CSR.exists():
        openssl("req", "-new", "-key", str(KEY), "-subj", f"/CN={name}", "-out", str(CSR))
    return name


def write_banner(config: Config, name: str, enrolled: bool) -> None:
    write_banner_to(config.ui, name, enrolled)


def write_banner_to(ui: str, name: str, enrolled: bool) -> None:
    if not ui:
        log("Flightctl enrollment UI endpoint is missing, skipping banner")
        return
    if enrolled:
        url = f"{ui}/manage/{name}"
        text = ("\nYour device is enrolled to flightctl,\nyou can manage your device scanning the above QR. "
                f"or following this URL:\n{url}\n\n")
    else:
        url = f"{ui}/enroll/{name}"
        text = f"\nEnroll your device to flightctl by scanning\nthe above QR code or following this URL:\n{url}\n\n"
    BANNER.parent.mkdir(parents=True, exist_ok=True)
    tmp = BANNER.with_name(BANNER.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(BANNER)
    if os.environ.get("FLIGHTCTL_DISABLE_CONSOLE_BANNER") != "true":
        log(text.strip())


def notify(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode("utf-8"))


# --- HTTP ---------------------------------------------------------------------------------------


class Api:
    def __init__(self, config: Config, cert: bytes, key: bytes, workdir: Path) -> None:
        self.base = config.server + "/api/v1"
        ctx = ssl.create_default_context(cadata=config.ca_pem.decode("ascii"))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        cert_file, key_file = workdir / "client.crt", workdir / "client.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key)
        cert_file.write_bytes(cert)
        ctx.load_cert_chain(str(cert_file), str(key_file))
        key_file.unlink()
        self.opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with self.opener.open(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                return err.code, json.loads(raw) if raw else None
            except ValueError:
                return err.code, None


# --- status -------------------------------------------------------------------------------------


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def load_state() -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(STATE.read_text())
        return state
    except (OSError, ValueError):
        return {}


def save_state(state: dict[str, Any]) -> None:
    STATE.parent.mkdir(parents=True, exist_ok=True)
    tmp = STATE.with_name(STATE.name + ".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(STATE)


class Agent:
    def __init__(self, config: Config, name: str, workdir: Path) -> None:
        self.config = config
        self.name = name
        self.workdir = workdir
        self.state = load_state()
        self.state.setdefault("renderedVersion", "")
        self.state.setdefault("image", "")
        self.condition = {"type": "Updating", "status": "False", "reason": "Updated", "message": "",
                          "lastTransitionTime": now_iso()}
        self.api: Api | None = None

    # enrollment

    def enroll(self) -> None:
        if CERT.exists():
            return
        api = Api(self.config, self.config.cert_pem, self.config.key_pem, self.workdir)
        er = {"apiVersion": API_VERSION, "kind": "EnrollmentRequest", "metadata": {"name": self.name},
              "spec": {"csr": CSR.read_text(), "labels": {}, "deviceStatus": self.status()}}
        poll = min(self.config.fetch_interval, 5.0)
        while True:
            try:
                code, body = api.call("POST", "/enrollmentrequests", er)
                if code in (201, 409):
                    break
                log(f"creating enrollment request failed: HTTP {code}: {(body or {}).get('message', '')}")
            except (OSError, urllib.error.URLError) as exc:
                log(f"cannot reach the enrollment service {self.config.server}: {exc}")
            time.sleep(poll)
        while True:
            try:
                code, body = api.call("GET", f"/enrollmentrequests/{self.name}")
                certificate = ((body or {}).get("status") or {}).get("certificate") if code == 200 else None
                if certificate:
                    CERT.write_text(certificate)
                    log(f"enrollment request {self.name} approved")
                    return
            except (OSError, urllib.error.URLError) as exc:
                log(f"cannot reach the enrollment service {self.config.server}: {exc}")
            time.sleep(poll)

    # status

    def status(self) -> dict[str, Any]:
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        return {
            "conditions": [dict(self.condition)],
            "systemInfo": {"architecture": arch, "bootID": boot_id(), "operatingSystem": "linux",
                           "agentVersion": AGENT_VERSION},
            "applications": [], "applicationsSummary": {"status": "NoApplications"},
            "resources": {"cpu": "Healthy", "disk": "Healthy", "memory": "Healthy"},
            "integrity": {"status": "Unsupported"},
            "config": {"renderedVersion": self.state["renderedVersion"]},
            "os": {"image": self.state["image"], "imageDigest": self.state.get("imageDigest", "")},
            "updated": {"status": "Unknown"}, "summary": {"status": "Unknown"},
            "lifecycle": {"status": "Enrolled"},
        }

    def report(self, status: str, reason: str, message: str) -> None:
        self.condition = {"type": "Updating", "status": status, "reason": reason, "message": message,
                          "lastTransitionTime": now_iso()}
        self.push()

    def push(self) -> None:
        assert self.api is not None
        body = {"apiVersion": API_VERSION, "kind": "Device", "metadata": {"name": self.name},
                "status": self.status()}
        try:  # after a reboot the service may be unreachable for a while: the loop pushes again
            code, answer = self.api.call("PUT", f"/devices/{self.name}/status", body)
        except (OSError, urllib.error.URLError) as exc:
            log(f"cannot reach the management service {self.config.server}: {exc}")
            return
        if code != 200:
            log(f"status update failed: HTTP {code}: {(answer or {}).get('message', '')}")

    # updates

    def apply(self, device: dict[str, Any]) -> None:
        version = device["metadata"]["annotations"][RENDERED_VERSION]
        image = ((device.get("spec") or {}).get("os") or {}).get("image") or ""
        if not image or image == self.state["image"]:
            self.updated(version)
            return
        self.report("True", "Preparing", f"Device is preparing an update to renderedVersion: {version}")
        self.report("True", "ReadyToUpdate", f"Device is ready to apply update to renderedVersion: {version}")
        self.report("True", "ApplyingUpdate", f"Device is applying renderedVersion: {version}")
        error = inspect(image)
        if error:
            self.state["failedVersion"] = version
            save_state(self.state)
            self.report("False", "Error", f"Failed to update to renderedVersion: {version}: {error}")
            log(f"update to renderedVersion {version} failed: {error}")
            return
        self.state["pending"] = {"renderedVersion": version, "image": image}
        save_state(self.state)
        self.report("True", "Rebooting", f"Device is rebooting into os image: {image}")
        reboot()

    def updated(self, version: str) -> None:
        self.state["renderedVersion"] = version
        save_state(self.state)
        self.report("False", "Updated", f"Updated to desired renderedVersion: {version}")

    def after_boot(self) -> None:
        pending = self.state.pop("pending", None)
        if pending:
            self.state["image"] = pending["image"]
            self.state["imageDigest"] = ""
            log(f"booted into {pending['image']}")
            self.updated(pending["renderedVersion"])
        else:
            self.push()

    def run(self) -> None:
        api = Api(self.config, CERT.read_bytes(), KEY.read_bytes(), self.workdir)
        self.api = api
        self.after_boot()
        known = self.state["renderedVersion"] or None
        last_push = time.monotonic()
        while True:
            query = f"?knownRenderedVersion={known}" if known else ""
            try:
                code, body = api.call("GET", f"/devices/{self.name}/rendered{query}", timeout=300)
            except (OSError, urllib.error.URLError) as exc:
                log(f"cannot reach the management service {self.config.server}: {exc}")
                time.sleep(self.config.fetch_interval)
                code, body = 0, None
            if code == 200 and body is not None:
                version = body["metadata"]["annotations"][RENDERED_VERSION]
                known = version
                if version != self.state.get("failedVersion"):
                    self.apply(body)
                    last_push = time.monotonic()
            elif code == 404:  # the Device was deleted under a running agent: it enrolls again, same name
                log(f"device {self.name} is gone from the service; enrolling again")
                time.sleep(self.config.fetch_interval)
                CERT.unlink(missing_ok=True)
                write_banner(self.config, self.name, False)
                self.enroll()
                write_banner(self.config, self.name, True)
                api = self.api = Api(self.config, CERT.read_bytes(), KEY.read_bytes(), self.workdir)
                known = None
                continue
            elif code not in (0, 204):
                log(f"fetching the rendered spec failed: HTTP {code}: {(body or {}).get('message', '')}")
                time.sleep(self.config.fetch_interval)
            if time.monotonic() - last_push >= self.config.status_interval:
                self.push()
                last_push = time.monotonic()


def inspect(image: str) -> str:
    """'' when `skopeo inspect --raw` finds the image (through the registry remap), else why not."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        return f"cannot inspect os image {image}: skopeo is not installed"
    try:
        result = subprocess.run([skopeo, "inspect", "--raw", f"docker://{image}"], capture_output=True,
                                text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"inspecting os image {image} timed out"
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        quoted = re.search(r'msg="(.*)"\s*$', detail)  # containers/image logs: time=... level=fatal msg="..."
        detail = quoted.group(1).replace('\\"', '"') if quoted else detail
        return f"os image {image} cannot be inspected: {detail[:400]}"
    return ""


def reboot() -> None:
    if str(ROOT) != "/":
        log("rebooting (stand-in root: exiting instead)")
        sys.exit(0)
    log("rebooting")
    subprocess.run(["systemctl", "reboot"], check=False)
    time.sleep(600)


def guest_files() -> list[tuple[str, bytes, int]]:
    """(guest path, content, mode) that install the stand-in; then `systemctl enable flightctl-agent.path`."""
    return [(SCRIPT_PATH, Path(__file__).read_bytes(), 0o755),
            (f"/etc/systemd/system/{UNIT_NAME}", UNIT.encode("utf-8"), 0o644),
            (f"/etc/systemd/system/{PATH_UNIT_NAME}", PATH_UNIT.encode("utf-8"), 0o644)]


def ui_endpoint(doc: dict[str, Any]) -> str:
    service = doc.get("enrollment-service")
    return str((service or {}).get("enrollment-ui-endpoint") or "").rstrip("/") if isinstance(service, dict) else ""


def read_config() -> tuple[dict[str, Any], Config | None, str]:
    """The parsed document, the Config (None if incomplete) and why not."""
    doc = parse_yaml(CONFIG.read_text())
    try:
        return doc, Config(doc), ""
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        return doc, None, f"{CONFIG} is not a usable agent config ({type(exc).__name__}: {exc})"


def main() -> int:
    while not CONFIG.exists():
        log(f"waiting for {CONFIG}")
        time.sleep(5)
    doc, config, problem = read_config()
    name = ensure_identity()
    enrolled = CERT.exists()
    if config is None:
        # Like the real agent, the banner needs only the UI endpoint; without a service to enroll
        # with it waits (cheaply, no restart loop) for the config to change, then starts over.
        if ui_endpoint(doc):
            write_banner_to(ui_endpoint(doc), name, enrolled)
        log(problem)
        seen = CONFIG.stat().st_mtime_ns
        while CONFIG.exists() and CONFIG.stat().st_mtime_ns == seen:
            time.sleep(5)
        return 1
    write_banner(config, name, enrolled)
    with tempfile.TemporaryDirectory(prefix="standin-", dir=CERTS) as workdir:
        agent = Agent(config, name, Path(workdir))
        agent.enroll()
        if not enrolled:
            write_banner(config, name, True)
        notify("READY=1\nSTATUS=enrolled")
        agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
