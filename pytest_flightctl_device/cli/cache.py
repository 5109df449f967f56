"""`flightctl-device cache ls | verify | prune`: look after the artifact cache fetch and the plugin fill."""

from __future__ import annotations

import argparse
import time

from pytest_flightctl_device.artifacts.cache import Cache
from pytest_flightctl_device.cli.options import add_knobs, name_knobs, resolve
from pytest_flightctl_device.core.progress import human_bytes


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cache = subparsers.add_parser("cache", help="list, verify or prune the artifact cache")
    actions = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = actions.add_parser("ls", help="list cached artifacts, least recently used first")
    add_knobs(ls, "cache_dir")
    ls.set_defaults(func=_ls)
    verify = actions.add_parser("verify", help="re-hash and re-check every artifact; remove the bad ones")
    add_knobs(verify, "cache_dir")
    verify.set_defaults(func=_verify)
    prune = actions.add_parser("prune", help="remove least recently used artifacts no running session holds")
    # Not the knob's own parser: 0 (remove all that no session holds) is a fine answer here.
    prune.add_argument("--max-gb", type=float, metavar="GB",
                       help="keep at most this much (default FLIGHTCTL_DEVICE_CACHE_MAX_GB, else 0)")
    name_knobs(prune, {"cache_max_gb": "--max-gb"})
    add_knobs(prune, "cache_dir")
    prune.set_defaults(func=_prune)


def _cache(args: argparse.Namespace) -> Cache:
    return resolve(args).cache()


def _ls(args: argparse.Namespace) -> int:
    cache = _cache(args)
    entries = cache.entries()
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        sources = "; ".join(entry.sources) or "-"
        print(f"{entry.digest[:16]}  {entry.kind:6}  {human_bytes(entry.size):>10}  {used}  {sources}")
    print(f"{len(entries)} artifact(s), {human_bytes(sum(e.size for e in entries))} in {cache.root}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    cache = _cache(args)
    count = len(cache.entries())
    problems = cache.verify()
    for problem in problems:
        print(f"removed {problem.path}: {problem.reason}")
    print(f"{count - len(problems)} of {count} artifact(s) verified in {cache.root}")
    return 1 if problems else 0


def _prune(args: argparse.Namespace) -> int:
    settings = resolve(args)
    cache = settings.cache()
    max_gb = args.max_gb if args.max_gb is not None else (settings.cache_max_gb or 0.0)
    removed = cache.prune(int(max_gb * 1e9))
    for entry in removed:
        print(f"removed {entry.digest[:16]} {entry.kind} {human_bytes(entry.size)}")
    print(f"{len(removed)} artifact(s) removed; {human_bytes(cache.size())} left in {cache.root}")
    return 0
