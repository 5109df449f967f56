"""Push every tag of an images bundle into a registry, once per registry and image ID.

Straight from the docker-archive: its layers are uncompressed tars named by their digest, its
configs are named by the image ID, so the whole manifest of each image is known from the tar's
index without reading a byte of data. Each missing blob is sent once with sendfile (no copy in
this process, no compression); the registry verifies its digest. Blobs the registry has already
(HEAD) or can mount from another repository are not sent. Layers keep their uncompressed docker
media type, which podman, skopeo and bootc pull as they are.

Single-flight: a filelock per (registry, image ID) in the caller's state directory; images go
in the same order in every process (fewest layers first), so a worker that waits on a base
finds its blobs present afterwards. Nothing half-pushed counts as pushed: an image is done when
every tag answers a manifest HEAD with the digest of the manifest computed from the bundle,
and only then is its marker written (the record of what was verified; the registry stays the
truth, so a wiped registry is pushed to again).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import ssl
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode, urljoin, urlsplit

from filelock import FileLock

from pytest_flightctl_device.core.atomic import sweep_temps, temp_path, write_atomic
from pytest_flightctl_device.core.formats import ManifestEntry, read_manifest
from pytest_flightctl_device.errors import ArtifactError
from pytest_flightctl_device.images.registry import RegistryError

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
TIMEOUT_S = 120.0
Progress = Callable[[str], None]

_HEX = re.compile(r"[0-9a-f]{64}")
_DIGEST_NAME = re.compile(r"(?:sha256:)?(?P<hex>[0-9a-f]{64})(?:\.tar|\.json)?")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


# -- where things go ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A registry to push to: `address` HOST:PORT, an optional path `namespace` prefix.

    `key` names the registry for markers and locks (default: the address); the private registry
    passes its storage, which outlives a port.
    """

    address: str
    namespace: str = ""
    key: str = ""
    tls: bool = False
    ca_file: Path | None = None
    auth: str | None = field(default=None, repr=False)  # an Authorization header value (never logged)
    storage: Path | None = None  # the private registry's filesystem root: blobs are stored, not uploaded

    @property
    def identity(self) -> str:
        return self.key or self.address

    def destination(self, ref: str) -> tuple[str, str]:
        """(repository, tag) in this registry for a bundle tag: its domain swapped for ours.

        `quay.io/flightctl/flightctl-device:v2-t` -> (`NAMESPACE/flightctl/flightctl-device`, `v2-t`).
        """
        if "@" in ref:
            raise ArtifactError(f"the bundle tag {ref} names a digest, not a tag; give a bundle of tagged images.")
        name, _, tag = ref.rpartition(":")
        if not name or "/" in tag:
            name, tag = ref, "latest"
        first, _, rest = name.partition("/")
        if rest and ("." in first or ":" in first or first == "localhost"):
            path = rest
        elif rest:
            path = name
        else:
            path = f"library/{name}"
        repo = f"{self.namespace.strip('/')}/{path}" if self.namespace.strip("/") else path
        if not all(_COMPONENT.fullmatch(part) for part in repo.split("/")) or not _TAG.fullmatch(tag):
            raise ArtifactError(f"the bundle tag {ref} is not a valid image reference for a registry "
                                f"(repository {repo}, tag {tag}); rename it in the bundle.")
        return repo, tag


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    offset: int  # of its data inside the bundle
    media_type: str


@dataclass(frozen=True)
class Image:
    """One bundle entry, ready to push: its blobs located in the tar and its manifest."""

    image_id: str
    tags: tuple[str, ...]
    config: Blob
    layers: tuple[Blob, ...]

    def manifest(self) -> bytes:
        """Docker schema2, byte-for-byte the same in every process (its digest is the promise)."""
        def descriptor(blob: Blob) -> dict[str, object]:
            return {"mediaType": blob.media_type, "size": blob.size, "digest": blob.digest}
        body = {"schemaVersion": 2, "mediaType": MANIFEST_V2, "config": descriptor(self.config),
                "layers": [descriptor(layer) for layer in self.layers]}
        return json.dumps(body, indent=3).encode()

    def manifest_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.manifest()).hexdigest()


# -- the bundle ---------------------------------------------------------------------------------


