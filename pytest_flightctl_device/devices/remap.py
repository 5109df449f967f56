"""What a device needs to pull the bundle's variants by their canonical names from a test registry.

cloud-init writes a registries.conf.d drop-in that remaps the namespace of the image repository
(`quay.io/flightctl`) to the registry (`127.0.0.1:PORT/flightctl`), so the agent, bootc, podman
and skopeo in the device resolve `quay.io/flightctl/flightctl-device:v2-<tag>` there; plain HTTP
gets `insecure = true`, a TLS registry its CA under /etc/containers/certs.d. A registry on the
host's loopback is reached at the same address through the VM's SSH reverse forward.
"""

from __future__ import annotations

import ipaddress
import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from pytest_flightctl_device.devices.agent import AgentFile
from pytest_flightctl_device.errors import ConfigError

DROP_IN = "/etc/containers/registries.conf.d/pytest-flightctl-device.conf"
CA_STAGED = "/etc/pytest-flightctl-device/registry-ca.crt"


def is_loopback(address: str) -> bool:
    """True when HOST:PORT names this machine's loopback (what the guest needs a forward for)."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_repo(image_repo: str) -> tuple[str, str]:
    """(prefix to remap, its path without the domain) for an image repository.

    `quay.io/flightctl/flightctl-device` -> (`quay.io/flightctl`, `flightctl`): the namespace, as
    upstream's e2e remaps it. A repository with no namespace is remapped whole.
    """
    first, _, rest = image_repo.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        first, rest = "docker.io", image_repo if "/" in image_repo else f"library/{image_repo}"
    namespace, _, _name = rest.rpartition("/")
    if namespace:
        return f"{first}/{namespace}", namespace
    return f"{first}/{rest}", rest


def _toml(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string for these characters


@dataclass(frozen=True)
class RegistryRemap:
    """The remap one device gets: registry `address` (HOST:PORT), optional `namespace` path in it."""

    address: str
    image_repo: str
    refs: Mapping[str, str] = field(default_factory=dict)  # variant -> canonical name
    namespace: str = ""
    insecure: bool = False
    ca_pem: bytes | None = field(default=None, repr=False)

    @property
    def forward_port(self) -> int | None:
        """The host port forwarded into the guest, for a loopback registry (else user networking)."""
        return int(self.address.rpartition(":")[2]) if is_loopback(self.address) else None

    @property
    def prefix(self) -> str:
        return split_repo(self.image_repo)[0]

    @property
    def location(self) -> str:
        path = split_repo(self.image_repo)[1]
        namespace = self.namespace.strip("/")
        return f"{self.address}/{namespace}/{path}" if namespace else f"{self.address}/{path}"

    def drop_in(self) -> str:
        lines = ["# written by pytest-flightctl-device: the bundle's images come from the test registry",
                 "[[registry]]", f"prefix = {_toml(self.prefix)}", f"location = {_toml(self.location)}"]
        if self.insecure:
            lines.append("insecure = true")
        return "\n".join(lines) + "\n"

    @property
    def tls_ca(self) -> bool:
        return self.ca_pem is not None and not self.insecure

    def files(self) -> tuple[AgentFile, ...]:
        """The files cloud-init writes into the device."""
        files = [AgentFile(DROP_IN, self.drop_in().encode(), mode=0o644)]
        if self.tls_ca:
            assert self.ca_pem is not None
            files.append(AgentFile(CA_STAGED, self.ca_pem, mode=0o644))
        return tuple(files)

    def runcmd(self) -> tuple[str, ...]:
        """The CA goes to /etc/containers/certs.d/HOST:PORT/ca.crt by command: a seed path has no ':'."""
        if not self.tls_ca:
            return ()
        directory = shlex.quote(f"/etc/containers/certs.d/{self.address}")
        return (f"mkdir -p {directory} && cp {CA_STAGED} {directory}/ca.crt",)

    def image(self, variant: str) -> str:
        """The canonical name of `variant` (what the device pulls through the remap)."""
        try:
            return self.refs[variant]
        except KeyError:
            raise ConfigError(f"variant {variant!r} is not in the images bundle pushed to the registry; "
                              f"use one of {', '.join(self.refs) or 'none'} (--device-variants).") from None
