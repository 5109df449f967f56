"""`flightctl-device bundle`: every built tag into one docker-archive tar (the images bundle)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pytest_flightctl_device.cli.options import IMAGE_KNOBS, add_knobs, resolve, say, with_image_tag
from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import build, podman


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("bundle", help="write every built tag into one docker-archive tar")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the bundle tar to write")
    add_knobs(parser, *IMAGE_KNOBS)
    parser.set_defaults(func=_bundle)


def _bundle(args: argparse.Namespace) -> int:
    settings = with_image_tag(resolve(args))
    wanted = podman.expected_tags(settings)
    with podman.connect(settings) as conn:
        present = conn.tag_ids()
        missing = [tag for tag in wanted.values() if tag not in present]
        if missing:
            raise PodmanError(f"podman has no {', '.join(missing)}; run `flightctl-device build --tag "
                              f"{settings.image_tag}` first or give the --tag that was built.")
        refs = build.BuiltImages(wanted, {v: present[t] for v, t in wanted.items()})
        build.export_bundle(conn, refs, Path(args.output), say)
    return 0
