"""--device-fresh snapshot: templates booted once per device shape, their snapshot, revert and pool.

Measured here (libvirt 9.0, qemu 7.2, TCG), which decided the design:
  - restoring a saved domain (virDomainSave/RestoreFlags) into a new domain is refused unless the
    new XML keeps the saved domain's name and UUID ("Target domain name ... does not match
    source"), so at most one domain per saved image can run on a host anyway, and a restored
    domain cannot be started with VIR_DOMAIN_START_AUTODESTROY (a kill -9 would leave it running);
  - an internal snapshot (memory + disk, in the template's qcow2 overlay) of the running transient
    domain takes 0.1-0.5 s; a revert 0.5-1 s (1.6-3 s where PID 1 reaps the old qemu late). libvirt
    9.0 reverts a running domain by stopping its qemu and starting a new one with -loadvm, which
    gives it a new <genid/> and drops VIR_DOMAIN_START_AUTODESTROY (reaper.py destroys a killed
    process's reverted templates instead); the guest clock is not reverted.
So a clone is the template's domain reverted in place: one clone of a template at a time; a
worker that needs two at once (--device-prefetch's spare) gets a second template of that shape.
The revert is begun as soon as a clone is given back, paused (so the template costs no CPU while
it waits), and the next clone waits only for what is left of it before resuming the template.

A template is a cold boot (boot.Boot) whose seed also holds the agent back (identity.py), then
the snapshot. A clone (clone.CloneBoot) takes a free template of its shape from the factory's pool,
waits for its revert (none before the template's first clone: the snapshot state still runs),
and makes it a new device (identity.py) before it is handed out. A revert that fails, takes longer
than REVERT_S from its start, or does not take (the previous clone's marker survived), and a clone
not ready within CLONE_READY_S, are abandoned: the template is destroyed, this device is cold-booted
instead, and the pool counts it (the terminal summary says how many).

An idle template holds a --device-max-vms slot. So that it never keeps a boot waiting (a cold
boot of this process, or another xdist worker's), a pool with idle templates watches the slots'
waiters (slots.VMSlots.announce) and stops its least recently used idle template for a live one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.boot import Boot, BootContext
from pytest_flightctl_device.devices.identity import agent_held_check, hold_agent_bootcmd
from pytest_flightctl_device.devices.reaper import Reaper
from pytest_flightctl_device.devices.seed import SeedSpec
from pytest_flightctl_device.devices.slots import VMSlots
from pytest_flightctl_device.errors import BootError

if TYPE_CHECKING:
    from pytest_flightctl_device.devices.remap import RegistryRemap
    from pytest_flightctl_device.devices.request import VMRequest

SNAPSHOT = "fcdev-pristine"
SNAPSHOT_S = 60.0  # taking the template's snapshot (0.1-0.5 s measured)
REVERT_S = 10.0  # a revert slower than this (from its start) is abandoned: 0.5-1 s measured, 3 s under load
WATCH_S = 0.5  # how often a pool with idle templates looks for a boot waiting for a slot


class CloneFailed(Exception):
    """This clone cannot be used; the device is cold-booted instead."""


def template_key(request: VMRequest, ctx: BootContext) -> str:
    """What makes two templates differ: everything that changes the seed or the domain.

    The base image, memory, vcpus, firmware, the agent's files, the test's runcmd, the registry
    remap and the host forwards; not the boot timeout (nor `fresh`, which is why we are here).
    """
    remap: RegistryRemap | None = ctx.registry
    parts = [str(ctx.base_image), request.memory_mib, request.vcpus, request.variant, request.runcmd,
             ctx.firmware, ctx.isolated, ctx.host_forward,
             [(f.path, f.mode, f.owner, hashlib.sha256(f.content).hexdigest()) for f in ctx.agent.files],
             [(f.path, hashlib.sha256(f.content).hexdigest()) for f in remap.files()] if remap else None,
             remap.runcmd() if remap else None,
             getattr(request, "labels", ())]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


class TemplateBoot(Boot):
    """A cold boot whose seed keeps the agent from starting; then the snapshot."""

    # A <genid/>: libvirt gives every revert a new VM generation ID, on which a guest kernel with
    # the vmgenid driver reseeds its CRNG at once. Not every kernel has it (Debian's cloud kernel
    # has not), so identity.py also mixes in host entropy and forces a reseed (RNDRESEEDCRNG).
    genid = True

    def make_seed_spec(self) -> SeedSpec:
        spec = super().make_seed_spec()
        return dataclasses.replace(spec, bootcmd=(hold_agent_bootcmd(), *spec.bootcmd))

    def snapshot(self) -> None:
        """Check the agent was held, close our SSH master (no half-open TCP in the memory image),
        and take the internal memory + disk snapshot, bounded by SNAPSHOT_S."""
        assert self.ssh is not None
        held = self.ssh.run(agent_held_check(), check=False, timeout=60)
        if not held.ok:
            raise BootError(f"device template {self.name}: the agent's unit was not held back during the "
                            "template boot (it must not start before the snapshot); use --device-fresh boot.")
        self.ssh.close()
        dom = self.dom
        Bounded(lambda: dom.snapshotCreateXML(f"<domainsnapshot><name>{SNAPSHOT}</name></domainsnapshot>", 0),
                f"taking the snapshot of template {self.name}").wait(SNAPSHOT_S, self._stop_domain)

    def revert_paused(self) -> None:
        """Back to the snapshot, paused (libvirt 9.0: a new qemu started with -loadvm)."""
        import libvirt

        dom = self.dom
        dom.revertToSnapshot(dom.snapshotLookupByName(SNAPSHOT, 0), libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED)

    def resume(self) -> None:
        self.dom.resume()


@dataclasses.dataclass
class Template:
    """A template domain (running, or paused by its revert), how many clones it served, its revert."""

    key: str
    boot: TemplateBoot
    clones: int = 0
    last_used: float = 0.0
    reverting: Bounded | None = None  # begun when the last clone was given back

    def revert_in_background(self) -> None:
        """Begin the revert now, to a paused domain, so that the next clone waits for less."""
        self.reverting = Bounded(self.boot.revert_paused, f"reverting template {self.boot.name}")

    def reverted(self) -> None:
        """Wait for the pending revert (REVERT_S from its start) and resume the template; nothing to
        do before its first clone. Raise CloneFailed when the revert failed or took too long."""
        reverting, self.reverting = self.reverting, None
        if reverting is None:
            return
        reverting.wait(REVERT_S, self.boot._stop_domain)
        Bounded(self.boot.resume, f"resuming template {self.boot.name}").wait(REVERT_S, self.boot._stop_domain)

    def settle(self) -> None:
        """After the template was destroyed: let a pending revert's thread end (libvirt runs the
        destroy once the revert's job is over: measured, nothing came back from any point of it)."""
        reverting, self.reverting = self.reverting, None
        if reverting is not None:
            reverting.join(10.0)


