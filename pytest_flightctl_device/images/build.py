"""Local image build: base first, then the variants in parallel on top of it, and the bundle.

Build args come from git when not given, every build streams its output to `progress` with a
`[variant]` prefix, and a failed build names the variant and quotes its last lines.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests

from pytest_flightctl_device.core.atomic import atomic_write
from pytest_flightctl_device.errors import ConfigError, PodmanError
from pytest_flightctl_device.images.podman import Podman, Progress
from pytest_flightctl_device.settings import Settings

TAIL_LINES = 25
# Errors podman 4.3 reports when another process removes images while a build checks its cache.
_STORE_RACES = ("layer not known", "image not known")
# Without an explicit OCI format the API builds docker-format images whose layers podman 4.3 never
# takes from its build cache; the podman CLI's default is OCI too.
OCI = "application/vnd.oci.image.manifest.v1+json"
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,100}")


def default_containerfiles() -> Path:
    """containerfiles/ of the checkout this package runs from."""
    return Path(__file__).resolve().parents[2] / "containerfiles"


def _git(args: Sequence[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_build_args(cwd: Path) -> dict[str, str]:
    """SOURCE_GIT_TAG (`v0.6.0-abc1234`), SOURCE_GIT_TREE_STATE (clean|dirty), SOURCE_GIT_COMMIT."""
    commit = _git(["rev-parse", "--short=7", "HEAD"], cwd)
    if commit is None:
        return {"SOURCE_GIT_TAG": "v0.0.0-unknown", "SOURCE_GIT_TREE_STATE": "unknown",
                "SOURCE_GIT_COMMIT": "unknown"}
    last_tag = _git(["describe", "--tags", "--abbrev=0"], cwd) or "v0.0.0"
    dirty = bool(_git(["status", "--porcelain", "--untracked-files=no"], cwd))
    return {"SOURCE_GIT_TAG": f"{last_tag}-{commit}",
            "SOURCE_GIT_TREE_STATE": "dirty" if dirty else "clean",
            "SOURCE_GIT_COMMIT": commit}


def check_tag(tag: str) -> str:
    if not _TAG_RE.fullmatch(tag):
        raise ConfigError(f"image tag {tag!r} is not a valid tag; use letters, digits, '.', '_' and "
                          "'-' (for example v0.6.0-abc1234).")
    return tag


@dataclass(frozen=True)
class BuildPlan:
    """What to build: the context, the tags, the build args."""

    containerfiles: Path
    rpms: Path | None
    tag: str
    build_args: Mapping[str, str]
    image_repo: str
    variants: tuple[str, ...]
    jobs: int
    base_image: str

    def ref(self, variant: str) -> str:
        return f"{self.image_repo}:{variant}-{self.tag}"


def plan(settings: Settings, cwd: Path | None = None) -> BuildPlan:
    """Check the inputs before anything builds; derive what was not given."""
    cwd = cwd or Path.cwd()
    root = settings.containerfiles or default_containerfiles()
    for variant in settings.variants:
        if not (root / f"Containerfile-{variant}").is_file():
            raise ConfigError(f"{root} has no Containerfile-{variant}; give --device-containerfiles "
                              "a directory with Containerfile-base, -v2, -v3 and -v4.")
    if settings.rpms is None and not (root / "rpms").is_dir():
        raise ConfigError(f"the build context {root} has no rpms/ directory; give --device-rpms DIR "
                          f"or create {root / 'rpms'} (empty installs the agent from COPR).")
    if settings.rpms is not None and not any(settings.rpms.glob("*.rpm")):
        raise ConfigError(f"--device-rpms {settings.rpms} holds no .rpm files; give the directory "
                          "the agent RPM build wrote.")
    args = git_build_args(cwd)
    tag = check_tag(settings.image_tag or args["SOURCE_GIT_TAG"])
    return BuildPlan(root, settings.rpms, tag, args, settings.image_repo, settings.variants,
                     settings.build_jobs, settings.base_image)


def _context_tar(root: Path, rpms: Path | None, with_rpms: bool) -> IO[bytes]:
    """The build context as a tar in a temp file; the RPMs only go to the base build."""
    out = tempfile.TemporaryFile()  # noqa: SIM115 - the caller closes it (a `with` around the call)
    with tarfile.open(fileobj=out, mode="w") as tar:
        for entry in sorted(root.iterdir()):
            if entry.name == "rpms" and (rpms is not None or not with_rpms):
                continue
            tar.add(entry, arcname=entry.name)
        if with_rpms and rpms is not None:
            tar.add(rpms, arcname="rpms", recursive=False)
            for rpm in sorted(rpms.glob("*.rpm")):
                tar.add(rpm, arcname=f"rpms/{rpm.name}")
        if not with_rpms:  # keep `COPY rpms/` valid in any Containerfile that names it
            info = tarfile.TarInfo("rpms")
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    out.seek(0)
    return out


def build_one(conn: Podman, plan_: BuildPlan, variant: str, progress: Progress) -> str:
    """Build one Containerfile; returns the image ID. Variants never pull."""
    args = dict(plan_.build_args)
    params: dict[str, object] = {"dockerfile": f"Containerfile-{variant}", "t": plan_.ref(variant),
                                 "layers": "true", "rm": "true", "forcerm": "true",
                                 "outputformat": OCI}
    if variant == "base":
        args["BASE_IMAGE"] = plan_.base_image
        params["pullpolicy"] = "missing"
    else:
        args["BASE_IMAGE"] = plan_.ref("base")
        params["pullpolicy"] = "never"
    params["buildargs"] = json.dumps(args)
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    image_id = None
    started = time.time()
    for attempt in range(1, 4):
        with _context_tar(plan_.containerfiles, plan_.rpms, variant == "base") as context:
            try:
                response = conn.api.post("/build", params=params, data=context, stream=True,
                                         headers={"Content-Type": "application/x-tar"})
                error = _follow(response, variant, tail, progress)
            except requests.RequestException as exc:
                error = f"connection to podman lost ({exc})"
        if error is None or not any(m in error for m in _STORE_RACES) or attempt == 3:
            break
        # another process removed an image while the cache was being checked: the build is fine
        progress(f"[{variant}] retrying: the image store changed during the build ({error})")
    if error is None and tail:
        last = tail[-1].strip()
        image_id = last if re.fullmatch(r"[0-9a-f]{64}", last) else conn.image_id(plan_.ref(variant))
    if error is not None or image_id is None:
        _remove_leftovers(conn, args["BASE_IMAGE"], started)
        lines = "\n".join(f"    {line}" for line in tail)
        raise PodmanError(f"building {variant} (Containerfile-{variant}) failed: {error or 'no image'}; "
                          f"fix the Containerfile or its inputs. Last lines:\n{lines}")
    return image_id


def _remove_leftovers(conn: Podman, from_ref: str, since: float) -> None:
    """A failed build leaves its last committed step as an untagged image (buildah 1.28): remove
    the untagged images this build made on top of `from_ref`, and nothing else."""
    from_id = conn.image_id(from_ref)
    if from_id is None:
        return
    images = conn.list_images(all_images=True)
    parents = {str(i["Id"]).removeprefix("sha256:"): str(i.get("ParentId") or "").removeprefix("sha256:")
               for i in images}
    for image in images:
        image_id = str(image["Id"]).removeprefix("sha256:")
        if image.get("RepoTags") or not image.get("Dangling") or image.get("Created", 0) < since - 1:
            continue
        parent, steps = parents.get(image_id, ""), 0
        while parent and parent != from_id and steps < 100:
            parent, steps = parents.get(parent, ""), steps + 1
        if parent == from_id:
            conn.api.delete(f"/images/{image_id}")


def _follow(response: requests.Response, variant: str, tail: collections.deque[str],
            progress: Progress) -> str | None:
    """Stream build output to progress; return the error text, if the build reported one."""
    if response.status_code >= 400:
        return response.text.strip()[:500]
    error = None
    pending = ""
    for raw in response.iter_lines():
        if not raw:
            continue
        try:
            item = json.loads(raw)
        except ValueError:
            item = {"stream": raw.decode(errors="replace")}
        if "error" in item:
            error = str(item["error"]).strip()
            tail.append(error)
            continue
        pending += str(item.get("stream", ""))
        *lines, pending = pending.split("\n")
        for line in lines:
            if line.strip():
                tail.append(line)
                progress(f"[{variant}] {line}")
    if pending.strip():
        tail.append(pending)
        progress(f"[{variant}] {pending}")
    return error


@dataclass(frozen=True)
class BuiltImages:
    refs: Mapping[str, str]  # variant -> ref
    ids: Mapping[str, str]  # variant -> image ID


def build_all(conn: Podman, plan_: BuildPlan, progress: Progress) -> BuiltImages:
    """Base first; then every variant concurrently (plan.jobs at a time) on top of the new base."""
    ids = {"base": build_one(conn, plan_, "base", progress)}
    progress(f"built {plan_.ref('base')}")
    variants = [v for v in plan_.variants if v != "base"]
    failures: list[PodmanError] = []
    if variants:
        with ThreadPoolExecutor(max_workers=min(plan_.jobs, len(variants))) as pool:
            futures = {v: pool.submit(build_one, conn, plan_, v, progress) for v in variants}
            for variant, future in futures.items():
                try:
                    ids[variant] = future.result()
                    progress(f"built {plan_.ref(variant)}")
                except PodmanError as exc:
                    failures.append(exc)
    if failures:
        raise PodmanError("\n".join(str(exc) for exc in failures))
    refs = {v: plan_.ref(v) for v in plan_.variants}
    return BuiltImages(refs, {v: ids[v] for v in plan_.variants})


def export_bundle(conn: Podman, built: BuiltImages, dest: Path, progress: Progress) -> Path:
    """All tags into one docker-archive (the multi-image export endpoint), written atomically."""
    return conn.export(list(built.refs.values()), dest, progress)


def copy_out(src: Path, dest: Path) -> Path:
    """Copy a cached artifact to a user path (temp + rename), leaving the cache entry intact."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as source, atomic_write(dest) as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return dest
