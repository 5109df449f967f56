"""Pure helpers of the GitHub source: tokens, artifact records, zip member names, URL redaction, progress."""

from __future__ import annotations

import pytest

from pytest_flightctl_device.artifacts.sources.github import Artifact, GitHubClient, token_from_env
from pytest_flightctl_device.artifacts.sources.http import redact
from pytest_flightctl_device.artifacts.sources.zipmember import safe_name
from pytest_flightctl_device.core.progress import Meter
from pytest_flightctl_device.errors import ArtifactError


def test_token_prefers_github_token_then_gh_token() -> None:
    assert token_from_env({"GITHUB_TOKEN": "a", "GH_TOKEN": "b"}) == "a"
    assert token_from_env({"GITHUB_TOKEN": " ", "GH_TOKEN": "b"}) == "b"
    assert token_from_env({}) is None


def test_client_repr_hides_the_token() -> None:
    assert "s3cret" not in repr(GitHubClient("https://api.github.com", "o/r", "s3cret"))


def test_token_only_for_the_api_origin() -> None:
    client = GitHubClient("https://ghe.example/api/v3", "o/r", "s3cret")
    assert client._headers("https://ghe.example/api/v3/repos/o/r")["Authorization"] == "Bearer s3cret"
    assert "Authorization" not in client._headers("https://blob.example/x?sig=1")
    assert "Authorization" not in client._headers("http://ghe.example/api/v3/repos")  # other scheme


def test_artifact_digest_parsed() -> None:
    artifact = Artifact.from_api({"id": 3, "name": "n", "size_in_bytes": 10, "digest": "sha256:ABC",
                                  "expired": False, "expires_at": "t", "archive_download_url": "u"}, 9)
    assert artifact.digest == "abc" and artifact.run_id == 9
    assert Artifact.from_api({"id": 3, "name": "n", "archive_download_url": "u"}, 9).digest is None


@pytest.mark.parametrize("name", ["../x.tar", "a/../../x", "/etc/passwd", "C:/x", "..\\x"])
def test_escaping_member_names_refused(name: str) -> None:
    with pytest.raises(ArtifactError, match="escape"):
        safe_name(name, "label")


def test_plain_member_names_accepted() -> None:
    assert safe_name("agent-images-bundle.tar", "l") == "agent-images-bundle.tar"
    assert safe_name("dir/disk.qcow2", "l") == "dir/disk.qcow2"


def test_redact_drops_credentials_and_query() -> None:
    assert redact("https://user:pw@host:8443/p/f.tar?sig=abc") == "https://host:8443/p/f.tar"


def test_meter_is_silent_then_rate_limited() -> None:
    now = [0.0]
    lines: list[str] = []
    meter = Meter("x", 100 * 10**6, lines.append, interval=5.0, delay=2.0, clock=lambda: now[0])
    meter.start()
    for _ in range(100):  # 1 MB every 0.1 s: 10 MB/s for 10 s
        now[0] += 0.1
        meter.advance(10**6)
    assert len(lines) == 2  # at 2 s and 7 s: never a flood
    assert "10.0 MB/s" in lines[0] and "%" in lines[0] and "ETA" in lines[0]
    meter.finish()
    assert "done" in lines[-1]


def test_meter_says_nothing_for_a_fast_transfer() -> None:
    lines: list[str] = []
    meter = Meter("x", 10, lines.append, clock=lambda: 0.0)
    meter.start()
    meter.advance(10)
    meter.finish()
    assert lines == []
