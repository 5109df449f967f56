"""Readiness strategies without libvirt: a console file, a fake clock, predicates, a loopback banner."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pytest_flightctl_device.devices.console import ConsoleLog
from pytest_flightctl_device.devices.readiness import (
    Cancelled,
    Clock,
    CloudInitDone,
    ConsoleFailure,
    ConsoleMarker,
    Failed,
    HostForwards,
    Readiness,
    SshBanner,
    SshLogin,
    StillRunning,
    TimedOut,
    device_steps,
)
from pytest_flightctl_device.devices.ssh import CommandResult


class FakeClock(Clock):
    """Time that passes only when someone sleeps."""

    def __init__(self) -> None:
        self.t = 0.0
        super().__init__(now=lambda: self.t, sleep=self._sleep)

    def _sleep(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Flag:
    """A step that is done once `done` is set; counts how often it was asked."""

    name: str
    done: bool = False
    polls: int = 0
    closed: bool = False

    def poll(self) -> bool:
        self.polls += 1
        return self.done

    def close(self) -> None:
        self.closed = True


@dataclass
class After:
    """A step done on its n-th poll."""

    name: str
    n: int
    polls: list[int] = field(default_factory=list)

    def poll(self) -> bool:
        self.polls.append(1)
        return len(self.polls) >= self.n

    def close(self) -> None:
        pass


def console(tmp_path: Path, text: str) -> tuple[Path, ConsoleLog]:
    path = tmp_path / "console.log"
    path.write_text(text)
    return path, ConsoleLog(path)


def test_steps_run_in_order_and_a_later_one_waits_for_the_earlier(tmp_path: Path) -> None:
    marker, banner = After("console marker", 3), Flag("ssh banner", done=True)
    done = Readiness([marker, banner], clock=FakeClock()).wait(deadline=10)
    assert done == ["console marker", "ssh banner"]
    assert len(marker.polls) == 3 and banner.polls == 1  # never asked before the marker was there
    assert banner.closed


def test_timeout_names_what_it_waited_for_and_what_was_done() -> None:
    clock = FakeClock()
    steps = [Flag("console marker", done=True), Flag("ssh banner"), Flag("cloud-init done")]
    with pytest.raises(TimedOut) as info:
        Readiness(steps, clock=clock, interval=0.5).wait(deadline=3)
    assert info.value.reason == "waiting for: ssh banner, cloud-init done; done: console marker"
    assert 3 < clock.t <= 3.5  # polled up to the deadline, not beyond
    assert all(step.closed for step in steps)  # e.g. a pending banner connection is closed


def test_guards_stop_the_wait(tmp_path: Path) -> None:
    path, log = console(tmp_path, "SeaBIOS\n")
    alive = [True]
    readiness = Readiness([Flag("console marker")], guards=[
        ConsoleFailure(log, redact=lambda text: text.replace("s3cret", "<redacted>")),
        StillRunning(lambda: alive[0])], clock=FakeClock())
    with path.open("a") as handle:
        handle.write("[    1.0] Kernel panic - not syncing: token s3cret here\n")
    with pytest.raises(Failed, match=r"the guest kernel panicked: Kernel panic - not syncing: token <redacted>"):
        readiness.wait(deadline=10)
    path.write_text("booting\n")
    alive[0] = False
    with pytest.raises(Failed, match="stopped before it was ready"):
        Readiness([Flag("x")], guards=[ConsoleFailure(ConsoleLog(path)), StillRunning(lambda: alive[0])],
                  clock=FakeClock()).wait(deadline=10)


def test_console_failures_and_markers_before_a_reboot_are_ignored(tmp_path: Path) -> None:
    path, log = console(tmp_path, "No bootable device.\nfcdev-ready i-1\n")
    since = log.mark()
    ConsoleFailure(log, since).check()  # before the mark: an earlier boot's
    marker = ConsoleMarker(log, "fcdev-ready i-1", since)
    assert not marker.poll()
    with path.open("a") as handle:
        handle.write("fcdev-ready i-1\n")
    assert marker.poll()
    with pytest.raises(Failed, match="found nothing to boot"):
        ConsoleFailure(log).check()


def test_cancel() -> None:
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Cancelled):
        Readiness([Flag("console marker")], cancelled=cancelled, clock=FakeClock()).wait(deadline=10)


@contextmanager
def ssh_like_server(banner: bytes | None) -> Iterator[int]:
    """A loopback server that sends `banner` to every connection (None: accepts and stays silent)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            held.append(conn)
            if banner is not None:
                conn.sendall(banner)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_ssh_banner_against_a_real_socket() -> None:
    with ssh_like_server(b"SSH-2.0-dropbear\r\n") as port:
        banner = SshBanner(port)
        assert Readiness([banner], interval=0.01).wait(deadline=_in(5)) == ["ssh banner"]
    with ssh_like_server(None) as port:  # slirp accepting while sshd is not up yet
        silent = SshBanner(port)
        with pytest.raises(TimedOut, match="waiting for: ssh banner"):
            Readiness([silent], interval=0.01).wait(deadline=_in(0.3))
    with ssh_like_server(b"HTTP/1.0 400\r\n") as port:
        assert not SshBanner(port).poll()


def _in(seconds: float) -> float:
    import time

    return time.monotonic() + seconds


def test_cloud_init_done_and_its_failure_redacted() -> None:
    assert CloudInitDone(lambda _cmd: CommandResult(0, "status: done\n", "")).poll()
    assert CloudInitDone(lambda _cmd: CommandResult(2, "status: done\nrecoverable\n", "")).poll()
    failing = CloudInitDone(lambda _cmd: CommandResult(1, "status: error\nkey s3cret\n", ""),
                            redact=lambda text: text.replace("s3cret", "<redacted>"))
    with pytest.raises(Failed, match=r"cloud-init did not finish cleanly \(exit 1\):\nstatus: error\nkey <redacted>"):
        failing.poll()


def test_login_retries_at_its_own_pace_and_forwards_fail_in_their_words() -> None:
    clock = FakeClock()
    answers = iter([False, False, True])
    calls: list[float] = []

    def login() -> bool:
        calls.append(clock.t)
        return next(answers)

    assert Readiness([SshLogin(login, clock, retry=1.0)], clock=clock, interval=0.25).wait(deadline=10) == [
        "ssh login"]
    assert calls == [0.0, 1.0, 2.0]

    def refuse(port: int) -> None:
        raise OSError(f"cannot forward host port {port} into the device: refused")

    forwarded: list[int] = []
    assert HostForwards([8080, 9090], forwarded.append).poll() and forwarded == [8080, 9090]
    with pytest.raises(Failed, match="cannot forward host port 8080 into the device: refused"):
        HostForwards([8080], refuse).poll()


def test_the_device_composition(tmp_path: Path) -> None:
    _, log = console(tmp_path, "")

    def names(host_forward: tuple[int, ...]) -> list[str]:
        steps = device_steps(console=log, since=0, marker="fcdev-ready i-1", ssh_port=1,
                             login=lambda: True, run=lambda _c: CommandResult(0, "status: done", ""),
                             forward=lambda _p: None, host_forward=host_forward, redact=str)
        for step in steps:
            step.close()
        return [step.name for step in steps]

    # The banner only once the marker is there (slirp's SYN backoff), cloud-init's status last.
    assert names(()) == ["console marker", "ssh banner", "cloud-init done"]
    # Forwards as soon as SSH answers: the guest may need them before cloud-init can finish.
    assert names((8080,)) == ["ssh banner", "ssh login", "host forwards", "console marker", "cloud-init done"]
