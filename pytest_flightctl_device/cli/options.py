"""The knobs as flightctl-device options: one registration, one resolve, one way to name a flag.

A subcommand adds the knobs it takes with add_knobs(), as `--NAME` or as the short alias below
(`fetch --repo`, `build --jobs`); the flag chosen for each knob is kept on that subcommand's
parser. resolve() hands the raw values to Settings.resolve() (the plugin's own path), and
render() rewrites every `--device-NAME` in a message, from Settings or from deep in the library,
as the flag this subcommand registered for that knob, or as its env var when it has none (the
only way to set that knob here). So one message source serves both fronts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_flightctl_device.settings import KNOBS, Settings, knob

# Short spellings the CLI has always had; every other knob is `--NAME`.
SHORT = {
    "github_run": "--run",
    "github_pr": "--pr",
    "github_ref": "--ref",
    "github_repo": "--repo",
    "github_api_url": "--api-url",
    "github_workflow": "--workflow",
    "image_tag": "--tag",
    "build_jobs": "--jobs",
}

# The image knobs every podman subcommand takes (build, bundle, qcow2, load).
IMAGE_KNOBS = ("image_tag", "image_repo", "variants", "podman_url")

_FLAGS = "knob_flags"  # Namespace attribute: knob attr -> the flag that sets it in this subcommand
_BY_NAME = {spec.name: spec for spec in KNOBS}
_MENTION = re.compile(r"--device-(?P<name>[a-z0-9]+(?:-[a-z0-9]+)*)(?P<alts>(?:/[a-z0-9]+)+)?")
_SELF_FOR = re.compile(r"\b(?P<env>FLIGHTCTL_DEVICE_\w+) \(for (?P=env)\)")


def flag_for(attr: str) -> str:
    """How the CLI spells a knob: its short alias, else `--NAME`."""
    return SHORT.get(attr, f"--{knob(attr).name}")


def add_knobs(parser: argparse.ArgumentParser, *attrs: str,
              into: argparse._ActionsContainer | None = None) -> None:
    """Add an option per knob (to `into`, e.g. a mutually exclusive group, else to `parser`).

    An unset option is None, so the FLIGHTCTL_DEVICE_* variable and then the default apply.
    """
    container = parser if into is None else into
    for attr in attrs:
        spec = knob(attr)
        container.add_argument(flag_for(attr), dest=attr, help=spec.help_text(), **spec.option_kwargs())
    name_knobs(parser, {attr: flag_for(attr) for attr in attrs})


def name_knobs(parser: argparse.ArgumentParser, flags: Mapping[str, str]) -> None:
    """Record which flag sets which knob here, also for options that feed a knob indirectly
    (fetch --url is the bundle or qcow2 knob), so messages about those knobs name the flag."""
    current = dict(parser.get_default(_FLAGS) or {})
    current.update(flags)
    parser.set_defaults(**{_FLAGS: current})


def flags_of(args: argparse.Namespace) -> Mapping[str, str]:
    flags: Mapping[str, str] = getattr(args, _FLAGS, None) or {}
    return flags


def resolve(args: argparse.Namespace, values: Mapping[str, Any] | None = None,
            env: Mapping[str, str] | None = None) -> Settings:
    """Settings from this subcommand's knob options (plus `values` it worked out from its own
    options), then the FLIGHTCTL_DEVICE_* variables (`env`, default os.environ), then the defaults."""
    cli: dict[str, Any] = {attr: getattr(args, attr, None) for attr in flags_of(args)}
    cli.update(values or {})
    return Settings.resolve(cli, os.environ if env is None else env, {})


def with_image_tag(settings: Settings) -> Settings:
    """Fill in the tag from git describe (of the working directory) when neither --tag nor the
    env var gave one, as the CI workflow computes it."""
    if settings.image_tag is not None:
        return settings
    from pytest_flightctl_device.images import build

    tag = build.git_build_args(Path.cwd())["SOURCE_GIT_TAG"]
    return dataclasses.replace(settings, image_tag=build.check_tag(tag))


def say(text: str) -> None:
    """A subcommand's progress line, on stdout at once (CI logs interleave it with podman's)."""
    print(text, flush=True)


def render(message: str, flags: Mapping[str, str]) -> str:
    """`message` with each `--device-NAME` (and `--device-github-run/pr/ref`) as spelled by `flags`."""

    def spelled(name: str) -> str | None:
        spec = _BY_NAME.get(name)
        return None if spec is None else flags.get(spec.attr, spec.env)

    def one(match: re.Match[str]) -> str:
        names = [match["name"]]
        if match["alts"]:
            stem = match["name"].rpartition("-")[0]
            names += [f"{stem}-{alt}" if stem else alt for alt in match["alts"].split("/")[1:]]
        rendered = [spelled(name) for name in names]
        if None in rendered:
            return match[0]  # not a knob: leave the text alone
        return "/".join(dict.fromkeys(r for r in rendered if r is not None))

    return _SELF_FOR.sub(r"\g<env>", _MENTION.sub(one, message))


def render_args(message: str, args: argparse.Namespace) -> str:
    """`message` (usually a DeviceError's) in the words of the subcommand that parsed `args`."""
    return render(message, flags_of(args))


def render_help(parser: argparse.ArgumentParser) -> None:
    """Rewrite the knob help texts of every (sub)parser below `parser` in its own flags."""
    flags: Mapping[str, str] = parser.get_default(_FLAGS) or {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                render_help(child)
        elif action.help:
            action.help = render(action.help, flags)
