"""The libvirt hosts devices run on (`--device-libvirt-uri`, repeatable) and which one a boot gets.

A URI with a host part (`qemu+ssh://USER@HOST[:PORT]/system[?keyfile=FILE&no_verify=1]`) is a
remote host: its files go through libvirt's storage API (volumes.py), its console through the
console stream (console_stream.py), and its guests' SSH forwards, which listen on that host's
127.0.0.1, are reached through an SSH hop built from the same URI (ssh.Jump). A URI without one
is this machine, as before.

Placement: each host has its own `--device-max-vms` share (slot locks under the workdir, keyed
by the host, so every pytest process on this machine sharing the workdir counts the same VMs)
and must report enough free memory for the VM. A boot takes the first host, in the order
given, that has a free slot and the memory; when none has, it waits for one. A host that cannot
be reached is reported once and skipped; only when none can be reached does the run stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.slots import QEMU_OVERHEAD_MIB, Slot, VMSlots, wait_for_room
from pytest_flightctl_device.devices.ssh import Jump
from pytest_flightctl_device.devices.volumes import DEFAULT_POOL, HostStore
from pytest_flightctl_device.errors import ConfigError, MissingToolError

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
LOCAL_TRANSPORTS = ("", "unix")
REMOTE_PORTS = (20000, 60000)  # a remote forward's port is picked here, retried when taken


@dataclass(frozen=True)
class Address:
    """What a libvirt URI says about where its host is and how to reach it."""

    uri: str
    transport: str
    hostname: str = ""
    port: int | None = None
    user: str | None = None
    keyfile: str | None = None
    verify: bool = True

    @property
    def remote(self) -> bool:
        return bool(self.hostname) or self.transport not in LOCAL_TRANSPORTS

    @property
    def label(self) -> str:
        """The host as messages and the summary name it."""
        if not self.remote:
            return "local"
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"{user}{self.hostname}{port}"

    @property
    def key(self) -> str:
        """A file-name-safe identity for this host's slot directory."""
        return hashlib.sha256(self.label.encode()).hexdigest()[:16]

    def jump(self) -> Jump | None:
        return Jump(self.hostname, self.port, self.user, self.keyfile, self.verify) if self.remote else None


