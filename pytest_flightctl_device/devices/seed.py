"""cloud-init NoCloud seed: user-data, meta-data, network-config and the `cidata` ISO that carries them.

The user-data is written by hand in one fixed shape because two readers consume it: real
cloud-init and the project's tiny test guest, whose seed reader is a busybox awk script. Every
file travels base64 on one line; every value is checked to read back unchanged as YAML, so no
input can change the document's structure. The ISO is built in-process with pycdlib (no
genisoimage) and appears under its final name only once complete.
"""

from __future__ import annotations

import base64
import io
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pycdlib
import yaml

from pytest_flightctl_device.core.atomic import atomic_write
from pytest_flightctl_device.devices.agent import AgentFile
from pytest_flightctl_device.errors import ConfigError

USER_NAME = "user"
VOLUME_ID = "cidata"
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_OWNER = re.compile(r"[a-z_][a-z0-9_-]*:[a-z_][a-z0-9_-]*")
_PATH = re.compile(r"/[A-Za-z0-9._+@/-]+")
_KEY = re.compile(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,2}( .*)?")
# ISO 9660 names (d-characters), Rock Ridge and Joliet names of each seed file.
_ISO_NAMES = {"user-data": "/USER_DATA.;1", "meta-data": "/META_DATA.;1",
              "network-config": "/NETWORK_CONFIG.;1"}


@dataclass(frozen=True)
class SeedSpec:
    """What one boot's seed says; a fresh `instance_id` makes cloud-init run again on a reused disk."""

    instance_id: str
    hostname: str
    authorized_key: str = field(repr=False)
    files: tuple[AgentFile, ...]
    mac: str | None = None
    runcmd: tuple[str, ...] = ()
    bootcmd: tuple[str, ...] = ()  # run early on every boot, before write_files (--device-fresh snapshot)

    def __post_init__(self) -> None:
        """Reject, before any rendering, every value that could not be written verbatim."""
        if not _INSTANCE_ID.fullmatch(self.instance_id) or not _plain_safe(self.instance_id):
            raise ConfigError(f"seed instance id {self.instance_id!r} is not letters, digits, '.', '_' "
                              "or '-'; use new_instance_id().")
        if not _HOSTNAME.fullmatch(self.hostname) or not _plain_safe(self.hostname):
            raise ConfigError(f"seed hostname {self.hostname!r} is not a valid host name; use letters, "
                              "digits and '-' (63 per label) and not only digits.")
        key = self.authorized_key
        if not _KEY.fullmatch(key) or not _plain_safe(key) or key != key.strip():
            raise ConfigError("seed authorized key is not one OpenSSH public key line "
                              "('ssh-ed25519 AAAA... comment', comment without ' #' or ': '); "
                              "give the content of a .pub file.")
        if self.mac is not None and not _MAC.fullmatch(self.mac):
            raise ConfigError(f"seed MAC address {self.mac!r} is not six lower-case hex pairs; "
                              "give it as 52:54:00:xx:xx:xx.")
        seen: set[str] = set()
        for item in self.files:
            if not _PATH.fullmatch(item.path) or "/../" in f"{item.path}/" or not _plain_safe(item.path):
                raise ConfigError(f"seed file path {item.path!r} is not an absolute path of letters, "
                                  "digits and ._+@-; rename it.")
            if item.path in seen:
                raise ConfigError(f"seed file path {item.path} is given twice; inject each file once.")
            seen.add(item.path)
            if not _OWNER.fullmatch(item.owner):
                raise ConfigError(f"seed file {item.path} has owner {item.owner!r}, not user:group; "
                                  "give it as root:root.")
            if not 0 <= item.mode <= 0o7777:
                raise ConfigError(f"seed file {item.path} has mode {item.mode:#o}, not a permission "
                                  "mode; give one such as 0o600.")
        for key, command in [("runcmd", c) for c in self.runcmd] + [("bootcmd", c) for c in self.bootcmd]:
            if not command.strip():
                raise ConfigError(f"seed {key} has an empty command; remove it.")
            try:
                command.encode("utf-8")
            except UnicodeEncodeError:
                raise ConfigError(f"seed {key} has a command that is not valid Unicode text (a lone "
                                  "surrogate); fix the command.") from None


def new_instance_id() -> str:
    """A fresh instance id: "i-" and 16 random hex digits."""
    return "i-" + secrets.token_hex(8)


