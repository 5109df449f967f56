"""Secrets and exposure: a real pytest session leaks no token or key, and its VM listens on 127.0.0.1 only.

One inner session (pytester subprocess, -rA, --junitxml, a DEBUG log file) runs a deliberately
failing test that uses `device_vm` on the tiny guest with an agent config made here with a real
key, and `agent_images_bundle` fetched from the loopback GitHub emulator with a recognisable fake
GITHUB_TOKEN (so the token is really used). While its VM runs, the inner test records the
listening sockets of the VM's qemu process (from /proc/net/tcp{,6}), the mode of every file in
the work dir and which files hold a secret. Afterwards everything the run produced is scanned:
terminal output, the JUnit XML (with the failure's report sections), the log file, the cache
dir, the work dir and libvirt's log of the domain. The only files allowed to hold a secret are
the agent config given (outside the scanned dirs) and, while the VM runs, its 0600 seed ISO and
overlay; those must be gone after teardown, with the SSH key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pytest_flightctl_device.devices.agent import load_agent_config
from tests.support.github_emulator import GitHubEmulator
from tests.support.helpers import missing, require_tool

pytest_plugins = ["pytester"]

TOKEN = "ghp_FcdevExposureCanary_7f3a9c1e5b2d4f6a8c0e"
SHA = "c" * 40

INNER_TEST = '''
import hashlib, json, os, stat
from pathlib import Path

OUT = Path(os.environ["FCDEV_EXPOSURE_OUT"])
WORKDIR = Path(os.environ["FCDEV_EXPOSURE_WORKDIR"])
SECRETS = [s.encode() for s in json.loads(Path(os.environ["FCDEV_EXPOSURE_SECRETS"]).read_text())]


def hex_address(text):
    """127.0.0.1 from /proc/net/tcp's little-endian hex (tcp6: 32 hex digits)."""
    if len(text) == 8:
        return ".".join(str(int(text[i:i + 2], 16)) for i in (6, 4, 2, 0))
    return "ipv6:" + text


