"""Turns the boot benchmark's rounds into medians, a per-contender time split, ratios and verdicts.

The guest's own boot (first console output to cloud-init's final message) is CPU-bound TCG work
that host load stretches differently from round to round; what a tool adds sits before it (until
the VM's first console output) and after it (until the tool calls the VM ready). The split makes
that visible, and gives an overhead estimate the guest's noise does not swamp.
"""

from __future__ import annotations

import statistics
from typing import Any

from boot_common import phase_medians, summary

OVERHEAD_TARGET_S = 0.3
RATIO_TARGET = 0.7


def _ok(samples: list[dict[str, Any]], key: str = "ready_s") -> list[float]:
    return [s[key] for s in samples if key in s]


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def split(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per round: start -> first console output, guest boot, final message -> ready."""
    start: list[float] = []
    guest: list[float] = []
    tail: list[float] = []
    first = "firmware_output"
    for sample in rounds:
        console = sample.get("console", {})
        if "ready_s" not in sample or "ready_marker" not in console:
            continue
        if "firmware_output" not in console:  # no firmware banner on this VM's serial port
            first = "kernel_output"
        begin = console.get("firmware_output", console.get("kernel_output"))
        if begin is None:
            continue
        start.append(begin)
        guest.append(console["ready_marker"] - begin)
        tail.append(sample["ready_s"] - console["ready_marker"])
    return {"first_console_event": first,
            "start_to_first_console_s": _median(start),
            "guest_boot_s": _median(guest),
            "final_message_to_ready_s": _median(tail),
            "outside_guest_boot_s": _median([a + b for a, b in zip(start, tail, strict=True)]),
            "per_round": {"start": [round(x, 3) for x in start], "guest": [round(x, 3) for x in guest],
                          "tail": [round(x, 3) for x in tail]}}


def _block(rounds: list[dict[str, Any]], setup_error: str | None = None, **extra: Any) -> dict[str, Any]:
    errors = [s["error"] for s in rounds if "error" in s]
    failed = {"setup_error": setup_error} if setup_error else {}
    if errors:
        failed |= {"failed_rounds": len(errors), "errors": sorted(set(errors))}
    return {**summary(_ok(rounds)), **failed, **extra,
            "qemu_cpu_to_ready": summary(_ok(rounds, "qemu_cpu_s")),
            "console_median_s": phase_medians([s["console"] for s in rounds if "console" in s]),
            "console_qemu_cpu_median_s": phase_medians(
                [{k: v for k, v in s["console_qemu_cpu_s"].items() if v is not None}
                 for s in rounds if "console_qemu_cpu_s" in s]),
            "split_median": split(rounds),
            "rounds": rounds}


def report(results: dict[str, list[dict[str, Any]]], failures: dict[str, str] | None = None) -> dict[str, Any]:
    """`failures`: contenders that could not be set up, and why (they have no rounds)."""
    failures = failures or {}
    plugin, raw, tc = results["plugin"], results["raw_qemu"], results["testcloud"]
    plugin_s, raw_s, tc_s = _ok(plugin), _ok(raw), _ok(tc)
    out: dict[str, Any] = {
        "plugin": _block(plugin, failures.get("plugin"),
                         phases_median_s=phase_medians([s["phases"] for s in plugin if "phases" in s])),
        "raw_qemu": _block(raw, failures.get("raw_qemu")),
        "testcloud": _block(tc, failures.get("testcloud"), then_ssh_true=summary(_ok(tc, "then_ssh_true_s")),
                            phases_median_s=phase_medians([s["phases"] for s in tc if "phases" in s])),
    }
    targets: dict[str, Any] = {}
    if plugin_s and raw_s:
        overhead = statistics.median(plugin_s) - statistics.median(raw_s)
        paired = [p["ready_s"] - r["ready_s"] for p, r in zip(plugin, raw, strict=True)
                  if "ready_s" in p and "ready_s" in r]
        outside_p = out["plugin"]["split_median"]["outside_guest_boot_s"]
        outside_r = out["raw_qemu"]["split_median"]["outside_guest_boot_s"]
        outside = round(outside_p - outside_r, 3) if outside_p is not None and outside_r is not None else None
        out["overhead_s"] = {"median_plugin_minus_median_raw": round(overhead, 3),
                             "paired_per_round": [round(d, 3) for d in paired],
                             "paired_median": _median(paired),
                             "outside_guest_boot": outside}
        targets["plugin_overhead_over_raw_qemu"] = {
            "definition": "median(plugin ready) - median(raw qemu ready)",
            "value_s": round(overhead, 3), "target_s": OVERHEAD_TARGET_S, "pass": overhead <= OVERHEAD_TARGET_S}
        if outside is not None:
            targets["plugin_overhead_outside_guest_boot"] = {
                "definition": "same, counting only start -> first console output and final message -> ready "
                              "(the guest's own boot, stretched by host load, left out)",
                "value_s": outside, "target_s": OVERHEAD_TARGET_S, "pass": outside <= OVERHEAD_TARGET_S}
    if plugin_s and tc_s:
        ratio = statistics.median(plugin_s) / statistics.median(tc_s)
        out["ratio_plugin_to_testcloud"] = round(ratio, 3)
        targets["plugin_vs_testcloud_ratio"] = {
            "definition": "median(plugin ready) / median(testcloud create-to-ready)",
            "value": round(ratio, 3), "target": RATIO_TARGET, "pass": ratio <= RATIO_TARGET}
        tc_ssh = _ok(tc, "then_ssh_true_s")
        if tc_ssh:
            ratio_ssh = statistics.median(plugin_s) / statistics.median(tc_ssh)
            out["ratio_plugin_to_testcloud_then_ssh"] = round(ratio_ssh, 3)
        if raw_s:
            out["ratio_raw_qemu_to_testcloud"] = round(statistics.median(raw_s) / statistics.median(tc_s), 3)
    out["targets"] = targets
    return out
