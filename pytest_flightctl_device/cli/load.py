"""`flightctl-device load`: an images bundle into podman, skipped when every tag is present."""

from __future__ import annotations

import argparse
from pathlib import Path

from pytest_flightctl_device.cli.options import IMAGE_KNOBS, add_knobs, resolve, say
from pytest_flightctl_device.images import podman


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("load", help="load an images bundle into podman (skipped when present)")
    parser.add_argument("bundle", metavar="BUNDLE", help="the images bundle tar")
    add_knobs(parser, *IMAGE_KNOBS, "cache_dir")
    parser.set_defaults(func=_load)


def _load(args: argparse.Namespace) -> int:
    settings = resolve(args)
    with podman.connect(settings) as conn:
        loaded = podman.load_bundle(conn, Path(args.bundle), settings, settings.locks_dir, say)
    if not loaded.loaded:
        say("every image was already present; nothing loaded")
    for tag in loaded.tags:
        print(tag)
    return 0
