"""The janitor: owner files, dead and live owners, and every kind of file a dead session leaves."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pytest_flightctl_device.core.atomic import temp_path
from pytest_flightctl_device.core.liveness import Owner, start_ticks
from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.ssh import control_path
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing

REPO_ROOT = Path(__file__).resolve().parents[2]
VM_FILES = ("overlay.qcow2", "seed.iso", "console.log", "known_hosts", "nvram.fd")


def dead_owner() -> Owner:
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner(proc.pid, start_ticks(proc.pid) or -1)
    proc.kill()
    proc.wait()
    return owner


def session(workdir: Path, owner: Owner | None, *, vms: int = 1, keep: bool = False, name: str = "") -> Path:
    """A process directory as a factory leaves it: owner.json, key pair, one directory per VM."""
    run = name or secrets.token_hex(4)
    process_dir = workdir / f"{janitor.PREFIX}{run}-t"
    process_dir.mkdir(parents=True)
    if owner is not None:
        janitor.write_owner(process_dir, owner, run, "t")
    (process_dir / "id_ed25519").write_text("key")
    for n in range(1, vms + 1):
        vm_dir = process_dir / str(n)
        vm_dir.mkdir()
        for file in VM_FILES:
            (vm_dir / file).write_bytes(b"x")
        if keep:
            (vm_dir / janitor.KEEP_FILE).touch()
    return process_dir


@contextlib.contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen()
        yield sock
    finally:
        sock.close()


def test_owner_file_round_trip_is_atomic(tmp_path: Path) -> None:
    owner = Owner.current()
    janitor.write_owner(tmp_path, owner, "run1", "gw0")
    assert janitor.read_owner(tmp_path) == owner
    assert [p.name for p in tmp_path.iterdir()] == [janitor.OWNER_FILE]  # no temp left beside it
    (tmp_path / janitor.OWNER_FILE).write_text('{"pid": "x"}')
    assert janitor.read_owner(tmp_path) is None
    assert janitor.read_owner(tmp_path / "absent") is None


def test_a_dead_session_leaves_nothing_and_a_live_one_keeps_everything(tmp_path: Path) -> None:
    dead = session(tmp_path, dead_owner(), vms=2)
    live = session(tmp_path, Owner.current())
    removed = janitor.sweep_files(tmp_path, present_domains=set())
    assert not dead.exists() and set(removed) == {dead / "1", dead / "2", dead}
    assert sorted(p.name for p in (live / "1").iterdir()) == sorted(VM_FILES)


def test_a_reused_pid_does_not_keep_a_session_alive(tmp_path: Path) -> None:
    me = Owner.current()
    reused = session(tmp_path, Owner(me.pid, me.start + 1))  # this PID, another process's start time
    janitor.sweep_files(tmp_path, present_domains=set())
    assert not reused.exists()


def test_kept_vms_survive_while_their_domain_exists(tmp_path: Path) -> None:
    running = session(tmp_path, dead_owner(), keep=True)
    gone = session(tmp_path, dead_owner(), keep=True)
    janitor.sweep_files(tmp_path, present_domains={f"{running.name}-1"})
    assert (running / "1" / "overlay.qcow2").exists() and not gone.exists()


def test_a_directory_without_owner_waits_ten_minutes(tmp_path: Path) -> None:
    newborn = session(tmp_path, None)
    orphan = session(tmp_path, None)
    old = time.time() - 601
    os.utime(orphan, (old, old))
    janitor.sweep_files(tmp_path, present_domains=set())
    assert newborn.exists() and not orphan.exists()


def test_control_sockets_moved_to_tmp_and_killed_writers_temps_go_too(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 80)
    dead = session(deep, dead_owner())
    live = session(deep, Owner.current())
    dead_socket, live_socket = control_path(dead / "1"), control_path(live / "1")
    assert dead_socket.parent == live_socket.parent == Path("/tmp")  # the path was too long for a socket
    code = ("import sys; from pathlib import Path; from pytest_flightctl_device.core.atomic import temp_path;"
            "t = temp_path(Path(sys.argv[1])); t.write_text('killed'); print(t)")
    killed = Path(subprocess.run([sys.executable, "-c", code, str(deep / "accel.json")], check=True,
                                 capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip())
    mine = temp_path(deep / "accel.json")
    mine.write_text("a live writer's")
    with listening(dead_socket), listening(live_socket):
        janitor.sweep_files(deep, present_domains=set())
        assert not dead_socket.exists() and live_socket.exists()
    live_socket.unlink()
    assert not dead.exists() and not killed.exists() and mine.exists() and live.exists()


def test_libvirt_domains_of_dead_owners_are_undefined(device_settings: Settings) -> None:
    """A real libvirt: a defined domain of a dead owner goes, a live owner's and a foreign one stay."""
    try:
        import libvirt

        conn = libvirt.open(device_settings.libvirt_uri[0])
    except Exception as exc:  # no binding or no daemon
        missing(f"libvirt at {device_settings.libvirt_uri[0]}: {exc}")
    tag = secrets.token_hex(3)
    names = {"dead": f"{janitor.PREFIX}{tag}-dead-1", "live": f"{janitor.PREFIX}{tag}-live-1",
             "foreign": f"other-{tag}"}
    owners = {"dead": dead_owner(), "live": Owner.current(), "foreign": dead_owner()}
    try:
        for role, name in names.items():
            owner = owners[role]
            conn.defineXML(
                f"<domain type='qemu'><name>{name}</name><metadata><{janitor.METADATA_KEY}:owner "
                f"xmlns:{janitor.METADATA_KEY}='{janitor.METADATA_NS}' pid='{owner.pid}' start='{owner.start}' "
                f"keep='0'/></metadata><memory unit='MiB'>64</memory>"
                "<os><type arch='x86_64'>hvm</type></os></domain>")
        destroyed, present = janitor.sweep_domains(conn)
        assert names["dead"] in destroyed and names["live"] in present and names["live"] not in destroyed
        left = {dom.name() for dom in conn.listAllDomains()}
        assert names["dead"] not in left and {names["live"], names["foreign"]} <= left
    finally:
        for name in names.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.lookupByName(name).undefine()
        conn.close()
