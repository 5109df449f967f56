"""Debian package versions and .deb files for the test guests, through the host's apt.

Versions come from the host's apt lists (`apt-cache policy`), so a guest's cache key names the exact
package versions it is built from. Resolving costs about half a second per apt call, so the answer is
memoised under the cache dir, keyed by the apt lists' and dpkg status' size and mtime: a cache hit of
a guest stays in the millisecond range until `apt-get update` or a package install changes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

APT_LISTS = Path("/var/lib/apt/lists")
DPKG_STATUS = Path("/var/lib/dpkg/status")


class AptError(RuntimeError):
    """apt could not name or fetch a package the guest recipe needs."""


def _lists_fingerprint() -> str:
    """What the versions apt would pick depend on: the lists' and dpkg status' size and mtime."""
    parts: list[str] = []
    for path in [*sorted(APT_LISTS.glob("*")), DPKG_STATUS]:
        if path.is_file():
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise AptError(f"`{' '.join(args)}` failed ({proc.stderr.strip()[-300:]}); run `apt-get update` and retry.")
    return proc.stdout


def _candidates(names: list[str]) -> dict[str, str]:
    """Candidate version of each package in one `apt-cache policy` call."""
    out = _run(["apt-cache", "policy", *names])
    found: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            current = line[:-1]
        elif line.strip().startswith("Candidate:") and current:
            found[current] = line.split(":", 1)[1].strip()
    missing = [n for n in names if found.get(n, "(none)") == "(none)"]
    if missing:
        raise AptError(f"apt has no candidate for {', '.join(missing)}; run `apt-get update` and retry.")
    return found


def _kernel_package(meta_version: str) -> str:
    """The versioned image package (linux-image-6.1.0-NN-cloud-amd64) the metapackage depends on."""
    out = _run(["apt-cache", "show", f"linux-image-cloud-amd64={meta_version}"])
    match = re.search(r"^Depends:.*?(linux-image-[0-9][^ ,]*-cloud-amd64)", out, re.MULTILINE)
    if match is None:
        raise AptError("cannot find the kernel package linux-image-cloud-amd64 depends on; run `apt-get update`.")
    return match.group(1)


def host_versions(names: list[str]) -> dict[str, str]:
    """Installed versions of host packages whose files end up in a guest (the syslinux boot code)."""
    out = _run(["dpkg-query", "-W", "-f", "${Package}=${Version}\\n", *names])
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def resolve(names: list[str], memo_dir: Path, host: list[str]) -> dict[str, str]:
    """Exact versions for `names` plus the versioned kernel image package (the mirror's candidates),
    and the installed versions of `host` packages as "host:NAME".

    Memoised in `memo_dir` per apt-lists fingerprint (see the module docstring).
    """
    wanted = sorted(set(names) | {"linux-image-cloud-amd64"})
    tag = _lists_fingerprint() + repr(wanted) + repr(sorted(host))
    memo = memo_dir / f"apt-{hashlib.sha256(tag.encode()).hexdigest()[:24]}.json"
    try:
        cached: dict[str, str] = json.loads(memo.read_text())
        return cached
    except (OSError, ValueError):
        pass
    versions = _candidates(wanted)
    image = _kernel_package(versions["linux-image-cloud-amd64"])
    versions[image] = _candidates([image])[image]
    for name, version in host_versions(host).items():
        versions[f"host:{name}"] = version
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(versions, sort_keys=True))
    tmp.chmod(0o644)
    os.replace(tmp, memo)
    return versions


def download(pins: dict[str, str], deb_dir: Path) -> dict[str, Path]:
    """Fetch `name=version` .debs into `deb_dir` (kept across builds) and return their paths."""
    deb_dir.mkdir(parents=True, exist_ok=True)

    def existing(name: str, version: str) -> Path | None:
        stem = f"{name}_{version.replace(':', '%3a')}"
        for arch in ("amd64", "all"):
            if (deb_dir / f"{stem}_{arch}.deb").exists():
                return deb_dir / f"{stem}_{arch}.deb"
        return None

    todo = [f"{n}={v}" for n, v in pins.items() if existing(n, v) is None]
    if todo:
        with tempfile.TemporaryDirectory(dir=deb_dir) as tmp:
            proc = subprocess.run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *todo],
                cwd=tmp, capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise AptError(f"apt-get download {' '.join(todo)} failed: {proc.stderr.strip()[-400:]}")
            for deb in Path(tmp).glob("*.deb"):
                deb.chmod(0o644)
                os.replace(deb, deb_dir / deb.name)
    paths: dict[str, Path] = {}
    for name, version in pins.items():
        found = existing(name, version)
        if found is None:
            raise AptError(f"apt-get download did not produce {name}={version}; check the apt sources.")
        paths[name] = found
    return paths


def extract(deb: Path, dest: Path) -> None:
    """Unpack a .deb's data into `dest` (dpkg-deb -x: no maintainer scripts run)."""
    if shutil.which("dpkg-deb") is None:
        raise AptError("dpkg-deb is not installed; install the dpkg package.")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
