"""The one file of an upload-artifact v4 zip in one pass: central directory first, then the stream.

The central directory (EOCD, ZIP64 EOCD, its entries) comes from the zip's tail, read before the
body (a Range request, or a seek in a local file). It says where the member's bytes lie, their
sizes, CRC and method, so the whole zip can then stream by once (through the GitHub digest)
while only the member's bytes are written, inflated if needed, with sha256 and CRC-32 on the
way. Stored members with a data descriptor (level 0) and ZIP64 sizes need nothing more; that
is what a streaming unzip of the local headers alone cannot do.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pytest_flightctl_device.artifacts.sources.http import Consumer, Writeback, pump, write_all
from pytest_flightctl_device.core.atomic import write_atomic
from pytest_flightctl_device.errors import ArtifactError

CHUNK = 1 << 20
MAX_NAMES_SHOWN = 5
TAIL = 1 << 17  # EOCD + the longest comment + ZIP64 records + a one-entry directory, with room
MAX_DIRECTORY = 64 << 20
PREFIX_LIMIT = 1 << 20  # zip bytes before the member's data kept for a resume by a later process
METHODS = {0: "stored", 8: "deflate", 12: "bzip2", 14: "lzma"}
Reader = Callable[[int, int], bytes]
"""Bytes [start, end) of the zip."""

_EOCD, _LOC64, _EOCD64, _CENTRAL, _LOCAL = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06", b"PK\x01\x02", b"PK\x03\x04"
_MAX32 = 0xFFFFFFFF


@dataclass(frozen=True)
class Member:
    """One central-directory entry (sizes already widened by its ZIP64 extra field)."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    csize: int
    usize: int
    offset: int
    attr: int

    def is_dir(self) -> bool:
        return self.name.endswith("/")


@dataclass(frozen=True)
class Plan:
    """What one pass needs: the member, the zip's size, and where its central directory starts."""

    member: Member
    total: int
    directory: int


def corrupt(label: str, why: str) -> ArtifactError:
    return ArtifactError(f"{label}: the artifact is not a readable zip ({why}); run again to fetch it afresh.")


def safe_name(name: str, label: str) -> str:
    """The member's file name, or ArtifactError when it would land outside the target directory."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise ArtifactError(
            f"{label}: zip member {name!r} would escape the target directory; refusing this artifact "
            "(re-upload it with a plain file name)."
        )
    return str(path)


# -- the central directory ----------------------------------------------------------------------


def read_plan(tail: bytes, tail_start: int, total: int, read: Reader, label: str) -> Plan:
    """The plan from the zip's last bytes (`tail` starts at `tail_start`); `read` fetches any others."""
    if tail_start + len(tail) != total:
        raise corrupt(label, "its tail does not reach its end")

    def span(start: int, end: int) -> bytes:
        if start >= tail_start:
            return tail[start - tail_start:end - tail_start]
        data = read(start, end)
        if len(data) != end - start:
            raise corrupt(label, "a part of it could not be read")
        return data

    at = _find_end(tail, label)
    end_at = tail_start + at
    _sig, disk, cd_disk, on_disk, count, size, offset, _comment = struct.unpack_from("<4sHHHHIIH", tail, at)
    directory_end = end_at
    if at >= 20 and tail[at - 20:at - 16] == _LOC64:
        _sig, _disk, record_at, disks = struct.unpack_from("<4sIQI", tail, at - 20)
        if disks > 1 or record_at + 56 > end_at - 20:
            raise corrupt(label, "a ZIP64 end record that is split or out of place")
        record = span(record_at, record_at + 56)
        if record[:4] != _EOCD64:
            raise corrupt(label, "no ZIP64 end of central directory record where its locator points")
        (_sig, _size, _made, _needed, disk, cd_disk, on_disk, count, size,
         offset) = struct.unpack_from("<4sQHHIIQQQQ", record)
        directory_end = record_at
    if disk or cd_disk or on_disk != count:
        raise corrupt(label, "a zip split over several disks")
    if offset + size != directory_end or size > MAX_DIRECTORY:
        raise corrupt(label, "a central directory out of place")
    members = _entries(span(offset, offset + size), count, label)
    member = _only_file(members, label)
    if member.offset + 30 + len(member.raw_name) + member.csize > offset:
        raise corrupt(label, "its member's data runs into the central directory")
    return Plan(member=member, total=total, directory=offset)


