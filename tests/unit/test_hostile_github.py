"""A hostile GitHub API: every answer is used correctly or refused with a GitHubError/ArtifactError.

Property-based (hypothesis) over the JSON of the calls the plugin makes (pull request, workflow
runs, run artifacts: missing fields, wrong types, huge pages, deep nesting, non-JSON), over Link
headers (garbage, other origins, broken URLs), over the artifact's redirect Location and the
blob host's answers, and over rate-limit headers. The API is a real HTTP server on 127.0.0.1
whose answers each example sets; it is a fake of GitHub, which cannot be reached here. Every URL
the tests hand out points at 127.0.0.1, so nothing ever leaves this machine; a second loopback
server stands for "another origin" and must never see the token.
"""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.artifacts.sources.github import Artifact, GitHubClient, GitHubSource
from pytest_flightctl_device.errors import ArtifactError, DeviceError, GitHubError
from tests.support.helpers import serving
from tests.support.hostile import BOUNDED, clear_error, jail

TOKEN = "ghp_HostileTestToken_0123456789abcdefABCDEF"
REPO = "o/r"
SHA = "b" * 40
PREFIX = "agent-images-bundle"


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class Server(ThreadingHTTPServer):
    """Answers GET by the first route whose regex matches the path; records (path, Authorization)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: list[tuple[str, Answer]] = []
        self.log: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(self, path: str) -> Answer:
        with self.lock:
            for pattern, answer in self.routes:
                if re.search(pattern, path):
                    return answer
        return Answer(404, {}, b'{"message": "Not Found"}')


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        server: Server = self.server  # type: ignore[assignment]
        server.log.append((self.path, self.headers.get("Authorization")))
        answer = server.answer(self.path.split("?", 1)[0])
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Server, Server]]:
    """(api, other): the fake API and another loopback origin; both stopped at the end."""
    made = (Server(), Server())
    with serving(made[0]), serving(made[1]):
        yield made


def reset(api: Server, other: Server) -> None:
    for server in (api, other):
        server.routes, server.log = [], []


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


def artifact_json(api: Server, artifact_id: int = 11, name: str = f"{PREFIX}-v1", **extra: Any) -> dict[str, Any]:
    return {"id": artifact_id, "name": name, "size_in_bytes": 100, "expired": False,
            "expires_at": "2030-01-01T00:00:00Z", "digest": None,
            "archive_download_url": f"{api.url}/repos/{REPO}/actions/artifacts/{artifact_id}/zip", **extra}


def source(api: Server, root: Path) -> GitHubSource:
    client = GitHubClient(api.url, REPO, TOKEN, attempts=1, backoff=0.0)
    return GitHubSource(client, Cache(root / "cache"), workflow="w.yaml", pr=7,
                        prefixes={"bundle": PREFIX, "qcow2": "agent-qcow2"})


def no_token_elsewhere(other: Server) -> None:
    assert all(auth is None for _path, auth in other.log), "another origin received the token"


# --- JSON shapes of the three listing calls ----------------------------------------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                  max_size=4),
                    max_leaves=10)
KINDS = ["valid", "valid", "valid", "drop", "wrong-type", "json", "not-json", "deep", "huge"]


def mutate(doc: dict[str, Any], data: st.DataObject, paths: list[tuple[Any, ...]]) -> bytes:
    """`doc` (valid) changed at one of `paths` in one hostile way; returns the body to send."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    event(kind)
    if kind == "not-json":
        return data.draw(st.sampled_from([b"", b"<html>rate limited</html>", b"{", b"\xff\xfe", b"null"]))
    if kind == "deep":
        return b"{\"x\": " + b"[" * 20_000 + b"]" * 20_000 + b"}"
    if kind == "json":
        return js(data.draw(JSON))
    if kind == "valid":
        return js(doc)
    path = data.draw(st.sampled_from(paths), label="path")
    parent: Any = doc
    for part in path[:-1]:
        parent = parent[part]
    if kind == "drop":
        if isinstance(parent, dict):
            parent.pop(path[-1], None)
    elif kind == "wrong-type":
        parent[path[-1]] = data.draw(st.sampled_from([None, "12", 1.5, -3, True, [], {}, 1 << 70, "x" * 10000]))
    else:  # huge: a page of many entries
        doc = {**doc, **{k: v * 5000 for k, v in doc.items() if isinstance(v, list)}}
    return js(doc)


