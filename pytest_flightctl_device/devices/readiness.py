"""When a booting device is ready: named wait strategies, polled in order against one deadline.

In the spirit of testcontainers' wait strategies: each *step* answers "done yet?" (the console
marker, the SSH banner, cloud-init's status, ...) and each *guard* stops the wait early when the
boot has visibly failed (a kernel panic on the console, a domain that stopped). Steps run in
order, a later one is polled only once the earlier ones are done, so a timeout can say exactly
what was still awaited. Nothing here knows libvirt: the inputs are a console file, a port and
callables, which is what the unit tests drive.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pytest_flightctl_device.devices.console import CLOUD_INIT_ERROR, NO_BOOT_DEVICE, PANIC, ConsoleLog
from pytest_flightctl_device.devices.ssh import BannerWatch, CommandResult, Jump

POLL_S = 0.2
LOGIN_RETRY_S = 1.0  # between SSH login attempts while the guest may not have its key yet


class Failed(Exception):
    """The boot failed for good; `reason` is one clause naming what was seen."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Cancelled(Failed):
    """Someone gave up on this boot (a spare nobody needs any more)."""


class TimedOut(Failed):
    """The deadline passed with steps still pending."""

    def __init__(self, waiting: Sequence[str], done: Sequence[str]) -> None:
        self.waiting = list(waiting)
        self.done = list(done)
        super().__init__(f"waiting for: {', '.join(self.waiting)}; done: {', '.join(self.done) or 'nothing'}")


class Step(Protocol):
    name: str

    def poll(self) -> bool:
        """True once done; raise Failed when it can never be."""
        ...

    def close(self) -> None: ...


class Guard(Protocol):
    def check(self) -> None:
        """Raise Failed when the boot has visibly failed."""
        ...


@dataclass
class Clock:
    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Readiness:
    """Steps polled in order until all are done, guards checked every round, one deadline."""

    steps: Sequence[Step]
    guards: Sequence[Guard] = ()
    cancelled: threading.Event | None = None
    clock: Clock = field(default_factory=Clock)
    interval: float = POLL_S
    on_done: Callable[[str], None] = lambda _name: None

    def wait(self, deadline: float) -> list[str]:
        """Block until every step is done (returns their names); raise Failed, Cancelled or TimedOut."""
        pending = list(self.steps)
        done: list[str] = []
        try:
            while True:
                if self.cancelled is not None and self.cancelled.is_set():
                    raise Cancelled("the boot was cancelled")
                for guard in self.guards:
                    guard.check()
                while pending and pending[0].poll():
                    done.append(pending.pop(0).name)
                    self.on_done(done[-1])
                if not pending:
                    return done
                if self.clock.now() > deadline:
                    raise TimedOut([step.name for step in pending], done)
                self.clock.sleep(self.interval)
        finally:
            for step in self.steps:
                step.close()


# -- guards ---------------------------------------------------------------------------------------

CONSOLE_FAILURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (PANIC, "the guest kernel panicked"),
    (NO_BOOT_DEVICE, "the firmware found nothing to boot (is the qcow2 bootable?)"),
    (CLOUD_INIT_ERROR, "cloud-init reported an error"),
)


@dataclass
class ConsoleFailure:
    """A panic, an unbootable disk or a cloud-init error on the console (after `since`) ends the wait."""

    console: ConsoleLog
    since: int = 0
    redact: Callable[[str], str] = lambda text: text

    def check(self) -> None:
        self.console.refresh()
        for pattern, what in CONSOLE_FAILURES:
            match = self.console.search(pattern, self.since)
            if match:
                raise Failed(f"{what}: {self.redact(match.group(0).strip())}")


@dataclass
class StillRunning:
    """The domain must stay up while we wait for it."""

    active: Callable[[], bool]

    def check(self) -> None:
        if not self.active():
            raise Failed("it stopped before it was ready")


# -- steps ----------------------------------------------------------------------------------------


