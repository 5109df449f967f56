"""Devices on a "remote" libvirt host: qemu+ssh through a real sshd on 127.0.0.1.

The test's own dropbear (tests/support/sshd.py, key made here) stands in for the remote host, so
libvirt's real ssh transport, storage API and console stream are used. The base image sits in a
0700 directory that the host's qemu cannot read: only the upload path can boot it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.agent import AgentConfig
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.errors import BootError
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import HELLO, domain_names, hello_server, missing, remove_pool, scratch_pool
from tests.support.sshd import SshServer, ssh_server

pytest_plugins = ["pytester"]

LOCAL = "qemu:///system"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    if os.getuid() != 0:
        missing("the qemu+ssh stand-in logs in as root to reach qemu:///system")
    with ssh_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server
    subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{server.port}"], capture_output=True, check=False)


def _uri(server: SshServer) -> str:
    return (f"qemu+ssh://{server.user}@127.0.0.1:{server.port}/system"
            f"?keyfile={server.key.private_path}&no_verify=1")


@pytest.fixture(scope="module")
def private_base(tmp_path_factory: pytest.TempPathFactory, tiny_guest: Path) -> Path:
    """The tiny guest in a 0700 directory (qemu runs as another user), made unique so each run
    uploads it: a few bytes past the qcow2's end change its digest, not the disk."""
    directory = tmp_path_factory.mktemp("private-base")
    directory.chmod(0o700)
    base = directory / "tiny.qcow2"
    shutil.copyfile(tiny_guest, base)
    with open(base, "ab") as handle:
        handle.write(secrets.token_bytes(16))
    return base


@pytest.fixture(scope="module")
def test_pool() -> Iterator[str]:
    """A pool of this module's own (qemu-readable dir), removed with every volume at the end."""
    conn = open_libvirt(LOCAL)
    name = f"fcdev-test-{secrets.token_hex(3)}"
    path = Path("/var/tmp") / name
    pool = scratch_pool(conn, name, path)
    try:
        yield name
    finally:
        remove_pool(pool, path)
        conn.close()


def _factory(settings: Settings, agent: AgentConfig, base: Path, uris: tuple[str, ...],
             log: list[str] | None = None, **changes: object) -> DeviceVMFactory:
    settings = dataclasses.replace(settings, network="isolated", memory_mib=256, vcpus=1, boot_timeout=60.0,
                                   libvirt_uri=uris, **changes)
    return DeviceVMFactory(settings, base_image=base, agent=agent, run_id=secrets.token_hex(4), worker="r",
                           log=(log.append if log is not None else None))


def _volumes(pool: str) -> set[str]:
    conn = open_libvirt(LOCAL)
    try:
        return {vol.name() for vol in conn.storagePoolLookupByName(pool).listAllVolumes(0)}
    finally:
        conn.close()



