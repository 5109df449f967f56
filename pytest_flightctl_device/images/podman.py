"""podman through its API (podman-py): the connection, streamed bundle load and export, image queries.

One connection per session (PodmanSession, owned by who made it). When no URL is configured and the default socket does
not answer, a private `podman system service` is started for the process and stopped (that PID
only) when the process ends. A service on this host reads a bundle from its path itself; any other
gets it uploaded. Uploads and exports stream in 1 MiB chunks: podman-py's own `images.load` reads
the whole file into memory, which a 1 GiB bundle cannot afford.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import podman
import requests
from filelock import FileLock

from pytest_flightctl_device.core.atomic import atomic_write, write_atomic
from pytest_flightctl_device.core.formats import ManifestEntry as ManifestEntry  # re-exported: podman.ManifestEntry
from pytest_flightctl_device.core.formats import read_manifest as read_manifest  # re-exported: podman.read_manifest
from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.errors import ArtifactError, MissingToolError, PodmanError
from pytest_flightctl_device.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
Progress = Callable[[str], None]


# -- connection ---------------------------------------------------------------------------------


def default_socket_url(env: Mapping[str, str] | None = None) -> str:
    """The socket a podman.socket unit listens on: rootful /run/podman, else the user's runtime dir."""
    env = os.environ if env is None else env
    if os.getuid() == 0:
        return "unix:///run/podman/podman.sock"
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"
    return f"unix://{runtime}/podman/podman.sock"


def _answers(url: str, timeout: float = 5.0) -> bool:
    """True when a podman API service answers /_ping at `url`."""
    try:
        with podman.PodmanClient(base_url=url, timeout=timeout) as client:
            return bool(client.ping())
    except Exception:  # any transport error means "not answering"
        return False


_SERVICE_PREFIX = "pftd-podman-"


def _die_with_parent() -> None:
    """In the service's child before exec: SIGTERM it when pytest dies, even by kill -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _sweep_dead_services() -> None:
    """Remove the socket directories of private services whose pytest is gone (PID + start time)."""
    for directory in Path(tempfile.gettempdir()).glob(_SERVICE_PREFIX + "*"):
        try:
            owner = Owner.from_token("-".join((directory / "owner").read_text().split()))
        except OSError:
            continue
        if owner is not None and not owner.alive():
            shutil.rmtree(directory, ignore_errors=True)


class PrivateService:
    """A `podman system service` started for this process on a socket only it knows."""

    def __init__(self, podman_bin: str) -> None:
        _sweep_dead_services()
        self._dir = Path(tempfile.mkdtemp(prefix=_SERVICE_PREFIX))
        write_atomic(self._dir / "owner", Owner.current().token + "\n")
        self.url = f"unix://{self._dir}/podman.sock"
        self._log = (self._dir / "service.log").open("wb")
        self.process = subprocess.Popen(
            [podman_bin, "system", "service", "--time=0", self.url],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        self.pid = self.process.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self._tail()
                self.stop()
                raise PodmanError(f"`podman system service` exited with {self.process.returncode} "
                                  f"before answering ({tail}); run it by hand to see why.")
            if (self._dir / "podman.sock").exists() and _answers(self.url, timeout=2.0):
                return
            time.sleep(0.05)
        self.stop()
        raise PodmanError(f"`podman system service` did not answer within {timeout:.0f} s; "
                          "check `podman info` works for this user.")

    def _tail(self) -> str:
        self._log.flush()
        text = (self._dir / "service.log").read_text(errors="replace").strip().splitlines()
        return " / ".join(text[-3:]) or "no output"

    def stop(self) -> None:
        """Stop exactly the process this object started, then remove its socket directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self._dir, ignore_errors=True)