def _members(bundle: Path) -> dict[str, tarfile.TarInfo]:
    """Every regular member by normalised name; headers only (tarfile seeks over the data)."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(bundle, "r:") as tar:
            for member in tar:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isreg() and not member.issparse():
                    members[name] = member
    except (tarfile.TarError, OSError) as exc:
        raise ArtifactError(f"{bundle} cannot be read as a tar ({exc.__class__.__name__}); "
                            "give the tar written by `podman save -m`.") from None
    return members


def _blob(bundle: Path, members: dict[str, tarfile.TarInfo], path: str, media_type: str) -> Blob:
    member = members.get(path.removeprefix("./"))
    if member is None:
        raise ArtifactError(f"{bundle} lists {path} in its manifest.json but holds no such file; "
                            "give a complete bundle (`podman save -m`).")
    match = _DIGEST_NAME.fullmatch(Path(path).name)
    if match is not None:
        digest = "sha256:" + match["hex"]
    else:  # an archive that does not name blobs by digest (old `docker save`): hash it once
        digest = "sha256:" + _hash_range(bundle, member.offset_data, member.size)
    return Blob(digest, member.size, member.offset_data, media_type)


def _hash_range(path: Path, offset: int, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(offset)
        left = size
        while left:
            block = handle.read(min(left, 1 << 20))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def plan(bundle: Path) -> list[Image]:
    """The bundle's tagged images in push order (fewest layers first, then by ID)."""
    entries: Sequence[ManifestEntry] = read_manifest(bundle)
    members = _members(bundle)
    images = []
    for entry in entries:
        if not entry.tags:
            continue
        config = _blob(bundle, members, entry.config, CONFIG_V1)
        if config.digest != f"sha256:{entry.image_id}":
            raise ArtifactError(f"{bundle}'s config {entry.config} does not match its image ID; "
                                "give the tar written by `podman save -m`.")
        layers = tuple(_blob(bundle, members, path, LAYER_TAR) for path in entry.layers)
        images.append(Image(entry.image_id, entry.tags, config, layers))
    if not images:
        raise ArtifactError(f"{bundle} holds no tagged image to push; give a bundle of tagged images.")
    return sorted(images, key=lambda image: (len(image.layers), image.image_id))


# -- the registry's HTTP API --------------------------------------------------------------------


@dataclass
class Counters:
    blobs_sent: int = 0
    bytes_sent: int = 0
    blobs_present: int = 0
    blobs_mounted: int = 0
    manifests_put: int = 0
    requests: int = 0


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    headers: http.client.HTTPMessage
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @classmethod
    def read(cls, response: http.client.HTTPResponse) -> Reply:
        body = response.read(1 << 20)
        response.read()  # drain what a misbehaving server sends beyond that, so the connection is reusable
        return cls(response.status, response.reason, response.headers, body)

    def error_code(self) -> str:
        """The distribution API's first error code and message, when the body carries one."""
        try:
            first = json.loads(self.body)["errors"][0]
            return f": {first['code']} {first.get('message', '')}".rstrip()
        except (ValueError, KeyError, IndexError, TypeError):
            return ""


