"""Soak: many sequential boots and teardowns through one factory leave nothing behind.

After a warm-up boot (which opens the libvirt connection, makes the SSH key and imports what a
boot imports), `soak_boots` devices are booted, used once and released. Then nothing of theirs
may remain: no domain, no VM directory (overlay, seed, console, known_hosts), no SSH control
socket, no process that still refers to the factory's directory (qemu, ssh masters), no new child
process of this pytest (a podman service, a stray qemu-img), no extra open file descriptor; and
this process's RSS may not grow by more than 20 MiB. The figures go to stdout and to soak.json.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import statistics
import time
from pathlib import Path

from pytest_flightctl_device.devices.factory import DeviceVMFactory
from tests.integration.conftest import FactoryMaker

RSS_GROWTH_LIMIT_KIB = 20 * 1024


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def _fds() -> dict[int, str]:
    """This process's open descriptors and what they point at."""
    found: dict[int, str] = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            found[int(entry)] = os.readlink(f"/proc/self/fd/{entry}")
        except OSError:  # the descriptor listdir itself used, closed by now
            continue
    return found


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        table[int(entry)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def _children() -> set[str]:
    me = os.getpid()
    return {f"{pid} {cmd}" for pid, (ppid, cmd) in _processes().items() if ppid == me}


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _leftovers(factory: DeviceVMFactory, control_paths: list[Path]) -> dict[str, list[str]]:
    prefix = f"{factory.process_dir.name}-"
    domains = [dom.name() for dom in factory.conn.listAllDomains() if dom.name().startswith(prefix)]
    vm_dirs = [str(p) for p in factory.process_dir.iterdir() if p.is_dir()] if factory.process_dir.exists() else []
    sockets = [str(p) for p in control_paths if p.exists()]
    holders = [f"{pid} {cmd}" for pid, (_ppid, cmd) in _processes().items()
               if str(factory.process_dir) in cmd or any(str(p) in cmd for p in control_paths)]
    return {"domains": domains, "vm_dirs": vm_dirs, "control_sockets": sockets, "processes": holders}


def test_soak_sequential_boots_leak_nothing(make_factory: FactoryMaker, tiny_guest: Path, soak_boots: int,
                                            tmp_path: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0)
    control_paths: list[Path] = []

    def cycle() -> tuple[float, float]:
        vm = factory.create()
        assert vm.run("cat /etc/hostname").stdout.strip() == vm.name
        control_paths.append(vm.ssh.control_path)
        released = time.monotonic()
        factory.release(vm)
        return vm.boot_seconds, time.monotonic() - released

    cycle()  # warm-up: connection, key, imports, first-use caches
    gc.collect()
    fds_before, rss_before, children_before = _fds(), _rss_kib(), _children()

    boots: list[float] = []
    teardowns: list[float] = []
    started = time.monotonic()
    for _ in range(soak_boots):
        boot, teardown = cycle()
        boots.append(boot)
        teardowns.append(teardown)
    elapsed = time.monotonic() - started

    gc.collect()
    fds_after, rss_after, children_after = _fds(), _rss_kib(), _children()
    leftovers = _leftovers(factory, control_paths)
    new_fds = {fd: target for fd, target in fds_after.items() if fds_before.get(fd) != target}
    new_children = sorted(children_after - children_before)
    figures = {
        "boots": len(boots), "elapsed_s": round(elapsed, 1),
        "boot_mean_s": round(statistics.fmean(boots), 2), "boot_p95_s": round(_percentile(boots, 0.95), 2),
        "boot_min_s": round(min(boots), 2), "boot_max_s": round(max(boots), 2),
        "teardown_mean_s": round(statistics.fmean(teardowns), 2),
        "rss_before_kib": rss_before, "rss_after_kib": rss_after, "rss_growth_kib": rss_after - rss_before,
        "fds_before": len(fds_before), "fds_after": len(fds_after), "new_fds": new_fds,
        "new_children": new_children, "leftovers": leftovers,
    }
    report = tmp_path / "soak.json"
    report.write_text(json.dumps(figures, indent=1))
    print(f"soak figures ({report}): {json.dumps(figures)}")

    assert len(boots) == soak_boots
    assert leftovers == {"domains": [], "vm_dirs": [], "control_sockets": [], "processes": []}
    assert not new_children, new_children
    assert len(fds_after) <= len(fds_before) and not new_fds, new_fds
    assert rss_after - rss_before <= RSS_GROWTH_LIMIT_KIB, figures


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_teardown_survives_a_wedged_ssh_master(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    """An ssh ControlMaster that no longer answers must not keep the domain, files and slot alive."""
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0)
    vm = factory.create()
    control = vm.ssh.control_path
    masters = [pid for pid, (_ppid, cmd) in _processes().items() if str(control) in cmd and "[mux]" in cmd]
    assert len(masters) == 1, masters
    os.kill(masters[0], signal.SIGSTOP)  # the master this test's VM started
    try:
        factory.release(vm)
        leftovers = _leftovers(factory, [control])
    finally:
        os.kill(masters[0], signal.SIGCONT)
    assert leftovers["domains"] == [] and leftovers["vm_dirs"] == [] and leftovers["control_sockets"] == []
    assert vm not in factory.vms
    deadline = time.monotonic() + 60
    while not _gone(masters[0]) and time.monotonic() < deadline:  # its connection is gone: it exits
        time.sleep(0.2)
    assert _gone(masters[0])