def parse_uri(uri: str) -> Address:
    """Split a libvirt URI; a remote one must go over SSH (its guests are reached the same way)."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if not scheme or "://" not in uri:
        raise ConfigError(f"--device-libvirt-uri {uri!r} is not a libvirt URI; write it like "
                          "qemu:///system or qemu+ssh://USER@HOST/system.")
    transport = scheme.split("+", 1)[1] if "+" in scheme else ""
    query = parse_qs(parts.query)
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"--device-libvirt-uri {uri!r} has a bad port; write HOST:PORT with a number.") from None
    address = Address(uri=uri, transport=transport, hostname=parts.hostname or "", port=port,
                      user=unquote(parts.username) if parts.username else None,
                      keyfile=query.get("keyfile", [None])[0],
                      verify=query.get("no_verify", ["0"])[0] in ("", "0"))
    if address.remote and (transport not in SSH_TRANSPORTS or not address.hostname):
        raise ConfigError(f"--device-libvirt-uri {uri!r}: a remote host must be reached over SSH "
                          "(its devices' SSH goes through the same hop); write qemu+ssh://USER@HOST/system.")
    return address


def remote_port_reservation() -> Iterator[int]:
    """A port for a remote forward: we cannot probe another host's ports, so a random one, which
    domain.start_domain retries when qemu finds it taken."""
    yield random.randint(*REMOTE_PORTS)  # noqa: S311 - not a secret, a port


class Host:
    """One libvirt host: its connection (opened once), slots, store and SSH hop."""

    def __init__(self, address: Address, *, workdir: Path, max_vms: int | None,
                 default_max_vms: Callable[[], int], memory_mib: int, pool: str | None,
                 owner: Owner, process_name: str, log: Callable[[str], None]) -> None:
        self.address = address
        self.workdir = workdir
        self.log = log
        self.owner = owner
        self.process_name = process_name
        self._max_vms = max_vms
        self._default_max_vms = default_max_vms
        self._memory_mib = memory_mib
        self._pool = pool
        self._conn: Any = None
        self._error: str | None = None
        self._lock = threading.RLock()  # write_owner() holds it while the store connects
        self._slots: VMSlots | None = None
        self._store: HostStore | None = None
        self._owner_written = False
        self.devices = 0  # booted on this host by this process

    @property
    def remote(self) -> bool:
        return self.address.remote

    @property
    def label(self) -> str:
        return self.address.label

    @property
    def error(self) -> str | None:
        """Why this host cannot be used (set once, by the first failed connect)."""
        return self._error

    def connect(self) -> Any | None:
        """The connection, opened (and the host's dead leftovers swept) on first use; None when the
        host cannot be reached (the reason in .error)."""
        with self._lock:
            if self._conn is None and self._error is None:
                from pytest_flightctl_device.devices.domain import open_libvirt

                if self.remote:  # its console streams need libvirt's event loop, before connecting
                    from pytest_flightctl_device.devices.console_stream import ensure_event_loop

                    ensure_event_loop()
                try:
                    self._conn = open_libvirt(self.address.uri)
                except MissingToolError as exc:
                    self._error = str(exc)
                    return None
                if self.remote:
                    janitor.sweep_host(self._conn, self._pool or DEFAULT_POOL)
            return self._conn

    @property
    def conn(self) -> Any:
        conn = self.connect()
        if conn is None:
            raise MissingToolError(self._error or f"libvirt at {self.address.uri} cannot be reached.")
        return conn

    @property
    def slots(self) -> VMSlots:
        """This host's share: --device-max-vms, or what its free memory holds (the local host: as before)."""
        if self._slots is None:
            if not self.remote:
                self._slots = VMSlots(self.workdir / ".slots", self._max_vms or self._default_max_vms())
            else:
                count = self._max_vms or max(1, (self.free_mib() - 1024) // (self._memory_mib + QEMU_OVERHEAD_MIB))
                self._slots = VMSlots(self.workdir / f".slots-{self.address.key}", count)
        return self._slots

    def free_mib(self) -> int:
        """Memory the host could give a VM: free plus page cache and buffers (MemFree alone is
        small on a host that has read its images), in MiB."""
        import libvirt

        try:
            stats = self.conn.getMemoryStats(libvirt.VIR_NODE_MEMORY_STATS_ALL_CELLS, 0)
            return int(sum(stats.get(key, 0) for key in ("free", "buffers", "cached"))) // 1024
        except Exception:  # a host that cannot say has no room we know of
            return 0

    def fits(self, memory_mib: int) -> bool:
        """The host reports the memory this VM needs (its slot is the other half of the check)."""
        return self.free_mib() >= memory_mib + QEMU_OVERHEAD_MIB

    @property
    def store(self) -> HostStore:
        if self._store is None:
            self._store = HostStore(self.conn, self.label, self._pool, self.log)
        return self._store

    def ports(self, ports_lock: Path) -> Callable[[], AbstractContextManager[int]]:
        """How a boot on this host picks its SSH forward's port."""
        if self.remote:
            return contextlib.contextmanager(remote_port_reservation)
        from pytest_flightctl_device.devices.ports import port_reservation

        return lambda: port_reservation(ports_lock)

    def write_owner(self) -> None:
        """This process's owner record on the host, before its first volume there (the janitor's label)."""
        with self._lock:
            if self._owner_written:
                return
            data = json.dumps(janitor.owner_record(self.owner)).encode()
            with tempfile.NamedTemporaryFile(dir=self.workdir, prefix=".owner-") as handle:
                handle.write(data)
                handle.flush()
                self.store.delete(janitor.owner_volume(self.process_name))
                self.store.upload(janitor.owner_volume(self.process_name), Path(handle.name))
            self._owner_written = True

    def close(self) -> None:
        """Remove this process's owner record (when nothing of it is left there) and disconnect."""
        if self._conn is None:
            return
        if self._owner_written:
            with contextlib.suppress(Exception):
                janitor.drop_owner_volume(self._conn, self.store.pool, self.process_name)
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None


class Hosts:
    """Every host of the run, in the order given; placement of boots on them."""

    def __init__(self, hosts: list[Host], log: Callable[[str], None]) -> None:
        self.hosts = hosts
        self.log = log
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def reachable(self) -> list[Host]:
        """The hosts that answer; each one that does not is reported once."""
        found = []
        for host in self.hosts:
            if host.connect() is not None:
                found.append(host)
                continue
            with self._lock:
                if host.label not in self._reported:
                    self._reported.add(host.label)
                    if len(self.hosts) > 1:
                        self.log(f"libvirt host {host.label} cannot be reached; skipping it "
                                 f"({host.error})")
        return found

    def primary(self) -> Host:
        """The first host that answers (the janitor's local sweep and old callers use it)."""
        found = self.reachable()
        if not found:
            raise MissingToolError(self.hosts[0].error or "no libvirt host can be reached.")
        return found[0]

    def acquire(self, memory_mib: int, timeout: float, on_wait: Callable[[str], None] | None = None,
                cancelled: threading.Event | None = None) -> tuple[Host, Slot]:
        """A host with room for a VM of `memory_mib`, and the slot held there; waits for one."""
        if len(self.hosts) == 1:  # one host: its slots' own wait, as before there were several
            host = self.primary()
            return host, host.slots.acquire(timeout, on_wait, cancelled)
        with contextlib.ExitStack() as waiting:
            return self._place(memory_mib, timeout, on_wait, cancelled, waiting)

    def _place(self, memory_mib: int, timeout: float, on_wait: Callable[[str], None] | None,
               cancelled: threading.Event | None, waiting: contextlib.ExitStack) -> tuple[Host, Slot]:
        """Try every host until one has room; once all were full, the local ones hear that we wait
        (VMSlots.announce: idle templates there give their slots up)."""
        announced = False

        def take() -> tuple[Host, Slot] | None:
            nonlocal announced
            hosts = self.reachable()
            if not hosts:
                raise MissingToolError(self.hosts[0].error or "no libvirt host can be reached.")
            for host in hosts:
                slot = host.slots.try_acquire()
                if slot is None:
                    continue
                if not host.fits(memory_mib):
                    slot.release()
                    continue
                return host, slot
            if not announced:
                for host in hosts:
                    if not host.remote:
                        waiting.enter_context(host.slots.announce())
                announced = True
            return None

        shares = ", ".join(f"{h.label} {h.slots.count}" for h in self.hosts)
        return wait_for_room(
            take, timeout=timeout, on_wait=on_wait, cancelled=cancelled,
            busy=f"every libvirt host is full (--device-max-vms per host: {shares}); waiting for room",
            timed_out=f"no libvirt host had room within {timeout:.0f} s; raise --device-max-vms, "
                      "add a --device-libvirt-uri or run fewer workers.")

    def close(self) -> None:
        for host in self.hosts:
            host.close()
