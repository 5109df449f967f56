"""The pure parts of --device-fresh snapshot: the hold, the clone's identity script, template keys."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import yaml

from pytest_flightctl_device.devices import identity
from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.boot import BootContext
from pytest_flightctl_device.devices.request import VMRequest
from pytest_flightctl_device.devices.seed import SeedSpec, render_user_data
from pytest_flightctl_device.devices.template import template_key


def test_the_hold_goes_into_bootcmd_before_write_files_and_reads_back_unchanged() -> None:
    spec = SeedSpec(instance_id="i-1", hostname="h", authorized_key="ssh-ed25519 AAAA k", files=(),
                    bootcmd=(identity.hold_agent_bootcmd(),), runcmd=("true",))
    data = yaml.safe_load(render_user_data(spec))
    assert data["bootcmd"] == [["sh", "-c", identity.hold_agent_bootcmd()]]
    assert identity.HOLD_DROPIN.startswith("/run/systemd/system/flightctl-agent.service.d/")
    assert f"[ ! -e {identity.RELEASE_FILE} ]" in identity.HOLD_DROPIN_TEXT


def _run_script(tmp_path: Path, hostname: str) -> subprocess.CompletedProcess[str]:
    """The script's own shell text, with its system paths moved under tmp_path and no sudo."""
    script = identity.identity_script(hostname=hostname, epoch=0)
    inner = subprocess.run(["sh", "-c", f"set -- {script.removeprefix('sudo sh -c ')}; printf %s \"$1\""],
                           capture_output=True, text=True, check=True).stdout
    return subprocess.run(["sh", "-n", "-c", inner], capture_output=True, text=True, check=False)


def test_identity_script_is_valid_shell_and_names_every_step(tmp_path: Path) -> None:
    script = identity.identity_script(hostname="fcdev-ab-t-3", epoch=1796138156.6)
    assert script.startswith("sudo sh -c ")
    assert _run_script(tmp_path, "fcdev-ab-t-3").returncode == 0
    for step in (f"exit {identity.REVERT_DID_NOT_TAKE}", f"head -c {identity.ENTROPY_BYTES} > /dev/urandom",
                 str(identity.RNDRESEEDCRNG), "date -u -s @1796138156.600",
                 "date -u -s @1796138157", "/etc/machine-id", "hostname fcdev-ab-t-3",
                 identity.CLONE_MARKER, identity.RELEASE_FILE, "systemctl start --no-block flightctl-agent.service"):
        assert step in script
    # the clock first (a later step's time would make it late), then the marker check; the agent's release last
    assert script.index("date -u -s") < script.index(identity.CLONE_MARKER) < script.index("/dev/urandom") \
        < script.index(identity.RELEASE_FILE)


def _ctx(tmp_path: Path, **changes: object) -> BootContext:
    base = BootContext(conn=None, base_image=tmp_path / "a.qcow2", keypair=None, agent=throwaway_agent_config(),  # type: ignore[arg-type]
                       accelerator=None, slots=None, ports_lock=tmp_path, owner=None, run_id="r",  # type: ignore[arg-type]
                       isolated=True, firmware="bios", keep_vm=False, host_forward=(), boot_timeout=1.0,
                       log=print)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_template_key_follows_what_changes_the_seed_or_the_domain(tmp_path: Path) -> None:
    request = VMRequest(memory_mib=512, vcpus=1, fresh="snapshot")
    ctx = _ctx(tmp_path)
    key = template_key(request, ctx)
    assert key == template_key(dataclasses.replace(request, boot_timeout=9.0), ctx)
    assert key == template_key(request, _ctx(tmp_path, agent=ctx.agent))
    for other in (dataclasses.replace(request, memory_mib=600), dataclasses.replace(request, vcpus=2),
                  dataclasses.replace(request, runcmd=("true",))):
        assert template_key(other, ctx) != key
    for changed in (_ctx(tmp_path, base_image=tmp_path / "b.qcow2"), _ctx(tmp_path, host_forward=(8080,)),
                    _ctx(tmp_path, agent=throwaway_agent_config())):
        assert template_key(request, changed) != key


def test_fresh_is_checked_before_any_boot(tmp_path: Path) -> None:
    import pytest

    from pytest_flightctl_device.devices.factory import DeviceVMFactory
    from pytest_flightctl_device.errors import ConfigError
    from pytest_flightctl_device.settings import Settings

    def factory(**changes: object) -> DeviceVMFactory:
        settings = dataclasses.replace(Settings(), workdir=tmp_path / "w", cache_dir=tmp_path / "c", **changes)  # type: ignore[arg-type]
        return DeviceVMFactory(settings, base_image=tmp_path / "d.qcow2", agent=throwaway_agent_config(),
                               run_id="ab", worker="t")

    assert factory().request().fresh == "boot"
    assert factory(fresh="snapshot").request().fresh == "snapshot"
    assert factory().request_from_marker((), {"fresh": "snapshot"}).fresh == "snapshot"
    with pytest.raises(ConfigError, match=r"fresh='clone' is unknown; use 'boot' or 'snapshot'"):
        factory().request(fresh="clone")
    with pytest.raises(ConfigError, match="--device-fresh snapshot does not work with --device-firmware uefi"):
        factory(firmware="uefi").request(fresh="snapshot")
    with pytest.raises(ConfigError, match="one local --device-libvirt-uri only"):
        factory(libvirt_uri=("qemu+ssh://root@example.test/system",)).request(fresh="snapshot")