def _find_end(tail: bytes, label: str) -> int:
    """Where the end of central directory record starts: the last one whose comment ends the zip."""
    floor = max(0, len(tail) - 22 - 0xFFFF)
    pos = len(tail) - 22
    while pos >= floor:
        pos = tail.rfind(_EOCD, floor, pos + 4)
        if pos < 0:
            break
        (comment,) = struct.unpack_from("<H", tail, pos + 20)
        if pos + 22 + comment == len(tail):
            return pos
        pos -= 1
    raise corrupt(label, "no end of central directory record")


def _entries(data: bytes, count: int, label: str) -> list[Member]:
    members: list[Member] = []
    pos = 0
    while pos < len(data):
        if len(members) >= count or data[pos:pos + 4] != _CENTRAL or pos + 46 > len(data):
            raise corrupt(label, "a broken central directory")
        (_sig, _made, _system, _needed, _reserved, flags, method, _time, _date, crc, csize, usize, name_len,
         extra_len, comment_len, _disk, _internal, attr, offset) = struct.unpack_from("<4s4B4HL2L5H2L", data, pos)
        raw_name = data[pos + 46:pos + 46 + name_len]
        extra = data[pos + 46 + name_len:pos + 46 + name_len + extra_len]
        pos += 46 + name_len + extra_len + comment_len
        if pos > len(data):
            raise corrupt(label, "a central directory entry cut short")
        usize, csize, offset = _zip64(extra, usize, csize, offset, label)
        try:
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise corrupt(label, "a member name that is not valid UTF-8") from None
        name = name.split("\x00", 1)[0]  # as zipfile reads it
        members.append(Member(name, raw_name, flags, method, crc, csize, usize, offset, attr))
    if len(members) != count:
        raise corrupt(label, "fewer central directory entries than its end record counts")
    return members


