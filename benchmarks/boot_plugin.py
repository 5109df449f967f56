"""Plugin contender: DeviceVMFactory.create() on a factory that already exists, as `device_vm` does.

The plugin's phases are timed without editing the library: while a round runs, thin wrappers around
a few of its functions record when each returned (monotonic clock, relative to the create() call).
The wrappers only read a clock; they are removed after every round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from boot_common import KERNEL, ConsoleWatch, console_patterns, cpu_seconds, libvirt_qemu_pid

from pytest_flightctl_device.devices import boot as boot_module
from pytest_flightctl_device.devices.agent import AgentConfig
from pytest_flightctl_device.devices.boot import Boot
from pytest_flightctl_device.devices.console import ConsoleLog
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.devices.readiness import CloudInitDone
from pytest_flightctl_device.devices.slots import VMSlots
from pytest_flightctl_device.devices.ssh import BannerWatch
from pytest_flightctl_device.settings import Settings, default_libvirt_uri

MARKER_PREFIX = "fcdev-ready i-"  # the plugin's final_message (seed.ready_marker) up to the id


class PhaseClock:
    """First time (s after t0) each named event happened."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = round(time.monotonic() - self.t0, 3)


def _after(owner: Any, attr: str, clock: PhaseClock, name: str,
           when: Callable[[Any, Any], bool] = lambda _self, _result: True,
           before: str | None = None) -> Callable[[], None]:
    """Wrap owner.attr so that `name` is marked when it returns (and `before` when it is entered)."""
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if before:
            clock.mark(before)
        result = original(*args, **kwargs)
        if when(args[0] if args else None, result):
            clock.mark(name)
        return result

    setattr(owner, attr, wrapper)
    return lambda: setattr(owner, attr, original)


@contextlib.contextmanager
def instrumented(clock: PhaseClock, marker_prefix: str) -> Iterator[None]:
    """Phase marks: slot, seed, overlay, domain started, kernel/marker noticed, banner, cloud-init check."""
    undo = [
        _after(VMSlots, "acquire", clock, "slot_acquired"),
        _after(boot_module, "write_seed_iso", clock, "seed_written"),
        _after(boot_module, "create_overlay", clock, "overlay_created"),
        _after(Boot, "_start", clock, "domain_started"),
        _after(ConsoleLog, "refresh", clock, "plugin_saw_kernel",
               lambda log, _r: bool(KERNEL.search(log.text))),
        _after(ConsoleLog, "refresh", clock, "plugin_saw_ready_marker",
               lambda log, _r: marker_prefix in log.text),
        _after(BannerWatch, "poll", clock, "plugin_saw_banner", lambda _w, result: bool(result)),
        _after(CloudInitDone, "poll", clock, "cloud_init_checked_over_ssh",
               before="cloud_init_check_started"),
    ]
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


class PluginContender:
    name = "plugin"

    def __init__(self, base: Path, agent: AgentConfig, *, memory_mib: int, vcpus: int, workdir: Path,
                 timeout: float) -> None:
        settings = dataclasses.replace(
            Settings(),
            network="isolated", accel="tcg", memory_mib=memory_mib, vcpus=vcpus, workdir=workdir,
            cache_dir=workdir / "cache", libvirt_uri=default_libvirt_uri(), boot_timeout=timeout / 4)
        self.run_id = secrets.token_hex(4)
        self.factory = DeviceVMFactory(settings, base_image=base, agent=agent, run_id=self.run_id, worker="bench")
        # What the session fixture has done before any test asks for a device: connect, sweep, key.
        self.factory.check()
        self.factory.keypair  # noqa: B018

    def round(self) -> dict[str, Any]:
        factory = self.factory
        clock = PhaseClock()
        process_dir = factory.process_dir

        def console() -> Path | None:  # one VM at a time: the only console under the process dir
            found = sorted(process_dir.glob("*/console.log"))
            return found[-1] if found else None

        with instrumented(clock, MARKER_PREFIX):
            clock.t0 = time.monotonic()
            watch = ConsoleWatch(console, console_patterns(MARKER_PREFIX), clock.t0,
                                 pid_of=self._running_pid)
            watch.start()
            try:
                vm = factory.create(factory.request())
                ready = time.monotonic() - clock.t0
            finally:
                seen = watch.stop()
        try:
            pid = libvirt_qemu_pid(vm.name)
            return {"ready_s": round(ready, 3), "qemu_cpu_s": cpu_seconds(pid) if pid else None,
                    "phases": clock.marks, "console": seen, "console_qemu_cpu_s": watch.cpu_seen,
                    "name": vm.name, "accel": vm.accel}
        finally:
            factory.release(vm)

    def _running_pid(self) -> int | None:
        """qemu PID of this factory's running domain (one at a time), from libvirt's pid files."""
        found = sorted(Path("/run/libvirt/qemu").glob(f"{self.domain_prefix}*.pid"))
        return libvirt_qemu_pid(found[-1].name[:-4]) if found else None

    @property
    def domain_prefix(self) -> str:
        """Every domain this factory names starts with this (fcdev-<run>-<worker>-)."""
        return f"{self.factory.process_dir.name}-"

    def close(self) -> None:
        self.factory.close()


def measure_prefetch(base: Path, agent: AgentConfig, *, memory_mib: int, vcpus: int, workdir: Path,
                     timeout: float, rounds: int) -> list[float]:
    """--device-prefetch: request-to-ready when the previous test lasted long enough for the spare to
    boot. Measured on its own, after the interleaved rounds, so the background boot never competes
    with another contender's round."""
    settings = dataclasses.replace(
        Settings(),
        network="isolated", accel="tcg", memory_mib=memory_mib, vcpus=vcpus, workdir=workdir,
        cache_dir=workdir / "cache", libvirt_uri=default_libvirt_uri(), boot_timeout=timeout / 4,
        prefetch=True, max_vms=2)
    factory = DeviceVMFactory(settings, base_image=base, agent=agent, run_id=secrets.token_hex(4),
                              worker="bench")
    samples: list[float] = []
    try:
        factory.check()
        factory.keypair  # noqa: B018
        vm = factory.create()
        for _ in range(rounds):
            factory.wait_spare(timeout)  # the test that used `vm` ran at least one boot long
            factory.release(vm)
            asked = time.monotonic()
            vm = factory.create()
            samples.append(round(time.monotonic() - asked, 3))
        factory.release(vm)
    finally:
        factory.close()
    return samples
