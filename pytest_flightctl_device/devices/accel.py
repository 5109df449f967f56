"""KVM or TCG: decided by a real boot, remembered per host.

/dev/kvm can open and qemu can start under KVM while a nested guest kernel still hangs at the
switch to long mode (FACTS.md). So `auto` boots the real VM under KVM and trusts KVM only once
the guest kernel itself prints on the console; otherwise the VM is restarted under TCG. The
verdict is stored per host and kernel so later sessions do not pay for the probe again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock

from pytest_flightctl_device.core.atomic import sweep_temps, write_atomic
from pytest_flightctl_device.devices.console import KERNEL_OUTPUT, ConsoleLog
from pytest_flightctl_device.errors import ConfigError

# Under a working KVM the kernel prints within a second or two of the bootloader; a bootloader
# menu keeps printing while it counts down. Silence this long without kernel output = broken.
PROBE_SILENCE_S = 8.0
PROBE_CAP_S = 90.0
TCG_TIMEOUT_FACTOR = 4.0


def kvm_device_usable() -> str | None:
    """None when /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm cannot be opened ({exc.strerror})"
    os.close(fd)
    return None


def host_key() -> str:
    """Identity of this host for the verdict: hostname, kernel and CPU model."""
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            cpu = next((line for line in handle if line.startswith("model name")), "")
    except OSError:
        pass
    uname = platform.uname()
    return hashlib.sha256(f"{uname.node}\0{uname.release}\0{cpu}".encode()).hexdigest()[:24]


@dataclass(frozen=True)
class Choice:
    kvm: bool
    probe: bool  # boot under KVM and watch; fall back to TCG when the kernel stays silent
    reason: str


class Accelerator:
    """Chooses KVM or TCG for each boot from --device-accel and the remembered verdict."""

    def __init__(self, mode: str, verdict_file: Path) -> None:
        self.mode = mode
        self.verdict_file = verdict_file
        self.lock = FileLock(str(verdict_file) + ".lock")

    def remembered(self) -> dict[str, object] | None:
        try:
            data = json.loads(self.verdict_file.read_text())
        except (OSError, ValueError):
            return None
        entry = data.get(host_key()) if isinstance(data, dict) else None
        return entry if isinstance(entry, dict) else None

    def choose(self) -> Choice:
        if self.mode == "tcg":
            return Choice(False, False, "TCG (--device-accel tcg)")
        unusable = kvm_device_usable()
        if self.mode == "kvm":
            if unusable:
                raise ConfigError(f"--device-accel kvm was asked for but {unusable}; "
                                  "use --device-accel auto or tcg, or give this user access to /dev/kvm.")
            return Choice(True, True, "KVM (--device-accel kvm)")
        if unusable:
            return Choice(False, False, f"TCG ({unusable})")
        verdict = self.remembered()
        if verdict is not None:
            works = bool(verdict.get("kvm"))
            return Choice(works, False, f"{'KVM' if works else 'TCG'} (KVM probe verdict from "
                                        f"{verdict.get('checked', '?')}: {verdict.get('reason', '')})")
        return Choice(True, True, "KVM (probing: the guest kernel must print within seconds)")

    def record(self, works: bool, reason: str) -> None:
        """Remember the verdict for this host (atomically: a reader never sees half a file)."""
        self.verdict_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(self.verdict_file.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[host_key()] = {"kvm": works, "reason": reason,
                            "checked": datetime.now(UTC).isoformat(timespec="seconds")}
        sweep_temps(self.verdict_file.parent, self.verdict_file.name)  # of writers killed before their rename
        write_atomic(self.verdict_file, json.dumps(data, indent=1))


def watch_kernel(console: ConsoleLog, active: Callable[[], bool], *, since: int = 0,
                 silence: float = PROBE_SILENCE_S, cap: float = PROBE_CAP_S,
                 interval: float = 0.1) -> tuple[bool, str]:
    """Watch a KVM boot until the guest kernel prints (True) or the console falls silent (False)."""
    start = last_output = time.monotonic()
    while True:
        if console.refresh():
            last_output = time.monotonic()
        if console.search(KERNEL_OUTPUT, since):
            return True, "the guest kernel printed under KVM"
        now = time.monotonic()
        if not active():
            return False, "the domain stopped under KVM before its kernel printed"
        if now - last_output > silence:
            return False, f"no guest kernel output under KVM within {silence:.0f} s of the last console line"
        if now - start > cap:
            return False, f"no guest kernel output under KVM within {cap:.0f} s"
        time.sleep(interval)
