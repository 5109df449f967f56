"""Commands and file copies in a device over the OpenSSH client.

One ControlMaster per VM: the first connection pays for the handshake (slow under TCG), every
later command reuses it. Host keys go to a per-VM known_hosts file, never the user's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pytest_flightctl_device.errors import GuestCommandError, MissingToolError

# A unix socket path must fit in sun_path (108 bytes on Linux, with room for ssh's suffix).
_MAX_SOCKET_PATH = 90  # ssh first listens on PATH.XXXXXXXXXXXXXXXX: 90 + 17 + NUL = 108


@dataclass(frozen=True)
class KeyPair:
    private_path: Path
    public_line: str


def generate_keypair(directory: Path, comment: str = "fcdev") -> KeyPair:
    """An ed25519 key pair in OpenSSH format; the private file is 0600 from its first byte."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private)
    return KeyPair(path, f"{public} {comment}")


@dataclass(frozen=True)
class CommandResult:
    """What a command in the guest returned."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class BannerWatch:
    """Watches for the SSH banner without blocking the readiness loop.

    slirp accepts a connection on the forwarded port before sshd listens, and under TCG the
    banner of a listening sshd can take seconds to cross slirp. So one connection is kept
    pending across polls and checked without waiting; it is replaced when the guest closes it
    or after `patience` seconds without a banner.
    """

    def __init__(self, port: int, host: str = "127.0.0.1", patience: float = 10.0,
                 jump: Jump | None = None) -> None:
        self.address = (host, port)
        self.patience = patience
        self.jump = jump  # a remote host's forward: through its SSH hop
        self._sock: socket.socket | StreamSocket | None = None
        self._since = 0.0
        self._data = b""

    def poll(self) -> bool:
        """True once a banner arrived; never blocks for more than a local connect."""
        if self._sock is None:
            try:
                self._sock = (self.jump.open_stream(*self.address) if self.jump is not None
                              else socket.create_connection(self.address, timeout=0.5))
            except OSError:
                return False
            self._sock.setblocking(False)
            self._since = time.monotonic()
            self._data = b""
        try:
            chunk = self._sock.recv(64)
        except BlockingIOError:
            if time.monotonic() - self._since > self.patience:
                self.close()
            return False
        except OSError:
            self.close()
            return False
        if not chunk:
            self.close()
            return False
        self._data += chunk
        if self._data.startswith(b"SSH-"):
            self.close()
            return True
        return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


@dataclass(frozen=True)
class Jump:
    """The SSH hop to a remote libvirt host, as its URI says (user, port, keyfile, no_verify).

    A remote device's SSH forward listens on that host's 127.0.0.1; we reach it the way OpenSSH's
    ProxyJump does (a `ssh -W %h:%p` hop). The hop is written out as a ProxyCommand because -J
    cannot carry the URI's keyfile or host-key policy: those options would apply to the guest,
    not the hop. Like libvirt's own ssh transport, the hop reads the user's ~/.ssh/config and
    known_hosts, and `no_verify=1` turns host-key checking off (without recording the key).
    """

    host: str
    port: int | None = None
    user: str | None = None
    keyfile: str | None = None
    verify: bool = True

    def hop_argv(self, target: str) -> list[str]:
        """`ssh ... -W target HOST`: a stdio channel to `target` (host:port) on the libvirt host."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20"]
        if self.port:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        if self.keyfile:
            argv += ["-i", self.keyfile]
        if not self.verify:
            argv += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
        return [*argv, "-W", target, self.host]

    def proxy_command(self) -> str:
        """The ProxyCommand value (%h:%p expanded by the outer ssh; other %s doubled)."""
        argv = self.hop_argv("TARGET")
        return shlex.join(argv).replace("%", "%%").replace("TARGET", "%h:%p")

    def open_stream(self, host: str, port: int) -> StreamSocket:
        """A socket-like channel to host:port on the libvirt host (for the banner watch)."""
        ours, theirs = socket.socketpair()
        argv = self.hop_argv(f"{host}:{port}")
        argv[0] = _which("ssh")
        try:
            proc = subprocess.Popen(argv, stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.DEVNULL)
        finally:
            theirs.close()
        return StreamSocket(ours, proc)


