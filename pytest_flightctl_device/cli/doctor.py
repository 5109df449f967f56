"""`flightctl-device doctor`: what this host lacks to boot a device, each with what to do."""

from __future__ import annotations

import argparse
import os
import shutil
from dataclasses import dataclass

from pytest_flightctl_device.cli.options import add_knobs, resolve
from pytest_flightctl_device.devices.accel import Accelerator, kvm_device_usable
from pytest_flightctl_device.errors import DeviceError
from pytest_flightctl_device.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doctor = subparsers.add_parser("doctor", help="check what booting a device needs on this host")
    add_knobs(doctor, "libvirt_uri", "accel", "cache_dir", "workdir")
    doctor.set_defaults(func=_doctor)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True


def checks(settings: Settings) -> list[Check]:
    """Everything a device boot needs, each with what to do when it is missing."""
    found: list[Check] = []
    for tool, package in (("qemu-img", "qemu-utils / qemu-img"), ("qemu-system-x86_64", "qemu-system-x86"),
                          ("ssh", "openssh-client")):
        path = shutil.which(tool)
        found.append(Check(tool, path is not None, path or f"not on PATH; install {package}"))
    for uri in settings.libvirt_uri:
        try:
            from pytest_flightctl_device.devices.domain import open_libvirt

            conn = open_libvirt(uri)
            version = conn.getLibVersion()
            found.append(Check("libvirt", True, f"{uri}: libvirt "
                                                f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"))
            conn.close()
        except DeviceError as exc:
            found.append(Check("libvirt", False, str(exc)))
    unusable = kvm_device_usable()
    verdict = Accelerator(settings.accel, settings.accel_file).remembered()
    if unusable:
        kvm = f"{unusable}: devices boot under TCG (slow, but they work)"
    elif verdict is None:
        kvm = "/dev/kvm opens; the first boot probes whether KVM really works"
    else:
        kvm = f"probed {verdict.get('checked')}: {'works' if verdict.get('kvm') else 'broken'} " \
              f"({verdict.get('reason')})"
    found.append(Check("kvm", not unusable and (verdict is None or bool(verdict.get("kvm"))), kvm,
                       required=False))
    for label, directory in (("workdir", settings.workdir), ("cache dir", settings.cache_dir)):
        existing = next((p for p in (directory, *directory.parents) if p.exists()), directory)
        writable = os.access(existing, os.W_OK)
        found.append(Check(label, writable, f"{directory}" + ("" if writable else " is not writable")))
    return found


def _doctor(args: argparse.Namespace) -> int:
    settings = resolve(args)
    results = checks(settings)
    for check in results:
        mark = "ok" if check.ok else ("MISSING" if check.required else "note")
        print(f"{mark:8} {check.name:20} {check.detail}")
    return 0 if all(check.ok or not check.required for check in results) else 1
