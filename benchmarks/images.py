"""Images benchmark: prints one JSON object.

- load: the plugin's streamed API load vs `podman load` (CLI) of the same 1 GiB bundle, each from
  an empty slot (the image removed before every load), median of ROUNDS; target ratio <= 1.1.
- peak RSS of the process doing the plugin load (a fresh subprocess); target <= 64 MiB.
- warm agent_images: connect + load_bundle when every tag is present (skip path); target <= 1 s.
- parallel variant build wall time vs base + slowest variant built alone; target <= 1.15x.

Everything it creates is named localhost/pftd-bench/... or lives under a temp dir, and is removed
at the end. Needs podman (and CONTAINERS_CONF on hosts that need one, as in CI).
"""

from __future__ import annotations

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
ROUNDS = 2
STEP_SLEEP = "4"

LOADER = """
import json, resource, sys, time
from pathlib import Path
t0 = time.perf_counter()
from pytest_flightctl_device.images import podman
from pytest_flightctl_device.settings import Settings
settings = Settings(podman_url=sys.argv[1], image_repo=sys.argv[3], image_tag=sys.argv[4], variants=("base",))
conn = podman.connect(settings)
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


def plugin_load(url: str, bundle: Path, lock_dir: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOADER, url, str(bundle), f"{REPO}/big", "1gib", str(lock_dir)],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
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

        cli_times, api_times, rss = [], [], []
        for _ in range(ROUNDS):
            conn.api.delete(f"/images/{BIG}")
            cli_times.append(timed(lambda: subprocess.run(["podman", "load", "-q", "-i", str(bundle)],
                                                          check=True, capture_output=True)))
            conn.api.delete(f"/images/{BIG}")
            result = plugin_load(conn.url, bundle, work / "locks")
            assert result["loaded"]
            api_times.append(result["load_s"])
            rss.append(result["maxrss_mib"])
        warm = [plugin_load(conn.url, bundle, work / "locks") for _ in range(3)]
        assert not any(w["loaded"] for w in warm)

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

        cli_med, api_med = statistics.median(cli_times), statistics.median(api_times)
        serial_bound = base_s + max(variant_s.values())
        print(json.dumps({
            "bundle_mib": round(size_mib),
            "load_cli_s": [round(t, 2) for t in cli_times],
            "load_plugin_s": [round(t, 2) for t in api_times],
            "load_ratio_plugin_vs_cli": round(api_med / cli_med, 3), "load_ratio_target": 1.1,
            "load_plugin_mib_per_s": round(size_mib / api_med), "load_cli_mib_per_s": round(size_mib / cli_med),
            "load_peak_rss_mib": round(max(rss), 1), "load_peak_rss_target_mib": 64,
            "warm_agent_images_s": [round(w["connect_s"] + w["load_s"], 3) for w in warm],
            "warm_agent_images_target_s": 1.0,
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
