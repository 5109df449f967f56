"""A clone of a template (--device-fresh snapshot): the device a test gets, made new before it sees it.

CloneBoot takes a free template of its shape from the factory's TemplatePool (template.py), waits
for its revert (none before the template's first clone), then makes it a new device: its own SSH
port (a forward added to the template's qemu, which the revert drops again), a new SSH login, the
host forwards, and identity.py's script (entropy, clock, machine-id, hostname, the revert
marker check, the agent released). A clone that fails any of it, or is not ready within
CLONE_READY_S, is abandoned: its template is discarded and this device cold-boots as boot.Boot.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.accel import TCG_TIMEOUT_FACTOR
from pytest_flightctl_device.devices.boot import LOGIN_USER, Boot, BootContext
from pytest_flightctl_device.devices.console import ConsoleLog
from pytest_flightctl_device.devices.domain import add_ssh_forward, mark_kept
from pytest_flightctl_device.devices.identity import ENTROPY_BYTES, REVERT_DID_NOT_TAKE, identity_script
from pytest_flightctl_device.devices.ports import port_reservation
from pytest_flightctl_device.devices.readiness import (
    Cancelled,
    Failed,
    HostForwards,
    Readiness,
    SshLogin,
    StillRunning,
    TimedOut,
)
from pytest_flightctl_device.devices.ssh import SshClient
from pytest_flightctl_device.devices.template import CloneFailed, Template, TemplatePool, first_line, template_key
from pytest_flightctl_device.errors import BootError

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.request import VMRequest

CLONE_READY_S = 30.0  # from the revert to SSH, forwards and identity done (x4 under TCG)


class ConsoleView(ConsoleLog):
    """The template's console file from the clone's start: what this clone printed, nothing before."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.refresh()
        self._text = ""


class CloneBoot(Boot):
    """A device cloned from a template (or, when the clone is abandoned, cold-booted as usual)."""

    def __init__(self, ctx: BootContext, name: str, vm_dir: Path, request: VMRequest,
                 pool: TemplatePool) -> None:
        super().__init__(ctx, name, vm_dir, request)
        self.pool = pool
        self.template: Template | None = None
        self.outcome = ""  # "clone", or "fallback" (cold-booted after an abandoned clone)
        self._domain = name  # the libvirt domain it runs in: its template's once it is a clone

    def run(self) -> None:
        started = time.monotonic()
        key = template_key(self.request, self.ctx)
        template = self.pool.take(key, self.ctx, self.request, self.cancelled)
        try:
            self._clone(template, started)
        except CloneFailed as exc:
            self.pool.discard(template)
            self._reset()
            self.pool.count(fallback=True)
            self.ctx.log(f"device VM {self.name}: the clone of template {template.boot.name} was abandoned "
                         f"({exc}); cold-booting it instead")
            self.outcome = "fallback"
            super().run()
            return
        except BaseException:
            self.pool.discard(template)
            self._reset()
            raise
        self.template = template
        self._domain = template.boot.name
        self.outcome = "clone"
        self.pool.count(fallback=False)

    def _reset(self) -> None:
        """Forget the template's domain and SSH before a cold boot reuses this object."""
        if self.ssh is not None:
            self.ssh.close()
        self.ssh, self.dom, self.spec, self.seed_spec = None, None, None, None
        self.overlay, self.seed = self.dir / "overlay.qcow2", self.dir / "seed.iso"
        self.console_path = self.dir / "console.log"
        self.console = ConsoleLog(self.console_path)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _clone(self, template: Template, started: float) -> None:
        tboot = template.boot
        template.reverted()
        template.clones += 1
        self.dir.mkdir(mode=0o711)
        os.chmod(self.dir, 0o711)  # noqa: S103 - like every VM directory
        self.dom, self.spec, self.seed_spec = tboot.dom, tboot.spec, tboot.seed_spec
        self.ssh_port, self.accel, self.accel_reason = self._own_ssh_port(tboot), tboot.accel, tboot.accel_reason
        self.instance_id = tboot.instance_id  # its final_message marks a clone's reboot too
        self.overlay, self.seed, self.console_path = tboot.overlay, tboot.seed, tboot.console_path
        self.console = ConsoleView(tboot.console_path)
        self.ssh = SshClient(port=self.ssh_port, key=self.ctx.keypair.private_path, user=LOGIN_USER,
                             state_dir=self.dir)
        factor = TCG_TIMEOUT_FACTOR if self.accel == "tcg" else 1.0
        self._wait_clone(time.monotonic() + CLONE_READY_S * factor)
        self.ready_at = time.monotonic()
        self.seconds = self.ready_at - started

    def _own_ssh_port(self, tboot: Boot) -> int:
        """A port no earlier clone had, so that nothing that knew one reaches this device. (The
        template's own port stays forwarded too: no test is told it, and freeing it would let
        another boot take it before the next revert's qemu binds it again.)"""
        with port_reservation(self.ctx.ports_lock) as port:  # held until qemu has bound it
            try:
                add_ssh_forward(tboot.dom, port)
            except Exception as exc:
                raise CloneFailed(f"its own SSH forward could not be added ({first_line(exc)})") from None
        return port

    def _wait_clone(self, deadline: float) -> None:
        ssh = self.ssh
        assert ssh is not None
        # No SshBanner step: the snapshot was taken with sshd answering, so a clone's sshd listens
        # from its first instant, and the banner's polling would only add its poll interval.
        readiness = Readiness(
            steps=[SshLogin(lambda: ssh.run("true", check=False, timeout=30).ok),
                   HostForwards(self.ctx.host_forward, ssh.forward_remote),
                   _Identity(ssh, self.name)],
            guards=[StillRunning(self.is_active)], cancelled=self.cancelled)
        try:
            readiness.wait(deadline)
        except Cancelled:
            raise BootError(f"device VM {self.name}: the boot was cancelled.") from None
        except TimedOut as exc:
            raise CloneFailed(f"not ready in time ({exc.reason})") from None
        except Failed as exc:
            raise CloneFailed(exc.reason) from None

    def stop(self) -> None:
        template, self.template = self.template, None
        if template is None:
            super().stop()
            return
        try:
            if self.ssh is not None:
                self.ssh.close()
        finally:
            self.dom = None
            shutil.rmtree(self.dir, ignore_errors=True)
            self.pool.give_back(template)

    def keep(self) -> None:
        """A kept clone keeps its template's domain and directory (the janitor spares both)."""
        template = self.template
        if template is None:
            super().keep()
            return
        self.pool.detach(template)
        self.template = None  # stop() must not give it back
        tboot = template.boot
        (tboot.dir / janitor.KEEP_FILE).touch()
        if tboot.dom is not None and tboot.spec is not None:
            mark_kept(tboot.dom, tboot.spec)

    @property
    def domain_name(self) -> str:
        return self._domain


@dataclasses.dataclass
class _Identity:
    """The clone's identity (identity.py), with host entropy on stdin; fails when the revert did not take."""

    ssh: SshClient
    hostname: str
    name: str = "clone identity"

    def poll(self) -> bool:
        result = self.ssh.run(identity_script(hostname=self.hostname, epoch=time.time()), check=False,
                              timeout=60, input_bytes=secrets.token_bytes(ENTROPY_BYTES))
        if result.exit_code == REVERT_DID_NOT_TAKE:
            raise Failed(f"the revert did not take ({result.stderr.strip()})")
        if not result.ok:
            raise Failed(f"its identity could not be set (exit {result.exit_code}: "
                         f"{result.stderr.strip().splitlines()[-1:] or 'no output'})")
        return True

    def close(self) -> None:
        pass
