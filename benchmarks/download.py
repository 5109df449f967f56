"""Download benchmark: a cold fetch end to end against curl's transfer of the same zip, round by round.

Prints JSON. Everything runs on 127.0.0.1 through the tests' GitHub emulator (API + blob host,
one server for both contenders). Each round runs curl, then the plugin, so both see the same load:
  - curl: `curl -o FILE` of the signed blob URL (the transfer alone: no digest, no unzip, no fsync)
  - plugin: a cold `Artifacts.bundle()` in a fresh process with a fresh cache, timed inside the
    process from the first API call to the verified object in the cache (API calls, the zip's
    tail, the one pass through digest + member write + sha256 + CRC-32, fsync, bundle check,
    rename); its peak RSS is reported too
Rates are zip bytes per second. `ratio` is the plugin's median rate over curl's; the target is 0.8.
A warm fetch of both artifacts (from the cache, API calls included) closes the run.
Usage: .venv/bin/python benchmarks/download.py [--gib 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.github_emulator import TOKEN, GitHubEmulator  # noqa: E402

TARGET = 0.8
CHILD = r"""
import json, resource, sys, time
from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.settings import Settings
mode, api, cache, run = sys.argv[1:5]
start = time.perf_counter()
artifacts = Artifacts(Settings.resolve({"github_api_url": api, "cache_dir": cache, "github_run": run}, {}, {}))
artifacts.bundle()
if mode == "warm":
    artifacts.qcow2()
elapsed = time.perf_counter() - start
print(json.dumps({"seconds": elapsed, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def make_payload(path: Path, size: int) -> None:
    """A bundle tar of `size` bytes of incompressible layer data plus manifest.json."""
    block = os.urandom(16 << 20)
    manifest = json.dumps([{"Config": "c" * 64 + ".json", "RepoTags": ["quay.io/flightctl/flightctl-device:base-b"],
                            "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("layer.tar")
        info.size = size

        class Repeat(io.RawIOBase):
            left = size

            def readable(self) -> bool:
                return True

            def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
                count = min(len(buffer), len(block), self.left)
                buffer[:count] = block[:count]
                self.left -= count
                return count

        tar.addfile(info, io.BufferedReader(Repeat(), 1 << 20))
        meta = tarfile.TarInfo("manifest.json")
        meta.size = len(manifest)
        tar.addfile(meta, io.BytesIO(manifest))


def plugin(mode: str, gh: GitHubEmulator, cache: Path, run_id: int) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTCTL_DEVICE_")}
    env["GITHUB_TOKEN"] = TOKEN
    out = subprocess.run([sys.executable, "-c", CHILD, mode, gh.api_url, str(cache), str(run_id)],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def curl(url: str, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["curl", "-sS", "--fail", "-o", str(dest), url], check=True)
    elapsed = time.perf_counter() - start
    dest.unlink()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    size = int(args.gib * (1 << 30))
    work = Path(tempfile.mkdtemp(prefix="bench-download-", dir="/var/tmp"))
    try:
        payload = work / "bundle.tar"
        make_payload(payload, size)
        qcow2 = work / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
        emu_dir = work / "emulator"
        emu_dir.mkdir()
        with GitHubEmulator(emu_dir, url_ttl=600) as gh:
            run = gh.add_run("a" * 40)
            bundle = gh.add_artifact(run, "agent-images-bundle-bench", payload, member="bundle.tar")
            gh.add_artifact(run, "agent-qcow2-image-bench", qcow2, member="disk.qcow2")
            payload.unlink()  # only the zip is needed now
            zip_size = bundle.zip_path.stat().st_size
            url = gh.sign(bundle.id)
            load_before = os.getloadavg()
            rounds = []
            for index in range(args.rounds):
                curl_s = curl(url, work / "curl.zip")
                cache = work / f"cache-{index}"
                cold = plugin("cold", gh, cache, run.id)
                rounds.append({"curl_mb_s": round(zip_size / curl_s / 1e6, 1),
                               "plugin_mb_s": round(zip_size / cold["seconds"] / 1e6, 1),
                               "ratio": round(curl_s / cold["seconds"], 3),
                               "plugin_peak_rss_mib": round(cold["peak_rss_kib"] / 1024, 1)})
                if index < args.rounds - 1:
                    shutil.rmtree(cache)
            load_after = os.getloadavg()
            warm = min((plugin("warm", gh, cache, run.id) for _ in range(3)), key=lambda r: r["seconds"])
            leaks = len(gh.auth_leaks)
        curl_median = statistics.median(r["curl_mb_s"] for r in rounds)
        plugin_median = statistics.median(r["plugin_mb_s"] for r in rounds)
        ratio = plugin_median / curl_median
        print(json.dumps({
            "artifact_zip_bytes": zip_size,
            "rounds": rounds,
            "curl_median_mb_s": curl_median,
            "plugin_end_to_end_median_mb_s": plugin_median,
            "ratio_median": round(ratio, 3),
            "ratio_per_round_median": round(statistics.median(r["ratio"] for r in rounds), 3),
            "target_ratio": TARGET,
            "target_met": ratio >= TARGET,
            "peak_rss_mib": max(r["plugin_peak_rss_mib"] for r in rounds),
            "target_peak_rss_mib": 64,
            "warm_both_s": round(warm["seconds"], 3),
            "target_warm_s": 0.2,
            "blob_auth_leaks": leaks,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in load_after],
            "cpus": os.cpu_count(),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
