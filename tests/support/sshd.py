"""A real SSH server on 127.0.0.1 for the SSH client's tests: dropbear, which scripts/setup installs.

dropbear has no AuthorizedKeysFile option: it reads `~/.ssh/authorized_keys` of the account it
logs in. So it runs in private mount and PID namespaces where a scratch home is bind-mounted over
the account's home: the user's real `~/.ssh` is never read or written, and stopping the server
(one PID) ends every session it forked, since they die with the namespace's first process.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pytest_flightctl_device.devices.ports import free_loopback_port
from pytest_flightctl_device.devices.ssh import KeyPair, generate_keypair
from tests.support.helpers import missing, require_tool

_MOUNT_THEN_SERVE = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


@dataclass(frozen=True)
class SshServer:
    port: int
    user: str
    key: KeyPair
    home: Path  # the account's home as the server's sessions see it (bind-mounted scratch)


@contextmanager
def ssh_server(workdir: Path) -> Iterator[SshServer]:
    """A dropbear on 127.0.0.1 accepting `key` for the current account; stopped on exit."""
    dropbear = require_tool("dropbear")
    dropbearkey = require_tool("dropbearkey")
    unshare = require_tool("unshare")
    account = pwd.getpwuid(os.getuid())
    home = workdir / "home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    home.chmod(0o700)
    (workdir / "client").mkdir(mode=0o700)
    key = generate_keypair(workdir / "client")
    authorized = home / ".ssh" / "authorized_keys"
    authorized.write_text(key.public_line + "\n")
    authorized.chmod(0o600)
    host_key = workdir / "host_ed25519"
    subprocess.run([dropbearkey, "-t", "ed25519", "-f", str(host_key)], capture_output=True, check=True)
    namespaces = ["--mount", "--pid", "--fork", "--kill-child", "--propagation", "private"]
    if os.getuid() != 0:
        namespaces = ["--user", "--map-current-user", *namespaces]
    port = free_loopback_port()
    log = (workdir / "dropbear.log").open("wb")
    proc = subprocess.Popen(
        [unshare, *namespaces, "sh", "-c", _MOUNT_THEN_SERVE, "sh", str(home), account.pw_dir,
         dropbear, "-F", "-E", "-s", "-p", f"127.0.0.1:{port}", "-r", str(host_key),
         "-P", str(workdir / "dropbear.pid")],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    try:
        _wait_for_banner(port, proc, workdir / "dropbear.log")
        yield SshServer(port=port, user=account.pw_name, key=key, home=Path(account.pw_dir))
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End dropbear, the namespace's first process (which ends every session in it), then unshare.

    unshare ignores SIGTERM while it waits, and killed first it would leave dropbear to die by
    --kill-child as an orphan zombie; so its child goes first and unshare reaps it."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    with contextlib.suppress(OSError):
        for pid in children.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_banner(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            missing(f"dropbear could not start in private namespaces (exit {proc.returncode}): "
                    f"{log.read_text(errors='replace').strip()[-300:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"dropbear on 127.0.0.1:{port} sent no banner within 10 s")
