"""--device-fresh boot against snapshot: request-to-ready of a cold boot and of a clone, N tests' total.

For each guest (the tiny and the Debian test guest), in one run on the same host: N devices made
one after the other by a factory with --device-fresh boot (each a cold boot), then N by a factory
with --device-fresh snapshot (the first pays the template: boot + snapshot + its first clone; the
others are reverted clones). Each device is asked for, used once (`true` over SSH) and released,
as a device_vm test does. Prints JSON:

    python benchmarks/fresh.py [--n 10] [--guests tiny,debian]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.factory import DeviceVMFactory
from pytest_flightctl_device.settings import Settings

SHAPES = {"tiny": {"memory_mib": 256, "vcpus": 1}, "debian": {"memory_mib": 1024, "vcpus": 2}}


def _guest(kind: str) -> Path:
    out = subprocess.run([sys.executable, "-m", "tests.guest.build", kind], capture_output=True, text=True,
                         check=True)
    return Path(out.stdout.strip())


def _round(base: Path, kind: str, fresh: str, n: int) -> dict[str, Any]:
    settings = dataclasses.replace(Settings.resolve({}, {}, {}), network="isolated", fresh=fresh,
                                   boot_timeout=120.0, **SHAPES[kind])
    factory = DeviceVMFactory(settings, base_image=base, agent=throwaway_agent_config(),
                              run_id=secrets.token_hex(4), worker="bench")
    times: list[float] = []
    started = time.monotonic()
    try:
        for _ in range(n):
            asked = time.monotonic()
            vm = factory.create()
            times.append(time.monotonic() - asked)
            vm.run("true")
            factory.release(vm)
        total = time.monotonic() - started
        templates = list(factory.templates.template_seconds) if fresh == "snapshot" else []
        fallbacks = factory.templates.fallbacks if fresh == "snapshot" else 0
    finally:
        factory.close()
    return {"ready_s": [round(t, 2) for t in times], "first_s": round(times[0], 2),
            "median_s": round(statistics.median(times[1:] or times), 2), "total_s": round(total, 1),
            "template_s": [round(t, 1) for t in templates], "fallbacks": fallbacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--guests", default="tiny,debian")
    args = parser.parse_args()
    report: dict[str, Any] = {"n": args.n, "guests": {}}
    for kind in args.guests.split(","):
        base = _guest(kind)
        boot = _round(base, kind, "boot", args.n)
        snapshot = _round(base, kind, "snapshot", args.n)
        report["guests"][kind] = {
            "shape": SHAPES[kind], "boot": boot, "snapshot": snapshot,
            "clone_vs_cold_median": round(snapshot["median_s"] / boot["median_s"], 3),
            "total_ratio": round(snapshot["total_s"] / boot["total_s"], 3)}
        print(json.dumps({kind: report["guests"][kind]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
