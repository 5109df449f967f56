"""Boot benchmark: prints one JSON object comparing three ways to get a ready VM of the same image.

- plugin: DeviceVMFactory.create() on a factory that already exists (what `device_vm` does per
  test), network isolated, TCG; ready = SSH works and cloud-init is done. Its phases are timed too.
- raw_qemu: qemu-system-x86_64 started by hand with overlay and seed prepared before the clock;
  ready = the first `ssh ... true` that succeeds (the plugin's OpenSSH options).
- testcloud (PyPI): create-to-ready through its API, forced to TCG, its network isolated.

The contenders are interleaved round by round (the order rotates each round) after one warm-up
boot each, so drifting host load hits all of them alike. Targets: plugin overhead over raw qemu
<= 0.3 s; plugin time-to-ready <= 0.7x testcloud's. Everything started is removed at the end. A
contender that cannot be set up, or whose boots fail, is reported with its error; the others run.

    .venv/bin/python benchmarks/boot.py [--rounds 5] [--guest tiny|debian]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from boot_common import loadavg  # noqa: E402
from boot_plugin import PluginContender, measure_prefetch  # noqa: E402
from boot_raw import RawContender, qemu_argv  # noqa: E402
from boot_report import report as make_report  # noqa: E402
from boot_testcloud import TestcloudContender, destroy_by_name  # noqa: E402

from pytest_flightctl_device.devices.agent import throwaway_agent_config  # noqa: E402
from pytest_flightctl_device.devices.ssh import generate_keypair  # noqa: E402
from pytest_flightctl_device.settings import default_libvirt_uri  # noqa: E402
from tests.guest.build import build_guest  # noqa: E402


class Contender(Protocol):
    name: str

    def round(self) -> dict[str, Any]: ...


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (each boots every contender once)")
    parser.add_argument("--guest", choices=("tiny", "debian"), default="tiny")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--vcpus", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per boot before it counts as failed")
    parser.add_argument("--no-warmup", action="store_true", help="skip the discarded first boot of each contender")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def _run(contender: Contender) -> dict[str, Any]:
    try:
        return contender.round()
    except Exception as exc:  # a failed boot is a recorded sample, not the end of the benchmark
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _set_up(name: str, make: Any, failures: dict[str, str]) -> Any:
    """The contender `make()` builds, or None with its error kept for the report."""
    try:
        return make()
    except Exception as exc:  # e.g. testcloud without genisoimage: report it, boot the others
        failures[name] = f"{type(exc).__name__}: {exc}"[:2000]
        return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _versions() -> dict[str, str]:
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False)
    libvirt_version = ""
    with contextlib.suppress(Exception):
        import libvirt

        number = libvirt.getVersion()
        libvirt_version = f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"
    return {"qemu": qemu.stdout.splitlines()[0] if qemu.stdout else "", "libvirt": libvirt_version,
            "testcloud": _version("testcloud"), "python": sys.version.split()[0]}


def _our_domains(prefixes: list[str]) -> list[tuple[str, str]]:
    """(uri, name) of every domain whose name starts with one of our prefixes."""
    found: list[tuple[str, str]] = []
    with contextlib.suppress(Exception):
        import libvirt

        for uri in sorted({default_libvirt_uri(), "qemu:///session"}):
            conn = libvirt.open(uri)
            found += [(uri, d.name()) for d in conn.listAllDomains() if any(d.name().startswith(p) for p in prefixes)]
            conn.close()
    return found


def _destroy_ours(prefixes: list[str]) -> None:
    """Last resort after the contenders' own cleanup: destroy (and undefine) our domains by name."""
    for _uri, name in _our_domains(prefixes):
        destroy_by_name(name)


def _leftovers(scratch: Path, prefixes: list[str]) -> dict[str, Any]:
    """What of ours still exists after cleanup (should be nothing)."""
    domains = [name for _uri, name in _our_domains(prefixes)]
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True,
                              text=True, check=False).stdout.split("\n")
    return {"domains": sorted(set(domains)), "scratch_exists": scratch.exists(),
            "child_processes": [c.strip() for c in children if c.strip() and " ps -o" not in c]}


