"""The session's labels, and the reaper of what dead sessions left.

Labels (defined here, rendered by devices.domain): every process that boots VMs owns one
directory `<workdir>/fcdev-<run>-<worker>/` holding owner.json (PID + start time, a
core.liveness.Owner) and one subdirectory per VM; every domain is named under the same prefix and
carries the same owner in its libvirt metadata (METADATA_NS). A VM kept with --device-keep-vm has
a `keep` file in its directory and keep='1' in its metadata.

`sweep()` removes, of owners that are gone (a reused PID does not keep them alive):
  - fcdev-* libvirt domains: destroyed, and undefined when persistent;
  - VM directories: the overlay qcow2, the seed ISO, the console log, UEFI vars, known_hosts, the
    SSH control socket, and any temp a writer killed mid-write left there;
  - SSH control sockets moved to /tmp because the VM directory's path was too long for one;
  - the process directory (owner.json, the SSH key pair) once no VM directory is left in it;
  - temps of killed atomic writers in the workdir itself.
A live run's things, and kept VMs while their domain still exists, are never touched; a process
directory without owner.json is left alone for ten minutes (its creator may be writing it).

A --device-fresh snapshot template (devices.template) is labelled like any VM: directory
`t<N>` in its process directory, domain `fcdev-<run>-<worker>-t<N>` (owner metadata;
autodestroyed until its first revert, then destroyed by devices.reaper when its process dies).
Its saved state is the internal snapshot inside its overlay, so it goes with the directory;
libvirt's snapshot metadata of a transient domain goes with the domain. A kept clone keeps its
template: the `keep` file in `t<N>`, keep='1' on the domain.

On a remote libvirt host (`sweep_host()`), libvirt keeps the labels: the process's owner record
is a volume `fcdev-<run>-<worker>.owner` in the plugin's pool (PID, start time and this
machine's boot id, written before any other volume of that process), its overlays and seeds are
volumes named `fcdev-<run>-<worker>-<n>.*`, and its domains carry the boot id in their metadata.
An owner is judged only by the machine it ran on (same boot id): another machine's PIDs mean
nothing here, so its things are left to its own janitor.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_flightctl_device.core.atomic import sweep_temps, write_atomic
from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices.ssh import control_path

PREFIX = "fcdev-"  # process directories and domain names
OWNER_FILE = "owner.json"
KEEP_FILE = "keep"
TEMPLATE_PREFIX = "t"  # a template's VM directory t<N>, its domain <process dir>-t<N>
METADATA_NS = "https://github.com/flightctl/pytest-flightctl-device/owner/1"
METADATA_KEY = "fcdev"
# A process dir without owner.json is one whose creator died in its first instant.
_ORPHAN_GRACE_S = 600.0


@dataclass
class Swept:
    domains: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def write_owner(process_dir: Path, owner: Owner, run_id: str, worker: str) -> None:
    data = {"pid": owner.pid, "start": owner.start, "run": run_id, "worker": worker}
    write_atomic(process_dir / OWNER_FILE, json.dumps(data))


def read_owner(process_dir: Path) -> Owner | None:
    try:
        data = json.loads((process_dir / OWNER_FILE).read_text())
        return Owner(int(data["pid"]), int(data["start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def boot_id() -> str:
    """This machine's current boot: a PID and start time mean something only within it."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def owner_record(owner: Owner) -> dict[str, Any]:
    return {"pid": owner.pid, "start": owner.start, "boot": boot_id()}


def owner_volume(process_name: str) -> str:
    return f"{process_name}.owner"


def _domain_owner(dom: Any) -> tuple[Owner | None, bool]:
    import libvirt

    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        element = ET.fromstring(xml)  # noqa: S314 - our own element, read back from libvirt
        if element.get("boot", boot_id()) != boot_id():
            return None, False  # another machine's (or boot's) domain: not ours to judge
        return Owner(int(element.attrib["pid"]), int(element.attrib["start"])), element.get("keep") == "1"
    except (libvirt.libvirtError, ET.ParseError, KeyError, ValueError):
        return None, False


def sweep_domains(conn: Any) -> tuple[list[str], set[str]]:
    """Destroy fcdev domains of dead owners; return (destroyed, names still present)."""
    import libvirt

    destroyed: list[str] = []
    present: set[str] = set()
    for dom in conn.listAllDomains():
        name = dom.name()
        if not name.startswith(PREFIX):
            continue
        owner, keep = _domain_owner(dom)
        if owner is None or owner.alive() or keep:
            present.add(name)
            continue
        try:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()
            destroyed.append(name)
        except libvirt.libvirtError:
            present.add(name)
    return destroyed, present


