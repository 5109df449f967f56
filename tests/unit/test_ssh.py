"""The SSH client of a device: keys, the banner watch, the command line, and commands over a real server.

The banner watch meets real loopback TCP servers (one per behaviour a guest shows); the client
meets a real dropbear on 127.0.0.1 (tests/support/sshd.py), or a port where nothing answers.
"""

from __future__ import annotations

import os
import shlex
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pytest_flightctl_device.devices.ports import free_loopback_port
from pytest_flightctl_device.devices.ssh import BannerWatch, CommandResult, SshClient, generate_keypair
from pytest_flightctl_device.errors import GuestCommandError, MissingToolError
from tests.support.helpers import require_tool
from tests.support.sshd import SshServer, ssh_server

BANNER = b"SSH-2.0-OpenSSH_9.6\r\n"

# ---------------------------------------------------------------------------------------------
# keys


def test_keypair_is_ed25519_in_openssh_format_and_private_from_the_first_byte(tmp_path: Path) -> None:
    keygen = require_tool("ssh-keygen")
    old = os.umask(0)  # the most permissive umask: the file must still be 0600
    try:
        pair = generate_keypair(tmp_path, comment="device-7")
    finally:
        os.umask(old)
    assert pair.private_path == tmp_path / "id_ed25519"
    assert stat.S_IMODE(pair.private_path.stat().st_mode) == 0o600
    assert pair.private_path.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    kind, blob, comment = pair.public_line.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "device-7")
    derived = subprocess.run([keygen, "-y", "-f", str(pair.private_path)], capture_output=True, text=True,
                             check=True).stdout.split()
    assert derived[:2] == [kind, blob]  # OpenSSH reads the private key and finds the same public key


