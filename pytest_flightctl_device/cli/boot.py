"""`flightctl-device boot`: a device by hand, with the agent config injected as the plugin does."""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading

from pytest_flightctl_device.cli.options import add_knobs, resolve
from pytest_flightctl_device.devices.agent import load_agent_config, throwaway_agent_config
from pytest_flightctl_device.errors import DeviceError

_VM_KNOBS = ("qcow2", "agent_config", "agent_certs", "enrollment_server", "accel", "libvirt_uri",
             "memory_mib", "vcpus", "boot_timeout", "workdir", "network", "host_forward", "firmware",
             "cache_dir", "max_vms")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    boot = subparsers.add_parser("boot", help="boot a device VM and print how to log in",
                                 description="Boot a device from a qcow2 with the agent config injected "
                                             "by cloud-init, print its ssh command, and keep it until Ctrl-C.")
    add_knobs(boot, *_VM_KNOBS)
    boot.add_argument("--run", metavar="COMMAND", help="run COMMAND in the device, print its output, "
                                                       "then stop the device (exit code = the command's)")
    boot.set_defaults(func=_boot)


def _boot(args: argparse.Namespace) -> int:
    settings = resolve(args)
    if settings.qcow2 is None:
        raise DeviceError("no disk image: give --qcow2 PATH (or FLIGHTCTL_DEVICE_QCOW2).")
    if settings.agent_config or settings.agent_certs:
        agent = load_agent_config(config=settings.agent_config, certs_dir=settings.agent_certs,
                                  server=settings.enrollment_server)
    else:
        agent = throwaway_agent_config()
    print(f"flightctl-device: agent config: {agent.source}", file=sys.stderr)
    from pytest_flightctl_device.artifacts.session import Artifacts
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

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
