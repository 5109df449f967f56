"""The project's test guests (tests/guest) boot under real qemu (TCG) and honour the seed contract.

Each test takes a guest image from the repository's conftest fixtures (tiny_guest, debian_guest:
tests.guest.build_guest, built once and cached), writes a NoCloud seed ISO shaped exactly like the
plugin's seed.py output, boots a throwaway qcow2 overlay with user-mode networking restricted to the
host's loopback, and checks over SSH what cloud-init (real or the tiny guest's stand-in) did.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.guest.build import build_guest
from tests.support.helpers import HELLO, hello_server, missing, require_tool

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
MAC = "52:54:00:fc:de:01"
CONFIG_YAML = "enrollment-service:\n  enrollment-ui-endpoint: https://ui.fcdev.test/\n"
CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def user_data(pubkey: str, hostname: str, final_message: str, ca_permissions: str = "0644") -> str:
    """The plugin's user-data, byte for byte in its shape (see the seed contract in tests/guest/README.md)."""
    return (
        "#cloud-config\n"
        f"hostname: {hostname}\n"
        "users:\n"
        "  - name: user\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        "    shell: /bin/bash\n"
        "    lock_passwd: false\n"
        "    ssh_authorized_keys:\n"
        f"      - {pubkey}\n"
        "write_files:\n"
        "  - path: /etc/flightctl/config.yaml\n"
        "    owner: root:root\n"
        "    permissions: '0600'\n"
        "    encoding: b64\n"
        f"    content: {_b64(CONFIG_YAML)}\n"
        "  - path: /etc/flightctl/certs/ca.crt\n"
        "    owner: root:root\n"
        f"    permissions: '{ca_permissions}'\n"
        "    encoding: b64\n"
        f"    content: {_b64(CA_PEM)}\n"
        "runcmd:\n"
        '  - [sh, -c, "echo \\"runcmd $(hostname)\\" > /var/tmp/runcmd-ran"]\n'
        "  - echo plain-string-item >> /var/tmp/runcmd-ran\n"
        f"final_message: {final_message}\n"
    )


def network_config() -> str:
    """What the plugin passes: match the NIC by MAC, name it eth0, DHCP."""
    return (
        "version: 2\nethernets:\n  nic0:\n    match:\n"
        f"      macaddress: '{MAC}'\n    set-name: eth0\n    dhcp4: true\n"
    )


def write_seed(path: Path, files: dict[str, str]) -> None:
    """A NoCloud seed ISO: volume id cidata, Rock Ridge + Joliet."""
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata")
    for name, text in files.items():
        data = text.encode()
        iso_name = "/" + name.upper().replace("-", "_") + ".;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=name, joliet_path="/" + name)
    iso.write(str(path))
    iso.close()


@dataclass
class Key:
    private: Path
    public: str


