"""A private container registry on 127.0.0.1, one process per cache directory, shared by sessions.

The CNCF distribution registry (Debian `docker-registry`, Fedora `docker-distribution`) with a
config of our own: loopback only, filesystem storage under the caller's directory, no auth,
delete enabled. xdist workers and concurrent runs share it: each session holds a lease (a file
named by its Owner token) and the registry runs under a tiny supervisor
(`python -m pytest_flightctl_device.images.registry supervise DIR`) that polls the leases every
half second and stops the registry when no live one remains. The registry dies with its
supervisor (PR_SET_PDEATHSIG), and the supervisor outlives no session, so a run killed with
kill -9 leaves no registry behind.

Layout of DIR: `data/` (the registry's storage), `config.json`, `state.json` (address and
processes of the running instance), `leases/`, `lock`, `registry.log`, `supervisor.log`.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from filelock import FileLock

from pytest_flightctl_device.core.atomic import write_atomic
from pytest_flightctl_device.core.liveness import Owner, start_ticks
from pytest_flightctl_device.errors import DeviceError, MissingToolError

BINARIES = ("docker-registry", "registry")  # Debian's name, then Fedora's (docker-distribution)
POLL_S = 0.5
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
LOG_MAX_BYTES = 1 << 20


class RegistryError(DeviceError):
    """The private registry could not start, or a registry refused or broke a push."""


def find_binary() -> str:
    """The distribution registry's executable, or MissingToolError naming the package."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    raise MissingToolError("the container registry is not installed (no docker-registry on PATH); install "
                           "Debian's docker-registry package or Fedora's docker-distribution (scripts/setup "
                           "does it without starting its system service).")


# -- files under DIR ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def leases(self) -> Path:
        return self.root / "leases"

    @property
    def lock(self) -> FileLock:
        return FileLock(str(self.root / "lock"))

    @property
    def registry_log(self) -> Path:
        return self.root / "registry.log"

    @property
    def supervisor_log(self) -> Path:
        return self.root / "supervisor.log"


