"""--device-fresh snapshot: clones of a template, each a new device; abandoned clones; kill -9; keep."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_flightctl_device.devices import janitor
from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.devices.template import SNAPSHOT
from pytest_flightctl_device.settings import Settings
from tests.integration.conftest import FactoryMaker
from tests.support.helpers import domain_names

pytest_plugins = ["pytester"]



def _skew(vm_run: object) -> float:
    """Guest clock minus host clock, in seconds (the host's taken around the command)."""
    before = time.time()
    text = vm_run("date +%s.%N").stdout.strip()  # type: ignore[operator]
    guest = float(text.split(".")[0]) + 0.5 if "N" in text else float(text)  # busybox: no %N
    after = time.time()
    return guest - (before + after) / 2


RANDOM_BYTES = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"


def test_tiny_clones_are_fresh_and_an_abandoned_revert_is_cold_booted(make_factory: FactoryMaker,
                                                                        tiny_guest: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0, fresh="snapshot", max_vms=4)
    first = factory.create()
    assert first.domain_name.endswith(f"-{janitor.TEMPLATE_PREFIX}1") and first.name != first.domain_name
    assert first.run("hostname").stdout.strip() == first.name
    drawn = first.run(RANDOM_BYTES).stdout
    first.run("sudo touch /root/written-by-first")
    factory.release(first)

    second = factory.create()
    assert second.domain_name == first.domain_name  # the same template, reverted
    # its own SSH port: the first clone's went with the qemu the revert replaced
    template_port = factory.templates._busy[0].boot.ssh_port
    assert len({first.ssh_port, second.ssh_port, template_port}) == 3
    assert f"-p {second.ssh_port} " in second.ssh_command()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first.ssh_port), timeout=2).close()
    assert second.run("hostname").stdout.strip() == second.name != first.name
    assert not second.run("ls /root/written-by-first", check=False).ok
    # the same draw at the same point after the revert: without a reseed the CRNG replays it
    assert second.run(RANDOM_BYTES).stdout != drawn
    assert abs(_skew(second.run)) < 2.0
    assert "fcdev-ready" not in second.console_text()  # its own console: nothing from the template boot
    second.reboot()  # a clone reboots like any device
    assert second.run("cat /var/lib/fcdev-clone").stdout.strip() == second.name
    # A revert that cannot work (its snapshot is gone) is abandoned: template destroyed, cold boot.
    # (Deleted before the release: the release begins the revert.)
    template = factory.templates._busy[0]
    template.boot.dom.snapshotLookupByName(SNAPSHOT, 0).delete(0)
    factory.release(second)
    third = factory.create()
    assert third.domain_name == third.name  # cold-booted as itself
    assert third.run("hostname").stdout.strip() == third.name
    assert template.boot.name not in domain_names(factory.settings.libvirt_uri[0])
    assert not template.boot.dir.exists()
    assert factory.stats.fresh == {"clone": 2, "fallback": 1}
    summary = factory.stats.summary()
    assert summary is not None and "snapshot clones: 2, abandoned for a cold boot: 1" in summary
    factory.release(third)

    # A template of another shape is its own; a revert slower than REVERT_S is abandoned too.
    other = factory.create(memory_mib=300)
    assert other.domain_name != template.boot.name and "307200" in other.domain_xml()
    factory.release(other)
    from pytest_flightctl_device.devices import template as template_module

    old = template_module.REVERT_S
    template_module.REVERT_S = 0.001  # counted from the revert's start at the release just above
    try:
        fallback = factory.create(memory_mib=300)
    finally:
        template_module.REVERT_S = old
    assert fallback.domain_name == fallback.name and factory.stats.fresh["fallback"] == 2
    assert fallback.run("true").ok
    factory.release(fallback)
    assert factory.templates.running() == []


def test_a_template_stopped_in_the_middle_of_its_revert_leaves_nothing(make_factory: FactoryMaker,
                                                                        tiny_guest: Path) -> None:
    """The release begins the revert; a template stopped at any point of it (a waiting boot's slot,
    eviction, close) must not come back as the revert's new qemu. (Measured: libvirt runs the
    destroy once the revert's job is over, 0.24-0.9 s after it was asked for.)"""
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0, fresh="snapshot", max_vms=4)
    uri = factory.settings.libvirt_uri[0]
    for delay in (0.0, 0.05, 0.2, 0.4):
        clone = factory.create()
        template = factory.templates._busy[0]
        factory.release(clone)
        assert template.reverting is not None  # the release began it
        time.sleep(delay)
        factory.templates.discard(template)
        assert template.boot.name not in domain_names(uri), f"stopped {delay} s into its revert, it runs again"
        assert not template.boot.dir.exists()
    time.sleep(1.0)  # a revert's late qemu would have started by now
    assert not {name for name in domain_names(uri) if name.startswith(factory.process_dir.name)}


