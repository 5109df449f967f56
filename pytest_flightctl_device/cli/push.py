"""`flightctl-device push`: every tag of an images bundle into a registry, once (for CI jobs, releases).

From a bundle file (`--bundle`, pushed straight from the tar) or from the tags podman holds for
`--tag` (exported into a bundle under the cache dir first). Blobs the registry has are not sent;
a second push sends nothing. Progress per image, then one summary line.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pytest_flightctl_device.cli.options import IMAGE_KNOBS, add_knobs, name_knobs, resolve, say
from pytest_flightctl_device.errors import ConfigError, PodmanError
from pytest_flightctl_device.images import podman, publish, push
from pytest_flightctl_device.settings import Settings


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("push", help="push an images bundle (or podman's built tags) into a registry")
    add_knobs(parser, "registry", "registry_ca", "registry_insecure")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--bundle", dest="bundle", metavar="FILE", help="the images bundle tar to push")
    add_knobs(parser, *IMAGE_KNOBS, "cache_dir")
    name_knobs(parser, {"bundle": "--bundle"})
    parser.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    settings = resolve(args)
    if settings.registry is None:
        raise ConfigError("push needs --device-registry HOST:PORT[/NAMESPACE]; give the registry to push to.")
    target, login_file = publish.target_of(settings)
    publish.check(target, login_file)
    if args.bundle and args.image_tag:
        raise ConfigError("push got --bundle and --tag; give the bundle file or the tag podman holds, not both.")
    if args.bundle:
        bundle = Path(args.bundle)
        if not bundle.is_file():
            raise ConfigError(f"--bundle {args.bundle} is not an existing file; give the images bundle tar.")
        result = push.push_bundle(bundle, target, settings.cache_dir / "pushes", say)
    else:
        result = _push_from_podman(settings, target)
    for image in result.images:  # one line per tag: what was sent now, what was there already
        for ref in image.refs.values():
            print(f"{'sent' if image.sent else 'skipped'} {ref}@{image.digest}")
    return 0


def _push_from_podman(settings: Settings, target: push.Target) -> push.PushResult:
    if settings.image_tag is None:
        raise ConfigError("push needs --bundle FILE or --device-image-tag TAG (the tag podman holds); give one.")
    wanted = podman.expected_tags(settings)
    with podman.connect(settings) as conn:
        present = conn.tag_ids()
        missing = [tag for tag in wanted.values() if tag not in present]
        if missing:
            raise PodmanError(f"podman has no {', '.join(missing)}; build or load them first, or give --bundle.")
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=settings.cache_dir, prefix=".push-") as work:
            bundle = conn.export(list(wanted.values()), Path(work) / "bundle.tar", say)
            return push.push_bundle(bundle, target, settings.cache_dir / "pushes", say)
