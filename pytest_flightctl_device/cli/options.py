"""Settings knobs as flightctl-device command-line options (`--NAME`), resolved like the plugin's."""

from __future__ import annotations

import argparse
import os

from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import KNOBS, Settings, knob


def add_knobs(parser: argparse.ArgumentParser, *attrs: str) -> None:
    """Add `--NAME` for each knob; unset options fall back to FLIGHTCTL_DEVICE_* and the defaults."""
    for attr in attrs:
        spec = knob(attr)
        if spec.flag:
            parser.add_argument(f"--{spec.name}", dest=attr, action="store_true", default=None,
                                help=spec.help)
        elif spec.multi:
            parser.add_argument(f"--{spec.name}", dest=attr, action="append", metavar=spec.metavar,
                                help=spec.help)
        else:
            parser.add_argument(f"--{spec.name}", dest=attr, metavar=spec.metavar, help=spec.help)


def resolve(args: argparse.Namespace) -> Settings:
    """Settings from these options, then the FLIGHTCTL_DEVICE_* variables, then the defaults."""
    cli = {spec.attr: getattr(args, spec.attr, None) for spec in KNOBS}
    try:
        return Settings.resolve(cli, os.environ, {})
    except ConfigError as exc:  # name the options as this command spells them
        raise ConfigError(str(exc).replace("--device-", "--")) from None
