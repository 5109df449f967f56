"""Artifacts of a GitHub Actions run: run/PR/ref -> run -> artifact -> verified file in the cache.

The token (GITHUB_TOKEN or GH_TOKEN) goes only to the API origin, added per request, never to
the session, so the 302 to the blob host and any request to it carry no Authorization header.
No message of this module contains the token or a signed URL.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.artifacts.sources.http import (
    FileSink,
    MeterFactory,
    Transfer,
    fetch_range,
    new_session,
    redact,
    redirect_target,
)
from pytest_flightctl_device.artifacts.sources.zipmember import (
    TAIL,
    MemberSink,
    Plan,
    check_room,
    extract_single,
    read_plan,
)
from pytest_flightctl_device.core.formats import FORMATS
from pytest_flightctl_device.errors import ArtifactError, GitHubError
from pytest_flightctl_device.settings import Settings

TOKEN_ENVS = ("GITHUB_TOKEN", "GH_TOKEN")
_SCOPES = ("a classic token needs the repo scope (public_repo for a public repository), a fine-grained "
           "token needs Actions: read on the repository, a workflow token needs `permissions: actions: read`")


def token_from_env(env: dict[str, str] | None = None) -> str | None:
    env = dict(os.environ) if env is None else env
    for name in TOKEN_ENVS:
        value = env.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class Artifact:
    """One artifact of a run, as the API lists it."""

    id: int
    name: str
    size: int
    digest: str | None
    expired: bool
    expires_at: str
    download_url: str
    run_id: int

    @classmethod
    def from_api(cls, data: object, run_id: int) -> Artifact:
        """An artifact record as the API lists it; GitHubError when a field has the wrong type."""
        if not isinstance(data, dict):
            raise _unexpected(f"an artifact of run {run_id}", f"a {type(data).__name__} instead of an object")
        artifact_id, name = data.get("id"), data.get("name")
        url, size = data.get("archive_download_url"), data.get("size_in_bytes")
        digest, expired = data.get("digest"), data.get("expired")
        problem = (
            "no numeric id" if not _is_count(artifact_id) or artifact_id == 0 else
            "no name" if not isinstance(name, str) or not name else
            "no archive_download_url" if not isinstance(url, str) or not url else
            "a size_in_bytes that is not a byte count" if size is not None and not _is_count(size) else
            "a digest that is not a string" if digest is not None and not isinstance(digest, str) else
            "an expired flag that is not true or false" if expired is not None and not isinstance(expired, bool)
            else None)
        if problem is not None:
            raise _unexpected(f"an artifact of run {run_id}", problem)
        assert isinstance(artifact_id, int) and isinstance(name, str) and isinstance(url, str)
        expires_at = data.get("expires_at")
        return cls(id=artifact_id, name=name, size=int(size or 0),
                   digest=digest.lower().removeprefix("sha256:") if digest else None,
                   expired=bool(expired), expires_at=expires_at if isinstance(expires_at, str) else "unknown",
                   download_url=url, run_id=run_id)


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (bool is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _names(names: Iterable[str], shown: int = 5) -> str:
    """A few names for an error message ("a, b, c and 97 more"), each cut to a sane length."""
    listed = list(names)
    text = ", ".join(name if len(name) <= 100 else name[:100] + "..." for name in listed[:shown])
    return text + (f" and {len(listed) - shown} more" if len(listed) > shown else "")


def _unexpected(what: str, problem: str) -> GitHubError:
    return GitHubError(f"GitHub's answer for {what} has {problem}; check --device-github-api-url "
                       "(is it a GitHub API?) and try again.")


def _commit_hash(value: object, what: str, field: str) -> str:
    """A 40-hex commit hash from an API answer; GitHubError saying what came instead."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{40}", value):
        return value.lower()
    if value is None:
        raise _unexpected(what, f"no {field}")
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:60] + "..."
    raise _unexpected(what, f"a {field} {shown} that is not a 40-hex commit hash")


