"""The private registry (real distribution binary) and the push into it, with real clients.

Sessions are real processes (leases are per process); pushes are checked with skopeo, a real
containers/image client, and counted from the registry's own access log. The podman tests push
bundles podman wrote and compare with the image IDs podman reports after loading them.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.errors import ArtifactError
from pytest_flightctl_device.images import podman, push, registry
from tests.support.helpers import require_registry, require_tool
from tests.support.images.archive import Spec, write_archive
from tests.support.images.stand_ins import podman_conn, remove_repo, test_repo
from tests.support.images.variants import variant_bundle

__all__ = ["podman_conn", "test_repo"]  # session fixtures used below

REPO = "quay.io/flightctl/flightctl-device"
ROOT = Path(__file__).resolve().parents[2]

# A session: lease the registry, print the lease as JSON, hold it until stdin closes.
SESSION = """
import json, sys
from pathlib import Path
from pytest_flightctl_device.images import registry
lease = registry.acquire(Path(sys.argv[1]), access_log=True)
print(json.dumps({"address": lease.address, "supervisor": lease.supervisor.token,
                  "registry": lease.registry.token}), flush=True)
sys.stdin.read()
lease.release()
"""

# A push in its own process, to be killed: progress lines on stdout.
PUSHER = """
import sys
from pathlib import Path
from pytest_flightctl_device.images import push
target = push.Target(sys.argv[2], key=sys.argv[3])
result = push.push_bundle(Path(sys.argv[1]), target, Path(sys.argv[4]), lambda line: print(line, flush=True))
print("DONE", result.counters.blobs_sent, flush=True)
"""


@pytest.fixture(autouse=True)
def _binary() -> None:
    require_registry()


def running(owner: Owner) -> bool:
    """Alive and not a zombie waiting for PID 1 to reap it."""
    if not owner.alive():
        return False
    try:
        stat = Path(f"/proc/{owner.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(owner: Owner, timeout: float) -> float:
    started = time.monotonic()
    while running(owner):
        assert time.monotonic() - started < timeout, f"pid {owner.pid} still runs after {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - started


class Session:
    def __init__(self, directory: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SESSION, str(directory)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the session process did not lease the registry"
        raw = json.loads(line)
        self.address: str = raw["address"]
        self.supervisor = Owner.from_token(raw["supervisor"])
        self.registry = Owner.from_token(raw["registry"])

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[list[Session]]:
    made: list[Session] = []
    yield made
    for session in made:
        if session.proc.poll() is None:
            session.kill()


@pytest.fixture
def private(tmp_path: Path) -> Iterator[registry.PrivateRegistry]:
    lease = registry.acquire(tmp_path / "registry", access_log=True)
    yield lease
    lease.release()
    wait_gone(lease.registry, 10)


def access_log(lease: registry.PrivateRegistry) -> list[str]:
    return [line for line in lease.layout.registry_log.read_text().splitlines() if '"' in line and "HTTP/1.1" in line]


def blob_puts(lines: list[str]) -> int:
    return sum(1 for line in lines if '"PUT /v2/' in line and "/blobs/uploads/" in line)


def skopeo_manifest(ref: str) -> dict[str, object]:
    skopeo = require_tool("skopeo")
    result = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    manifest: dict[str, object] = json.loads(result.stdout)
    return manifest


# -- the registry process -----------------------------------------------------------------------


def test_two_sessions_share_one_registry_and_the_last_one_stops_it(tmp_path: Path, sessions: list[Session]) -> None:
    directory = tmp_path / "registry"
    first = Session(directory)
    sessions.append(first)
    second = Session(directory)
    sessions.append(second)
    assert second.address == first.address and second.registry == first.registry
    host, _, _port = first.address.rpartition(":")
    assert host == "127.0.0.1"
    assert registry.answers(first.address)
    assert first.registry is not None and first.supervisor is not None
    first.end()
    time.sleep(3 * registry.POLL_S)
    assert running(first.registry) and registry.answers(first.address)  # the second still holds it
    second.end()
    took = wait_gone(first.registry, 5)
    wait_gone(first.supervisor, 5)
    assert took < 2.0
    assert not (directory / "state.json").exists()
    assert not registry.answers(first.address)


def test_a_new_session_after_the_stop_starts_a_fresh_instance_on_the_same_storage(
        tmp_path: Path, sessions: list[Session]) -> None:
    directory = tmp_path / "registry"
    first = Session(directory)
    sessions.append(first)
    first.end()
    assert first.registry is not None
    wait_gone(first.registry, 5)
    again = Session(directory)
    sessions.append(again)
    assert again.registry != first.registry and registry.answers(again.address)
    assert (directory / "data").is_dir()
    again.end()


def test_kill_9_of_the_only_session_leaves_no_registry_process(tmp_path: Path, sessions: list[Session]) -> None:
    only = Session(tmp_path / "registry")
    sessions.append(only)
    assert only.registry is not None and only.supervisor is not None
    only.kill()
    assert wait_gone(only.registry, 5) < 2.5
    wait_gone(only.supervisor, 5)


def test_kill_9_of_the_supervisor_takes_the_registry_with_it(tmp_path: Path, sessions: list[Session]) -> None:
    held = Session(tmp_path / "registry")
    sessions.append(held)
    assert held.registry is not None and held.supervisor is not None
    os.kill(held.supervisor.pid, signal.SIGKILL)  # a process this test's session started
    wait_gone(held.registry, 5)
    replacement = Session(tmp_path / "registry")  # the live session's next acquire gets a new one
    sessions.append(replacement)
    assert replacement.supervisor != held.supervisor and registry.answers(replacement.address)
    replacement.end()
    held.end()


def test_the_registry_ignores_distribution_overrides_in_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "auth.json"))  # podman's variable
    monkeypatch.setenv("REGISTRY_HTTP_ADDR", "0.0.0.0:5000")
    lease = registry.acquire(tmp_path / "registry")
    try:
        assert lease.address.startswith("127.0.0.1:") and registry.answers(lease.address)
    finally:
        lease.release()
        wait_gone(lease.registry, 5)


# -- pushing from a bundle (Python-written docker-archive) --------------------------------------


def small_bundle(path: Path, tag: str = "t1") -> dict[str, str]:
    return write_archive(path, [Spec((f"{REPO}:base-{tag}",), ()),
                                *[Spec((f"{REPO}:{v}-{tag}",), ({f"etc/{v}": v.encode() * 100},))
                                  for v in ("v2", "v3", "v4")]],
                         shared=[{"usr/bin/base": b"b" * 4096}, {"etc/os-release": b"ID=test\n"}])


def test_push_then_skopeo_reads_every_manifest_and_a_second_push_sends_nothing(
        tmp_path: Path, private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    ids = small_bundle(bundle)
    target = push.Target(private.address, key=private.key)
    state = tmp_path / "state"
    lines: list[str] = []
    cold = push.push_bundle(bundle, target, state, lines.append)
    assert [image.sent for image in cold.images] == [True] * 4
    assert cold.counters.blobs_sent == 2 + 3 + 4  # shared layers once, a layer per variant, four configs
    assert blob_puts(access_log(private)) == cold.counters.blobs_sent
    for image in cold.images:
        for tag, ref in image.refs.items():
            assert ref == f"{private.address}/flightctl/flightctl-device:{tag.rsplit(':', 1)[1]}"
            manifest = skopeo_manifest(ref)
            assert manifest["config"]["digest"] == f"sha256:{ids[tag]}"  # type: ignore[index]
            assert cold.digests[tag] == image.digest
        assert push.read_marker(push.marker_path(state, target, image.image_id)) == image.digest

    before = len(access_log(private))
    warm = push.push_bundle(bundle, target, state)
    after = access_log(private)[before:]
    assert [image.sent for image in warm.images] == [False] * 4
    assert warm.counters.blobs_sent == 0 and blob_puts(after) == 0
    assert all(line.split('"')[1].startswith("HEAD ") for line in after), after
    assert warm.seconds < 1.0
    assert warm.digests == cold.digests


def test_a_registry_restarted_on_another_port_is_the_same_registry(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)
    state = tmp_path / "state"
    first = registry.acquire(tmp_path / "registry")
    cold = push.push_bundle(bundle, push.Target(first.address, key=first.key), state)
    first.release()
    wait_gone(first.registry, 5)
    again = registry.acquire(tmp_path / "registry")
    try:
        warm = push.push_bundle(bundle, push.Target(again.address, key=again.key), state)
    finally:
        again.release()
    assert cold.counters.blobs_sent > 0 and warm.counters.blobs_sent == 0
    assert not any(image.sent for image in warm.images)


def test_a_wiped_registry_is_pushed_to_again_whatever_the_markers_say(
        tmp_path: Path, private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)
    state = tmp_path / "state"
    target = push.Target(private.address, key=private.key)
    push.push_bundle(bundle, target, state)
    other = registry.acquire(tmp_path / "other")  # an empty registry under the same key and markers
    try:
        fresh = push.push_bundle(bundle, push.Target(other.address, key=private.key), state)
    finally:
        other.release()
    assert all(image.sent for image in fresh.images) and fresh.counters.blobs_sent == 9


def test_a_new_tag_of_a_pushed_image_costs_one_manifest(tmp_path: Path, private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t1",), ({"a": b"a"},))])
    target = push.Target(private.address, key=private.key)
    push.push_bundle(bundle, target, tmp_path / "state")
    retagged = tmp_path / "retagged.tar"
    with tarfile.open(bundle) as src, tarfile.open(retagged, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name == "manifest.json":
                entries = json.loads(data)
                entries[0]["RepoTags"].append(f"{REPO}:base-latest")
                data = json.dumps(entries).encode()
                member.size = len(data)

            dst.addfile(member, io.BytesIO(data))
    result = push.push_bundle(retagged, target, tmp_path / "state")
    assert result.counters.blobs_sent == 0 and result.counters.manifests_put == 1
    assert skopeo_manifest(f"{private.address}/flightctl/flightctl-device:base-latest")


def test_a_forged_blob_is_refused_by_the_registry_and_nothing_counts_as_pushed(
        tmp_path: Path, private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t1",), ({"a": b"a" * 1000},))])
    forged = tmp_path / "forged.tar"
    with tarfile.open(bundle) as src, tarfile.open(forged, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".tar"):
                data = data.replace(b"a" * 1000, b"b" * 1000)  # same size, other bytes, old name

            dst.addfile(member, io.BytesIO(data))
    target = push.Target(private.address, key=private.key)
    with pytest.raises(ArtifactError, match="do not match its digest"):
        push.push_bundle(forged, target, tmp_path / "state")
    assert not list((tmp_path / "state").glob("pushed-*"))
    assert push.Client(target, push.Counters()).manifest_digest("flightctl/flightctl-device", "base-t1") is None


def test_an_unreachable_registry_fails_in_one_sentence(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.tar"
    small_bundle(bundle)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(registry.RegistryError, match=rf"127.0.0.1:{port} did not answer.*check that it runs"):
        push.push_bundle(bundle, push.Target(f"127.0.0.1:{port}"), tmp_path / "state")


def _pusher(bundle: Path, lease: registry.PrivateRegistry, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PUSHER, str(bundle), lease.address, lease.key, str(state)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)


def test_kill_9_during_a_push_leaves_nothing_taken_for_pushed(tmp_path: Path,
                                                              private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t1",), ()), Spec((f"{REPO}:v2-t1",), (256 << 20,))],
                  shared=[64 << 20])
    state = tmp_path / "state"
    proc = _pusher(bundle, private, state)
    assert proc.stdout is not None
    for line in proc.stdout:  # the base is in; the variant's 256 MiB layer is on its way
        if line.startswith("sending") and "256 MiB" in line:
            break
    else:
        raise AssertionError(f"the push ended before its big layer: exit {proc.wait()}")
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    target = push.Target(private.address, key=private.key)
    client = push.Client(target, push.Counters())
    assert client.manifest_digest("flightctl/flightctl-device", "v2-t1") is None
    images = push.plan(bundle)
    v2 = next(image for image in images if image.tags == (f"{REPO}:v2-t1",))
    assert push.read_marker(push.marker_path(state, target, v2.image_id)) is None
    assert not client.has_blob("flightctl/flightctl-device", v2.layers[-1].digest)

    resumed = push.push_bundle(bundle, target, state)
    sent = {tuple(image.refs): image.sent for image in resumed.images}
    assert sent == {(f"{REPO}:base-t1",): False, (f"{REPO}:v2-t1",): True}
    assert resumed.counters.blobs_sent == 2  # the big layer and v2's config; the shared layer was in
    manifest = skopeo_manifest(f"{private.address}/flightctl/flightctl-device:v2-t1")
    assert manifest["config"]["digest"] == f"sha256:{v2.image_id}"  # type: ignore[index]


def test_concurrent_pushers_send_each_blob_once(tmp_path: Path, private: registry.PrivateRegistry) -> None:
    bundle = tmp_path / "bundle.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t1",), ()),
                           *[Spec((f"{REPO}:{v}-t1",), (8 << 20,)) for v in ("v2", "v3", "v4")]],
                  shared=[32 << 20])
    state = tmp_path / "state"
    procs = [_pusher(bundle, private, state) for _ in range(3)]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    total = sum(int(out.strip().splitlines()[-1].split()[1]) for out in outputs)
    assert total == 1 + 3 + 4  # each blob once across the three processes
    assert blob_puts(access_log(private)) == total


# -- bundles podman wrote (heavy: podman) -------------------------------------------------------


def test_a_podman_bundle_pushed_matches_the_image_ids_podman_loads(
        podman_conn: podman.Podman, test_repo: str, tmp_path: Path, private: registry.PrivateRegistry) -> None:
    made = variant_bundle(podman_conn, f"{test_repo}/{uuid.uuid4().hex[:6]}", tmp_path / "build")
    target = push.Target(private.address, key=private.key)
    result = push.push_bundle(made.path, target, tmp_path / "state")
    base_layers = len(next(image for image in push.plan(made.path) if "base-" in image.tags[0]).layers)
    assert result.counters.blobs_sent == base_layers + 3 + 4  # variants share the base's layers
    loaded = podman_conn.load_stream(made.path)
    try:
        present = podman_conn.tag_ids()
        for image in result.images:
            for tag, ref in image.refs.items():
                assert present[tag] == made.image_ids[tag]
                manifest = skopeo_manifest(ref)
                assert manifest["config"]["digest"] == f"sha256:{present[tag]}"  # type: ignore[index]
                assert manifest["mediaType"] == push.MANIFEST_V2
    finally:
        remove_repo(podman_conn, test_repo)
    assert loaded
    warm = push.push_bundle(made.path, target, tmp_path / "state")
    assert warm.counters.blobs_sent == 0 and warm.seconds < 1.0


def test_podman_pulls_what_was_pushed(podman_conn: podman.Podman, test_repo: str, tmp_path: Path,
                                      private: registry.PrivateRegistry) -> None:
    made = variant_bundle(podman_conn, f"{test_repo}/{uuid.uuid4().hex[:6]}", tmp_path / "build",
                          variants=("base", "v2"))
    result = push.push_bundle(made.path, push.Target(private.address, key=private.key), tmp_path / "state")
    ref = next(ref for image in result.images for tag, ref in image.refs.items() if ":v2-" in tag)
    tag = next(tag for tag in made.image_ids if ":v2-" in tag)
    response = podman_conn.api.post("/images/pull", params={"reference": ref, "tlsVerify": False, "quiet": True})
    try:
        assert response.status_code == 200 and '"error"' not in response.text, response.text[-500:]
        assert podman_conn.image_id(ref) == made.image_ids[tag]
    finally:
        podman_conn.api.delete(f"/images/{ref}", params={"force": True})
