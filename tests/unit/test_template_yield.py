"""Idle snapshot templates give their --device-max-vms slot to a boot that waits for one.

The templates are stand-ins (no VM): each holds a real slot lock, as a running template does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, cast

from pytest_flightctl_device.devices import slots as slots_module
from pytest_flightctl_device.devices.slots import Slot, VMSlots
from pytest_flightctl_device.devices.template import Template, TemplatePool


class _StandinBoot:
    """What the pool uses of a TemplateBoot: a name, is_active(), stop() (which frees the slot), and
    the revert a give-back begins (nothing to revert here)."""

    def __init__(self, name: str, slot: Slot) -> None:
        self.name = name
        self.slot: Slot | None = slot
        self.stopped = threading.Event()

    def is_active(self) -> bool:
        return not self.stopped.is_set()

    def revert_paused(self) -> None:
        pass

    def stop(self) -> None:
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        self.stopped.set()


def _pool(tmp_path: Path, slots: VMSlots, count: int) -> tuple[TemplatePool, list[_StandinBoot]]:
    logged: list[str] = []
    pool = TemplatePool(tmp_path / "proc", lambda: slots.count, logged.append, "qemu:///system", slots=slots)
    boots = []
    for number in range(1, count + 1):
        slot = slots.try_acquire()
        assert slot is not None
        boot = _StandinBoot(f"t{number}", slot)
        boots.append(boot)
        pool.give_back(Template(f"key{number}", cast(Any, boot)))  # idle: waits for its next clone
    return pool, boots


def test_a_waiting_boot_gets_the_slot_of_the_least_recently_used_idle_template(tmp_path: Path) -> None:
    slots = VMSlots(tmp_path / "slots", 2)
    pool, (older, newer) = _pool(tmp_path, slots, 2)
    try:
        got = slots.acquire(60)  # blocks until the pool's watcher stops a template
        assert older.stopped.is_set() and not newer.stopped.is_set()  # one slot asked, one given
        assert pool.running() == ["t2"]
        got.release()
    finally:
        pool.close()
    assert newer.stopped.is_set() and pool.running() == []


def test_no_waiter_or_a_free_slot_keeps_idle_templates(tmp_path: Path) -> None:
    slots = VMSlots(tmp_path / "slots", 2)
    pool, (only,) = _pool(tmp_path, slots, 1)
    try:
        assert pool.yield_to_waiter() is None  # nobody waits
        with slots.announce():
            assert pool.yield_to_waiter() is None  # a slot is free: that waiter takes it
        assert not only.stopped.is_set()
    finally:
        pool.close()


def test_a_dead_waiter_stops_no_template_and_is_removed(tmp_path: Path) -> None:
    slots = VMSlots(tmp_path / "slots", 1)
    subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from pathlib import Path
        from pytest_flightctl_device.devices.slots import VMSlots
        with VMSlots(Path({str(slots.directory)!r}), 1).announce():
            os._exit(0)  # killed while waiting: its announcement stays behind
    """)], check=True)
    pool, (only,) = _pool(tmp_path, slots, 1)
    try:
        assert pool.yield_to_waiter() is None
        assert not only.stopped.is_set() and pool.running() == ["t1"]
        assert not list(slots.directory.glob(f"{slots_module.WAITER_PREFIX}*"))
    finally:
        pool.close()