class Client:
    """A keep-alive HTTP(S) connection to one registry; no proxies (the registry is addressed directly)."""

    def __init__(self, target: Target, counters: Counters) -> None:
        self.target = target
        self.counters = counters
        host, _, port = target.address.rpartition(":")
        if not host or not port.isdigit():
            raise RegistryError(f"the registry address {target.address} is not HOST:PORT; give it as HOST:PORT.")
        self.host, self.port = host.strip("[]"), int(port)
        self.scheme = "https" if target.tls else "http"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.target.tls:
                context = ssl.create_default_context(cafile=str(self.target.ca_file) if self.target.ca_file else None)
                self._conn = http.client.HTTPSConnection(self.host, self.port, timeout=TIMEOUT_S, context=context)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _auth(self, headers: dict[str, str] | None) -> dict[str, str]:
        if not self.target.auth:
            return headers or {}
        return {**(headers or {}), "Authorization": self.target.auth}

    def _fail(self, what: str, exc: BaseException) -> RegistryError:
        self.close()
        return RegistryError(f"the registry at {self.target.address} did not answer while {what} "
                             f"({exc.__class__.__name__}: {exc}); check that it runs and is reachable.")

    def request(self, method: str, path: str, body: bytes = b"",
                headers: dict[str, str] | None = None) -> Reply:
        """One request; the response body is read (so the connection can be reused)."""
        self.counters.requests += 1
        for attempt in range(2):  # a keep-alive connection the server closed: reconnect once
            conn = self._connection()
            try:
                conn.request(method, path, body=body or None, headers=self._auth(headers))
                return Reply.read(conn.getresponse())
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                self.close()
                if attempt:
                    raise self._fail(f"{method} {path}", exc) from None
            except (OSError, http.client.HTTPException) as exc:
                raise self._fail(f"{method} {path}", exc) from None
        raise AssertionError("unreachable")

    def send_file(self, url: str, handle: Path, blob: Blob) -> Reply:
        """PUT `blob`'s bytes from the bundle at `url`, with sendfile (no userspace copy)."""
        self.counters.requests += 1
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = self._connection()
        try:
            conn.putrequest("PUT", path)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(blob.size))
            if self.target.auth:
                conn.putheader("Authorization", self.target.auth)
            conn.endheaders()
            assert conn.sock is not None
            with handle.open("rb") as source:
                sent = conn.sock.sendfile(source, blob.offset, blob.size)
            if sent != blob.size:
                raise OSError(f"sent {sent} of {blob.size} bytes: the bundle is shorter than its index")
            return Reply.read(conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            raise self._fail(f"uploading {blob.digest}", exc) from None

    def refuse(self, what: str, response: Reply) -> RegistryError:
        fix = "give a registry that accepts this push"
        if response.status in (401, 403):
            fix = "log in with `podman login` or " + fix
        return RegistryError(f"the registry at {self.target.address} refused {what} "
                             f"(HTTP {response.status} {response.reason}{response.error_code()}); {fix}.")

    # -- the calls a push makes --

    def has_blob(self, repo: str, digest: str) -> bool:
        response = self.request("HEAD", f"/v2/{repo}/blobs/{digest}")
        if response.status in (200, 404):
            return response.status == 200
        raise self.refuse(f"a check of blob {digest} in {repo}", response)

    def manifest_digest(self, repo: str, tag: str) -> str | None:
        response = self.request("HEAD", f"/v2/{repo}/manifests/{quote(tag)}", headers={"Accept": MANIFEST_V2})
        if response.status == 404:
            return None
        if response.status != 200:
            raise self.refuse(f"a check of {repo}:{tag}", response)
        return response.header("Docker-Content-Digest")

    def mount(self, repo: str, digest: str, source: str) -> tuple[bool, str | None]:
        """Try a cross-repository mount; (True, None) if mounted, else (False, upload URL)."""
        query = urlencode({"mount": digest, "from": source})
        response = self.request("POST", f"/v2/{repo}/blobs/uploads/?{query}")
        if response.status == 201:
            return True, None
        if response.status == 202:
            return False, response.header("Location")
        raise self.refuse(f"an upload to {repo}", response)

    def upload(self, repo: str, bundle: Path, blob: Blob, location: str | None = None) -> None:
        if location is None:
            response = self.request("POST", f"/v2/{repo}/blobs/uploads/")
            if response.status != 202:
                raise self.refuse(f"an upload to {repo}", response)
            location = response.header("Location")
        if not location:
            raise RegistryError(f"the registry at {self.target.address} started an upload without a Location; "
                                "give a registry that speaks the distribution API.")
        url = urljoin(f"{self.scheme}://{self.target.address}/", location)
        url += ("&" if urlsplit(url).query else "?") + urlencode({"digest": blob.digest})
        response = self.send_file(url, bundle, blob)
        if response.status == 400:
            raise ArtifactError(f"{bundle} holds a blob whose bytes do not match its digest {blob.digest}; "
                                "fetch or build the bundle again.")
        if response.status != 201:
            raise self.refuse(f"blob {blob.digest} for {repo}", response)
        self.counters.blobs_sent += 1
        self.counters.bytes_sent += blob.size

    def put_manifest(self, repo: str, tag: str, body: bytes) -> None:
        response = self.request("PUT", f"/v2/{repo}/manifests/{quote(tag)}", body=body,
                                headers={"Content-Type": MANIFEST_V2})
        if response.status != 201:
            raise self.refuse(f"the manifest of {repo}:{tag}", response)
        self.counters.manifests_put += 1


# -- the push -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    """One image's outcome: where each bundle tag went, its manifest digest, whether it was sent now."""

    image_id: str
    refs: dict[str, str]  # bundle tag -> registry reference (HOST:PORT/repo:tag)
    digest: str
    sent: bool


@dataclass
class PushResult:
    images: list[Pushed] = field(default_factory=list)
    counters: Counters = field(default_factory=Counters)
    seconds: float = 0.0

    @property
    def digests(self) -> dict[str, str]:
        """Bundle tag -> manifest digest in the registry."""
        return {tag: image.digest for image in self.images for tag in image.refs}

    def summary(self) -> str:
        sent = sum(image.sent for image in self.images)
        c = self.counters
        return (f"{sent} of {len(self.images)} images pushed, {len(self.images) - sent} already there; "
                f"{c.blobs_sent} blobs sent ({c.bytes_sent / 2**20:.0f} MiB), {c.blobs_present} present, "
                f"{c.blobs_mounted} mounted, in {self.seconds:.1f} s")


def _stem(target: Target, image_id: str) -> str:
    return f"{hashlib.sha256(target.identity.encode()).hexdigest()[:16]}-{image_id[:32]}"


def marker_path(state_dir: Path, target: Target, image_id: str) -> Path:
    return state_dir / f"pushed-{_stem(target, image_id)}.json"


def read_marker(path: Path) -> str | None:
    """The manifest digest a marker records, or None."""
    try:
        raw = json.loads(path.read_text())
        digest = raw["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return digest if isinstance(digest, str) else None


@contextlib.contextmanager
def _single_flight(lock: FileLock, what: str, progress: Progress | None) -> Iterator[None]:
    try:
        lock.acquire(timeout=0)
    except Exception:  # held by another process: say so, then wait
        if progress:
            progress(f"waiting for another process pushing {what}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def push_bundle(bundle: Path, target: Target, state_dir: Path, progress: Progress | None = None) -> PushResult:
    """Make every tag of `bundle` present in `target`; send only what the registry lacks."""
    started = time.monotonic()
    images = plan(bundle)
    state_dir.mkdir(parents=True, exist_ok=True)
    result = PushResult()
    client = Client(target, result.counters)
    holders: dict[str, str] = {}  # digest -> a repository known to hold it (for mounts)
    try:
        for image in images:
            dests = {tag: target.destination(tag) for tag in image.tags}
            refs = {tag: f"{target.address}/{repo}:{dtag}" for tag, (repo, dtag) in dests.items()}
            what = ", ".join(image.tags)
            with _single_flight(FileLock(str(state_dir / f"push-{_stem(target, image.image_id)}.lock")),
                                what, progress):
                sent = _push_image(client, bundle, image, dests, holders, state_dir, progress)
            result.images.append(Pushed(image.image_id, refs, image.manifest_digest(), sent))
    finally:
        client.close()
    result.seconds = time.monotonic() - started
    if progress:
        progress(result.summary())
    return result


def _push_image(client: Client, bundle: Path, image: Image, dests: dict[str, tuple[str, str]],
                holders: dict[str, str], state_dir: Path, progress: Progress | None) -> bool:
    """Push one image (under its lock); False when every tag already had its manifest."""
    digest = image.manifest_digest()
    marker = marker_path(state_dir, client.target, image.image_id)
    missing = [(repo, tag) for repo, tag in dests.values() if client.manifest_digest(repo, tag) != digest]
    if not missing:
        if read_marker(marker) != digest:
            _write_marker(marker, client.target, image, digest, dests)
        for blob in (image.config, *image.layers):
            holders.setdefault(blob.digest, next(iter(dests.values()))[0])
        return False
    marker.unlink(missing_ok=True)  # the registry lacks it: whatever the marker said is void
    body = image.manifest()
    for repo in sorted({repo for repo, _tag in missing}):
        for blob in (*image.layers, image.config):
            _ensure_blob(client, bundle, repo, blob, holders, progress)
        for _repo, tag in [(r, t) for r, t in missing if r == repo]:
            client.put_manifest(repo, tag, body)
            if progress:
                progress(f"pushed {client.target.address}/{repo}:{tag}")
    wrong = [f"{repo}:{tag}" for repo, tag in dests.values() if client.manifest_digest(repo, tag) != digest]
    if wrong:
        raise RegistryError(f"the registry at {client.target.address} does not answer {', '.join(wrong)} with "
                            f"the manifest just pushed ({digest}); is another writer pushing those tags?")
    _write_marker(marker, client.target, image, digest, dests)
    return True


def _ensure_blob(client: Client, bundle: Path, repo: str, blob: Blob, holders: dict[str, str],
                 progress: Progress | None) -> None:
    if client.has_blob(repo, blob.digest):
        client.counters.blobs_present += 1
        holders.setdefault(blob.digest, repo)
        return
    location = None
    source = holders.get(blob.digest)
    if source is not None and source != repo and client.target.storage is None:
        mounted, location = client.mount(repo, blob.digest, source)
        if mounted:
            client.counters.blobs_mounted += 1
            return
    if progress and blob.size >= 16 << 20:
        progress(f"sending {blob.digest[:19]} ({blob.size / 2**20:.0f} MiB) to {repo}")
    if client.target.storage is not None:
        store_blob(client.target.storage, repo, bundle, blob)
        client.counters.blobs_sent += 1
        client.counters.bytes_sent += blob.size
    else:
        client.upload(repo, bundle, blob, location)
    holders.setdefault(blob.digest, repo)


# -- the private registry: blobs stored straight into its filesystem storage ----------------------


def _v2(storage: Path) -> Path:
    return storage / "docker" / "registry" / "v2"


def store_blob(storage: Path, repo: str, bundle: Path, blob: Blob) -> None:
    """Put `blob` where the distribution registry's filesystem driver keeps it, and link it to `repo`.

    For the private registry only (we own its storage): the registry's own upload path hashes at
    ~250 MB/s in one Go thread (no SHA-NI in Debian's build), while the kernel copies the range
    (copy_file_range) as hashlib verifies it on another thread. The digest is checked before the
    data appears under its final name (rename), and the repository link is written last, so a
    killed push leaves at most an unlinked blob, which no manifest can refer to, or a temp named
    after its writer, which the next store of that blob sweeps.
    """
    hexdigest = blob.digest.removeprefix("sha256:")
    data = _v2(storage) / "blobs" / "sha256" / hexdigest[:2] / hexdigest / "data"
    if not (data.is_file() and data.stat().st_size == blob.size):
        data.parent.mkdir(parents=True, exist_ok=True)
        sweep_temps(data.parent, "data")  # what a push killed mid-copy left
        temp = temp_path(data)
        hashed: list[str] = []
        hasher = threading.Thread(target=lambda: hashed.append(_hash_range(bundle, blob.offset, blob.size)))
        hasher.start()
        try:
            with bundle.open("rb") as source, temp.open("wb") as out:
                offset, left = blob.offset, blob.size
                while left:
                    done = os.copy_file_range(source.fileno(), out.fileno(), left, offset)
                    if done == 0:
                        raise ArtifactError(f"{bundle} is shorter than its index says; fetch or build it again.")
                    offset, left = offset + done, left - done
                os.fsync(out.fileno())
            hasher.join()
            if hashed != [hexdigest]:
                raise ArtifactError(f"{bundle} holds a blob whose bytes do not match its digest {blob.digest}; "
                                    "fetch or build the bundle again.")
            os.replace(temp, data)
        finally:
            hasher.join()
            temp.unlink(missing_ok=True)
    link = _v2(storage) / "repositories" / repo / "_layers" / "sha256" / hexdigest / "link"
    if not link.is_file():
        link.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(link, blob.digest)


def _write_marker(marker: Path, target: Target, image: Image, digest: str, dests: dict[str, tuple[str, str]]) -> None:
    record = {"registry": target.identity, "image_id": image.image_id, "digest": digest,
              "refs": sorted(f"{repo}:{tag}" for repo, tag in dests.values())}
    write_atomic(marker, json.dumps(record, indent=1) + "\n")
