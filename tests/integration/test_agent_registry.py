"""agent_registry as a user gets it: pytest sessions (pytester subprocesses) and `flightctl-device push`.

The real distribution registry, skopeo inside a booted Debian device (through the remap, over the
VM's SSH reverse forward, with --device-network isolated) and podman building real variant images.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

from pytest_flightctl_device.cli import main
from pytest_flightctl_device.errors import ArtifactError
from pytest_flightctl_device.images import podman, push, registry
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import fresh_cache_dir, require_registry, require_tool
from tests.support.images.archive import Spec, write_archive
from tests.support.images.stand_ins import podman_conn, remove_repo
from tests.support.images.variants import VARIANTS, variant_bundle

__all__ = ["podman_conn"]  # session fixture used below
pytest_plugins = ["pytester"]

REPO = "quay.io/flightctl/flightctl-device"


@pytest.fixture(autouse=True)
def _binary() -> None:
    require_registry()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def small_bundle(path: Path, tag: str = "t1") -> dict[str, str]:
    """Four variants over one shared layer, each with a layer of its own: 1 + 4 layers, 4 configs."""
    return write_archive(path, [Spec((f"{REPO}:{v}-{tag}",), (4 << 10,)) for v in VARIANTS], shared=[64 << 10])



# -- flightctl-device push ----------------------------------------------------------------------


def test_cli_push_sends_then_skips_and_a_client_reads_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle.tar"
    ids = small_bundle(bundle)
    lease = registry.acquire(tmp_path / "registry")
    try:
        args = ["push", "--registry", f"{lease.address}/ci", "--registry-insecure", "--bundle", str(bundle),
                "--cache-dir", str(tmp_path / "cache")]
        assert main(args) == 0
        first = capsys.readouterr().out
        assert first.count("\nsent ") + first.startswith("sent ") == 4, first
        assert "4 of 4 images pushed, 0 already there; 9 blobs sent" in first
        assert main(args) == 0
        second = capsys.readouterr().out
        assert "0 of 4 images pushed, 4 already there; 0 blobs sent" in second
        assert second.count("skipped ") == 4
        skopeo = require_tool("skopeo")
        ref = f"{lease.address}/ci/flightctl/flightctl-device:v2-t1"
        raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                             capture_output=True, check=True, timeout=60).stdout
        assert json.loads(raw)["config"]["digest"] == f"sha256:{ids[f'{REPO}:v2-t1']}"
        assert f"sent {ref}@sha256:{hashlib.sha256(raw).hexdigest()}" in first
    finally:
        lease.release()


def test_cli_push_to_an_unreachable_registry_says_so_in_its_own_flags(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)
    port = closed_port()
    assert main(["push", "--registry", f"127.0.0.1:{port}", "--registry-insecure", "--bundle", str(bundle),
                 "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flightctl-device: --registry 127.0.0.1:{port} does not answer (ConnectionRefusedError")
    assert err.endswith("or drop --registry to use a private one.") and len(err.splitlines()) == 1


# -- the fixture in a pytest session --------------------------------------------------------------


def test_an_unreachable_registry_fails_before_any_device_boots(
        pytester: pytest.Pytester, tiny_guest: Path, tmp_path: Path, device_settings: Settings) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)
    port = closed_port()
    pytester.makepyfile("""
        def test_pull(agent_registry, device_vm):
            raise AssertionError("never reached")

        def test_pull_other_order(device_vm, agent_registry):
            raise AssertionError("never reached")
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--device-qcow2={tiny_guest}", f"--device-bundle={bundle}",
        f"--device-cache-dir={fresh_cache_dir(tmp_path, device_settings.accel_file)}", "--device-network", "isolated",
        "--device-registry", f"127.0.0.1:{port}", "--device-registry-insecure")
    result.assert_outcomes(errors=2)
    text = result.stdout.str()
    assert text.count(f"--device-registry 127.0.0.1:{port} does not answer (ConnectionRefusedError") >= 1
    assert "device VM(s) booted" not in text and "never reached" not in text


def test_a_bad_registry_address_stops_the_run_naming_the_option(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device-registry", "quay.io/flightctl")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--device-registry 'quay.io/flightctl' is not HOST:PORT[[]/NAMESPACE[]]; give the "
                                 "registry as HOST:PORT*"])


def test_three_workers_push_each_image_once(pytester: pytest.Pytester, tmp_path: Path,
                                            device_settings: Settings) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)
    out = tmp_path / "pushes"
    out.mkdir()
    pytester.makepyfile(f"""
        import json, os, pytest

        @pytest.mark.parametrize("n", range(3))
        def test_registry(agent_registry, n):
            import time
            time.sleep(1)  # every worker holds its session until the others have pushed
            counters = agent_registry.result.counters
            sent = sorted(tag for image in agent_registry.result.images if image.sent for tag in image.refs)
            path = "{out}/" + os.environ.get("PYTEST_XDIST_WORKER", "main") + ".json"
            with open(path, "w") as handle:
                json.dump({{"blobs": counters.blobs_sent, "sent": sent, "address": agent_registry.address,
                           "digests": agent_registry.digests}}, handle)
    """)
    cache = fresh_cache_dir(tmp_path, device_settings.accel_file)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "3", f"--device-bundle={bundle}",
                                           f"--device-cache-dir={cache}")
    result.assert_outcomes(passed=3)
    workers = [json.loads(path.read_text()) for path in sorted(out.glob("gw*.json"))]
    assert len(workers) == 3
    assert sum(w["blobs"] for w in workers) == 1 + 4 + 4  # the shared layer, four layers, four configs
    assert sorted(tag for w in workers for tag in w["sent"]) == sorted(f"{REPO}:{v}-t1" for v in VARIANTS)
    assert len({w["address"] for w in workers}) == 1 and len({json.dumps(w["digests"]) for w in workers}) == 1