@pytest.fixture(scope="module")
def ssh_key(tmp_path_factory: pytest.TempPathFactory) -> Key:
    key = Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("key") / "id_ed25519"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return Key(path, pub.decode() + " fcdev")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Guest:
    """A booted guest: its forwarded SSH port, console file and key."""

    port: int
    console: Path
    key: Key
    proc: subprocess.Popen[bytes]

    def console_text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_console(self, text: str, timeout: float, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.console_text().count(text) < count:
            if self.proc.poll() is not None:
                pytest.fail(f"qemu exited ({self.proc.returncode}); console tail:\n{self.console_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} (x{count}) not on the console after {timeout:.0f} s; "
                            f"tail:\n{self.console_text()[-3000:]}")
            time.sleep(0.5)

    def wait_ssh_banner(self, timeout: float) -> None:
        """slirp accepts connections before sshd listens: wait for the banner itself."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=3) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no SSH banner on 127.0.0.1:{self.port}; console tail:\n{self.console_text()[-3000:]}")
            time.sleep(0.5)

    def ssh_args(self, *extra: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.key.private), "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", *extra, "user@127.0.0.1"]

    def run(self, command: str, check: bool = True, extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.ssh_args(*extra), command], capture_output=True, text=True, timeout=120,
                              check=False)
        if check and proc.returncode != 0:
            pytest.fail(f"ssh {command!r} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def wait_login(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.run("true", check=False).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"ssh login as user failed for {timeout:.0f} s; console:\n{self.console_text()[-3000:]}")
            time.sleep(1)


@contextmanager
def boot(image: Path, work: Path, seed: Path, key: Key, uefi: bool = False) -> Iterator[Guest]:
    """Boot `image` through a fresh overlay (the image is never written); kill only our qemu, by PID."""
    require_tool("qemu-system-x86_64")
    require_tool("ssh")
    overlay = work / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
                   check=True)
    port = _free_port()
    console = work / "console.log"
    cmd = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "512", "-nographic", "-monitor", "none",
        "-serial", f"file:{console}",
        "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:22",
        "-device", f"virtio-net-pci,netdev=n0,romfile=,mac={MAC}",
        "-device", "virtio-scsi-pci",
        "-drive", f"if=none,id=cd,file={seed},media=cdrom,readonly=on", "-device", "scsi-cd,drive=cd",
        "-drive", f"file={overlay},if=virtio",
    ]
    if uefi:
        vars_copy = work / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        cmd += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=(work / "qemu.out").open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        yield Guest(port, console, key, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_build_is_cached_and_readable_by_libvirt_qemu(tiny_guest: Path) -> None:
    """A second build is a cache hit (same file, untouched); image 0644 and its directories 0755."""
    mtime = tiny_guest.stat().st_mtime_ns
    assert build_guest("tiny", tiny_guest.parent.parent) == tiny_guest
    assert tiny_guest.stat().st_mtime_ns == mtime
    assert tiny_guest.stat().st_mode & 0o777 == 0o644
    assert tiny_guest.parent.stat().st_mode & 0o777 == 0o755
    assert tiny_guest.parent.parent.stat().st_mode & 0o777 == 0o755
    info = subprocess.run(["qemu-img", "info", str(tiny_guest)], capture_output=True, text=True, check=True)
    assert "file format: qcow2" in info.stdout


def test_tiny_guest_applies_seed_forwards_and_reboots(tiny_guest: Path, ssh_key: Key, tmp_path: Path) -> None:
    hostname = "fcdev-abc-main-1"
    seed = tmp_path / "seed.iso"
    write_seed(seed, {"meta-data": f"instance-id: i-tiny01\nlocal-hostname: {hostname}\n",
                      "user-data": user_data(ssh_key.public, hostname, "fcdev-ready i-tiny01")})
    with boot(tiny_guest, tmp_path, seed, ssh_key) as guest:
        guest.wait_ssh_banner(180)
        guest.wait_console("fcdev-ready i-tiny01", 180)
        assert "Linux version" in guest.console_text()
        guest.wait_login(60)
        assert guest.run("hostname").stdout.strip() == hostname
        assert guest.run("cat /etc/flightctl/config.yaml").stdout == CONFIG_YAML
        assert guest.run("cat /etc/flightctl/certs/ca.crt").stdout == CA_PEM
        stat = guest.run("sudo stat -c '%U:%G %a' /etc/flightctl/config.yaml /etc/flightctl/certs/ca.crt")
        assert stat.stdout.split("\n")[:2] == ["root:root 600", "root:root 644"]
        assert guest.run("cat /var/tmp/runcmd-ran").stdout == f"runcmd {hostname}\nplain-string-item\n"
        status = guest.run("cloud-init status --wait --long")
        assert "status: done" in status.stdout
        assert "DataSourceNoCloud" in status.stdout

        # The plugin reaches host services through `ssh -R` (restrict=on: no other way out).
        with hello_server() as port:
            got = guest.run("wget -q -O - http://127.0.0.1:18080/",
                            extra=["-o", "ExitOnForwardFailure=yes", "-R", f"18080:127.0.0.1:{port}"])
            assert got.stdout == HELLO

        # scp (SFTP protocol) works, as DeviceVM.put_file may use it.
        local = tmp_path / "payload.txt"
        local.write_text("payload\n")
        scp_opts = [a for a in guest.ssh_args() if a not in ("ssh", "-p", str(guest.port), "user@127.0.0.1")]
        subprocess.run(["scp", "-P", str(guest.port), *scp_opts, str(local), "user@127.0.0.1:/var/tmp/payload.txt"],
                       check=True, capture_output=True, timeout=60)
        assert guest.run("cat /var/tmp/payload.txt").stdout == "payload\n"

        guest.run("sudo reboot", check=False)
        guest.wait_console("fcdev-ready i-tiny01", 180, count=2)
        guest.wait_login(60)
        assert guest.run("cat /var/tmp/payload.txt").stdout == "payload\n"
        # runcmd is once per instance, like real cloud-init: not appended again on the second boot.
        assert guest.run("cat /var/tmp/runcmd-ran").stdout == f"runcmd {hostname}\nplain-string-item\n"
        assert "status: done" in guest.run("cloud-init status --wait").stdout


def test_tiny_guest_reports_a_failing_step_as_error(tiny_guest: Path, ssh_key: Key, tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    write_seed(seed, {"meta-data": "instance-id: i-tiny02\nlocal-hostname: fcdev-bad\n",
                      "user-data": user_data(ssh_key.public, "fcdev-bad", "fcdev-ready i-tiny02",
                                             ca_permissions="rw-nonsense")})
    with boot(tiny_guest, tmp_path, seed, ssh_key) as guest:
        guest.wait_console("fcdev-ready i-tiny02", 180)
        errors = [line for line in guest.console_text().splitlines() if "cloud-init" in line and "ERROR" in line]
        assert errors and "/etc/flightctl/certs/ca.crt" in errors[0]
        guest.wait_login(60)
        status = guest.run("cloud-init status --long", check=False)
        assert status.returncode == 1
        assert "status: error" in status.stdout


def test_tiny_guest_boots_under_uefi(tiny_guest: Path, ssh_key: Key, tmp_path: Path) -> None:
    if not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        missing(f"OVMF is not installed ({OVMF_CODE}); install the ovmf package")
    seed = tmp_path / "seed.iso"
    write_seed(seed, {"meta-data": "instance-id: i-tiny03\nlocal-hostname: fcdev-uefi\n",
                      "user-data": user_data(ssh_key.public, "fcdev-uefi", "fcdev-ready i-tiny03")})
    with boot(tiny_guest, tmp_path, seed, ssh_key, uefi=True) as guest:
        guest.wait_console("fcdev-ready i-tiny03", 240)
        guest.wait_login(60)
        assert guest.run("test -d /sys/firmware/efi && echo efi").stdout.strip() == "efi"


@pytest.mark.parametrize(("with_network_config", "uefi"), [(True, False), (False, True)],
                         ids=["network-config-by-mac-bios", "no-network-config-uefi"])
def test_debian_guest_runs_cloud_init_and_the_standin_agent(
    debian_guest: Path, ssh_key: Key, tmp_path: Path, with_network_config: bool, uefi: bool
) -> None:
    if uefi and not (OVMF_CODE.exists() and OVMF_VARS.exists()):
        missing(f"OVMF is not installed ({OVMF_CODE}); install the ovmf package")
    hostname = "fcdev-deb-main-1"
    iid = f"i-deb{int(with_network_config)}"
    files = {"meta-data": f"instance-id: {iid}\nlocal-hostname: {hostname}\n",
             "user-data": user_data(ssh_key.public, hostname, f"fcdev-ready {iid}")}
    if with_network_config:
        files["network-config"] = network_config()
    seed = tmp_path / "seed.iso"
    write_seed(seed, files)
    with boot(debian_guest, tmp_path, seed, ssh_key, uefi=uefi) as guest:
        guest.wait_ssh_banner(400)
        guest.wait_console(f"fcdev-ready {iid}", 400)
        guest.wait_login(60)
        assert guest.run("hostname").stdout.strip() == hostname
        assert guest.run("sudo cat /etc/flightctl/config.yaml").stdout == CONFIG_YAML
        stat = guest.run("sudo stat -c '%U:%G %a' /etc/flightctl/config.yaml /etc/flightctl/certs/ca.crt")
        assert stat.stdout.split("\n")[:2] == ["root:root 600", "root:root 644"]
        assert guest.run("id -u").stdout.strip() != "0"  # a real unprivileged user, real sudo
        assert guest.run("cat /var/tmp/runcmd-ran").stdout == f"runcmd {hostname}\nplain-string-item\n"
        assert "status: done" in guest.run("cloud-init status --wait").stdout
        assert guest.run("ip -4 -o addr show dev eth0").stdout.split()[3] == "10.0.2.15/24"
        if with_network_config:
            rendered = guest.run("cat /etc/systemd/network/10-cloud-init-eth0.network").stdout
            assert f"MACAddress={MAC}" in rendered
        # The stand-in agent (no service in this config): started by its path unit, never ready
        # (Type=notify, not enrolled), its banner and journal naming the device by its own key.
        agent = guest.run("systemctl show -p Type,ActiveState,NRestarts flightctl-agent.service").stdout
        assert "Type=notify" in agent and "ActiveState=active" not in agent
        banner = guest.run("cat /etc/issue.d/flightctl-banner.issue").stdout
        found = re.search(r"https://ui\.fcdev\.test/enroll/([0-9a-v]{52})\n", banner)
        assert found, banner
        assert found.group(0).strip() in guest.run("sudo journalctl -b -u flightctl-agent.service -o cat").stdout
        assert guest.run("sudo test -s /var/lib/flightctl/certs/agent.key && echo key").stdout.strip() == "key"
        assert guest.run("sudo ls /etc/ssh").stdout.split().count("ssh_host_ed25519_key") == 1
        assert "ssh_host_rsa_key" not in guest.run("sudo ls /etc/ssh").stdout
        efi = guest.run("test -d /sys/firmware/efi && echo uefi || echo bios").stdout.strip()
        assert efi == ("uefi" if uefi else "bios")
        assert "Invalid cloud-config" not in guest.run("sudo cat /var/log/cloud-init.log").stdout


def test_tiny_reader_parses_what_seed_py_renders(tmp_path: Path) -> None:
    """The tiny guest's awk reader, run with busybox on the host, reads seed.py's user-data as PyYAML does."""
    import yaml

    from pytest_flightctl_device.devices.agent import AgentFile
    from pytest_flightctl_device.devices.seed import SeedSpec, render_user_data

    busybox = require_tool("busybox")
    awk_prog = Path(__file__).parents[1] / "guest/files/tiny/rootfs/usr/lib/fcdev/cloud-config.awk"
    spec = SeedSpec(
        instance_id="i-0123abcd", hostname="fcdev-abc-main-1", authorized_key="ssh-ed25519 AAAAC3NzaKEY fcdev",
        files=(AgentFile("/etc/flightctl/config.yaml", b"enrollment-service: {}\n", 0o600),
               AgentFile("/etc/flightctl/certs/ca.crt", bytes(range(256)), 0o644, "root:root")),
        runcmd=("echo 'single' \"double\" \\back $HOME", "printf 'tab\\there\\n' # not: a comment",
                "echo caf\u00e9 \u2603 \U0001f600 \x01 end"),
    )
    text = render_user_data(spec)
    (tmp_path / "ud").write_text(text)
    proc = subprocess.run([busybox, "awk", "-v", f"OUTDIR={tmp_path}", "-f", str(awk_prog), str(tmp_path / "ud")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    plan = [line.split("\t") for line in proc.stdout.splitlines()]
    expected = yaml.safe_load(text)
    assert ["hostname", expected["hostname"]] in plan
    assert ["key", "user", expected["users"][0]["ssh_authorized_keys"][0]] in plan
    assert ["final", expected["final_message"]] in plan
    files = [row for row in plan if row[0] == "file"]
    assert len(files) == len(expected["write_files"])
    for row, want in zip(files, expected["write_files"], strict=True):
        assert row[2:6] == [want["path"], want["owner"], want["permissions"], "b64"]
        content = (tmp_path / f"file.{row[1]}").read_text()
        assert base64.b64decode(content) == base64.b64decode(want["content"])
    # Each runcmd line, read back by a shell, is exactly the argv PyYAML sees.
    script = (tmp_path / "runcmd").read_bytes()
    dump = "for a in \"$@\"; do printf '%s\\0' \"$a\"; done; printf '\\n'"
    lines = script.decode().splitlines()
    assert len(lines) == len(expected["runcmd"])
    for line, argv in zip(lines, expected["runcmd"], strict=True):
        got = subprocess.run(["sh", "-c", f"set -- {line}; {dump}"], capture_output=True, check=True).stdout
        assert got.rstrip(b"\n").split(b"\0")[:-1] == [a.encode() for a in argv]

    (tmp_path / "bad").write_text(text.replace("  - path:", "  - path: [oops]\n    mode:", 1).replace(
        "#cloud-config", "#cloud-config\nruncmd: echo not-a-list"))
    bad = subprocess.run([busybox, "awk", "-v", f"OUTDIR={tmp_path}", "-f", str(awk_prog), str(tmp_path / "bad")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 2
    assert "runcmd must be a block sequence" in bad.stderr


def test_concurrent_builds_build_once(tiny_guest: Path, tmp_path: Path) -> None:
    """Two builders racing on an empty cache (as xdist workers do) build once and agree on the path."""
    cache = tmp_path / "cache"
    debs = cache / "debs"
    debs.mkdir(parents=True)
    for deb in (tiny_guest.parent.parent / "debs").glob("*.deb"):  # no second download from the mirror
        try:
            os.link(deb, debs / deb.name)
        except OSError:
            shutil.copyfile(deb, debs / deb.name)
    cmd = [sys.executable, "-m", "tests.guest.build", "tiny", "--cache-dir", str(cache)]
    root = Path(__file__).parents[2]
    procs = [subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert sum(err.count("building the tiny guest") for _, err in results) == 1
    built = Path(paths.pop())
    assert built.is_file() and built.parent.parent == cache
    assert not list(cache.glob(".build-*"))