def _reset_time(response: requests.Response) -> str:
    reset = response.headers.get("X-RateLimit-Reset", "")
    if reset.isascii() and reset.isdigit() and len(reset) <= 12:
        try:
            return datetime.fromtimestamp(int(reset), UTC).strftime("%H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):
            pass
    return "an unknown time"


class GitHubClient:
    """The few REST calls this plugin needs, with retries on 5xx and dropped connections."""

    def __init__(self, api_url: str, repo: str, token: str | None, *,
                 session: requests.Session | None = None, attempts: int = 5, backoff: float = 0.5) -> None:
        self.api_url = api_url.rstrip("/")
        self.repo = repo
        self._token = token
        self.session = session or new_session()
        self.attempts = attempts
        self.backoff = backoff
        origin = urlsplit(self.api_url)
        self._origin = (origin.scheme, origin.netloc)

    def __repr__(self) -> str:  # never show the token
        return f"GitHubClient({self.api_url!r}, {self.repo!r}, token={'set' if self._token else 'none'})"

    def _headers(self, url: str) -> dict[str, str]:
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"}
        parts = urlsplit(url)
        if self._token and (parts.scheme, parts.netloc) == self._origin:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def get(self, path: str, what: str, params: dict[str, Any] | None = None,
            ok: tuple[int, ...] = (200,)) -> requests.Response:
        """GET an API path (or absolute API URL); GitHubError naming `what` unless the status is in `ok`."""
        url = path if path.startswith(("http://", "https://")) else f"{self.api_url}{path}"
        last = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                response = self.session.get(url, params=params, headers=self._headers(url),
                                            allow_redirects=False, timeout=(15.0, 60.0))
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = type(exc).__name__
                continue
            except (requests.RequestException, ValueError) as exc:  # a URL requests cannot use
                raise GitHubError(f"cannot ask GitHub for {what} at {redact(url)} ({type(exc).__name__}); "
                                  "check --device-github-api-url.") from None
            if response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                response.close()
                continue
            if response.status_code in ok:
                return response
            raise self._error(response, what)
        raise GitHubError(
            f"GitHub API {self.api_url} did not answer {what} ({last}) after {self.attempts} attempts; "
            "check the network or --device-github-api-url and try again."
        )

    def _error(self, response: requests.Response, what: str) -> GitHubError:
        status = response.status_code
        remaining = response.headers.get("X-RateLimit-Remaining")
        if status == 429 or (status == 403 and remaining == "0"):
            limit = response.headers.get("X-RateLimit-Limit", "?").strip()
            limit = limit if limit.isascii() and limit.isdigit() and len(limit) < 10 else "?"
            hint = "" if self._token else "; set GITHUB_TOKEN or GH_TOKEN for 5000 requests/hour"
            return GitHubError(
                f"GitHub API rate limit ({limit} requests/hour) is used up while asking for {what}; "
                f"it resets at {_reset_time(response)}{hint}."
            )
        if status == 403 and response.headers.get("Retry-After"):
            after = response.headers["Retry-After"].strip()
            wait = f"wait {after} s" if after.isascii() and after.isdigit() and len(after) < 8 else "wait"
            return GitHubError(f"GitHub's secondary rate limit stopped {what}; {wait} and run again.")
        if status == 401:
            if self._token:
                return GitHubError(
                    f"GitHub rejected the token from GITHUB_TOKEN/GH_TOKEN (401) for {what}; "
                    "it is invalid or expired: set a valid token."
                )
            return GitHubError(
                f"GitHub needs a token for {what} (401), even for a public repository; set GITHUB_TOKEN "
                f"or GH_TOKEN ({_SCOPES})."
            )
        if status == 403:
            token = "the token in GITHUB_TOKEN/GH_TOKEN" if self._token else "an anonymous request"
            return GitHubError(f"GitHub refused {what} for {token} (403): {_SCOPES}.")
        if status == 404:
            return GitHubError(
                f"GitHub found no {what} in {self.repo} (404); check the number and --device-github-repo "
                "(a private repository also answers 404 to a token that cannot read it)."
            )
        if status == 410:
            return GitHubError(f"GitHub says {what} is gone (410): it expired; re-run the workflow.")
        return GitHubError(f"GitHub answered HTTP {status} for {what}; try again later.")

    def json(self, path: str, what: str, params: dict[str, Any] | None = None) -> Any:
        with self.get(path, what, params) as response:
            return self._decode(response, what)

    def _decode(self, response: requests.Response, what: str) -> Any:
        try:
            return response.json()
        except (ValueError, RecursionError):
            raise GitHubError(
                f"GitHub API {self.api_url} sent no JSON for {what}; check --device-github-api-url."
            ) from None

    def pages(self, path: str, what: str, key: str, params: dict[str, Any],
              max_pages: int = 10) -> Iterator[dict[str, Any]]:
        """Items under `key` across pages, following the Link header's rel="next" (API origin only)."""
        url: str | None = f"{self.api_url}{path}"
        query: dict[str, Any] | None = params
        for _ in range(max_pages):
            if url is None:
                return
            with self.get(url, what, query) as response:
                data = self._decode(response, what)
                link = response.headers.get("Link", "")
            items = data.get(key) if isinstance(data, dict) else None
            if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
                raise _unexpected(what, f"no list of objects under {key!r}")
            yield from items
            url, query = self._next_page(link, what), None

    def _next_page(self, link: str, what: str) -> str | None:
        """The rel="next" URL of a Link header, which must stay on the API's origin."""
        match = re.search(r'<([^>]+)>;\s*rel="next"', link)
        if match is None:
            return None
        url: str
        try:
            url = urljoin(self.api_url + "/", str(match.group(1)).strip())
            parts = urlsplit(url)
            origin = (parts.scheme, parts.netloc)
        except ValueError:
            origin, url = ("", ""), ""
        if origin != self._origin:
            raise _unexpected(what, "a next-page link outside the API (refused, so the token stays there)")
        return url

    def pr_head_sha(self, number: int) -> str:
        data = self.json(f"/repos/{self.repo}/pulls/{number}", f"pull request #{number}")
        head = data.get("head") if isinstance(data, dict) else None
        return _commit_hash(head.get("sha") if isinstance(head, dict) else None, f"pull request #{number}",
                            "head.sha")

    def commit_sha(self, ref: str) -> str:
        data = self.json(f"/repos/{self.repo}/commits/{ref}", f"commit or branch {ref!r}")
        return _commit_hash(data.get("sha") if isinstance(data, dict) else None, f"commit {ref!r}", "sha")

    def runs(self, workflow: str, **filters: str) -> Iterator[dict[str, Any]]:
        """Runs of `workflow`, newest first."""
        params = {**filters, "per_page": 30}
        yield from self.pages(f"/repos/{self.repo}/actions/workflows/{workflow}/runs",
                              f"runs of workflow {workflow}", "workflow_runs", params, max_pages=3)

    def artifacts(self, run_id: int) -> list[Artifact]:
        return [Artifact.from_api(item, run_id) for item in self.pages(
            f"/repos/{self.repo}/actions/runs/{run_id}/artifacts", f"artifacts of run {run_id}",
            "artifacts", {"per_page": 100})]

    def download_url(self, artifact: Artifact) -> str:
        """A fresh signed blob URL for the artifact (valid about a minute), from the API's 302."""
        what = f"the download of artifact {artifact.name} (run {artifact.run_id})"
        with self.get(artifact.download_url, what, ok=(302, 303, 307)) as response:
            location = response.headers.get("Location")
        if not location:
            raise GitHubError(f"GitHub sent no redirect for {what}; try again later.")
        try:
            return redirect_target(artifact.download_url, location, what)
        except ArtifactError:
            raise GitHubError(f"GitHub redirected {what} to something that is not an http(s) URL; "
                              "try again later.") from None


def run_page(api_url: str, repo: str, run_id: int) -> str:
    """The run's web page: github.com for api.github.com, the same host for GitHub Enterprise (/api/v3)."""
    parts = urlsplit(api_url)
    if parts.netloc == "api.github.com":
        return f"https://github.com/{repo}/actions/runs/{run_id}"
    base = parts.path.rstrip("/").removesuffix("/api/v3")
    return f"{parts.scheme}://{parts.netloc}{base}/{repo}/actions/runs/{run_id}"


class GitHubSource:
    """Resolves the run once per session and fetches its artifacts through the cache."""

    def __init__(self, client: GitHubClient, cache: Cache, *, workflow: str, run: int | None = None,
                 pr: int | None = None, ref: str | None = None, prefixes: dict[str, str],
                 say: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.cache = cache
        self.workflow = workflow
        self.run, self.pr, self.ref = run, pr, ref
        self.prefixes = prefixes
        self.say = say or (lambda _text: None)
        self._run_id: int | None = run
        self._artifacts: dict[int, list[Artifact]] = {}
        self._urls: dict[int, object] = {}  # run id -> its html_url as the API listed it

    @classmethod
    def from_settings(cls, settings: Settings, cache: Cache,
                      say: Callable[[str], None] | None = None) -> GitHubSource:
        client = GitHubClient(settings.github_api_url, settings.github_repo, token_from_env())
        return cls(client, cache, workflow=settings.github_workflow, run=settings.github_run,
                   pr=settings.github_pr, ref=settings.github_ref,
                   prefixes={"bundle": settings.bundle_artifact, "qcow2": settings.qcow2_artifact}, say=say)

    def _run_artifacts(self, run_id: int) -> list[Artifact]:
        if run_id not in self._artifacts:
            self._artifacts[run_id] = self.client.artifacts(run_id)
        return self._artifacts[run_id]

    def _matching(self, run_id: int, kind: str) -> list[Artifact]:
        return [a for a in self._run_artifacts(run_id) if a.name.startswith(self.prefixes[kind])]

    def run_id(self, kind: str) -> int:
        """The run: given, or the newest completed run for the PR's head / the ref with this artifact."""
        if self._run_id is not None:
            return self._run_id
        if self.pr is not None:
            sha = self.client.pr_head_sha(self.pr)
            filters, where = {"head_sha": sha}, f"pull request #{self.pr} (head {sha[:12]})"
        elif self.ref is not None and re.fullmatch(r"[0-9a-f]{40}", self.ref):
            filters, where = {"head_sha": self.ref}, f"commit {self.ref[:12]}"
        elif self.ref is not None and re.fullmatch(r"[0-9a-f]{7,39}", self.ref):
            sha = self.client.commit_sha(self.ref)
            filters, where = {"head_sha": sha}, f"commit {sha[:12]}"
        elif self.ref is not None:
            filters, where = {"branch": self.ref}, f"branch {self.ref}"
        else:
            raise GitHubError("no GitHub run, pull request or ref was given; give --device-github-run/pr/ref")
        seen = []
        expired: Artifact | None = None
        for run in self.client.runs(self.workflow, **filters):
            run_id = run.get("id")
            if not _is_count(run_id) or run_id == 0:
                raise _unexpected(f"runs of workflow {self.workflow}", "a run without a numeric id")
            assert isinstance(run_id, int)
            seen.append(f"{run_id} ({str(run.get('status'))[:20]}/{str(run.get('conclusion'))[:20]})")
            if run.get("status") != "completed":
                continue
            matching = self._matching(run_id, kind)
            if any(not a.expired for a in matching):
                self._run_id = run_id
                self.say(f"using run {self._run_id} of {self.workflow} for {where}")
                return self._run_id
            expired = expired or next((a for a in matching if a.expired), None)
            self._urls.setdefault(run_id, run.get("html_url"))
        if expired is not None:
            raise self._expired(expired, where)
        found = f"runs seen: {', '.join(seen[:10])}" if seen else "no runs at all"
        raise GitHubError(
            f"no completed run of {self.workflow} in {self.client.repo} for {where} has an unexpired "
            f"{self.prefixes[kind]}* artifact ({found}); wait for the workflow or check "
            "--device-github-workflow."
        )

    def artifact(self, kind: str) -> Artifact:
        run_id = self.run_id(kind)
        prefix = self.prefixes[kind]
        matching = self._matching(run_id, kind)
        if not matching:
            names = _names(a.name for a in self._run_artifacts(run_id)) or "none"
            option = f"--device-{'bundle' if kind == 'bundle' else 'qcow2'}-artifact"
            raise GitHubError(
                f"run {run_id} has no artifact whose name starts with {prefix!r} (it has: {names}); "
                f"check {option}."
            )
        if len(matching) > 1:
            names = _names(a.name for a in matching)
            raise GitHubError(
                f"run {run_id} has {len(matching)} artifacts whose names start with {prefix!r} ({names}); "
                "give a longer prefix that matches one."
            )
        artifact = matching[0]
        if artifact.expired:
            raise self._expired(artifact, None)
        return artifact

    def _expired(self, artifact: Artifact, where: str | None) -> GitHubError:
        """Which artifact of which run expired when, and how to get it back: re-run that run."""
        url = self._urls.get(artifact.run_id)
        if not (isinstance(url, str) and re.fullmatch(r"https?://[^\s]{1,300}", url)):
            url = run_page(self.client.api_url, self.client.repo, artifact.run_id)
        context = f", the newest completed run for {where}," if where else ""
        return GitHubError(
            f"artifact {artifact.name} of run {artifact.run_id}{context} expired at {artifact.expires_at} "
            f"(workflow artifacts are kept for a short time only); re-run that run to build it again "
            f"(`gh run rerun {artifact.run_id} --repo {self.client.repo}`, or \"Re-run all jobs\" at {url}), "
            "then run the tests again."
        )

    def key(self, artifact: Artifact) -> str:
        return f"github:{self.client.repo}:run:{artifact.run_id}:artifact:{artifact.id}"

    def fetch(self, kind: str, *, meter: MeterFactory | None = None) -> Path:
        """The artifact's single file, verified, from the cache (downloaded once if absent)."""
        artifact = self.artifact(kind)
        key = self.key(artifact)
        label = f"{artifact.name} (run {artifact.run_id})"

        def produce(tmp: Path) -> str:
            return download_member(self.client, artifact, self.cache.partial(key, "member"), tmp, label,
                                   meter=meter)

        def waiting() -> None:
            self.say(f"{label}: another process is downloading it; waiting")

        return self.cache.obtain(key, produce, FORMATS[kind], source=f"github:{self.client.repo} {label}",
                                 waiting=waiting)


class SignedUrl:
    """The artifact's signed blob URL: asked for once, asked again only by a user that found it stale."""

    def __init__(self, client: GitHubClient, artifact: Artifact) -> None:
        self.client = client
        self.artifact = artifact
        self._url: str | None = None

    def user(self) -> Callable[[], str]:
        """A url() for one user: its first call reuses the current URL, each later one gets a fresh one."""
        calls = 0

        def url() -> str:
            nonlocal calls
            calls += 1
            if self._url is None or calls > 1:
                self._url = self.client.download_url(self.artifact)
            return self._url

        return url


def download_member(client: GitHubClient, artifact: Artifact, partial: Path, dest: Path, label: str,
                    *, meter: MeterFactory | None = None) -> str:
    """The artifact's one file into `dest` in one pass over its zip; returns the file's sha256.

    The zip's central directory comes first (a ranged read of its tail); then the whole zip
    streams by once through the GitHub digest while only the member is written to `partial`
    (a later process resumes where a killed one stopped) and moved to `dest` once the digest,
    sizes and CRC agree. A digest mismatch after resuming restarts once from zero. A blob host
    that ignores Range gets the zip spooled to disk first, then extracted.
    """
    signed = SignedUrl(client, artifact)
    spool = partial.with_suffix(".zip")
    with new_session() as session:
        for attempt in range(2):
            resumed = any(path.exists() and path.stat().st_size > 0 for path in (partial, spool))
            plan = _plan(session, signed, artifact, label, client.backoff)
            sink: MemberSink | FileSink
            if plan is None:
                sink = FileSink(spool, trusted_partial=True)
            else:
                check_room(plan, partial.parent, label)
                sink = MemberSink(plan, partial, label, resumable=True, identity=artifact.digest or str(artifact.id))
            digest = Transfer(session, signed.user(), sink, label,
                              expected_size=plan.total if plan else artifact.size or None, refreshable=True,
                              meter=meter, backoff=client.backoff).run()
            if artifact.digest and digest != artifact.digest:
                for path in (partial, spool, sink.state):
                    if path is not None:
                        path.unlink(missing_ok=True)
                if resumed and attempt == 0:
                    continue
                raise GitHubError(
                    f"{label}: the downloaded zip has sha256 {digest}, not the {artifact.digest} GitHub lists; "
                    "run again to download it afresh."
                )
            break
    if isinstance(sink, FileSink):
        try:
            _name, member_digest = extract_single(spool, dest, label)
        finally:
            spool.unlink(missing_ok=True)
        return member_digest
    try:
        sink.verify()
    except ArtifactError:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, dest)
    return sink.member_digest()


def _plan(session: requests.Session, signed: SignedUrl, artifact: Artifact, label: str,
          backoff: float) -> Plan | None:
    """The zip's plan from ranged reads of its tail, or None when the blob host ignores Range."""
    size = artifact.size or None
    got = fetch_range(session, signed.user(), max(0, size - TAIL) if size else None, size - 1 if size else TAIL,
                      label, refreshable=True, backoff=backoff)
    if got is None:
        return None
    tail, start, total = got
    if size and total != size:
        raise GitHubError(f"{label}: GitHub lists the artifact's zip at {size} bytes but its blob holds {total}; "
                          "run again later.")

    def read(first: int, end: int) -> bytes:
        more = fetch_range(session, signed.user(), first, end - 1, label, refreshable=True, backoff=backoff)
        return more[0] if more else b""

    return read_plan(tail, start, total, read, label)
