"""One device VM's life on libvirt: slot, seed, overlay, domain, readiness, teardown.

A boot gets a BootContext (what it needs from its session: the connection, the key, the agent
config, the accelerator, the slots, the port lock, who owns it) and nothing else, so it can be
read, and driven, without the factory that made it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.accel import TCG_TIMEOUT_FACTOR, Accelerator, Choice, watch_kernel
from pytest_flightctl_device.devices.agent import AgentConfig, redact
from pytest_flightctl_device.devices.console import ConsoleLog
from pytest_flightctl_device.devices.domain import (
    DomainSpec,
    create_overlay,
    destroy_domain,
    mark_kept,
    render,
    start_domain,
)
from pytest_flightctl_device.devices.readiness import (
    Cancelled,
    Failed,
    Readiness,
    TimedOut,
    device_guards,
    device_steps,
)
from pytest_flightctl_device.devices.seed import SeedSpec, new_instance_id, ready_marker, write_seed_iso
from pytest_flightctl_device.devices.slots import Slot, VMSlots
from pytest_flightctl_device.devices.ssh import KeyPair, SshClient
from pytest_flightctl_device.errors import BootError

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.console_stream import ConsoleStream
    from pytest_flightctl_device.devices.hosts import Host, Hosts
    from pytest_flightctl_device.devices.remap import RegistryRemap
    from pytest_flightctl_device.devices.request import VMRequest

SLOT_WAIT_S = 3600.0  # a queued boot waits this long for a free VM slot (--device-max-vms)
LOGIN_USER = "user"


@dataclass(frozen=True)
class BootContext:
    """What a boot needs from the session that asks for it."""

    conn: Any  # the libvirt connection of the host this boot is placed on (once run() placed it)
    base_image: Path
    keypair: KeyPair
    agent: AgentConfig
    accelerator: Accelerator
    slots: VMSlots
    ports_lock: Path
    owner: Owner
    run_id: str
    isolated: bool
    firmware: str
    keep_vm: bool
    host_forward: tuple[int, ...]
    boot_timeout: float
    log: Callable[[str], None]
    registry: RegistryRemap | None = None  # the test asked for agent_registry: the remap goes in
    hosts: Hosts | None = None  # --device-libvirt-uri's hosts: run() places the boot on one of them
    host: Host | None = None  # the host it was placed on (conn is its connection)

    @property
    def remote(self) -> bool:
        return self.host is not None and self.host.remote

    def timeout_for(self, request: VMRequest, accel: str) -> float:
        base = request.boot_timeout or self.boot_timeout
        return base * (TCG_TIMEOUT_FACTOR if accel == "tcg" else 1.0)

    def redact(self, text: str) -> str:
        return redact(text, self.agent.secrets())


def last_line(text: str) -> str:
    """The last non-empty line: where qemu's own complaint ends up in a libvirt start error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


