"""DeviceVM and its factory: overlay, seed, transient domain, readiness, teardown.

A device VM is a transient libvirt domain over a throwaway qcow2 overlay of the (read-only)
base image, with a NoCloud seed carrying the agent config. Domains are started with
VIR_DOMAIN_START_AUTODESTROY on the factory's own connection, so a killed pytest leaves no
running VM; the janitor removes the files such a run leaves behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.accel import TCG_TIMEOUT_FACTOR, Accelerator, Choice, watch_kernel
from pytest_flightctl_device.devices.agent import AgentConfig, redact
from pytest_flightctl_device.devices.console import CLOUD_INIT_ERROR, NO_BOOT_DEVICE, PANIC, ConsoleLog
from pytest_flightctl_device.devices.domain import METADATA_KEY, METADATA_NS, DomainSpec, owner_metadata, render
from pytest_flightctl_device.devices.ports import port_reservation
from pytest_flightctl_device.devices.seed import (
    SeedSpec,
    new_instance_id,
    ready_marker,
    redacted_user_data,
    write_seed_iso,
)
from pytest_flightctl_device.devices.slots import Slot, VMSlots, default_max_vms
from pytest_flightctl_device.devices.ssh import BannerWatch, CommandResult, KeyPair, SshClient, generate_keypair
from pytest_flightctl_device.errors import BootError, ConfigError, DeviceError, MissingToolError
from pytest_flightctl_device.settings import VARIANTS, Settings

POLL_S = 0.2
SLOT_WAIT_S = 3600.0  # a queued boot waits this long for a free VM slot (--device-max-vms)
LOGIN_USER = "user"


def open_libvirt(uri: str) -> Any:
    """A libvirt connection, or MissingToolError saying how to get one."""
    try:
        import libvirt
    except ImportError:
        raise MissingToolError("libvirt-python is not installed; pip install libvirt-python "
                               "(it needs libvirt-dev and pkg-config to build).") from None
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no stray stderr noise
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise MissingToolError(
            f"cannot connect to libvirt at {uri} ({exc.get_error_message()}); start libvirtd "
            "(systemctl start libvirtd, or libvirtd -d) or set --device-libvirt-uri."
        ) from None


def create_overlay(base: Path, overlay: Path) -> None:
    """A copy-on-write qcow2 over `base`; qemu only ever opens the base read-only."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise MissingToolError("qemu-img is not installed; install qemu-utils (Debian) or qemu-img (Fedora).")
    # 0600 from its first byte (the guest writes the injected secrets into it); qemu-img
    # truncates an existing file and keeps its mode.
    os.close(os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                           str(overlay)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        overlay.unlink(missing_ok=True)
        why = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise ConfigError(f"cannot create an overlay over {base} ({why}); give a qcow2 image with --device-qcow2.")


@dataclass(frozen=True)
class VMRequest:
    """What one test asks for (from the device marker, else the settings)."""

    memory_mib: int
    vcpus: int
    variant: str = "base"
    runcmd: tuple[str, ...] = ()
    boot_timeout: float | None = None


class DeviceVM:
    """A booted device: run commands, copy files, reboot, read the console."""

    def __init__(self, factory: DeviceVMFactory, name: str, vm_dir: Path, request: VMRequest) -> None:
        self._factory = factory
        self.name = name
        self.dir = vm_dir
        self.request = request
        self.variant = request.variant
        self.overlay = vm_dir / "overlay.qcow2"
        self.seed = vm_dir / "seed.iso"
        self.console_path = vm_dir / "console.log"
        self.mac = "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))
        self.instance_id = new_instance_id()
        self.ssh_port = 0
        self.accel = ""
        self.boot_seconds = 0.0
        self.ready_at = 0.0  # time.monotonic() when it became ready
        self._dom: Any = None
        self._spec: DomainSpec | None = None
        self._seed_spec: SeedSpec | None = None
        self._console = ConsoleLog(self.console_path)
        self._ssh: SshClient | None = None
        self._slot: Slot | None = None
        self.kept = False
        self.log = factory.log
        self.cancelled = threading.Event()  # set to abandon a background (spare) boot

    # -- public API ---------------------------------------------------------------------------

    @property
    def ssh(self) -> SshClient:
        if self._ssh is None:
            raise DeviceError(f"device VM {self.name} is not running; boot it with the factory first.")
        return self._ssh

    def run(self, command: str, *, check: bool = True, timeout: float | None = 600) -> CommandResult:
        """Run a shell command in the device as `user`; check=True raises on a non-zero exit."""
        return self.ssh.run(command, check=check, timeout=timeout)

    def put_file(self, local: Path | str, remote: str, *, mode: int | None = None,
                 sudo: bool = False) -> None:
        self.ssh.put_file(Path(local), remote, mode=mode, sudo=sudo)

    def get_file(self, remote: str, local: Path | str, *, sudo: bool = False) -> Path:
        return self.ssh.get_file(remote, Path(local), sudo=sudo)

    def reboot(self) -> None:
        """Reboot the guest and wait until it is ready again (SSH and cloud-init)."""
        since = self._console.mark()
        self.ssh.run("sudo systemctl reboot || sudo reboot", check=False, timeout=15)
        self.ssh.close()
        self._wait_ready(since, time.monotonic() + self._factory.timeout_for(self.request, self.accel))

    def console_text(self) -> str:
        self._console.refresh()
        return self._console.text

    def wait_for_console(self, pattern: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        """Wait until the console shows `pattern`; on timeout quote the console tail."""
        deadline = time.monotonic() + timeout
        while True:
            self._console.refresh()
            match = self._console.search(pattern)
            if match:
                return match
            if time.monotonic() > deadline:
                raise BootError(f"device VM {self.name}: console did not show {str(pattern)!r} within "
                                f"{timeout:.0f} s; last console lines:\n{self.console_tail(20)}")
            time.sleep(POLL_S)

    def ssh_command(self) -> str:
        return self.ssh.command_line()

    def console_tail(self, lines: int = 50) -> str:
        return redact(self._console.tail(lines), self._factory.agent.secrets())

    def domain_xml(self) -> str:
        if self._dom is not None:
            with contextlib.suppress(Exception):  # the domain may be gone: fall back to what we sent
                return str(self._dom.XMLDesc(0))
        return render(self._spec) if self._spec else ""

    def user_data_redacted(self) -> str:
        return redacted_user_data(self._seed_spec) if self._seed_spec else ""

    def is_active(self) -> bool:
        try:
            return bool(self._dom is not None and self._dom.isActive())
        except Exception:  # a vanished domain is simply not active
            return False

    def keep(self) -> str:
        """Leave this VM running after the session (--device-keep-vm); return its ssh command."""
        self.kept = True
        (self.dir / janitor.KEEP_FILE).touch()
        if self._dom is not None and self._spec is not None:
            import libvirt

            self._dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                                  owner_metadata(self._spec, keep=True), METADATA_KEY, METADATA_NS,
                                  libvirt.VIR_DOMAIN_AFFECT_LIVE)
        return self.ssh_command()

    def destroy(self) -> None:
        """Stop the domain and remove its files (not when kept)."""
        if self.kept:
            return
        try:
            if self._ssh is not None:
                self._ssh.close()
        finally:  # whatever SSH does, the domain, its files and its slot go
            self._destroy_domain()
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._slot is not None:
                self._slot.release()
                self._slot = None

    # -- boot ---------------------------------------------------------------------------------

    def _destroy_domain(self) -> None:
        if self._dom is None:
            return
        with contextlib.suppress(Exception):  # already gone is the goal
            if self._dom.isActive():
                self._dom.destroy()
        self._dom = None

    def boot(self) -> None:
        factory = self._factory
        self._slot = factory.slots.acquire(SLOT_WAIT_S, self.log, self.cancelled)
        started = time.monotonic()
        self.dir.mkdir(mode=0o711)
        os.chmod(self.dir, 0o711)  # noqa: S103 - qemu (another user) must traverse, not list
        self._seed_spec = SeedSpec(instance_id=self.instance_id, hostname=self.name,
                                   authorized_key=factory.keypair.public_line, files=factory.agent.files,
                                   mac=self.mac, runcmd=self.request.runcmd)
        write_seed_iso(self._seed_spec, self.seed)
        choice = factory.accelerator.choose()
        if choice.probe:
            with factory.accelerator.lock:
                choice = factory.accelerator.choose()  # another worker may have probed meanwhile
                if choice.probe:
                    choice = self._start_probing(choice)
                else:
                    self._start(choice.kvm)
        else:
            self._start(choice.kvm)
        self.accel = "kvm" if choice.kvm else "tcg"
        factory.note_accel(choice)
        self._ssh = SshClient(port=self.ssh_port, key=factory.keypair.private_path, user=LOGIN_USER,
                              state_dir=self.dir)
        self._wait_ready(0, started + factory.timeout_for(self.request, self.accel))
        self.ready_at = time.monotonic()
        self.boot_seconds = self.ready_at - started

    def _start_probing(self, choice: Choice) -> Choice:
        """Boot under KVM and trust it only if the kernel prints; else restart under TCG."""
        accelerator = self._factory.accelerator
        try:
            self._start(kvm=True)
        except BootError as exc:
            works, reason = False, f"qemu did not start under KVM ({_first_line(str(exc))})"
        else:
            works, reason = watch_kernel(self._console, self.is_active)
        if accelerator.mode == "auto":
            accelerator.record(works, reason)
        if works:
            return choice
        self._destroy_domain()
        if accelerator.mode == "kvm":
            raise BootError(f"--device-accel kvm was asked for but KVM does not work here: {reason} "
                            "(nested KVM is likely broken); use --device-accel auto or tcg. "
                            f"Last console lines:\n{self.console_tail(20)}")
        self.log(f"KVM does not work on this host ({reason}); using TCG (software emulation).")
        self._console = ConsoleLog(self.console_path)
        self._start(kvm=False)
        return Choice(False, False, f"TCG (KVM probe failed: {reason})")

    def _start(self, kvm: bool) -> None:
        factory = self._factory
        self.overlay.unlink(missing_ok=True)
        create_overlay(factory.base_image, self.overlay)
        self.console_path.unlink(missing_ok=True)
        import libvirt

        flags = 0 if factory.settings.keep_vm else libvirt.VIR_DOMAIN_START_AUTODESTROY
        last_error = ""
        for _attempt in range(3):
            with port_reservation(factory.ports_lock) as port:
                self.ssh_port = port
                self._spec = DomainSpec(
                    name=self.name, kvm=kvm, memory_mib=self.request.memory_mib, vcpus=self.request.vcpus,
                    overlay=self.overlay, seed=self.seed, console=self.console_path, ssh_port=port,
                    mac=self.mac, isolated=factory.settings.network == "isolated",
                    firmware=factory.settings.firmware, owner=factory.owner, run_id=factory.run_id,
                    created=datetime.now(UTC).isoformat(timespec="seconds"),
                    nvram=self.dir / "VARS.fd",
                )
                try:
                    self._dom = factory.conn.createXML(render(self._spec), flags)
                    return
                except libvirt.libvirtError as exc:
                    last_error = exc.get_error_message() or str(exc)
                    if "host forwarding" not in last_error and "Address already in use" not in last_error:
                        break
        if "Permission denied" in last_error and "backing file" in last_error:
            raise ConfigError(
                f"libvirt's qemu cannot read the base image {factory.base_image} (a parent directory is "
                "not traversable for the user qemu runs as); put the qcow2 under a directory every user "
                "can traverse, such as /var/tmp, or use --device-libvirt-uri qemu:///session.")
        raise BootError(f"libvirt could not start device VM {self.name}: {last_error}")

    def _wait_ready(self, since: int, deadline: float) -> None:
        """Poll (every POLL_S) for the SSH banner and cloud-init's final message; fail fast."""
        marker = ready_marker(self.instance_id)
        watch = BannerWatch(self.ssh_port)
        try:
            self._poll_ready(since, deadline, marker, watch)
        finally:
            watch.close()
        self._check_cloud_init()
        for port in self._factory.settings.host_forward:
            self.ssh.forward_remote(port)

    def _poll_ready(self, since: int, deadline: float, marker: str, watch: BannerWatch) -> None:
        """Ready = cloud-init's final line on the console, then the SSH banner.

        The banner is watched only once the marker is there: a connection opened while the guest's
        network is still down hangs in slirp's SYN backoff and delayed readiness by up to the
        watch's patience (10 s), although sshd had long been listening.
        """
        banner = finished = False
        while True:
            if self.cancelled.is_set():
                raise BootError(f"device VM {self.name}: the boot was cancelled.")
            self._console.refresh()
            self._fail_on_console(since)
            if not self.is_active():
                raise BootError(f"device VM {self.name} stopped before it was ready; "
                                f"last console lines:\n{self.console_tail()}")
            finished = finished or marker in self._console.text[since:]
            banner = finished and (banner or watch.poll())
            if banner:
                return
            if time.monotonic() > deadline:
                state = ("SSH banner not seen, cloud-init finished" if finished
                         else "SSH banner not checked yet, cloud-init not finished")
                raise BootError(f"device VM {self.name} was not ready in time ({state}; accel {self.accel}; "
                                f"raise --device-boot-timeout if the guest is just slow); "
                                f"last 50 console lines:\n{self.console_tail()}")
            time.sleep(POLL_S)

    def _fail_on_console(self, since: int) -> None:
        for pattern, what in ((PANIC, "the guest kernel panicked"),
                              (NO_BOOT_DEVICE, "the firmware found nothing to boot (is the qcow2 bootable?)"),
                              (CLOUD_INIT_ERROR, "cloud-init reported an error")):
            match = self._console.search(pattern, since)
            if match:
                excerpt = redact(match.group(0).strip(), self._factory.agent.secrets())
                raise BootError(f"device VM {self.name}: {what}: {excerpt}; "
                                f"last console lines:\n{self.console_tail()}")

    def _check_cloud_init(self) -> None:
        result = self.ssh.run("cloud-init status --long", check=False, timeout=120)
        if result.exit_code not in (0, 2) or "status: done" not in result.stdout:
            status = redact(result.stdout.strip() or result.stderr.strip(), self._factory.agent.secrets())
            raise BootError(f"device VM {self.name}: cloud-init did not finish cleanly "
                            f"(exit {result.exit_code}):\n{status}\n"
                            f"last console lines:\n{self.console_tail(20)}")


@dataclass
class _Spare:
    """A device booting (or booted) in a background thread for the next default request."""

    vm: DeviceVM
    thread: threading.Thread
    errors: list[BaseException]
    messages: list[str]

    def discard(self) -> None:
        self.vm.cancelled.set()
        self.thread.join()
        self.vm.destroy()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else text


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
        self.accel_used: set[str] = set()
        self.vms: list[DeviceVM] = []
        self.last_failed: DeviceVM | None = None
        self._count = 0
        self._conn: Any = None
        self._keypair: KeyPair | None = None
        self._base_path: Path | None = None
        self.process_dir = settings.workdir / f"{janitor.PREFIX}{run_id}-{worker}"
        self.ports_lock = settings.workdir / ".ports.lock"
        self.slots = VMSlots(settings.workdir / ".slots",
                             settings.max_vms or default_max_vms(settings.memory_mib))
        self.swept = janitor.Swept()
        self.boot_times: list[float] = []  # request to ready, per device handed out
        self._spare: _Spare | None = None

    @property
    def booted(self) -> bool:
        return bool(self.boot_times)

    def check(self) -> None:
        """Fail fast (before any boot) when libvirt or qemu-img is missing."""
        if shutil.which("qemu-img") is None:
            raise MissingToolError("qemu-img is not installed; install qemu-utils (Debian) or "
                                   "qemu-img (Fedora).")
        self.conn  # noqa: B018 - connecting is the check

    @property
    def base_image(self) -> Path:
        if self._base_path is None:
            self._base_path = self._base() if callable(self._base) else self._base
        return self._base_path

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self._conn = open_libvirt(self.settings.libvirt_uri)
        return self._conn

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
        self.swept = janitor.sweep(self.conn, workdir)
        self.process_dir.mkdir(mode=0o711, exist_ok=True)
        os.chmod(self.process_dir, 0o711)  # noqa: S103 - qemu must traverse, not list
        janitor.write_owner(self.process_dir, self.owner, self.run_id, self.worker)
        self._keypair = generate_keypair(self.process_dir)

    def timeout_for(self, request: VMRequest, accel: str) -> float:
        base = request.boot_timeout or self.settings.boot_timeout
        return base * (TCG_TIMEOUT_FACTOR if accel == "tcg" else 1.0)

    def note_accel(self, choice: Choice) -> None:
        self.accel_used.add(choice.reason)

    def request(self, *, memory_mib: int | None = None, vcpus: int | None = None, variant: str = "base",
                runcmd: Iterable[str] = (), boot_timeout: float | None = None) -> VMRequest:
        """Validate what a test asks for before anything boots."""
        if variant not in VARIANTS:
            raise ConfigError(f"device marker variant={variant!r} is unknown; "
                              f"use one of {', '.join(VARIANTS)}.")
        for label, value in (("memory_mib", memory_mib), ("vcpus", vcpus), ("boot_timeout", boot_timeout)):
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ConfigError(f"device marker {label}={value!r} must be a positive number.")
        return VMRequest(memory_mib=int(memory_mib or self.settings.memory_mib),
                         vcpus=int(vcpus or self.settings.vcpus), variant=variant,
                         runcmd=tuple(runcmd), boot_timeout=boot_timeout)

    def create(self, request: VMRequest | None = None, **kwargs: Any) -> DeviceVM:
        """A fresh device, ready: the spare booted in the background when it fits, else booted now."""
        asked = time.monotonic()
        request = request or self.request(**kwargs)
        self.base_image  # noqa: B018 - obtain the image (and fail) before anything is allocated
        self.keypair  # noqa: B018
        vm = self._take_spare(request)
        if vm is None:
            vm = self._new_vm(request)
            try:
                vm.boot()
            except BaseException:
                self.last_failed = vm
                if not self.settings.keep_vm:
                    vm.destroy()
                raise
        self.vms.append(vm)
        self.boot_times.append(time.monotonic() - asked)
        if self.settings.prefetch and request == self.request():
            self._start_spare(request)
        return vm

    def _new_vm(self, request: VMRequest) -> DeviceVM:
        self._count += 1
        return DeviceVM(self, f"{self.process_dir.name}-{self._count}", self.process_dir / str(self._count),
                        request)

    def _start_spare(self, request: VMRequest) -> None:
        """--device-prefetch: boot the next default device while the current test runs."""
        vm = self._new_vm(request)
        messages: list[str] = []
        vm.log = messages.append  # the terminal belongs to the main thread: replay at hand-over
        errors: list[BaseException] = []

        def boot() -> None:
            try:
                vm.boot()
            except BaseException as exc:  # handed to the main thread, which decides
                errors.append(exc)

        thread = threading.Thread(target=boot, name=f"fcdev-spare-{vm.name}", daemon=True)
        thread.start()
        self._spare = _Spare(vm, thread, errors, messages)

    def wait_spare(self, timeout: float | None = None) -> None:
        """Block until the background spare (if any) has booted: what a long enough test does."""
        if self._spare is not None:
            self._spare.thread.join(timeout)

    def _take_spare(self, request: VMRequest) -> DeviceVM | None:
        spare, self._spare = self._spare, None
        if spare is None:
            return None
        if spare.vm.request != request:
            spare.discard()  # an idle spare must not hold the slot this request may need
            return None
        spare.thread.join()
        for message in spare.messages:
            self.log(message)
        if spare.errors:
            spare.vm.destroy()
            self.log(f"the spare device {spare.vm.name} did not boot ({_first_line(str(spare.errors[0]))}); "
                     "booting another")
            return None
        return spare.vm

    def release(self, vm: DeviceVM) -> None:
        vm.destroy()
        if vm in self.vms and not vm.kept:
            self.vms.remove(vm)

    def close(self) -> None:
        """Destroy every VM this factory made (kept ones stay) and close the connection."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.discard()
        for vm in list(self.vms):
            self.release(vm)
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection is fine
                self._conn.close()
            self._conn = None
        if self.process_dir.exists() and not any(p.is_dir() for p in self.process_dir.iterdir()):
            shutil.rmtree(self.process_dir, ignore_errors=True)
