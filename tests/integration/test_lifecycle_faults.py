"""What a killed run leaves, what the janitor removes, and what it must never touch."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import domain_names

CHILD = textwrap.dedent("""
    import dataclasses, sys, time
    from pathlib import Path
    from pytest_flightctl_device.devices.agent import throwaway_agent_config
    from pytest_flightctl_device.settings import Settings
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

    settings = dataclasses.replace(Settings.resolve({}, {}, {}),
        network="isolated", memory_mib=256, vcpus=1, libvirt_uri=sys.argv[3], workdir=Path(sys.argv[4]),
        cache_dir=Path(sys.argv[5]))
    factory = DeviceVMFactory(settings, base_image=Path(sys.argv[1]), agent=throwaway_agent_config(),
                              run_id=sys.argv[2], worker="k")
    vm = factory.create()
    print(vm.name, vm.dir, flush=True)
    time.sleep(600)
""")



def test_kill_9_leaves_no_domain_and_the_janitor_removes_its_files(
        device_settings: Settings, tiny_guest: Path) -> None:
    uri = device_settings.libvirt_uri[0]
    workdir = device_settings.workdir
    run_id = secrets.token_hex(4)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_guest), run_id, uri, str(workdir),
                              str(device_settings.cache_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line, "the child process did not boot its VM"
        name, vm_dir = line[0], Path(line[1])
        assert name in domain_names(uri)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 2.0
    while name in domain_names(uri) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert name not in domain_names(uri), "the killed run's domain outlived it by 2 s"
    assert vm_dir.exists()  # files stay until a janitor runs
    conn = open_libvirt(uri)
    try:
        swept = janitor.sweep(conn, workdir)
    finally:
        conn.close()
    assert vm_dir in swept.paths and not vm_dir.parent.exists()


def _dead_owner() -> Owner:
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner(proc.pid, int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]))
    proc.kill()
    proc.wait()
    return owner


def _process_dir(workdir: Path, owner: Owner | None, vms: int = 1, keep: bool = False) -> Path:
    run = secrets.token_hex(4)
    process_dir = workdir / f"fcdev-{run}-t"
    process_dir.mkdir(parents=True)
    if owner is not None:
        janitor.write_owner(process_dir, owner, run, "t")
    for n in range(1, vms + 1):
        (process_dir / str(n)).mkdir()
        (process_dir / str(n) / "overlay.qcow2").write_bytes(b"x")
        if keep:
            (process_dir / str(n) / janitor.KEEP_FILE).touch()
    return process_dir


def test_janitor_spares_live_runs_and_kept_vms(tmp_path: Path) -> None:
    dead = _process_dir(tmp_path, _dead_owner(), vms=2)
    live = _process_dir(tmp_path, Owner.current())
    kept_running = _process_dir(tmp_path, _dead_owner(), keep=True)
    kept_gone = _process_dir(tmp_path, _dead_owner(), keep=True)
    just_born = _process_dir(tmp_path, None)  # its creator has not written owner.json yet
    removed = janitor.sweep_files(tmp_path, present_domains={f"{kept_running.name}-1"})
    assert not dead.exists() and not kept_gone.exists()
    assert live.exists() and (live / "1").exists()
    assert (kept_running / "1").exists()
    assert just_born.exists()
    assert dead / "1" in removed and dead / "2" in removed


def test_janitor_leaves_live_domains_alone(tiny_factory: DeviceVMFactory) -> None:
    vm = tiny_factory.create()
    try:
        destroyed, present = janitor.sweep_domains(tiny_factory.conn)
        assert vm.name in present and vm.name not in destroyed
        assert vm.is_active()
    finally:
        tiny_factory.release(vm)
