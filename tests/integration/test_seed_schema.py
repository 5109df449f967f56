"""The seed against Debian's real cloud-init 22.4: schema, network rendering, and the NoCloud reader.

`cloud-init schema` in 22.4 validates cloud-config only (it has no --schema-type and ships no
network-config schema), so network-config is checked by rendering it with `cloud-init devel
net-convert`, which parses it with the same code a booting guest runs. The last test feeds the files
read back from the ISO to cloud-init's own NoCloud datasource and write_files module (offline, into
a temp root), so the base64, permissions and paths are proven with the real decoder.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import subprocess
from pathlib import Path

import pycdlib
import pytest

from pytest_flightctl_device.devices.agent import throwaway_agent_config
from pytest_flightctl_device.devices.seed import (
    SeedSpec,
    new_instance_id,
    render_meta_data,
    render_network_config,
    render_user_data,
    write_seed_iso,
)
from tests.support.helpers import missing, require_tool

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop fcdev"
MAC = "52:54:00:12:34:56"  # all digits: would be a base-60 integer if the renderer lost the quotes


def make_spec(*, runcmd: tuple[str, ...] = (), mac: str | None = MAC) -> SeedSpec:
    return SeedSpec(instance_id=new_instance_id(), hostname="fcdev-abc-main-1", authorized_key=KEY,
                    files=throwaway_agent_config().files, mac=mac, runcmd=runcmd)


def schema(cloud_init: str, text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user-data"
    path.write_text(text)
    return subprocess.run([cloud_init, "schema", "--config-file", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize("runcmd", [(), ("systemctl restart flightctl-agent", 'echo "x\\y" > /tmp/$$')])
def test_user_data_passes_cloud_init_schema(tmp_path: Path, runcmd: tuple[str, ...]) -> None:
    cloud_init = require_tool("cloud-init")
    result = schema(cloud_init, render_user_data(make_spec(runcmd=runcmd)), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


def test_schema_check_rejects_unquoted_permissions(tmp_path: Path) -> None:
    """The check above can fail: the same document with permissions unquoted (an int) is refused."""
    cloud_init = require_tool("cloud-init")
    text = render_user_data(make_spec()).replace("permissions: '0600'", "permissions: 0600")
    result = schema(cloud_init, text, tmp_path)
    assert result.returncode != 0
    assert "permissions" in result.stdout + result.stderr


@pytest.mark.parametrize(("distro", "kind", "expected"), [
    ("debian", "networkd", {"etc/systemd/network/10-cloud-init-eth0.network":
                            ["MACAddress=52:54:00:12:34:56", "Name=eth0", "DHCP=ipv4"]}),
    ("centos", "sysconfig", {"etc/sysconfig/network-scripts/ifcfg-eth0":
                             ["HWADDR=52:54:00:12:34:56", "DEVICE=eth0", "BOOTPROTO=dhcp"]}),
])
def test_network_config_renders_matching_the_mac(tmp_path: Path, distro: str, kind: str,
                                                 expected: dict[str, list[str]]) -> None:
    cloud_init = require_tool("cloud-init")
    text = render_network_config(make_spec())
    assert text is not None
    source = tmp_path / "network-config"
    source.write_text(text)
    out = tmp_path / "out"
    result = subprocess.run([cloud_init, "devel", "net-convert", "--network-data", str(source),
                             "--kind", "yaml", "--directory", str(out), "--distro", distro,
                             "--output-kind", kind], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for relative, lines in expected.items():
        rendered = (out / relative).read_text().splitlines()
        for line in lines:
            assert line in rendered, (line, rendered)


_PROBE = r"""
import json, os, sys
from cloudinit import distros, helpers, util
from cloudinit.config import cc_write_files
from cloudinit.sources import DataSourceNoCloud

base, root, owner = sys.argv[1], sys.argv[2], sys.argv[3]
paths = helpers.Paths({"cloud_dir": os.path.join(base, "cloud"), "run_dir": os.path.join(base, "run")})
sys_cfg = {"datasource": {"NoCloud": {"fs_label": None}}}  # the seed dir only: no block devices
ds = DataSourceNoCloud.DataSourceNoCloud(sys_cfg, distros.fetch("debian")("debian", {}, paths), paths)
found = ds.get_data()
parts = [p.get_content_type() for p in ds.get_userdata().walk() if not p.is_multipart()]
cfg = util.load_yaml(ds.get_userdata_raw())
files = [dict(f, path=root + f["path"], owner=owner) for f in cfg.get("write_files", [])]
cc_write_files.write_files("write_files", files, owner)
print(json.dumps({"found": found, "parts": parts, "instance_id": ds.get_instance_id(),
                  "hostname": ds.metadata.get("local-hostname"), "network": ds.network_config,
                  "cfg": {k: v for k, v in cfg.items() if k != "write_files"}}))
"""


def _cloud_init_python(cloud_init: str) -> str:
    """The interpreter in cloud-init's shebang: the one that can import the cloudinit package."""
    first = Path(cloud_init).read_text(errors="replace").splitlines()[0]
    interpreter = first.removeprefix("#!").split()[0] if first.startswith("#!") else ""
    if not interpreter or not os.access(interpreter, os.X_OK):
        missing(f"cannot find the Python interpreter of {cloud_init} (shebang {first!r})")
    return interpreter


def test_real_nocloud_datasource_reads_the_iso_and_writes_the_files(tmp_path: Path) -> None:
    cloud_init = require_tool("cloud-init")
    python = _cloud_init_python(cloud_init)
    seed = make_spec(runcmd=("true",))
    iso_path = write_seed_iso(seed, tmp_path / "seed.iso")

    seed_dir = tmp_path / "ds" / "cloud" / "seed" / "nocloud"
    seed_dir.mkdir(parents=True)
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        for name in ("user-data", "meta-data", "network-config"):
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
            (seed_dir / name).write_bytes(out.getvalue())
    finally:
        iso.close()
    root = tmp_path / "root"
    user = pwd.getpwuid(os.geteuid()).pw_name
    result = subprocess.run([python, "-c", _PROBE, str(tmp_path / "ds"), str(root), f"{user}:{user}"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.splitlines()[-1])

    assert seen["found"] is True
    assert seen["parts"] == ["text/cloud-config"]
    assert seen["instance_id"] == seed.instance_id
    assert seen["hostname"] == seed.hostname
    assert seen["network"]["ethernets"]["eth0"]["match"]["macaddress"] == MAC
    assert seen["cfg"]["final_message"] == f"fcdev-ready {seed.instance_id}"
    assert seen["cfg"]["runcmd"] == [["sh", "-c", "true"]]
    assert seen["cfg"]["users"][0]["ssh_authorized_keys"] == [KEY]
    for item in seed.files:
        written = root / item.path.lstrip("/")
        assert written.read_bytes() == item.content
        assert written.stat().st_mode & 0o7777 == item.mode
    assert render_meta_data(seed) == (seed_dir / "meta-data").read_text()