class Podman:
    """A connected podman API client, and the private service behind it when there is one."""

    def __init__(self, url: str, service: PrivateService | None = None) -> None:
        self.url = url
        self.service = service
        self.client = podman.PodmanClient(base_url=url, timeout=None)

    @property
    def api(self) -> Any:
        return self.client.api

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]
        if self.service is not None:
            self.service.stop()
            self.service = None

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ---------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json(self.api.get("/info"), "read podman info")
        return result

    def list_images(self, *, all_images: bool = False) -> list[dict[str, Any]]:
        """/images/json, retried for up to ~5 s: podman 4.3 fails a listing that races an image removal
        elsewhere (another worker's cleanup, or the build a killed client left the service finishing)."""
        for _attempt in range(25):
            response = self.api.get("/images/json", params={"all": all_images})
            if response.status_code != 500 or "image not known" not in response.text:
                break
            time.sleep(0.2)
        images: list[dict[str, Any]] = self._json(response, "list images")
        return images

    def tag_ids(self) -> dict[str, str]:
        """Every tag in the store and its image ID (hex). The `reference` filter cannot do this."""
        images = self.list_images()
        tags: dict[str, str] = {}
        for image in images:
            image_id = str(image.get("Id", "")).removeprefix("sha256:")
            for tag in image.get("RepoTags") or image.get("Names") or []:
                tags[tag] = image_id
        return tags

    def image_id(self, ref: str) -> str | None:
        response = self.api.get(f"/images/{ref}/json")
        if response.status_code == 404:
            return None
        return str(self._json(response, f"inspect image {ref}")["Id"]).removeprefix("sha256:")

    def store_id(self) -> str:
        """A short stable id of the storage behind this service (graph root + driver)."""
        store = self.info().get("store", {})
        text = f"{store.get('graphRoot', '')}|{store.get('graphDriverName', '')}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- streaming transfers ---------------------------------------------------------------------

    # Read by the service itself when it listens on a unix socket here; False: always upload.
    server_side_load = True

    def load(self, bundle: Path, count: int) -> list[str]:
        """Load the `count` images of a docker-archive: read by a service on this host, else uploaded."""
        path = bundle.resolve()
        if self.server_side_load and self.url.startswith("unix://") and _SAFE_PATH.fullmatch(str(path)):
            try:
                return self.load_local(path, count)
            except PodmanError as exc:  # e.g. a socket forwarded to a VM that cannot see this path
                log.info("podman could not read %s itself, uploading it instead: %s", bundle, exc)
        return self.load_stream(bundle)

    def load_local(self, bundle: Path, count: int) -> list[str]:
        """One FROM-only build per image (`FROM docker-archive:PATH:@N`): the service copies the image
        from the file, keeping its ID and the archive's tags, as `podman load` does, without the
        upload that podman 4.3's /images/load first spools to /var/tmp. Returns the image IDs."""
        ids: list[str] = []
        for index in range(count):
            context = _context_tar(f"FROM docker-archive:{bundle}:@{index}\n")
            try:
                # forcerm: buildah 1.28 leaves a FROM-only build's working container behind otherwise
                response = self.api.post("/build", params={"dockerfile": "Containerfile", "forcerm": True},
                                         data=context, headers={"Content-Type": "application/x-tar"}, stream=True)
                lines = [line for line in response.iter_lines() if line]
            except requests.RequestException as exc:
                raise PodmanError(f"podman at {self.url} dropped the load of {bundle} ({exc}).") from None
            if response.status_code >= 400:
                self._json(response, f"load {bundle}")
            items = [_json_line(line) for line in lines]
            errors = [str(item["error"]).strip() for item in items if "error" in item]
            last = str(items[-1].get("stream", "")).strip() if items else ""
            if errors or not re.fullmatch(r"[0-9a-f]{64}", last):
                raise PodmanError(f"podman at {self.url} could not read image {index} of {bundle}: "
                                  f"{(errors or [last or 'no output'])[-1][:500]}.")
            ids.append(last)
        return ids

    def load_stream(self, bundle: Path) -> list[str]:
        """POST the tar to /images/load in 1 MiB chunks; returns the names podman reports loaded."""
        def chunks() -> Iterator[bytes]:
            with bundle.open("rb") as f:
                while block := f.read(CHUNK):
                    yield block

        try:
            response = self.api.post("/images/load", data=chunks(),
                                     headers={"Content-Type": "application/x-tar"})
        except requests.RequestException as exc:
            raise PodmanError(f"podman at {self.url} dropped the load of {bundle} ({exc}); "
                              "check the service log and free space under /var/tmp.") from None
        body = self._json(response, f"load {bundle}")
        return [str(name) for name in body.get("Names") or []]

    def export(self, refs: Sequence[str], dest: Path, progress: Progress | None = None) -> Path:
        """Write `refs` as one docker-archive (like `podman save -m`): temp file, fsync, rename."""
        response = self.api.get("/images/export", params={"references": list(refs),
                                                          "format": "docker-archive"}, stream=True)
        if response.status_code != 200:
            self._json(response, f"export {', '.join(refs)}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:  # a truncated stream fails read_manifest and never becomes a bundle
            with atomic_write(dest, check=read_manifest) as out:
                for block in response.iter_content(CHUNK):
                    out.write(block)
                    written += len(block)
        finally:
            response.close()
        if progress:
            progress(f"exported {len(refs)} images to {dest} ({written / 2**20:.0f} MiB)")
        return dest

    def _json(self, response: Any, what: str) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("message") or response.text
            except ValueError:
                detail = response.text
            raise PodmanError(f"podman at {self.url} could not {what}: {str(detail).strip()[:500]}.")
        return response.json()


# An absolute path that a Containerfile's FROM line and docker-archive's PATH[:@N] carry verbatim.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._+/-]+")


def _context_tar(containerfile: str) -> bytes:
    """A build context holding only `Containerfile`."""
    data = containerfile.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Containerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _json_line(line: bytes) -> dict[str, Any]:
    try:
        item = json.loads(line)
    except ValueError:
        return {"stream": line.decode(errors="replace")}
    return item if isinstance(item, dict) else {"stream": str(item)}


def connect(settings: Settings, env: Mapping[str, str] | None = None,
            default_url: str | None = None) -> Podman:
    """Connect to --device-podman-url, else CONTAINER_HOST, else the default socket, else a
    private service. An explicitly given URL that does not answer is an error, never replaced."""
    env = os.environ if env is None else env
    explicit = settings.podman_url or env.get("CONTAINER_HOST")
    if explicit:
        if not explicit.startswith(("unix://", "tcp://", "http://", "ssh://")):
            explicit = f"unix://{explicit}" if explicit.startswith("/") else explicit
        if not _answers(explicit):
            source = "--device-podman-url" if settings.podman_url else "CONTAINER_HOST"
            raise PodmanError(f"no podman API service answers at {explicit} ({source}); start one "
                              f"with `podman system service --time=0 {explicit}` or fix {source}.")
        return Podman(explicit)
    url = default_url or default_socket_url(env)
    if _answers(url):
        return Podman(url)
    podman_bin = shutil.which("podman")
    if podman_bin is None:
        raise MissingToolError("podman is not installed and no podman API service answers at "
                               f"{url}; install podman or give --device-podman-url.")
    service = PrivateService(podman_bin)
    log.info("started private podman service pid %s at %s", service.pid, service.url)
    service.wait_ready()
    return Podman(service.url, service)


class PodmanSession:
    """The podman connection of one session (a pytest run, a CLI command), made on first use.

    Whoever makes it owns it: close() stops a private service the connection started, by its PID
    (and an unclosed session is closed at exit). Until then every user of the session shares the one
    connection, so a build, an export and a load talk to the same service.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: Podman | None = None
        self._lock = threading.Lock()

    def get(self) -> Podman:
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.settings)
                atexit.register(self.close)
            return self._conn

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            atexit.unregister(self.close)
            with contextlib.suppress(Exception):
                conn.close()

    def __enter__(self) -> PodmanSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- bundles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedImages:
    """What `agent_images` returns: the expected tags, present in podman with the bundle's IDs.

    `tags` lists `<image_repo>:<variant>-<tag>` in variant order; `by_variant["v2"]` gives one tag;
    `image_ids` maps every tag to its image ID; `loaded` is False when the load was skipped
    because the store already held every tag with the same ID.
    """

    tags: tuple[str, ...]
    by_variant: Mapping[str, str] = field(default_factory=dict)
    image_ids: Mapping[str, str] = field(default_factory=dict)
    loaded: bool = False

    def __getitem__(self, variant: str) -> str:
        return self.by_variant[variant]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tags)

    def __len__(self) -> int:
        return len(self.tags)


def expected_tags(settings: Settings, manifest: Sequence[ManifestEntry] = ()) -> dict[str, str]:
    """variant -> `<repo>:<variant>-<tag>`. Without --device-image-tag the tag is read from the
    bundle's base image tag, so a downloaded bundle needs no extra option."""
    tag = settings.image_tag
    if tag is None:
        prefix = f"{settings.image_repo}:base-"
        found = sorted(t.removeprefix(prefix) for e in manifest for t in e.tags if t.startswith(prefix))
        if not found:
            raise ArtifactError(f"the images bundle has no {prefix}<tag> image; give a bundle built "
                                "with this --device-image-repo or set --device-image-tag.")
        tag = found[0]
    return {variant: f"{settings.image_repo}:{variant}-{tag}" for variant in settings.variants}


def load_bundle(conn: Podman, bundle: Path, settings: Settings, lock_dir: Path,
                progress: Progress | None = None) -> LoadedImages:
    """Load `bundle` at most once per podman store (filelock), then check every expected tag."""
    manifest = read_manifest(bundle)
    wanted = expected_tags(settings, manifest)
    claimed = {tag: entry.image_id for entry in manifest for tag in entry.tags}
    lock_dir.mkdir(parents=True, exist_ok=True)
    loaded = False
    with FileLock(str(lock_dir / f"podman-load-{conn.store_id()}.lock")):
        present = conn.tag_ids()
        if any(present.get(tag) != image_id for tag, image_id in claimed.items()):
            size = bundle.stat().st_size / 2**20
            if progress:
                progress(f"loading {bundle.name} ({size:.0f} MiB) into podman at {conn.url}")
            conn.load(bundle, len(manifest))
            loaded = True
            present = conn.tag_ids()
    missing = [tag for tag in wanted.values() if tag not in present]
    if missing:
        raise ArtifactError(f"after loading {bundle} podman lacks {', '.join(missing)}; give a bundle "
                            "that holds every variant in --device-variants.")
    stale = [tag for tag, image_id in claimed.items() if present.get(tag) != image_id]
    if stale:
        raise PodmanError(f"after loading {bundle} these tags point at other images: "
                          f"{', '.join(stale)}; remove them with `podman rmi` and run again.")
    return LoadedImages(tags=tuple(wanted.values()), by_variant=dict(wanted),
                        image_ids={tag: present[tag] for tag in wanted.values()}, loaded=loaded)
