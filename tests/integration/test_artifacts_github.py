"""GitHub Actions artifacts end to end against the loopback emulator: sources, faults, cache, xdist."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.artifacts.sources.zipmember import TAIL
from pytest_flightctl_device.errors import ArtifactError, GitHubError
from pytest_flightctl_device.settings import Settings
from tests.support.github_emulator import (
    TOKEN,
    EmuArtifact,
    EmuRun,
    Fault,
    GitHubEmulator,
    make_artifact_zip,
)
from tests.support.helpers import require_tool

pytest_plugins = ["pytester"]
SHA = "a" * 40
REPO_ROOT = Path(__file__).resolve().parents[2]


def make_bundle(path: Path, payload_mib: int = 3) -> Path:
    """A docker-archive-like tar: manifest.json with RepoTags plus incompressible layer bytes."""
    manifest = json.dumps([{"Config": "c" * 64 + ".json", "RepoTags": ["quay.io/flightctl/flightctl-device:base-t"],
                            "Layers": ["layer.tar"]}]).encode()
    layer = os.urandom(payload_mib << 20)
    with tarfile.open(path, "w") as tar:
        for name, data in (("layer.tar", layer), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def payloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("payloads")
    qcow2 = root / "disk.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    return {"bundle": make_bundle(root / "agent-images-bundle.tar"), "qcow2": qcow2}


@pytest.fixture
def gh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[GitHubEmulator]:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    monkeypatch.delenv("GH_TOKEN", raising=False)
    work = tmp_path / "emulator"
    work.mkdir()
    with GitHubEmulator(work) as emulator:
        yield emulator
    assert emulator.auth_leaks == [], "the blob host saw an Authorization header"


def settings(gh: GitHubEmulator, tmp_path: Path, **cli: object) -> Settings:
    values = {"github_api_url": gh.api_url, "cache_dir": str(tmp_path / "cache"), **cli}
    return Settings.resolve(values, {}, {})


def standard_run(gh: GitHubEmulator, payloads: dict[str, Path], *, sha: str = SHA, bundle_level: int = 0,
                 qcow2_level: int = 1, branch: str = "main") -> tuple[EmuRun, EmuArtifact, EmuArtifact]:
    emu_run = gh.add_run(sha, branch=branch)
    bundle = gh.add_artifact(emu_run, "agent-images-bundle-cs9-bootc-v0.6.0-abc1234", payloads["bundle"],
                             member="agent-images-bundle.tar", level=bundle_level)
    qcow2 = gh.add_artifact(emu_run, "agent-qcow2-image-cs9-bootc-v0.6.0-abc1234", payloads["qcow2"],
                            member="disk.qcow2", level=qcow2_level)
    return emu_run, bundle, qcow2


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_error(exc: BaseException, *needles: str) -> None:
    message = str(exc)
    assert TOKEN not in message and "sig=" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def final_objects(tmp_path: Path) -> list[Path]:
    objects = tmp_path / "cache" / "objects"
    return [p for p in objects.glob("*/*") if p.suffix != ".json"] if objects.exists() else []


# -- the happy paths --------------------------------------------------------------------------


def test_run_downloads_each_artifact_once(gh: GitHubEmulator, payloads: dict[str, Path],
                                          tmp_path: Path) -> None:
    run, bundle, qcow2 = standard_run(gh, payloads)
    first = Artifacts(settings(gh, tmp_path, github_run=str(run.id)))
    assert digest(first.bundle()) == digest(payloads["bundle"])
    assert digest(first.qcow2()) == digest(payloads["qcow2"])
    assert first.bundle() == first.bundle()
    assert gh.full_downloads(bundle) == 1 and gh.full_downloads(qcow2) == 1
    assert gh.redirects == 2
    zip_calls = [entry for entry in gh.api_log if entry[1].endswith("/zip")]
    assert zip_calls and all(had_auth for _, _, had_auth in zip_calls)
    blob_requests = len(gh.blob_log)
    second = Artifacts(settings(gh, tmp_path, github_run=str(run.id)))
    assert second.bundle() == first.bundle() and second.qcow2() == first.qcow2()
    assert len(gh.blob_log) == blob_requests  # a warm run downloads nothing
    assert not os.access(first.qcow2(), os.W_OK) or os.getuid() == 0
    assert first.qcow2().stat().st_mode & 0o222 == 0  # read-only in the cache


def test_pr_uses_newest_completed_run_of_its_head(gh: GitHubEmulator, payloads: dict[str, Path],
                                                  tmp_path: Path) -> None:
    gh.prs[42] = SHA
    standard_run(gh, payloads, sha="b" * 40)  # another commit's run
    older, _, _ = standard_run(gh, payloads)
    newest, bundle, _ = standard_run(gh, payloads, bundle_level=1)
    gh.add_run(SHA, status="in_progress", conclusion="")  # newer still, no artifacts yet
    said: list[str] = []
    artifacts = Artifacts(settings(gh, tmp_path, github_pr="42"), progress=said.append)
    artifacts.bundle()
    assert gh.full_downloads(bundle) == 1
    assert any(f"using run {newest.id}" in line for line in said)
    assert older.id != newest.id


def test_ref_by_branch_and_by_short_sha(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path) -> None:
    _, bundle, _ = standard_run(gh, payloads, branch="release-1.0")
    gh.commits["release-1.0"] = SHA
    assert digest(Artifacts(settings(gh, tmp_path, github_ref="release-1.0")).bundle()) == digest(
        payloads["bundle"])
    assert digest(Artifacts(settings(gh, tmp_path, github_ref=SHA[:9])).bundle()) == digest(payloads["bundle"])
    assert gh.full_downloads(bundle) == 1


def test_artifacts_listed_over_several_pages(gh: GitHubEmulator, payloads: dict[str, Path],
                                             tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    for index in range(4):
        gh.add_artifact(run, f"logs-{index}", b"log")
    gh.add_artifact(run, "agent-qcow2-image-cs9", payloads["qcow2"], member="disk.qcow2")
    gh.page_size = 2
    assert digest(Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()) == digest(payloads["qcow2"])
    assert sum(bool(re.search(r"/runs/\d+/artifacts", path)) for _, path, _ in gh.api_log) == 3


def test_fixtures_under_xdist_download_once(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path,
                                            pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    run, bundle, qcow2 = standard_run(gh, payloads)
    gh.throttle = 4e6  # about a second per artifact: the workers really overlap
    pytester.makepyfile(**{f"test_w{i}": """
        import hashlib
        def test_both(agent_images_bundle, agent_qcow2):
            print("PATHS", agent_images_bundle, agent_qcow2)
            assert agent_images_bundle.is_file() and agent_qcow2.is_file()
    """ for i in range(8)})
    result = pytester.runpytest_subprocess(
        "-n", "4", "-p", "no:cacheprovider", "--device-github-run", str(run.id),
        "--device-github-api-url", gh.api_url, "--device-cache-dir", str(tmp_path / "cache"))
    result.assert_outcomes(passed=8)
    assert gh.full_downloads(bundle) == 1 and gh.full_downloads(qcow2) == 1
    assert gh.body_bytes(bundle) == bundle.zip_path.stat().st_size  # the zip once, plus its tail read first
    assert gh.bytes_served(bundle) - gh.body_bytes(bundle) <= TAIL
    assert gh.redirects == 2
    assert TOKEN not in result.stdout.str() + result.stderr.str()


# -- transfer faults --------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1])
def test_dropped_connection_resumes(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path,
                                    level: int) -> None:
    """Stored or deflated: the digest, the inflater and the member bytes written so far carry on."""
    run, bundle, _ = standard_run(gh, payloads, bundle_level=level)
    gh.drop_after[bundle.id] = 1 << 20
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert digest(path) == digest(payloads["bundle"])
    assert [r.range for r in gh.body_requests(bundle)] == [None, f"bytes={1 << 20}-"]
    assert gh.body_bytes(bundle) == bundle.zip_path.stat().st_size
    assert gh.redirects == 2  # one for the tail and the body, a fresh one for the resume


def test_truncated_body_without_length_resumes(gh: GitHubEmulator, payloads: dict[str, Path],
                                               tmp_path: Path) -> None:
    run, bundle, _ = standard_run(gh, payloads)
    gh.truncate_no_length[bundle.id] = 700_000
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert digest(path) == digest(payloads["bundle"])
    assert [r.range for r in gh.body_requests(bundle)] == [None, "bytes=700000-"]


def test_expired_signed_url_gets_a_fresh_one_and_resumes(gh: GitHubEmulator, payloads: dict[str, Path],
                                                         tmp_path: Path) -> None:
    run, bundle, _ = standard_run(gh, payloads)
    gh.drop_after[bundle.id] = 1 << 20
    gh.expire_redirects = {2}  # the URL for the resume has expired by the time it is used
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert digest(path) == digest(payloads["bundle"])
    assert gh.expired_rejections == 1 and gh.redirects == 3
    assert gh.blob_log[-1].range == f"bytes={1 << 20}-" and gh.blob_log[-1].status == 206


def test_api_5xx_is_retried(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path) -> None:
    run, _, _ = standard_run(gh, payloads)
    gh.faults.append(Fault(r"/artifacts$", 502, times=2))
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert digest(path) == digest(payloads["qcow2"])


def test_kill_9_mid_download_then_clean_resume(gh: GitHubEmulator, payloads: dict[str, Path],
                                               tmp_path: Path) -> None:
    run, _, _ = standard_run(gh, payloads)
    gh.throttle = 1e6  # ~3 s for the bundle
    script = (
        "import sys\nfrom pytest_flightctl_device.artifacts.session import Artifacts\n"
        "from pytest_flightctl_device.settings import Settings\n"
        f"s = Settings.resolve({{'github_api_url': {gh.api_url!r}, 'cache_dir': {str(tmp_path / 'cache')!r}, "
        f"'github_run': '{run.id}'}}, {{}}, {{}})\n"
        "print(Artifacts(s).bundle())\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    partial_dir = tmp_path / "cache" / "tmp"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        zips = list(partial_dir.glob("*.member")) if partial_dir.exists() else []
        if zips and zips[0].stat().st_size > 600_000:
            break
        time.sleep(0.05)
    else:
        child.kill()
        pytest.fail("the child never started downloading")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    out, err = child.communicate()
    assert TOKEN.encode() not in out + err
    assert final_objects(tmp_path) == []  # nothing half-written under a final name
    assert not list((tmp_path / "cache" / "index").glob("*.json"))
    gh.throttle = None
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert digest(path) == digest(payloads["bundle"])
    assert gh.blob_log[-1].range is not None and gh.blob_log[-1].status == 206  # resumed, not restarted
    assert not list(partial_dir.glob("*.member")) and not list(partial_dir.glob("*.zip"))


# -- content faults ---------------------------------------------------------------------------


def test_wrong_digest_is_refused_and_nothing_cached(gh: GitHubEmulator, payloads: dict[str, Path],
                                                   tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-x", payloads["bundle"], digest="sha256:" + "0" * 64)
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert_clean_error(info.value, "agent-images-bundle-x", "0" * 64, "sha256")
    assert final_objects(tmp_path) == [] and not list((tmp_path / "cache" / "tmp").glob("*"))


def test_corrupt_zip_is_refused(gh: GitHubEmulator, tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-x", b"", raw_zip=b"PK\x03\x04" + os.urandom(5000))
    with pytest.raises(ArtifactError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert_clean_error(info.value, "agent-images-bundle-x", "not a readable zip")
    assert final_objects(tmp_path) == []


def test_zip_member_escaping_is_refused(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-x", payloads["bundle"], member="../../evil.tar")
    with pytest.raises(ArtifactError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert_clean_error(info.value, "../../evil.tar", "escape")
    assert final_objects(tmp_path) == [] and not (tmp_path / "evil.tar").exists()


def test_bundle_without_repo_tags_is_refused(gh: GitHubEmulator, tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-x", payload=tarfile_bytes())
    with pytest.raises(ArtifactError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert_clean_error(info.value, "no manifest.json")
    assert final_objects(tmp_path) == []


def tarfile_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("README"), io.BytesIO(b""))
    return buffer.getvalue()


# -- API errors -------------------------------------------------------------------------------


def test_expired_artifact_names_it_run_and_time(gh: GitHubEmulator, payloads: dict[str, Path],
                                                tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-qcow2-image-old", payloads["qcow2"], expired=True)
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert_clean_error(info.value, "agent-qcow2-image-old", str(run.id), "2020-01-01T00:00:00Z", "expired")


def test_expired_bundle_of_a_pr_says_which_run_to_rerun(gh: GitHubEmulator, payloads: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """Retention is one day: the PR's only completed run still lists its bundle, expired."""
    gh.prs[9] = SHA
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-cs9-bootc-v1", payloads["bundle"], expired=True)
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_pr="9")).bundle()
    assert_clean_error(info.value, "agent-images-bundle-cs9-bootc-v1", f"run {run.id}", "pull request #9",
                       "expired at 2020-01-01T00:00:00Z", f"gh run rerun {run.id} --repo {gh.repo}",
                       f"https://github.com/{gh.repo}/actions/runs/{run.id}")
    assert "no completed run" not in str(info.value)
    assert not any("/zip" in path for _, path, _ in gh.api_log)  # nothing was downloaded


