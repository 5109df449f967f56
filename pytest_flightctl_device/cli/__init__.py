"""flightctl-device: the same library as the pytest plugin, for CI jobs and developers.

One module per subcommand, each exposing add_parser(subparsers) and taking its options from
the KNOBS table through cli/options.py; this file only assembles them and turns the library's
errors into one line, in the flags of the subcommand that ran, and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pytest_flightctl_device.cli.options import render_args, render_help
from pytest_flightctl_device.errors import DeviceError

# The subcommands, in the order `flightctl-device --help` lists them; each module has add_parser().
COMMANDS = ("fetch", "cache", "build", "bundle", "qcow2", "load", "push", "boot", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flightctl-device",
        description="Fetch, build, load and boot flightctl device images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    render_help(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except DeviceError as exc:
        print(f"flightctl-device: {render_args(str(exc), args)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result
