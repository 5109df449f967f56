"""sources/http against real HTTP servers on 127.0.0.1: redirects, Range resume, retries, servers ignoring Range."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.artifacts.sources.http import (
    FileSink,
    Transfer,
    backoff_delay,
    fetch_range,
    new_session,
)
from pytest_flightctl_device.errors import ArtifactError
from tests.support.helpers import serving

BODY = os.urandom(3 << 20)
SHA = hashlib.sha256(BODY).hexdigest()


@dataclass
class Seen:
    path: str
    range: str | None
    if_range: str | None
    authorization: str | None


@dataclass
class Behaviour:
    body: bytes = BODY
    etag: str = '"v1"'
    ignore_range: bool = False
    statuses: list[int] = field(default_factory=list)  # answer the next requests with these, in order
    cut_after: list[int | None] = field(default_factory=list)  # close the next bodies after N bytes
    redirect: str | None = None  # answer /start with a 302 here


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.behaviour = Behaviour()
        self.seen: list[Seen] = []
        self.times: list[float] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        how = server.behaviour
        server.seen.append(Seen(self.path, self.headers.get("Range"), self.headers.get("If-Range"),
                                self.headers.get("Authorization")))
        server.times.append(time.monotonic())
        if how.redirect and self.path.startswith("/start"):
            self.send_response(302)
            self.send_header("Location", how.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if how.statuses:
            status = how.statuses.pop(0)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(how.body) - 1
        wanted = self.headers.get("Range")
        found = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted or "")
        ranged = found is not None and not how.ignore_range
        if ranged and found is not None:
            if found.group(1):
                start = int(found.group(1))
                end = min(int(found.group(2)), end) if found.group(2) else end
            else:
                start = max(0, len(how.body) - int(found.group(2)))
            if self.headers.get("If-Range") not in (None, how.etag):
                ranged, start, end = False, 0, len(how.body) - 1
        data = how.body[start:end + 1]
        self.send_response(206 if ranged else 200)
        self.send_header("ETag", how.etag)
        self.send_header("Content-Length", str(len(data)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(how.body)}")
        self.end_headers()
        cut = how.cut_after.pop(0) if how.cut_after else None
        try:
            self.wfile.write(data if cut is None else data[:cut])
        except (BrokenPipeError, ConnectionResetError):
            return
        if cut is not None:
            self.close_connection = True


@pytest.fixture
def servers() -> Iterator[tuple[Server, Server]]:
    """Two loopback origins: one that redirects (an API), one that serves (a blob host)."""
    made = (Server(), Server())
    with serving(made[0]), serving(made[1]):
        yield made


def download(url: str, dest: Path, **options: Any) -> tuple[str, Transfer]:
    with new_session() as session:
        transfer = Transfer(session, lambda: url, FileSink(dest, trusted_partial=options.pop("trusted", False)),
                            "test", backoff=options.pop("backoff", 0.0), **options)
        return transfer.run(), transfer


def test_a_redirect_to_another_host_carries_no_authorization(servers: tuple[Server, Server], tmp_path: Path) -> None:
    api, blob = servers
    api.behaviour.redirect = f"{blob.url}/blob.zip?sig=s3cret"
    with new_session() as session:
        session.headers["Authorization"] = "Bearer must-not-travel"  # even a careless caller's header
        transfer = Transfer(session, lambda: f"{api.url}/start", FileSink(tmp_path / "out"), "test")
        session.headers.pop("Authorization")
        digest = transfer.run()
    assert digest == SHA and (tmp_path / "out").read_bytes() == BODY
    assert [s.path for s in blob.seen] == ["/blob.zip?sig=s3cret"]
    assert all(s.authorization is None for s in api.seen + blob.seen)


def test_a_signed_redirect_from_the_github_api_drops_the_token(servers: tuple[Server, Server],
                                                               tmp_path: Path) -> None:
    """The token goes to the API's origin only; the blob host never sees it, resumes included."""
    from pytest_flightctl_device.artifacts.sources.github import Artifact, GitHubClient, SignedUrl

    api, blob = servers
    api.behaviour.redirect = f"{blob.url}/blob.zip?sig=s3cret"
    client = GitHubClient(api.url, "o/r", "ghp_secret", backoff=0.0)
    artifact = Artifact(1, "a", len(BODY), None, False, "never", f"{api.url}/start", 5)
    blob.behaviour.cut_after = [1 << 20]
    with new_session() as session:
        digest = Transfer(session, SignedUrl(client, artifact).user(), FileSink(tmp_path / "out"), "test",
                          expected_size=len(BODY), refreshable=True, backoff=0.0).run()
    assert digest == SHA
    assert [s.authorization for s in api.seen] == ["Bearer ghp_secret"] * 2  # a fresh redirect after the drop
    assert [(s.range, s.authorization) for s in blob.seen] == [(None, None), (f"bytes={1 << 20}-", None)]


