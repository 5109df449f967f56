"""The push's plan from a bundle's index: destinations, blob locations, deterministic manifests."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import ArtifactError
from pytest_flightctl_device.images import push
from tests.support.images.archive import Spec, write_archive

REPO = "quay.io/flightctl/flightctl-device"


@pytest.mark.parametrize(("ref", "namespace", "expected"), [
    (f"{REPO}:v2-t1", "", ("flightctl/flightctl-device", "v2-t1")),
    (f"{REPO}:v2-t1", "ci/run7/", ("ci/run7/flightctl/flightctl-device", "v2-t1")),
    ("localhost:5000/a/b:x", "", ("a/b", "x")),
    ("localhost/pftd-test/device:base-t", "", ("pftd-test/device", "base-t")),
    ("busybox", "", ("library/busybox", "latest")),
    ("user/app:1.0", "", ("user/app", "1.0")),
])
def test_destination_swaps_the_domain_for_the_registry(ref: str, namespace: str, expected: tuple[str, str]) -> None:
    assert push.Target("127.0.0.1:5000", namespace).destination(ref) == expected


@pytest.mark.parametrize("ref", ["quay.io/Upper/x:t", "quay.io/x/y@sha256:" + "a" * 64, "quay.io/x/y:bad tag",
                                 "quay.io/x/y:" + "t" * 200])
def test_a_tag_no_registry_accepts_is_refused_naming_it(ref: str) -> None:
    with pytest.raises(ArtifactError, match="bundle tag"):
        push.Target("127.0.0.1:5000").destination(ref)


def test_plan_locates_every_blob_and_orders_fewest_layers_first(tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    ids = write_archive(bundle, [Spec((f"{REPO}:v2-t",), ({"v2": b"2"},)), Spec((f"{REPO}:base-t",), ())],
                        shared=[{"etc/base": b"base"}])
    images = push.plan(bundle)
    assert [image.tags for image in images] == [(f"{REPO}:base-t",), (f"{REPO}:v2-t",)]
    with tarfile.open(bundle) as tar, bundle.open("rb") as raw:
        for image in images:
            assert image.config.digest == f"sha256:{ids[image.tags[0]]}"
            for blob in (image.config, *image.layers):
                raw.seek(blob.offset)
                data = raw.read(blob.size)
                assert "sha256:" + hashlib.sha256(data).hexdigest() == blob.digest
            assert len(tar.getmembers()) == 5  # 2 layers, 2 configs, manifest.json
    assert images[0].layers[0] == images[1].layers[0]  # the shared base layer is one blob


def test_manifest_is_schema2_with_uncompressed_layers_and_stable(tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t",), ({"a": b"a"}, {"b": b"b"}))])
    first, again = push.plan(bundle)[0], push.plan(bundle)[0]
    body = json.loads(first.manifest())
    assert body["mediaType"] == push.MANIFEST_V2 and body["schemaVersion"] == 2
    assert body["config"]["mediaType"] == push.CONFIG_V1
    assert [layer["mediaType"] for layer in body["layers"]] == [push.LAYER_TAR] * 2
    assert first.manifest() == again.manifest()
    assert first.manifest_digest() == "sha256:" + hashlib.sha256(first.manifest()).hexdigest()


def test_a_manifest_naming_a_missing_layer_is_refused(tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t",), ({"a": b"a"},))])
    broken = tmp_path / "broken.tar"
    with tarfile.open(bundle) as src, tarfile.open(broken, "w") as dst:
        for member in src:
            if not member.name.endswith(".tar"):
                dst.addfile(member, src.extractfile(member))
    with pytest.raises(ArtifactError, match="holds no such file"):
        push.plan(broken)


def test_a_bundle_without_tagged_images_has_nothing_to_push(tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar"
    write_archive(bundle, [Spec((), ())])
    with pytest.raises(ArtifactError):
        push.plan(bundle)


def test_markers_are_per_registry_and_image(tmp_path: Path) -> None:
    a, b = push.Target("127.0.0.1:1", key="private:/x"), push.Target("127.0.0.1:2", key="private:/x")
    other = push.Target("127.0.0.1:1")
    assert push.marker_path(tmp_path, a, "f" * 64) == push.marker_path(tmp_path, b, "f" * 64)
    assert push.marker_path(tmp_path, a, "f" * 64) != push.marker_path(tmp_path, other, "f" * 64)
    assert push.read_marker(tmp_path / "absent.json") is None
    (tmp_path / "junk.json").write_text("{not json")
    assert push.read_marker(tmp_path / "junk.json") is None


def test_an_address_that_is_not_host_port_is_refused() -> None:
    with pytest.raises(Exception, match="not HOST:PORT"):
        push.Client(push.Target("registry.example"), push.Counters())


def test_store_blob_writes_verified_data_and_sweeps_what_a_killed_push_left(tmp_path: Path) -> None:
    import subprocess
    import sys

    bundle = tmp_path / "b.tar"
    write_archive(bundle, [Spec((f"{REPO}:base-t",), ())], shared=[{"etc/base": b"base"}])
    blob = push.plan(bundle)[0].layers[0]
    storage = tmp_path / "storage"
    data_dir = storage / "docker/registry/v2/blobs/sha256" / blob.digest[7:9] / blob.digest[7:]
    data_dir.mkdir(parents=True)
    code = ("import sys; from pathlib import Path; from pytest_flightctl_device.core.atomic import temp_path;"
            "t = temp_path(Path(sys.argv[1])); t.write_bytes(b'half a blob'); print(t)")
    dead = Path(subprocess.run([sys.executable, "-c", code, str(data_dir / "data")], check=True,
                               capture_output=True, text=True).stdout.strip())
    push.store_blob(storage, "flightctl/flightctl-device", bundle, blob)
    with bundle.open("rb") as raw:
        raw.seek(blob.offset)
        assert (data_dir / "data").read_bytes() == raw.read(blob.size)
    assert not dead.exists()
    assert sorted(p.name for p in data_dir.iterdir()) == ["data"]
