"""flightctl-device boot and doctor: a device by hand, and what this host lacks to boot one."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import threading
from dataclasses import dataclass

from pytest_flightctl_device.cli.options import add_knobs, resolve
from pytest_flightctl_device.devices.accel import Accelerator, kvm_device_usable
from pytest_flightctl_device.devices.agent import load_agent_config, throwaway_agent_config
from pytest_flightctl_device.errors import DeviceError
from pytest_flightctl_device.settings import Settings

_VM_KNOBS = ("qcow2", "agent_config", "agent_certs", "enrollment_server", "accel", "libvirt_uri",
             "memory_mib", "vcpus", "boot_timeout", "workdir", "network", "host_forward", "firmware",
             "cache_dir", "max_vms")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = subparsers.add_parser("boot", help="boot a device VM and print how to log in",
                                 description="Boot a device from a qcow2 with the agent config injected "
                                             "by cloud-init, print its ssh command, and keep it until Ctrl-C.")
    add_knobs(boot, *_VM_KNOBS)
    boot.add_argument("--run", metavar="COMMAND", help="run COMMAND in the device, print its output, "
                                                       "then stop the device (exit code = the command's)")
    boot.set_defaults(func=_boot)
    doctor = subparsers.add_parser("doctor", help="check what booting a device needs on this host")
    add_knobs(doctor, "libvirt_uri", "accel", "cache_dir", "workdir")
    doctor.set_defaults(func=_doctor)


def _boot(args: argparse.Namespace) -> int:
    from pytest_flightctl_device.devices.vm import DeviceVMFactory

    settings = resolve(args)
    if settings.qcow2 is None:
        raise DeviceError("no disk image: give --qcow2 PATH (or FLIGHTCTL_DEVICE_QCOW2).")
    from pytest_flightctl_device.artifacts.session import Artifacts

    if settings.agent_config or settings.agent_certs:
        agent = load_agent_config(config=settings.agent_config, certs_dir=settings.agent_certs,
                                  server=settings.enrollment_server)
    else:
        agent = throwaway_agent_config()
    print(f"flightctl-device: agent config: {agent.source}", file=sys.stderr)
    factory = DeviceVMFactory(settings, base_image=lambda: Artifacts(settings).qcow2(), agent=agent,
                              run_id=secrets.token_hex(4), worker="cli",
                              log=lambda line: print(f"flightctl-device: {line}", file=sys.stderr))
    try:
        vm = factory.create()
        print(f"flightctl-device: {vm.name} ready in {vm.boot_seconds:.1f} s ({vm.accel}); "
              f"console log {vm.console_path}", file=sys.stderr)
        if args.run:
            result = vm.run(args.run, check=False)
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            return result.exit_code
        print(vm.ssh_command())
        print("flightctl-device: Ctrl-C stops the device", file=sys.stderr)
        _wait_for_interrupt()
        return 0
    finally:
        factory.close()


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()


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
    try:
        from pytest_flightctl_device.devices.vm import open_libvirt

        conn = open_libvirt(settings.libvirt_uri)
        version = conn.getLibVersion()
        found.append(Check("libvirt", True, f"{settings.libvirt_uri}: libvirt "
                                            f"{version // 1000000}.{version // 1000 % 1000}.{version % 1000}"))
        conn.close()
    except DeviceError as exc:
        found.append(Check("libvirt", False, str(exc)))
    unusable = kvm_device_usable()
    verdict = Accelerator(settings.accel, settings.cache_dir / "accel.json").remembered()
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