def test_remote_boot_run_files_reboot_console(device_settings: Settings, agent_config: AgentConfig,
                                              sshd: SshServer, private_base: Path, test_pool: str,
                                              tmp_path: Path) -> None:
    with hello_server() as hello_port:
        factory = _factory(device_settings, agent_config, private_base, (_uri(sshd),), libvirt_pool=test_pool,
                           host_forward=(hello_port,))
        try:
            vm = factory.create()
            assert vm.host == f"{sshd.user}@127.0.0.1:{sshd.port}"
            assert vm.run("echo hello").stdout == "hello\n"
            # --device-host-forward reaches this machine's service through the hop and the guest's SSH.
            assert vm.run(f"wget -q -O - http://127.0.0.1:{hello_port}/").stdout == HELLO
            local = tmp_path / "in.txt"
            local.write_text("through the jump\n")
            vm.put_file(local, "/tmp/in.txt")
            assert vm.get_file("/tmp/in.txt", tmp_path / "out.txt").read_text() == "through the jump\n"
            # The console came through libvirt's console stream into the local file.
            assert "Linux version" in vm.console_text()
            assert "type='pty'" in vm.domain_xml() or 'type="pty"' in vm.domain_xml()
            # The disks are volumes: the overlay over the uploaded base, the seed uploaded.
            volumes = _volumes(test_pool)
            assert {f"{vm.name}.overlay.qcow2", f"{vm.name}.seed.iso"} <= volumes
            bases = [v for v in volumes if v.startswith("fcdev-base-") and v.endswith(".qcow2")]
            assert len(bases) == 1 and bases[0] + ".ok" in volumes
            assert f"{factory.process_dir.name}.owner" in volumes
            # ssh_command() is a line a human can paste (here with a command after it).
            pasted = subprocess.run([*shlex.split(vm.ssh_command()), "-o", "BatchMode=yes", "echo", "pasted"],
                                    capture_output=True, text=True, timeout=60, check=False)
            assert pasted.stdout == "pasted\n", pasted.stderr
            vm.reboot()
            assert vm.run("echo again").stdout == "again\n"
            name = vm.name
            factory.release(vm)
            assert name not in domain_names(LOCAL)
            assert not {v for v in _volumes(test_pool) if v.startswith(name + ".")}
        finally:
            factory.close()
    assert not {v for v in _volumes(test_pool) if v.startswith(factory.process_dir.name)}


def test_second_run_uploads_nothing_and_skips_an_unreachable_host(
        device_settings: Settings, agent_config: AgentConfig, sshd: SshServer, private_base: Path,
        test_pool: str) -> None:
    """A second run uploads nothing (a first run, here or in the earlier test, put the base on the
    host). A dead URI listed first is reported once and skipped; a boot that fails shows the
    console tail the stream drained."""
    first = _factory(device_settings, agent_config, private_base, (_uri(sshd),), [], libvirt_pool=test_pool)
    try:  # the first run: it uploads the base unless the earlier test (on this xdist worker) did
        first.release(first.create())
    finally:
        first.close()
    with socket_closed_port() as dead:
        log: list[str] = []
        dead_uri = f"qemu+ssh://root@127.0.0.1:{dead}/system?no_verify=1"
        factory = _factory(device_settings, agent_config, private_base, (dead_uri, _uri(sshd)), log,
                           libvirt_pool=test_pool)
        try:
            vm = factory.create()
            assert vm.run("echo up").stdout == "up\n"
            factory.release(vm)
            with pytest.raises(BootError, match="not ready in time") as info:
                factory.create(boot_timeout=0.5)
            assert "last 50 console lines:\n" in str(info.value)
            assert str(info.value).split("last 50 console lines:\n", 1)[1].strip()
            store = factory.hosts.hosts[1].store
            assert store.upload_seconds == {}
            assert sum("127.0.0.1:" + str(dead) in line and "cannot be reached" in line for line in log) == 1
        finally:
            factory.close()


class socket_closed_port:
    """A loopback port nothing listens on (bound, never listening, for the block)."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *_: object) -> None:
        self._sock.close()


CHILD = textwrap.dedent("""
    import dataclasses, sys
    from pathlib import Path
    from pytest_flightctl_device.devices.agent import throwaway_agent_config
    from pytest_flightctl_device.settings import Settings
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

    settings = dataclasses.replace(Settings.resolve({}, {}, {}), network="isolated", memory_mib=256, vcpus=1,
        libvirt_uri=sys.argv[3], workdir=Path(sys.argv[4]), cache_dir=Path(sys.argv[5]), libvirt_pool=sys.argv[6])
    factory = DeviceVMFactory(settings, base_image=Path(sys.argv[1]), agent=throwaway_agent_config(),
                              run_id=sys.argv[2], worker="k")
    factory.create()