def test_a_device_pulls_every_variant_by_its_canonical_name(
        pytester: pytest.Pytester, podman_conn: podman.Podman, debian_guest: Path, tmp_path: Path,
        device_settings: Settings) -> None:
    repo = f"quay.io/pftd-test-{uuid.uuid4().hex[:8]}"
    made = variant_bundle(podman_conn, repo, tmp_path / "build", tag="t1")
    out = tmp_path / "device.json"
    pytester.makepyfile(f"""
        import json

        def test_pull(agent_registry, device_vm):
            found = {{}}
            for variant in {VARIANTS!r}:
                ref = device_vm.image(variant)
                assert ref == agent_registry.ref(variant)
                raw = device_vm.run(f"skopeo inspect --raw docker://{{ref}}", timeout=300).stdout
                found[variant] = {{"ref": ref, "raw": raw, "digest": agent_registry.digests[variant]}}
            drop_in = device_vm.run("cat /etc/containers/registries.conf.d/pytest-flightctl-device.conf").stdout
            with open("{out}", "w") as handle:
                json.dump({{"variants": found, "drop_in": drop_in, "address": agent_registry.address}}, handle)
    """)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", f"--device-qcow2={debian_guest}", f"--device-bundle={made.path}",
        f"--device-cache-dir={fresh_cache_dir(tmp_path, device_settings.accel_file)}", "--device-network", "isolated",
        f"--device-image-repo={repo}/device", "--device-memory-mib", "1024", "--device-vcpus", "2")
    result.assert_outcomes(passed=1)
    seen = json.loads(out.read_text())
    assert seen["address"].startswith("127.0.0.1:")
    assert f'location = "{seen["address"]}/{repo.split("/", 1)[1]}"' in seen["drop_in"]
    for variant in VARIANTS:
        pulled = seen["variants"][variant]
        tag = f"{repo}/device:{variant}-t1"
        assert pulled["ref"] == tag
        manifest = json.loads(pulled["raw"])
        assert manifest["mediaType"] == push.MANIFEST_V2
        assert manifest["config"]["digest"] == f"sha256:{made.image_ids[tag]}"  # podman's image ID
        raw = pulled["raw"].rstrip("\n").encode()
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == pulled["digest"]


# -- the private registry's storage path (what agent_registry uses for it) ------------------------


def test_stored_blobs_serve_real_clients_and_a_forged_one_is_never_linked(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.tar"
    ids = small_bundle(bundle)
    forged = tmp_path / "forged.tar"
    with tarfile.open(bundle) as src, tarfile.open(forged, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".tar") and member.size > 8 << 10:  # the shared layer: same size, other bytes
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
            dst.addfile(member, io.BytesIO(data))
    with registry.acquire(tmp_path / "registry") as lease:
        target = push.Target(lease.address, key=lease.key, storage=lease.layout.data)
        with pytest.raises(ArtifactError, match="do not match its digest"):
            push.push_bundle(forged, target, tmp_path / "state")
        assert not list((tmp_path / "state").glob("pushed-*"))
        v2 = lease.layout.data / "docker" / "registry" / "v2"
        assert not list(v2.rglob("link")) and not list(v2.rglob(".data.*"))
        result = push.push_bundle(bundle, target, tmp_path / "state")
        assert result.counters.blobs_sent == 9 and result.counters.requests < 40
        skopeo = require_tool("skopeo")
        for variant in VARIANTS:
            ref = f"{lease.address}/flightctl/flightctl-device:{variant}-t1"
            proc = subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref}",
                                   f"dir:{tmp_path / variant}"], capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr  # skopeo verifies every blob's digest as it copies
            manifest = json.loads((tmp_path / variant / "manifest.json").read_text())
            assert manifest["config"]["digest"] == f"sha256:{ids[f'{REPO}:{variant}-t1']}"
        assert push.push_bundle(bundle, target, tmp_path / "state").counters.blobs_sent == 0


def test_cli_push_of_the_tags_podman_holds(podman_conn: podman.Podman, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    repo = f"localhost/pftd-test-{uuid.uuid4().hex[:8]}"
    made = variant_bundle(podman_conn, repo, tmp_path / "build", tag="t2", variants=("base", "v2"))
    podman_conn.load_stream(made.path)
    try:
        with registry.acquire(tmp_path / "registry") as lease:
            assert main(["push", "--registry", lease.address, "--registry-insecure", "--tag", "t2",
                         "--image-repo", f"{repo}/device", "--variants", "base,v2",
                         "--cache-dir", str(tmp_path / "cache")]) == 0
            out = capsys.readouterr().out
            assert "exported 2 images" in out and "2 of 2 images pushed" in out
            path = repo.split("/", 1)[1]
            for tag, image_id in made.image_ids.items():
                ref = f"{lease.address}/{path}/device:{tag.rsplit(':', 1)[1]}"
                assert f"sent {ref}@" in out
                raw = subprocess.run([require_tool("skopeo"), "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{ref}"], capture_output=True, check=True, timeout=60).stdout
                assert json.loads(raw)["config"]["digest"] == f"sha256:{image_id}"  # podman's image ID
            assert not list((tmp_path / "cache").glob(".push-*"))  # the exported bundle is gone
    finally:
        remove_repo(podman_conn, repo)
