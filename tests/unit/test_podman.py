"""podman.py, build.py and qcow2.py logic that needs no podman service."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import ArtifactError, ConfigError, MissingToolError, PodmanError
from pytest_flightctl_device.images import build, podman, qcow2
from pytest_flightctl_device.settings import Settings

ID_A, ID_B = "a" * 64, "b" * 64


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _archive(path: Path, manifest: object) -> Path:
    return _tar(path, {f"{ID_A}.json": b"{}", "layer.tar": b"x" * 1024,
                       "manifest.json": json.dumps(manifest).encode()})


def test_read_manifest_of_a_docker_archive(tmp_path: Path) -> None:
    bundle = _archive(tmp_path / "b.tar", [
        {"Config": f"{ID_A}.json", "RepoTags": ["r:base-t", "r:other"], "Layers": []},
        {"Config": f"sha256:{ID_B}.json", "RepoTags": ["r:v2-t"], "Layers": []}])
    assert podman.read_manifest(bundle) == [podman.ManifestEntry(ID_A, ("r:base-t", "r:other")),
                                            podman.ManifestEntry(ID_B, ("r:v2-t",))]


@pytest.mark.parametrize(("content", "why"), [
    (b"just some bytes, not a tar at all" * 40, "cannot be read as a tar"),
    ({"index.json": b"{}", "oci-layout": b"{}"}, "it has no manifest.json"),
    ({"manifest.json": b"[]"}, "lists no tagged images"),
    ({"manifest.json": b"{not json"}, "its manifest.json is malformed"),
    ({"manifest.json": json.dumps([{"Config": "nothex.json", "RepoTags": ["x:y"]}]).encode()},
     "its manifest.json is malformed"),
    ({"manifest.json": json.dumps([{"RepoTags": ["x:y"]}]).encode()}, "its manifest.json is malformed"),
])
def test_anything_but_a_docker_archive_is_one_sentence(tmp_path: Path, content: object, why: str) -> None:
    path = tmp_path / "not-a-bundle.tar"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _tar(path, content)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError) as caught:
        podman.read_manifest(path)
    message = str(caught.value)
    assert message.startswith(f"{path} is not a docker-archive images bundle (")
    assert why in message and message.count(". ") == 0 and message.endswith("`podman save -m`.")


def test_expected_tags_from_the_option_or_the_bundle() -> None:
    settings = Settings(image_repo="quay.io/x/dev", variants=("base", "v2"))
    assert podman.expected_tags(dataclasses.replace(settings, image_tag="t1")) == {
        "base": "quay.io/x/dev:base-t1", "v2": "quay.io/x/dev:v2-t1"}
    manifest = [podman.ManifestEntry(ID_A, ("quay.io/x/dev:v2-t9", "quay.io/x/dev:base-t9"))]
    assert podman.expected_tags(settings, manifest)["v2"] == "quay.io/x/dev:v2-t9"
    with pytest.raises(ArtifactError, match=r"has no quay.io/x/dev:base-<tag> image"):
        podman.expected_tags(settings, [podman.ManifestEntry(ID_A, ("other/repo:base-t9",))])


def test_loaded_images_reads_like_a_list_and_a_map() -> None:
    images = podman.LoadedImages(tags=("r:base-t", "r:v2-t"), by_variant={"base": "r:base-t", "v2": "r:v2-t"})
    assert list(images) == ["r:base-t", "r:v2-t"] and len(images) == 2 and images["v2"] == "r:v2-t"


def test_default_socket_follows_the_user() -> None:
    url = podman.default_socket_url({"XDG_RUNTIME_DIR": "/run/user/1234"})
    if os.getuid() == 0:
        assert url == "unix:///run/podman/podman.sock"
    else:
        assert url == "unix:///run/user/1234/podman/podman.sock"


def test_an_explicit_url_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    down = f"unix://{tmp_path}/none.sock"
    with pytest.raises(PodmanError, match=r"no podman API service answers at .*none.sock \(--device-podman-url\)"):
        podman.connect(Settings(podman_url=down), env={})
    with pytest.raises(PodmanError, match=r"\(CONTAINER_HOST\); start one with `podman system service"):
        podman.connect(Settings(), env={"CONTAINER_HOST": down})


def test_no_service_and_no_podman_is_a_missing_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: podman is not installed
    with pytest.raises(MissingToolError, match=r"podman is not installed"):
        podman.connect(Settings(), env={}, default_url=f"unix://{tmp_path}/none.sock")


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_git_build_args(tmp_path: Path) -> None:
    assert build.git_build_args(tmp_path)["SOURCE_GIT_TREE_STATE"] == "unknown"
    _git(tmp_path, "init", "-q")
    (tmp_path / "f").write_text("1")
    _git(tmp_path, "add", "f")
    _git(tmp_path, "commit", "-q", "-m", "one")
    sha = _git(tmp_path, "rev-parse", "--short=7", "HEAD")
    assert build.git_build_args(tmp_path) == {"SOURCE_GIT_TAG": f"v0.0.0-{sha}",
                                              "SOURCE_GIT_TREE_STATE": "clean", "SOURCE_GIT_COMMIT": sha}
    _git(tmp_path, "tag", "v0.6.0")
    (tmp_path / "f").write_text("2")
    args = build.git_build_args(tmp_path)
    assert args["SOURCE_GIT_TAG"] == f"v0.6.0-{sha}" and args["SOURCE_GIT_TREE_STATE"] == "dirty"


@pytest.mark.parametrize("tag", ["", "has space", "-leading", "a/b", "x" * 200])
def test_bad_tags_are_refused(tag: str) -> None:
    with pytest.raises(ConfigError, match="is not a valid tag"):
        build.check_tag(tag)


def test_plan_checks_containerfiles_first(tmp_path: Path) -> None:
    (tmp_path / "rpms").mkdir()
    (tmp_path / "Containerfile-base").write_text("FROM x\n")
    with pytest.raises(ConfigError, match=r"has no Containerfile-v2; give --device-containerfiles"):
        build.plan(Settings(containerfiles=tmp_path, image_tag="t"))
    plan = build.plan(Settings(containerfiles=tmp_path, image_tag="t", variants=("base",)), cwd=tmp_path)
    assert plan.ref("base") == "quay.io/flightctl/flightctl-device:base-t"


def _names(tar: io.BufferedReader) -> set[str]:
    with tarfile.open(fileobj=tar, mode="r:") as archive:
        return set(archive.getnames())


def test_rpms_go_to_the_base_context_only(tmp_path: Path) -> None:
    root, rpms = tmp_path / "cf", tmp_path / "rpms"
    (root / "rpms").mkdir(parents=True)
    (root / "rpms" / ".gitkeep").write_text("")
    (root / "Containerfile-base").write_text("FROM x\n")
    rpms.mkdir()
    (rpms / "flightctl-agent-1.rpm").write_bytes(b"rpm")
    with build._context_tar(root, rpms, with_rpms=True) as tar:
        assert _names(tar) == {"Containerfile-base", "rpms", "rpms/flightctl-agent-1.rpm"}  # type: ignore[arg-type]
    with build._context_tar(root, rpms, with_rpms=False) as tar:
        assert _names(tar) == {"Containerfile-base", "rpms"}  # type: ignore[arg-type]
    with build._context_tar(root, None, with_rpms=True) as tar:
        assert _names(tar) == {"Containerfile-base", "rpms", "rpms/.gitkeep"}  # type: ignore[arg-type]


def test_bib_command_line_and_cache_key(tmp_path: Path) -> None:
    assert qcow2.command("r:base-t", False) == ["build", "--type", "qcow2", "--rootfs", "xfs",
                                                "--progress", "verbose", "r:base-t"]
    assert qcow2.command("r:base-t", True)[-3:] == ["--config", "/config.toml", "r:base-t"]
    config = tmp_path / "config.toml"
    config.write_text("[customizations]\n")
    keys = {qcow2.cache_key(ID_A, "bib:1", ID_B, None), qcow2.cache_key(ID_B, "bib:1", ID_B, None),
            qcow2.cache_key(ID_A, "bib:2", ID_B, None), qcow2.cache_key(ID_A, "bib:1", ID_A, None),
            qcow2.cache_key(ID_A, "bib:1", ID_B, config)}
    assert len(keys) == 5
    assert qcow2.cache_key(ID_A, "bib:1", ID_B, config) == qcow2.cache_key(ID_A, "bib:1", ID_B, config)


# -- which way a bundle is loaded ----------------------------------------------------------------


@pytest.mark.parametrize(("url", "bundle", "server_side", "local_fails", "way"), [
    ("unix:///run/podman/podman.sock", "/var/cache/b.tar", True, False, "local"),
    ("unix:///run/podman/podman.sock", "/var/cache/b.tar", True, True, "upload"),  # e.g. a VM's socket
    ("unix:///run/podman/podman.sock", "/var/cache/b.tar", False, False, "upload"),
    ("unix:///run/podman/podman.sock", "/var/cache/a:b.tar", True, False, "upload"),  # docker-archive's ':'
    ("unix:///run/podman/podman.sock", "/var/cache/a b.tar", True, False, "upload"),  # a FROM line's space
    ("tcp://127.0.0.1:8888", "/var/cache/b.tar", True, False, "upload"),
])
def test_a_service_on_this_host_reads_the_bundle_any_other_gets_it_uploaded(
        monkeypatch: pytest.MonkeyPatch, url: str, bundle: str, server_side: bool, local_fails: bool,
        way: str) -> None:
    conn = podman.Podman(url)
    conn.server_side_load = server_side
    used: list[tuple[str, Path]] = []

    def local(path: Path, count: int) -> list[str]:
        used.append(("local", path))
        if local_fails:
            raise PodmanError("no such file or directory")
        return []

    monkeypatch.setattr(conn, "load_local", local)
    monkeypatch.setattr(conn, "load_stream", lambda path: used.append(("upload", path)) or [])
    conn.load(Path(bundle), 4)
    assert used[-1] == (way, Path(bundle))
    conn.client.close()


def test_the_build_context_holds_only_the_from_line() -> None:
    with tarfile.open(fileobj=io.BytesIO(podman._context_tar("FROM docker-archive:/b.tar:@1\n"))) as tar:
        assert tar.getnames() == ["Containerfile"]
        handle = tar.extractfile("Containerfile")
        assert handle is not None and handle.read() == b"FROM docker-archive:/b.tar:@1\n"
