"""The private registry's pieces that need no running registry: config, state, leases, lookups."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from pytest_flightctl_device.core.liveness import Owner, start_ticks
from pytest_flightctl_device.errors import MissingToolError
from pytest_flightctl_device.images import registry


def test_config_listens_on_loopback_only_with_our_storage_and_no_auth(tmp_path: Path) -> None:
    layout = registry.Layout(tmp_path)
    config = registry.config_for(layout, 41234, access_log=False)
    assert config["http"]["addr"] == "127.0.0.1:41234"  # type: ignore[index]
    assert config["storage"]["filesystem"] == {"rootdirectory": str(tmp_path / "data")}  # type: ignore[index]
    assert config["storage"]["delete"] == {"enabled": True}  # type: ignore[index]
    assert "auth" not in config
    assert config["log"]["accesslog"] == {"disabled": True}  # type: ignore[index]
    assert registry.config_for(layout, 1, access_log=True)["log"]["accesslog"] == {"disabled": False}  # type: ignore[index]
    json.dumps(config)  # written as JSON, which YAML reads


def test_state_round_trips_and_rejects_junk(tmp_path: Path) -> None:
    me = Owner.current()
    state = registry.State("127.0.0.1:5", me, me)
    (tmp_path / "s.json").write_text(state.to_json())
    assert registry.State.read(tmp_path / "s.json") == state
    for junk in ("", "{}", "[1]", '{"address": "a", "supervisor": "x", "registry": "1-2"}'):
        (tmp_path / "s.json").write_text(junk)
        assert registry.State.read(tmp_path / "s.json") is None
    assert registry.State.read(tmp_path / "absent.json") is None


def test_leases_of_dead_sessions_do_not_count_and_are_pruned(tmp_path: Path) -> None:
    layout = registry.Layout(tmp_path)
    layout.leases.mkdir()
    dead = subprocess.Popen(["true"])
    dead_owner = Owner(dead.pid, start_ticks(dead.pid) or 1)
    dead.wait()
    live = layout.leases / f"{Owner.current().token}.aa"
    live.touch()
    (layout.leases / f"{dead_owner.token}.bb").touch()
    (layout.leases / "not-a-token").touch()
    assert registry.live_leases(layout) == [live]
    assert len(list(layout.leases.iterdir())) == 3
    assert registry.live_leases(layout, prune=True) == [live]
    assert list(layout.leases.iterdir()) == [live]


def test_a_missing_binary_names_both_packages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingToolError, match=r"docker-registry.*docker-distribution"):
        registry.find_binary()
    with pytest.raises(MissingToolError):
        registry.acquire(tmp_path / "reg")
    assert not (tmp_path / "reg").exists()  # nothing written before the check


def test_registry_env_drops_distribution_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REGISTRY_AUTH_FILE", "/root/auth.json")  # podman's, read by distribution as config
    monkeypatch.setenv("REGISTRY_HTTP_ADDR", "0.0.0.0:5000")
    env = registry._registry_env()
    assert not [k for k in env if k.startswith("REGISTRY_")]
    assert env["PATH"]


def test_answers_is_false_where_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert not registry.answers(f"127.0.0.1:{port}", timeout=0.5)
