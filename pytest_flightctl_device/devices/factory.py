"""DeviceVMFactory: makes device VMs for one process, lazily; spares; keep or release; boot figures.

Domains are started with VIR_DOMAIN_START_AUTODESTROY on the factory's own connection, so a
killed pytest leaves no running VM; the janitor removes the files such a run leaves behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_flightctl_device.core import formats
from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.accel import Accelerator
from pytest_flightctl_device.devices.agent import AgentConfig
from pytest_flightctl_device.devices.boot import Boot, BootContext
from pytest_flightctl_device.devices.clone import CloneBoot
from pytest_flightctl_device.devices.hosts import Host, Hosts, parse_uri
from pytest_flightctl_device.devices.remap import RegistryRemap
from pytest_flightctl_device.devices.request import VMRequest
from pytest_flightctl_device.devices.slots import VMSlots, default_max_vms
from pytest_flightctl_device.devices.ssh import KeyPair, generate_keypair
from pytest_flightctl_device.devices.template import TemplatePool
from pytest_flightctl_device.devices.vm import DeviceVM
from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import VARIANTS, Settings

MARKER_ARGS = tuple(f.name for f in dataclasses.fields(VMRequest))


@dataclass
class BootStats:
    """How long devices took from request to ready, and what acceleration they ran under."""

    times: list[float] = field(default_factory=list)
    accel: set[str] = field(default_factory=set)
    hosts: dict[str, int] = field(default_factory=dict)  # libvirt host -> devices booted there
    fresh: dict[str, int] = field(default_factory=dict)  # --device-fresh snapshot: clone / fallback counts

    def add(self, seconds: float, accel: str, host: str = "local") -> None:
        self.times.append(seconds)
        self.accel.add(accel)
        self.hosts[host] = self.hosts.get(host, 0) + 1

    def merge(self, data: Mapping[str, Any]) -> None:
        """Add figures another process handed over (see as_data)."""
        self.times.extend(data.get("times", []))
        self.accel.update(data.get("accel", []))
        for host, count in dict(data.get("hosts", {})).items():
            self.hosts[host] = self.hosts.get(host, 0) + int(count)
        for outcome, count in dict(data.get("fresh", {})).items():
            self.fresh[outcome] = self.fresh.get(outcome, 0) + int(count)

    def as_data(self) -> dict[str, Any]:
        return {"times": list(self.times), "accel": sorted(self.accel), "hosts": dict(self.hosts),
                "fresh": dict(self.fresh)}

    def summary(self) -> str | None:
        if not self.times:
            return None
        times = sorted(self.times)
        hosts = ""
        if set(self.hosts) - {"local"} or len(self.hosts) > 1:
            hosts = "; per libvirt host: " + ", ".join(f"{host} {count}" for host, count in sorted(self.hosts.items()))
        return (f"{len(times)} device VM(s) booted, ready after {times[0]:.1f}-{times[-1]:.1f} s; "
                f"acceleration: {'; '.join(sorted(self.accel))}{hosts}{self._fresh_summary()}")

    def _fresh_summary(self) -> str:
        if not self.fresh:
            return ""
        return (f"; snapshot clones: {self.fresh.get('clone', 0)}, abandoned for a cold boot: "
                f"{self.fresh.get('fallback', 0)}")


@dataclass
class _Spare:
    """A device booting (or booted) in a background thread for the next default request."""

    vm: DeviceVM
    boot: Boot
    thread: threading.Thread
    errors: list[BaseException]
    messages: list[str]

    def discard(self) -> None:
        self.boot.cancelled.set()
        self.thread.join()
        self.vm.destroy()


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


class DeviceVMFactory:
    """Makes DeviceVMs for one process (one pytest session or xdist worker), lazily."""

    def __init__(self, settings: Settings, *, base_image: Path | Callable[[], Path], agent: AgentConfig,
                 run_id: str, worker: str, log: Callable[[str], None] | None = None,
                 verdict_file: Path | None = None) -> None:
        self.settings = settings
        self._base = base_image
        self.agent = agent
        self.run_id = run_id
        self.worker = worker
        self.log = log or (lambda _msg: None)
        self.owner = Owner.current()
        self.accelerator = Accelerator(settings.accel, verdict_file or settings.accel_file)
        self.stats = BootStats()
        self.vms: list[DeviceVM] = []
        self._made_for: dict[str, list[DeviceVM]] = {}
        self._count = 0
        self._hosts: Hosts | None = None
        self._keypair: KeyPair | None = None
        self._base_path: Path | None = None
        self.process_dir = settings.workdir / f"{janitor.PREFIX}{run_id}-{worker}"
        self.ports_lock = settings.workdir / ".ports.lock"
        self.slots = VMSlots(settings.workdir / ".slots",
                             settings.max_vms or default_max_vms(settings.memory_mib))
        self._spare: _Spare | None = None
        self._templates: TemplatePool | None = None

    def check(self) -> None:
        """Fail fast (before any boot) when libvirt or qemu-img is missing."""
        formats.qemu_img()
        self.conn  # noqa: B018 - connecting (to the first host that answers) is the check

    @property
    def base_image(self) -> Path:
        if self._base_path is None:
            self._base_path = self._base() if callable(self._base) else self._base
        return self._base_path

    @property
    def hosts(self) -> Hosts:
        """--device-libvirt-uri's hosts (URIs checked here, connections opened when first used)."""
        if self._hosts is None:
            settings = self.settings
            addresses = [parse_uri(uri) for uri in settings.libvirt_uri]
            self._hosts = Hosts([Host(address, workdir=settings.workdir, max_vms=settings.max_vms,
                                      default_max_vms=lambda: self.slots.count, memory_mib=settings.memory_mib,
                                      pool=settings.libvirt_pool, owner=self.owner,
                                      process_name=self.process_dir.name, log=self.log)
                                 for address in addresses], self.log)
        return self._hosts

    @property
    def conn(self) -> Any:
        """The connection of the first host that answers."""
        return self.hosts.primary().conn

    @property
    def keypair(self) -> KeyPair:
        if self._keypair is None:
            self._prepare()
            assert self._keypair is not None
        return self._keypair

    def _prepare(self) -> None:
        """First VM of this process: sweep dead runs' leftovers, make our dir and SSH key."""
        workdir = self.settings.workdir
        workdir.mkdir(parents=True, exist_ok=True, mode=0o711)
        janitor.sweep(self.conn, workdir)
        self.process_dir.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.process_dir, 0o711)  # noqa: S103 - qemu must traverse, not list
        janitor.write_owner(self.process_dir, self.owner, self.run_id, self.worker)
        self._keypair = generate_keypair(self.process_dir)

    def context(self, log: Callable[[str], None] | None = None,
                registry: RegistryRemap | None = None) -> BootContext:
        """What a boot needs from this factory (and nothing more); `registry` adds the remap."""
        settings = self.settings
        forwards = tuple(settings.host_forward)
        if registry is not None and registry.forward_port and registry.forward_port not in forwards:
            forwards += (registry.forward_port,)
        return BootContext(
            conn=self.conn, base_image=self.base_image, keypair=self.keypair, agent=self.agent,
            accelerator=self.accelerator, slots=self.slots, ports_lock=self.ports_lock, owner=self.owner,
            run_id=self.run_id, isolated=settings.network == "isolated", firmware=settings.firmware,
            keep_vm=settings.keep_vm, host_forward=forwards,
            boot_timeout=settings.boot_timeout, log=log or self.log, registry=registry, hosts=self.hosts)

    # -- requests ------------------------------------------------------------------------------------

    def request(self, *, memory_mib: int | None = None, vcpus: int | None = None, variant: str = "base",
                runcmd: Iterable[str] = (), boot_timeout: float | None = None,
                labels: Mapping[str, str] | None = None, fresh: str | None = None) -> VMRequest:
        """Validate what a test asks for before anything boots."""
        if variant not in VARIANTS:
            raise ConfigError(f"device marker variant={variant!r} is unknown; "
                              f"use one of {', '.join(VARIANTS)}.")
        for label, value in (("memory_mib", memory_mib), ("vcpus", vcpus), ("boot_timeout", boot_timeout)):
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ConfigError(f"device marker {label}={value!r} must be a positive number.")
        if labels is not None and (not isinstance(labels, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in labels.items())):
            raise ConfigError(f"device marker labels={labels!r} must map label names to strings, "
                              "such as labels={'site': 'lab'}.")
        fresh = fresh or self.settings.fresh
        self._check_fresh(fresh)
        return VMRequest(memory_mib=int(memory_mib or self.settings.memory_mib),
                         vcpus=int(vcpus or self.settings.vcpus), variant=variant,
                         runcmd=tuple(runcmd), boot_timeout=boot_timeout,
                         labels=tuple(sorted((labels or {}).items())), fresh=fresh)

    def _check_fresh(self, fresh: str) -> None:
        """--device-fresh / fresh=: known, and snapshot only where templates work (see devices.template)."""
        if fresh not in ("boot", "snapshot"):
            raise ConfigError(f"device marker fresh={fresh!r} is unknown; use 'boot' or 'snapshot'.")
        if fresh != "snapshot":
            return
        if self.settings.firmware == "uefi":
            raise ConfigError("--device-fresh snapshot does not work with --device-firmware uefi (the writable "
                              "UEFI vars cannot go into an internal snapshot); use --device-fresh boot or "
                              "--device-firmware bios.")
        if len(self.settings.libvirt_uri) > 1 or any(parse_uri(uri).remote for uri in self.settings.libvirt_uri):
            raise ConfigError("--device-fresh snapshot works with one local --device-libvirt-uri only; "
                              "use --device-fresh boot with a remote or several libvirt hosts.")

    @property
    def templates(self) -> TemplatePool:
        """--device-fresh snapshot's templates of this process (made when first asked for)."""
        if self._templates is None:
            self._templates = TemplatePool(self.process_dir, lambda: self.slots.count, self.log,
                                           self.settings.libvirt_uri[0], slots=self.slots)
        return self._templates

    def request_from_marker(self, args: Sequence[object], kwargs: Mapping[str, Any]) -> VMRequest:
        """`@pytest.mark.device(...)`'s arguments: keywords named like VMRequest's fields only."""
        unknown = sorted(set(kwargs) - set(MARKER_ARGS))
        if unknown or args:
            raise ConfigError(f"@pytest.mark.device got unexpected arguments {unknown or list(args)}; "
                              f"use keyword arguments from {', '.join(MARKER_ARGS)}.")
        return self.request(**kwargs)

    # -- making devices ------------------------------------------------------------------------------

    def create(self, request: VMRequest | None = None, *, for_test: str | None = None,
               registry: RegistryRemap | None = None, **kwargs: Any) -> DeviceVM:
        """A fresh device, ready: the spare booted in the background when it fits, else booted now.

        `for_test` (a test's node id) remembers the device, booted or not, for made_for().
        `registry` (agent_registry's remap) makes a device that pulls the variants from it; a spare
        has no remap, so it is not used for such a device (nor kept holding a slot).
        """
        asked = time.monotonic()
        request = request or self.request(**kwargs)
        self.base_image  # noqa: B018 - obtain the image (and fail) before anything is allocated
        self.keypair  # noqa: B018
        taken = self._take_spare(request if registry is None else None)
        if taken is None:
            boot = self._new_boot(request, registry=registry)
            vm = DeviceVM(boot)
            if for_test is not None:
                self._made_for.setdefault(for_test, []).append(vm)
            try:
                boot.run()
            except BaseException:
                if not self.settings.keep_vm:
                    vm.destroy()
                raise
        else:
            vm, boot = taken
            if for_test is not None:
                self._made_for.setdefault(for_test, []).append(vm)
        self.vms.append(vm)
        self.stats.add(time.monotonic() - asked, boot.accel_reason, boot.host_label)
        if isinstance(boot, CloneBoot) and boot.outcome:
            self.stats.fresh[boot.outcome] = self.stats.fresh.get(boot.outcome, 0) + 1
        if self.settings.prefetch and request == self.request() and registry is None:
            self._start_spare(request)
        return vm

    def made_for(self, test: str) -> list[DeviceVM]:
        """Every device made for this test, including one whose boot failed (for the report)."""
        return list(self._made_for.get(test, []))

    def forget(self, test: str) -> None:
        self._made_for.pop(test, None)

    def _new_boot(self, request: VMRequest, log: Callable[[str], None] | None = None,
                  registry: RegistryRemap | None = None) -> Boot:
        self._count += 1
        name, vm_dir = f"{self.process_dir.name}-{self._count}", self.process_dir / str(self._count)
        if request.fresh == "snapshot":
            return CloneBoot(self.context(log, registry), name, vm_dir, request, self.templates)
        return Boot(self.context(log, registry), name, vm_dir, request)

    def _start_spare(self, request: VMRequest) -> None:
        """--device-prefetch: boot the next default device while the current test runs."""
        messages: list[str] = []
        boot = self._new_boot(request, log=messages.append)  # the terminal is the main thread's
        errors: list[BaseException] = []

        def run() -> None:
            try:
                boot.run()
            except BaseException as exc:  # handed to the main thread, which decides
                errors.append(exc)

        thread = threading.Thread(target=run, name=f"fcdev-spare-{boot.name}", daemon=True)
        thread.start()
        self._spare = _Spare(DeviceVM(boot), boot, thread, errors, messages)

    def wait_spare(self, timeout: float | None = None) -> None:
        """Block until the background spare (if any) has booted: what a long enough test does."""
        if self._spare is not None:
            self._spare.thread.join(timeout)

    def _take_spare(self, request: VMRequest | None) -> tuple[DeviceVM, Boot] | None:
        """The spare if it was booted for `request` (None: fits no request, discard it)."""
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if request is None or spare.vm.request != request:
            spare.discard()  # an idle spare must not hold the slot this request may need
            return None
        spare.thread.join()
        for message in spare.messages:
            self.log(message)
        if spare.errors:
            spare.vm.destroy()
            self.log(f"the spare device {spare.vm.name} did not boot ({_first_line(spare.errors[0])}); "
                     "booting another")
            return None
        return spare.vm, spare.boot

    # -- the end of a device ---------------------------------------------------------------------------

    def release(self, vm: DeviceVM) -> None:
        vm.destroy()
        if vm in self.vms and not vm.kept:
            self.vms.remove(vm)

    def finish(self, vm: DeviceVM, *, failed: bool) -> str | None:
        """A test is done with `vm`: kept (with --device-keep-vm, when it failed; returns how to log in)
        or released."""
        if failed and self.settings.keep_vm:
            command = vm.keep()
            return f"log in with: {command}  (remove it with: virsh destroy {vm.domain_name})"
        self.release(vm)
        return None

    def close(self) -> None:
        """Destroy every VM this factory made (kept ones stay) and close the connection."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()
        for vm in list(self.vms):
            self.release(vm)
        self._made_for.clear()
        if self._templates is not None:
            self._templates.close()
        if self._hosts is not None:
            with contextlib.suppress(Exception):  # closing a dead connection is fine
                self._hosts.close()
            self._hosts = None
        if self.process_dir.exists() and not any(p.is_dir() for p in self.process_dir.iterdir()):
            shutil.rmtree(self.process_dir, ignore_errors=True)
