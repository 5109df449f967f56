"""Images benchmark: prints one JSON object.

- load: `podman load` (CLI) vs the plugin's load_bundle of the same 1 GiB bundle, each from an
  empty slot (the image removed before every load), rounds interleaved with the order rotating, so
  host load hits all alike; median of --rounds; target ratio <= 1.1. Two plugin contenders: its
  default on a local socket (the service reads the file itself) and the upload it uses for any
  other service (`server_side_load = False`, what podman 4.3 spools to /var/tmp).
- peak RSS of the process doing each plugin load (a fresh subprocess); target <= 64 MiB.
- warm agent_images: connect + load_bundle when every tag is present (skip path); target <= 1 s.
- parallel variant build wall time vs base + slowest variant built alone; target <= 1.15x.

Everything it creates is named localhost/pftd-bench/... or lives under a temp dir, and is removed
at the end. Needs podman able to run a build (scripts/setup makes sure of that).

    .venv/bin/python benchmarks/images.py [--rounds 3] [--load-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pytest_flightctl_device.images import build, podman  # noqa: E402
from pytest_flightctl_device.settings import Settings  # noqa: E402
from tests.support.images.stand_ins import TEST_CONTAINERFILES, busybox_rootfs_tar, import_image  # noqa: E402

REPO = "localhost/pftd-bench"
BIG = f"{REPO}/big:base-1gib"  # <repo>:<variant>-<tag>, as load_bundle expects
STEP_SLEEP = "4"

LOADER = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
settings = Settings(podman_url=sys.argv[1], image_repo=sys.argv[3], image_tag=sys.argv[4], variants=("base",))
conn = podman.connect(settings)
conn.server_side_load = sys.argv[6] == "server"
t1 = time.perf_counter()
loaded = podman.load_bundle(conn, Path(sys.argv[2]), settings, Path(sys.argv[5]))
t2 = time.perf_counter()
print(json.dumps({"connect_s": t1 - t0, "load_s": t2 - t1, "loaded": loaded.loaded,
                  "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def plugin_load(url: str, bundle: Path, lock_dir: Path, mode: str = "server") -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOADER, url, str(bundle), f"{REPO}/big", "1gib", str(lock_dir), mode],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, float] = json.loads(out.stdout)
    return result


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved load rounds")
    parser.add_argument("--load-only", action="store_true", help="skip the build measurements")
    return parser.parse_args()


def main() -> None:
    args = _args()
    work = Path(tempfile.mkdtemp(prefix="pftd-bench-", dir="/var/tmp"))
    conn = podman.connect(Settings())
    made: list[str] = []
    try:
        base = f"{REPO}/busybox:latest"
        import_image(conn, busybox_rootfs_tar(work / "rootfs.tar"), base)
        made.append(base)
        ctx = work / "big"
        ctx.mkdir()
        (ctx / "Containerfile").write_text(
            f"FROM {base}\nRUN head -c 1073741824 /dev/urandom > /big.bin\n")
        subprocess.run(["podman", "build", "-q", "-t", BIG, "-f", str(ctx / "Containerfile"), str(ctx)],
                       check=True, capture_output=True)
        made.append(BIG)
        bundle = work / "bundle.tar"
        conn.export([BIG], bundle)
        size_mib = bundle.stat().st_size / 2**20
        big_id = conn.image_id(BIG)

        def cli() -> dict[str, float]:
            return {"load_s": timed(lambda: subprocess.run(["podman", "load", "-q", "-i", str(bundle)],
                                                           check=True, capture_output=True))}

        contenders = {"cli": cli,
                      "plugin": lambda: plugin_load(conn.url, bundle, work / "locks", "server"),
                      "plugin_upload": lambda: plugin_load(conn.url, bundle, work / "locks", "upload")}
        samples: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
        orders: list[list[str]] = []
        names = list(contenders)
        for index in range(args.rounds):
            order = names[index % len(names):] + names[:index % len(names)]
            orders.append(order)
            for name in order:
                conn.api.delete(f"/images/{BIG}")
                result = contenders[name]()
                assert conn.image_id(BIG) == big_id, f"{name} loaded another image ID"
                assert result.get("loaded", True), f"{name} skipped the load"
                samples[name].append(result)
        warm = [plugin_load(conn.url, bundle, work / "locks") for _ in range(3)]
        assert not any(w["loaded"] for w in warm)
        times = {name: [s["load_s"] for s in runs] for name, runs in samples.items()}
        medians = {name: statistics.median(t) for name, t in times.items()}
        report: dict[str, object] = {
            "bundle_mib": round(size_mib), "rounds": args.rounds, "order_per_round": orders,
            "load_s": {name: [round(t, 2) for t in ts] for name, ts in times.items()},
            "load_median_s": {name: round(m, 2) for name, m in medians.items()},
            "load_mib_per_s": {name: round(size_mib / m) for name, m in medians.items()},
            "load_ratio_plugin_vs_cli": round(medians["plugin"] / medians["cli"], 3), "load_ratio_target": 1.1,
            "load_ratio_plugin_upload_vs_cli": round(medians["plugin_upload"] / medians["cli"], 3),
            "load_peak_rss_mib": {name: round(max(s["maxrss_mib"] for s in samples[name]), 1)
                                  for name in ("plugin", "plugin_upload")},
            "load_peak_rss_target_mib": 64,
            "warm_agent_images_s": [round(w["connect_s"] + w["load_s"], 3) for w in warm],
            "warm_agent_images_target_s": 1.0,
        }
        if args.load_only:
            print(json.dumps(report, indent=1))
            return

        nonce = uuid.uuid4().hex[:8]
        seq_settings = dataclasses.replace(Settings(), containerfiles=TEST_CONTAINERFILES, base_image=base,
                                           image_repo=f"{REPO}/device", image_tag=f"seq-{nonce}")
        plan = build.plan(seq_settings)
        plan = build.BuildPlan(**{**plan.__dict__, "build_args": {
            **plan.build_args, "STEP_SLEEP": STEP_SLEEP, "STEP_NONCE": f"seq-{nonce}"}})
        quiet = lambda _line: None  # noqa: E731
        base_s = timed(lambda: build.build_one(conn, plan, "base", quiet))
        variant_s = {v: timed(lambda v=v: build.build_one(conn, plan, v, quiet)) for v in ("v2", "v3", "v4")}
        made += [plan.ref(v) for v in plan.variants]
        par_plan = build.BuildPlan(**{**plan.__dict__, "tag": f"par-{nonce}", "build_args": {
            **plan.build_args, "STEP_NONCE": f"par-{nonce}"}})
        parallel_s = timed(lambda: build.build_all(conn, par_plan, quiet))
        made += [par_plan.ref(v) for v in par_plan.variants]

        serial_bound = base_s + max(variant_s.values())
        print(json.dumps({
            **report,
            "build_base_s": round(base_s, 2), "build_variant_alone_s": {k: round(v, 2) for k, v in variant_s.items()},
            "build_parallel_all_s": round(parallel_s, 2),
            "build_ratio_vs_base_plus_slowest": round(parallel_s / serial_bound, 3), "build_ratio_target": 1.15,
            "step_sleep_s": float(STEP_SLEEP),
        }, indent=1))
    finally:
        for ref in reversed(made):
            conn.api.delete(f"/images/{ref}", params={"force": True})
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
