"""The factory's checks that need no libvirt: marker arguments (from VMRequest's fields) and boot figures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.factory import MARKER_ARGS, BootStats, DeviceVMFactory
from pytest_flightctl_device.devices.request import VMRequest
from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import Settings


def factory(tmp_path: Path) -> DeviceVMFactory:
    settings = dataclasses.replace(Settings(), workdir=tmp_path / "work", cache_dir=tmp_path / "cache",
                                   memory_mib=512, vcpus=2, max_vms=1)
    return DeviceVMFactory(settings, base_image=tmp_path / "disk.qcow2", agent=throwaway_agent_config(),
                           run_id="ab12", worker="t")


def test_marker_arguments_are_vmrequests_fields(tmp_path: Path) -> None:
    assert set(MARKER_ARGS) == {f.name for f in dataclasses.fields(VMRequest)}
    made = factory(tmp_path)
    assert made.request_from_marker((), {"variant": "v2", "runcmd": ["true"]}) == VMRequest(
        memory_mib=512, vcpus=2, variant="v2", runcmd=("true",))
    with pytest.raises(ConfigError, match=r"unexpected arguments \['memory'\]; use keyword arguments from "
                                          r"memory_mib, vcpus, variant, runcmd, boot_timeout, fresh, labels\."):
        made.request_from_marker((), {"memory": 512})
    assert made.request_from_marker((), {"labels": {"site": "lab", "a": "b"}}).labels == (("a", "b"), ("site", "lab"))
    with pytest.raises(ConfigError, match=r"labels=\{'site': 1\} must map label names to strings"):
        made.request_from_marker((), {"labels": {"site": 1}})
    with pytest.raises(ConfigError, match=r"unexpected arguments \['v2'\]"):
        made.request_from_marker(("v2",), {})
    with pytest.raises(ConfigError, match="vcpus=0 must be a positive number"):
        made.request_from_marker((), {"vcpus": 0})
    assert not (tmp_path / "work").exists()  # validating touched nothing


def test_boot_stats_travel_between_processes() -> None:
    worker, controller = BootStats(), BootStats()
    assert controller.summary() is None
    worker.add(12.5, "TCG (--device-accel tcg)")
    worker.add(9.0, "TCG (--device-accel tcg)")
    controller.merge(worker.as_data())  # what xdist's workeroutput carries
    controller.add(20.0, "KVM (probing)")
    assert controller.summary() == ("3 device VM(s) booted, ready after 9.0-20.0 s; "
                                    "acceleration: KVM (probing); TCG (--device-accel tcg)")