def _zip64(extra: bytes, usize: int, csize: int, offset: int, label: str) -> tuple[int, int, int]:
    """Sizes and offset, the 0xFFFFFFFF ones replaced from the ZIP64 extra field, in its order."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            raise corrupt(label, "a corrupt extra field")
        if tag == 1:
            values = [v for (v,) in struct.iter_unpack("<Q", extra[pos + 4:pos + 4 + size - size % 8])]
            wanted = [usize == _MAX32, csize == _MAX32, offset == _MAX32]
            if sum(wanted) > len(values):
                raise corrupt(label, "a ZIP64 extra field shorter than the sizes it stands for")
            found = iter(values)
            usize, csize, offset = (next(found) if want else value
                                    for want, value in zip(wanted, (usize, csize, offset), strict=True))
        pos += 4 + size
    return usize, csize, offset


def _only_file(members: list[Member], label: str) -> Member:
    for member in members:
        safe_name(member.name, label)
    files = [member for member in members if not member.is_dir()]
    if len(files) != 1:
        shown = [repr(member.name) for member in files[:MAX_NAMES_SHOWN]]
        more = f" and {len(files) - MAX_NAMES_SHOWN} more" if len(files) > MAX_NAMES_SHOWN else ""
        names = (", ".join(shown) + more) or "none"
        raise ArtifactError(
            f"{label}: the artifact zip should hold exactly one file but holds {len(files)} ({names}); "
            "check the artifact name prefix."
        )
    member = files[0]
    if stat.S_ISLNK(member.attr >> 16):
        raise ArtifactError(
            f"{label}: the artifact zip's member {member.name!r} is a symbolic link, not a file; "
            "upload the file itself."
        )
    if member.flags & 0x1:
        raise ArtifactError(
            f"{label}: the artifact zip's member {member.name!r} is encrypted; upload it unencrypted."
        )
    if member.method not in METHODS:
        raise ArtifactError(
            f"{label}: the artifact zip's member {member.name!r} uses compression method {member.method}, "
            "which this plugin cannot read; upload it stored or deflated."
        )
    return member


def check_room(plan: Plan, directory: Path, label: str) -> None:
    """Refuse before writing when the member cannot fit on the filesystem (or its sizes disagree)."""
    member = plan.member
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and member.usize > free:
        raise ArtifactError(
            f"{label}: the artifact zip's member declares {member.usize} bytes but only {free} are free "
            f"under {directory}; free some space (or the artifact is corrupt: re-upload it)."
        )
    if member.method == 0 and member.csize != member.usize:
        raise corrupt(label, f"a stored member of {member.csize} bytes that declares {member.usize}")


# -- the stream ----------------------------------------------------------------------------------


class _Inflater:
    """Decompresses a member's bytes in bounded pieces (a zip bomb never needs more than CHUNK)."""

    def __init__(self, method: int, label: str) -> None:
        self.method = method
        self.label = label
        self.header = b""
        self.engine: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor | None = None
        if method == 8:
            self.engine = zlib.decompressobj(-15)
        elif method == 12:
            self.engine = bz2.BZ2Decompressor()
        self.trailing = False

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        try:
            yield from self._feed(data)
        except (zlib.error, OSError, EOFError, ValueError, lzma.LZMAError) as exc:
            raise corrupt(self.label, f"its member does not decompress: {exc}") from None

    def _feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        if self.method == 14 and self.engine is None:
            data = self._lzma_header(bytes(data))
            if self.engine is None:
                return
        engine = self.engine
        if self.method == 8:
            assert isinstance(engine, type(zlib.decompressobj()))
            while True:
                out = engine.decompress(data, CHUNK)
                if out:
                    yield out
                data = engine.unconsumed_tail
                if engine.eof or (not data and len(out) < CHUNK):
                    break
            self.trailing = self.trailing or bool(engine.unused_data)
            return
        assert isinstance(engine, bz2.BZ2Decompressor | lzma.LZMADecompressor)
        if engine.eof:
            self.trailing = self.trailing or bool(data)
            return
        out = engine.decompress(data, CHUNK)
        while True:
            if out:
                yield out
            if engine.eof or engine.needs_input:
                break
            out = engine.decompress(b"", CHUNK)
        self.trailing = self.trailing or bool(engine.unused_data)

    def _lzma_header(self, data: bytes) -> bytes:
        """Zip's LZMA: version (2), properties size (2), properties, then a raw LZMA1 stream."""
        self.header += data
        if len(self.header) < 4:
            return b""
        (size,) = struct.unpack_from("<H", self.header, 2)
        if len(self.header) < 4 + size:
            return b""
        props, rest = self.header[4:4 + size], self.header[4 + size:]
        if size != 5:
            raise ValueError("LZMA properties of an unexpected size")
        (dictionary,) = struct.unpack_from("<I", props, 1)
        lc, lp, pb = props[0] % 9, props[0] // 9 % 5, props[0] // 45
        self.engine = lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[
            {"id": lzma.FILTER_LZMA1, "dict_size": dictionary, "lc": lc, "lp": lp, "pb": pb}])
        return rest

    @property
    def done(self) -> bool:
        return self.engine is not None and bool(self.engine.eof) and not self.trailing


