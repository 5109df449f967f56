"""libvirt domain XML for a device VM, and the metadata that tells the janitor who owns it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from pytest_flightctl_device.core.liveness import Owner

METADATA_NS = "https://github.com/flightctl/pytest-flightctl-device/owner/1"
METADATA_KEY = "fcdev"


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


def _owner_attrs(spec: DomainSpec, keep: bool) -> str:
    return (f"pid='{spec.owner.pid}' start='{spec.owner.start}' run={quoteattr(spec.run_id)} "
            f"created={quoteattr(spec.created)} keep='{int(keep)}'")


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


def render(spec: DomainSpec) -> str:
    """Transient domain: overlay disk, seed CD-ROM on virtio-scsi, console to a file, user-mode net.

    Networking goes through <qemu:commandline> because libvirt's user interface ignores
    <portForward> (FACTS.md): the SSH forward binds 127.0.0.1 only, and restrict=on keeps an
    isolated guest from reaching anything beyond the forwards.
    """
    cpu = "<cpu mode='host-passthrough'/>" if spec.kvm else "<cpu mode='maximum'/>"
    netdev = f"user,id=fcnet0,hostfwd=tcp:127.0.0.1:{spec.ssh_port}-:22"
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
    <serial type='file'>
      <source path={quoteattr(str(spec.console))}/>
      <target port='0'/>
    </serial>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-netdev'/>
    <qemu:arg value={quoteattr(netdev)}/>
    <qemu:arg value='-device'/>
    <qemu:arg value='virtio-net-pci,netdev=fcnet0,mac={spec.mac},romfile=,bus={bus},addr=0x10'/>
  </qemu:commandline>
</domain>
"""
