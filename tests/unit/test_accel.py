"""Acceleration choice and the remembered per-host verdict (the probe itself runs in integration)."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from pytest_flightctl_device.core.atomic import temp_path
from pytest_flightctl_device.core.liveness import Owner, start_ticks
from pytest_flightctl_device.devices import accel
from pytest_flightctl_device.devices.accel import Accelerator, watch_kernel
from pytest_flightctl_device.devices.console import ConsoleLog
from pytest_flightctl_device.errors import ConfigError


def test_tcg_never_probes(tmp_path: Path) -> None:
    choice = Accelerator("tcg", tmp_path / "v.json").choose()
    assert (choice.kvm, choice.probe) == (False, False)


def test_auto_without_kvm_device_uses_tcg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: "/dev/kvm cannot be opened (No such file)")
    choice = Accelerator("auto", tmp_path / "v.json").choose()
    assert not choice.kvm and "cannot be opened" in choice.reason
    with pytest.raises(ConfigError, match="--device-accel kvm was asked for but /dev/kvm cannot be opened"):
        Accelerator("kvm", tmp_path / "v.json").choose()


def test_verdict_is_remembered_per_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "kvm_device_usable", lambda: None)
    verdicts = tmp_path / "cache" / "accel.json"
    first = Accelerator("auto", verdicts)
    assert first.choose().probe
    first.record(False, "no guest kernel output")
    again = Accelerator("auto", verdicts).choose()
    assert (again.kvm, again.probe) == (False, False)
    assert "no guest kernel output" in again.reason
    monkeypatch.setattr(accel, "host_key", lambda: "another-host")
    assert Accelerator("auto", verdicts).choose().probe  # another host probes for itself


def test_watch_kernel_sees_kernel_output(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_text("SeaBIOS\n")

    def later() -> None:
        time.sleep(0.3)
        with path.open("a") as handle:
            handle.write("[    0.000000] Linux version 6.1.0\n")

    threading.Thread(target=later).start()
    works, reason = watch_kernel(ConsoleLog(path), lambda: True, silence=5, cap=10)
    assert works, reason


def test_watch_kernel_gives_up_on_silence(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_text("Probing EDD (edd=off to disable)... ok\n")
    works, reason = watch_kernel(ConsoleLog(path), lambda: True, silence=0.5, cap=10)
    assert not works and "no guest kernel output" in reason


def test_watch_kernel_stops_when_domain_dies(tmp_path: Path) -> None:
    works, reason = watch_kernel(ConsoleLog(tmp_path / "none.log"), lambda: False, silence=5, cap=10)
    assert not works and "stopped" in reason


def test_record_sweeps_temps_of_killed_writers(tmp_path: Path) -> None:
    verdicts = tmp_path / "accel.json"
    gone = subprocess.Popen(["sleep", "30"])
    dead_owner = Owner(gone.pid, start_ticks(gone.pid) or -1)
    gone.kill()
    gone.wait()
    dead = tmp_path / f".accel.json.{dead_owner.token}.0badc0de.tmp"  # killed before its rename
    dead.write_text("{")
    live = temp_path(verdicts)  # a live writer's (this process): kept
    live.write_text("{")
    Accelerator("auto", verdicts).record(True, "kernel printed")
    assert not dead.exists() and live.exists()
    live.unlink()
    assert [p.name for p in tmp_path.iterdir()] == ["accel.json"]
