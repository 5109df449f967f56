"""The images bundle and the qcow2 of this run: pick the source from Settings, go through the cache.

One Artifacts object per process answers bundle() and qcow2() once each (lazy: nothing is
touched until asked); the cache's per-key lock makes the download single-flight across
processes, so xdist workers share one download.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import Settings

if TYPE_CHECKING:
    from pytest_flightctl_device.artifacts.sources.github import GitHubSource
    from pytest_flightctl_device.images.podman import PodmanSession

Progress = Callable[[str], None]

_NO_SOURCE = {
    "bundle": "no images bundle source: give --device-bundle, --device-github-run/pr/ref or --device-build",
    "qcow2": "no qcow2 source: give --device-qcow2, --device-github-run/pr/ref or --device-build",
}


def _is_url(text: str) -> bool:
    return urlparse(text).scheme in ("http", "https")


class Artifacts:
    """Resolves, downloads (once) and verifies the bundle tar and the qcow2 of a session."""

    def __init__(self, settings: Settings, *, progress: Progress | None = None,
                 interval: float = 5.0, bar: bool = False, podman: PodmanSession | None = None) -> None:
        self.settings = settings
        self._podman = podman  # for --device-build; the session's own (the plugin's fixture owns it)
        self._progress = progress
        self._interval = interval
        self._bar = bar
        self._lock = threading.Lock()
        self._done: dict[str, Path] = {}
        self._cache: Cache | None = None
        self._github: GitHubSource | None = None

    @property
    def cache(self) -> Cache:
        if self._cache is None:
            self._cache = self.settings.cache()
        return self._cache

    def bundle(self) -> Path:
        """The verified `podman save -m` tar (a local path in place, else in the cache)."""
        return self._once("bundle")

    def qcow2(self) -> Path:
        """The verified qcow2 (a local path in place, else in the cache); never written to."""
        return self._once("qcow2")

    def _once(self, kind: str) -> Path:
        with self._lock:
            if kind not in self._done:
                self._done[kind] = self._obtain(kind)
            return self._done[kind]

    def _say(self, text: str) -> None:
        if self._progress is not None:
            self._progress(text)

    def _obtain(self, kind: str) -> Path:
        settings = self.settings
        given = settings.bundle if kind == "bundle" else settings.qcow2
        sha = settings.bundle_sha256 if kind == "bundle" else settings.qcow2_sha256
        if given:
            if _is_url(given):
                from pytest_flightctl_device.artifacts.sources.http import fetch_url

                path = fetch_url(given, self.cache, kind=kind, sha256=sha, meter=self._meter, say=self._say)
            else:
                from pytest_flightctl_device.artifacts.sources.local import local_bundle, local_qcow2

                check = local_bundle if kind == "bundle" else local_qcow2
                return check(given, sha256=sha, cache=self.cache)
        elif any(v is not None for v in (settings.github_run, settings.github_pr, settings.github_ref)):
            path = self._github_source().fetch(kind, meter=self._meter)
        elif settings.build:
            # the local build module is imported only when asked: it pulls in podman and friends
            build = importlib.import_module(f"{__package__}.sources.build")
            produce = build.build_bundle if kind == "bundle" else build.build_qcow2
            if self._podman is None:  # none given: one of this object's own, closed at exit
                from pytest_flightctl_device.images.podman import PodmanSession

                self._podman = PodmanSession(settings)
            path = Path(produce(settings, self.cache, self._progress or (lambda _text: None), self._podman))
        else:
            raise ConfigError(_NO_SOURCE[kind] + ".")
        if self.cache.max_bytes is not None:
            self.cache.prune(self.cache.max_bytes)
        return path

    def _github_source(self) -> GitHubSource:
        if self._github is None:
            from pytest_flightctl_device.artifacts.sources.github import GitHubSource

            self._github = GitHubSource.from_settings(self.settings, self.cache, say=self._say)
        return self._github

    def _meter(self, label: str, total: int | None) -> Meter:
        from pytest_flightctl_device.core.progress import Meter

        return Meter(label, total, self._progress, interval=self._interval, bar=self._bar)


if TYPE_CHECKING:
    from pytest_flightctl_device.core.progress import Meter
