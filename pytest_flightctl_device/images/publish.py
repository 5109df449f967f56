"""The bundle's variants in a registry the devices pull from: what the `agent_registry` fixture holds.

Either the registry the user names (`--device-registry HOST:PORT[/NAMESPACE]`, TLS with the
system's CAs or `--device-registry-ca`, plain HTTP with `--device-registry-insecure`, credentials
from the containers auth file `podman login` writes) or the private registry of the cache dir.
The registry is checked before anything is pushed, so a wrong address, CA or login fails in one
sentence naming the option, before any device boots; then the bundle is pushed once (push.py).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pytest_flightctl_device.core.formats import read_manifest
from pytest_flightctl_device.devices.remap import RegistryRemap
from pytest_flightctl_device.errors import ArtifactError
from pytest_flightctl_device.images import push, registry
from pytest_flightctl_device.images.podman import expected_tags
from pytest_flightctl_device.images.registry import RegistryError
from pytest_flightctl_device.settings import Settings

Progress = Callable[[str], None]
CHECK_TIMEOUT_S = 15.0


# -- credentials --------------------------------------------------------------------------------


def auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where containers tools keep logins, in the order they read them."""
    env = os.environ if env is None else env
    if env.get("REGISTRY_AUTH_FILE"):
        return [Path(env["REGISTRY_AUTH_FILE"])]
    runtime = env.get("XDG_RUNTIME_DIR") or f"/run/containers/{os.getuid()}"
    home = Path(env.get("HOME") or Path.home())
    return [Path(runtime) / "containers" / "auth.json", home / ".docker" / "config.json"]


def credentials(address: str, env: Mapping[str, str] | None = None) -> tuple[str, Path] | None:
    """(`Basic ...` header value, the file it came from) for `address`, or None when not logged in."""
    for path in auth_files(env):
        try:
            auths = json.loads(path.read_text()).get("auths") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for key in (address, f"https://{address}", f"http://{address}", f"{address}/v2/"):
            entry = auths.get(key)
            token = entry.get("auth") if isinstance(entry, dict) else None
            if isinstance(token, str) and token:
                try:
                    base64.b64decode(token, validate=True)
                except (binascii.Error, ValueError):
                    raise RegistryError(f"the login for {address} in {path} is not base64; log in again with "
                                        f"`podman login {address}`.") from None
                return f"Basic {token}", path
    return None


# -- the registry's first answer ----------------------------------------------------------------


def check(target: push.Target, login_file: Path | None = None) -> None:
    """GET /v2/ once; any failure becomes one sentence naming --device-registry and the fix."""
    host, _, port = target.address.rpartition(":")
    option = f"--device-registry {target.address}"
    conn: http.client.HTTPConnection
    if target.tls:
        context = ssl.create_default_context(cafile=str(target.ca_file) if target.ca_file else None)
        conn = http.client.HTTPSConnection(host.strip("[]"), int(port), timeout=CHECK_TIMEOUT_S, context=context)
    else:
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=CHECK_TIMEOUT_S)
    try:
        conn.request("GET", "/v2/", headers={"Authorization": target.auth} if target.auth else {})
        response = conn.getresponse()
        response.read(1 << 16)
    except ssl.SSLCertVerificationError as exc:
        fix = ("give the CA that signed it with --device-registry-ca FILE" if target.ca_file is None
               else f"--device-registry-ca {target.ca_file} is not the CA that signed it; give that CA")
        raise RegistryError(f"{option} presents a certificate this host does not trust "
                            f"({exc.verify_message}); {fix}.") from None
    except ssl.SSLError as exc:
        raise RegistryError(f"{option} does not speak TLS ({exc.reason}); if it serves plain HTTP, add "
                            "--device-registry-insecure.") from None
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryError(f"{option} does not answer ({exc.__class__.__name__}: {exc}); check the address and "
                            "that the registry runs, or drop --device-registry to use a private one.") from None
    finally:
        conn.close()
    if response.status == 401:
        if login_file is None:
            raise RegistryError(f"{option} refused access (HTTP 401); log in with `podman login "
                                f"{target.address}` (REGISTRY_AUTH_FILE is honoured).")
        raise RegistryError(f"{option} refused the login in {login_file} (HTTP 401); log in again with "
                            f"`podman login {target.address}`.")
    if response.status != 200 or response.getheader("Docker-Distribution-Api-Version") != "registry/2.0":
        raise RegistryError(f"{option} answered GET /v2/ with HTTP {response.status}, not as a container "
                            "registry; give the address of a registry (HOST:PORT).")


