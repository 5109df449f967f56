"""Download benchmark: the plugin against curl on the same 1 GiB artifact from the same loopback server.

Prints JSON. Everything runs on 127.0.0.1 through the tests' GitHub emulator (API + blob host):
  - curl_mb_s: curl of the signed blob URL to a file (best of 2)
  - plugin_transfer_mb_s: the plugin's downloader alone on the same URL, hashing on the way (best of 2)
  - plugin_obtain_s: a cold `Artifacts.bundle()` in a fresh process: API calls, download, zip digest,
    extraction, manifest check, rename into the cache
  - peak_rss_mib: peak RSS of that downloading process
  - warm_both_s: a fresh process getting both artifacts from the warm cache (API calls included)
Usage: .venv/bin/python benchmarks/download.py [--gib 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.github_emulator import TOKEN, GitHubEmulator  # noqa: E402

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from pytest_flightctl_device.artifacts.session import Artifacts
from pytest_flightctl_device.settings import Settings
mode, api, cache, run, url, dest = sys.argv[1:7]
start = time.perf_counter()
if mode == "transfer":
    from pytest_flightctl_device.artifacts.sources.http import Transfer, new_session
    with new_session() as session:
        Transfer(session, lambda: url, Path(dest), "bench", trusted_partial=True).run()
else:
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


def child(mode: str, gh: GitHubEmulator, cache: Path, run_id: int, url: str, dest: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLIGHTCTL_DEVICE_")}
    env["GITHUB_TOKEN"] = TOKEN
    out = subprocess.run([sys.executable, "-c", CHILD, mode, gh.api_url, str(cache), str(run_id), url, str(dest)],
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
            curl_s = [curl(url, work / "curl.zip")]
            transfer_s = [child("transfer", gh, work / "unused", run.id, url, work / "plugin.zip")["seconds"]]
            (work / "plugin.zip").unlink()
            curl_s.append(curl(url, work / "curl.zip"))
            transfer_s.append(child("transfer", gh, work / "unused", run.id, url, work / "plugin.zip")["seconds"])
            (work / "plugin.zip").unlink()
            cold = child("cold", gh, work / "cache", run.id, url, work / "x")
            warm = min((child("warm", gh, work / "cache", run.id, url, work / "x") for _ in range(3)),
                       key=lambda r: r["seconds"])
            leaks = len(gh.auth_leaks)
        curl_rate = zip_size / min(curl_s) / 1e6
        transfer_rate = zip_size / min(transfer_s) / 1e6
        print(json.dumps({
            "artifact_bytes": zip_size,
            "curl_mb_s": round(curl_rate, 1),
            "plugin_transfer_mb_s": round(transfer_rate, 1),
            "transfer_ratio_vs_curl": round(transfer_rate / curl_rate, 3),
            "target_ratio": 0.9,
            "plugin_obtain_s": round(cold["seconds"], 2),
            "plugin_obtain_mb_s": round(zip_size / cold["seconds"] / 1e6, 1),
            "obtain_ratio_vs_curl": round(min(curl_s) / cold["seconds"], 3),
            "peak_rss_mib": round(cold["peak_rss_kib"] / 1024, 1),
            "target_peak_rss_mib": 64,
            "warm_both_s": round(warm["seconds"], 3),
            "target_warm_s": 0.2,
            "blob_auth_leaks": leaks,
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
