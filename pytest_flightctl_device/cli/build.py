"""`flightctl-device build`: the base image, then the variants in parallel, as the CI job runs it.

The pytest plugin (--device-build) runs the very same library functions.
"""

from __future__ import annotations

import argparse

from pytest_flightctl_device.cli.options import IMAGE_KNOBS, add_knobs, resolve, say
from pytest_flightctl_device.images import build, podman


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("build", help="build the base image, then the variants in parallel")
    add_knobs(parser, "rpms", *IMAGE_KNOBS, "containerfiles", "base_image", "build_jobs")
    parser.set_defaults(func=_build)


def _build(args: argparse.Namespace) -> int:
    settings = resolve(args)
    plan = build.plan(settings)
    with podman.connect(settings) as conn:
        built = build.build_all(conn, plan, say)
    for variant in plan.variants:
        print(f"{built.refs[variant]} {built.ids[variant]}")
    return 0
