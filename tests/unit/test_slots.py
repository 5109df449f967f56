"""VM slots: a host-wide cap on running VMs, shared by processes through lock files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import slots
from pytest_flightctl_device.devices.slots import VMSlots, default_max_vms
from pytest_flightctl_device.errors import BootError


def test_slots_queue_and_release(tmp_path: Path) -> None:
    pool = VMSlots(tmp_path, 2)
    first, second = pool.acquire(1), pool.acquire(1)
    waits: list[str] = []
    with pytest.raises(BootError, match=r"no device VM slot came free within 0 s \(--device-max-vms 2\)"):
        pool.acquire(0.3, waits.append)
    assert waits == ["all 2 device VM slots are busy (--device-max-vms); waiting for one"]
    first.release()
    pool.acquire(1).release()
    second.release()


def test_slots_are_shared_across_processes(tmp_path: Path) -> None:
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pytest_flightctl_device.devices.slots import VMSlots
        slot = VMSlots(Path({str(tmp_path)!r}), 1).acquire(5)
        print("held", flush=True)
        time.sleep(30)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(BootError):
            VMSlots(tmp_path, 1).acquire(0.3)
    finally:
        proc.kill()
        proc.wait()
    VMSlots(tmp_path, 1).acquire(1).release()  # a killed holder frees its slot


def test_default_from_available_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slots, "available_mib", lambda: 1024 + 4 * (2048 + 192) + 100)
    assert default_max_vms(2048) == 4
    monkeypatch.setattr(slots, "available_mib", lambda: 512)
    assert default_max_vms(2048) == 1  # always at least one: a tiny runner queues, one at a time


def test_a_waiting_boot_is_announced_until_it_gets_a_slot(tmp_path: Path) -> None:
    pool = VMSlots(tmp_path, 1)
    held = pool.acquire(1)
    seen: list[list[Owner]] = []
    with pool.announce():
        seen.append(pool.waiters())
    assert seen == [[Owner.current()]]
    assert pool.waiters() == [] and not list(tmp_path.glob(f"{slots.WAITER_PREFIX}*"))  # withdrawn

    # acquire() announces only while it has to wait, and withdraws when it gives up (or gets one)
    def watch(message: str) -> None:
        seen.append(pool.waiters())

    with pytest.raises(BootError):
        pool.acquire(0.3, watch)
    assert seen[-1] == [Owner.current()] and pool.waiters() == []
    assert not pool.any_free()
    held.release()
    assert pool.any_free() and pool.try_acquire() is not None  # the probe gave the slot back


def test_a_dead_waiter_is_ignored_and_removed(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from pathlib import Path
        from pytest_flightctl_device.devices.slots import VMSlots
        with VMSlots(Path({str(tmp_path)!r}), 1).announce():
            os._exit(0)  # as if killed: the announcement is never withdrawn
    """)], check=True)
    assert child.returncode == 0
    left = list(tmp_path.glob(f"{slots.WAITER_PREFIX}*"))
    assert len(left) == 1
    (tmp_path / f"{slots.WAITER_PREFIX}garbage").write_text("not a token")
    assert VMSlots(tmp_path, 1).waiters() == []
    assert not list(tmp_path.glob(f"{slots.WAITER_PREFIX}*"))
