"""Files on a remote libvirt host, through libvirt's storage API: the pool, the base, overlays, seeds.

A remote host cannot open this machine's paths, so everything a domain reads lives in one storage
pool there: `--device-libvirt-pool NAME`, or a dir pool `fcdev` at /var/lib/libvirt/images/fcdev
(a path libvirt's qemu can read) that the first worker defines and later ones find.

The base qcow2 is uploaded once per host, as a volume named by its sha256. Many workers (and
runs) may want it at once, and a volume cannot be renamed into place, so the claim is libvirt's
own atomic check-and-create: creating a volume whose name exists fails. The worker whose create
succeeds uploads; then it creates the sidecar `<base>.ok`, last. A base is used only once its
`.ok` exists, so a half-written upload is never visible; a waiting worker that sees the upload
stop growing for STALL_S (its uploader died) deletes it and claims again.

Per-session volumes (overlays, seeds, the owner record) are named under the janitor's labels,
see janitor.volume_prefix().
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from pytest_flightctl_device.errors import BootError, ConfigError

DEFAULT_POOL = "fcdev"
DEFAULT_POOL_PATH = "/var/lib/libvirt/images/fcdev"
BASE_PREFIX = "fcdev-base-"
DONE_SUFFIX = ".ok"
STALL_S = 120.0  # an upload that does not grow for this long is a dead uploader's
UPLOAD_WAIT_S = 3600.0
POLL_S = 0.5
CHUNK = 1024 * 1024
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def base_digest(path: Path) -> str:
    """The base image's sha256: the artifact cache names its objects by it; else hash the file."""
    stem = path.name.split(".")[0]
    if _SHA256_NAME.fullmatch(stem):
        return stem
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def base_digest_cached(path: Path) -> str:
    """base_digest(), once per file identity in this process."""
    stat = path.stat()
    key = (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = base_digest(path)
    return _DIGESTS[key]


def qcow2_virtual_size(path: Path) -> int:
    """The disk size a qcow2 declares (its header's size field), for an overlay of the same size."""
    with open(path, "rb") as handle:
        header = handle.read(32)
    if len(header) < 32 or header[:4] != b"QFI\xfb":
        raise ConfigError(f"{path} is not a qcow2 image; give a qcow2 with --device-qcow2.")
    size: int = struct.unpack(">Q", header[24:32])[0]
    return size


def _volume_xml(name: str, capacity: int, *, fmt: str, mode: int, backing: str | None = None) -> str:
    backing_xml = (f"<backingStore><path>{escape(backing)}</path><format type='qcow2'/></backingStore>"
                   if backing else "")
    return (f"<volume><name>{escape(name)}</name><capacity unit='bytes'>{capacity}</capacity>"
            f"<allocation unit='bytes'>0</allocation><target><format type='{fmt}'/>"
            f"<permissions><mode>{mode:04o}</mode></permissions></target>{backing_xml}</volume>")


def pool_xml(name: str, path: str) -> str:
    """A dir pool whose directory qemu (another user) can traverse and read."""
    return (f"<pool type='dir'><name>{escape(name)}</name><target><path>{escape(path)}</path>"
            "<permissions><mode>0755</mode></permissions></target></pool>")


def _exists_error(exc: Exception) -> bool:
    import libvirt

    code = exc.get_error_code() if isinstance(exc, libvirt.libvirtError) else None
    return code in (libvirt.VIR_ERR_STORAGE_VOL_EXIST, libvirt.VIR_ERR_OPERATION_FAILED) and \
        "exist" in str(exc)


class HostStore:
    """One remote host's pool, and the volumes this process puts there."""

    def __init__(self, conn: Any, label: str, pool_name: str | None, log: Callable[[str], None]) -> None:
        self.conn = conn
        self.label = label  # the host, as messages name it
        self.pool_name = pool_name or DEFAULT_POOL
        self.given = pool_name is not None
        self.log = log
        self._pool: Any = None
        self._bases: dict[str, str] = {}
        self.upload_seconds: dict[str, float] = {}  # digest -> seconds this process spent uploading it

    # -- the pool --------------------------------------------------------------------------------

    @property
    def pool(self) -> Any:
        if self._pool is None:
            self._pool = self._open_pool()
        return self._pool

    def _open_pool(self) -> Any:
        import libvirt

        try:
            pool = self.conn.storagePoolLookupByName(self.pool_name)
        except libvirt.libvirtError:
            if self.given:
                raise ConfigError(f"--device-libvirt-pool {self.pool_name}: no such storage pool on "
                                  f"{self.label}; create it there (virsh pool-define-as ...) or drop the "
                                  "option to let the plugin create its own.") from None
            pool = self._define_pool()
        if not pool.isActive():
            try:
                pool.create(0)
            except libvirt.libvirtError:
                if not pool.isActive():  # another worker started it meanwhile: fine
                    raise
        return pool

    def _define_pool(self) -> Any:
        """Define, build and autostart the plugin's dir pool; a worker that loses the race finds it."""
        import libvirt

        try:
            pool = self.conn.storagePoolDefineXML(pool_xml(self.pool_name, DEFAULT_POOL_PATH), 0)
        except libvirt.libvirtError:
            return self.conn.storagePoolLookupByName(self.pool_name)
        try:
            pool.build(0)
            pool.setAutostart(1)
        except libvirt.libvirtError as exc:
            if not pool.isActive():
                raise BootError(f"cannot create the storage pool {self.pool_name} at {DEFAULT_POOL_PATH} on "
                                f"{self.label} ({exc.get_error_message()}); give one with "
                                "--device-libvirt-pool NAME.") from None
        return pool

    def lookup(self, name: str) -> Any | None:
        import libvirt

        try:
            return self.pool.storageVolLookupByName(name)
        except libvirt.libvirtError:
            return None

    # -- the base, once per host ----------------------------------------------------------------

    def base(self, local: Path, digest: str) -> str:
        """The path on the host of the uploaded base image, uploading it first if no one has."""
        if digest not in self._bases:
            self._bases[digest] = self._obtain_base(local, digest)
        return self._bases[digest]

    def _obtain_base(self, local: Path, digest: str) -> str:
        import libvirt

        name = f"{BASE_PREFIX}{digest[:32]}.qcow2"
        deadline = time.monotonic() + UPLOAD_WAIT_S
        told = False
        while True:
            vol = self.lookup(name)
            if vol is not None and self.lookup(name + DONE_SUFFIX) is not None:
                return str(vol.path())
            if vol is None:
                size = local.stat().st_size
                try:
                    vol = self.pool.createXML(_volume_xml(name, size, fmt="raw", mode=0o644), 0)
                except libvirt.libvirtError as exc:
                    if not _exists_error(exc):
                        raise BootError(f"cannot create the base image volume on {self.label}: "
                                        f"{exc.get_error_message()}") from None
                    continue  # another worker claimed it first: wait for its upload
                return self._upload_base(vol, local, name, size)
            if not told:
                self.log(f"waiting for another worker's upload of the base image to {self.label}")
                told = True
            self._wait_for_upload(name, deadline)

    def _upload_base(self, vol: Any, local: Path, name: str, size: int) -> str:
        import libvirt

        self.log(f"uploading the base image ({size / 2**20:.0f} MiB) to {self.label}")
        started = time.monotonic()
        try:
            self.upload_file(vol, local)
            self.pool.createXML(_volume_xml(name + DONE_SUFFIX, 0, fmt="raw", mode=0o644), 0)
        except BaseException:
            with _suppress_libvirt():
                vol.delete(0)
            raise
        self.upload_seconds[name] = time.monotonic() - started
        try:
            return str(self.pool.storageVolLookupByName(name).path())
        except libvirt.libvirtError as exc:
            raise BootError(f"the base image volume vanished on {self.label}: {exc.get_error_message()}") from None

    def _wait_for_upload(self, name: str, deadline: float) -> None:
        """Until the `.ok` sidecar appears, the volume is gone, or it has stalled (then delete it)."""
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self.lookup(name + DONE_SUFFIX) is not None:
                return
            vol = self.lookup(name)
            if vol is None:
                return
            with _suppress_libvirt():
                allocation = int(vol.info()[2])
                if allocation != last:
                    last, since = allocation, time.monotonic()
                elif time.monotonic() - since > STALL_S:
                    self.log(f"the base image upload to {self.label} stalled (its uploader died?); "
                             "uploading it again")
                    vol.delete(0)
                    return
            time.sleep(POLL_S)
        raise BootError(f"the base image upload to {self.label} did not finish within {UPLOAD_WAIT_S:.0f} s.")

    # -- per-boot volumes -------------------------------------------------------------------------

    def overlay(self, name: str, base_path: str, capacity: int) -> str:
        """A qcow2 volume over the uploaded base (0600: the guest writes its secrets into it)."""
        vol = self._create(_volume_xml(name, capacity, fmt="qcow2", mode=0o600, backing=base_path))
        return str(vol.path())

    def upload(self, name: str, local: Path, *, mode: int = 0o600) -> str:
        """A raw volume holding `local`'s bytes (the seed ISO, the owner record)."""
        vol = self._create(_volume_xml(name, local.stat().st_size, fmt="raw", mode=mode))
        try:
            self.upload_file(vol, local)
        except BaseException:
            with _suppress_libvirt():
                vol.delete(0)
            raise
        return str(vol.path())

    def _create(self, xml: str) -> Any:
        import libvirt

        try:
            return self.pool.createXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise BootError(f"cannot create a volume in pool {self.pool_name} on {self.label}: "
                            f"{exc.get_error_message()}") from None

    def upload_file(self, vol: Any, local: Path) -> None:
        size = local.stat().st_size
        stream = self.conn.newStream(0)
        vol.upload(stream, 0, size, 0)
        try:
            with open(local, "rb") as handle:
                stream.sendAll(lambda _stream, nbytes, _opaque: handle.read(min(nbytes, CHUNK)), None)
            stream.finish()
        except BaseException:
            with _suppress_libvirt():
                stream.abort()
            raise

    def delete(self, name: str) -> None:
        """Remove a volume; one that is gone already is the goal."""
        vol = self.lookup(name)
        if vol is not None:
            with _suppress_libvirt():
                vol.delete(0)


def read_volume(conn: Any, vol: Any, limit: int = 64 * 1024) -> bytes:
    """A small volume's bytes (the janitor's owner records)."""
    size = min(int(vol.info()[1]), limit)
    chunks: list[bytes] = []
    stream = conn.newStream(0)
    vol.download(stream, 0, size, 0)
    stream.recvAll(lambda _stream, data, _opaque: chunks.append(data), None)
    stream.finish()
    return b"".join(chunks)


def _suppress_libvirt() -> contextlib.suppress:
    """contextlib.suppress(libvirtError), libvirt imported only when used."""
    import libvirt

    return contextlib.suppress(libvirt.libvirtError)
