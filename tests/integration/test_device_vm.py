"""Device VMs on the tiny guest, through real libvirt and qemu: lifecycle, files, faults."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.devices.domain import open_libvirt
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.devices.seed import ready_marker
from pytest_flightctl_device.devices.vm import DeviceVM
from pytest_flightctl_device.errors import BootError, ConfigError, GuestCommandError, MissingToolError
from tests.integration.conftest import FactoryMaker
from tests.support.helpers import HELLO, hello_server


@pytest.fixture
def tiny_vm(tiny_factory: DeviceVMFactory) -> Iterator[DeviceVM]:
    vm = tiny_factory.create()
    yield vm
    tiny_factory.release(vm)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _listeners(port: int) -> list[str]:
    """Local addresses listening on `port`, read from /proc/net/tcp (state 0A = LISTEN)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:
            found.append(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_boot_run_and_injected_files(tiny_factory: DeviceVMFactory, tiny_vm: DeviceVM, tiny_guest: Path) -> None:
    assert tiny_vm.name.startswith(f"fcdev-{tiny_factory.run_id}-t-")
    assert tiny_vm.run("echo hello; echo oops >&2").stdout == "hello\n"
    result = tiny_vm.run("exit 7", check=False)
    assert result.exit_code == 7 and not result.ok
    with pytest.raises(GuestCommandError, match="exited 3") as info:
        tiny_vm.run("echo bad >&2; exit 3")
    assert info.value.exit_code == 3 and info.value.stderr == "bad\n"
    for agent_file in tiny_factory.agent.files:
        content = tiny_vm.run(f"sudo cat {agent_file.path}").stdout.encode()
        assert content == agent_file.content, agent_file.path
        mode = tiny_vm.run(f"sudo stat -c %a {agent_file.path}").stdout.strip()
        assert int(mode, 8) == agent_file.mode, agent_file.path
    # The SSH forward listens on loopback only, and the disk is an overlay over the untouched base.
    assert _listeners(tiny_vm.ssh_port) == ["127.0.0.1"]
    info_json = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(tiny_vm.overlay)],
                               capture_output=True, text=True, check=True).stdout
    assert str(tiny_guest) in info_json
    assert tiny_vm.overlay.stat().st_mode & 0o777 == 0o600
    assert tiny_vm.seed.stat().st_mode & 0o777 == 0o600


