"""Finds and removes what dead runs left: domains, overlays, seeds, sockets.

Every process that boots VMs owns one directory `<workdir>/fcdev-<run>-<worker>/` holding an
owner.json (pid + start time) and one subdirectory per VM; every domain carries the same owner
in its metadata. A leftover is anything whose owner process is gone. A live run's things, and
VMs kept on purpose with --device-keep-vm while their domain still runs, are never touched.
"""

from __future__ import annotations

import json
import shutil
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices.domain import METADATA_NS

PREFIX = "fcdev-"
OWNER_FILE = "owner.json"
KEEP_FILE = "keep"
# A process dir without owner.json is one whose creator died in its first instant.
_ORPHAN_GRACE_S = 600.0


@dataclass
class Swept:
    domains: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)


def write_owner(process_dir: Path, owner: Owner, run_id: str, worker: str) -> None:
    data = {"pid": owner.pid, "start": owner.start, "run": run_id, "worker": worker}
    tmp = process_dir / f".{OWNER_FILE}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(process_dir / OWNER_FILE)


def read_owner(process_dir: Path) -> Owner | None:
    try:
        data = json.loads((process_dir / OWNER_FILE).read_text())
        return Owner(int(data["pid"]), int(data["start"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _domain_owner(dom: Any) -> tuple[Owner | None, bool]:
    import libvirt

    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
        element = ET.fromstring(xml)  # noqa: S314 - our own element, read back from libvirt
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


def sweep_files(workdir: Path, present_domains: set[str]) -> list[Path]:
    """Remove VM directories of dead owners, except kept VMs whose domain still exists."""
    removed: list[Path] = []
    if not workdir.is_dir():
        return removed
    for process_dir in workdir.glob(PREFIX + "*"):
        if not process_dir.is_dir():
            continue
        owner = read_owner(process_dir)
        if owner is None:
            if time.time() - process_dir.stat().st_mtime < _ORPHAN_GRACE_S:
                continue
        elif owner.alive():
            continue
        for vm_dir in [p for p in process_dir.iterdir() if p.is_dir()]:
            name = f"{process_dir.name}-{vm_dir.name}"
            if (vm_dir / KEEP_FILE).exists() and name in present_domains:
                continue
            shutil.rmtree(vm_dir, ignore_errors=True)
            removed.append(vm_dir)
        if not any(p.is_dir() for p in process_dir.iterdir()):
            shutil.rmtree(process_dir, ignore_errors=True)
            removed.append(process_dir)
    return removed


def sweep(conn: Any, workdir: Path) -> Swept:
    destroyed, present = sweep_domains(conn)
    return Swept(destroyed, sweep_files(workdir, present))