class StreamSocket:
    """One end of a socketpair whose other end is an `ssh -W` process; closing ends the process."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self._sock = sock
        self._proc = proc

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def close(self) -> None:
        self._sock.close()
        if self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=5)


def control_path(state_dir: Path) -> Path:
    """The ControlMaster socket of a VM: in its directory, or under /tmp when that path is too long."""
    control = state_dir / "ssh.ctl"
    if len(str(control)) > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(str(control).encode()).hexdigest()[:16]
        control = Path("/tmp") / f"fcdev-{digest}.ctl"
    return control


class SshClient:
    """OpenSSH client bound to one device: BatchMode, IdentitiesOnly, private known_hosts."""

    def __init__(self, *, port: int, key: Path, user: str, state_dir: Path,
                 host: str = "127.0.0.1", jump: Jump | None = None) -> None:
        self.port = port
        self.key = key
        self.user = user
        self.host = host
        self.jump = jump  # the device runs on a remote libvirt host: its forward is reached through it
        self.known_hosts = state_dir / "known_hosts"
        self.control_path = control_path(state_dir)
        self._ssh = _which("ssh")

    def _options(self) -> list[str]:
        """Everything explicit, nothing from ~/.ssh/config (-F none): a user's `Host *` proxy or
        multiplexing settings must not reach a loopback device."""
        return [
            "-F", "none",
            "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes",
            "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=accept-new",
            "-o", f"UserKnownHostsFile={_config_path(self.known_hosts)}",
            "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=20",
            "-o", "ServerAliveInterval=5",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={_config_path(self.control_path)}",
            "-o", "ControlPersist=600",
            "-i", str(self.key),
            "-p", str(self.port),
            *self._proxy(),
        ]

    def _proxy(self) -> list[str]:
        return ["-o", f"ProxyCommand={self.jump.proxy_command()}"] if self.jump is not None else []

    def argv(self, command: str) -> list[str]:
        return [self._ssh, *self._options(), f"{self.user}@{self.host}", command]

    def run(self, command: str, *, check: bool = True, timeout: float | None = 600,
            input_bytes: bytes | None = None) -> CommandResult:
        """Run `command` through the guest's shell; with check, a non-zero exit raises."""
        try:
            proc = subprocess.run(self.argv(command), input=input_bytes if input_bytes is not None else b"",
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise GuestCommandError(
                f"command {command!r} did not finish within {timeout} s on 127.0.0.1:{self.port}; "
                "raise timeout= or look at the console log.",
                exit_code=-1, stdout=_text(exc.stdout), stderr=_text(exc.stderr),
            ) from None
        result = CommandResult(proc.returncode, _text(proc.stdout), _text(proc.stderr))
        if check and not result.ok:
            detail = result.stderr.strip().splitlines()[-1:] or ["no output on stderr"]
            raise GuestCommandError(
                f"command {command!r} exited {result.exit_code} in the device: {detail[0]}",
                exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr,
            )
        return result

    def put_file(self, local: Path, remote: str, *, mode: int | None = None, sudo: bool = False) -> None:
        """Copy a local file into the guest through the master connection (no scp/sftp needed)."""
        prefix = "sudo " if sudo else ""
        command = f"{prefix}sh -c {shlex.quote('cat > ' + shlex.quote(remote))}"
        if mode is not None:
            command += f" && {prefix}chmod {mode:o} {shlex.quote(remote)}"
        self.run(command, input_bytes=Path(local).read_bytes())

    def get_file(self, remote: str, local: Path, *, sudo: bool = False) -> Path:
        prefix = "sudo " if sudo else ""
        try:
            proc = subprocess.run(self.argv(f"{prefix}cat {shlex.quote(remote)}"), capture_output=True,
                                  timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise GuestCommandError(f"reading {remote} from the device did not finish within 600 s on "
                                    f"127.0.0.1:{self.port}; look at the console log.",
                                    exit_code=-1, stdout="", stderr="") from None
        if proc.returncode != 0:
            raise GuestCommandError(
                f"cannot read {remote} from the device: {_text(proc.stderr).strip() or 'cat failed'}",
                exit_code=proc.returncode, stdout="", stderr=_text(proc.stderr),
            )
        Path(local).write_bytes(proc.stdout)
        return Path(local)

    def forward_remote(self, port: int) -> None:
        """Make host 127.0.0.1:port reachable in the guest at 127.0.0.1:port (reverse tunnel)."""
        spec = f"127.0.0.1:{port}:127.0.0.1:{port}"
        proc = subprocess.run([self._ssh, *self._options(), "-O", "forward", "-R", spec,
                               f"{self.user}@{self.host}"], capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise GuestCommandError(
                f"cannot forward host port {port} into the device: {_text(proc.stderr).strip()}",
                exit_code=proc.returncode, stdout="", stderr=_text(proc.stderr),
            )

    def close(self) -> None:
        """Stop the master connection; harmless when none runs. A master that does not answer
        within 10 s is left to exit with its connection (teardown destroys the VM next)."""
        if self.control_path.exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run([self._ssh, "-F", "none", "-o", f"ControlPath={_config_path(self.control_path)}",
                                "-O", "exit",
                                f"{self.user}@{self.host}"], capture_output=True, timeout=10, check=False)
            self.control_path.unlink(missing_ok=True)

    def command_line(self) -> str:
        """A line a human can paste to log in (no control socket, no known_hosts writes)."""
        return shlex.join([
            "ssh", "-i", str(self.key), "-p", str(self.port),
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", *self._proxy(), f"{self.user}@{self.host}",
        ])


def _config_path(path: Path) -> str:
    """A path as an ssh -o value: quoted (a space would split it) and with `%` doubled (ssh
    expands %-tokens in ControlPath and UserKnownHostsFile)."""
    return '"' + str(path).replace("%", "%%") + '"'


def _which(tool: str) -> str:
    from shutil import which

    path = which(tool)
    if path is None:
        raise MissingToolError(f"{tool} (the OpenSSH client) is not installed; install openssh-client.")
    return path


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "replace")
