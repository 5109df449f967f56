"""Enrolled device benchmark: prints one JSON object.

A pytest session (a child process, one device at a time, no xdist) runs ROUNDS tests that each take
`enrolled_device` on the Debian test guest (the stand-in agent, a FAKE of flightctl-agent) against
the flightctl API emulator (a FAKE of the service) on 127.0.0.1, with `agent_registry` holding a
two-variant bundle, and call `update_image("v2")`. Per device it reports:

- boot_s: from the VM slot to ready (SSH, forwards, cloud-init), the plugin's own figure;
- online_s: from the boot's start to the test body (ready + enrollment ID + ER + approval + Online);
- update_s: `update_image("v2")`, the replace to Updated through the reboot and SSH back.

    .venv/bin/python benchmarks/enrolled.py [--rounds 2] [--accel tcg]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.guest.build import build_guest
from tests.support.flightctl_emulator import FlightctlEmulator

INNER = """
import json, os, time
import pytest

OUT = {out!r}


@pytest.mark.parametrize("n", range({rounds}))
def test_round(agent_registry, enrolled_device, n):
    entered = time.monotonic()
    vm = enrolled_device.vm
    started = vm.ready_at - vm.boot_seconds
    t = time.monotonic()
    enrolled_device.update_image("v2")
    update = time.monotonic() - t
    with open(os.path.join(OUT, f"{{n}}.json"), "w") as handle:
        json.dump({{"boot_s": round_(vm.boot_seconds), "online_s": round_(entered - started),
                   "update_s": round_(update), "accel": vm.accel}}, handle)


def round_(value):
    return round(value, 1)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accel", default="auto")
    args = parser.parse_args()
    from pytest_flightctl_device.images import podman
    from pytest_flightctl_device.settings import Settings
    from tests.support.images.variants import variant_bundle

    guest = build_guest("debian")
    with tempfile.TemporaryDirectory(prefix="bench-enrolled-") as tmp, FlightctlEmulator() as emu:
        work = Path(tmp)
        repo = f"quay.io/pftd-bench-{uuid.uuid4().hex[:8]}"
        conn = podman.connect(Settings())
        try:
            made = variant_bundle(conn, repo, work / "build", tag="b1", variants=("base", "v2"))
        finally:
            conn.close()
        out = work / "out"
        out.mkdir()
        (work / "test_bench.py").write_text(INNER.format(out=str(out), rounds=args.rounds))
        config = work / "agent.yaml"
        config.write_bytes(emu.agent_config_yaml(extra={"spec-fetch-interval": "0m2s",
                                                        "status-update-interval": "0m2s"}))
        ca = work / "ca.crt"
        ca.write_bytes(emu.ca_pem)
        env = dict(os.environ, FLIGHTCTL_TOKEN=emu.token)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
               f"--rootdir={work}", str(work / "test_bench.py"), f"--device-qcow2={guest}",
               f"--device-bundle={made.path}", f"--device-cache-dir={work / 'cache'}", f"--device-accel={args.accel}",
               "--device-network", "isolated", f"--device-image-repo={repo}/device", "--device-variants", "base,v2",
               f"--device-agent-config={config}", f"--device-host-forward={emu.agent_url.rsplit(':', 1)[1]}",
               "--device-memory-mib", "768", "--device-vcpus", "1",
               f"--device-flightctl-api={emu.user_url}", f"--device-flightctl-ca={ca}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        rounds = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        if proc.returncode != 0 or len(rounds) != args.rounds:
            print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
            return 1
        print(json.dumps({"guest": "debian", "rounds": rounds,
                          "online_s": sorted(r["online_s"] for r in rounds),
                          "update_s": sorted(r["update_s"] for r in rounds)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