class Boot:
    """Starts one device and keeps what runs it: its slot, domain, console and SSH client."""

    genid = False  # a <genid/> in its domain (devices.template's templates set it)

    def __init__(self, ctx: BootContext, name: str, vm_dir: Path, request: VMRequest) -> None:
        self.ctx = ctx
        self.name = name
        self.dir = vm_dir
        self.request = request
        self.overlay = vm_dir / "overlay.qcow2"
        self.seed = vm_dir / "seed.iso"
        self.console_path = vm_dir / "console.log"
        self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        self.instance_id = new_instance_id()
        self.console = ConsoleLog(self.console_path)
        self.cancelled = threading.Event()  # set to abandon a background (spare) boot
        self.ssh_port = 0
        self.accel = ""
        self.accel_reason = ""
        self.seconds = 0.0
        self.ready_at = 0.0  # time.monotonic() when it became ready
        self.dom: Any = None
        self.spec: DomainSpec | None = None
        self.seed_spec: SeedSpec | None = None
        self.ssh: SshClient | None = None
        self._slot: Slot | None = None
        self.host_label = "local"
        self.console_stream: ConsoleStream | None = None
        self.volumes: list[str] = []  # on a remote host: this boot's volumes, removed at stop()

    # -- the boot --------------------------------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        if ctx.hosts is not None:
            host, self._slot = ctx.hosts.acquire(self.request.memory_mib, SLOT_WAIT_S, ctx.log, self.cancelled)
            self.ctx = ctx = dataclasses.replace(ctx, conn=host.conn, host=host)
            self.host_label = host.label
        else:
            self._slot = ctx.slots.acquire(SLOT_WAIT_S, ctx.log, self.cancelled)
        started = time.monotonic()
        self.dir.mkdir(mode=0o711)
        os.chmod(self.dir, 0o711)  # noqa: S103 - qemu (another user) must traverse, not list
        self.seed_spec = self.make_seed_spec()
        write_seed_iso(self.seed_spec, self.seed)
        choice = ctx.accelerator.choose()
        if choice.probe:
            with ctx.accelerator.lock:
                choice = ctx.accelerator.choose()  # another worker may have probed meanwhile
                choice = self._start_probing(choice) if choice.probe else self._start(choice)
        else:
            self._start(choice)
        self.accel = "kvm" if choice.kvm else "tcg"
        self.accel_reason = choice.reason
        self.ssh = SshClient(port=self.ssh_port, key=ctx.keypair.private_path, user=LOGIN_USER,
                             state_dir=self.dir,
                             jump=ctx.host.address.jump() if ctx.host is not None and ctx.remote else None)
        self.wait_ready(0, started + ctx.timeout_for(self.request, self.accel))
        self.ready_at = time.monotonic()
        self.seconds = self.ready_at - started

    def make_seed_spec(self) -> SeedSpec:
        """This boot's seed: the agent's files, plus agent_registry's remap when the test asked for it."""
        ctx, remap = self.ctx, self.ctx.registry
        return SeedSpec(instance_id=self.instance_id, hostname=self.name, authorized_key=ctx.keypair.public_line,
                        files=ctx.agent.files + (remap.files() if remap else ()), mac=self.mac,
                        runcmd=(remap.runcmd() if remap else ()) + self.request.runcmd)

    def _start_probing(self, choice: Choice) -> Choice:
        """Boot under KVM and trust it only if the kernel prints; else restart under TCG."""
        accelerator = self.ctx.accelerator
        try:
            self._start(choice)
        except BootError as exc:
            works, reason = False, f"qemu did not start under KVM ({last_line(str(exc))})"
        else:
            works, reason = watch_kernel(self.console, self.is_active)
        if accelerator.mode == "auto":
            accelerator.record(works, reason)
        if works:
            return choice
        self._stop_domain()
        if accelerator.mode == "kvm":
            raise BootError(f"--device-accel kvm was asked for but KVM does not work here: {reason} "
                            "(nested KVM is likely broken); use --device-accel auto or tcg. "
                            f"Last console lines:\n{self.console_tail(20)}")
        self.ctx.log(f"KVM does not work on this host ({reason}); using TCG (software emulation).")
        self.console = ConsoleLog(self.console_path)
        tcg = Choice(False, False, f"TCG (KVM probe failed: {reason})")
        self._start(tcg)
        return tcg

    def _start(self, choice: Choice) -> Choice:
        ctx = self.ctx
        if ctx.remote:
            overlay, seed = self._remote_files()
        else:
            self.overlay.unlink(missing_ok=True)
            create_overlay(ctx.base_image, self.overlay)
            overlay, seed = self.overlay, self.seed
        self.console_path.unlink(missing_ok=True)
        created = datetime.now(UTC).isoformat(timespec="seconds")

        def spec_for(port: int) -> DomainSpec:
            return DomainSpec(
                name=self.name, kvm=choice.kvm, memory_mib=self.request.memory_mib, vcpus=self.request.vcpus,
                overlay=overlay, seed=seed, console=self.console_path, ssh_port=port, mac=self.mac,
                isolated=ctx.isolated, firmware=ctx.firmware, owner=ctx.owner, run_id=ctx.run_id,
                created=created, nvram=None if ctx.remote else self.dir / "VARS.fd", console_pty=ctx.remote,
                genid=self.genid)

        self.dom, self.spec = start_domain(ctx.conn, spec_for, ports_lock=ctx.ports_lock,
                                           base_image=ctx.base_image, autodestroy=not ctx.keep_vm,
                                           ports=ctx.host.ports(ctx.ports_lock) if ctx.host is not None else None,
                                           paused=ctx.remote)
        self.ssh_port = self.spec.ssh_port
        if ctx.remote:
            self._attach_console()
        return choice

    def _remote_files(self) -> tuple[Path, Path]:
        """The overlay (over the base uploaded once per host) and the seed, as volumes on the host."""
        from pytest_flightctl_device.devices.volumes import base_digest_cached, qcow2_virtual_size

        host = self.ctx.host
        assert host is not None
        host.write_owner()
        store = host.store
        base = store.base(self.ctx.base_image, base_digest_cached(self.ctx.base_image))
        overlay_name, seed_name = f"{self.name}.overlay.qcow2", f"{self.name}.seed.iso"
        for name in (overlay_name, seed_name):
            store.delete(name)
        self.volumes = [overlay_name, seed_name]
        overlay = store.overlay(overlay_name, base, qcow2_virtual_size(self.ctx.base_image))
        seed = store.upload(seed_name, self.seed)
        return Path(overlay), Path(seed)

    def _attach_console(self) -> None:
        """The remote console drained into console.log, then the guest's CPUs started."""
        from pytest_flightctl_device.devices.console_stream import ConsoleStream

        self.console_stream = ConsoleStream(self.ctx.conn, self.dom, self.console_path)
        try:
            self.console_stream.start()
            self.dom.resume()
        except Exception as exc:
            raise BootError(f"device VM {self.name}: cannot attach its console on {self.host_label} "
                            f"({exc})") from None

    def wait_ready(self, since: int, deadline: float) -> None:
        """Wait for the named readiness steps (see readiness.device_steps); fail fast, say why."""
        ssh = self.ssh
        assert ssh is not None
        readiness = Readiness(
            steps=device_steps(console=self.console, since=since, marker=ready_marker(self.instance_id),
                               ssh_port=self.ssh_port,
                               login=lambda: ssh.run("true", check=False, timeout=30).ok,
                               run=lambda command: ssh.run(command, check=False, timeout=120),
                               forward=ssh.forward_remote, host_forward=self.ctx.host_forward,
                               redact=self.ctx.redact, jump=ssh.jump),
            guards=device_guards(console=self.console, since=since, active=self.is_active,
                                 redact=self.ctx.redact),
            cancelled=self.cancelled)
        try:
            readiness.wait(deadline)
        except Cancelled:
            raise BootError(f"device VM {self.name}: the boot was cancelled.") from None
        except TimedOut as exc:
            raise BootError(f"device VM {self.name} was not ready in time ({exc.reason}; accel {self.accel}; "
                            "raise --device-boot-timeout if the guest is just slow); "
                            f"last 50 console lines:\n{self.console_tail()}") from None
        except Failed as exc:
            raise BootError(f"device VM {self.name}: {exc.reason}; "
                            f"last console lines:\n{self.console_tail()}") from None

    # -- what the handle reads -----------------------------------------------------------------------

    @property
    def domain_name(self) -> str:
        """The libvirt domain it runs in (a clone runs in its template's)."""
        return self.name

    def console_tail(self, lines: int = 50) -> str:
        return self.ctx.redact(self.console.tail(lines))

    def domain_xml(self) -> str:
        if self.dom is not None:
            with contextlib.suppress(Exception):  # the domain may be gone: fall back to what we sent
                return str(self.dom.XMLDesc(0))
        return render(self.spec) if self.spec else ""

    def is_active(self) -> bool:
        try:
            return bool(self.dom is not None and self.dom.isActive())
        except Exception:  # a vanished domain is simply not active
            return False

    # -- the end -------------------------------------------------------------------------------------

    def keep(self) -> None:
        """Mark files and domain as kept on purpose: the janitor spares them after this run."""
        (self.dir / janitor.KEEP_FILE).touch()
        if self.dom is not None and self.spec is not None:
            mark_kept(self.dom, self.spec)

    def _stop_domain(self) -> None:
        if self.console_stream is not None:  # first: the stream must not outlive its console
            self.console_stream.stop()
            self.console_stream = None
        if self.dom is not None:
            destroy_domain(self.dom)
            self.dom = None

    def stop(self) -> None:
        """Close SSH, stop the domain, remove the files, free the slot (whatever fails on the way)."""
        try:
            if self.ssh is not None:
                self.ssh.close()
        finally:
            self._stop_domain()
            if self.ctx.host is not None and self.volumes:
                for name in self.volumes:
                    with contextlib.suppress(Exception):  # a host gone away: its janitor sweeps them
                        self.ctx.host.store.delete(name)
                self.volumes = []
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._slot is not None:
                self._slot.release()
                self._slot = None
