"""The domain XML: what libvirt is asked for, and the owner metadata the janitor reads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices.domain import METADATA_NS, DomainSpec, owner_metadata, render

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def spec(**changes: object) -> DomainSpec:
    values: dict[str, object] = dict(
        name="fcdev-ab12-main-1", kvm=False, memory_mib=768, vcpus=1, overlay=Path("/w/1/overlay.qcow2"),
        seed=Path("/w/1/seed.iso"), console=Path("/w/1/console.log"), ssh_port=40022,
        mac="52:54:00:01:02:03", isolated=True, firmware="bios", owner=Owner(123, 456), run_id="ab12",
        created="2026-11-25T20:00:00+00:00")
    values.update(changes)
    return DomainSpec(**values)  # type: ignore[arg-type]


def qemu_args(root: ET.Element) -> list[str]:
    return [arg.get("value", "") for arg in root.iter(f"{{{QEMU_NS}}}arg")]


def test_tcg_domain() -> None:
    root = ET.fromstring(render(spec()))
    assert root.get("type") == "qemu"
    assert root.find("cpu").get("mode") == "maximum"  # x86-64-v2 for CentOS Stream 9 under TCG
    assert root.find("memory").text == "768"
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("source").get("file") == "/w/1/overlay.qcow2"
    assert disk.find("target").get("bus") == "virtio"
    assert cdrom.get("device") == "cdrom" and cdrom.find("target").get("bus") == "scsi"
    assert root.find("devices/controller").get("model") == "virtio-scsi"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/rng").get("model") == "virtio"
    assert root.find("devices/interface") is None  # networking only through qemu args
    args = qemu_args(root)
    assert "user,id=fcnet0,hostfwd=tcp:127.0.0.1:40022-:22,restrict=on" in args
    nic = next(a for a in args if a.startswith("virtio-net-pci,"))
    assert "romfile=," in nic and "mac=52:54:00:01:02:03" in nic  # no option ROM: faster TCG boot
    assert "bus=pci.0,addr=0x10" in nic  # a slot libvirt leaves free


def test_kvm_and_user_network() -> None:
    root = ET.fromstring(render(spec(kvm=True, isolated=False)))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert not any("restrict=on" in arg for arg in qemu_args(root))
    assert all("hostfwd=tcp:127.0.0.1:" in arg for arg in qemu_args(root) if "hostfwd" in arg)


def test_uefi() -> None:
    root = ET.fromstring(render(spec(firmware="uefi", nvram=Path("/w/1/VARS.fd"))))
    assert root.find("os").get("firmware") == "efi"
    assert any("bus=pcie.0" in arg for arg in qemu_args(root))  # q35 has no pci.0
    assert root.find("os/nvram").text == "/w/1/VARS.fd"
    assert root.find("os/bios") is None


def test_owner_metadata() -> None:
    root = ET.fromstring(render(spec()))
    owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    assert owner is not None
    assert owner.attrib == {"pid": "123", "start": "456", "run": "ab12",
                            "created": "2026-11-25T20:00:00+00:00", "keep": "0"}
    kept = ET.fromstring(owner_metadata(spec(), keep=True))
    assert kept.tag == "owner" and kept.get("keep") == "1"


def test_paths_are_escaped() -> None:
    root = ET.fromstring(render(spec(overlay=Path("/w/a'b&c/overlay.qcow2"))))
    assert root.find("devices/disk/source").get("file") == "/w/a'b&c/overlay.qcow2"
