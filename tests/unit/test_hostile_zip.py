"""Hostile artifact zips: each is extracted correctly or refused with an ArtifactError, writing nowhere else.

Property-based (hypothesis) over member names (traversal, absolute, drive letters, backslashes,
arbitrary text), several members and directories, symlink members, compression methods, patched
header fields (absurd declared sizes, flags, methods, CRCs), truncation and a zip bomb within reason.
Where the verdict is known from how the zip was built, the test checks the verdict itself; a
zip extracted must give exactly the bytes that were put in.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from pytest_flightctl_device.artifacts.sources.zipmember import extract_single
from pytest_flightctl_device.errors import ArtifactError, DeviceError
from tests.support.hostile import BOUNDED, clear_error, jail, tree

TRAVERSAL = [".", "./", "./a:b", "x//..", "../x.tar", "a/../../x", "/etc/passwd", "/abs/x", "C:/x", "C:x",
             "..\\x", "a\\..\\..\\x", "..", "./../x", "a/b/../../../x", "\\\\server\\share\\x"]
PLAIN = ["agent-images-bundle.tar", "disk.qcow2", "a/b/c.bin", "./x", "x y", "ümlaut.tar", "-rf"]
NAMES = st.sampled_from(TRAVERSAL) | st.sampled_from(PLAIN) | st.text(min_size=1, max_size=40)
METHODS = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])


def escapes(name: str) -> bool:
    """The verdict of a safe extractor, computed here independently of the library: after
    dropping empty and "." components, a name must be relative, non-empty, without "..", and
    its first component must not carry a drive letter (C:)."""
    path = name.replace("\\", "/")
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return path.startswith("/") or not parts or ".." in parts or ":" in parts[0]


def build(members: list[tuple[str, bytes, int, int]]) -> bytes:
    """A zip of (name, data, method, unix mode) members, written like any archiver would."""
    out = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(out, "w") as archive:
        warnings.simplefilter("ignore")  # duplicate names are one of the hostile cases
        for name, data, method, mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            info.external_attr = mode << 16
            archive.writestr(info, data)
    return out.getvalue()


def patch(blob: bytes, field: str, value: int) -> bytes:
    """Overwrite one field of every central-directory and local header (sizes, flags, method, CRC)."""
    central = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"),
               "usize": (24, "<I"), "attr": (38, "<I")}
    local = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "csize": (18, "<I"),
             "usize": (22, "<I")}
    data = bytearray(blob)
    for signature, fields in ((b"PK\x01\x02", central), (b"PK\x03\x04", local)):
        if field not in fields:
            continue
        offset, fmt = fields[field]
        start = data.find(signature)
        while start != -1:
            limit = value & ((1 << (8 * struct.calcsize(fmt))) - 1)
            struct.pack_into(fmt, data, start + offset, limit)
            start = data.find(signature, start + 4)
    return bytes(data)


def run(blob: bytes) -> tuple[tuple[str, str] | None, BaseException | None, bytes | None]:
    """Extract `blob` in a jail: (result, error, bytes written); nothing may appear outside in/ and out/."""
    with jail("in", "out") as root:
        zip_path = root / "in" / "artifact.zip"
        zip_path.write_bytes(blob)
        dest = root / "out" / "member"
        try:
            result = extract_single(zip_path, dest, "hostile artifact")
        except DeviceError as exc:
            clear_error(exc)
            assert isinstance(exc, ArtifactError)
            assert not dest.exists(), "a refused zip left a partial file behind"
            assert tree(root / "out") == set()
            return None, exc, None
        assert tree(root / "out") == {"member"}, "extraction wrote other files"
        return result, None, dest.read_bytes()


@BOUNDED
@given(names=st.lists(NAMES, min_size=0, max_size=4), dirs=st.lists(NAMES, max_size=2),
       payload=st.binary(max_size=4096), method=METHODS, symlink=st.booleans())
@example(names=["agent-images-bundle.tar"], dirs=[], payload=b"tar", method=zipfile.ZIP_STORED,
         symlink=False)
@example(names=["../../escape"], dirs=[], payload=b"x", method=zipfile.ZIP_STORED, symlink=False)
@example(names=["link"], dirs=[], payload=b"../../../etc/passwd", method=zipfile.ZIP_STORED, symlink=True)
@example(names=["ok.tar"], dirs=["../up/"], payload=b"x", method=zipfile.ZIP_DEFLATED, symlink=False)
@example(names=[], dirs=["0\x00"], payload=b"", method=zipfile.ZIP_STORED, symlink=True)
@example(names=[], dirs=["\x00"], payload=b"", method=zipfile.ZIP_STORED, symlink=False)
def test_members_names_counts_and_kinds(names: list[str], dirs: list[str], payload: bytes, method: int,
                                        symlink: bool) -> None:
    members = [(name, payload, method, (stat.S_IFLNK | 0o777) if symlink else (stat.S_IFREG | 0o644))
               for name in names]
    members += [(d.rstrip("/") + "/", b"", zipfile.ZIP_STORED, stat.S_IFDIR | 0o755) for d in dirs]
    blob = build(members)
    archived = zipfile.ZipFile(io.BytesIO(blob)).infolist()  # names as zipfile reads them back
    stored = [i.filename for i in archived]
    files = [i for i in archived if not i.filename.endswith("/")]  # a name cut at NUL may be "" (no is_dir())
    # a directory name cut at a NUL ("0\x00/" -> "0") reads back as the one file: a link only if it was one
    link = len(files) == 1 and stat.S_ISLNK(files[0].external_attr >> 16)
    expected = (len(files) == 1 and not link and not any(escapes(n) for n in stored))
    result, error, written = run(blob)
    event("accepted" if result else "refused")
    if expected:
        assert error is None, f"refused a good zip {stored}: {error}"
        assert result is not None and written == payload
        assert result == (files[0].filename, hashlib.sha256(payload).hexdigest())
    else:
        assert error is not None, f"accepted a bad zip {stored} (symlink={link})"


FIELDS = st.sampled_from(["flags", "method", "crc", "csize", "usize", "attr"])
VALUES = (st.sampled_from([0, 1, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, 8, 12, 14, 99, 1 << 31])
          | st.integers(min_value=0, max_value=0xFFFFFFFF))


@BOUNDED
@given(payload=st.binary(min_size=1, max_size=2048), method=METHODS,
       patches=st.lists(st.tuples(FIELDS, VALUES), min_size=1, max_size=3),
       cut=st.none() | st.integers(min_value=0, max_value=4096))
@example(payload=b"x" * 100, method=zipfile.ZIP_STORED, patches=[("usize", 0xFFFFFFFE)], cut=None)
@example(payload=b"x" * 100, method=zipfile.ZIP_STORED, patches=[("flags", 1)], cut=None)
@example(payload=b"x" * 100, method=zipfile.ZIP_DEFLATED, patches=[("method", 99)], cut=None)
@example(payload=b"x" * 100, method=zipfile.ZIP_DEFLATED, patches=[("crc", 0)], cut=None)
def test_patched_headers_and_truncation(payload: bytes, method: int, patches: list[tuple[str, int]],
                                        cut: int | None) -> None:
    blob = build([("member.bin", payload, method, stat.S_IFREG | 0o644)])
    for field, value in patches:
        blob = patch(blob, field, value)
    if cut is not None:
        blob = blob[:cut]
    result, _error, written = run(blob)
    event("accepted" if result else "refused")
    if result is not None:  # whatever was patched, an accepted member must be the bytes put in
        assert written == payload, "accepted a zip but extracted other bytes than were archived"
        assert result[1] == hashlib.sha256(payload).hexdigest()


@BOUNDED
@given(data=st.binary(min_size=0, max_size=3000))
@example(data=b"PK\x05\x06" + b"\x00" * 18)
@example(data=b"PK\x03\x04" + b"\xff" * 60)
def test_arbitrary_bytes_are_refused(data: bytes) -> None:
    result, error, _ = run(data)
    assert result is None and error is not None


@functools.cache
def bomb() -> bytes:
    """64 MiB of zeros deflated to about 64 KiB: the largest ratio an honest artifact might show."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive, \
            archive.open("agent-images-bundle.tar", "w") as member:
        chunk = bytes(1 << 20)
        for _ in range(64):
            member.write(chunk)
    return out.getvalue()


