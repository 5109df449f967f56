"""Local-path and no-source behaviour of Artifacts and of the agent_qcow2/agent_images_bundle fixtures."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import require_tool

pytest_plugins = ["pytester"]


def settings(tmp_path: Path, **cli: object) -> Settings:
    values = {"cache_dir": str(tmp_path / "cache"), **cli}
    return Settings.resolve(values, {}, {})


def make_qcow2(path: Path, fmt: str = "qcow2") -> Path:
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", fmt, str(path), "16M"], check=True)
    return path


def make_bundle(path: Path, tags: list[str] | None = None) -> Path:
    manifest = json.dumps([{"Config": "a" * 64 + ".json", "RepoTags": tags or ["quay.io/x/y:base-t"],
                            "Layers": []}]).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return path


def test_local_qcow2_is_used_in_place(tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "disk.qcow2")
    artifacts = Artifacts(settings(tmp_path, qcow2=str(disk)))
    assert artifacts.qcow2() == disk.resolve()
    assert not (tmp_path / "cache").exists()  # nothing copied, nothing cached


def test_local_qcow2_with_sha256_checks_and_remembers(tmp_path: Path) -> None:
    import hashlib

    disk = make_qcow2(tmp_path / "disk.qcow2")
    digest = hashlib.sha256(disk.read_bytes()).hexdigest()
    assert Artifacts(settings(tmp_path, qcow2=str(disk), qcow2_sha256=digest)).qcow2() == disk.resolve()
    assert len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    wrong = "0" * 64
    with pytest.raises(ConfigError) as info:
        Artifacts(settings(tmp_path, qcow2=str(disk), qcow2_sha256=wrong)).qcow2()
    assert str(disk.resolve()) in str(info.value) and wrong in str(info.value)


def test_raw_image_is_refused_naming_path_and_fix(tmp_path: Path) -> None:
    raw = make_qcow2(tmp_path / "disk.img", fmt="raw")
    with pytest.raises(ConfigError) as info:
        Artifacts(settings(tmp_path, qcow2=str(raw))).qcow2()
    message = str(info.value)
    assert str(raw.resolve()) in message and "raw" in message and "qemu-img convert" in message


def test_non_image_is_refused(tmp_path: Path) -> None:
    require_tool("qemu-img")
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"QFI\xfb" + b"\x00" * 100)  # qcow2 magic, broken header
    with pytest.raises(ConfigError) as info:
        Artifacts(settings(tmp_path, qcow2=str(junk))).qcow2()
    assert str(junk.resolve()) in str(info.value)


def test_local_qcow2_that_vanished(tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "disk.qcow2")
    chosen = settings(tmp_path, qcow2=str(disk))
    disk.unlink()
    with pytest.raises(ConfigError) as info:
        Artifacts(chosen).qcow2()
    assert "does not exist" in str(info.value) and str(disk) in str(info.value)


def test_no_source_names_the_options(tmp_path: Path) -> None:
    artifacts = Artifacts(settings(tmp_path))
    with pytest.raises(ConfigError, match="--device-qcow2, --device-github-run/pr/ref or --device-build"):
        artifacts.qcow2()
    with pytest.raises(ConfigError, match="--device-bundle, --device-github-run/pr/ref or --device-build"):
        artifacts.bundle()


def test_local_bundle_checked_for_repo_tags(tmp_path: Path) -> None:
    good = make_bundle(tmp_path / "bundle.tar")
    assert Artifacts(settings(tmp_path, bundle=str(good))).bundle() == good.resolve()
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("other.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(ConfigError, match=r"no manifest\.json"):
        Artifacts(settings(tmp_path, bundle=str(bad))).bundle()


def test_fixture_gives_local_qcow2(pytester: pytest.Pytester, tmp_path: Path) -> None:
    disk = make_qcow2(tmp_path / "disk.qcow2")
    pytester.makepyfile(f"""
        def test_disk(agent_qcow2):
            assert str(agent_qcow2) == {str(disk.resolve())!r}
    """)
    result = pytester.runpytest_subprocess("--device-qcow2", str(disk), "--device-cache-dir",
                                           str(tmp_path / "cache"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_fixtures_are_lazy(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A run that asks for no artifact resolves nothing: an unreachable source is never contacted."""
    pytester.makepyfile("""
        def test_plain():
            pass
    """)
    result = pytester.runpytest_subprocess(
        "--device-bundle", "http://127.0.0.1:9/never.tar", "--device-github-api-url", "http://127.0.0.1:9",
        "--device-cache-dir", str(tmp_path / "cache"), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert not (tmp_path / "cache").exists()


def test_fixture_error_is_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile("""
        def test_bundle(agent_images_bundle):
            pass
    """)
    result = pytester.runpytest_subprocess("--device-cache-dir", str(tmp_path / "cache"), "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no images bundle source: give --device-bundle*"])