@dataclass(frozen=True)
class State:
    """What state.json says about the running instance."""

    address: str
    supervisor: Owner
    registry: Owner

    def to_json(self) -> str:
        return json.dumps({"address": self.address, "supervisor": self.supervisor.token,
                           "registry": self.registry.token}) + "\n"

    @classmethod
    def read(cls, path: Path) -> State | None:
        try:
            raw = json.loads(path.read_text())
            supervisor = Owner.from_token(str(raw["supervisor"]))
            registry = Owner.from_token(str(raw["registry"]))
            address = str(raw["address"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if supervisor is None or registry is None:
            return None
        return cls(address, supervisor, registry)


def config_for(layout: Layout, port: int, *, access_log: bool) -> dict[str, object]:
    """The registry's whole config (JSON is YAML): loopback, our storage, no auth, quiet logs."""
    return {
        "version": "0.1",
        "log": {"level": "error", "formatter": "text", "accesslog": {"disabled": not access_log}},
        "storage": {"filesystem": {"rootdirectory": str(layout.data)}, "delete": {"enabled": True},
                    "cache": {"blobdescriptor": "inmemory"}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                 "headers": {"X-Content-Type-Options": ["nosniff"]}},
    }


def live_leases(layout: Layout, *, prune: bool = False) -> list[Path]:
    """Lease files whose session still runs; with `prune`, remove the others."""
    alive = []
    with contextlib.suppress(FileNotFoundError):
        for entry in layout.leases.iterdir():
            owner = Owner.from_token(entry.name.split(".", 1)[0])
            if owner is not None and owner.alive():
                alive.append(entry)
            elif prune:
                with contextlib.suppress(OSError):
                    entry.unlink()
    return alive


def answers(address: str, timeout: float = 2.0) -> bool:
    """True when a distribution registry answers `GET /v2/` with 200 at `address` (no proxies)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", "/v2/")
        response = conn.getresponse()
        response.read()
        return response.status == 200 and response.getheader("Docker-Distribution-Api-Version") == "registry/2.0"
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _free_port(preferred: int | None = None) -> int:
    for port in ((preferred,) if preferred else ()) + (0,):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise RegistryError("no free TCP port on 127.0.0.1 for the private registry; free one and run again.")


# -- the session side ---------------------------------------------------------------------------


@dataclass
class PrivateRegistry:
    """A session's lease on the shared private registry; release() (or the session's death) ends it."""

    layout: Layout
    address: str
    lease: Path
    supervisor: Owner
    registry: Owner

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def key(self) -> str:
        """A name for this registry that survives restarts on another port: its storage."""
        return f"private:{self.layout.data}"

    def release(self) -> None:
        """Drop this session's lease; the supervisor stops the registry within ~0.5 s if it was the last."""
        self.lease.unlink(missing_ok=True)

    def __enter__(self) -> PrivateRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def acquire(directory: Path, *, timeout: float = 60.0, access_log: bool = False) -> PrivateRegistry:
    """Lease the registry of `directory`, starting it (under its supervisor) if none runs.

    `access_log` only takes effect when this call starts the instance.
    """
    find_binary()
    layout = Layout(directory)
    layout.leases.mkdir(parents=True, exist_ok=True)
    lease = layout.leases / f"{Owner.current().token}.{secrets.token_hex(4)}"
    with layout.lock.acquire(timeout=timeout):
        lease.touch()
        try:
            state = _running(layout)
            if state is None:
                state = _start_supervisor(layout, timeout=timeout, access_log=access_log)
        except BaseException:
            lease.unlink(missing_ok=True)
            raise
    return PrivateRegistry(layout, state.address, lease, state.supervisor, state.registry)


def _running(layout: Layout) -> State | None:
    """The live instance, or None; waits out a supervisor that is winding down on its own."""
    state = State.read(layout.state)
    if state is None or not state.supervisor.alive():
        return None
    if state.registry.alive() and answers(state.address):
        return state
    # Its registry died: the supervisor restarts it on the same port or gives up and exits.
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and state.supervisor.alive():
        fresh = State.read(layout.state)
        if fresh is not None and fresh.registry.alive() and answers(fresh.address):
            return fresh
        time.sleep(0.1)
    if state.supervisor.alive():
        raise RegistryError(f"the private registry's supervisor (pid {state.supervisor.pid}) under "
                            f"{layout.root} no longer serves; see {layout.supervisor_log} and stop that pid.")
    return None


def _start_supervisor(layout: Layout, *, timeout: float, access_log: bool) -> State:
    """Spawn the supervisor (own session, so a Ctrl-C of this run does not reach it); wait for its state."""
    layout.state.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        if layout.supervisor_log.stat().st_size > LOG_MAX_BYTES:
            layout.supervisor_log.unlink()
    args = [sys.executable, "-m", __name__, "supervise", str(layout.root)]
    if access_log:
        args.append("--access-log")
    env = dict(os.environ)
    package_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
    with layout.supervisor_log.open("ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd="/", env=env, start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it ends before this process
    mine = Owner(proc.pid, start_ticks(proc.pid) or 0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = State.read(layout.state)
        if state is not None and state.supervisor == mine:
            return state
        if proc.poll() is not None:
            raise RegistryError(f"the private registry under {layout.root} did not start "
                                f"({_tail(layout.supervisor_log)}); see {layout.registry_log}.")
        time.sleep(0.05)
    proc.terminate()
    raise RegistryError(f"the private registry under {layout.root} did not answer within {timeout:.0f} s; "
                        f"see {layout.supervisor_log}.")


def _tail(path: Path, lines: int = 2) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " / ".join(text[-lines:]) or "no log"


# -- the supervisor -----------------------------------------------------------------------------


def _die_with_supervisor(parent: int) -> None:
    """In the registry's child before exec: SIGKILL it when the supervisor dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before the prctl took effect
        os._exit(1)


def _registry_env() -> dict[str, str]:
    """Our environment minus REGISTRY_*: distribution reads those as config overrides
    (REGISTRY_AUTH_FILE, meant for podman, would become an auth section)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}


class Supervisor:
    def __init__(self, layout: Layout, *, access_log: bool) -> None:
        self.layout = layout
        self.access_log = access_log
        self.binary = find_binary()
        self.child: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stopping = False

    def start_registry(self, port: int, *, fresh_log: bool = False) -> bool:
        """Start the registry on `port`; True once it answers, False if it exited (port taken)."""
        self.layout.data.mkdir(parents=True, exist_ok=True)
        write_atomic(self.layout.config, json.dumps(config_for(self.layout, port, access_log=self.access_log),
                                                    indent=1))
        parent = os.getpid()
        with self.layout.registry_log.open("wb" if fresh_log else "ab") as log:
            self.child = subprocess.Popen([self.binary, "serve", str(self.layout.config)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=_registry_env(), cwd="/",
                                          preexec_fn=lambda: _die_with_supervisor(parent))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not self.stopping:
            if self.child.poll() is not None:
                return False
            if answers(f"127.0.0.1:{port}", timeout=1.0):
                self.port = port
                return True
            time.sleep(0.05)
        self.stop_registry()
        return False

    def stop_registry(self) -> None:
        child, self.child = self.child, None
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def publish(self) -> None:
        assert self.child is not None
        state = State(f"127.0.0.1:{self.port}", Owner.current(),
                      Owner(self.child.pid, start_ticks(self.child.pid) or 0))
        write_atomic(self.layout.state, state.to_json())

    def unpublish(self) -> None:
        state = State.read(self.layout.state)
        if state is not None and state.supervisor == Owner.current():
            self.layout.state.unlink(missing_ok=True)

    def run(self) -> int:
        for attempt in range(5):  # a port taken between the probe and the registry's bind
            if self.start_registry(_free_port(), fresh_log=attempt == 0):
                break
            if self.stopping:
                return 0
        else:
            print(f"the registry did not start: {_tail(self.layout.registry_log)}", flush=True)
            return 1
        self.publish()
        restarts = 0
        while not self.stopping:
            time.sleep(POLL_S)
            assert self.child is not None
            if self.child.poll() is not None:  # died under live sessions: same port, or give up
                print(f"the registry exited with {self.child.returncode}; restarting", flush=True)
                restarts += 1
                if restarts > 3 or not self.start_registry(self.port):
                    with self.layout.lock:
                        self.unpublish()
                    return 1
                self.publish()
            with self.layout.lock:
                if not live_leases(self.layout, prune=True):
                    self.unpublish()
                    self.stop_registry()
                    return 0
        with self.layout.lock:
            self.unpublish()
            self.stop_registry()
        return 0

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "supervise":
        print("usage: python -m pytest_flightctl_device.images.registry supervise DIR [--access-log]",
              file=sys.stderr)
        return 2
    supervisor = Supervisor(Layout(Path(argv[1])), access_log="--access-log" in argv[2:])
    signal.signal(signal.SIGTERM, supervisor.on_signal)
    signal.signal(signal.SIGINT, supervisor.on_signal)
    try:
        return supervisor.run()
    finally:
        supervisor.stop_registry()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