def test_keypair_default_comment_and_fresh_keys(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = generate_keypair(tmp_path / "a"), generate_keypair(tmp_path / "b")
    assert first.public_line.endswith(" fcdev")
    assert first.public_line != second.public_line


def test_keypair_never_replaces_an_existing_key(tmp_path: Path) -> None:
    existing = tmp_path / "id_ed25519"
    existing.write_text("someone's key\n")
    with pytest.raises(FileExistsError):
        generate_keypair(tmp_path)
    assert existing.read_text() == "someone's key\n"


def test_command_result_ok_is_exit_zero() -> None:
    assert CommandResult(0, "out", "").ok
    assert not CommandResult(1, "", "err").ok
    assert not CommandResult(-1, "", "").ok


# ---------------------------------------------------------------------------------------------
# the banner watch against real loopback servers


class Listener:
    """A TCP server on 127.0.0.1 that runs `behave` on every connection it accepts."""

    def __init__(self, behave: Callable[[socket.socket, int], None], port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen()
        self.port: int = self.sock.getsockname()[1]
        self.behave = behave
        self.connections: list[socket.socket] = []
        self.closed_by_peer = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._one, args=(conn, len(self.connections)), daemon=True).start()

    def _one(self, conn: socket.socket, number: int) -> None:
        try:
            self.behave(conn, number)
            conn.settimeout(10)
            if conn.recv(1) == b"":
                self.closed_by_peer.set()
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.connections:
            conn.close()


@contextmanager
def listening(behave: Callable[[socket.socket, int], None], port: int = 0) -> Iterator[Listener]:
    listener = Listener(behave, port)
    try:
        yield listener
    finally:
        listener.close()


def poll_until(watch: BannerWatch, seconds: float) -> tuple[bool, float]:
    """Poll like the readiness loop (every 50 ms) until a banner or `seconds`; the longest poll."""
    deadline = time.monotonic() + seconds
    longest = 0.0
    while time.monotonic() < deadline:
        began = time.monotonic()
        seen = watch.poll()
        longest = max(longest, time.monotonic() - began)
        if seen:
            return True, longest
        time.sleep(0.05)
    return False, longest


def test_banner_is_seen_and_the_connection_closed() -> None:
    def banner(conn: socket.socket, _n: int) -> None:
        conn.sendall(BANNER)

    with listening(banner) as server:
        watch = BannerWatch(server.port)
        seen, longest = poll_until(watch, 5)
        assert seen and longest < 0.5
        assert server.closed_by_peer.wait(5), "the watch kept its connection open after the banner"
        watch.close()  # harmless twice


def test_silent_accept_is_not_ready_and_the_connection_is_replaced_after_patience() -> None:
    """slirp accepts on the forwarded port before sshd listens, and then says nothing."""
    with listening(lambda _c, _n: None) as server:
        watch = BannerWatch(server.port, patience=0.2)
        try:
            seen, longest = poll_until(watch, 0.7)
        finally:
            watch.close()
        assert not seen
        assert longest < 0.5, f"a poll blocked for {longest:.2f} s"
        assert 2 <= len(server.connections) <= 5


def test_a_late_banner_is_seen_on_the_connection_kept_across_polls() -> None:
    """Under TCG the banner takes seconds to cross slirp: one connection waits for it."""
    def late(conn: socket.socket, _n: int) -> None:
        time.sleep(0.5)
        conn.sendall(BANNER)

    with listening(late) as server:
        watch = BannerWatch(server.port)
        began = time.monotonic()
        seen, longest = poll_until(watch, 5)
        assert seen and time.monotonic() - began >= 0.45
        assert longest < 0.5
        assert len(server.connections) == 1


def test_a_banner_in_pieces() -> None:
    def pieces(conn: socket.socket, _n: int) -> None:
        conn.sendall(b"SS")
        time.sleep(0.3)
        conn.sendall(b"H-2.0-dropbear\r\n")

    with listening(pieces) as server:
        assert poll_until(BannerWatch(server.port), 5)[0]


def test_a_guest_that_closes_the_connection_is_retried() -> None:
    def closes_twice(conn: socket.socket, number: int) -> None:
        if number <= 2:
            conn.close()
        else:
            conn.sendall(BANNER)

    with listening(closes_twice) as server:
        assert poll_until(BannerWatch(server.port), 5)[0]
        assert len(server.connections) == 3


def test_not_ssh_is_never_ready() -> None:
    def http(conn: socket.socket, _n: int) -> None:
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with listening(http) as server:
        watch = BannerWatch(server.port)
        try:
            assert not poll_until(watch, 0.3)[0]
        finally:
            watch.close()


def test_a_refused_port_is_not_ready_until_a_server_listens() -> None:
    port = free_loopback_port()
    watch = BannerWatch(port)
    seen, longest = poll_until(watch, 0.3)
    assert not seen and longest < 0.5

    def banner(conn: socket.socket, _n: int) -> None:
        conn.sendall(BANNER)

    with listening(banner, port):
        assert poll_until(watch, 5)[0]


# ---------------------------------------------------------------------------------------------
# the client's command lines (OpenSSH itself reads them)


def client_for(state: Path, port: int = 2222, key: Path | None = None, user: str = "fcdev") -> SshClient:
    state.mkdir(parents=True, exist_ok=True)
    return SshClient(port=port, key=key or state / "id_ed25519", user=user, state_dir=state)


def test_options_as_openssh_reads_them(tmp_path: Path) -> None:
    require_tool("ssh")
    client = client_for(tmp_path / "vm")
    generate_keypair(tmp_path / "vm")  # ssh -G leaves out an identity file that does not exist
    argv = client.argv("true")
    assert argv[-2:] == ["fcdev@127.0.0.1", "true"]
    proc = subprocess.run([argv[0], "-G", *argv[1:-1]], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    config = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert {key: config[key] for key in (
        "hostname", "port", "user", "batchmode", "identitiesonly", "identityagent", "stricthostkeychecking",
        "userknownhostsfile", "globalknownhostsfile", "controlmaster", "controlpath", "controlpersist",
    )} == {
        "hostname": "127.0.0.1", "port": "2222", "user": "fcdev", "batchmode": "yes", "identitiesonly": "yes",
        "identityagent": "none", "stricthostkeychecking": "accept-new",
        "userknownhostsfile": str(tmp_path / "vm" / "known_hosts"), "globalknownhostsfile": "/dev/null",
        "controlmaster": "auto", "controlpath": str(tmp_path / "vm" / "ssh.ctl"), "controlpersist": "600",
    }
    assert f"identityfile {tmp_path / 'vm' / 'id_ed25519'}" in proc.stdout.splitlines()


@pytest.mark.parametrize("name", ["my devices", "100%b"])
def test_options_survive_a_state_directory_with_a_space_or_percent(tmp_path: Path, name: str) -> None:
    require_tool("ssh")
    client = client_for(tmp_path / name / "vm")
    argv = client.argv("true")
    proc = subprocess.run([argv[0], "-G", *argv[1:-1]], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"controlpath {client.control_path}" in proc.stdout.splitlines()
    assert f"userknownhostsfile {tmp_path / name / 'vm' / 'known_hosts'}" in proc.stdout.splitlines()


def test_command_line_is_a_pasteable_login(tmp_path: Path) -> None:
    require_tool("ssh")
    key = tmp_path / "keys with space" / "it's key"
    key.parent.mkdir()
    key.write_text("a key\n")  # ssh -G leaves out an identity file that does not exist
    client = client_for(tmp_path / "vm", port=40022, key=key)
    line = client.command_line()
    words = shlex.split(line)
    assert words[0] == "ssh" and words[-1] == "fcdev@127.0.0.1"
    assert words[words.index("-i") + 1] == str(key) and words[words.index("-p") + 1] == "40022"
    assert "ControlPath" not in line and str(client.known_hosts) not in line
    # a shell gives OpenSSH the same words back, and OpenSSH accepts them
    proc = subprocess.run(["sh", "-c", line.replace("ssh", "ssh -G", 1)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"identityfile {key}" in proc.stdout.splitlines()
    assert "userknownhostsfile /dev/null" in proc.stdout.splitlines()  # the user's known_hosts stays as it was


def test_control_path_fits_a_unix_socket_for_any_state_directory(tmp_path: Path) -> None:
    require_tool("ssh")
    short = client_for(tmp_path / "vm")
    assert short.control_path == tmp_path / "vm" / "ssh.ctl"
    deep = tmp_path / ("d" * 150)
    long_a, long_b = client_for(deep / "vm1"), client_for(deep / "vm2")
    assert long_a.control_path == client_for(deep / "vm1").control_path  # the same VM, the same socket
    assert long_a.control_path != long_b.control_path
    for client in (long_a, long_b):
        # ssh listens on the path plus ".XXXXXXXXXXXXXXXX" first, then renames it
        with socket.socket(socket.AF_UNIX) as sock:
            temp = f"{client.control_path}.{'x' * 16}"
            sock.bind(temp)
            os.unlink(temp)


def test_no_ssh_client_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match="install openssh-client"):
        client_for(tmp_path / "vm")


# ---------------------------------------------------------------------------------------------
# commands where no sshd answers


def test_a_refused_port_fails_with_ssh_s_reason(tmp_path: Path) -> None:
    require_tool("ssh")
    client = client_for(tmp_path / "vm", port=free_loopback_port())
    assert client.run("true", check=False, timeout=10).exit_code == 255
    with pytest.raises(GuestCommandError, match=r"command 'true' exited 255 in the device: .*Connection refused"):
        client.run("true", timeout=10)


def test_a_silent_port_times_out_instead_of_hanging(tmp_path: Path) -> None:
    """slirp accepts before sshd listens: the command's timeout bounds the wait."""
    require_tool("ssh")
    with listening(lambda _c, _n: None) as server:
        client = client_for(tmp_path / "vm", port=server.port)
        began = time.monotonic()
        with pytest.raises(GuestCommandError, match=r"did not finish within 0.5 s") as caught:
            client.run("true", timeout=0.5)
        assert time.monotonic() - began < 5
        assert caught.value.exit_code == -1
        client.close()


def test_close_gives_up_on_a_wedged_master(tmp_path: Path) -> None:
    """A master that accepts on its socket but never answers: close() returns and frees the path.

    Slow by design: close() allows a master 10 s to answer."""
    require_tool("ssh")
    client = client_for(tmp_path / "vm")
    wedged = socket.socket(socket.AF_UNIX)
    wedged.bind(str(client.control_path))
    wedged.listen()  # never accepts, never answers
    try:
        began = time.monotonic()
        client.close()
        assert time.monotonic() - began < 15
        assert not client.control_path.exists()
    finally:
        wedged.close()


def test_close_without_a_master_is_harmless(tmp_path: Path) -> None:
    require_tool("ssh")
    client = client_for(tmp_path / "vm")
    client.close()
    client.close()


# ---------------------------------------------------------------------------------------------
# commands over a real SSH server on 127.0.0.1


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SshServer]:
    require_tool("ssh")
    with ssh_server(tmp_path / "server") as running:
        yield running


@pytest.fixture
def client(server: SshServer, tmp_path: Path) -> Iterator[SshClient]:
    (tmp_path / "vm").mkdir()
    device = SshClient(port=server.port, key=server.key.private_path, user=server.user, state_dir=tmp_path / "vm")
    yield device
    device.close()


def auth_count(tmp_path: Path) -> int:
    return (tmp_path / "server" / "dropbear.log").read_text().count("Pubkey auth succeeded")


def test_run_returns_output_and_exit_code(client: SshClient) -> None:
    result = client.run("echo out; echo err >&2")
    assert result == CommandResult(0, "out\n", "err\n")
    assert client.run("exit 3", check=False).exit_code == 3
    with pytest.raises(GuestCommandError, match=r"command 'echo first >&2; echo last >&2; exit 4' exited 4 in "
                                                r"the device: last$") as caught:
        client.run("echo first >&2; echo last >&2; exit 4")
    assert (caught.value.exit_code, caught.value.stderr) == (4, "first\nlast\n")


def test_run_feeds_stdin_and_never_the_caller_s(client: SshClient) -> None:
    assert client.run("tr a-z A-Z", input_bytes=b"hello device\n").stdout == "HELLO DEVICE\n"
    read, write = os.pipe()
    os.write(write, b"the test process's own stdin\n")
    os.close(write)
    saved = os.dup(0)
    os.dup2(read, 0)
    try:
        assert client.run("cat", timeout=10).stdout == ""  # no input: an empty stdin, not the caller's
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(read)


def test_one_master_connection_serves_every_command(client: SshClient, tmp_path: Path) -> None:
    for number in range(5):
        assert client.run(f"echo {number}").stdout == f"{number}\n"
    assert stat.S_ISSOCK(client.control_path.stat().st_mode)
    assert auth_count(tmp_path) == 1
    assert " ssh-ed25519 " in (tmp_path / "vm" / "known_hosts").read_text()  # the VM's own known_hosts
    client.close()
    assert not client.control_path.exists()
    assert client.run("echo again").stdout == "again\n"  # a new master after close
    assert auth_count(tmp_path) == 2


def test_timeout_raises_and_the_master_still_serves(client: SshClient) -> None:
    client.run("true")
    began = time.monotonic()
    with pytest.raises(GuestCommandError, match=r"command 'sleep 30' did not finish within 0.5 s") as caught:
        client.run("sleep 30", timeout=0.5)
    assert time.monotonic() - began < 5
    assert caught.value.exit_code == -1
    assert client.run("echo alive", timeout=10).stdout == "alive\n"


def test_put_and_get_file_round_trip_with_awkward_names(client: SshClient, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    local = tmp_path / "local.bin"
    local.write_bytes(payload)
    remote_dir = tmp_path / "guest dir"
    remote_dir.mkdir()
    remote = str(remote_dir / "it's $HOME; a file")
    client.put_file(local, remote, mode=0o640)
    assert Path(remote).read_bytes() == payload
    assert stat.S_IMODE(Path(remote).stat().st_mode) == 0o640
    back = client.get_file(remote, tmp_path / "back.bin")
    assert back.read_bytes() == payload


def test_get_file_of_a_missing_path_names_it(client: SshClient, tmp_path: Path) -> None:
    with pytest.raises(GuestCommandError, match=r"cannot read /nonexistent/agent.yaml from the device: .*No such"):
        client.get_file("/nonexistent/agent.yaml", tmp_path / "agent.yaml")
    assert not (tmp_path / "agent.yaml").exists()


def test_the_pasted_command_line_logs_in(client: SshClient, tmp_path: Path) -> None:
    out = subprocess.run(["sh", "-c", client.command_line() + " echo pasted"], capture_output=True, text=True,
                         timeout=30, check=False)
    assert (out.returncode, out.stdout) == (0, "pasted\n"), out.stderr
    assert not (tmp_path / "vm" / "known_hosts").exists()  # the pasted line writes no host key
    assert not client.control_path.exists()  # and starts no master


@pytest.mark.parametrize("length", [60, 90, 91, 100, 101, 140])
def test_commands_work_whatever_the_state_directory_length(server: SshServer, length: int) -> None:
    """A deep workdir must not break the control socket (ssh adds 17 characters while creating it)."""
    with tempfile.TemporaryDirectory(prefix="fcdev-t-") as short:  # /tmp/...: short enough to pad
        base = Path(short) / "s"
        state = Path(str(base) + "x" * (length - len(str(base / "ssh.ctl"))))
        state.mkdir()
        device = SshClient(port=server.port, key=server.key.private_path, user=server.user, state_dir=state)
        assert len(str(state / "ssh.ctl")) == length
        try:
            result = device.run("echo ok", check=False)
            assert result.exit_code == 0, result.stderr
        finally:
            device.close()
