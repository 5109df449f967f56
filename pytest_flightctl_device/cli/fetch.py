"""`flightctl-device fetch` and `flightctl-device cache`: the artifacts path without pytest.

fetch resolves the same Settings as the plugin (options here, then FLIGHTCTL_DEVICE_* env vars),
so a CI job can warm the cache before the test job and the tests then download nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.core.progress import human_bytes
from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import Settings


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fetch = subparsers.add_parser(
        "fetch", help="download and verify the images bundle and the qcow2 into the cache",
        description="Download the artifacts once into the shared cache (and optionally link them into --out).",
    )
    source = fetch.add_mutually_exclusive_group(required=True)
    source.add_argument("--pr", type=int, metavar="N", help="newest artifacts run of this pull request's head")
    source.add_argument("--run", type=int, metavar="RUN_ID", help="this GitHub Actions run")
    source.add_argument("--ref", metavar="BRANCH|SHA", help="newest artifacts run of this branch or commit")
    source.add_argument("--url", metavar="URL", help="one artifact from an http(s) URL (see --kind)")
    fetch.add_argument("--what", choices=("both", "bundle", "qcow2"), default="both",
                       help="which GitHub artifacts to fetch (default both)")
    fetch.add_argument("--kind", choices=("bundle", "qcow2"),
                       help="what --url is (default: qcow2 for a .qcow2 URL, else bundle)")
    fetch.add_argument("--sha256", metavar="HEX", help="expected sha256 of the --url download")
    fetch.add_argument("--out", type=Path, metavar="DIR", help="also place the files in DIR (hard link or copy)")
    fetch.add_argument("--repo", metavar="OWNER/NAME", help="repository (default flightctl/flightctl)")
    fetch.add_argument("--api-url", metavar="URL", help="GitHub API URL (default https://api.github.com)")
    fetch.add_argument("--workflow", metavar="FILE", help="workflow file that builds the artifacts")
    fetch.add_argument("--bundle-artifact", metavar="PREFIX", help="name prefix of the bundle artifact")
    fetch.add_argument("--qcow2-artifact", metavar="PREFIX", help="name prefix of the qcow2 artifact")
    _cache_dir_option(fetch)
    fetch.set_defaults(func=_fetch)

    cache = subparsers.add_parser("cache", help="list, verify or prune the artifact cache")
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list cached artifacts, least recently used first")
    _cache_dir_option(ls)
    ls.set_defaults(func=_cache_ls)
    verify = actions.add_parser("verify", help="re-hash and re-check every artifact; remove the bad ones")
    _cache_dir_option(verify)
    verify.set_defaults(func=_cache_verify)
    prune = actions.add_parser("prune", help="remove least recently used artifacts no running session holds")
    prune.add_argument("--max-gb", type=float, metavar="GB",
                       help="keep at most this much (default --device-cache-max-gb, else 0)")
    _cache_dir_option(prune)
    prune.set_defaults(func=_cache_prune)


def _cache_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", metavar="DIR", help="cache directory (default as the plugin's)")


def _settings(args: argparse.Namespace) -> Settings:
    cli: dict[str, object] = {"cache_dir": args.cache_dir}
    for attr, name in (("github_run", "run"), ("github_pr", "pr"), ("github_ref", "ref"),
                       ("github_repo", "repo"), ("github_api_url", "api_url"),
                       ("github_workflow", "workflow"), ("bundle_artifact", "bundle_artifact"),
                       ("qcow2_artifact", "qcow2_artifact")):
        value = getattr(args, name, None)
        cli[attr] = None if value is None else str(value)
    env = {k: v for k, v in os.environ.items() if k.startswith("FLIGHTCTL_DEVICE_")}
    if getattr(args, "url", None):
        kind = args.kind or ("qcow2" if urlsplit(args.url).path.endswith(".qcow2") else "bundle")
        cli[kind] = args.url
        cli[f"{kind}_sha256"] = args.sha256
        for name in ("BUNDLE", "QCOW2", "GITHUB_RUN", "GITHUB_PR", "GITHUB_REF", "BUILD"):
            env.pop(f"FLIGHTCTL_DEVICE_{name}", None)  # the command line names the one source
    elif getattr(args, "run", None) or getattr(args, "pr", None) or getattr(args, "ref", None):
        for name in ("BUNDLE", "QCOW2", "GITHUB_RUN", "GITHUB_PR", "GITHUB_REF", "BUILD"):
            env.pop(f"FLIGHTCTL_DEVICE_{name}", None)
    return Settings.resolve(cli, env, {})


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
    """Hard-link (else copy) `path` to out/name, atomically replacing what is there."""
    out.mkdir(parents=True, exist_ok=True)
    target = out / name
    tmp = out / f".{name}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return target


def _fetch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    terminal = _Terminal()
    artifacts = Artifacts(settings, progress=terminal, interval=0.5 if terminal.tty else 5.0, bar=terminal.tty)
    if args.url:
        kinds = ["bundle" if settings.bundle else "qcow2"]
    else:
        kinds = ["bundle", "qcow2"] if args.what == "both" else [args.what]
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


def _cache(args: argparse.Namespace) -> Cache:
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else _settings(args).cache_dir
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(f"--cache-dir {cache_dir} is not a directory; give the cache directory.")
    return Cache(cache_dir)


def _cache_ls(args: argparse.Namespace) -> int:
    cache = _cache(args)
    entries = cache.entries()
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        sources = "; ".join(entry.sources) or "-"
        print(f"{entry.digest[:16]}  {entry.kind:6}  {human_bytes(entry.size):>10}  {used}  {sources}")
    print(f"{len(entries)} artifact(s), {human_bytes(sum(e.size for e in entries))} in {cache.root}")
    return 0


def _cache_verify(args: argparse.Namespace) -> int:
    cache = _cache(args)
    count = len(cache.entries())
    problems = cache.verify()
    for problem in problems:
        print(f"removed {problem.path}: {problem.reason}")
    print(f"{count - len(problems)} of {count} artifact(s) verified in {cache.root}")
    return 1 if problems else 0


def _cache_prune(args: argparse.Namespace) -> int:
    cache = _cache(args)
    max_gb = args.max_gb if args.max_gb is not None else (_settings(args).cache_max_gb or 0.0)
    removed = cache.prune(int(max_gb * 1e9))
    for entry in removed:
        print(f"removed {entry.digest[:16]} {entry.kind} {human_bytes(entry.size)}")
    print(f"{len(removed)} artifact(s) removed; {human_bytes(cache.size())} left in {cache.root}")
    return 0
