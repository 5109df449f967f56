"""Where a device boot's time goes: sequential boots of the tiny test guest, phase by phase.

Prints JSON: per phase the mean and max seconds over N boots (default 5), through one
DeviceVMFactory as the soak test uses it. Phases are timed by wrapping the library's own steps:
  seed, overlay, create_xml (libvirt createXML incl. the port pick), wait_ready (every readiness
  step: firmware, kernel, init, cloud-init's final line on the console, SSH banner, and
  cloud_init_ssh: the first ssh command, which also starts the ControlMaster), ssh_close, destroy (libvirt destroy),
  qemu_exit_s (SIGTERM until qemu is a zombie) and qemu_reap_s (zombie until reaped by PID 1;
  libvirt's destroy waits for that); create (factory.create() in all), marker_s (create's start
  until the seed's ready line is on the console) and ready_after_marker_s (the rest of create).
Usage: .venv/bin/python benchmarks/soak.py [--boots 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_flightctl_device.devices import boot as boot_module  # noqa: E402
from pytest_flightctl_device.devices.agent import throwaway_agent_config  # noqa: E402
from pytest_flightctl_device.devices.factory import DeviceVMFactory  # noqa: E402
from pytest_flightctl_device.devices.readiness import CloudInitDone, Readiness  # noqa: E402
from pytest_flightctl_device.devices.seed import ready_marker  # noqa: E402
from pytest_flightctl_device.devices.ssh import SshClient  # noqa: E402
from pytest_flightctl_device.settings import Settings  # noqa: E402
from tests.guest.build import build_guest  # noqa: E402

PHASES: dict[str, list[float]] = {}


def timed(owner: Any, name: str, label: str) -> None:
    """Replace owner.name by a wrapper that adds its duration to PHASES[label]."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            PHASES.setdefault(label, []).append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def qemu_pid(name: str) -> int | None:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and f"guest={name},".encode() in cmdline:
                return int(entry)
    return None


def watch_exit(pid: int, since: float) -> None:
    """Record when qemu became a zombie and when it disappeared."""
    zombie = None
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z" and zombie is None:
            zombie = time.perf_counter()
        time.sleep(0.005)
    gone = time.perf_counter()
    if zombie is not None:
        PHASES.setdefault("qemu_exit_s", []).append(zombie - since)
        PHASES.setdefault("qemu_reap_s", []).append(gone - zombie)


def watch_console(vm: Any, since: float, stop: threading.Event) -> None:
    """Record when the seed's ready line reached the console (the guest's own readiness)."""
    marker = ready_marker(vm.instance_id)
    while not stop.is_set():
        try:
            if marker in vm.console_path.read_text(errors="replace"):
                PHASES.setdefault("marker_s", []).append(time.perf_counter() - since)
                return
        except OSError:
            pass
        time.sleep(0.02)


def watch_marker_from_start() -> threading.Event:
    """Wrap Boot._start so every started domain gets a console watcher; returns its stop event."""
    stop = threading.Event()
    original: Callable[..., Any] = boot_module.Boot._start

    def start(self: Any, choice: Any) -> Any:
        result = original(self, choice)
        threading.Thread(target=watch_console, args=(self, CREATE_STARTED[-1], stop), daemon=True).start()
        return result

    boot_module.Boot._start = start  # type: ignore[method-assign]
    return stop


CREATE_STARTED: list[float] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=5)
    args = parser.parse_args()
    timed(boot_module, "write_seed_iso", "seed")
    timed(boot_module, "create_overlay", "overlay")
    timed(boot_module.Boot, "_start", "create_xml")
    stop = watch_marker_from_start()
    timed(Readiness, "wait", "wait_ready")
    timed(CloudInitDone, "poll", "cloud_init_ssh")
    timed(SshClient, "close", "ssh_close")
    timed(boot_module.Boot, "_stop_domain", "destroy")
    settings = dataclasses.replace(Settings.resolve({}, os.environ, {}), network="isolated", memory_mib=256,
                                   vcpus=1, boot_timeout=60.0)
    factory = DeviceVMFactory(settings, base_image=build_guest("tiny"), agent=throwaway_agent_config(),
                                        run_id=secrets.token_hex(4), worker="bench")
    factory.check()
    cycles = []
    accel = ""
    try:
        for _ in range(args.boots):
            CREATE_STARTED.append(time.perf_counter())
            vm = factory.create()
            created = time.perf_counter()
            stop.set()
            stop.clear()
            PHASES.setdefault("create", []).append(created - CREATE_STARTED[-1])
            if len(PHASES.get("marker_s", [])) == len(PHASES["create"]):
                PHASES.setdefault("ready_after_marker_s", []).append(PHASES["create"][-1] - PHASES["marker_s"][-1])
            accel = vm.accel
            pid = qemu_pid(vm.name)
            vm.run("true")
            watcher = None
            if pid is not None:
                watcher = threading.Thread(target=watch_exit, args=(pid, time.perf_counter()))
                watcher.start()
            factory.release(vm)
            if watcher is not None:
                watcher.join(timeout=30)
            cycles.append(time.perf_counter() - CREATE_STARTED[-1])
    finally:
        factory.close()
    result: dict[str, Any] = {"boots": args.boots, "accel": accel,
                              "cycle_mean_s": round(statistics.fmean(cycles), 2),
                              "boot_mean_s": round(statistics.fmean(factory.stats.times), 2)}
    for label, values in PHASES.items():
        result[label] = {"mean": round(statistics.fmean(values), 3), "max": round(max(values), 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
