"""A loopback GitHub emulator for the artifacts tests: a fake of GitHub, which cannot be reached here.

Two real HTTP servers on 127.0.0.1, like GitHub's: the REST API on one port and the blob host
on another. The API answers the calls the plugin makes (pulls, commits, workflow runs,
artifacts with Link pagination, the 302 to a signed blob URL); the blob host serves the zips
with Range support and refuses expired signatures. Zips are written like upload-artifact v4
(one entry, streamed with a data descriptor, level 0 or 1). Faults are injected per test, and
every request is recorded so tests can count downloads and check headers; the blob host
records any Authorization header it sees in `auth_leaks`.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import threading
import time
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "ghp_EmulatorSecretToken0123456789abcdefXYZ"
_SECRET = os.urandom(16)


class _Unseekable(io.RawIOBase):
    """A write-only stream without tell/seek, so zipfile writes data descriptors (as archiver does)."""

    def __init__(self, handle: io.BufferedWriter) -> None:
        self.handle = handle

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self.handle.write(data)

    def seekable(self) -> bool:
        return False

    def tell(self) -> int:
        raise OSError("unseekable")


def make_artifact_zip(zip_path: Path, member: str, payload: Path | bytes, level: int = 0) -> Path:
    """A zip like upload-artifact v4: one entry, data descriptor, stored (0) or deflated (1-9)."""
    compression = zipfile.ZIP_STORED if level == 0 else zipfile.ZIP_DEFLATED
    with (
        zip_path.open("wb") as raw,
        zipfile.ZipFile(_Unseekable(raw), "w", compression, compresslevel=level or None) as archive,
        archive.open(member, "w", force_zip64=False) as out,
    ):
        if isinstance(payload, bytes):
            out.write(payload)
        else:
            with payload.open("rb") as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
    return zip_path


@dataclass
class EmuArtifact:
    id: int
    name: str
    run_id: int
    zip_path: Path
    digest: str | None
    expired: bool = False
    expires_at: str = "2030-01-01T00:00:00Z"


@dataclass
class EmuRun:
    id: int
    head_sha: str
    head_branch: str
    status: str = "completed"
    conclusion: str = "success"


@dataclass
class Fault:
    """Answer the next `times` API requests whose path matches `pattern` with `status`."""

    pattern: str
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    times: int = 1


@dataclass
class BlobRequest:
    artifact_id: int
    range: str | None
    authorization: str | None
    status: int
    sent: int = 0


class GitHubEmulator:
    """Start with `with GitHubEmulator(tmp) as gh:`; set attributes to inject faults."""

    def __init__(self, workdir: Path, *, token: str = TOKEN, url_ttl: float = 60.0) -> None:
        self.workdir = workdir
        self.token = token
        self.url_ttl = url_ttl
        self.repo = "flightctl/flightctl"
        self.workflow = "pr-build-artifacts.yaml"
        self.runs: dict[int, EmuRun] = {}
        self.artifacts: dict[int, EmuArtifact] = {}
        self.prs: dict[int, str] = {}
        self.commits: dict[str, str] = {}
        self.page_size = 100
        self.faults: list[Fault] = []
        self.token_forbidden = False  # valid token, missing scope: 403 on download
        self.drop_after: dict[int, int] = {}  # artifact id -> close the connection after N body bytes, once
        self.truncate_no_length: dict[int, int] = {}  # id -> no Content-Length, close after N bytes, once
        self.throttle: float | None = None  # blob bytes per second
        self.expire_redirects: set[int] = set()  # ordinals (1 = first) of redirects that hand out expired URLs
        self.ignore_range = False  # a blob host that answers every GET with the whole zip (200)
        self.api_log: list[tuple[str, str, bool]] = []  # (method, path, had Authorization)
        self.blob_log: list[BlobRequest] = []
        self.auth_leaks: list[str] = []
        self.expired_rejections = 0
        self.redirects = 0
        self._lock = threading.Lock()
        self._next_id = 1000
        self._servers: list[ThreadingHTTPServer] = []

    # -- set-up --------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def add_run(self, head_sha: str, *, branch: str = "main", status: str = "completed",
                conclusion: str = "success", run_id: int | None = None) -> EmuRun:
        run = EmuRun(run_id or self._new_id(), head_sha, branch, status, conclusion)
        self.runs[run.id] = run
        return run

    def add_artifact(self, run: EmuRun, name: str, payload: Path | bytes, *, member: str | None = None,
                     level: int = 0, digest: str | None = "auto", expired: bool = False,
                     raw_zip: bytes | None = None) -> EmuArtifact:
        artifact_id = self._new_id()
        zip_path = self.workdir / f"artifact-{artifact_id}.zip"
        if raw_zip is not None:
            zip_path.write_bytes(raw_zip)
        else:
            make_artifact_zip(zip_path, member or f"{name}.bin", payload, level)
        if digest == "auto":
            digest = "sha256:" + _sha256(zip_path)
        artifact = EmuArtifact(artifact_id, name, run.id, zip_path, digest, expired,
                               "2020-01-01T00:00:00Z" if expired else "2030-01-01T00:00:00Z")
        self.artifacts[artifact_id] = artifact
        return artifact

    # -- servers -------------------------------------------------------------------------------

    def __enter__(self) -> GitHubEmulator:
        self.api = self._serve(_ApiHandler)
        self.blob = self._serve(_BlobHandler)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _serve(self, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.emulator = self  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._servers.append(server)
        return server

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api.server_address[1]}"

    @property
    def blob_url(self) -> str:
        return f"http://127.0.0.1:{self.blob.server_address[1]}"

    def sign(self, artifact_id: int, *, expired: bool = False) -> str:
        expires = f"{time.time() + (-1.0 if expired else self.url_ttl):.3f}"
        sig = hmac.new(_SECRET, f"{artifact_id}:{expires}".encode(), "sha256").hexdigest()
        return f"{self.blob_url}/blob/{artifact_id}.zip?se={expires}&sig={sig}"

    def body_requests(self, artifact: EmuArtifact) -> list[BlobRequest]:
        """Blob GETs of this artifact for the body (whole, or resumed with bytes=N-), not ranged reads."""
        return [r for r in self.blob_log if r.artifact_id == artifact.id and (r.range is None or r.range.endswith("-"))]

    def body_bytes(self, artifact: EmuArtifact) -> int:
        return sum(r.sent for r in self.body_requests(artifact))

    def full_downloads(self, artifact: EmuArtifact) -> int:
        """Blob GETs of this artifact that started at byte 0 and were answered with data."""
        return sum(1 for r in self.blob_log
                   if r.artifact_id == artifact.id and r.range in (None, "bytes=0-") and r.status == 200)

    def bytes_served(self, artifact: EmuArtifact) -> int:
        return sum(r.sent for r in self.blob_log if r.artifact_id == artifact.id)

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and re.search(fault.pattern, path):
                    fault.times -= 1
                    return fault
        return None


class _QuietServer(ThreadingHTTPServer):
    """Clients that drop connections on purpose (kill -9, resumes) are not errors worth a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def emu(self) -> GitHubEmulator:
        return self.server.emulator  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def send_json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