def ready_marker(instance_id: str) -> str:
    """The final_message cloud-init prints on the console when this boot's seed is fully applied."""
    return f"fcdev-ready {instance_id}"


def render_user_data(spec: SeedSpec) -> str:
    """The #cloud-config document, in the exact shape the test guest's awk reader expects."""
    return "".join(_user_data(spec, redacted=False))


def redacted_user_data(spec: SeedSpec) -> str:
    """The user-data with file contents and the key replaced by their size, for failure reports."""
    return "".join(_user_data(spec, redacted=True))


def render_meta_data(spec: SeedSpec) -> str:
    """NoCloud meta-data: the instance id (cloud-init's run-once key) and the host name."""
    return f"instance-id: {spec.instance_id}\nlocal-hostname: {spec.hostname}\n"


def render_network_config(spec: SeedSpec) -> str | None:
    """Network config v2 matching the NIC by MAC (cloud-init 22.4's networkd renderer drops name globs)."""
    if spec.mac is None:
        return None
    # Quoted: an all-digit MAC such as 52:54:00:12:34:56 is a YAML 1.1 base-60 integer unquoted.
    return ("version: 2\n"
            "ethernets:\n"
            "  eth0:\n"
            "    match:\n"
            f"      macaddress: '{spec.mac}'\n"
            "    set-name: eth0\n"
            "    dhcp4: true\n")


def write_seed_iso(spec: SeedSpec, dest: Path) -> Path:
    """Write the seed ISO to `dest` (mode 0600) via a temp file in the same directory and a rename."""
    dest = Path(dest)
    members = {"user-data": render_user_data(spec), "meta-data": render_meta_data(spec)}
    network = render_network_config(spec)
    if network is not None:
        members["network-config"] = network
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=VOLUME_ID, joliet=3, rock_ridge="1.09")
    for name, text in members.items():
        data = text.encode("utf-8")
        iso.add_fp(io.BytesIO(data), len(data), _ISO_NAMES[name], rr_name=name, joliet_path=f"/{name}")
    try:
        with atomic_write(dest, mode=0o600) as handle:  # the seed carries the agent's secrets
            iso.write_fp(handle)
    finally:
        iso.close()
    return dest


def _user_data(spec: SeedSpec, *, redacted: bool) -> Iterator[str]:
    key = f"'<redacted: {len(spec.authorized_key.encode())} bytes>'" if redacted else spec.authorized_key
    yield "#cloud-config\n"
    yield f"hostname: {spec.hostname}\n"
    yield "users:\n"
    yield f"  - name: {USER_NAME}\n"
    yield "    sudo: ALL=(ALL) NOPASSWD:ALL\n"
    yield "    shell: /bin/bash\n"
    yield "    lock_passwd: false\n"
    yield "    ssh_authorized_keys:\n"
    yield f"      - {key}\n"
    if spec.files:
        yield "write_files:\n"
    for item in spec.files:
        content = (f"'<redacted: {len(item.content)} bytes>'" if redacted
                   else base64.b64encode(item.content).decode("ascii"))
        yield f"  - path: {item.path}\n"
        yield f"    owner: {item.owner}\n"
        yield f"    permissions: '{item.mode:04o}'\n"
        yield "    encoding: b64\n"
        yield f"    content: {content}\n"
    if spec.bootcmd:
        yield "bootcmd:\n"
    for command in spec.bootcmd:
        yield f"  - [sh, -c, {_double_quoted(command)}]\n"
    if spec.runcmd:
        yield "runcmd:\n"
    for command in spec.runcmd:
        yield f"  - [sh, -c, {_double_quoted(command)}]\n"
    yield f"final_message: {ready_marker(spec.instance_id)}\n"


def _double_quoted(text: str) -> str:
    """A YAML double-quoted scalar: only '"', '\\' and non-printable characters are escaped."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif char == "\t":
            out.append("\\t")
        elif char.isprintable() and code not in (0xFEFF, 0xFFFE, 0xFFFF):
            out.append(char)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _plain_safe(value: str) -> bool:
    """True when `value` written as a plain YAML scalar reads back as the same string."""
    try:
        return bool(yaml.safe_load(f"k: {value}\n") == {"k": value})
    except yaml.YAMLError:
        return False