def test_a_dropped_body_resumes_with_range(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, blob = servers
    blob.behaviour.cut_after = [700_000, 1_500_000]
    digest, transfer = download(f"{blob.url}/f", tmp_path / "out", expected_size=len(BODY))
    assert digest == SHA and (tmp_path / "out").read_bytes() == BODY
    assert [s.range for s in blob.seen] == [None, "bytes=700000-", "bytes=2200000-"]
    assert transfer.requests_made == 3
    assert not (tmp_path / "out.json").exists()  # the validator is forgotten once complete


def killed(dest: Path, blob: Server) -> None:
    """What a process killed after the first MiB leaves: the partial file and, beside it, the validator."""
    dest.write_bytes(BODY[:1 << 20])
    (dest.parent / (dest.name + ".json")).write_text(json.dumps({"validator": blob.behaviour.etag}))


def test_a_later_process_resumes_a_partial_file_with_if_range(servers: tuple[Server, Server],
                                                              tmp_path: Path) -> None:
    _, blob = servers
    killed(tmp_path / "out", blob)
    digest, _ = download(f"{blob.url}/f", tmp_path / "out", expected_size=len(BODY))
    assert digest == SHA
    assert (blob.seen[-1].range, blob.seen[-1].if_range) == (f"bytes={1 << 20}-", '"v1"')


def test_a_changed_file_restarts_from_zero(servers: tuple[Server, Server], tmp_path: Path) -> None:
    """If-Range with the old ETag: the server sends the new whole file (200), taken from byte 0."""
    _, blob = servers
    killed(tmp_path / "out", blob)
    blob.behaviour.body, blob.behaviour.etag = BODY[::-1], '"v2"'
    digest, _ = download(f"{blob.url}/f", tmp_path / "out", expected_size=len(BODY))
    assert digest == hashlib.sha256(BODY[::-1]).hexdigest()
    assert (tmp_path / "out").read_bytes() == BODY[::-1]


def test_a_server_that_ignores_range_restarts_from_zero(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, blob = servers
    blob.behaviour.ignore_range = True
    blob.behaviour.cut_after = [1 << 20]
    digest, _ = download(f"{blob.url}/f", tmp_path / "out", expected_size=len(BODY))
    assert digest == SHA and (tmp_path / "out").read_bytes() == BODY
    assert [s.range for s in blob.seen] == [None, f"bytes={1 << 20}-"]  # asked, got the whole file again


def test_a_server_that_ignores_range_and_always_cuts_gives_up(servers: tuple[Server, Server],
                                                             tmp_path: Path) -> None:
    """No progress past the high-water mark counts as a failure: it ends instead of looping forever."""
    _, blob = servers
    blob.behaviour.ignore_range = True
    blob.behaviour.cut_after = [1 << 20] * 20
    with pytest.raises(ArtifactError, match="failed 4 times in a row"):
        download(f"{blob.url}/f", tmp_path / "out", expected_size=len(BODY), attempts=4)
    assert len(blob.seen) == 5  # the first cut is progress, then four without any


def test_backoff_doubles_from_the_base_and_is_capped() -> None:
    assert [backoff_delay(n, 0.5) for n in range(6)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(50, 0.5) == 30.0 and backoff_delay(3, 20.0, cap=45.0) == 45.0


def test_retries_wait_within_the_backoff_bounds(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, blob = servers
    blob.behaviour.statuses = [503, 502, 429]
    digest, _ = download(f"{blob.url}/f", tmp_path / "out", backoff=0.1)
    assert digest == SHA
    gaps = [later - earlier for earlier, later in zip(blob.times, blob.times[1:], strict=False)]
    for gap, delay in zip(gaps, (0.1, 0.2, 0.4), strict=True):
        assert delay <= gap < delay + 0.5, f"waited {gap:.3f} s where the back-off says {delay} s"


def test_retries_end_after_the_attempts(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, blob = servers
    blob.behaviour.statuses = [503] * 10
    with pytest.raises(ArtifactError, match="failed 3 times in a row") as info:
        download(f"{blob.url}/f?sig=s3cret", tmp_path / "out", attempts=3)
    assert "s3cret" not in str(info.value) and len(blob.seen) == 3


def test_a_client_error_is_not_retried(servers: tuple[Server, Server], tmp_path: Path) -> None:
    _, blob = servers
    blob.behaviour.statuses = [404]
    with pytest.raises(ArtifactError, match="answered HTTP 404"):
        download(f"{blob.url}/f", tmp_path / "out", attempts=5)
    assert len(blob.seen) == 1


def test_ranged_reads(servers: tuple[Server, Server]) -> None:
    _, blob = servers
    with new_session() as session:
        assert fetch_range(session, lambda: f"{blob.url}/f", 10, 19, "t") == (BODY[10:20], 10, len(BODY))
        assert fetch_range(session, lambda: f"{blob.url}/f", None, 100, "t") == (
            BODY[-100:], len(BODY) - 100, len(BODY))
        blob.behaviour.statuses = [503]
        assert fetch_range(session, lambda: f"{blob.url}/f", 0, 0, "t", backoff=0.0) == (BODY[:1], 0, len(BODY))
        blob.behaviour.ignore_range = True
        assert fetch_range(session, lambda: f"{blob.url}/f", 10, 19, "t") is None


def test_an_expired_signed_url_is_refreshed_for_a_ranged_read(servers: tuple[Server, Server]) -> None:
    _, blob = servers
    blob.behaviour.statuses = [403]
    asked: list[int] = []

    def url() -> str:
        asked.append(1)
        return f"{blob.url}/f?n={len(asked)}"

    with new_session() as session:
        got = fetch_range(session, url, 0, 9, "t", refreshable=True, backoff=0.0)
    assert got == (BODY[:10], 0, len(BODY)) and len(asked) == 2
    assert [s.path for s in blob.seen] == ["/f?n=1", "/f?n=2"]