def _prefetch_report(samples: list[float] | dict[str, str],
                     results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    if isinstance(samples, dict) or not samples:  # the measurement failed: say why
        return {"error": samples.get("error", "no sample") if isinstance(samples, dict) else "no sample"}
    ready = [r["ready_s"] for r in results["testcloud"] if "ready_s" in r]
    testcloud = statistics.median(ready) if ready else None
    median = statistics.median(samples)
    return {
        "definition": "--device-prefetch: DeviceVMFactory.create() when the previous test lasted at least one "
                      "boot, so the spare booted meanwhile (measured alone, after the interleaved rounds)",
        "median_s": round(median, 3), "samples_s": samples,
        "ratio_to_testcloud": round(median / testcloud, 3) if testcloud else None,
        "target_ratio": 0.7, "pass": bool(testcloud and median / testcloud <= 0.7),
    }


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    started = time.time()
    load_start = loadavg()
    base = build_guest(args.guest)
    scratch = Path(tempfile.mkdtemp(prefix="fcdev-bootbench-", dir="/var/tmp"))
    os.chmod(scratch, 0o755)  # libvirt's qemu user must reach the disks below
    agent = throwaway_agent_config()
    keypair = generate_keypair(scratch, "bootbench")
    common = {"memory_mib": args.memory_mib, "vcpus": args.vcpus, "timeout": args.timeout}
    plugin: PluginContender | None = None
    testcloud: TestcloudContender | None = None
    raw: RawContender | None = None
    results: dict[str, list[dict[str, Any]]] = {"plugin": [], "raw_qemu": [], "testcloud": []}
    warmup: dict[str, dict[str, Any]] = {}
    orders: list[list[str]] = []
    prefixes = ["fcbench-tc-"]
    failures: dict[str, str] = {}
    prefetch: list[float] | dict[str, str] = {"error": "not measured"}
    try:
        plugin = _set_up("plugin", lambda: PluginContender(base, agent, workdir=scratch / "plugin", **common),
                         failures)
        if plugin is not None:
            prefixes.append(plugin.domain_prefix)
        raw = _set_up("raw_qemu", lambda: RawContender(base, keypair, agent.files, scratch=scratch, **common),
                      failures)
        testcloud = _set_up("testcloud", lambda: TestcloudContender(base, keypair, agent.files, scratch=scratch,
                                                                    **common), failures)
        contenders: list[Contender] = [c for c in (plugin, raw, testcloud) if c is not None]
        if not contenders:
            raise SystemExit(f"no contender could be set up: {json.dumps(failures)}")
        if not args.no_warmup:
            for contender in contenders:
                warmup[contender.name] = _run(contender)
        for index in range(args.rounds):
            shift = index % len(contenders)
            order = contenders[shift:] + contenders[:shift]
            orders.append([c.name for c in order])
            for contender in order:
                results[contender.name].append(_run(contender))
        try:
            prefetch = measure_prefetch(base, agent, workdir=scratch / "prefetch", rounds=args.rounds, **common)
        except Exception as exc:
            prefetch = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        if plugin is not None:
            plugin.close()
        if testcloud is not None:
            testcloud.close()
        if raw is not None:
            raw.close()
        _destroy_ours(prefixes)
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "benchmark": "boot",
        "guest": {"kind": args.guest, "image": str(base), "size_bytes": base.stat().st_size},
        "settings": {"rounds": args.rounds, "memory_mib": args.memory_mib, "vcpus": args.vcpus,
                     "accel": "tcg", "network": "isolated (qemu restrict=on, forwards on 127.0.0.1)",
                     "libvirt_uri_plugin": default_libvirt_uri(), "libvirt_uri_testcloud": "qemu:///session",
                     "warmup": not args.no_warmup, "order_per_round": orders,
                     "raw_qemu_cpu_cgroup": raw.placement if raw is not None else None},
        "host": {"cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": loadavg(),
                 "wall_s": round(time.time() - started, 1), **_versions()},
        "definitions": {
            "plugin": "DeviceVMFactory.create() on an existing factory (connected, key made) until it "
                      "returns: SSH banner + cloud-init final_message on the console + `cloud-init status "
                      "--long` over SSH; phases are first-return times of the plugin's own functions",
            "raw_qemu": "Popen(" + " ".join(qemu_argv(memory_mib=args.memory_mib, vcpus=args.vcpus,
                                                        console=Path("CONSOLE"), port=0, mac="MAC",
                                                        seed=Path("seed.iso"), overlay=Path("overlay.qcow2")))
                        + ") until the first `ssh ... true` exits 0 (attempts one at a time once the SSH banner is "
                        "there; banner probed with a fresh connection every 0.25 s)",
            "testcloud": "_get_default_domain_conf + Instance + prepare + spawn_vm + start (qemu:///session, "
                         "SSH-banner readiness), kvm forced off, network isolated: see benchmarks/boot_testcloud.py",
            "qemu_cpu_to_ready": "user+system CPU seconds the VM's qemu process had used when the contender "
                                 "was ready (load-independent cost of the boot itself)",
            "console_*": "when the guest printed the kernel banner / cloud-init's final message, seen by a "
                         "50 ms watcher of the console file",
        },
        "notes": [
            "libvirt runs every domain (the plugin's, testcloud's and other users') under the `machine` CPU "
            "cgroup, whose weight they share; raw qemu is put in a cgroup beside them so that host load "
            "cannot favour it (settings.raw_qemu_cpu_cgroup)",
            "as root, qemu:///session is the system daemon (a privileged libvirtd accepts both URIs): testcloud "
            "takes its session code path (user-mode networking, no libvirt network) on the same daemon",
        ],
        "testcloud_network": testcloud.network if testcloud is not None else {},
        "warmup": warmup,
        **make_report(results, failures),
        "plugin_prefetch": _prefetch_report(prefetch, results),
        "cleanup": _leftovers(scratch, prefixes),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