@BOUNDED
@given(data=st.data())
def test_listing_json_shapes(servers: tuple[Server, Server], data: st.DataObject) -> None:
    api, other = servers
    reset(api, other)
    run = {"id": 5, "status": "completed", "conclusion": "success", "head_sha": SHA}
    pr_body = mutate({"number": 7, "head": {"sha": SHA}}, data, [("head",), ("head", "sha"), ("number",)])
    runs_body = mutate({"total_count": 1, "workflow_runs": [run]}, data,
                       [("workflow_runs",), ("workflow_runs", 0), ("workflow_runs", 0, "id"),
                        ("workflow_runs", 0, "status")])
    arts_body = mutate({"total_count": 1, "artifacts": [artifact_json(api)]}, data,
                       [("artifacts",), ("artifacts", 0), *[("artifacts", 0, key) for key in artifact_json(api)]])
    api.routes = [(r"/pulls/7$", Answer(200, {}, pr_body)),
                  (r"/actions/workflows/w\.yaml/runs$", Answer(200, {}, runs_body)),
                  (r"/actions/runs/\d+/artifacts$", Answer(200, {}, arts_body))]
    with jail("cache") as root:
        try:
            artifact = source(api, root).artifact("bundle")
        except DeviceError as exc:
            clear_error(exc, TOKEN)
            event("refused")
            return
    event("accepted")
    assert isinstance(artifact, Artifact) and artifact.name.startswith(PREFIX) and not artifact.expired
    assert isinstance(artifact.id, int) and artifact.id > 0 and isinstance(artifact.size, int)
    assert artifact.size >= 0 and isinstance(artifact.download_url, str) and artifact.run_id > 0
    no_token_elsewhere(other)


def test_a_valid_listing_is_accepted(servers: tuple[Server, Server], tmp_path: Path) -> None:
    """The baseline the hostile cases are measured against: the unchanged answers work."""
    api, other = servers
    reset(api, other)
    run = {"id": 5, "status": "completed", "conclusion": "success"}
    api.routes = [(r"/pulls/7$", Answer(200, {}, js({"head": {"sha": SHA}}))),
                  (r"/runs$", Answer(200, {}, js({"workflow_runs": [run]}))),
                  (r"/artifacts$", Answer(200, {}, js({"artifacts": [artifact_json(api)]})))]
    artifact = source(api, tmp_path).artifact("bundle")
    assert (artifact.id, artifact.run_id, artifact.size) == (11, 5, 100)


# --- Link headers ------------------------------------------------------------------------------


def link_targets(api: Server, other: Server) -> st.SearchStrategy[str]:
    port = api.server_address[1]
    loopback = [f"{api.url}/repos/{REPO}/actions/runs/5/artifacts?page=2", "?page=2", "/repos/o/r/x",
                f"{other.url}/steal?page=2", f"http://127.0.0.2:{port}/x", f"https://127.0.0.1:{port}/x",
                f"ftp://127.0.0.1:{port}/x", "http://[::1", f"http://127.0.0.1:{port}abc/x",
                f"//127.0.0.1:{other.server_address[1]}/x", "file:///etc/passwd", "javascript:alert(1)",
                " ", f"{api.url}/repos/{REPO}/actions/runs/5/artifacts"]  # the last one: a loop
    return st.sampled_from(loopback) | st.text(alphabet="/?=&%._-0123456789abcdefpage ", max_size=30)


