"""Build -> bundle -> load against real podman, with the test containerfiles over a busybox base."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import shutil
import tarfile
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import ArtifactError, ConfigError, PodmanError
from pytest_flightctl_device.images import build, podman
from pytest_flightctl_device.settings import Settings
from tests.support.images.stand_ins import (
    TEST_CONTAINERFILES,
    busybox_base,
    podman_conn,
    remove_images,
    test_repo,
)

__all__ = ["busybox_base", "podman_conn", "test_repo"]  # session fixtures used below


def _settings(repo: str, base: str, tag: str, **extra: object) -> Settings:
    return dataclasses.replace(Settings(), containerfiles=TEST_CONTAINERFILES, base_image=base,
                               image_repo=f"{repo}/device", image_tag=tag, **extra)


def _run(conn: podman.Podman, ref: str, *cmd: str) -> str:
    """Output of a command in a container of `ref` (detach + wait + logs, see FACTS)."""
    container = conn.client.containers.create(ref, command=list(cmd))
    try:
        container.start()
        assert container.wait() == 0
        return b"".join(container.logs(stdout=True, stderr=True)).decode()
    finally:
        container.remove(force=True)


@pytest.fixture(scope="module")
def built(podman_conn: podman.Podman, test_repo: str, busybox_base: str,
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, build.BuiltImages, list[str]]:
    rpms = tmp_path_factory.mktemp("rpms")
    (rpms / "flightctl-agent-0.6.0-1.el9.x86_64.rpm").write_bytes(b"not really an rpm")
    settings = _settings(test_repo, busybox_base, "v0.6.0-abc1234", rpms=rpms)
    lines: list[str] = []
    plan = build.plan(settings)
    return settings, build.build_all(podman_conn, plan, lines.append), lines


def test_build_tags_every_variant_on_the_new_base(podman_conn: podman.Podman, built) -> None:
    settings, images, _lines = built
    assert set(images.refs) == {"base", "v2", "v3", "v4"}
    layers = {}
    for variant, ref in images.refs.items():
        assert ref == f"{settings.image_repo}:{variant}-v0.6.0-abc1234"
        info = podman_conn.api.get(f"/images/{ref}/json").json()
        assert info["Id"].removeprefix("sha256:") == images.ids[variant]
        labels = info["Config"]["Labels"]
        assert labels["io.flightctl.device.variant"] == variant
        assert labels["io.flightctl.source-git-tag"].count("-") >= 1
        assert labels["io.flightctl.source-git-tree-state"] in ("clean", "dirty", "unknown")
        layers[variant] = info["RootFS"]["Layers"]
    for variant in ("v2", "v3", "v4"):
        assert layers[variant][: len(layers["base"])] == layers["base"]


def test_build_streams_prefixed_output_and_uses_the_rpms(podman_conn: podman.Podman, built) -> None:
    _, images, lines = built
    for variant in ("base", "v2", "v3", "v4"):
        assert any(line.startswith(f"[{variant}] ") for line in lines), variant
    assert _run(podman_conn, images.refs["v3"], "cat", "/etc/agent-rpms").split() == [
        "flightctl-agent-0.6.0-1.el9.x86_64.rpm"]
    assert _run(podman_conn, images.refs["v3"], "cat", "/etc/variant").strip() == "payload of v3"


def test_without_rpms_the_base_takes_the_copr_branch(podman_conn: podman.Podman, test_repo: str,
                                                     busybox_base: str) -> None:
    settings = _settings(test_repo, busybox_base, "copr1", variants=("base",))
    images = build.build_all(podman_conn, build.plan(settings), lambda _line: None)
    assert _run(podman_conn, images.refs["base"], "cat", "/etc/agent-rpms").strip() == "copr"


def test_a_failing_variant_is_named_with_its_last_lines(podman_conn: podman.Podman, test_repo: str,
                                                        busybox_base: str, tmp_path: Path) -> None:
    files = tmp_path / "containerfiles"
    shutil.copytree(TEST_CONTAINERFILES, files)
    text = (files / "Containerfile-v3").read_text()
    (files / "Containerfile-v3").write_text(text.replace(
        "RUN cat", "RUN echo doomed-step-output-v3 && false && cat"))
    settings = dataclasses.replace(_settings(test_repo, busybox_base, "fail1"), containerfiles=files)
    with pytest.raises(PodmanError) as caught:
        build.build_all(podman_conn, build.plan(settings), lambda _line: None)
    message = str(caught.value)
    assert "building v3 (Containerfile-v3) failed" in message
    assert "doomed-step-output-v3" in message
    assert "v2" not in message.split("Last lines")[0]
    present = podman_conn.tag_ids()
    assert f"{test_repo}/device:v2-fail1" in present and f"{test_repo}/device:v4-fail1" in present
    assert f"{test_repo}/device:v3-fail1" not in present
    base_id = podman_conn.image_id(f"{test_repo}/device:base-fail1")
    dangling = podman_conn.api.get("/images/json", params={"filters": json.dumps({"dangling": ["true"]})})
    assert base_id not in [str(i.get("ParentId", "")).removeprefix("sha256:") for i in dangling.json()]


def test_a_context_without_rpms_dir_is_refused_before_building(test_repo: str, busybox_base: str,
                                                               tmp_path: Path) -> None:
    files = tmp_path / "containerfiles"
    shutil.copytree(TEST_CONTAINERFILES, files, ignore=shutil.ignore_patterns("rpms"))
    with pytest.raises(ConfigError, match=r"has no rpms/ directory; give --device-rpms"):
        build.plan(dataclasses.replace(_settings(test_repo, busybox_base, "x"), containerfiles=files))


def test_an_rpms_dir_without_rpms_is_refused(test_repo: str, busybox_base: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds no \.rpm files"):
        build.plan(_settings(test_repo, busybox_base, "x", rpms=tmp_path))


def test_bundle_then_load_then_skip(podman_conn: podman.Podman, built, tmp_path: Path) -> None:
    settings, images, _lines = built
    bundle = build.export_bundle(podman_conn, images, tmp_path / "bundle.tar", lambda _line: None)
    manifest = podman.read_manifest(bundle)
    assert {t for e in manifest for t in e.tags} == set(images.refs.values())
    assert {e.image_id for e in manifest} == set(images.ids.values())
    assert not list(tmp_path.glob(".bundle.tar.*"))  # the temp file was renamed, not left

    remove_images(podman_conn, list(images.refs.values()))
    assert not set(images.refs.values()) & set(podman_conn.tag_ids())
    loaded = podman.load_bundle(podman_conn, bundle, dataclasses.replace(settings, image_tag=None), tmp_path)
    assert loaded.loaded
    assert loaded.tags == tuple(images.refs[v] for v in ("base", "v2", "v3", "v4"))
    assert loaded["v4"] == images.refs["v4"]
    assert dict(loaded.image_ids) == {images.refs[v]: images.ids[v] for v in images.refs}

    again = podman.load_bundle(podman_conn, bundle, settings, tmp_path)
    assert not again.loaded and again.tags == loaded.tags


def _load_in_process(bundle: str, settings: Settings, lock_dir: str, results: multiprocessing.Queue) -> None:
    with podman.connect(settings) as conn:
        results.put(podman.load_bundle(conn, Path(bundle), settings, Path(lock_dir)).loaded)


def test_concurrent_loads_load_once(podman_conn: podman.Podman, built, tmp_path: Path) -> None:
    settings, images, _lines = built
    bundle = build.export_bundle(podman_conn, images, tmp_path / "bundle.tar", lambda _line: None)
    remove_images(podman_conn, list(images.refs.values()))
    settings = dataclasses.replace(settings, podman_url=podman_conn.url)
    ctx = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_load_in_process, args=(str(bundle), settings, str(tmp_path), results))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
        assert proc.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in procs) == [False, False, True]


def test_a_bundle_missing_a_tag_names_it(podman_conn: podman.Podman, built, tmp_path: Path) -> None:
    settings, images, _lines = built
    partial = build.BuiltImages({v: images.refs[v] for v in ("base", "v2")},
                                {v: images.ids[v] for v in ("base", "v2")})
    bundle = build.export_bundle(podman_conn, partial, tmp_path / "partial.tar", lambda _line: None)
    remove_images(podman_conn, [images.refs["v3"], images.refs["v4"]])
    with pytest.raises(ArtifactError) as caught:
        podman.load_bundle(podman_conn, bundle, settings, tmp_path)
    assert images.refs["v3"] in str(caught.value) and images.refs["v4"] in str(caught.value)
    assert images.refs["v2"] not in str(caught.value)


def test_a_tar_that_is_not_a_docker_archive_is_refused_before_podman(podman_conn: podman.Podman,
                                                                      tmp_path: Path) -> None:
    oci = tmp_path / "oci.tar"
    with tarfile.open(oci, "w") as tar:
        index = tmp_path / "index.json"
        index.write_text(json.dumps({"schemaVersion": 2, "manifests": []}))
        tar.add(index, arcname="index.json")
    with pytest.raises(ArtifactError, match=r"is not a docker-archive images bundle \(it has no manifest"):
        podman.load_bundle(podman_conn, oci, Settings(), tmp_path)