def test_zip_bomb_within_reason_is_extracted_exactly() -> None:
    blob = bomb()
    assert len(blob) < 1 << 20
    result, error, written = run(blob)
    assert result is not None and result[0] == "agent-images-bundle.tar"
    assert error is None and written is not None
    assert len(written) == 64 << 20 and not written.strip(b"\x00")


def forged_zip64(declared: int) -> bytes:
    """A stored member of 10 bytes whose central directory claims `declared` bytes (ZIP64 extra)."""
    name, data = b"huge.tar", b"x" * 10
    crc = zlib.crc32(data)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0, 0, 0, 0x21, crc, 10, 10, len(name), 0)
    extra = struct.pack("<HHQ", 1, 8, declared)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 45, 45, 0, 0, 0, 0x21, crc, 10,
                          0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0o100644 << 16, 0) + name + extra
    body = local + name + data
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(central), len(body), 0)
    return body + central + end


def test_a_member_larger_than_the_free_space_is_refused_before_writing(tmp_path: Path) -> None:
    """A forged ZIP64 size (2**60 bytes) is refused up front instead of filling the disk."""
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(forged_zip64(1 << 60))
    assert zipfile.ZipFile(zip_path).infolist()[0].file_size == 1 << 60
    with pytest.raises(ArtifactError, match="declares 1152921504606846976 bytes") as info:
        extract_single(zip_path, tmp_path / "out", "forged")
    clear_error(info.value)
    assert not (tmp_path / "out").exists()


