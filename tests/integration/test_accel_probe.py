"""The KVM probe against this host's real qemu: trust KVM only when the guest kernel prints."""

from __future__ import annotations

import json
from pathlib import Path

from pytest_flightctl_device.devices.accel import kvm_device_usable
from pytest_flightctl_device.errors import BootError
from tests.integration.conftest import FactoryMaker
from tests.support.helpers import missing


def test_auto_probes_once_and_remembers(make_factory: FactoryMaker, tiny_guest: Path, tmp_path: Path) -> None:
    if kvm_device_usable() is not None:
        missing(f"the KVM probe needs /dev/kvm: {kvm_device_usable()}")
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, accel="auto", cache_dir=tmp_path)
    vm = factory.create()
    try:
        verdict = next(iter(json.loads((tmp_path / "accel.json").read_text()).values()))
        # Whatever this host can do, the VM ran with what the probe found, and it works.
        assert vm.accel == ("kvm" if verdict["kvm"] else "tcg")
        assert vm.run("echo up").stdout == "up\n"
        if not verdict["kvm"]:
            # Broken nested KVM shows as qemu aborting at start or as a kernel that never prints.
            assert "did not start under KVM" in verdict["reason"] or "no guest kernel output" in verdict["reason"]
            assert "Linux version" in vm.console_text()  # the TCG boot that replaced the probe
    finally:
        factory.release(vm)
    second = make_factory(tiny_guest, memory_mib=256, vcpus=1, accel="auto", cache_dir=tmp_path)
    choice = second.accelerator.choose()
    assert not choice.probe and choice.kvm == verdict["kvm"]  # the next session does not pay again


def test_kvm_asked_for(make_factory: FactoryMaker, tiny_guest: Path, tmp_path: Path) -> None:
    if kvm_device_usable() is not None:
        missing(f"--device-accel kvm needs /dev/kvm: {kvm_device_usable()}")
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, accel="kvm", cache_dir=tmp_path)
    try:
        vm = factory.create()
    except BootError as exc:
        # Nested KVM that starts qemu but hangs the kernel (as on this project's CI) is refused clearly.
        assert "--device-accel kvm was asked for but KVM does not work here" in str(exc)
        assert "use --device-accel auto or tcg" in str(exc)
        assert not (tmp_path / "accel.json").exists()  # an explicit kvm never writes auto's verdict
        return
    try:
        assert vm.accel == "kvm" and vm.run("echo up").stdout == "up\n"
    finally:
        factory.release(vm)


def test_tcg_boots_without_probe(make_factory: FactoryMaker, tiny_guest: Path, tmp_path: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, accel="tcg", cache_dir=tmp_path)
    vm = factory.create()
    try:
        assert vm.accel == "tcg"
        assert "<domain type='qemu'" in vm.domain_xml()
        assert not (tmp_path / "accel.json").exists()
    finally:
        factory.release(vm)
