"""A device VM's libvirt domain: its XML, the owner metadata the janitor reads, and starting it.

Starting is kept here with the XML because the two fail together: the SSH port picked for the
XML can be taken before qemu binds it (retried), and libvirt's errors are mapped to what the
user must change (an unreadable base image is a ConfigError, not a boot failure).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from pytest_flightctl_device.core import formats
from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices.janitor import METADATA_KEY, METADATA_NS, boot_id
from pytest_flightctl_device.devices.ports import port_reservation
from pytest_flightctl_device.errors import BootError, ConfigError, MissingToolError


@dataclass(frozen=True)
class DomainSpec:
    name: str
    kvm: bool
    memory_mib: int
    vcpus: int
    overlay: Path
    seed: Path
    console: Path
    ssh_port: int
    mac: str
    isolated: bool
    firmware: str
    owner: Owner
    run_id: str
    created: str
    keep: bool = False
    nvram: Path | None = None
    genid: bool = False  # a VM generation ID (libvirt changes it on a snapshot revert)
    console_pty: bool = False  # a remote host: a pty read through libvirt's console stream, not `console`


def _owner_attrs(spec: DomainSpec, keep: bool) -> str:
    return (f"pid='{spec.owner.pid}' start='{spec.owner.start}' run={quoteattr(spec.run_id)} "
            f"created={quoteattr(spec.created)} keep='{int(keep)}' boot={quoteattr(boot_id())}")


def owner_metadata(spec: DomainSpec, *, keep: bool) -> str:
    """The <owner> element for virDomainSetMetadata (libvirt adds our namespace and prefix)."""
    return f"<owner {_owner_attrs(spec, keep)}/>"


def _os(spec: DomainSpec) -> str:
    if spec.firmware == "uefi":
        nvram = f"<nvram>{escape(str(spec.nvram))}</nvram>" if spec.nvram else ""
        # Firmware autoselection, without Secure Boot (test guests' loaders are unsigned).
        return (f"<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type>"
                f"<firmware><feature enabled='no' name='secure-boot'/></firmware>"
                f"{nvram}<boot dev='hd'/></os>")
    return ("<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>"
            "<bios useserial='yes'/></os>")


def _serial(spec: DomainSpec) -> str:
    if spec.console_pty:
        return ("<serial type='pty'><target port='0'/></serial>"
                "<console type='pty'><target type='serial' port='0'/></console>")
    return f"<serial type='file'><source path={quoteattr(str(spec.console))}/><target port='0'/></serial>"


NETDEV = "fcnet0"  # the user-mode netdev's id, which add_ssh_forward() names too


def render(spec: DomainSpec) -> str:
    """Transient domain: overlay disk, seed CD-ROM on virtio-scsi, console to a file, user-mode net.

    Networking goes through <qemu:commandline> because libvirt's user interface ignores
    <portForward> (FACTS.md): the SSH forward binds 127.0.0.1 only, and restrict=on keeps an
    isolated guest from reaching anything beyond the forwards.
    """
    cpu = "<cpu mode='host-passthrough'/>" if spec.kvm else "<cpu mode='maximum'/>"
    netdev = f"user,id={NETDEV},hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
    if spec.isolated:
        netdev += ",restrict=on"
    features = "<features><acpi/><apic/></features>"
    metadata = f"<{METADATA_KEY}:owner xmlns:{METADATA_KEY}='{METADATA_NS}' {_owner_attrs(spec, spec.keep)}/>"
    kind = "kvm" if spec.kvm else "qemu"
    # libvirt does not know about the NIC we add: pin it to a slot libvirt leaves free.
    bus = "pcie.0" if spec.firmware == "uefi" else "pci.0"
    return f"""<domain type='{kind}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{escape(spec.name)}</name>
  <metadata>{metadata}</metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  {'<genid/>' if spec.genid else ''}
  {_os(spec)}
  {features}
  {cpu}
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file={quoteattr(str(spec.overlay))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' model='virtio-scsi'/>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(spec.seed))}/>
      <target dev='sda' bus='scsi'/>
      <readonly/>
    </disk>
    {_serial(spec)}
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value={quoteattr(netdev)}/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev={NETDEV},mac={spec.mac},romfile=,bus={bus},addr=0x10'/>
  </qemu:commandline>
</domain>
"""


# -- starting ---------------------------------------------------------------------------------------

PORT_ATTEMPTS = 3


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
    qemu_img = formats.qemu_img()
    # 0600 from its first byte (the guest writes the injected secrets into it); qemu-img
    # truncates an existing file and keeps its mode.
    os.close(os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    proc = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                           str(overlay)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        overlay.unlink(missing_ok=True)
        why = " ".join(line.strip() for line in proc.stderr.splitlines() if line.strip())
        raise ConfigError(f"cannot create an overlay over {base} ({why}); give a qcow2 image with --device-qcow2.")


def start_domain(conn: Any, spec_for: Callable[[int], DomainSpec], *, ports_lock: Path, base_image: Path,
                 autodestroy: bool = True,
                 ports: Callable[[], AbstractContextManager[int]] | None = None,
                 paused: bool = False) -> tuple[Any, DomainSpec]:
    """Start a transient domain whose SSH forward uses a free loopback port; (domain, spec it got).

    The port lock is held until qemu has bound the port; a port taken anyway (by a process outside
    the lock) is retried with another one. `ports` picks ports another way (a remote host's);
    `paused` leaves the guest's CPUs stopped until the caller resumes it (console stream first).
    """
    import libvirt

    flags = libvirt.VIR_DOMAIN_START_AUTODESTROY if autodestroy else 0
    if paused:
        flags |= libvirt.VIR_DOMAIN_START_PAUSED
    reserve = ports or (lambda: port_reservation(ports_lock))
    last_error = ""
    spec: DomainSpec | None = None
    for _attempt in range(PORT_ATTEMPTS):
        with reserve() as port:
            spec = spec_for(port)
            try:
                dom = conn.createXML(render(spec), flags)
            except libvirt.libvirtError as exc:
                last_error = exc.get_error_message() or str(exc)
                if "host forwarding" in last_error or "Address already in use" in last_error:
                    continue
                break
        return dom, spec
    name = spec.name if spec else "?"
    if "Permission denied" in last_error and "backing file" in last_error:
        raise ConfigError(
            f"libvirt's qemu cannot read the base image {base_image} (a parent directory is "
            "not traversable for the user qemu runs as); put the qcow2 under a directory every user "
            "can traverse, such as /var/tmp, or use --device-libvirt-uri qemu:///session.")
    raise BootError(f"libvirt could not start device VM {name}: {last_error}")


def add_ssh_forward(dom: Any, port: int) -> None:
    """One more 127.0.0.1 port forwarded to the running guest's SSH (QEMU's HMP hostfwd_add through
    libvirt-qemu, ~4 ms; libvirt then lists the domain as tainted by a monitor command). A snapshot
    clone gets its own port this way: the port of the clone before it went with that clone's qemu.
    Raises RuntimeError with QEMU's sentence when the forward cannot be set."""
    import libvirt_qemu

    said = libvirt_qemu.qemuMonitorCommand(dom, f"hostfwd_add {NETDEV} tcp:127.0.0.1:{port}-:22",
                                           libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP).strip()
    if said:  # hostfwd_add says nothing when it worked
        raise RuntimeError(said)


def destroy_domain(dom: Any) -> None:
    """Stop a domain; one that is already gone is the goal, not an error."""
    with contextlib.suppress(Exception):
        if dom.isActive():
            dom.destroy()


def mark_kept(dom: Any, spec: DomainSpec) -> None:
    """Tell the janitor (through the domain's metadata) that this domain outlives its owner on purpose."""
    import libvirt

    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, owner_metadata(spec, keep=True), METADATA_KEY,
                    METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
