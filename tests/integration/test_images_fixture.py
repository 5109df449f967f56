"""The plugin's agent_images fixture and --device-build, in real pytest runs (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_flightctl_device.images import podman
from tests.support.images.stand_ins import (
    TEST_CONTAINERFILES,
    bib_stand_in,
    busybox_base,
    podman_conn,
    remove_images,
    test_repo,
)

__all__ = ["bib_stand_in", "busybox_base", "podman_conn", "test_repo"]  # session fixtures used below

INNER = '''
import json, os, pathlib

def _record(name, agent_images, bundle, qcow2=None):
    out = pathlib.Path(os.environ["PFTD_RESULTS"]) / f"{name}-{os.getpid()}.json"
    out.write_text(json.dumps({"tags": list(agent_images.tags), "v2": agent_images["v2"],
                               "loaded": agent_images.loaded, "bundle": str(bundle),
                               "qcow2": str(qcow2) if qcow2 else None}))

def test_one(agent_images, agent_images_bundle, request):
    qcow2 = request.getfixturevalue("agent_qcow2") if os.environ.get("PFTD_QCOW2") else None
    _record("one", agent_images, agent_images_bundle, qcow2)

def test_two(agent_images, agent_images_bundle):
    _record("two", agent_images, agent_images_bundle)
'''


def _pytest(tmp_path: Path, results: Path, *args: str, qcow2: bool = False) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(INNER)
    results.mkdir(exist_ok=True)
    env = dict(os.environ, PFTD_RESULTS=str(results), PFTD_QCOW2="1" if qcow2 else "")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           str(tmp_path / "test_inner.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def _results(results: Path) -> list[dict[str, object]]:
    found = [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]
    for path in results.glob("*.json"):
        path.unlink()
    return found


def test_device_build_gives_images_bundle_and_qcow2_and_reruns_from_cache(
        podman_conn: podman.Podman, test_repo: str, busybox_base: str, bib_stand_in: str,
        tmp_path: Path) -> None:
    repo = f"{test_repo}/fixture"
    common = ["--device-build", "--device-containerfiles", str(TEST_CONTAINERFILES),
              "--device-base-image", busybox_base, "--device-image-repo", repo,
              "--device-image-tag", "fx1", "--device-bib-image", bib_stand_in,
              "--device-cache-dir", str(tmp_path / "cache"), "--device-podman-url", podman_conn.url]
    results = tmp_path / "results"
    first = _pytest(tmp_path, results, *common, qcow2=True)
    assert first.returncode == 0, first.stdout + first.stderr
    runs = _results(results)
    assert len(runs) == 2
    one = next(r for r in runs if r["qcow2"])
    assert one["tags"] == [f"{repo}:{v}-fx1" for v in ("base", "v2", "v3", "v4")]
    assert one["v2"] == f"{repo}:v2-fx1"
    assert one["loaded"] is False  # the local build already put every tag in this store
    assert Path(str(one["bundle"])).is_file() and Path(str(one["qcow2"])).is_file()
    assert "[bib]" in first.stdout

    second = _pytest(tmp_path, results, *common, qcow2=True)
    assert second.returncode == 0, second.stdout + second.stderr
    again = next(r for r in _results(results) if r["qcow2"])
    assert again["qcow2"] == one["qcow2"] and again["bundle"] == one["bundle"]
    assert "[bib]" not in second.stdout  # a cache hit: the builder did not run

    # The same bundle as a plain --device-bundle, after removing the tags, with two xdist workers:
    # exactly one worker loads it, the other finds every tag present.
    pytest.importorskip("xdist")
    remove_images(podman_conn, list(one["tags"]))  # type: ignore[arg-type]
    third = _pytest(tmp_path, results, "-n", "2", "--device-bundle", str(one["bundle"]),
                    "--device-image-repo", repo, "--device-cache-dir", str(tmp_path / "cache"),
                    "--device-podman-url", podman_conn.url)
    assert third.returncode == 0, third.stdout + third.stderr
    loads = _results(results)
    assert len(loads) == 2 and sorted(bool(r["loaded"]) for r in loads) == [False, True]
    assert all(r["tags"] == one["tags"] for r in loads)
    assert set(one["tags"]) <= set(podman_conn.tag_ids())  # type: ignore[arg-type]


def test_a_service_that_is_down_fails_the_fixture_in_one_line(tmp_path: Path, podman_conn: podman.Podman,
                                                              test_repo: str, busybox_base: str) -> None:
    bundle = tmp_path / "b.tar"
    podman_conn.export([busybox_base], bundle)
    down = f"unix://{tmp_path}/down.sock"
    run = _pytest(tmp_path, tmp_path / "results", "--device-bundle", str(bundle), "--device-podman-url", down,
                  "--device-image-repo", test_repo, "--device-image-tag", "x",
                  "--device-cache-dir", str(tmp_path / "cache"))
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"no podman API service answers at {down} (--device-podman-url)" in run.stdout