def test_a_newer_unexpired_run_wins_over_an_expired_one(gh: GitHubEmulator, payloads: dict[str, Path],
                                                       tmp_path: Path) -> None:
    gh.prs[9] = SHA
    expired = gh.add_run(SHA)
    gh.add_artifact(expired, "agent-images-bundle-old", payloads["bundle"], expired=True)
    _, bundle, _ = standard_run(gh, payloads)
    Artifacts(settings(gh, tmp_path, github_pr="9")).bundle()
    assert gh.full_downloads(bundle) == 1


@pytest.mark.parametrize("sha", ["abc1234", "A" * 39, "g" * 40, "", "a" * 41])
def test_a_pr_head_that_is_not_a_commit_hash_says_so(gh: GitHubEmulator, tmp_path: Path, sha: str) -> None:
    gh.prs[3] = sha
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_pr="3")).bundle()
    assert_clean_error(info.value, "pull request #3", f"head.sha {sha!r}", "not a 40-hex commit hash",
                       "--device-github-api-url")


def test_a_blob_host_that_ignores_range_still_works(gh: GitHubEmulator, payloads: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """Not GitHub's (it honours Range): the zip is spooled first, then extracted, checked all the same."""
    run, bundle, _ = standard_run(gh, payloads)
    gh.ignore_range = True
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert digest(path) == digest(payloads["bundle"])
    assert gh.full_downloads(bundle) == 1
    assert not list((tmp_path / "cache" / "tmp").glob("*.zip"))


def test_bad_token_401(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, _ = standard_run(gh, payloads)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_WrongTokenValue")
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert_clean_error(info.value, "401", "GITHUB_TOKEN")
    assert "ghp_WrongTokenValue" not in str(info.value)


def test_missing_token_401_says_a_token_is_needed(gh: GitHubEmulator, payloads: dict[str, Path],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, _ = standard_run(gh, payloads)
    monkeypatch.delenv("GITHUB_TOKEN")
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert_clean_error(info.value, "needs a token", "GITHUB_TOKEN or GH_TOKEN", "Actions: read")
    assert all(not had_auth for _, _, had_auth in gh.api_log)  # listing went anonymously


def test_gh_token_is_used_too(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, qcow2 = standard_run(gh, payloads)
    monkeypatch.delenv("GITHUB_TOKEN")
    monkeypatch.setenv("GH_TOKEN", TOKEN)
    Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert gh.full_downloads(qcow2) == 1


def test_forbidden_403_names_the_scope(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path) -> None:
    run, _, _ = standard_run(gh, payloads)
    gh.token_forbidden = True
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert_clean_error(info.value, "403", "public_repo", "Actions: read", "actions: read")


def test_unknown_run_404(gh: GitHubEmulator, tmp_path: Path) -> None:
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run="999999")).bundle()
    assert_clean_error(info.value, "404", "run 999999", "--device-github-repo")


@pytest.mark.parametrize("status", [403, 429])
def test_rate_limit_names_the_reset_time(gh: GitHubEmulator, tmp_path: Path, status: int) -> None:
    reset = int(time.time()) + 1234
    gh.prs[7] = SHA
    gh.faults.append(Fault(r"/pulls/7$", status, {"X-RateLimit-Remaining": "0",
                                                  "X-RateLimit-Reset": str(reset)}))
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_pr="7")).bundle()
    expected = time.strftime("%H:%M:%S UTC", time.gmtime(reset))
    assert_clean_error(info.value, "rate limit", expected)