def test_the_error_lists_a_few_names_not_thousands(tmp_path: Path) -> None:
    blob = build([(f"m{i:05d}-" + "x" * 100, b"", zipfile.ZIP_STORED, stat.S_IFREG | 0o644)
                  for i in range(3000)])
    zip_path = tmp_path / "a.zip"
    zip_path.write_bytes(blob)
    with pytest.raises(ArtifactError, match="holds 3000") as info:
        extract_single(zip_path, tmp_path / "out", "many")
    assert "and 2995 more" in str(info.value) and len(str(info.value)) < 1000


def archiver_zip64(data: bytes, name: bytes = b"agent-images-bundle.tar") -> bytes:
    """A zip as upload-artifact v4 writes one above 4 GiB, shrunk: a stored member with a data
    descriptor whose local header holds no sizes, and ZIP64 sizes and offset only in the central
    directory, which ZIP64 end records locate."""
    crc = zlib.crc32(data)
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 45, 0x08, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
    descriptor = struct.pack("<4sIQQ", b"PK\x07\x08", crc, len(data), len(data))
    body = local + data + descriptor
    extra = struct.pack("<HHQQQ", 1, 24, len(data), len(data), 0)
    central = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x031E, 45, 0x08, 0, 0, 0x21, crc, 0xFFFFFFFF,
                          0xFFFFFFFF, len(name), len(extra), 0, 0, 0, 0o100644 << 16, 0xFFFFFFFF) + name + extra
    record_at = len(body) + len(central)
    record = struct.pack("<4sQHHIIQQQQ", b"PK\x06\x06", 44, 45, 45, 0, 0, 1, 1, len(central), len(body))
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, record_at, 1)
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + central + record + locator + end


@pytest.mark.parametrize("size", [0, 1, 5000, 300_000])
def test_zip64_sizes_only_in_the_central_directory(size: int) -> None:
    """What a streaming unzip cannot read: zipfile agrees with the bytes, and so must the one pass."""
    data = os.urandom(size)
    blob = archiver_zip64(data)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:  # the forged zip is a valid one
        assert archive.read("agent-images-bundle.tar") == data
    result, error, written = run(blob)
    assert error is None and written == data
    assert result == ("agent-images-bundle.tar", hashlib.sha256(data).hexdigest())


def test_zip64_member_crc_is_checked() -> None:
    blob = bytearray(archiver_zip64(b"x" * 1000))
    blob[30 + 23 + 5] ^= 0xFF  # one byte of the member's data, after the local header and name
    result, error, _ = run(bytes(blob))
    assert result is None and error is not None and "CRC" in str(error)