class _ApiHandler(_Handler):
    def do_GET(self) -> None:
        emu = self.emu
        parts = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        emu.api_log.append(("GET", self.path, auth is not None))
        limits = {"X-RateLimit-Limit": "5000" if auth else "60", "X-RateLimit-Remaining": "4999",
                  "X-RateLimit-Reset": str(int(time.time()) + 3600)}
        fault = emu.take_fault(parts.path)
        if fault is not None:
            self.send_json(fault.status, {"message": f"emulated {fault.status}"}, {**limits, **fault.headers})
            return
        if auth is not None and auth not in (f"Bearer {emu.token}", f"token {emu.token}"):
            self.send_json(401, {"message": "Bad credentials"}, limits)
            return
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        prefix = f"/repos/{emu.repo}"
        path = parts.path
        if not path.startswith(prefix + "/"):
            self.send_json(404, {"message": "Not Found"}, limits)
            return
        rest = path[len(prefix):]
        if match := re.fullmatch(r"/pulls/(\d+)", rest):
            sha = emu.prs.get(int(match.group(1)))
            if sha is None:
                self.send_json(404, {"message": "Not Found"}, limits)
            else:
                self.send_json(200, {"number": int(match.group(1)), "head": {"sha": sha}}, limits)
        elif match := re.fullmatch(r"/commits/([^/]+)", rest):
            ref = match.group(1)
            sha = emu.commits.get(ref) or next((s for s in emu.commits.values() if s.startswith(ref)), None)
            if sha is None:
                self.send_json(404, {"message": "Not Found"}, limits)
            else:
                self.send_json(200, {"sha": sha}, limits)
        elif match := re.fullmatch(r"/actions/workflows/([^/]+)/runs", rest):
            if match.group(1) != emu.workflow:
                self.send_json(404, {"message": "Not Found"}, limits)
                return
            runs = sorted(emu.runs.values(), key=lambda r: r.id, reverse=True)
            if "head_sha" in query:
                runs = [r for r in runs if r.head_sha == query["head_sha"]]
            if "branch" in query:
                runs = [r for r in runs if r.head_branch == query["branch"]]
            items = [{"id": r.id, "head_sha": r.head_sha, "head_branch": r.head_branch, "status": r.status,
                      "conclusion": r.conclusion, "html_url": f"https://github.com/{emu.repo}/actions/runs/{r.id}"}
                     for r in runs]
            self.send_page(items, "workflow_runs", query, limits)
        elif match := re.fullmatch(r"/actions/runs/(\d+)/artifacts", rest):
            run_id = int(match.group(1))
            if run_id not in emu.runs:
                self.send_json(404, {"message": "Not Found"}, limits)
                return
            items = [self.artifact_json(a) for a in sorted(emu.artifacts.values(), key=lambda a: a.id)
                     if a.run_id == run_id and a.name.startswith(query.get("name", ""))]
            self.send_page(items, "artifacts", query, limits)
        elif match := re.fullmatch(r"/actions/artifacts/(\d+)/zip", rest):
            artifact = emu.artifacts.get(int(match.group(1)))
            if auth is None:
                self.send_json(401, {"message": "Requires authentication"}, limits)
            elif artifact is None:
                self.send_json(404, {"message": "Not Found"}, limits)
            elif emu.token_forbidden:
                self.send_json(403, {"message": "Resource not accessible by personal access token"}, limits)
            elif artifact.expired:
                self.send_json(410, {"message": "Artifact has expired"}, limits)
            else:
                emu.redirects += 1
                self.send_response(302)
                self.send_header("Location", emu.sign(artifact.id, expired=emu.redirects in emu.expire_redirects))
                self.send_header("Content-Length", "0")
                for name, value in limits.items():
                    self.send_header(name, value)
                self.end_headers()
        else:
            self.send_json(404, {"message": "Not Found"}, limits)

    def artifact_json(self, artifact: EmuArtifact) -> dict[str, Any]:
        return {"id": artifact.id, "name": artifact.name, "size_in_bytes": artifact.zip_path.stat().st_size,
                "archive_download_url": f"{self.emu.api_url}/repos/{self.emu.repo}/actions/artifacts/"
                                        f"{artifact.id}/zip",
                "expired": artifact.expired, "expires_at": artifact.expires_at, "digest": artifact.digest,
                "workflow_run": {"id": artifact.run_id, "head_sha": self.emu.runs[artifact.run_id].head_sha}}

    def send_page(self, items: list[dict[str, Any]], key: str, query: dict[str, str],
                  limits: dict[str, str]) -> None:
        per_page = min(int(query.get("per_page", "30")), self.emu.page_size)
        page = int(query.get("page", "1"))
        chunk = items[(page - 1) * per_page: page * per_page]
        headers = dict(limits)
        if page * per_page < len(items):
            rest = {k: v for k, v in query.items() if k != "page"}
            params = "&".join(f"{k}={v}" for k, v in {**rest, "page": str(page + 1)}.items())
            headers["Link"] = f'<{self.emu.api_url}{urlsplit(self.path).path}?{params}>; rel="next"'
        self.send_json(200, {"total_count": len(items), key: chunk}, headers)