def _remove_vm_dir(vm_dir: Path) -> None:
    socket = control_path(vm_dir)
    if socket.parent != vm_dir:  # moved out for a long path: not under the directory removed below
        socket.unlink(missing_ok=True)
    shutil.rmtree(vm_dir, ignore_errors=True)


def sweep_files(workdir: Path, present_domains: set[str]) -> list[Path]:
    """Remove the files of dead owners (see the module docstring), except kept VMs whose domain exists."""
    removed: list[Path] = []
    if not workdir.is_dir():
        return removed
    sweep_temps(workdir)
    for process_dir in workdir.glob(PREFIX + "*"):
        try:
            _sweep_process_dir(process_dir, present_domains, removed)
        except FileNotFoundError:  # another sweeper (an xdist worker, another run) removed it first
            continue
    return removed


def _sweep_process_dir(process_dir: Path, present_domains: set[str], removed: list[Path]) -> None:
    if not process_dir.is_dir():
        return
    owner = read_owner(process_dir)
    if owner is None:
        if time.time() - process_dir.stat().st_mtime < _ORPHAN_GRACE_S:
            return
    elif owner.alive():
        return
    for vm_dir in [p for p in process_dir.iterdir() if p.is_dir()]:
        name = f"{process_dir.name}-{vm_dir.name}"
        if (vm_dir / KEEP_FILE).exists() and name in present_domains:
            continue
        _remove_vm_dir(vm_dir)
        removed.append(vm_dir)
    if not any(p.is_dir() for p in process_dir.iterdir()):
        shutil.rmtree(process_dir, ignore_errors=True)
        removed.append(process_dir)


def sweep(conn: Any, workdir: Path) -> Swept:
    destroyed, present = sweep_domains(conn)
    return Swept(destroyed, sweep_files(workdir, present))


# -- remote hosts: volumes in the plugin's pool ---------------------------------------------------


def _record_owner(conn: Any, vol: Any) -> Owner | None:
    """The owner a record volume names, if it ran on this machine's current boot."""
    from pytest_flightctl_device.devices.volumes import read_volume

    try:
        data = json.loads(read_volume(conn, vol))
        if data.get("boot") != boot_id():
            return None
        return Owner(int(data["pid"]), int(data["start"]))
    except Exception:  # unreadable or foreign: leave it
        return None


def sweep_volumes(conn: Any, pool_name: str, present_domains: set[str]) -> list[str]:
    """Delete the volumes of dead owners of this machine (a kept VM's, while its domain exists, stay)."""
    import libvirt

    try:
        pool = conn.storagePoolLookupByName(pool_name)
        if not pool.isActive():
            return []
        volumes = {vol.name(): vol for vol in pool.listAllVolumes(0)}
    except libvirt.libvirtError:
        return []
    removed: list[str] = []
    for name, vol in sorted(volumes.items()):
        if not name.startswith(PREFIX) or not name.endswith(".owner"):
            continue
        owner = _record_owner(conn, vol)
        if owner is None or owner.alive():
            continue
        process = name.removesuffix(".owner")
        mine = [n for n in volumes if n.startswith(process + "-") or n.startswith(process + ".")]
        kept = False
        for other in mine:
            vm = other.split(".", 1)[0]
            if other != name and vm in present_domains:
                kept = True  # a kept VM's disk: its domain still runs
                continue
            if other == name:
                continue
            try:
                volumes[other].delete(0)
                removed.append(other)
            except libvirt.libvirtError:
                kept = True
        if not kept:
            try:
                vol.delete(0)
                removed.append(name)
            except libvirt.libvirtError:
                pass
    return removed


def drop_owner_volume(conn: Any, pool: Any, process_name: str) -> None:
    """A process's last act on a host: its owner record goes once none of its volumes is left."""
    names = [vol.name() for vol in pool.listAllVolumes(0)]
    if not any(n.startswith(process_name + "-") for n in names):
        with contextlib.suppress(Exception):
            pool.storageVolLookupByName(owner_volume(process_name)).delete(0)


def sweep_host(conn: Any, pool_name: str) -> Swept:
    """A remote host's dead domains and volumes (its files are volumes: see the module docstring)."""
    destroyed, present = sweep_domains(conn)
    return Swept(destroyed, [Path(name) for name in sweep_volumes(conn, pool_name, present)])
