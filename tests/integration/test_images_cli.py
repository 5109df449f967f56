"""flightctl-device build / bundle / load / qcow2, as the CI jobs run them (subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTCTL_DEVICE_")}
    return subprocess.run([sys.executable, "-m", "pytest_flightctl_device.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_build_bundle_load_qcow2(podman_conn: podman.Podman, test_repo: str, busybox_base: str,
                                 bib_stand_in: str, tmp_path: Path) -> None:
    repo, url = f"{test_repo}/cli", podman_conn.url
    rpms = tmp_path / "rpms"
    rpms.mkdir()
    (rpms / "flightctl-agent-1.rpm").write_bytes(b"rpm")
    built = _cli("build", "--rpms", str(rpms), "--tag", "c1", "--containerfiles", str(TEST_CONTAINERFILES),
                 "--base-image", busybox_base, "--image-repo", repo, "--jobs", "2", "--podman-url", url,
                 cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    refs = [line.split()[0] for line in built.stdout.splitlines() if line.startswith(f"{repo}:")]
    assert refs == [f"{repo}:{v}-c1" for v in ("base", "v2", "v3", "v4")]
    assert "[v2] STEP" in built.stdout

    bundle = tmp_path / "agent-images-bundle.tar"
    out = _cli("bundle", "-o", str(bundle), "--tag", "c1", "--image-repo", repo, "--podman-url", url,
               cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(t for e in podman.read_manifest(bundle) for t in e.tags) == sorted(refs)

    remove_images(podman_conn, refs)
    loaded = _cli("load", str(bundle), "--image-repo", repo, "--podman-url", url,
                  "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert loaded.stdout.split()[-4:] == refs
    again = _cli("load", str(bundle), "--image-repo", repo, "--podman-url", url,
                 "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert "nothing loaded" in again.stdout

    disk = tmp_path / "disk.qcow2"
    made = _cli("qcow2", "-o", str(disk), "--tag", "c1", "--image-repo", repo, "--bib-image", bib_stand_in,
                "--cache-dir", str(tmp_path / "cache"), "--podman-url", url, cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    assert disk.read_bytes()[:4] == b"QFI\xfb" and "[bib]" in made.stdout
    disk.unlink()
    hit = _cli("qcow2", "-o", str(disk), "--tag", "c1", "--image-repo", repo, "--bib-image", bib_stand_in,
               "--cache-dir", str(tmp_path / "cache"), "--podman-url", url, cwd=tmp_path)
    assert hit.returncode == 0 and disk.is_file() and "[bib]" not in hit.stdout


def test_bundle_of_a_tag_never_built_names_the_missing_tags(podman_conn: podman.Podman, test_repo: str,
                                                            tmp_path: Path) -> None:
    out = _cli("bundle", "-o", str(tmp_path / "b.tar"), "--tag", "never", "--image-repo", f"{test_repo}/cli",
               "--podman-url", podman_conn.url, cwd=tmp_path)
    assert out.returncode == 1
    assert f"podman has no {test_repo}/cli:base-never, {test_repo}/cli:v2-never" in out.stderr
    assert out.stderr.count("\n") == 1 and not (tmp_path / "b.tar").exists()


def test_load_of_something_else_is_one_line(podman_conn: podman.Podman, tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\0" * 4096)
    out = _cli("load", str(junk), "--podman-url", podman_conn.url, cwd=tmp_path)
    assert out.returncode == 1 and "is not a docker-archive images bundle" in out.stderr