class MemberSink:
    """A Sink for the whole zip that writes only its member to `dest`, checking it on the way.

    sha256 of every zip byte (the GitHub digest) and, of the member's bytes, sha256 and CRC-32,
    each on its own thread. With `resumable`, a stored member killed half-way resumes in a later
    process: the zip bytes before the member are kept beside it and the partial file is re-hashed.
    """

    def __init__(self, plan: Plan, dest: Path, label: str, *, resumable: bool = False, identity: str = "",
                 ) -> None:
        self.plan = plan
        self.dest = dest
        self.label = label
        self.state = dest.with_name(dest.name + ".json") if resumable else None
        self.identity = {"zip": identity, "name": plan.member.name, "crc": plan.member.crc,
                         "size": plan.member.csize, "total": plan.total, "offset": plan.member.offset}
        self._fd: int | None = None
        self._writeback: Writeback | None = None
        self._reset()

    def _reset(self) -> None:
        member = self.plan.member
        self.position = 0
        self.zip_hash = hashlib.sha256()
        self.member_hash = hashlib.sha256()
        self.crc = 0
        self.written = 0
        self.start: int | None = None  # where the member's data begins, once its local header passed by
        self._head_from = 0 if member.offset <= PREFIX_LIMIT else member.offset
        self._head = bytearray()
        self._want = member.offset + 30
        self._inflater = _Inflater(member.method, self.label) if member.method else None

    # -- Sink ----------------------------------------------------------------------------------

    def open(self) -> int:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        saved = self._saved()
        size = self.dest.stat().st_size if saved and self.dest.exists() else -1
        if saved is None or not 0 <= size <= self.plan.member.csize:
            if self.state is not None:
                self.state.unlink(missing_ok=True)
            self._fd = os.open(self.dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._writeback = Writeback(self._fd)
            return self.position
        self._fd = os.open(self.dest, os.O_RDWR)
        self.start, prefix = saved
        self.zip_hash.update(prefix)
        while chunk := os.read(self._fd, CHUNK):  # a killed process left this: hash it and go on
            self.zip_hash.update(chunk)
            self.member_hash.update(chunk)
            self.crc = zlib.crc32(chunk, self.crc)
            self.written += len(chunk)
        self.position = self.start + self.written
        self._writeback = Writeback(self._fd, self.written)
        return self.position

    def restart(self) -> None:
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        if self.state is not None:
            self.state.unlink(missing_ok=True)
        self._writeback = Writeback(self._fd)
        self._reset()

    def before(self, view: memoryview, offset: int) -> None:
        self.position = offset + len(view)
        if self.start is None:
            self._local_header(view, offset)

    def consumers(self) -> Sequence[Consumer]:
        if self._inflater is None:
            return (self._zip, self._write, self._member_sha, self._crc)
        return (self._zip, self._inflate)

    def validator(self) -> str:
        return ""  # signed URLs change with every redirect; the digest checks the whole zip instead

    def started(self, response: object) -> None:
        pass

    def finish(self) -> str:
        """Returns the zip's sha256; `verify()` then checks the member (after the caller's digest check)."""
        self.close()
        return self.zip_hash.hexdigest()

    def verify(self) -> None:
        """The member is complete and intact: every byte, its size, CRC-32 and end of stream."""
        member = self.plan.member
        if self.position != self.plan.total or self.start is None:
            raise corrupt(self.label, f"it ended at byte {self.position} of {self.plan.total}")
        if self._inflater is not None and not self._inflater.done:
            raise corrupt(self.label, "its compressed member is cut short or has bytes after its end")
        if self.written != member.usize:
            raise corrupt(self.label, f"its member holds {self.written} bytes, not the {member.usize} it declares")
        if self.crc != member.crc:
            raise corrupt(self.label, "its member's CRC-32 does not match")
        if self.state is not None:
            self.state.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def member_digest(self) -> str:
        return self.member_hash.hexdigest()

    # -- the local header, on the receiving thread ----------------------------------------------

    def _local_header(self, view: memoryview, offset: int) -> None:
        member = self.plan.member
        end = offset + len(view)
        while self.start is None:
            have = self._head_from + len(self._head)
            if have < offset:
                raise corrupt(self.label, "a gap in the stream before its member")  # not reachable in order
            take = min(end, self._want)
            if take > have:
                self._head += view[have - offset:take - offset]
            if self._head_from + len(self._head) < self._want:
                return
            at = member.offset - self._head_from
            if self._want == member.offset + 30:
                (sig, _version, _flags, _method, _time, _date, _crc, _csize, _usize, name_len,
                 extra_len) = struct.unpack_from("<4sHHHHHIIIHH", self._head, at)
                if sig != _LOCAL:
                    raise corrupt(self.label, "no local header where its central directory points")
                self._want = member.offset + 30 + name_len + extra_len
                if self._want + member.csize > self.plan.directory:
                    raise corrupt(self.label, "its member's data runs into the central directory")
                continue
            (name_len,) = struct.unpack_from("<H", self._head, at + 26)
            if bytes(self._head[at + 30:at + 30 + name_len]) != member.raw_name:
                raise corrupt(self.label, "a local header that names another file than its central directory")
            self.start = self._want
            self._save()

    def _saved(self) -> tuple[int, bytes] | None:
        """(start, the zip bytes before it) that a killed process left for a stored member, or None."""
        if self.state is None or self.plan.member.method != 0:
            return None
        try:
            data = json.loads(self.state.read_text())
            start, prefix = data["start"], bytes.fromhex(data["prefix"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if data.get("identity") != self.identity or not isinstance(start, int) or len(prefix) != start:
            return None
        return start, prefix

    def _save(self) -> None:
        if self.state is not None and self._head_from == 0 and self.start is not None and self._inflater is None:
            write_atomic(self.state, json.dumps({"identity": self.identity, "start": self.start,
                                                 "prefix": bytes(self._head[:self.start]).hex()}))
        self._head = bytearray()

    # -- consumers, each on its own thread --------------------------------------------------------

    def _piece(self, view: memoryview, offset: int) -> memoryview | None:
        start = self.start
        if start is None:  # a buffer taken before the local header ended holds no member bytes
            return None
        low, high = max(offset, start), min(offset + len(view), start + self.plan.member.csize)
        return view[low - offset:high - offset] if low < high else None

    def _zip(self, view: memoryview, _offset: int) -> None:
        self.zip_hash.update(view)

    def _write(self, view: memoryview, offset: int) -> None:
        if (piece := self._piece(view, offset)) is not None:
            assert self._fd is not None and self._writeback is not None
            write_all(self._fd, piece)
            self.written += len(piece)
            self._writeback.wrote(self.written)

    def _member_sha(self, view: memoryview, offset: int) -> None:
        if (piece := self._piece(view, offset)) is not None:
            self.member_hash.update(piece)

    def _crc(self, view: memoryview, offset: int) -> None:
        if (piece := self._piece(view, offset)) is not None:
            self.crc = zlib.crc32(piece, self.crc)

    def _inflate(self, view: memoryview, offset: int) -> None:
        if (piece := self._piece(view, offset)) is None:
            return
        assert self._inflater is not None and self._fd is not None
        for out in self._inflater.feed(piece):
            if self.written + len(out) > self.plan.member.usize:
                raise corrupt(self.label, f"its member expands beyond the {self.plan.member.usize} bytes it declares")
            write_all(self._fd, out)
            self.member_hash.update(out)
            self.crc = zlib.crc32(out, self.crc)
            self.written += len(out)
            if self._writeback is not None:
                self._writeback.wrote(self.written)


def extract_single(zip_path: Path, dest: Path, label: str) -> tuple[str, str]:
    """Write a local zip's only file to `dest`; returns (its name in the zip, sha256 of its bytes)."""
    try:
        handle = zip_path.open("rb", buffering=0)
    except OSError as exc:
        raise corrupt(label, exc.strerror or str(exc)) from None
    with handle:
        total = os.fstat(handle.fileno()).st_size

        def read(start: int, end: int) -> bytes:
            handle.seek(start)
            return handle.read(end - start) or b""

        tail_start = max(0, total - TAIL)
        plan = read_plan(read(tail_start, total), tail_start, total, read, label)
        check_room(plan, dest.parent, label)
        sink = MemberSink(plan, dest, label)
        try:
            sink.open()
            handle.seek(0)
            pump(sink, handle, label)
            sink.finish()
            sink.verify()
        except BaseException:
            sink.close()
            dest.unlink(missing_ok=True)
            raise
    return plan.member.name, sink.member_digest()