class Bounded:
    """A blocking libvirt call on its own thread, begun now and waited for with a deadline counted
    from its start: past it, `abandon` (destroy the domain, which ends the call) and CloneFailed.
    libvirt-python drops the GIL while it waits, so the caller (or a test) goes on meanwhile."""

    def __init__(self, call: Callable[[], Any], what: str) -> None:
        self.what = what
        self.started = time.monotonic()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(call,), name="fcdev-bounded", daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:  # handed to the waiting thread
            self._errors.append(exc)

    def join(self, seconds: float) -> None:
        self._thread.join(seconds)

    def wait(self, seconds: float, abandon: Callable[[], None]) -> None:
        self._thread.join(max(0.0, self.started + seconds - time.monotonic()))
        if self._thread.is_alive():
            abandon()
            self._thread.join(10.0)
            raise CloneFailed(f"{self.what} took longer than {seconds:.0f} s")
        if self._errors:
            raise CloneFailed(f"{self.what} failed: {first_line(self._errors[0])}")


def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line (a libvirt error's message, not its whole text)."""
    text = exc.get_error_message() if hasattr(exc, "get_error_message") else str(exc)
    return next((line.strip() for line in str(text).splitlines() if line.strip()), type(exc).__name__)


class TemplatePool:
    """One process's templates, by key: free ones wait for their next clone; busy ones serve one."""

    def __init__(self, process_dir: Path, capacity: Callable[[], int], log: Callable[[str], None],
                 uri: str, slots: VMSlots | None = None) -> None:
        self.process_dir = process_dir
        self.uri = uri
        self._reaper: Reaper | None = None
        self.capacity = capacity  # VMs this process may run at once (--device-max-vms)
        self.log = log
        self._lock = threading.Lock()
        self._free: list[Template] = []
        self._busy: list[Template] = []
        self._count = 0
        self.clones = 0  # devices handed out as clones
        self.fallbacks = 0  # clones abandoned for a cold boot
        self.template_seconds: list[float] = []  # each template's boot + snapshot
        self.slots = slots  # whose waiters idle templates give way to (None: they never do)
        self._watcher: threading.Thread | None = None  # runs while templates are idle
        self._closed = threading.Event()
        self._notes: list[str] = []  # the watcher's log lines, written by the next caller's thread

    def take(self, key: str, ctx: BootContext, request: VMRequest, cancelled: threading.Event) -> Template:
        """A free template of `key`, else a new one booted now (evicting idle ones to make room)."""
        self._flush_notes()
        with self._lock:
            for template in sorted(self._free, key=lambda t: -t.last_used):
                if template.key == key:
                    self._free.remove(template)
                    self._busy.append(template)
                    return template
            self._count += 1
            number = self._count
            evict = self._evictable()
        for template in evict:
            self.log(f"device template {template.boot.name} stopped to make room (--device-max-vms)")
            self._end(template)
        name = f"{self.process_dir.name}-{janitor.TEMPLATE_PREFIX}{number}"
        boot = TemplateBoot(ctx, name, self.process_dir / f"{janitor.TEMPLATE_PREFIX}{number}", request)
        boot.cancelled = cancelled
        started = time.monotonic()
        try:
            boot.run()
            self._watch(name)  # from its first revert on, a kill -9 no longer autodestroys it
            boot.snapshot()
        except CloneFailed as exc:
            self._stop(boot)
            raise BootError(f"device template {name}: {exc}") from None
        except BaseException:
            self._stop(boot)
            raise
        self.template_seconds.append(time.monotonic() - started)
        template = Template(key, boot)
        with self._lock:
            self._busy.append(template)
        return template

    def _watch(self, name: str) -> None:
        with self._lock:
            if self._reaper is None:
                self._reaper = Reaper(self.uri)
            self._reaper.watch(name)

    def _stop(self, boot: TemplateBoot) -> None:
        boot.stop()
        if self._reaper is not None:
            self._reaper.forget(boot.name)

    def _end(self, template: Template) -> None:
        """Stop a template, and with it a revert it may be in the middle of."""
        self._stop(template.boot)
        template.settle()

    def _evictable(self) -> list[Template]:
        """Idle templates (least recently used first) to stop so that one more VM fits."""
        running = len(self._free) + len(self._busy)
        evict: list[Template] = []
        for template in sorted(self._free, key=lambda t: t.last_used):
            if running < self.capacity():
                break
            self._free.remove(template)
            evict.append(template)
            running -= 1
        return evict

    def count(self, *, fallback: bool) -> None:
        """One more device handed out as a clone, or cold-booted after an abandoned one."""
        with self._lock:
            if fallback:
                self.fallbacks += 1
            else:
                self.clones += 1

    def give_back(self, template: Template) -> None:
        """A clone is done: the template begins its revert and waits for its next clone (a dead one
        is dropped)."""
        alive = template.boot.is_active()
        if alive:
            template.revert_in_background()  # before it is free: a take() must find it reverting
        with self._lock:
            if template in self._busy:
                self._busy.remove(template)
            if alive:
                template.last_used = time.monotonic()
                self._free.append(template)
                self._start_watcher()
        if not alive:
            self._end(template)

    def _start_watcher(self) -> None:
        """With the lock held, as a template becomes idle: watch for waiting boots while any is."""
        if self.slots is None or self._watcher is not None or self._closed.is_set():
            return
        self._watcher = threading.Thread(target=self._watch_waiters, name="fcdev-template-watch", daemon=True)
        self._watcher.start()

    def _watch_waiters(self) -> None:
        while not self._closed.wait(WATCH_S):
            with self._lock:
                if not self._free:
                    self._watcher = None  # under the lock: the next give_back starts another
                    return
            try:
                self.yield_to_waiter()
            except Exception as exc:  # a libvirt hiccup must not end the watch for good
                self._notes.append(f"device templates: giving a slot to a waiting boot failed ({exc})")

    def yield_to_waiter(self) -> Template | None:
        """Stop the least recently used idle template when a live boot waits for a slot and none is
        free (a slot free already goes to that boot within its poll: stopping more would waste them)."""
        if self.slots is None:
            return None
        with self._lock:
            if not self._free:
                return None
        if not self.slots.waiters() or self.slots.any_free():
            return None
        with self._lock:
            if not self._free:
                return None
            template = min(self._free, key=lambda t: t.last_used)
            self._free.remove(template)
        self._notes.append(f"device template {template.boot.name} stopped: a boot waits for its slot "
                           "(--device-max-vms)")
        self._end(template)
        return template

    def _flush_notes(self) -> None:
        notes, self._notes = self._notes, []
        for note in notes:
            self.log(note)

    def _remove(self, template: Template) -> None:
        with self._lock:
            for group in (self._free, self._busy):
                if template in group:
                    group.remove(template)

    def discard(self, template: Template) -> None:
        """A template that failed a clone: destroyed, its files removed, its slot freed."""
        self._remove(template)
        self._end(template)

    def detach(self, template: Template) -> None:
        """A kept clone takes its template out of the pool for good (--device-keep-vm)."""
        self._remove(template)
        if self._reaper is not None:
            self._reaper.forget(template.boot.name)

    def running(self) -> list[str]:
        with self._lock:
            return [t.boot.name for t in self._free + self._busy]

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            watcher = self._watcher
        if watcher is not None:
            watcher.join(60.0)  # it may be stopping a template: that one must be gone too
        self._flush_notes()
        with self._lock:
            templates, self._free, self._busy = self._free + self._busy, [], []
        for template in templates:
            self._end(template)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.close()
