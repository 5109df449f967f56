"""VMRequest: what one test asks of its device, shared by the factory, the boot and the handle."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VMRequest:
    """What one test asks for (from the device marker, else the settings).

    Its fields are the device marker's keyword arguments: the factory checks markers against them.
    """

    memory_mib: int
    vcpus: int
    variant: str = "base"
    runcmd: tuple[str, ...] = ()
    boot_timeout: float | None = None
    fresh: str = "boot"  # boot: a cold boot; snapshot: a clone of a template (devices.template)
    labels: tuple[tuple[str, str], ...] = ()  # enrolled_device approves the device with these