@dataclass
class ConsoleMarker:
    """cloud-init's final_message for this instance-id, printed after `since` (a reboot's mark)."""

    console: ConsoleLog
    marker: str
    since: int = 0
    name: str = "console marker"

    def poll(self) -> bool:
        self.console.refresh()
        return self.marker in self.console.text[self.since:]

    def close(self) -> None:
        pass


class SshBanner:
    """The SSH server's banner on the forwarded port (slirp accepts before sshd listens)."""

    name = "ssh banner"

    def __init__(self, port: int, host: str = "127.0.0.1", patience: float = 10.0,
                 jump: Jump | None = None) -> None:
        self._watch = BannerWatch(port, host, patience, jump)

    def poll(self) -> bool:
        return self._watch.poll()

    def close(self) -> None:
        self._watch.close()


@dataclass
class SshLogin:
    """A real login (which also starts the ControlMaster): the key may arrive after sshd listens."""

    login: Callable[[], bool]
    clock: Clock = field(default_factory=Clock)
    retry: float = LOGIN_RETRY_S
    name: str = "ssh login"
    _last: float | None = None

    def poll(self) -> bool:
        now = self.clock.now()
        if self._last is not None and now - self._last < self.retry:
            return False
        self._last = now
        return self.login()

    def close(self) -> None:
        pass


@dataclass
class HostForwards:
    """--device-host-forward: each host loopback port reachable in the guest (over SSH, -R)."""

    ports: Sequence[int]
    forward: Callable[[int], None]
    name: str = "host forwards"

    def poll(self) -> bool:
        for port in self.ports:
            try:
                self.forward(port)
            except Exception as exc:  # any failure here fails the boot, in its own words
                raise Failed(str(exc)) from exc
        return True

    def close(self) -> None:
        pass


@dataclass
class CloudInitDone:
    """`cloud-init status --long` says done (exit 2 is "done, with recoverable errors")."""

    run: Callable[[str], CommandResult]
    redact: Callable[[str], str] = lambda text: text
    name: str = "cloud-init done"

    def poll(self) -> bool:
        result = self.run("cloud-init status --long")
        if result.exit_code in (0, 2) and "status: done" in result.stdout:
            return True
        status = self.redact(result.stdout.strip() or result.stderr.strip())
        raise Failed(f"cloud-init did not finish cleanly (exit {result.exit_code}):\n{status}")

    def close(self) -> None:
        pass


# -- the device's composition ---------------------------------------------------------------------


def device_steps(*, console: ConsoleLog, since: int, marker: str, ssh_port: int,
                 login: Callable[[], bool], run: Callable[[str], CommandResult],
                 forward: Callable[[int], None], host_forward: Sequence[int],
                 redact: Callable[[str], str], clock: Clock | None = None,
                 jump: Jump | None = None) -> list[Step]:
    """What a boot and a reboot wait for, in order.

    Without host forwards: the console marker, then the SSH banner, then cloud-init's status. The
    banner is watched only once the marker is there: a connection opened while the guest's network
    is still down hangs in slirp's SYN backoff and delayed readiness by up to the watch's patience
    (10 s), although sshd had long been listening. `jump`: the forward is on a remote libvirt host.
    With host forwards, the guest may need them before cloud-init can finish (an agent that must
    reach a host service holds cloud-final), so SSH comes first: banner (short patience, so slirp's
    backoff costs at most that), login, forwards, then the marker and cloud-init's status.
    """
    clock = clock or Clock()
    cloud_init = CloudInitDone(run, redact)
    on_console = ConsoleMarker(console, marker, since)
    if not host_forward:
        return [on_console, SshBanner(ssh_port, jump=jump), cloud_init]
    return [SshBanner(ssh_port, patience=3.0, jump=jump), SshLogin(login, clock), HostForwards(host_forward, forward),
            on_console, cloud_init]


def device_guards(*, console: ConsoleLog, since: int, active: Callable[[], bool],
                  redact: Callable[[str], str]) -> list[Guard]:
    return [ConsoleFailure(console, since, redact), StillRunning(active)]