""")


def test_kill_9_mid_boot_leaves_nothing(device_settings: Settings, sshd: SshServer, private_base: Path,
                                        test_pool: str) -> None:
    run_id = secrets.token_hex(4)
    process = f"{janitor.PREFIX}{run_id}-k"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(private_base), run_id, _uri(sshd),
                              str(device_settings.workdir), str(device_settings.cache_dir), test_pool])
    try:
        deadline = time.monotonic() + 60
        while f"{process}-1" not in domain_names(LOCAL):
            assert child.poll() is None, "the child died before its domain started"
            assert time.monotonic() < deadline, "the child's domain never started"
            time.sleep(0.1)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 2.0
    while f"{process}-1" in domain_names(LOCAL) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"{process}-1" not in domain_names(LOCAL), "the killed run's remote domain outlived it by 2 s"
    assert {v for v in _volumes(test_pool) if v.startswith(process)}  # its volumes wait for the next run
    conn = open_libvirt(_uri(sshd))
    try:
        janitor.sweep_host(conn, test_pool)  # what the next run's first connection to the host does
    finally:
        conn.close()
    assert not {v for v in _volumes(test_pool) if v.startswith(process)}


INNER = """
    import json, time, pytest
    import libvirt
    import xml.etree.ElementTree as ET
    from pytest_flightctl_device.devices.domain import open_libvirt

    def running(run_id):
        conn = open_libvirt("qemu:///system")  # both hosts are this machine's libvirtd
        try:
            kinds = []
            for dom in conn.listAllDomains():
                try:
                    if dom.name().startswith(f"fcdev-{run_id}-") and dom.isActive():
                        serial = ET.fromstring(dom.XMLDesc(0)).find("devices/serial").get("type")
                        kinds.append("remote" if serial == "pty" else "local")
                except libvirt.libvirtError:  # destroyed by the other worker meanwhile
                    pass
            return kinds
        finally:
            conn.close()

    @pytest.mark.parametrize("n", [1, 2, 3, 4])
    def test_device(device_vm, n):
        run_id = device_vm.name.split("-")[1]
        seen = []
        for _ in range(10):
            seen.append(running(run_id))
            time.sleep(0.2)
        with open("OUT/%d.json" % n, "w") as handle:
            json.dump({"host": device_vm.host, "seen": seen}, handle)
        assert device_vm.run("echo up").stdout == "down"
"""


def test_two_hosts_under_xdist_each_with_a_one_vm_share(pytester: pytest.Pytester, sshd: SshServer,
                                                        tiny_guest: Path, tmp_path: Path) -> None:
    out = tmp_path / "vms"
    out.mkdir()
    workdir = Path("/var/tmp") / f"fcdev-test-{secrets.token_hex(3)}"  # qemu must traverse it
    workdir.mkdir(mode=0o711)
    pytester.makepyfile(textwrap.dedent(INNER).replace("OUT", str(out)))
    try:
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", f"--device-qcow2={tiny_guest}", "--device-network", "isolated",
            "--device-memory-mib", "256", "--device-vcpus", "1", f"--device-workdir={workdir}",
            f"--device-libvirt-uri={_uri(sshd)}", f"--device-libvirt-uri={LOCAL}", "--device-max-vms", "1",
            "-n", "2")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.assert_outcomes(failed=4)
    records = [json.loads((out / f"{n}.json").read_text()) for n in (1, 2, 3, 4)]
    label = f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert {record["host"] for record in records} == {label, "local"}
    for record in records:
        for kinds in record["seen"]:
            assert kinds.count("remote") <= 1 and kinds.count("local") <= 1, kinds
    text = result.stdout.str()
    counts = {host: sum(r["host"] == host for r in records) for host in ("local", label)}
    result.stdout.fnmatch_lines([f"*4 device VM(s) booted*per libvirt host: local {counts['local']}, "
                                 f"{label} {counts[label]}*"])
    # Every failure's report has the console (drained from the stream for the remote ones) and the XML.
    assert text.count("console (last 50 lines)") == 4 and text.count("fcdev-ready") >= 4
    assert "<serial type='pty'>" in text or '<serial type="pty">' in text
