"""`flightctl-device fetch`: the artifacts path without pytest.

fetch resolves the same Settings as the plugin (options here, then FLIGHTCTL_DEVICE_* env vars),
so a CI job can warm the cache before the test job and the tests then download nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.cli.options import add_knobs, name_knobs, resolve
from pytest_flightctl_device.core.atomic import atomic_write, fsync_dir, temp_path
from pytest_flightctl_device.settings import ENV_PREFIX

# The command line names the one source, so these variables do not add a second one.
_SOURCE_ENV = tuple(ENV_PREFIX + name for name in ("BUNDLE", "QCOW2", "GITHUB_RUN", "GITHUB_PR",
                                                   "GITHUB_REF", "BUILD"))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = subparsers.add_parser(
        "fetch", help="download and verify the images bundle and the qcow2 into the cache",
        description="Download the artifacts once into the shared cache (and optionally link them into --out).",
    )
    source = fetch.add_mutually_exclusive_group(required=True)
    add_knobs(fetch, "github_pr", "github_run", "github_ref", into=source)
    source.add_argument("--url", metavar="URL", help="one artifact from an http(s) URL (see --kind)")
    fetch.add_argument("--what", choices=("both", "bundle", "qcow2"), default="both",
                       help="which GitHub artifacts to fetch (default both)")
    fetch.add_argument("--kind", choices=("bundle", "qcow2"),
                       help="what --url is (default: qcow2 for a .qcow2 URL, else bundle)")
    fetch.add_argument("--sha256", metavar="HEX", help="expected sha256 of the --url download")
    fetch.add_argument("--out", type=Path, metavar="DIR", help="also place the files in DIR (hard link or copy)")
    name_knobs(fetch, {"bundle": "--url", "qcow2": "--url", "bundle_sha256": "--sha256",
                       "qcow2_sha256": "--sha256"})
    add_knobs(fetch, "github_repo", "github_api_url", "github_workflow", "bundle_artifact", "qcow2_artifact",
              "cache_dir")
    fetch.set_defaults(func=_fetch)


def _url_kind(args: argparse.Namespace) -> str:
    return str(args.kind or ("qcow2" if urlsplit(args.url).path.endswith(".qcow2") else "bundle"))


class _Terminal:
    """Progress on stderr: a bar redrawn in place on a TTY, a line every few seconds otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def __call__(self, text: str) -> None:
        if self.tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write("\r" + text[:width].ljust(width))
            self.drawn = True
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def end_line(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            self.drawn = False


def _place(path: Path, out: Path, name: str) -> Path:
    """Hard-link (else copy) `path` to out/name, atomically replacing what is there.

    The link goes to core.atomic's temp name (so its sweeper knows whose it is) and is renamed
    over the target; a copy (another filesystem) is written through atomic_write itself.
    """
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = temp_path(target)
    try:
        os.link(path, tmp)
    except OSError:
        with path.open("rb") as source, atomic_write(target) as handle:
            shutil.copyfileobj(source, handle, 1 << 20)
        return target
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out)
    return target


def _fetch(args: argparse.Namespace) -> int:
    values: dict[str, str | None] = {}
    if args.url:
        kind = _url_kind(args)
        values = {kind: args.url, f"{kind}_sha256": args.sha256}
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX) and k not in _SOURCE_ENV}
    settings = resolve(args, values, env)
    terminal = _Terminal()
    artifacts = Artifacts(settings, progress=terminal, interval=0.5 if terminal.tty else 5.0, bar=terminal.tty)
    kinds = [_url_kind(args)] if args.url else ["bundle", "qcow2"] if args.what == "both" else [args.what]
    for kind in kinds:
        path = artifacts.bundle() if kind == "bundle" else artifacts.qcow2()
        terminal.end_line()
        if args.out:
            if args.url:
                name = Path(urlsplit(args.url).path).name or f"{kind}.bin"
            else:
                prefix = settings.bundle_artifact if kind == "bundle" else settings.qcow2_artifact
                name = f"{prefix}.{'tar' if kind == 'bundle' else 'qcow2'}"
            path = _place(path, args.out, name)
        print(f"{kind}: {path}")
    return 0
