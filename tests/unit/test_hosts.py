"""Remote libvirt hosts: URI parsing, the SSH hop's command, placement across hosts' shares."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.devices.hosts import Hosts, parse_uri
from pytest_flightctl_device.devices.slots import VMSlots
from pytest_flightctl_device.devices.ssh import Jump, SshClient
from pytest_flightctl_device.errors import BootError, ConfigError, MissingToolError
from pytest_flightctl_device.settings import Settings


def test_local_uris_are_not_remote() -> None:
    for uri in ("qemu:///system", "qemu:///session", "qemu+unix:///system"):
        address = parse_uri(uri)
        assert not address.remote and address.label == "local" and address.jump() is None


def test_a_qemu_ssh_uri_gives_user_port_keyfile_and_host_key_policy() -> None:
    address = parse_uri("qemu+ssh://ci@host-a:2222/system?keyfile=/k/id%20x&no_verify=1")
    assert address.remote and address.transport == "ssh"
    assert (address.hostname, address.port, address.user) == ("host-a", 2222, "ci")
    assert address.keyfile == "/k/id x" and not address.verify
    assert address.label == "ci@host-a:2222"
    plain = parse_uri("qemu+ssh://host-b/system")
    assert plain.verify and plain.port is None and plain.user is None and plain.label == "host-b"
    assert parse_uri("qemu+ssh://host-b/system?no_verify=0").verify


@pytest.mark.parametrize("uri", ["qemu+tls://host/system", "qemu+tcp://host/system", "qemu://host/system",
                                 "not a uri", "qemu+ssh://host:port/system"])
def test_a_remote_host_not_over_ssh_or_a_bad_uri_is_a_config_error(uri: str) -> None:
    with pytest.raises(ConfigError, match="--device-libvirt-uri"):
        parse_uri(uri)


def test_libvirt_uri_repeats_and_a_duplicate_is_refused() -> None:
    settings = Settings.resolve({"libvirt_uri": ["qemu:///system", "qemu+ssh://a/system"]}, {}, {})
    assert settings.libvirt_uri == ("qemu:///system", "qemu+ssh://a/system")
    assert Settings(libvirt_uri="qemu:///session").libvirt_uri == ("qemu:///session",)
    with pytest.raises(ConfigError, match="same URI twice"):
        Settings.resolve({"libvirt_uri": ["qemu:///system", "qemu:///system"]}, {}, {})


def test_the_hop_is_proxyjumps_expansion_with_the_uris_options() -> None:
    jump = Jump("host-a", 2222, "ci", "/k/id x%", verify=False)
    assert jump.hop_argv("127.0.0.1:40000") == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-p", "2222", "-l", "ci", "-i", "/k/id x%",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-W", "127.0.0.1:40000",
        "host-a"]
    command = jump.proxy_command()
    assert command.endswith("-W %h:%p host-a") and "'/k/id x%%'" in command
    verified = Jump("host-b").hop_argv("h:1")
    assert "StrictHostKeyChecking=no" not in verified and "-p" not in verified and "-i" not in verified


def test_ssh_command_is_a_pasteable_line_through_the_hop(tmp_path: Path) -> None:
    client = SshClient(port=40000, key=tmp_path / "id", user="user", state_dir=tmp_path,
                       jump=Jump("host-a", 2222, "ci", "/k/id"))
    argv = shlex.split(client.command_line())
    assert argv[0] == "ssh" and argv[-1] == "user@127.0.0.1" and "-p" in argv and "40000" in argv
    proxy = next(a for a in argv if a.startswith("ProxyCommand="))
    assert shlex.split(proxy.removeprefix("ProxyCommand="))[-3:] == ["-W", "%h:%p", "host-a"]
    assert any(a.startswith("ProxyCommand=") for a in client.argv("true"))
    local = SshClient(port=40000, key=tmp_path / "id", user="user", state_dir=tmp_path)
    assert not any("ProxyCommand" in a for a in local.argv("true"))


class _Host:
    """A host for placement only: real slot locks under tmp, a memory figure, reachable or not."""

    def __init__(self, label: str, directory: Path, count: int, free: int = 10_000, up: bool = True) -> None:
        self.label = label
        self.slots = VMSlots(directory / label, count)
        self.free = free
        self.up = up
        self.error = None if up else f"{label} is down"
        self.remote = False  # a waiting placement announces itself in its slots (VMSlots.announce)

    def connect(self) -> Any:
        return object() if self.up else None

    def fits(self, memory_mib: int) -> bool:
        return self.free >= memory_mib

    def close(self) -> None:
        pass


def _hosts(*hosts: _Host, log: list[str] | None = None) -> Hosts:
    return Hosts(list(hosts), (log if log is not None else []).append)  # type: ignore[arg-type]


def test_placement_fills_each_hosts_share_then_waits(tmp_path: Path) -> None:
    a, b = _Host("a", tmp_path, 1), _Host("b", tmp_path, 2)
    hosts = _hosts(a, b)
    placed = [hosts.acquire(256, 1.0) for _ in range(3)]
    assert [host.label for host, _slot in placed] == ["a", "b", "b"]
    with pytest.raises(BootError, match="no libvirt host had room"):
        hosts.acquire(256, 0.3)
    placed[0][1].release()
    assert hosts.acquire(256, 1.0)[0].label == "a"


def test_placement_skips_a_host_without_the_memory(tmp_path: Path) -> None:
    hosts = _hosts(_Host("small", tmp_path, 4, free=100), _Host("big", tmp_path, 4))
    host, slot = hosts.acquire(2048, 1.0)
    assert host.label == "big"
    slot.release()
    assert _Host("small", tmp_path, 1).slots.try_acquire() is not None  # its slot was given back


def test_an_unreachable_host_is_reported_once_and_skipped(tmp_path: Path) -> None:
    log: list[str] = []
    hosts = _hosts(_Host("down", tmp_path, 1, up=False), _Host("up", tmp_path, 5), log=log)
    for _ in range(3):
        assert hosts.acquire(256, 1.0)[0].label == "up"
    assert log == ["libvirt host down cannot be reached; skipping it (down is down)"]
    with pytest.raises(MissingToolError, match="down2 is down"):
        _hosts(_Host("down2", tmp_path, 1, up=False), _Host("down3", tmp_path, 1, up=False)).acquire(256, 1.0)


def test_two_threads_never_overfill_a_host(tmp_path: Path) -> None:
    hosts = _hosts(_Host("a", tmp_path, 1), _Host("b", tmp_path, 1))
    got: list[tuple[str, object]] = []  # the slots stay referenced (a dropped lock is released)
    barrier = threading.Barrier(2)

    def take() -> None:
        barrier.wait()
        host, slot = hosts.acquire(256, 1.0)
        got.append((host.label, slot))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(label for label, _slot in got) == ["a", "b"]


def test_a_placement_that_waits_is_announced_on_the_local_hosts(tmp_path: Path) -> None:
    a, b = _Host("a", tmp_path, 1), _Host("b", tmp_path, 1)
    b.remote = True  # a remote host's slots are not where this machine's idle templates look
    held = [a.slots.acquire(1), b.slots.acquire(1)]
    seen: list[tuple[int, int]] = []
    with pytest.raises(BootError):
        _hosts(a, b).acquire(256, 0.3, lambda _msg: seen.append((len(a.slots.waiters()), len(b.slots.waiters()))))
    assert seen == [(1, 0)]
    assert a.slots.waiters() == []  # withdrawn when it gave up
    for slot in held:
        slot.release()