# -- what the fixture holds ---------------------------------------------------------------------


@dataclass
class AgentRegistry:
    """The registry every variant of the bundle is in, and how devices reach it."""

    address: str
    namespace: str
    refs: dict[str, str]  # variant -> canonical name `<image_repo>:<variant>-<tag>`
    digests: dict[str, str]  # variant -> manifest digest in the registry
    image_ids: dict[str, str]  # variant -> image ID (the config digest, hex)
    remap: RegistryRemap
    result: push.PushResult = field(repr=False)
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    def ref(self, variant: str) -> str:
        """The canonical name of `variant`: what a device with the remap pulls."""
        return self.remap.image(variant)

    def location(self, variant: str) -> str:
        """Where `variant` is in the registry (HOST:PORT/path:tag), for clients without the remap."""
        repo, tag = push.Target(self.address, self.namespace).destination(self.ref(variant))
        return f"{self.address}/{repo}:{tag}"


def target_of(settings: Settings, env: Mapping[str, str] | None = None) -> tuple[push.Target, Path | None]:
    """The Target for --device-registry (with the login found for it) and the login's file."""
    assert settings.registry is not None
    address, _, namespace = settings.registry.partition("/")
    login = credentials(address, env)
    return push.Target(address, namespace, tls=not settings.registry_insecure, ca_file=settings.registry_ca,
                       auth=login[0] if login else None), login[1] if login else None


def open_registry(settings: Settings, bundle: Path, progress: Progress | None = None,
                  env: Mapping[str, str] | None = None) -> AgentRegistry:
    """Check (or start) the registry, push the bundle into it once, and say how devices pull it."""
    release: Callable[[], None] = lambda: None  # noqa: E731
    if settings.registry is not None:
        target, login_file = target_of(settings, env)
        check(target, login_file)
        remote = f"--device-registry {target.address}"
    else:
        lease = registry.acquire(settings.cache_dir / "registry")
        target = push.Target(lease.address, key=lease.key, storage=lease.layout.data)
        release, remote = lease.release, ""
    try:
        manifest = read_manifest(bundle)
        wanted = expected_tags(settings, manifest)
        try:
            result = push.push_bundle(bundle, target, settings.cache_dir / "pushes", progress)
        except RegistryError as exc:
            if not remote:
                raise
            raise RegistryError(f"pushing the bundle to {remote} failed: {exc}") from None
        missing = [tag for tag in wanted.values() if tag not in result.digests]
        if missing:
            raise ArtifactError(f"the images bundle {bundle} has no {', '.join(missing)}; give a bundle with "
                                "every --device-variants variant or change --device-variants/--device-image-tag.")
        ids = {entry_tag: entry.image_id for entry in manifest for entry_tag in entry.tags}
        ca = settings.registry_ca.read_bytes() if settings.registry_ca and target.tls else None
        remap = RegistryRemap(target.address, settings.image_repo, refs=dict(wanted), namespace=target.namespace,
                              insecure=not target.tls, ca_pem=ca)
        return AgentRegistry(address=target.address, namespace=target.namespace, refs=dict(wanted),
                             digests={v: result.digests[tag] for v, tag in wanted.items()},
                             image_ids={v: ids[tag] for v, tag in wanted.items()},
                             remap=remap, result=result, release=release)
    except BaseException:
        release()
        raise