CHILD = textwrap.dedent("""
    import dataclasses, sys, time
    from pathlib import Path
    from pytest_flightctl_device.devices.agent import throwaway_agent_config
    from pytest_flightctl_device.settings import Settings
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

    settings = dataclasses.replace(Settings.resolve({}, {}, {}),
        network="isolated", memory_mib=256, vcpus=1, libvirt_uri=(sys.argv[3],), workdir=Path(sys.argv[4]),
        cache_dir=Path(sys.argv[5]), fresh="snapshot", max_vms=4)
    factory = DeviceVMFactory(settings, base_image=Path(sys.argv[1]), agent=throwaway_agent_config(),
                              run_id=sys.argv[2], worker="k")
    one = factory.create()
    factory.release(one)
    two, three = factory.create(), factory.create()  # a reverted clone of t1 and the first of t2
    print(factory.process_dir, *factory.templates.running(), flush=True)
    time.sleep(600)
""")


def test_kill_9_with_templates_and_clones_running_leaves_nothing(device_settings: Settings,
                                                                 tiny_guest: Path) -> None:
    uri = device_settings.libvirt_uri[0]
    workdir = device_settings.workdir
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_guest), secrets.token_hex(4), uri,
                              str(workdir), str(device_settings.cache_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert len(line) == 3, "the child process did not make its clones"
        process_dir, templates = Path(line[0]), line[1:]
        assert set(templates) <= domain_names(uri)
        assert all((process_dir / name.rsplit("-", 1)[1]).is_dir() for name in templates)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    # t2 was never reverted: libvirt autodestroys it with the connection. t1 was reverted, which drops
    # autodestroy: the reaper destroys it. Measured here with libvirtd under `tini -s`: 0.2 s and 0.5 s.
    # (Under a PID 1 that reaps exited processes late, libvirtd waits for that: ~1.7 s each here, one
    # after the other; scripts/setup starts libvirtd under tini where systemd does not run it.)
    killed = time.monotonic()
    while set(templates) & domain_names(uri) and time.monotonic() < killed + 2.0:
        time.sleep(0.05)
    left = set(templates) & domain_names(uri)
    assert not left, (f"a killed run's templates outlived it by 2 s: {sorted(left)} (t1 reverted, so destroyed by "
                      "the reaper; t2 autodestroyed). Is libvirtd's parent an init that reaps exited qemu "
                      "at once (systemd, or `tini -s` as scripts/setup starts it)?")
    conn = open_libvirt(uri)
    try:
        janitor.sweep(conn, workdir)
    finally:
        conn.close()
    assert not process_dir.exists()


def test_keep_vm_keeps_a_failed_clone_and_its_template(pytester: pytest.Pytester, tiny_guest: Path,
                                                        device_settings: Settings) -> None:
    pytester.makepyfile("""
        def test_fails(device_vm):
            assert device_vm.domain_name != device_vm.name
            assert False, "look at me"

        def test_passes(device_vm):
            assert device_vm.run("hostname").stdout.strip() == device_vm.name
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--device-qcow2={tiny_guest}", "--device-network", "isolated",
        "--device-memory-mib", "256", "--device-vcpus", "1", "--device-fresh", "snapshot", "--device-keep-vm")
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "console (last 50 lines)" in text and "domain XML" in text and "user-data (secrets redacted)" in text
    kept = re.search(r"remove it with: virsh destroy (\S+)\)", text)
    assert kept, "no kept clone was reported"
    name = kept.group(1)
    assert name.endswith("-t1")
    uri = device_settings.libvirt_uri[0]
    try:
        assert name in domain_names(uri)  # the kept clone's template outlives the session
        assert name.replace("-t1", "-t2") not in domain_names(uri)  # the next test's template did not
        result.stdout.fnmatch_lines(["*snapshot clones: 2, abandoned for a cold boot: 0*"])
    finally:
        conn = open_libvirt(uri)
        try:
            conn.lookupByName(name).destroy()
        finally:
            conn.close()


WAITING_CHILD = textwrap.dedent("""
    import dataclasses, sys
    from pathlib import Path
    from pytest_flightctl_device.devices import boot
    from pytest_flightctl_device.devices.agent import throwaway_agent_config
    from pytest_flightctl_device.settings import Settings
    from pytest_flightctl_device.devices.factory import DeviceVMFactory

    boot.SLOT_WAIT_S = 120.0  # a slot never given up fails the test here, not in an hour
    settings = dataclasses.replace(Settings.resolve({}, {}, {}),
        network="isolated", memory_mib=256, vcpus=1, libvirt_uri=(sys.argv[3],), workdir=Path(sys.argv[4]),
        cache_dir=Path(sys.argv[5]), fresh="boot", max_vms=1, boot_timeout=60.0)
    factory = DeviceVMFactory(settings, base_image=Path(sys.argv[1]), agent=throwaway_agent_config(),
                              run_id=sys.argv[2], worker="w")
    try:
        vm = factory.create()
        print(vm.name, vm.run("hostname").stdout.strip(), flush=True)
    finally:
        factory.close()
""")


def test_max_vms_an_idle_template_gives_its_slot_to_a_waiting_boot(make_factory: FactoryMaker, tiny_guest: Path,
                                                                   device_settings: Settings,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_flightctl_device.devices import boot as boot_module

    # Its own workdir, so that only this test's VMs count against --device-max-vms 1.
    workdir = device_settings.workdir / f"max-vms-{secrets.token_hex(4)}"
    monkeypatch.setattr(boot_module, "SLOT_WAIT_S", 120.0)  # a slot never given up fails here, not in an hour
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0, fresh="snapshot", max_vms=1,
                           workdir=workdir)
    uri = factory.settings.libvirt_uri[0]
    try:
        clone = factory.create()
        template = clone.domain_name
        factory.release(clone)
        assert factory.templates.running() == [template]  # idle, holding the only slot

        # A cold boot of this very process waits for that slot: the idle template gives it up.
        cold = factory.create(fresh="boot")
        assert cold.domain_name == cold.name and cold.run("hostname").stdout.strip() == cold.name
        assert factory.templates.running() == [] and template not in domain_names(uri)
        factory.release(cold)

        # Another process (another xdist worker) waiting for the slot gets it the same way.
        clone = factory.create()
        second_template = clone.domain_name
        assert second_template != template
        factory.release(clone)
        assert factory.templates.running() == [second_template]
        child = subprocess.run([sys.executable, "-c", WAITING_CHILD, str(tiny_guest), secrets.token_hex(4), uri,
                                str(workdir), str(device_settings.cache_dir)],
                               capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stderr[-2000:]
        name, hostname = child.stdout.split()
        assert hostname == name
        assert factory.templates.running() == [] and second_template not in domain_names(uri)
        assert factory.stats.fresh == {"clone": 2}
    finally:
        factory.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_prefetched_spare_is_a_clone(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, boot_timeout=60.0, fresh="snapshot", prefetch=True,
                           max_vms=4)
    uri = factory.settings.libvirt_uri[0]
    first = factory.create()
    assert first.domain_name != first.name  # a clone
    first.run("sudo touch /root/written-by-first")
    assert factory._spare is not None
    spare_name = factory._spare.vm.name
    factory.wait_spare(timeout=300)  # the "test" runs long enough for the spare to be made
    assert not factory._spare.errors
    factory.release(first)

    second = factory.create()  # the spare: the first clone of a second template (the first one was busy)
    assert second.name == spare_name != first.name
    assert second.domain_name not in (second.name, first.domain_name)
    assert second.run("hostname").stdout.strip() == second.name
    assert not second.run("ls /root/written-by-first", check=False).ok

    # The next spare reverts the first template in the background, while `second` runs.
    factory.wait_spare(timeout=300)
    assert factory._spare is not None and not factory._spare.errors
    factory.release(second)
    third = factory.create()
    assert third.domain_name == first.domain_name and third.name not in (first.name, second.name)
    assert third.run("hostname").stdout.strip() == third.name
    assert not third.run("ls /root/written-by-first", check=False).ok
    assert factory.stats.fresh == {"clone": 3}
    factory.release(third)

    factory.close()  # with a spare clone still being made
    assert factory.templates.running() == []
    assert not {name for name in domain_names(uri) if name.startswith(factory.process_dir.name)}
    assert not factory.process_dir.exists()


# -- the Debian guest: ten device tests in a row, then with -n 2 ----------------------------------

INNER = """
    import json, os, pathlib, re, time
    import pytest

    OUT = pathlib.Path({out!r})

    def wait(vm, command, what):
        deadline = time.monotonic() + 120
        while True:
            result = vm.run(command, check=False)
            if result.ok and result.stdout.strip():
                return result.stdout.strip()
            assert time.monotonic() < deadline, f"no {{what}} within 120 s: {{result.stderr}}"
            time.sleep(0.5)

    @pytest.mark.parametrize("n", range(10))
    def test_fresh(device_vm, n):
        earlier = device_vm.run("ls /var/lib/fcdev-test-earlier 2>/dev/null | wc -l").stdout.strip()
        before = time.time()
        clock = float(device_vm.run("date +%s.%N").stdout)
        skew = clock - (before + time.time()) / 2
        random = device_vm.run("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\\\n'").stdout
        key = wait(device_vm, "sudo test -s /var/lib/flightctl/certs/agent.key && "
                         "sudo sha256sum /var/lib/flightctl/certs/agent.key | cut -c1-64", "agent key")
        banner = wait(device_vm, "cat /etc/issue.d/flightctl-banner.issue", "enrollment banner")
        name = re.search(r"/enroll/(\\w+)", banner).group(1)
        record = dict(n=n, vm=device_vm.name, domain=device_vm.domain_name, earlier=int(earlier), skew=skew,
                      random=random, key=key, device=name, hostname=device_vm.run("hostname").stdout.strip(),
                      machine_id=device_vm.run("cat /etc/machine-id").stdout.strip())
        if n == {reboot}:
            device_vm.reboot()
            record["after_reboot"] = device_vm.run("hostname").stdout.strip()
        device_vm.run(f"sudo mkdir -p /var/lib/fcdev-test-earlier && sudo touch /var/lib/fcdev-test-earlier/{{n}}")
        (OUT / f"{{n}}.json").write_text(json.dumps(record))
"""


def _ten_fresh_devices(pytester: pytest.Pytester, debian_guest: Path, tmp_path: Path, *extra: str,
                       reboot: int) -> list[dict[str, object]]:
    out = tmp_path / "records"
    out.mkdir()
    pytester.makepyfile(textwrap.dedent(INNER.format(out=str(out), reboot=reboot)))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--device-qcow2={debian_guest}",
                                           "--device-network", "isolated", "--device-memory-mib", "1024",
                                           "--device-fresh", "snapshot", *extra)
    result.assert_outcomes(passed=10)
    result.stdout.fnmatch_lines(["*snapshot clones: 10, abandoned for a cold boot: 0*"])
    records = [json.loads((out / f"{n}.json").read_text()) for n in range(10)]
    for field in ("vm", "random", "key", "device", "hostname", "machine_id"):
        values = [record[field] for record in records]
        assert len(set(values)) == 10, f"{field} repeats across the ten devices: {values}"
    for record in records:
        assert record["earlier"] == 0, f"test {record['n']} saw files an earlier test wrote"
        assert abs(float(record["skew"])) < 2.0, f"test {record['n']}: clock off by {record['skew']:.1f} s"
        assert record["hostname"] == record["vm"] and record["domain"] != record["vm"]
    return records


def test_ten_debian_devices_in_a_row_are_each_new(pytester: pytest.Pytester, debian_guest: Path,
                                                   tmp_path: Path) -> None:
    records = _ten_fresh_devices(pytester, debian_guest, tmp_path, reboot=4)
    assert len({record["domain"] for record in records}) == 1  # one template served them all
    rebooted = records[4]
    assert rebooted["after_reboot"] == rebooted["vm"]  # a clone's reboot keeps its identity


def test_ten_debian_devices_with_two_workers_are_each_new(pytester: pytest.Pytester, debian_guest: Path,
                                                          tmp_path: Path) -> None:
    records = _ten_fresh_devices(pytester, debian_guest, tmp_path, "-n", "2", reboot=-1)
    assert len({record["domain"] for record in records}) == 2  # one template per worker
