"""DeviceVM: the handle a test holds on a booted device (commands, files, reboot, console).

What starts and runs the device lives in boot.py; what makes devices (and spares) in factory.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from pytest_flightctl_device.devices.boot import Boot
from pytest_flightctl_device.devices.readiness import POLL_S
from pytest_flightctl_device.devices.request import VMRequest
from pytest_flightctl_device.devices.seed import redacted_user_data
from pytest_flightctl_device.devices.ssh import CommandResult, SshClient
from pytest_flightctl_device.errors import BootError, DeviceError


class DeviceVM:
    """A booted device: run commands, copy files, reboot, read the console."""

    def __init__(self, boot: Boot) -> None:
        self._boot = boot
        self.name = boot.name
        self.dir = boot.dir
        self.request: VMRequest = boot.request
        self.variant = boot.request.variant
        self.overlay = boot.overlay
        self.seed = boot.seed
        self.console_path = boot.console_path
        self.instance_id = boot.instance_id
        self.kept = False

    @property
    def ssh_port(self) -> int:
        return self._boot.ssh_port

    @property
    def accel(self) -> str:
        """kvm or tcg: what this device runs under."""
        return self._boot.accel

    @property
    def boot_seconds(self) -> float:
        """From its VM slot to ready."""
        return self._boot.seconds

    @property
    def ready_at(self) -> float:
        """time.monotonic() when it became ready."""
        return self._boot.ready_at

    @property
    def ssh(self) -> SshClient:
        if self._boot.ssh is None:
            raise DeviceError(f"device VM {self.name} is not running; boot it with the factory first.")
        return self._boot.ssh

    def run(self, command: str, *, check: bool = True, timeout: float | None = 600) -> CommandResult:
        """Run a shell command in the device as `user`; check=True raises on a non-zero exit."""
        return self.ssh.run(command, check=check, timeout=timeout)

    def put_file(self, local: Path | str, remote: str, *, mode: int | None = None,
                 sudo: bool = False) -> None:
        self.ssh.put_file(Path(local), remote, mode=mode, sudo=sudo)

    def get_file(self, remote: str, local: Path | str, *, sudo: bool = False) -> Path:
        return self.ssh.get_file(remote, Path(local), sudo=sudo)

    def reboot(self) -> None:
        """Reboot the guest and wait until it is ready again (the same steps as a boot)."""
        boot = self._boot
        since = boot.console.mark()
        self.ssh.run("sudo systemctl reboot || sudo reboot", check=False, timeout=15)
        self.ssh.close()
        boot.wait_ready(since, time.monotonic() + boot.ctx.timeout_for(self.request, self.accel))

    def console_text(self) -> str:
        self._boot.console.refresh()
        return self._boot.console.text

    def wait_for_console(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the console shows `pattern`; on timeout quote the console tail."""
        deadline = time.monotonic() + timeout
        console = self._boot.console
        while True:
            console.refresh()
            match = console.search(pattern)
            if match:
                return match
            if time.monotonic() > deadline:
                raise BootError(f"device VM {self.name}: console did not show {str(pattern)!r} within "
                                f"{timeout:.0f} s; last console lines:\n{self.console_tail(20)}")
            time.sleep(POLL_S)

    def ssh_command(self) -> str:
        return self.ssh.command_line()

    def image(self, variant: str) -> str:
        """The canonical name of `variant` (`<image_repo>:<variant>-<tag>`), which this device pulls
        from the test registry through its remap; only for a test that requested agent_registry."""
        registry = self._boot.ctx.registry
        if registry is None:
            raise DeviceError(f"device VM {self.name} pulls from no test registry; request the agent_registry "
                              "fixture in this test (def test_x(agent_registry, device_vm)).")
        return registry.image(variant)

    def console_tail(self, lines: int = 50) -> str:
        return self._boot.console_tail(lines)

    def domain_xml(self) -> str:
        return self._boot.domain_xml()

    def user_data_redacted(self) -> str:
        return redacted_user_data(self._boot.seed_spec) if self._boot.seed_spec else ""

    def is_active(self) -> bool:
        return self._boot.is_active()

    def keep(self) -> str:
        """Leave this VM running after the session (--device-keep-vm); return its ssh command."""
        self.kept = True
        self._boot.keep()
        return self.ssh_command()

    def destroy(self) -> None:
        """Stop the domain and remove its files (not when kept)."""
        if not self.kept:
            self._boot.stop()