@BOUNDED
@given(data=st.data())
def test_link_headers(servers: tuple[Server, Server], data: st.DataObject) -> None:
    api, other = servers
    reset(api, other)
    target = data.draw(link_targets(api, other))
    header = data.draw(st.sampled_from([f'<{target}>; rel="next"', f"<{target}>", f'{target}; rel="next"',
                                        f'<{target}>; rel="next", <{target}>; rel="last"',
                                        f'<{target}>;rel="next"' * 3]))
    page = js({"artifacts": [artifact_json(api)]})
    api.routes = [(r"/actions/runs/5/artifacts$", Answer(200, {"Link": header}, page)),
                  (r"", Answer(200, {}, js({"artifacts": []})))]
    other.routes = [(r"", Answer(200, {}, js({"artifacts": [artifact_json(api, 12, f"{PREFIX}-evil")]})))]
    client = GitHubClient(api.url, REPO, TOKEN, attempts=1, backoff=0.0)
    try:
        artifacts = client.artifacts(5)
    except DeviceError as exc:
        clear_error(exc, TOKEN)
        event("refused")
    else:
        event("accepted")
        assert artifacts and all(a.id == 11 for a in artifacts), "took artifacts from another origin"
        assert len(artifacts) <= 10  # pages are bounded even when the next link loops
    assert other.log == [], "followed a next link to another origin"
    no_token_elsewhere(other)


# --- the artifact's redirect and the blob host's answers -----------------------------------------


def zipped(payload: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("agent-images-bundle.tar", payload)
    return out.getvalue()


BLOB_ANSWERS = st.sampled_from([
    Answer(200, {}, b"not a zip at all"),
    Answer(200, {}, zipped(b"not a tar")),
    Answer(206, {"Content-Range": "bytes 0-1/2"}, b"PK"),
    Answer(206, {"Content-Range": "garbage"}, b"PK"),
    Answer(416, {}, b""),
    Answer(404, {}, b""),
    Answer(302, {"Location": "/blob/loop"}, b""),
    Answer(302, {"Location": "ftp://127.0.0.1/x"}, b""),
    Answer(302, {"Location": "http://[::1"}, b""),
    Answer(200, {"Content-Encoding": "gzip"}, b"\x1f\x8b garbage"),
    Answer(200, {"ETag": "W/\"weak\"", "Last-Modified": "yesterday"}, zipped(b"x" * 100)),
])


@BOUNDED
@given(data=st.data())
def test_redirects_and_blob_answers(servers: tuple[Server, Server], data: st.DataObject) -> None:
    api, other = servers
    reset(api, other)
    location = data.draw(st.sampled_from([
        f"{other.url}/blob/1.zip?sig=s3cret", "/blob/1.zip", "", " ", "ftp://127.0.0.1/x", "http://[::1",
        f"http://127.0.0.1:{other.server_address[1]}abc/x", "file:///etc/passwd", f"{other.url}/blob/loop",
    ]))
    blob = data.draw(BLOB_ANSWERS)
    size = data.draw(st.sampled_from([0, 100, 2, 1 << 40]))
    api.routes = [(r"/artifacts/11/zip$", Answer(302, {"Location": location} if location else {}, b"")),
                  (r"/blob/", blob)]
    other.routes = [(r"/blob/", blob)]
    artifact = Artifact.from_api(artifact_json(api, size_in_bytes=size), 5)
    with jail("cache") as root:
        github = source(api, root)
        github._run_id, github._artifacts = 5, {5: [artifact]}
        try:
            path = github.fetch("bundle")
        except DeviceError as exc:
            clear_error(exc, TOKEN, "s3cret")
            assert isinstance(exc, ArtifactError)
            event("refused")
        else:  # nothing here is a real bundle: accepting one would be a bug
            pytest.fail(f"accepted {path}")
    no_token_elsewhere(other)


# --- status codes and rate-limit headers ---------------------------------------------------------


@BOUNDED
@given(status=st.sampled_from([401, 403, 404, 410, 418, 429, 451, 302]),
       headers=st.dictionaries(st.sampled_from(["X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Limit",
                                                "Retry-After", "Location"]),
                               st.sampled_from(["0", "9" * 40, "-1", "1e9", "", "١٢٣", "60", "x" * 5000,
                                                "http://[::1"]), max_size=5))
def test_error_statuses_and_headers(servers: tuple[Server, Server], status: int, headers: dict[str, str]) -> None:
    api, other = servers
    reset(api, other)
    api.routes = [(r"/pulls/7$", Answer(status, headers, js({"message": "no"})))]
    client = GitHubClient(api.url, REPO, TOKEN, attempts=1, backoff=0.0)
    with pytest.raises(DeviceError) as caught:
        client.pr_head_sha(7)
    clear_error(caught.value, TOKEN)
    assert isinstance(caught.value, GitHubError)
    assert len(str(caught.value)) < 600, "a header value was echoed into the message"
