"""Artifacts of a GitHub Actions run: run/PR/ref -> run -> artifact -> verified file in the cache.

The token (GITHUB_TOKEN or GH_TOKEN) goes only to the API origin, added per request, never to
the session, so the 302 to the blob host and any request to it carry no Authorization header.
No message of this module contains the token or a signed URL.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from ..cache import Cache
from ..errors import GitHubError
from ..settings import Settings
from .http import MeterFactory, Transfer, new_session
from .zipmember import extract_single

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
    def from_api(cls, data: dict[str, Any], run_id: int) -> Artifact:
        digest = data.get("digest") or None
        return cls(id=int(data["id"]), name=str(data["name"]), size=int(data.get("size_in_bytes") or 0),
                   digest=str(digest).lower().removeprefix("sha256:") if digest else None,
                   expired=bool(data.get("expired")), expires_at=str(data.get("expires_at") or "unknown"),
                   download_url=str(data["archive_download_url"]), run_id=run_id)


def _reset_time(response: requests.Response) -> str:
    reset = response.headers.get("X-RateLimit-Reset", "")
    if reset.isdigit():
        return datetime.fromtimestamp(int(reset), UTC).strftime("%H:%M:%S UTC")
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
            limit = response.headers.get("X-RateLimit-Limit", "?")
            hint = "" if self._token else "; set GITHUB_TOKEN or GH_TOKEN for 5000 requests/hour"
            return GitHubError(
                f"GitHub API rate limit ({limit} requests/hour) is used up while asking for {what}; "
                f"it resets at {_reset_time(response)}{hint}."
            )
        if status == 403 and response.headers.get("Retry-After"):
            return GitHubError(
                f"GitHub's secondary rate limit stopped {what}; wait {response.headers['Retry-After']} s "
                "and run again."
            )
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
            try:
                return response.json()
            except ValueError:
                raise GitHubError(
                    f"GitHub API {self.api_url} sent no JSON for {what}; check --device-github-api-url."
                ) from None

    def pages(self, path: str, what: str, key: str, params: dict[str, Any],
              max_pages: int = 10) -> Iterator[dict[str, Any]]:
        """Items under `key` across pages, following the Link header's rel="next"."""
        url: str | None = f"{self.api_url}{path}"
        query: dict[str, Any] | None = params
        for _ in range(max_pages):
            if url is None:
                return
            with self.get(url, what, query) as response:
                data = response.json()
                link = response.headers.get("Link", "")
            yield from data.get(key, [])
            match = re.search(r'<([^>]+)>;\s*rel="next"', link)
            url, query = (urljoin(self.api_url, match.group(1)), None) if match else (None, None)

    def pr_head_sha(self, number: int) -> str:
        data = self.json(f"/repos/{self.repo}/pulls/{number}", f"pull request #{number}")
        return str(data["head"]["sha"])

    def commit_sha(self, ref: str) -> str:
        data = self.json(f"/repos/{self.repo}/commits/{ref}", f"commit or branch {ref!r}")
        return str(data["sha"])

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
        return urljoin(artifact.download_url, location)


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
        for run in self.client.runs(self.workflow, **filters):
            seen.append(f"{run['id']} ({run.get('status')}/{run.get('conclusion')})")
            if run.get("status") == "completed" and any(
                not a.expired for a in self._matching(int(run["id"]), kind)
            ):
                self._run_id = int(run["id"])
                self.say(f"using run {self._run_id} of {self.workflow} for {where}")
                return self._run_id
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
            names = ", ".join(a.name for a in self._run_artifacts(run_id)) or "none"
            option = f"--device-{'bundle' if kind == 'bundle' else 'qcow2'}-artifact"
            raise GitHubError(
                f"run {run_id} has no artifact whose name starts with {prefix!r} (it has: {names}); "
                f"check {option}."
            )
        if len(matching) > 1:
            names = ", ".join(a.name for a in matching)
            raise GitHubError(
                f"run {run_id} has {len(matching)} artifacts whose names start with {prefix!r} ({names}); "
                "give a longer prefix that matches one."
            )
        artifact = matching[0]
        if artifact.expired:
            raise GitHubError(
                f"artifact {artifact.name} of run {run_id} expired at {artifact.expires_at}; re-run the "
                "workflow or pick a newer run."
            )
        return artifact

    def key(self, artifact: Artifact) -> str:
        return f"github:{self.client.repo}:run:{artifact.run_id}:artifact:{artifact.id}"

    def fetch(self, kind: str, *, meter: MeterFactory | None = None) -> Path:
        """The artifact's single file, verified, from the cache (downloaded once if absent)."""
        artifact = self.artifact(kind)
        key = self.key(artifact)
        label = f"{artifact.name} (run {artifact.run_id})"

        def produce(tmp: Path) -> str:
            return download_member(self.client, artifact, self.cache.partial(key, "zip"), tmp, label,
                                   meter=meter)

        def waiting() -> None:
            self.say(f"{label}: another process is downloading it; waiting")

        return self.cache.obtain(key, produce, kind=kind, source=f"github:{self.client.repo} {label}",
                                 waiting=waiting)


def download_member(client: GitHubClient, artifact: Artifact, zip_path: Path, dest: Path, label: str,
                    *, meter: MeterFactory | None = None, blob: requests.Session | None = None,
                    ) -> str:
    """Download the artifact zip to `zip_path` (resuming a partial one), check its digest, extract.

    Returns the sha256 of the extracted file. A digest mismatch after resuming a partial zip
    restarts once from zero; a mismatch on a fresh download is an error.
    """
    for attempt in range(2):
        resumed = zip_path.exists() and zip_path.stat().st_size > 0
        with (blob or new_session()) as session:
            transfer = Transfer(session, lambda: client.download_url(artifact), zip_path, label,
                                expected_size=artifact.size or None, refreshable=True,
                                trusted_partial=True, meter=meter)
            digest = transfer.run()
        if artifact.digest and digest != artifact.digest:
            zip_path.unlink(missing_ok=True)
            if resumed and attempt == 0:
                continue
            raise GitHubError(
                f"{label}: the downloaded zip has sha256 {digest}, not the {artifact.digest} GitHub lists; "
                "run again to download it afresh."
            )
        break
    try:
        _name, member_digest = extract_single(zip_path, dest, label)
    finally:
        zip_path.unlink(missing_ok=True)
    return member_digest
