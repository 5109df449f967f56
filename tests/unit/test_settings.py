"""Settings: one knob table, CLI > env > ini > default, and errors that name the option."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pytest_flightctl_device.errors import ConfigError
from pytest_flightctl_device.settings import KNOBS, Settings, knob, markdown_table


def resolve(cli: dict[str, object] | None = None, env: dict[str, str] | None = None,
            ini: dict[str, object] | None = None) -> Settings:
    return Settings.resolve(cli or {}, env or {}, ini or {})


def test_defaults() -> None:
    settings = resolve()
    assert settings.accel == "auto"
    assert settings.memory_mib == 2048
    assert settings.network == "user"
    assert settings.host_forward == ()
    assert settings.variants == ("base", "v2", "v3", "v4")


def test_precedence_cli_over_env_over_ini() -> None:
    assert resolve(cli={"memory_mib": "512"}, env={"FLIGHTCTL_DEVICE_MEMORY_MIB": "1024"},
                   ini={"memory_mib": "4096"}).memory_mib == 512
    assert resolve(env={"FLIGHTCTL_DEVICE_MEMORY_MIB": "1024"}, ini={"memory_mib": "4096"}).memory_mib == 1024
    assert resolve(ini={"memory_mib": "4096"}).memory_mib == 4096


def test_empty_env_counts_as_unset() -> None:
    assert resolve(env={"FLIGHTCTL_DEVICE_ACCEL": ""}, ini={"accel": "tcg"}).accel == "tcg"


@pytest.mark.parametrize(("cli", "needle"), [
    ({"accel": "hvf"}, "--device-accel 'hvf' is not one of auto, kvm, tcg"),
    ({"memory_mib": "-5"}, "--device-memory-mib '-5' must be greater than zero"),
    ({"vcpus": "two"}, "--device-vcpus 'two' is not a whole number"),
    ({"agent_config": "/nonexistent/config.yaml"}, "--device-agent-config '/nonexistent/config.yaml' "
                                                   "is not an existing file"),
    ({"enrollment_server": "http://x:1"}, "--device-enrollment-server 'http://x:1' is not an https:// URL"),
    ({"host_forward": ["70000"]}, "--device-host-forward '70000' is not a TCP port"),
    ({"network": "bridge"}, "--device-network 'bridge' is not one of user, isolated"),
])
def test_bad_values_name_the_option(cli: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(cli=cli)
    assert needle in str(info.value)


def test_bad_env_value_names_env_var_and_option() -> None:
    with pytest.raises(ConfigError, match=r"FLIGHTCTL_DEVICE_BOOT_TIMEOUT \(for --device-boot-timeout\)"):
        resolve(env={"FLIGHTCTL_DEVICE_BOOT_TIMEOUT": "soon"})


def test_bad_ini_value_names_ini_key() -> None:
    with pytest.raises(ConfigError, match=r"ini key device_firmware \(for --device-firmware\)"):
        resolve(ini={"firmware": "coreboot"})


def test_flags_and_lists() -> None:
    settings = resolve(cli={"keep_vm": True, "host_forward": ["3443", "7443"]},
                       env={"FLIGHTCTL_DEVICE_REQUIRE": "1"})
    assert settings.keep_vm is True
    assert settings.require is True
    assert settings.host_forward == (3443, 7443)
    assert resolve(env={"FLIGHTCTL_DEVICE_HOST_FORWARD": "80, 443"}).host_forward == (80, 443)
    with pytest.raises(ConfigError, match="is not a yes/no value"):
        resolve(env={"FLIGHTCTL_DEVICE_KEEP_VM": "maybe"})


def test_existing_file_is_resolved(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("enrollment-service: {}\n")
    assert resolve(cli={"agent_config": str(config)}).agent_config == config.resolve()


def test_conflicting_sources_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("x: 1\n")
    with pytest.raises(ConfigError, match="both given"):
        resolve(cli={"agent_config": str(config), "agent_certs": str(tmp_path)})
    with pytest.raises(ConfigError, match="needs --device-enrollment-server"):
        resolve(cli={"agent_certs": str(tmp_path)})
    with pytest.raises(ConfigError, match="pick one GitHub source"):
        resolve(cli={"github_pr": "1", "github_run": "2"})
    with pytest.raises(ConfigError) as info:
        resolve(cli={"build": True, "github_pr": "1"})
    assert str(info.value) == ("--device-build was given together with a download source; "
                               "drop --device-build or --device-github-pr.")


def test_settings_defaults_are_the_knobs_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Settings() and a resolve with nothing given are the same object, even for the computed paths."""
    assert Settings() == resolve()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert Settings() == resolve()
    assert Settings().cache_dir == tmp_path / "pytest-flightctl-device"
    assert Settings().workdir == resolve().workdir


def test_fields_follow_the_knobs_in_order() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == [k.attr for k in KNOBS]


def test_change_with_dataclasses_replace() -> None:
    changed = dataclasses.replace(Settings(), memory_mib=256, network="isolated")
    assert (changed.memory_mib, changed.network, changed.vcpus) == (256, "isolated", 2)
    assert not hasattr(Settings, "replace")  # one way to change a frozen Settings


def test_derived_paths_come_from_the_settings(tmp_path: Path) -> None:
    settings = resolve(cli={"cache_dir": str(tmp_path / "c"), "cache_max_gb": "1.5"})
    cache = settings.cache()
    assert cache.root == tmp_path / "c" and cache.max_bytes == 1_500_000_000
    assert settings.locks_dir == cache.locks == tmp_path / "c" / "locks"
    assert settings.accel_file == tmp_path / "c" / "accel.json"
    assert resolve(cli={"cache_dir": str(tmp_path)}).cache().max_bytes is None


def test_help_text_says_the_default() -> None:
    assert knob("memory_mib").help_text() == "Guest memory in MiB (default 2048)."
    assert knob("variants").help_text().endswith("(default base,v2,v3,v4).")
    assert knob("keep_vm").help_text() == knob("keep_vm").help  # a flag's default is "off": not said


def test_every_knob_is_a_settings_field() -> None:
    fields = set(Settings.__dataclass_fields__)
    assert {knob.attr for knob in KNOBS} == fields


def test_readme_table_matches_the_knobs() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "stale README options table: paste python -m pytest_flightctl_device.settings"


def test_readme_test_command_is_what_ci_runs() -> None:
    root = Path(__file__).parents[2]
    readme = (root / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert len(commands) >= 2, "README must open with two sh blocks: the main job, then the tests"
    test_command = commands[1].strip()
    assert test_command in (root / ".ci" / "run").read_text()
