"""flightctl-device: the same library as the pytest plugin, for CI jobs and developers.

Each group of subcommands lives in its own module exposing add_parsers(subparsers); this file
only assembles them and turns the library's errors into one line and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pytest_flightctl_device.errors import DeviceError

# Modules that register subcommands; each has add_parsers(subparsers).
_COMMAND_MODULES = ("fetch", "images", "device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flightctl-device",
        description="Fetch, build, load and boot flightctl device images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except DeviceError as exc:
        print(f"flightctl-device: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
