"""Registry benchmark: prints one JSON object.

The same bundle (four variants sharing a base, >= 1 GiB of real, compressible files from /usr,
laid out as `podman save -m` writes it) into an empty private registry (the real distribution
binary) each time, in one run:

- upstream: what flightctl's e2e does, `skopeo copy docker-archive:<tar>:<ref> docker://<registry>/<ref>
  --dest-tls-verify=false` per image, one after the other (skopeo compresses every layer);
- plugin: images.push.push_bundle in a child process (its peak RSS is that child's VmHWM);
- warm: the plugin's push again into the now full registry (what every later session pays).

Targets: plugin cold <= 0.5x upstream, warm <= 1 s, peak RSS <= 64 MiB.

    .venv/bin/python benchmarks/registry.py [--size-mib 1100] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
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

from pytest_flightctl_device.images import push, registry  # noqa: E402

REPO = "quay.io/flightctl/flightctl-device"
TAG = "bench"
# The base's shared layer, then one layer of its own per variant: real files, so gzip has work to do.
SHARED = "/usr/lib"
OWN = {"base": "/usr/libexec", "v2": "/usr/share", "v3": "/usr/bin", "v4": "/usr/include"}
OWN_MIB = 40

PUSHER = """
import json, sys, time
from pathlib import Path
from pytest_flightctl_device.images import push
t0 = time.perf_counter()
target = push.Target(sys.argv[2], key=sys.argv[3], storage=Path(sys.argv[5]) if sys.argv[5:] else None)
result = push.push_bundle(Path(sys.argv[1]), target, Path(sys.argv[4]))
seconds = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "vmhwm_mib": hwm / 1024, "blobs_sent": result.counters.blobs_sent,
                  "mib_sent": result.counters.bytes_sent / 2**20, "images_sent": sum(i.sent for i in result.images)}))
"""


def files_under(top: str, budget: int) -> list[Path]:
    """Regular readable files under `top`, in a stable order, until `budget` bytes."""
    picked: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                if path.is_symlink() or not path.is_file() or not os.access(path, os.R_OK):
                    continue
                size = path.stat().st_size
            except OSError:
                continue
            picked.append(path)
            total += size
            if total >= budget:
                return picked
    return picked


def write_layer(dest: Path, files: list[Path]) -> str:
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in files:
            info = tar.gettarinfo(str(path), arcname=str(path).lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            with path.open("rb") as handle:
                tar.addfile(info, handle)
    digest = hashlib.sha256()
    with dest.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_bundle(dest: Path, work: Path, size_mib: int) -> dict[str, str]:
    """The bundle: shared layer + one layer per variant; returns tag -> image ID."""
    shared_budget = (size_mib - OWN_MIB * len(OWN)) << 20
    layers: dict[str, Path] = {}
    shared_tar = work / "shared.tar"
    shared = write_layer(shared_tar, files_under(SHARED, shared_budget))
    layers[shared] = shared_tar
    manifest, ids, configs = [], {}, {}
    for variant, top in OWN.items():
        own_tar = work / f"{variant}.tar"
        own = write_layer(own_tar, files_under(top, OWN_MIB << 20))
        layers[own] = own_tar
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Labels": {"io.flightctl.device.variant": variant}},
                             "rootfs": {"type": "layers", "diff_ids": [f"sha256:{shared}", f"sha256:{own}"]},
                             "history": [{"created_by": "benchmarks/registry.py"}] * 2}).encode()
        image_id = hashlib.sha256(config).hexdigest()
        configs[image_id] = config
        tag = f"{REPO}:{variant}-{TAG}"
        manifest.append({"Config": f"{image_id}.json", "RepoTags": [tag], "Layers": [f"{shared}.tar", f"{own}.tar"]})
        ids[tag] = image_id
    with tarfile.open(dest, "w") as tar:
        for digest, path in layers.items():
            tar.add(str(path), arcname=f"{digest}.tar")
            path.unlink()
        for image_id, config in configs.items():
            info = tarfile.TarInfo(f"{image_id}.json")
            info.size = len(config)
            tar.addfile(info, io.BytesIO(config))
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return ids


def upstream(bundle: Path, address: str, tags: list[str]) -> float:
    """flightctl e2e's way: one skopeo copy per image, in sequence."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise SystemExit("skopeo is not installed (scripts/setup installs it)")
    started = time.perf_counter()
    for tag in tags:
        dest = f"{address}/{tag.split('/', 1)[1]}"
        subprocess.run([skopeo, "copy", "--quiet", f"docker-archive:{bundle}:{tag}", f"docker://{dest}",
                        "--dest-tls-verify=false"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def plugin(bundle: Path, lease: registry.PrivateRegistry, state: Path) -> dict[str, float]:
    args = [str(bundle), lease.address, lease.key, str(state), str(lease.layout.data)]  # as agent_registry
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PUSHER, *args],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    figures: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - started  # with the interpreter's start, like skopeo's
    return figures


def registry_mib(lease: registry.PrivateRegistry) -> float:
    total = sum(p.stat().st_size for p in lease.layout.data.rglob("*") if p.is_file())
    return total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1100, help="bundle size (at least 1024)")
    parser.add_argument("--keep", type=Path, help="build the bundle here and keep it (reused if present)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fcdev-bench-registry-", dir="/var/tmp"))
    leases: list[registry.PrivateRegistry] = []
    try:
        bundle = (args.keep or work) / "bundle.tar"
        t0 = time.perf_counter()
        if not bundle.is_file():
            bundle.parent.mkdir(parents=True, exist_ok=True)
            write_bundle(bundle, work, args.size_mib)
        build_s = time.perf_counter() - t0
        tags = [tag for image in push.plan(bundle) for tag in image.tags]
        with registry.acquire(work / "upstream") as lease:
            leases.append(lease)
            upstream_s = upstream(bundle, lease.address, tags)
            upstream_stored = registry_mib(lease)
        with registry.acquire(work / "plugin") as lease:
            leases.append(lease)
            cold = plugin(bundle, lease, work / "state")
            warm = plugin(bundle, lease, work / "state")
            plugin_stored = registry_mib(lease)
        report = {
            "bundle_mib": round(bundle.stat().st_size / 2**20, 1), "images": len(tags),
            "bundle_build_s": round(build_s, 1),
            "upstream_skopeo_copy_s": round(upstream_s, 2), "upstream_registry_mib": round(upstream_stored, 1),
            "plugin_cold_s": round(cold["seconds"], 2), "plugin_cold_process_s": round(cold["process_s"], 2),
            "plugin_cold_mib_sent": round(cold["mib_sent"], 1),
            "plugin_cold_blobs_sent": cold["blobs_sent"], "plugin_registry_mib": round(plugin_stored, 1),
            "plugin_warm_s": round(warm["seconds"], 3), "plugin_warm_blobs_sent": warm["blobs_sent"],
            "plugin_peak_rss_mib": round(max(cold["vmhwm_mib"], warm["vmhwm_mib"]), 1),
            "ratio_cold_vs_upstream": round(cold["process_s"] / upstream_s, 3),
        }
        report["targets_met"] = {"cold_le_0.5x": report["ratio_cold_vs_upstream"] <= 0.5,
                                 "warm_le_1s": warm["seconds"] <= 1.0,
                                 "rss_le_64mib": report["plugin_peak_rss_mib"] <= 64}
        print(json.dumps(report, indent=1))
    finally:
        deadline = time.monotonic() + 10  # the supervisors stop within ~0.5 s of the last lease
        while any(lease.supervisor.alive() for lease in leases) and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