def test_no_run_for_the_pr(gh: GitHubEmulator, payloads: dict[str, Path], tmp_path: Path) -> None:
    gh.prs[5] = "c" * 40
    gh.add_run("c" * 40, status="in_progress", conclusion="")
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_pr="5")).bundle()
    assert_clean_error(info.value, "pull request #5", "cccccccccccc", "in_progress", "pr-build-artifacts.yaml")


def test_ambiguous_prefix_lists_candidates(gh: GitHubEmulator, payloads: dict[str, Path],
                                          tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "agent-images-bundle-cs9-bootc-t", payloads["bundle"])
    gh.add_artifact(run, "agent-images-bundle-cs10-bootc-t", payloads["bundle"])
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).bundle()
    assert_clean_error(info.value, "agent-images-bundle-cs9-bootc-t", "agent-images-bundle-cs10-bootc-t",
                       "longer prefix")
    path = Artifacts(settings(gh, tmp_path, github_run=str(run.id),
                              bundle_artifact="agent-images-bundle-cs10")).bundle()
    assert digest(path) == digest(payloads["bundle"])


def test_missing_artifact_lists_what_the_run_has(gh: GitHubEmulator, tmp_path: Path) -> None:
    run = gh.add_run(SHA)
    gh.add_artifact(run, "logs", b"x")
    with pytest.raises(GitHubError) as info:
        Artifacts(settings(gh, tmp_path, github_run=str(run.id))).qcow2()
    assert_clean_error(info.value, "agent-qcow2-image", "logs", "--device-qcow2-artifact")


def test_fixture_error_shows_cause_without_token(gh: GitHubEmulator, payloads: dict[str, Path],
                                                tmp_path: Path, pytester: pytest.Pytester) -> None:
    run, _, _ = standard_run(gh, payloads)
    gh.token_forbidden = True
    pytester.makepyfile("""
        def test_disk(agent_qcow2):
            pass
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device-github-run", str(run.id),
                                           "--device-github-api-url", gh.api_url,
                                           "--device-cache-dir", str(tmp_path / "cache"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*refused the download of artifact agent-qcow2-image*(403)*"])
    assert TOKEN not in result.stdout.str() + result.stderr.str()


def test_level_1_and_level_0_zips_extract(tmp_path: Path, payloads: dict[str, Path]) -> None:
    from pytest_flightctl_device.artifacts.sources.zipmember import extract_single

    for level in (0, 1):
        archive = make_artifact_zip(tmp_path / f"l{level}.zip", "agent-images-bundle.tar", payloads["bundle"],
                                    level)
        name, sha = extract_single(archive, tmp_path / f"out{level}", "test")
        assert name == "agent-images-bundle.tar" and sha == digest(payloads["bundle"])
        assert digest(tmp_path / f"out{level}") == sha
