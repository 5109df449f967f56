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

AGENT_UNIT = "flightctl-agent.service"
BANNER_FILE = "/etc/issue.d/flightctl-banner.issue"
ENROLL_ID = re.compile(r"/enroll/(\w+)")


class DeviceVM:
    """A booted device: run commands, copy files, reboot, read the console."""

    def __init__(self, boot: Boot) -> None:
        self._boot = boot
        self.name = boot.name
        self.dir = boot.dir
        self.request: VMRequest = boot.request
        self.variant = boot.request.variant
        self.kept = False

    # A clone (--device-fresh snapshot) learns these from its template only when it runs.
    @property
    def overlay(self) -> Path:
        return self._boot.overlay

    @property
    def seed(self) -> Path:
        return self._boot.seed

    @property
    def console_path(self) -> Path:
        return self._boot.console_path

    @property
    def instance_id(self) -> str:
        return self._boot.instance_id

    @property
    def domain_name(self) -> str:
        """Its libvirt domain: its name, or for a clone its template's (virsh destroy NAME)."""
        return self._boot.domain_name

    @property
    def ssh_port(self) -> int:
        return self._boot.ssh_port

    @property
    def host(self) -> str:
        """The libvirt host it runs on: `local`, or USER@HOST[:PORT] of a remote --device-libvirt-uri."""
        return self._boot.host_label

    @property
    def accel(self) -> str:
        """kvm or tcg: what this device runs under."""
        return self._boot.accel

    @property
    def boot_seconds(self) -> float:
        """From its VM slot to ready."""
        return self._boot.seconds

    @property
    def ready_timeout(self) -> float:
        """Seconds this device may take to become ready (its boot timeout, x4 under TCG)."""
        return self._boot.ctx.timeout_for(self.request, self.accel)

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

    # -- the flightctl agent in the device ------------------------------------------------------------

    def agent_journal(self, lines: int = 50) -> str:
        """The last `lines` of flightctl-agent's journal for its current invocation, secrets redacted."""
        command = (f"id=$(systemctl show -p InvocationID --value {AGENT_UNIT}); "
                   f'if [ -n "$id" ]; then sudo journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$id" '
                   f"| tail -n {int(lines)}; fi")
        result = self.ssh.run(command, check=False, timeout=60)
        return self._boot.ctx.redact(result.stdout.rstrip("\n"))

    def enrollment_id(self, timeout: float = 120.0) -> str:
        """The device's enrollment ID (its name), as upstream's harness reads it: the `/enroll/<id>` in
        the agent's journal for its current invocation, else in the banner file."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.agent_journal(2000)
            found = ENROLL_ID.search(text)
            if found is None:
                banner = self.ssh.run(f"cat {BANNER_FILE}", check=False, timeout=30).stdout
                found = ENROLL_ID.search(banner)
            if found is not None:
                return found.group(1)
            if time.monotonic() > deadline:
                raise DeviceError(f"device VM {self.name}: the agent logged no /enroll/<id> within {timeout:.0f} s "
                                  f"and {BANNER_FILE} has none; last lines of {AGENT_UNIT}'s journal:\n"
                                  f"{self.agent_journal(20) or '(empty)'}")
            time.sleep(POLL_S)

    def console_mark(self) -> int:
        """A console position; wait_rebooted(mark) waits for a boot that started after it."""
        return self._boot.console.mark()

    def wait_rebooted(self, since: int, timeout: float | None = None) -> None:
        """The guest rebooted itself (an OS update) after console_mark() gave `since`: wait until it
        is ready again, the same steps as a boot (SSH, forwards, cloud-init)."""
        boot = self._boot
        self.ssh.close()
        limit = boot.ctx.timeout_for(self.request, self.accel) if timeout is None else timeout
        boot.wait_ready(since, time.monotonic() + limit)
