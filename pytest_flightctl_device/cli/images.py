"""flightctl-device build | bundle | qcow2 | load: the image steps the CI jobs and developers run.

Each option maps to the knob of the same name, so FLIGHTCTL_DEVICE_* env vars apply here too;
the pytest plugin (--device-build) runs the very same library functions.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import build, podman
from pytest_flightctl_device.settings import Settings


def _settings(args: argparse.Namespace, **extra: Any) -> Settings:
    names = ("rpms", "containerfiles", "image_repo", "base_image", "variants", "build_jobs",
             "podman_url", "bib_image", "bib_config", "bib_timeout", "cache_dir")
    cli = {name: _text(getattr(args, name, None)) for name in names}
    cli["image_tag"] = _text(getattr(args, "tag", None))
    cli.update(extra)
    return Settings.resolve(cli, os.environ, {})


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _tag(settings: Settings) -> Settings:
    """Fill in the tag from git describe when neither --tag nor the env var gave one."""
    if settings.image_tag is None:
        tag = build.git_build_args(Path.cwd())["SOURCE_GIT_TAG"]
        settings = settings.replace(image_tag=build.check_tag(tag))
    return settings


def _say(text: str) -> None:
    print(text, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    settings = _settings(args)
    plan = build.plan(settings)
    with podman.connect(settings) as conn:
        built = build.build_all(conn, plan, _say)
    for variant in plan.variants:
        print(f"{built.refs[variant]} {built.ids[variant]}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    settings = _tag(_settings(args))
    wanted = podman.expected_tags(settings)
    with podman.connect(settings) as conn:
        present = conn.tag_ids()
        missing = [tag for tag in wanted.values() if tag not in present]
        if missing:
            raise PodmanError(f"podman has no {', '.join(missing)}; run `flightctl-device build --tag "
                              f"{settings.image_tag}` first or give the --tag that was built.")
        refs = build.BuiltImages(wanted, {v: present[t] for v, t in wanted.items()})
        build.export_bundle(conn, refs, Path(args.output), _say)
    return 0


def cmd_qcow2(args: argparse.Namespace) -> int:
    from pytest_flightctl_device.artifacts.sources.build import qcow2_of

    settings = _tag(_settings(args))
    ref = podman.expected_tags(settings)["base"]
    conn = podman.shared(settings)
    try:
        image_id = conn.image_id(ref)
        if image_id is None:
            raise PodmanError(f"podman has no {ref}; run `flightctl-device load BUNDLE` or "
                              "`flightctl-device build` first, or give the --tag that was built.")
        cached = qcow2_of(settings, ref, image_id, Cache(settings.cache_dir), _say)
        build.copy_out(cached, Path(args.output))
    finally:
        podman.close_shared()
    _say(f"wrote {args.output}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with podman.connect(settings) as conn:
        loaded = podman.load_bundle(conn, Path(args.bundle), settings, settings.cache_dir / "locks", _say)
    if not loaded.loaded:
        _say("every image was already present; nothing loaded")
    for tag in loaded.tags:
        print(tag)
    return 0


def _common(parser: argparse.ArgumentParser, *, tag: bool = True) -> None:
    if tag:
        parser.add_argument("--tag", metavar="TAG",
                            help="tag suffix: images are <repo>:<variant>-TAG (default: git describe)")
    parser.add_argument("--image-repo", metavar="REPO",
                        help="image repository (default quay.io/flightctl/flightctl-device)")
    parser.add_argument("--variants", metavar="LIST",
                        help="variants, comma separated (default base,v2,v3,v4)")
    parser.add_argument("--podman-url", metavar="URL",
                        help="podman API service (default CONTAINER_HOST, the default socket, "
                        "else a private one)")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register build, bundle, qcow2 and load."""
    p = subparsers.add_parser("build", help="build the base image, then the variants in parallel")
    p.add_argument("--rpms", metavar="DIR",
                   help="directory of agent RPMs (default: the COPR repository)")
    _common(p)
    p.add_argument("--containerfiles", metavar="DIR",
                   help="Containerfile-base, -v2, ... (default: the repo's)")
    p.add_argument("--base-image", metavar="REF", help="bootc base image (default centos-bootc stream9)")
    p.add_argument("--jobs", dest="build_jobs", metavar="N", help="variants built at once (default 4)")
    p.set_defaults(func=cmd_build)

    p = subparsers.add_parser("bundle", help="write every built tag into one docker-archive tar")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the bundle tar to write")
    _common(p)
    p.set_defaults(func=cmd_bundle)

    p = subparsers.add_parser("qcow2", help="build the base image's qcow2 with bootc-image-builder")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the qcow2 to write")
    _common(p)
    p.add_argument("--bib-image", metavar="REF", help="bootc-image-builder image")
    p.add_argument("--bib-config", metavar="FILE", help="config.toml for bootc-image-builder")
    p.add_argument("--bib-timeout", metavar="SECONDS", help="seconds the builder may run (default 3600)")
    p.add_argument("--cache-dir", metavar="DIR", help="artifact cache (a second run is a cache hit)")
    p.set_defaults(func=cmd_qcow2)

    p = subparsers.add_parser("load", help="load an images bundle into podman (skipped when present)")
    p.add_argument("bundle", metavar="BUNDLE", help="the images bundle tar")
    _common(p)
    p.add_argument("--cache-dir", metavar="DIR", help="where the cross-process load lock lives")
    p.set_defaults(func=cmd_load)
