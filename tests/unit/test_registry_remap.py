"""agent_registry's parts that need no registry: the option, the logins, the remap a device gets."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_flightctl_device.core.liveness import Owner
from pytest_flightctl_device.devices import remap as remap_mod
from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.boot import Boot, BootContext
from pytest_flightctl_device.devices.remap import RegistryRemap, split_repo
from pytest_flightctl_device.devices.request import VMRequest
from pytest_flightctl_device.devices.seed import render_user_data
from pytest_flightctl_device.devices.ssh import generate_keypair
from pytest_flightctl_device.devices.vm import DeviceVM
from pytest_flightctl_device.errors import ConfigError, DeviceError
from pytest_flightctl_device.images import publish
from pytest_flightctl_device.images.registry import RegistryError
from pytest_flightctl_device.settings import Settings

REPO = "quay.io/flightctl/flightctl-device"
REFS = {"base": f"{REPO}:base-t1", "v2": f"{REPO}:v2-t1"}


def resolve(**cli: Any) -> Settings:
    return Settings.resolve(cli, {}, {})


@pytest.mark.parametrize("text", ["127.0.0.1:5000", "localhost:5000/ci/flightctl", "reg.example.com:443",
                                  "[::1]:5000", "docker://127.0.0.1:5000/"])
def test_registry_option_takes_host_port_and_a_namespace(text: str) -> None:
    assert resolve(registry=text).registry == text.removeprefix("docker://").rstrip("/")


@pytest.mark.parametrize("text", ["127.0.0.1", "quay.io/flightctl", "host:port", "host:99999", ":5000",
                                  "127.0.0.1:5000/Upper", "http://127.0.0.1:5000"])
def test_a_registry_that_is_not_host_port_is_refused_naming_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--device-registry '.*' is not HOST:PORT\[/NAMESPACE\]|"
                                          r"^--device-registry '.*' has a NAMESPACE"):
        resolve(registry=text)


def test_ca_or_insecure_need_the_registry_and_not_each_other(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    with pytest.raises(ConfigError, match="--device-registry-insecure was given without --device-registry"):
        resolve(registry_insecure=True)
    with pytest.raises(ConfigError, match="--device-registry-ca and --device-registry-insecure were both"):
        resolve(registry="r.example:5000", registry_ca=str(ca), registry_insecure=True)
    assert resolve(registry="r.example:5000", registry_ca=str(ca)).registry_ca == ca.resolve()


def test_split_repo_remaps_the_namespace() -> None:
    assert split_repo(REPO) == ("quay.io/flightctl", "flightctl")
    assert split_repo("localhost:5000/a/b/c") == ("localhost:5000/a/b", "a/b")
    assert split_repo("quay.io/device") == ("quay.io/device", "device")
    assert split_repo("flightctl/device") == ("docker.io/flightctl", "flightctl")


def test_plain_http_loopback_remap_is_insecure_and_forwarded() -> None:
    remap = RegistryRemap("127.0.0.1:41234", REPO, REFS, insecure=True)
    assert remap.forward_port == 41234
    (drop_in,) = remap.files()
    assert drop_in.path == remap_mod.DROP_IN and drop_in.mode == 0o644
    assert drop_in.content.decode().splitlines()[1:] == [
        "[[registry]]", 'prefix = "quay.io/flightctl"', 'location = "127.0.0.1:41234/flightctl"',
        "insecure = true"]
    assert remap.runcmd() == ()
    assert remap.image("v2") == f"{REPO}:v2-t1"
    with pytest.raises(ConfigError, match=r"variant 'v9' is not in the images bundle.*use one of base, v2"):
        remap.image("v9")


def test_tls_remote_remap_carries_the_ca_and_no_forward() -> None:
    remap = RegistryRemap("reg.example.com:5443", REPO, REFS, namespace="ci", ca_pem=b"PEM")
    assert remap.forward_port is None
    drop_in, ca = remap.files()
    assert 'location = "reg.example.com:5443/ci/flightctl"' in drop_in.content.decode()
    assert "insecure" not in drop_in.content.decode()
    assert ca.path == remap_mod.CA_STAGED and ca.content == b"PEM"
    assert remap.runcmd() == ("mkdir -p /etc/containers/certs.d/reg.example.com:5443 && cp "
                              f"{remap_mod.CA_STAGED} /etc/containers/certs.d/reg.example.com:5443/ca.crt",)


def boot(tmp_path: Path, registry: RegistryRemap | None) -> Boot:
    ctx = BootContext(conn=None, base_image=tmp_path / "disk.qcow2", keypair=generate_keypair(tmp_path),
                      agent=throwaway_agent_config(), accelerator=None, slots=None,  # type: ignore[arg-type]
                      ports_lock=tmp_path / "lock", owner=Owner.current(), run_id="ab12", isolated=True,
                      firmware="bios", keep_vm=False, host_forward=(), boot_timeout=60.0,
                      log=lambda _m: None, registry=registry)
    return Boot(ctx, "fcdev-ab12-t-1", tmp_path / "1", VMRequest(memory_mib=512, vcpus=1))


def test_only_a_device_asked_with_the_registry_gets_the_remap(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    plain = boot(tmp_path / "a", None)
    seed = plain.make_seed_spec()
    assert remap_mod.DROP_IN not in render_user_data(seed) and not seed.runcmd
    with pytest.raises(DeviceError, match="request the agent_registry fixture in this test"):
        DeviceVM(plain).image("v2")
    (tmp_path / "b").mkdir()
    remapped = boot(tmp_path / "b", RegistryRemap("127.0.0.1:41234", REPO, REFS, insecure=True))
    assert remap_mod.DROP_IN in render_user_data(remapped.make_seed_spec())
    assert DeviceVM(remapped).image("v2") == f"{REPO}:v2-t1"


def _auth_file(path: Path, address: str, user: str = "u", password: str = "p") -> str:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": {address: {"auth": token}}}))
    return token


def test_logins_come_from_the_auth_file_podman_writes(tmp_path: Path) -> None:
    explicit = tmp_path / "explicit.json"
    token = _auth_file(explicit, "reg.example.com:5443")
    assert publish.credentials("reg.example.com:5443", {"REGISTRY_AUTH_FILE": str(explicit)}) == (
        f"Basic {token}", explicit)
    runtime = tmp_path / "run"
    token2 = _auth_file(runtime / "containers" / "auth.json", "https://reg.example.com:5443", "x", "y")
    env = {"XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path / "home")}
    assert publish.credentials("reg.example.com:5443", env) == (f"Basic {token2}",
                                                               runtime / "containers" / "auth.json")
    docker = tmp_path / "home" / ".docker" / "config.json"
    _auth_file(docker, "other:1")
    assert publish.credentials("reg.example.com:5000", env) is None
    assert publish.credentials("other:1", {"HOME": str(tmp_path / "home"), "XDG_RUNTIME_DIR": str(tmp_path)})
    explicit.write_text(json.dumps({"auths": {"bad:1": {"auth": "!!!"}}}))
    with pytest.raises(RegistryError, match=r"the login for bad:1 in .* is not base64; log in again") as info:
        publish.credentials("bad:1", {"REGISTRY_AUTH_FILE": str(explicit)})
    assert "!!!" not in str(info.value)