class _BlobHandler(_Handler):
    def do_GET(self) -> None:
        emu = self.emu
        parts = urlsplit(self.path)
        auth = self.headers.get("Authorization")
        if auth is not None:
            emu.auth_leaks.append(auth)
        match = re.fullmatch(r"/blob/(\d+)\.zip", parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        artifact = emu.artifacts.get(int(match.group(1))) if match else None
        record = BlobRequest(artifact.id if artifact else -1, self.headers.get("Range"), auth, 0)
        emu.blob_log.append(record)
        if artifact is None:
            record.status = 404
            self.send_json(404, {"message": "BlobNotFound"})
            return
        expected = hmac.new(_SECRET, f"{artifact.id}:{query.get('se', '')}".encode(), "sha256").hexdigest()
        if auth is not None or not hmac.compare_digest(expected, query.get("sig", "")):
            record.status = 400 if auth is not None else 403
            self.send_json(record.status, {"message": "AuthenticationFailed"})
            return
        if float(query["se"]) < time.time():
            emu.expired_rejections += 1
            record.status = 403
            self.send_json(403, {"message": "AuthenticationFailed: signed expiry time has passed"})
            return
        size = artifact.zip_path.stat().st_size
        start, end = 0, size - 1
        if record.range and not emu.ignore_range:  # bytes=N-, bytes=N-M or bytes=-N (the last N bytes)
            found = re.fullmatch(r"bytes=(\d*)-(\d*)", record.range)
            first, last = (found.group(1), found.group(2)) if found else ("", "")
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            elif last:
                start = max(0, size - int(last))
            if not found or not (first or last) or start >= size or start > end:
                record.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        partial = start > 0 or end < size - 1 or bool(record.range and not record.range.endswith("-")
                                                      and not emu.ignore_range)
        record.status = 206 if partial else 200
        limit = end - start + 1
        body = record.range is None or record.range.endswith("-")  # faults hit the body, not ranged reads
        drop = emu.drop_after.pop(artifact.id, None) if body else None
        no_length = emu.truncate_no_length.pop(artifact.id, None) if body else None
        self.send_response(record.status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{artifact.digest}"')
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        if no_length is not None:
            self.send_header("Connection", "close")
            limit = min(limit, no_length)
        else:
            self.send_header("Content-Length", str(limit))
        if drop is not None:
            limit = min(limit, drop)
        self.end_headers()
        record.sent = self.send_file(artifact.zip_path, start, limit)
        if drop is not None or no_length is not None:
            self.close_connection = True

    def send_file(self, path: Path, start: int, count: int) -> int:
        """sendfile() the range; throttled when the test asks, to leave time to interrupt it."""
        sent = 0
        with path.open("rb") as handle:
            while sent < count:
                step = count - sent if self.emu.throttle is None else min(count - sent, 64 * 1024)
                try:
                    done = os.sendfile(self.connection.fileno(), handle.fileno(), start + sent, step)
                except (BrokenPipeError, ConnectionResetError):
                    break
                if done == 0:
                    break
                sent += done
                if self.emu.throttle:
                    time.sleep(done / self.emu.throttle)
        return sent
