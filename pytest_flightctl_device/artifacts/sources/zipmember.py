"""Take the one file out of an upload-artifact v4 zip, streaming, hashing what it writes.

The zip is read from disk through its central directory (Python's zipfile), which handles
stored entries with data descriptors (level 0) and ZIP64 sizes; a streaming unzip of the
download cannot, so the zip is downloaded first. The CRC is checked by zipfile as it reads.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from pytest_flightctl_device.artifacts.sources.http import write_all
from pytest_flightctl_device.errors import ArtifactError

CHUNK = 1 << 20
MAX_NAMES_SHOWN = 5


def safe_name(name: str, label: str) -> str:
    """The member's file name, or ArtifactError when it would land outside the target directory."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or ":" in path.parts[0]:
        raise ArtifactError(
            f"{label}: zip member {name!r} would escape the target directory; refusing this artifact "
            "(re-upload it with a plain file name)."
        )
    return str(path)


def single_member(zip_path: Path, label: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo]:
    """The open zip and its only file entry; ArtifactError for a corrupt zip or not exactly one file."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ArtifactError(
            f"{label}: the downloaded artifact is not a readable zip ({exc}); run again to fetch it afresh."
        ) from None
    try:
        return archive, _only_file(archive, label)
    except BaseException:
        archive.close()
        raise


def _only_file(archive: zipfile.ZipFile, label: str) -> zipfile.ZipInfo:
    files = [info for info in archive.infolist() if not info.is_dir()]
    for info in archive.infolist():
        safe_name(info.filename, label)
    if len(files) != 1:
        shown = [repr(info.filename) for info in files[:MAX_NAMES_SHOWN]]
        more = f" and {len(files) - MAX_NAMES_SHOWN} more" if len(files) > MAX_NAMES_SHOWN else ""
        names = (", ".join(shown) + more) or "none"
        raise ArtifactError(
            f"{label}: the artifact zip should hold exactly one file but holds {len(files)} ({names}); "
            "check the artifact name prefix."
        )
    info = files[0]
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ArtifactError(
            f"{label}: the artifact zip's member {info.filename!r} is a symbolic link, not a file; "
            "upload the file itself."
        )
    if info.flag_bits & 0x1:
        raise ArtifactError(
            f"{label}: the artifact zip's member {info.filename!r} is encrypted; upload it unencrypted."
        )
    return info


def _check_room(dest: Path, info: zipfile.ZipInfo, label: str) -> None:
    """Refuse before writing when the member's declared size cannot fit on dest's filesystem."""
    try:
        free = shutil.disk_usage(dest.parent).free
    except OSError:
        return
    if info.file_size > free:
        raise ArtifactError(
            f"{label}: the artifact zip's member declares {info.file_size} bytes but only {free} are free "
            f"under {dest.parent}; free some space (or the artifact is corrupt: re-upload it)."
        )


def extract_single(zip_path: Path, dest: Path, label: str) -> tuple[str, str]:
    """Write the zip's only file to `dest`; returns (its name in the zip, sha256 of the bytes written)."""
    archive, info = single_member(zip_path, label)
    digest = hashlib.sha256()
    with archive:
        _check_room(dest, info, label)
        try:
            with archive.open(info) as source:
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    while chunk := source.read(CHUNK):
                        write_all(fd, chunk)
                        digest.update(chunk)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
                RuntimeError, zlib.error, lzma.LZMAError) as exc:
            dest.unlink(missing_ok=True)
            raise ArtifactError(
                f"{label}: the artifact zip is corrupt or unsupported ({exc}); run again to download it "
                "afresh."
            ) from None
    return info.filename, digest.hexdigest()
