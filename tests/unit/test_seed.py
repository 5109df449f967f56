"""seed.py: the exact user-data shape, meta-data, network-config, and the ISO read back with pycdlib."""

from __future__ import annotations

import base64
import io
import os
import re
import stat
from pathlib import Path

import pycdlib
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_flightctl_device.devices.agent import AgentFile, throwaway_agent_config
from pytest_flightctl_device.devices.seed import (
    SeedSpec,
    new_instance_id,
    ready_marker,
    redacted_user_data,
    render_meta_data,
    render_network_config,
    render_user_data,
    write_seed_iso,
)
from pytest_flightctl_device.errors import ConfigError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop fcdev"
FILES = (AgentFile("/etc/flightctl/config.yaml", b"enrollment-service: {}\n", 0o600),
         AgentFile("/etc/flightctl/certs/ca.crt", b"CA\n", 0o644))


def spec(**changes: object) -> SeedSpec:
    values: dict[str, object] = {"instance_id": "i-0123abcd", "hostname": "fcdev-abc-main-1",
                                 "authorized_key": KEY, "files": FILES}
    values.update(changes)
    return SeedSpec(**values)  # type: ignore[arg-type]


def test_user_data_exact_shape() -> None:
    text = render_user_data(spec(runcmd=("systemctl restart flightctl-agent", 'echo "a\\b"')))
    assert text == (
        "#cloud-config\n"
        "hostname: fcdev-abc-main-1\n"
        "users:\n"
        "  - name: user\n"
        "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
        "    shell: /bin/bash\n"
        "    lock_passwd: false\n"
        "    ssh_authorized_keys:\n"
        f"      - {KEY}\n"
        "write_files:\n"
        "  - path: /etc/flightctl/config.yaml\n"
        "    owner: root:root\n"
        "    permissions: '0600'\n"
        "    encoding: b64\n"
        "    content: ZW5yb2xsbWVudC1zZXJ2aWNlOiB7fQo=\n"
        "  - path: /etc/flightctl/certs/ca.crt\n"
        "    owner: root:root\n"
        "    permissions: '0644'\n"
        "    encoding: b64\n"
        "    content: Q0EK\n"
        "runcmd:\n"
        '  - [sh, -c, "systemctl restart flightctl-agent"]\n'
        '  - [sh, -c, "echo \\"a\\\\b\\""]\n'
        "final_message: fcdev-ready i-0123abcd\n")


def test_user_data_without_runcmd_or_files_omits_the_sections() -> None:
    text = render_user_data(spec(files=()))
    assert "runcmd" not in text and "write_files" not in text
    assert text.endswith("      - " + KEY + "\nfinal_message: fcdev-ready i-0123abcd\n")


def test_user_data_reads_back_as_the_intended_document() -> None:
    agent = throwaway_agent_config()
    doc = yaml.safe_load(render_user_data(spec(files=agent.files, runcmd=("true",))))
    assert doc["hostname"] == "fcdev-abc-main-1"
    assert doc["users"] == [{"name": "user", "sudo": "ALL=(ALL) NOPASSWD:ALL", "shell": "/bin/bash",
                             "lock_passwd": False, "ssh_authorized_keys": [KEY]}]
    assert [(f["path"], f["owner"], int(f["permissions"], 8), base64.b64decode(f["content"]))
            for f in doc["write_files"]] == [(f.path, f.owner, f.mode, f.content) for f in agent.files]
    assert doc["runcmd"] == [["sh", "-c", "true"]]
    assert doc["final_message"] == ready_marker("i-0123abcd") == "fcdev-ready i-0123abcd"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1).filter(str.strip))
def test_any_runcmd_text_survives_yaml(command: str) -> None:
    text = render_user_data(spec(files=(), runcmd=(command,)))
    line = next(ln for ln in text.splitlines() if ln.startswith("  - [sh, -c, "))
    assert line.endswith('"]')  # one line whatever the command holds
    assert yaml.safe_load(text)["runcmd"] == [["sh", "-c", command]]


def test_meta_data_and_network_config() -> None:
    assert render_meta_data(spec()) == "instance-id: i-0123abcd\nlocal-hostname: fcdev-abc-main-1\n"
    assert render_network_config(spec()) is None
    # An all-digit MAC is a base-60 integer in YAML 1.1 unless quoted.
    config = render_network_config(spec(mac="52:54:00:12:34:56"))
    assert config == ("version: 2\n"
                      "ethernets:\n"
                      "  eth0:\n"
                      "    match:\n"
                      "      macaddress: '52:54:00:12:34:56'\n"
                      "    set-name: eth0\n"
                      "    dhcp4: true\n")
    assert yaml.safe_load(config) == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "52:54:00:12:34:56"}, "set-name": "eth0", "dhcp4": True}}}


