"""`flightctl-device fetch` and `flightctl-device cache` against the loopback GitHub emulator."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_artifacts_github import make_bundle
from tests.support.github_emulator import TOKEN, GitHubEmulator
from tests.support.helpers import require_tool

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def gh(tmp_path: Path) -> Iterator[GitHubEmulator]:
    work = tmp_path / "emulator"
    work.mkdir()
    with GitHubEmulator(work) as emulator:
        yield emulator
    assert emulator.auth_leaks == []


def cli(*args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FLIGHTCTL_DEVICE_") and k not in ("GITHUB_TOKEN", "GH_TOKEN")}
    if token:
        env["GITHUB_TOKEN"] = token
    result = subprocess.run([sys.executable, "-m", "pytest_flightctl_device.cli", *args], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert TOKEN not in result.stdout + result.stderr
    return result


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fetch_then_cache_ls_verify_prune(gh: GitHubEmulator, tmp_path: Path) -> None:
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(qcow2), "32M"], check=True)
    bundle = make_bundle(tmp_path / "bundle.tar", payload_mib=1)
    run = gh.add_run("a" * 40)
    gh.add_artifact(run, "agent-images-bundle-cs9-t", bundle, member="agent-images-bundle.tar")
    gh.add_artifact(run, "agent-qcow2-image-cs9-t", qcow2, member="disk.qcow2", level=1)
    cache_dir = str(tmp_path / "cache")
    out = tmp_path / "out"

    result = cli("fetch", "--run", str(run.id), "--api-url", gh.api_url, "--cache-dir", cache_dir,
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sha(out / "agent-images-bundle.tar") == sha(bundle) and sha(out / "agent-qcow2-image.qcow2") == sha(qcow2)
    assert "bundle: " in result.stdout and "qcow2: " in result.stdout
    cold = len(gh.blob_log)
    assert len({request.artifact_id for request in gh.blob_log}) == 2  # both artifacts were downloaded

    again = cli("fetch", "--run", str(run.id), "--api-url", gh.api_url, "--cache-dir", cache_dir)
    assert again.returncode == 0 and len(gh.blob_log) == cold  # warm: nothing downloaded

    listing = cli("cache", "ls", "--cache-dir", cache_dir)
    assert listing.returncode == 0 and "2 artifact(s)" in listing.stdout and "agent-qcow2-image-cs9-t" in listing.stdout

    assert cli("cache", "verify", "--cache-dir", cache_dir).returncode == 0
    victim = next(p for p in (tmp_path / "cache" / "objects").glob("*/*.tar"))
    victim.chmod(0o644)
    victim.write_bytes(b"tampered")
    verify = cli("cache", "verify", "--cache-dir", cache_dir)
    assert verify.returncode == 1 and "removed" in verify.stdout and "1 of 2" in verify.stdout

    prune = cli("cache", "prune", "--max-gb", "0", "--cache-dir", cache_dir)
    assert prune.returncode == 0 and "1 artifact(s) removed" in prune.stdout
    assert "0 artifact(s)" in cli("cache", "ls", "--cache-dir", cache_dir).stdout


def test_fetch_url(tmp_path: Path, gh: GitHubEmulator) -> None:
    """A plain URL: the emulator's blob host stands in for any web server (it needs a signed URL)."""
    bundle = make_bundle(tmp_path / "bundle.tar", payload_mib=1)
    run = gh.add_run("a" * 40)
    artifact = gh.add_artifact(run, "x", b"", raw_zip=bundle.read_bytes())  # serve the tar as is
    url = gh.sign(artifact.id)
    result = cli("fetch", "--url", url, "--kind", "bundle", "--sha256", sha(bundle),
                 "--cache-dir", str(tmp_path / "cache"), token=None)
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.split("bundle: ", 1)[1].strip())
    assert sha(path) == sha(bundle)
    assert "sig=" not in result.stdout  # the signed query string is not echoed (cache ls shows no query)
    assert "sig=" not in cli("cache", "ls", "--cache-dir", str(tmp_path / "cache")).stdout


def test_fetch_error_is_one_line_without_token(gh: GitHubEmulator, tmp_path: Path) -> None:
    result = cli("fetch", "--run", "4242", "--api-url", gh.api_url, "--cache-dir", str(tmp_path / "c"))
    assert result.returncode == 1
    assert result.stderr.startswith("flightctl-device: GitHub found no artifacts of run 4242")
    assert len(result.stderr.strip().splitlines()) == 1
