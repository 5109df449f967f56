"""qcow2 through the FAKE bootc-image-builder image (tests/support/images/bib): invocation, output, cache."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_flightctl_device.artifacts.sources.build import qcow2_of
from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import podman, qcow2
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import require_tool
from tests.support.images.stand_ins import bib_stand_in, busybox_base, podman_conn, test_repo

__all__ = ["bib_stand_in", "busybox_base", "podman_conn", "test_repo"]  # session fixtures used below


def _disk_text(path: Path, tmp_path: Path) -> str:
    """The first line of the disk's content, read back through qemu-img."""
    raw = tmp_path / "readback.raw"
    subprocess.run([require_tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)],
                   check=True)
    with raw.open("rb") as handle:
        return handle.readline().decode()


def test_builder_writes_a_real_qcow2_of_the_ref(podman_conn: podman.Podman, bib_stand_in: str,
                                                busybox_base: str, tmp_path: Path) -> None:
    lines: list[str] = []
    dest = tmp_path / "disk.qcow2"
    out = qcow2.build(podman_conn, busybox_base, dest, Settings(bib_image=bib_stand_in), lines.append)
    assert out == dest
    check = subprocess.run([require_tool("qemu-img"), "check", str(dest)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert _disk_text(dest, tmp_path) == f"stand-in disk of {busybox_base} rootfs=xfs\n"
    assert any("Build complete" in line for line in lines)
    assert lines[0].startswith("bootc-image-builder build --type qcow2 --rootfs xfs --progress verbose ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow2", "readback.raw"]  # scratch gone
    assert not podman_conn.client.containers.list(all=True, filters={"ancestor": bib_stand_in})


def test_a_config_is_mounted_and_passed(podman_conn: podman.Podman, bib_stand_in: str, busybox_base: str,
                                        tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[customizations.user]]\nname = "user"\n')
    settings = Settings(bib_image=bib_stand_in, bib_config=config)
    assert qcow2.command("x", True)[-3:] == ["--config", "/config.toml", "x"]
    qcow2.build(podman_conn, busybox_base, tmp_path / "disk.qcow2", settings, lambda _l: None)
    assert (tmp_path / "disk.qcow2").is_file()


def test_a_failing_builder_shows_its_last_lines(podman_conn: podman.Podman, bib_stand_in: str,
                                                busybox_base: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[customizations]\nthis is not toml\n")
    settings = Settings(bib_image=bib_stand_in, bib_config=config)
    with pytest.raises(PodmanError) as caught:
        qcow2.build(podman_conn, busybox_base, tmp_path / "out" / "disk.qcow2", settings, lambda _l: None)
    message = str(caught.value)
    assert "bootc-image-builder exited 1 building a qcow2 of" in message
    assert "line 2 is not TOML: this is not toml" in message
    assert not (tmp_path / "out" / "disk.qcow2").exists()
    assert not list((tmp_path / "out").iterdir())  # no scratch output left behind


def test_a_builder_past_its_timeout_is_stopped(podman_conn: podman.Podman, bib_stand_in: str,
                                               busybox_base: str, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("# stand-in-sleep 60\n")
    settings = Settings(bib_image=bib_stand_in, bib_config=config, bib_timeout=1.0)
    with pytest.raises(PodmanError, match="ran longer than --device-bib-timeout"):
        qcow2.build(podman_conn, busybox_base, tmp_path / "disk.qcow2", settings, lambda _l: None)


def test_an_image_missing_from_storage_fails_in_the_builder(podman_conn: podman.Podman, bib_stand_in: str,
                                                            test_repo: str, tmp_path: Path) -> None:
    with pytest.raises(PodmanError, match="is not in the container storage"):
        qcow2.build(podman_conn, f"{test_repo}/absent:latest", tmp_path / "d.qcow2",
                    Settings(bib_image=bib_stand_in), lambda _l: None)


def test_second_request_is_a_cache_hit(podman_conn: podman.Podman, bib_stand_in: str, busybox_base: str,
                                       tmp_path: Path) -> None:
    settings = Settings(bib_image=bib_stand_in, podman_url=podman_conn.url, cache_dir=tmp_path / "cache")
    cache = settings.cache()
    base_id = podman_conn.image_id(busybox_base)
    assert base_id is not None
    first: list[str] = []
    with podman.PodmanSession(settings) as pod:
        path = qcow2_of(settings, busybox_base, base_id, cache, first.append, pod)
        assert any(line.startswith("[bib] ") for line in first)
        second: list[str] = []
        assert qcow2_of(settings, busybox_base, base_id, cache, second.append, pod) == path
    assert second == []  # nothing ran, not even the builder's pull check said anything
    other_config = tmp_path / "c.toml"
    other_config.write_text("# another config makes another key\n")
    key1 = qcow2.cache_key(base_id, bib_stand_in, "b" * 64, None)
    assert key1 != qcow2.cache_key(base_id, bib_stand_in, "b" * 64, other_config)
    assert key1 != qcow2.cache_key("a" * 64, bib_stand_in, "b" * 64, None)
    assert key1 != qcow2.cache_key(base_id, bib_stand_in, "c" * 64, None)
