"""scripts/setup's podman check: it tries a container, writes the host drop-in only when that fails,
retries, and undoes the drop-in when it did not help.

The functions run from the real script (its text up to the main part), with the drop-in path moved
under tmp_path and a `podman` on PATH that behaves like podman on a host where crun cannot run a
container: it fails with crun's words until a drop-in naming runc exists.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.helpers import require_tool

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup"
DROPIN_LINE = "PODMAN_DROPIN=/etc/containers/containers.conf.d/90-flightctl-device-host.conf"
CRUN_ERROR = "Error: crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied"

FAKE_PODMAN = """#!/bin/sh
echo "$*" >> "$PODMAN_CALLS"
case "$1" in
  import) echo sha256:0e2367777bb7 ;;
  run)
    if [ "$FIX_WORKS" = 1 ] && [ -z "$CONTAINERS_CONF" ] && grep -q 'runtime = "runc"' "$DROPIN" 2>/dev/null; then
      exit 0
    fi
    [ "$ALWAYS_WORKS" = 1 ] && exit 0
    echo 'CRUN_ERROR' >&2; exit 126 ;;
esac
exit 0
""".replace("CRUN_ERROR", CRUN_ERROR)


def _configure(tmp_path: Path, *, always_works: bool = False, fix_works: bool = True,
               containers_conf: str = "") -> tuple[subprocess.CompletedProcess[str], Path, list[str]]:
    require_tool("busybox")
    text = SETUP.read_text()
    assert DROPIN_LINE in text
    dropin = tmp_path / "containers.conf.d" / "90-flightctl-device-host.conf"
    functions = text.split("\nBENCHMARKS=0\n", 1)[0].replace(DROPIN_LINE, f"PODMAN_DROPIN={dropin}")
    (tmp_path / "functions.sh").write_text(functions)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(FAKE_PODMAN)
    (bin_dir / "podman").chmod(0o755)
    calls = tmp_path / "calls"
    env = {k: v for k, v in os.environ.items() if k != "CONTAINERS_CONF"}
    env |= {"PATH": f"{bin_dir}:{env['PATH']}", "PODMAN_CALLS": str(calls), "DROPIN": str(dropin),
            "ALWAYS_WORKS": "1" if always_works else "0", "FIX_WORKS": "1" if fix_works else "0"}
    if containers_conf:
        env["CONTAINERS_CONF"] = containers_conf
    run = subprocess.run(["bash", "-c", f'source {tmp_path}/functions.sh; SUDO=""; configure_podman'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    return run, dropin, calls.read_text().splitlines() if calls.exists() else []


def test_a_host_where_podman_runs_gets_no_drop_in(tmp_path: Path) -> None:
    run, dropin, calls = _configure(tmp_path, always_works=True)
    assert run.returncode == 0, run.stderr
    assert not dropin.exists() and run.stderr == ""
    assert [c.split()[0] for c in calls] == ["import", "run", "rmi"]  # tried once, probe image removed


def test_a_host_where_crun_fails_gets_the_drop_in_and_a_retry(tmp_path: Path) -> None:
    run, dropin, calls = _configure(tmp_path)
    assert run.returncode == 0, run.stderr
    text = dropin.read_text()
    assert 'runtime = "runc"' in text and 'default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]' in text
    assert "[engine]" in text and "[containers]" in text
    assert f"host as configured ({CRUN_ERROR})." in text  # says why it is there, in podman's words
    assert f"writing {dropin}" in run.stderr and "RLIMIT_NOFILE" in run.stderr
    assert "podman runs containers now" in run.stderr
    assert [c.split()[0] for c in calls].count("run") == 2


def test_a_drop_in_that_does_not_help_is_removed_and_fails_setup(tmp_path: Path) -> None:
    run, dropin, _calls = _configure(tmp_path, fix_works=False)
    assert run.returncode == 1
    assert not dropin.exists() and not dropin.with_name(dropin.name + ".tmp").exists()
    assert "still cannot run a container" in run.stderr and "RLIMIT_NOFILE" in run.stderr


def test_containers_conf_in_the_environment_is_named_not_worked_around(tmp_path: Path) -> None:
    run, dropin, _calls = _configure(tmp_path, containers_conf="/somewhere/containers.conf")
    assert run.returncode == 1 and not dropin.exists()
    assert "CONTAINERS_CONF=/somewhere/containers.conf" in run.stderr


def test_an_unknown_argument_stops_setup_before_it_does_anything(tmp_path: Path) -> None:
    run = subprocess.run([str(SETUP), "--bogus"], capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "unknown argument --bogus" in run.stderr
