"""flightctl-device boot and doctor, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pytest_flightctl_device.settings import Settings


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_flightctl_device.cli", *args],
                          capture_output=True, text=True, timeout=600, check=False)


def test_boot_runs_a_command_in_a_fresh_device(tiny_guest: Path, device_settings: Settings) -> None:
    result = cli("boot", f"--qcow2={tiny_guest}", "--network=isolated", "--memory-mib=256", "--vcpus=1",
                 f"--cache-dir={device_settings.cache_dir}",
                 "--run", "hostname; sudo stat -c '%a' /etc/flightctl/certs/client-enrollment.key; exit 4")
    assert result.returncode == 4, result.stderr
    hostname, mode = result.stdout.split()
    assert hostname.startswith("fcdev-") and hostname.endswith("-cli-1")
    assert mode == "600"
    assert "ready in" in result.stderr and "throwaway CA" in result.stderr


def test_boot_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    result = cli("boot", "--memory-mib=-1")
    assert result.returncode == 1
    assert result.stderr.strip() == ("flightctl-device: --memory-mib '-1' must be greater than zero; "
                                     "give a positive whole number.")
    result = cli("boot", "--network=isolated")
    assert result.returncode == 1 and "no disk image: give --qcow2 PATH" in result.stderr
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    result = cli("boot", f"--qcow2={raw}")
    assert result.returncode == 1 and str(raw) in result.stderr and "qcow2" in result.stderr
    assert "Traceback" not in result.stderr


def test_doctor(device_settings: Settings) -> None:
    good = cli("doctor", f"--cache-dir={device_settings.cache_dir}")
    assert good.returncode == 0, good.stdout
    assert any(line.startswith("ok") and "libvirt" in line for line in good.stdout.splitlines())
    bad = cli("doctor", "--libvirt-uri=qemu+unix:///system?socket=/nonexistent/sock")
    assert bad.returncode == 1
    line = next(line for line in bad.stdout.splitlines() if " libvirt " in line)
    assert line.startswith("MISSING") and "start libvirtd" in line
