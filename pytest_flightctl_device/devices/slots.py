"""How many device VMs may run at once on this host, across every pytest process.

A small CI runner must queue boots instead of swapping or failing: each running VM holds one of
N slot locks under the workdir; a boot that finds none free waits for one. The default N comes
from the memory the host has available and the size of a VM.

A slot can be held by a VM nobody uses right now (an idle --device-fresh snapshot template). So a
boot that has to wait announces it: a file `waiting-*` in the slots directory holding its writer's
Owner token, there while it waits. Whoever holds idle VMs polls waiters() and gives one up; a dead
waiter's file (kill -9) is judged by Owner liveness and removed, so it never causes evictions.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from filelock import FileLock, Timeout

from pytest_flightctl_device.core.atomic import sweep_temps, write_atomic
from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.errors import BootError

# Left for the host, qemu's own overhead per guest, and the slot wait's polling interval.
HOST_RESERVE_MIB = 1024
QEMU_OVERHEAD_MIB = 192
POLL_S = 0.2
WAITER_PREFIX = "waiting-"
_waiter_numbers = itertools.count(1)  # several threads of one process may wait at once


def available_mib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def default_max_vms(memory_mib: int) -> int:
    """As many VMs of `memory_mib` as fit in available memory, keeping a reserve; at least 1."""
    return max(1, (available_mib() - HOST_RESERVE_MIB) // (memory_mib + QEMU_OVERHEAD_MIB))


class Slot:
    def __init__(self, lock: FileLock) -> None:
        self._lock = lock

    def release(self) -> None:
        self._lock.release()


class VMSlots:
    """N host-wide slots; acquire() blocks (up to a timeout) until one is free."""

    def __init__(self, directory: Path, count: int) -> None:
        self.directory = directory
        self.count = count

    def try_acquire(self) -> Slot | None:
        """A free slot now, or None (placement across hosts tries each host in turn)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for index in range(self.count):
            lock = FileLock(str(self.directory / f"slot-{index}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return Slot(lock)
        return None

    def any_free(self) -> bool:
        """Is a slot free right now? (Probed by taking and releasing it: a waiter retries within POLL_S.)"""
        slot = self.try_acquire()
        if slot is None:
            return False
        slot.release()
        return True

    @contextlib.contextmanager
    def announce(self) -> Iterator[None]:
        """Say "a boot waits for a slot" while the block runs, so idle VMs give theirs up."""
        self.directory.mkdir(parents=True, exist_ok=True)
        owner = Owner.current()
        path = self.directory / f"{WAITER_PREFIX}{owner.token}-{next(_waiter_numbers)}"
        write_atomic(path, owner.token)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    def waiters(self) -> list[Owner]:
        """The live processes waiting for a slot; a dead waiter's file is removed (never counted)."""
        found: list[Owner] = []
        try:
            entries = [p for p in self.directory.iterdir() if p.name.startswith(WAITER_PREFIX)]
        except OSError:
            return found
        sweep_temps(self.directory)
        for entry in entries:
            try:
                owner = Owner.from_token(entry.read_text(encoding="ascii").strip())
            except (OSError, UnicodeDecodeError):
                continue  # withdrawn meanwhile
            if owner is not None and owner.alive():
                found.append(owner)
            else:
                entry.unlink(missing_ok=True)
        return found

    def acquire(self, timeout: float, on_wait: Callable[[str], None] | None = None,
                cancelled: threading.Event | None = None) -> Slot:
        slot = self.try_acquire()
        if slot is not None:
            return slot
        with self.announce():
            return self._wait(timeout, on_wait, cancelled)

    def _wait(self, timeout: float, on_wait: Callable[[str], None] | None,
              cancelled: threading.Event | None) -> Slot:
        return wait_for_room(
            self.try_acquire, timeout=timeout, on_wait=on_wait, cancelled=cancelled,
            busy=f"all {self.count} device VM slots are busy (--device-max-vms); waiting for one",
            timed_out=f"no device VM slot came free within {timeout:.0f} s (--device-max-vms {self.count}); "
                      "raise --device-max-vms or run fewer workers.")


_T = TypeVar("_T")


def wait_for_room(take: Callable[[], _T | None], *, timeout: float, busy: str, timed_out: str,
                  on_wait: Callable[[str], None] | None, cancelled: threading.Event | None) -> _T:
    """Poll `take` until it gives something (a slot, a host and its slot): say `busy` once, stop when
    cancelled, give up with `timed_out` after `timeout`. The one wait of slots and of placement."""
    deadline = time.monotonic() + timeout
    told = False
    while True:
        got = take()
        if got is not None:
            return got
        if not told and on_wait is not None:
            on_wait(busy)
            told = True
        if cancelled is not None and cancelled.is_set():
            raise BootError("the boot was cancelled while it waited for a device VM slot.")
        if time.monotonic() > deadline:
            raise BootError(timed_out)
        time.sleep(POLL_S)
