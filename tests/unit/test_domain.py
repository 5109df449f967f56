"""The domain XML: what libvirt is asked for, and the owner metadata the janitor reads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices.domain import DomainSpec, owner_metadata, render, start_domain
from pytest_flightctl_device.devices.janitor import METADATA_NS, boot_id
from pytest_flightctl_device.errors import BootError, ConfigError

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


def spec(**changes: object) -> DomainSpec:
    values: dict[str, object] = dict(
        name="fcdev-ab12-main-1", kvm=False, memory_mib=768, vcpus=1, overlay=Path("/w/1/overlay.qcow2"),
        seed=Path("/w/1/seed.iso"), console=Path("/w/1/console.log"), ssh_port=40022,
        mac="52:54:00:01:02:03", isolated=True, firmware="bios", owner=Owner(123, 456), run_id="ab12",
        created="2026-11-25T20:00:00+00:00")
    values.update(changes)
    return DomainSpec(**values)  # type: ignore[arg-type]


def find(root: ET.Element, path: str) -> ET.Element:
    element = root.find(path)
    assert element is not None, path
    return element


def qemu_args(root: ET.Element) -> list[str]:
    return [arg.get("value", "") for arg in root.iter(f"{{{QEMU_NS}}}arg")]


def test_tcg_domain() -> None:
    root = ET.fromstring(render(spec()))
    assert root.get("type") == "qemu"
    assert find(root, "cpu").get("mode") == "maximum"  # x86-64-v2 for CentOS Stream 9 under TCG
    assert find(root, "memory").text == "768"
    disk, cdrom = root.findall("devices/disk")
    assert find(disk, "source").get("file") == "/w/1/overlay.qcow2"
    assert find(disk, "target").get("bus") == "virtio"
    assert cdrom.get("device") == "cdrom" and find(cdrom, "target").get("bus") == "scsi"
    assert find(root, "devices/controller").get("model") == "virtio-scsi"
    assert find(root, "devices/serial").get("type") == "file"
    assert find(root, "devices/rng").get("model") == "virtio"
    assert root.find("devices/interface") is None  # networking only through qemu args
    args = qemu_args(root)
    assert "user,id=fcnet0,hostfwd=tcp:127.0.0.1:40022-:22,restrict=on" in args
    nic = next(a for a in args if a.startswith("virtio-net-pci,"))
    assert "romfile=," in nic and "mac=52:54:00:01:02:03" in nic  # no option ROM: faster TCG boot
    assert "bus=pci.0,addr=0x10" in nic  # a slot libvirt leaves free


def test_kvm_and_user_network() -> None:
    root = ET.fromstring(render(spec(kvm=True, isolated=False)))
    assert root.get("type") == "kvm"
    assert find(root, "cpu").get("mode") == "host-passthrough"
    assert not any("restrict=on" in arg for arg in qemu_args(root))
    assert all("hostfwd=tcp:127.0.0.1:" in arg for arg in qemu_args(root) if "hostfwd" in arg)


def test_uefi() -> None:
    root = ET.fromstring(render(spec(firmware="uefi", nvram=Path("/w/1/VARS.fd"))))
    assert find(root, "os").get("firmware") == "efi"
    assert any("bus=pcie.0" in arg for arg in qemu_args(root))  # q35 has no pci.0
    assert find(root, "os/nvram").text == "/w/1/VARS.fd"
    assert root.find("os/bios") is None


def test_owner_metadata() -> None:
    root = ET.fromstring(render(spec()))
    owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    assert owner is not None
    assert owner.attrib == {"pid": "123", "start": "456", "run": "ab12",
                            "created": "2026-11-25T20:00:00+00:00", "keep": "0", "boot": boot_id()}
    kept = ET.fromstring(owner_metadata(spec(), keep=True))
    assert kept.tag == "owner" and kept.get("keep") == "1"


def test_paths_are_escaped() -> None:
    root = ET.fromstring(render(spec(overlay=Path("/w/a'b&c/overlay.qcow2"))))
    assert find(root, "devices/disk/source").get("file") == "/w/a'b&c/overlay.qcow2"


# -- starting: a fake connection answers as libvirt does --------------------------------------------


class FakeDomain:
    def __init__(self) -> None:
        self.destroyed = False

    def isActive(self) -> bool:
        return not self.destroyed

    def destroy(self) -> None:
        self.destroyed = True


class FakeConn:
    """createXML fails with the given libvirt messages, in turn, then starts a FakeDomain."""

    def __init__(self, *errors: str) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[str, int]] = []
        self.domain = FakeDomain()

    def createXML(self, xml: str, flags: int) -> FakeDomain:
        self.calls.append((xml, flags))
        if self.errors:
            raise libvirt.libvirtError(self.errors.pop(0))
        return self.domain


def _start(conn: FakeConn, tmp_path: Path, **kwargs: object) -> tuple[object, DomainSpec]:
    return start_domain(conn, lambda port: spec(ssh_port=port), ports_lock=tmp_path / "ports.lock",
                        base_image=Path("/base/disk.qcow2"), **kwargs)  # type: ignore[arg-type]


def test_start_retries_a_port_someone_took(tmp_path: Path) -> None:
    conn = FakeConn("internal error: Could not set up host forwarding rule 'tcp:127.0.0.1:1-:22'")
    dom, started = _start(conn, tmp_path)
    assert dom is conn.domain and len(conn.calls) == 2
    assert f"hostfwd=tcp:127.0.0.1:{started.ssh_port}-:22" in conn.calls[-1][0]
    assert conn.calls[-1][1] == libvirt.VIR_DOMAIN_START_AUTODESTROY  # a killed run's domain goes with it
    kept = FakeConn()
    _start(kept, tmp_path, autodestroy=False)  # --device-keep-vm: the domain outlives the connection
    assert not kept.calls[0][1] & libvirt.VIR_DOMAIN_START_AUTODESTROY


def test_start_errors_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"libvirt's qemu cannot read the base image /base/disk.qcow2 .*/var/tmp"):
        _start(FakeConn("Cannot access backing file '/root/x/disk.qcow2': Permission denied"), tmp_path)
    with pytest.raises(BootError, match="libvirt could not start device VM fcdev-ab12-main-1: no memory"):
        _start(FakeConn("no memory"), tmp_path)
    taken = "Address already in use"
    with pytest.raises(BootError, match="Address already in use"):  # three ports taken: give up, say so
        _start(FakeConn(taken, taken, taken), tmp_path)