def test_instance_ids_are_fresh() -> None:
    ids = {new_instance_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(re.fullmatch(r"i-[0-9a-f]{16}", i) for i in ids)
    assert spec(instance_id=next(iter(ids))).instance_id in ids


@pytest.mark.parametrize(("changes", "needle"), [
    ({"instance_id": "i 1"}, "seed instance id"),
    ({"instance_id": "yes"}, "seed instance id"),
    ({"hostname": "bad_name"}, "seed hostname"),
    ({"hostname": "123"}, "seed hostname"),
    ({"hostname": "a" * 64}, "seed hostname"),
    ({"authorized_key": "not a key"}, "seed authorized key"),
    ({"authorized_key": KEY + " #comment"}, "seed authorized key"),
    ({"authorized_key": KEY + "\nssh-rsa AAAA x"}, "seed authorized key"),
    ({"mac": "52:54:00:AB:CD:EF"}, "seed MAC address"),
    ({"mac": "52-54-00-ab-cd-ef"}, "seed MAC address"),
    ({"files": (AgentFile("relative/path", b"", 0o644),)}, "seed file path"),
    ({"files": (AgentFile("/etc/a b", b"", 0o644),)}, "seed file path"),
    ({"files": (AgentFile("/etc/../x", b"", 0o644),)}, "seed file path"),
    ({"files": (FILES[0], FILES[0])}, "is given twice"),
    ({"files": (AgentFile("/etc/x", b"", 0o644, owner="root"),)}, "not user:group"),
    ({"files": (AgentFile("/etc/x", b"", 0o17777),)}, "not a permission mode"),
    ({"runcmd": ("  ",)}, "empty command"),
    ({"runcmd": ("echo \udc80",)}, "lone surrogate"),
])
def test_spec_rejects_what_cannot_be_written_verbatim(changes: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        spec(**changes)
    message = str(info.value)
    assert needle in message and message.endswith(".") and "; " in message


def _read(iso: pycdlib.PyCdlib, **where: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **where)
    return out.getvalue()


def test_iso_holds_the_seed_under_every_naming(tmp_path: Path) -> None:
    agent = throwaway_agent_config()
    seed = spec(files=agent.files, mac="52:54:00:ab:cd:ef", runcmd=("true",))
    dest = write_seed_iso(seed, tmp_path / "seed.iso")

    assert dest == tmp_path / "seed.iso"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["seed.iso"]  # no temp file left behind
    iso = pycdlib.PyCdlib()
    iso.open(str(dest))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        assert iso.has_rock_ridge() and iso.rock_ridge == "1.09"
        assert iso.has_joliet()
        assert iso.interchange_level == 3
        expected = {"user-data": render_user_data(seed), "meta-data": render_meta_data(seed),
                    "network-config": render_network_config(seed)}
        rr_names = sorted(c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/")
                          if not c.is_dot() and not c.is_dotdot())
        joliet_names = sorted(c.file_identifier().decode("utf-16-be")
                              for c in iso.list_children(joliet_path="/")
                              if not c.is_dot() and not c.is_dotdot())
        assert rr_names == joliet_names == sorted(expected)
        for name, text in expected.items():
            assert text is not None
            assert _read(iso, rr_path=f"/{name}") == text.encode()
            assert _read(iso, joliet_path=f"/{name}") == text.encode()
    finally:
        iso.close()


def test_iso_without_mac_has_no_network_config(tmp_path: Path) -> None:
    dest = write_seed_iso(spec(), tmp_path / "seed.iso")
    iso = pycdlib.PyCdlib()
    iso.open(str(dest))
    try:
        names = {c.rock_ridge.name().decode() for c in iso.list_children(rr_path="/")
                 if not c.is_dot() and not c.is_dotdot()}
    finally:
        iso.close()
    assert names == {"user-data", "meta-data"}


def test_iso_rewrite_replaces_atomically_and_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.write_bytes(b"old")
    write_seed_iso(spec(instance_id="i-second"), dest)
    iso = pycdlib.PyCdlib()
    iso.open(str(dest))
    try:
        assert b"i-second" in _read(iso, rr_path="/meta-data")
    finally:
        iso.close()
    # A destination that cannot be replaced (a directory) fails and leaves no temp file.
    blocked = tmp_path / "blocked.iso"
    blocked.mkdir()
    with pytest.raises(OSError):
        write_seed_iso(spec(), blocked)
    assert sorted(os.listdir(tmp_path)) == ["blocked.iso", "seed.iso"]
    assert os.listdir(blocked) == []


def test_redacted_user_data_holds_no_secret() -> None:
    agent = throwaway_agent_config()
    seed = spec(files=agent.files, runcmd=("true",))
    full, shown = render_user_data(seed), redacted_user_data(seed)
    secrets = agent.secrets()
    assert any(s in full for s in secrets)  # the real thing does carry them ...
    assert not any(s in shown for s in secrets)  # ... the report never
    assert KEY not in shown and "AAAAC3" not in shown
    for item in agent.files:
        assert base64.b64encode(item.content).decode() not in shown
        assert f"content: '<redacted: {len(item.content)} bytes>'" in shown
    assert f"- '<redacted: {len(KEY)} bytes>'" in shown
    # Same lines apart from the redacted values, and still YAML.
    assert [ln for ln in shown.splitlines() if "<redacted" not in ln] == [
        ln for ln in full.splitlines() if "content:" not in ln and KEY not in ln]
    assert yaml.safe_load(shown)["write_files"][0]["path"] == "/etc/flightctl/config.yaml"
    assert KEY not in repr(seed) and "authorized_key" not in repr(seed)
