"""Owner identity survives PID reuse: a pid with another start time is not the owner."""

from __future__ import annotations

import subprocess

from pytest_flightctl_device.core.liveness import Owner, start_ticks


def test_current_process_is_alive() -> None:
    assert Owner.current().alive()


def test_dead_and_reused_pids() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    owner = Owner(proc.pid, start_ticks(proc.pid) or -1)
    assert owner.alive()
    assert not Owner(proc.pid, owner.start + 1).alive()  # same pid, other process
    proc.kill()
    proc.wait()
    assert not owner.alive()


def test_token_round_trip_and_junk() -> None:
    me = Owner.current()
    assert Owner.from_token(me.token) == me and me.token == f"{me.pid}-{me.start}"
    assert Owner.from_token("12") is None and Owner.from_token("a-1") is None and Owner.from_token("") is None