def listeners(pid):
    """(address, port) of every listening TCP socket the process `pid` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and fields[9] in inodes:
                found.append((hex_address(address), int(port, 16)))
    return found


def every_listener_on(port):
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hexport = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hexport, 16) == port:
                found.append(hex_address(address))
    return found


def test_a_device_that_fails(device_vm, agent_images_bundle):
    pid = int(Path(f"/run/libvirt/qemu/{device_vm.name}.pid").read_text().strip())
    files = {}
    for path in sorted(WORKDIR.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            files[str(path.relative_to(WORKDIR))] = {
                "mode": stat.S_IMODE(path.stat().st_mode),
                "secret": any(s in data for s in SECRETS)}
    key_file = device_vm.ssh.key
    ssh_key_lines = [line for line in key_file.read_text().splitlines()
                     if len(line) >= 16 and not line.startswith("-----")]
    guest_key = device_vm.run("sudo sha256sum /etc/flightctl/certs/client-enrollment.key").stdout.split()[0]
    OUT.write_text(json.dumps({
        "name": device_vm.name, "ssh_port": device_vm.ssh_port, "qemu_listeners": listeners(pid),
        "port_listeners": every_listener_on(device_vm.ssh_port), "files": files,
        "ssh_key": str(key_file.relative_to(WORKDIR)), "ssh_key_lines": ssh_key_lines,
        "guest_key_sha256": guest_key, "bundle": str(agent_images_bundle)}))
    print(f"device {device_vm.name} is up; failing on purpose")
    assert False, "deliberate failure: the report must carry the device sections"
'''


def make_agent_config(directory: Path) -> Path:
    """A config.yaml as `flightctl certificate request --output embedded` writes it, real keys, 0600."""
    now = dt.datetime.now(dt.UTC)

    def cert(subject: str, public_key: object, signer: ec.EllipticCurvePrivateKey, ca: bool) -> bytes:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "exposure CA")])
        built = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer)
                 .public_key(public_key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
                 .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
                 .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                 .sign(signer, hashes.SHA256()))
        return built.public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    doc = {"enrollment-service": {
        "authentication": {"client-certificate-data": b64(cert("client-enrollment", key.public_key(), ca_key,
                                                               False)),
                           "client-key-data": b64(key_pem)},
        "service": {"certificate-authority-data": b64(cert("exposure CA", ca_key.public_key(), ca_key, True)),
                    "server": "https://127.0.0.1:7443"},
        "enrollment-ui-endpoint": "https://127.0.0.1:7443"}}
    directory.mkdir(mode=0o700)
    path = directory / "config.yaml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(yaml.safe_dump(doc, sort_keys=False, width=1 << 20))
    return path


def make_bundle_tar() -> bytes:
    manifest = json.dumps([{"Config": f"{'d' * 64}.json", "Layers": ["layer.tar"],
                            "RepoTags": ["quay.io/flightctl/flightctl-device:base-exposure"]}]).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in ((f"{'d' * 64}.json", b"{}"), ("layer.tar", os.urandom(1 << 16)),
                           ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.fixture
def traversable_tmp() -> Iterator[Path]:
    """A fresh dir qemu (another user under qemu:///system) can traverse; pytest's tmp_path is 0700."""
    root = Path(tempfile.mkdtemp(prefix="fcdev-exposure-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def scan(root: Path, secrets: list[bytes]) -> list[str]:
    """Every file under `root` that holds one of `secrets`, as "path: which"."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: secret #{i}" for i, secret in enumerate(secrets) if secret in data]
    return found


def test_a_run_leaks_no_secret_and_listens_on_loopback_only(
        pytester: pytest.Pytester, tiny_guest: Path, tmp_path: Path, traversable_tmp: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("qemu-img")
    if not Path("/run/libvirt/qemu").is_dir():
        missing("libvirtd (qemu:///system) is not running: /run/libvirt/qemu does not exist")
    config_path = make_agent_config(tmp_path / "agent")
    agent = load_agent_config(config=config_path)
    secrets = [TOKEN, *agent.secrets()]
    assert len(secrets) >= 4 and all(len(s) >= 16 for s in secrets)
    secrets_file = tmp_path / "agent" / "secrets.json"
    secrets_file.write_text(json.dumps(secrets))
    secrets_file.chmod(0o600)
    out_dir, cache_dir, work_dir = tmp_path / "out", traversable_tmp / "cache", traversable_tmp / "work"
    out_dir.mkdir()
    result_file = tmp_path / "inner.json"
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.delenv("GH_TOKEN", raising=False)
    monkeypatch.setenv("FCDEV_EXPOSURE_OUT", str(result_file))
    monkeypatch.setenv("FCDEV_EXPOSURE_WORKDIR", str(work_dir))
    monkeypatch.setenv("FCDEV_EXPOSURE_SECRETS", str(secrets_file))
    emulator_dir = tmp_path / "emulator"
    emulator_dir.mkdir()
    pytester.makepyfile(test_inner=INNER_TEST)

    with GitHubEmulator(emulator_dir, token=TOKEN) as gh:
        run = gh.add_run(SHA)
        gh.add_artifact(run, "agent-images-bundle-cs9-bootc-exposure", make_bundle_tar(),
                        member="agent-images-bundle.tar")
        result = pytester.runpytest_subprocess(
            "-p", "no:cacheprovider", "-rA", f"--junitxml={out_dir / 'junit.xml'}", "-o", "junit_logging=all",
            f"--log-file={out_dir / 'pytest.log'}", "--log-file-level=DEBUG",
            f"--device-qcow2={tiny_guest}", f"--device-agent-config={config_path}",
            f"--device-cache-dir={cache_dir}", f"--device-workdir={work_dir}",
            f"--device-github-run={run.id}", f"--device-github-api-url={gh.api_url}",
            "--device-network=isolated", "--device-accel=tcg", "--device-memory-mib=256",
            "--device-vcpus=1", "--device-boot-timeout=60", timeout=600)
        token_used = any(had_auth and "/zip" in path for _method, path, had_auth in gh.api_log)
        leaks_to_blob = list(gh.auth_leaks)

    terminal = "\n".join(result.outlines + result.errlines)
    result.assert_outcomes(failed=1)
    assert "deliberate failure" in terminal and "user-data (secrets redacted)" in terminal, terminal[-3000:]
    assert token_used, "the bundle was not fetched with the token: the test would prove nothing"
    assert leaks_to_blob == [], "the blob host received the Authorization header"
    inner = json.loads(result_file.read_text())

    # the key really reached the guest: what must not leak was there to leak
    key_pem = next(f.content for f in agent.files if f.path.endswith("client-enrollment.key"))
    assert inner["guest_key_sha256"] == hashlib.sha256(key_pem).hexdigest()

    # while the VM ran: only the 0600 seed and overlay held a secret; overlay, seed, SSH key were 0600
    files = inner["files"]
    holding = sorted(name for name, info in files.items() if info["secret"])
    assert holding and all(Path(name).name in ("seed.iso", "overlay.qcow2") for name in holding), holding
    sensitive = [name for name in files if Path(name).name in ("seed.iso", "overlay.qcow2")] + [inner["ssh_key"]]
    assert len(sensitive) >= 3, files
    assert {name: oct(files[name]["mode"]) for name in sensitive} == {name: "0o600" for name in sensitive}

    # the forwarded SSH port (and anything else qemu listens on) is bound to 127.0.0.1 only
    assert inner["qemu_listeners"], "found no listening socket of the VM's qemu"
    assert [port for _addr, port in inner["qemu_listeners"]].count(inner["ssh_port"]) == 1
    assert {addr for addr, _port in inner["qemu_listeners"]} == {"127.0.0.1"}, inner["qemu_listeners"]
    assert inner["port_listeners"] == ["127.0.0.1"], inner["port_listeners"]

    # after teardown: seed, overlay and SSH key are gone
    left = {str(p.relative_to(work_dir)) for p in work_dir.rglob("*")} if work_dir.exists() else set()
    assert not left & set(sensitive), sorted(left & set(sensitive))

    # nothing the run produced holds the token, the key or the SSH key
    needles = [s.encode() for s in secrets] + [line.encode() for line in inner["ssh_key_lines"]]
    assert not [i for i, needle in enumerate(needles) if needle in terminal.encode()], "secret in the terminal"
    junit = (out_dir / "junit.xml").read_text()
    assert "deliberate failure" in junit and "failing on purpose" in junit  # junit_logging=all
    libvirt_log = Path("/var/log/libvirt/qemu") / f"{inner['name']}.log"
    found = scan(out_dir, needles) + scan(cache_dir, needles) + scan(work_dir, needles)
    if libvirt_log.exists():
        found += [f"{libvirt_log}: secret #{i}" for i, needle in enumerate(needles)
                  if needle in libvirt_log.read_bytes()]
    assert found == [], found
    # and the scans had something to scan: the cache holds the bundle, the log has the run
    assert Path(inner["bundle"]).is_relative_to(cache_dir) and (out_dir / "pytest.log").stat().st_size > 0
