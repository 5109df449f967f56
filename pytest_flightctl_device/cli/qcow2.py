"""`flightctl-device qcow2`: the base image's disk from bootc-image-builder, cached by image ID."""

from __future__ import annotations

import argparse
from pathlib import Path

from pytest_flightctl_device.cli.options import IMAGE_KNOBS, add_knobs, resolve, say, with_image_tag
from pytest_flightctl_device.errors import PodmanError
from pytest_flightctl_device.images import build, podman


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("qcow2", help="build the base image's qcow2 with bootc-image-builder")
    parser.add_argument("-o", "--output", required=True, metavar="FILE", help="the qcow2 to write")
    add_knobs(parser, *IMAGE_KNOBS, "bib_image", "bib_config", "bib_timeout", "cache_dir")
    parser.set_defaults(func=_qcow2)


def _qcow2(args: argparse.Namespace) -> int:
    from pytest_flightctl_device.artifacts.sources.build import qcow2_of

    settings = with_image_tag(resolve(args))
    ref = podman.expected_tags(settings)["base"]
    with podman.PodmanSession(settings) as pod:
        image_id = pod.get().image_id(ref)
        if image_id is None:
            raise PodmanError(f"podman has no {ref}; run `flightctl-device load BUNDLE` or "
                              "`flightctl-device build` first, or give the --tag that was built.")
        cached = qcow2_of(settings, ref, image_id, settings.cache(), say, pod)
        build.copy_out(cached, Path(args.output))
    say(f"wrote {args.output}")
    return 0
