"""The console reader and the patterns that end a boot early."""

from __future__ import annotations

from pathlib import Path

from pytest_flightctl_device.devices.console import CLOUD_INIT_ERROR, KERNEL_OUTPUT, NO_BOOT_DEVICE, PANIC, ConsoleLog


def test_incremental_reads_and_marks(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    log = ConsoleLog(path)
    assert log.refresh() == ""  # not created yet
    path.write_bytes(b"SeaBIOS\r\nfcdev-ready i-1\r\n")
    assert log.refresh() == "SeaBIOS\nfcdev-ready i-1\n"
    mark = log.mark()
    with path.open("ab") as handle:
        handle.write(b"rebooting\n")
    assert log.refresh() == "rebooting\n"
    assert log.search("fcdev-ready i-1", since=mark) is None
    assert log.search("fcdev-ready i-1") is not None
    assert log.search("rebooting", since=mark) is not None


def test_tail(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_text("".join(f"line {n}\n" for n in range(100)))
    tail = ConsoleLog(path).tail(50)
    assert tail.splitlines()[0] == "line 50" and tail.splitlines()[-1] == "line 99"


def test_patterns() -> None:
    assert KERNEL_OUTPUT.search("[    0.000000] Linux version 6.1.0-28-cloud-amd64")
    assert not KERNEL_OUTPUT.search("Probing EDD (edd=off to disable)... ok")
    assert PANIC.search("Kernel panic - not syncing: VFS: Unable to mount root fs")
    assert NO_BOOT_DEVICE.search("No bootable device.")
    assert CLOUD_INIT_ERROR.search("2026-11-25 util.py[WARNING]: x\ncc_scripts_user.py[WARNING]: "
                                   "Failed to run module scripts-user (scripts in /var/lib/cloud)")
    assert CLOUD_INIT_ERROR.search("cloud-init[123]: ERROR: write_files failed")
    assert not CLOUD_INIT_ERROR.search("Cloud-init v. 22.4.2 finished at Wed, 25 Nov 2026")