def test_files_in_and_out(tiny_vm: DeviceVM, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 300
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    tiny_vm.put_file(source, "/tmp/payload.bin", mode=0o640)
    assert tiny_vm.run("stat -c %a /tmp/payload.bin").stdout.strip() == "640"
    back = tiny_vm.get_file("/tmp/payload.bin", tmp_path / "back.bin")
    assert back.read_bytes() == payload
    with pytest.raises(GuestCommandError, match="cannot read /nonexistent"):
        tiny_vm.get_file("/nonexistent", tmp_path / "x")


def test_console_reboot_and_ssh_command(tiny_vm: DeviceVM) -> None:
    marker = ready_marker(tiny_vm.instance_id)
    assert tiny_vm.wait_for_console(marker, timeout=5).group(0) == marker
    tiny_vm.run("echo before-reboot > /tmp/state")
    tiny_vm.reboot()
    assert tiny_vm.console_text().count(marker) == 2
    assert tiny_vm.run("echo after").stdout == "after\n"
    command = tiny_vm.ssh_command()
    assert command.startswith("ssh -i ") and f"-p {tiny_vm.ssh_port}" in command
    assert command.endswith("user@127.0.0.1")
    with pytest.raises(BootError, match="console did not show 'never-printed'"):
        tiny_vm.wait_for_console("never-printed", timeout=0.5)


def test_teardown_leaves_nothing(tiny_factory: DeviceVMFactory, tiny_guest: Path) -> None:
    before = _sha256(tiny_guest)
    vm = tiny_factory.create()
    vm.run("sudo sh -c 'echo scribble > /scribble; sync'")
    name, vm_dir = vm.name, vm.dir
    tiny_factory.release(vm)
    conn = open_libvirt(tiny_factory.settings.libvirt_uri[0])
    try:
        assert name not in [dom.name() for dom in conn.listAllDomains()]
    finally:
        conn.close()
    assert not vm_dir.exists()
    assert _sha256(tiny_guest) == before  # the base image is never written


def test_host_forward_reaches_a_loopback_service(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    with hello_server() as port:
        factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, host_forward=(port,))
        vm = factory.create()
        try:
            for _ in range(3):  # many connections, unlike qemu 7.2's guestfwd
                assert vm.run(f"wget -q -O - http://127.0.0.1:{port}/").stdout == HELLO
            # Isolated: the host's loopback is not reachable through slirp's gateway address.
            assert not vm.run(f"wget -q -T 3 -O - http://10.0.2.2:{port}/", check=False).ok
        finally:
            factory.release(vm)


def test_cloud_init_failure_fails_fast(tiny_factory: DeviceVMFactory) -> None:
    with pytest.raises(BootError, match="cloud-init") as info:
        tiny_factory.create(runcmd=["echo about to fail; exit 3"])
    assert "last console lines" in str(info.value) or "cloud-init did not finish cleanly" in str(info.value)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory libvirt's qemu (another user under qemu:///system) can traverse."""
    path = Path(tempfile.mkdtemp(prefix="fcdev-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_a_guest_that_never_boots(make_factory: FactoryMaker, shared_dir: Path) -> None:
    blank = shared_dir / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(blank), "64M"], check=True)
    blank.chmod(0o644)
    factory = make_factory(blank, memory_mib=128, vcpus=1, boot_timeout=30.0)
    with pytest.raises(BootError, match="found nothing to boot") as info:
        factory.create()
    assert "last console lines" in str(info.value)
    assert not any(p.is_dir() for p in factory.process_dir.iterdir())  # its files are gone too


def test_timeout_quotes_the_console(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, accel="tcg", boot_timeout=1.0)
    with pytest.raises(BootError, match=r"was not ready in time \(waiting for: console marker, ssh banner, "
                                        r"cloud-init done; done: nothing; accel tcg.*last 50 console lines") as info:
        factory.create(runcmd=["sleep 600"])  # cloud-init cannot finish within 4 s (1 s x TCG's 4)
    assert "raise --device-boot-timeout" in str(info.value)


def test_not_a_qcow2(make_factory: FactoryMaker, tmp_path: Path) -> None:
    raw = tmp_path / "disk.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    factory = make_factory(raw)
    with pytest.raises(ConfigError, match=rf"cannot create an overlay over {raw}.*--device-qcow2"):
        factory.create()


def test_libvirt_unreachable() -> None:
    with pytest.raises(MissingToolError, match=r"cannot connect to libvirt at qemu\+unix:///system\?socket="
                                               r"/nonexistent/sock .*start libvirtd"):
        open_libvirt("qemu+unix:///system?socket=/nonexistent/sock")


def test_marker_values_are_checked(tiny_factory: DeviceVMFactory) -> None:
    with pytest.raises(ConfigError, match="variant='v9' is unknown"):
        tiny_factory.request(variant="v9")
    with pytest.raises(ConfigError, match="memory_mib=-1 must be a positive number"):
        tiny_factory.request(memory_mib=-1)


def test_a_base_image_in_a_private_directory(make_factory: FactoryMaker, tiny_guest: Path, tmp_path: Path) -> None:
    """qemu:///system runs qemu as another user, who cannot traverse a 0700 directory: one clear
    error naming the fix. qemu:///session runs qemu as the caller, who can: the device boots."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    base = private / "disk.qcow2"
    shutil.copyfile(tiny_guest, base)
    factory = make_factory(base, memory_mib=256, vcpus=1)
    if factory.settings.libvirt_uri[0].startswith("qemu:///system"):
        with pytest.raises(ConfigError, match=rf"libvirt's qemu cannot read the base image {base} .*/var/tmp"):
            factory.create()
    else:
        vm = factory.create()
        try:
            assert vm.run("echo up").stdout == "up\n"
        finally:
            factory.release(vm)


def test_uefi_firmware(make_factory: FactoryMaker, tiny_guest: Path) -> None:
    factory = make_factory(tiny_guest, memory_mib=256, vcpus=1, firmware="uefi")
    vm = factory.create()
    try:
        assert vm.run("test -d /sys/firmware/efi && echo efi").stdout == "efi\n"
        assert "firmware='efi'" in vm.domain_xml() or "<loader" in vm.domain_xml()
        assert (vm.dir / "VARS.fd").exists()  # NVRAM lives with the VM, removed with it
    finally:
        factory.release(vm)
    assert not (vm.dir / "VARS.fd").exists()


def test_real_cloud_init_failure_is_reported(make_factory: FactoryMaker, debian_guest: Path) -> None:
    """Real cloud-init 22.4 (Debian guest): a failing runcmd makes the boot fail, saying so."""
    factory = make_factory(debian_guest, memory_mib=768, vcpus=1)
    with pytest.raises(BootError, match="cloud-init") as info:
        factory.create(runcmd=["echo fcdev-runcmd-fails; exit 3"])
    message = str(info.value)
    assert "Failed to run module scripts-user" in message or "status: error" in message
    assert not any(p.is_dir() for p in factory.process_dir.iterdir())  # its files are gone
