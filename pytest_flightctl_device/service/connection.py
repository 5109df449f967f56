"""The flightctl service connection: where it is, which CA to trust, the token, and one check.

Sources, the options winning over the file: `--device-flightctl-api URL`, `--device-flightctl-ca FILE`,
the token from the FLIGHTCTL_TOKEN environment variable only (never an option, never printed), and
the client.yaml that `flightctl login` writes (`--device-flightctl-client-config FILE`, else the CLI's
own default path, `$XDG_CONFIG_HOME/flightctl/client.yaml` or `~/.config/flightctl/client.yaml`, when
that file exists). Its keys are upstream's internal/client/config.go: `service.server`,
`service.certificate-authority(-data)`, `service.insecureSkipVerify`, `authentication.access-token`,
`authentication.id-token` with `token-to-use: id`.

`check()` asks the version endpoint once, before any device boots, and turns each way it can fail
(unreachable, TLS, 401) into one sentence naming the option to fix. flightctl-client is imported only
here and only when a client is built, so a run that never asks for the service never imports it.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pytest_flightctl_device.errors import ConfigError, ServiceConnectionError
from pytest_flightctl_device.settings import Settings

TOKEN_ENV = "FLIGHTCTL_TOKEN"  # noqa: S105 - the name of the variable, not a token
API_OPTION = "--device-flightctl-api"
CA_OPTION = "--device-flightctl-ca"
CONFIG_OPTION = "--device-flightctl-client-config"


@dataclass(frozen=True)
class ServiceSettings:
    """Where the user API is and how to talk to it; the token never shows in repr()."""

    server: str
    ca_pem: str | None = None
    insecure: bool = False
    token: str | None = field(default=None, repr=False)
    origin: str = API_OPTION  # how the user named the server, for messages
    ca_origin: str | None = None
    token_origin: str | None = None


@dataclass(frozen=True)
class ClientFile:
    """What a flightctl client.yaml holds that this plugin uses."""

    path: Path
    server: str | None
    ca_pem: str | None
    insecure: bool
    token: str | None = field(repr=False)


def default_client_config(env: Mapping[str, str] = os.environ) -> Path:
    """Where the flightctl CLI keeps client.yaml: Go's os.UserConfigDir() + flightctl/client.yaml."""
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME") or Path.home()) / ".config")
    return Path(base) / "flightctl" / "client.yaml"


def read_client_config(path: Path, named: str) -> ClientFile:
    """Parse a client.yaml; `named` is how the user gave it (for the error sentence)."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{named} is not a flightctl client config ({why}); give the client.yaml "
                           "`flightctl login` writes, or the service with --device-flightctl-api URL.")

    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise bad(f"cannot read it: {exc.strerror or exc}") from None
    except yaml.YAMLError:
        raise bad("it is not YAML") from None
    if not isinstance(doc, dict):
        raise bad("it is not a YAML mapping")
    service = doc.get("service") or {}
    auth = doc.get("authentication") or {}
    if not isinstance(service, dict) or not isinstance(auth, dict):
        raise bad("`service` and `authentication` must be mappings")
    server = service.get("server")
    if server is not None and (not isinstance(server, str) or not server.startswith(("https://", "http://"))):
        raise bad("service.server is not an http(s) URL")
    ca_pem: str | None = None
    if service.get("certificate-authority-data"):
        try:
            ca_pem = base64.b64decode(str(service["certificate-authority-data"]), validate=True).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise bad("service.certificate-authority-data is not base64 PEM") from None
    elif service.get("certificate-authority"):
        ca_path = Path(str(service["certificate-authority"])).expanduser()
        ca_path = ca_path if ca_path.is_absolute() else path.parent / ca_path  # relative to the file, as upstream
        try:
            ca_pem = ca_path.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            raise bad(f"service.certificate-authority {ca_path} cannot be read") from None
    use_id = auth.get("token-to-use") == "id"
    token = auth.get("id-token") if use_id else auth.get("access-token")
    return ClientFile(path=path, server=server.rstrip("/") if server else None, ca_pem=ca_pem,
                      insecure=bool(service.get("insecureSkipVerify")), token=str(token) if token else None)


def resolve(settings: Settings, env: Mapping[str, str] = os.environ) -> ServiceSettings:
    """The service settings from the options, FLIGHTCTL_TOKEN and client.yaml; ConfigError if none."""
    file: ClientFile | None = None
    if settings.flightctl_client_config is not None:
        file = read_client_config(settings.flightctl_client_config,
                                  f"{CONFIG_OPTION} {settings.flightctl_client_config}")
    else:
        default = default_client_config(env)
        if default.is_file():
            file = read_client_config(default, f"the flightctl CLI's client config {default}")
    named_file = f"{CONFIG_OPTION} {file.path}" if file else ""
    server = settings.flightctl_api or (file.server if file else None)
    if not server:
        where = f" ({named_file} has no service.server)" if file else ""
        raise ConfigError(f"enrolled_device needs a flightctl service{where}; give {API_OPTION} URL "
                          f"(the token in {TOKEN_ENV}) or {CONFIG_OPTION} FILE (the client.yaml "
                          "`flightctl login` writes).")
    origin = f"{API_OPTION} {server}" if settings.flightctl_api else named_file
    ca_pem, ca_origin = None, None
    if settings.flightctl_ca is not None:
        try:
            ca_pem = settings.flightctl_ca.read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            raise ConfigError(f"{CA_OPTION} {settings.flightctl_ca} cannot be read as a PEM file; "
                              "give the CA certificate of the flightctl API.") from None
        ca_origin = f"{CA_OPTION} {settings.flightctl_ca}"
    elif file is not None and file.ca_pem:
        ca_pem, ca_origin = file.ca_pem, named_file
    token, token_origin = env.get(TOKEN_ENV) or None, TOKEN_ENV
    if token is None and file is not None and file.token:
        token, token_origin = file.token, named_file
    return ServiceSettings(server=server.rstrip("/"), ca_pem=ca_pem,
                           insecure=bool(file and file.insecure and ca_pem is None and not settings.flightctl_ca),
                           token=token, origin=origin, ca_origin=ca_origin,
                           token_origin=token_origin if token else None)


def api_client(service: ServiceSettings, *, retries: Any = None) -> Any:
    """flightctl-client's ApiClient: host = server + /api/v1, the token as a default Bearer header
    (the generated calls declare no auth, so Configuration.access_token would be ignored)."""
    from flightctl.api_client import ApiClient
    from flightctl.configuration import Configuration

    config = Configuration(host=service.server + "/api/v1")
    if service.ca_pem:
        config.ca_cert_data = service.ca_pem
    if service.insecure:
        config.verify_ssl = False
    if retries is not None:
        config.retries = retries
    if not service.token:
        return ApiClient(config)
    return ApiClient(config, header_name="Authorization", header_value=f"Bearer {service.token}")


def check(service: ServiceSettings, timeout: float = 15.0) -> str:
    """Ask the version endpoint once; return the service's version, or raise one sentence saying
    which option to fix (unreachable, TLS, a missing or refused token, another answer)."""
    from flightctl.api.version_api import VersionApi
    from flightctl.exceptions import ApiException

    try:
        with api_client(service, retries=False) as client:
            version = VersionApi(client).get_version(_request_timeout=timeout)
    except ApiException as exc:
        raise ServiceConnectionError(explain_status(service, exc.status or 0, str(exc.reason or ""))) from None
    except Exception as exc:  # urllib3 and socket errors: the service did not answer at all
        raise ServiceConnectionError(explain_unreachable(service, exc)) from None
    return str(getattr(version, "version", "") or "")


def explain_status(service: ServiceSettings, status: int, reason: str) -> str:
    """The sentence for an HTTP answer other than 200 (status 0: the client's TLS failure)."""
    where = f"The flightctl service at {service.server} (from {service.origin})"
    if status == 0 and ("SSL" in reason or "CERTIFICATE" in reason.upper()):
        return explain_tls(service, _short(reason))
    if status == 401 and service.token:
        return (f"{where} refused the token from {service.token_origin} (401 Unauthorized); set {TOKEN_ENV} "
                "to a valid token or log in again with `flightctl login`.")
    if status in (400, 401) and not service.token:
        return (f"{where} asks for a token and none was given; set {TOKEN_ENV} or log in with "
                f"`flightctl login` (its client.yaml, {CONFIG_OPTION}).")
    if status == 403:
        return (f"{where} accepted the token from {service.token_origin} but does not allow it to read the "
                f"version (403 Forbidden); give {TOKEN_ENV} a token of a user who may manage devices.")
    if status == 404:
        return (f"{where} has no /api/v1/version (404); give {API_OPTION} the base URL of the flightctl API, "
                "such as https://api.example.com:3443.")
    return f"{where} answered the version check with HTTP {status} {_short(reason)}; check {API_OPTION}."


def explain_tls(service: ServiceSettings, why: str) -> str:
    trusted = f"the CA from {service.ca_origin}" if service.ca_origin else "the system's CAs"
    return (f"The flightctl service at {service.server} (from {service.origin}) presented a TLS certificate "
            f"that {trusted} do not trust ({why}); give the CA that signed it with {CA_OPTION} FILE.")


def explain_unreachable(service: ServiceSettings, exc: BaseException) -> str:
    chain = _chain(exc)
    tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
    if tls is not None or any("CERTIFICATE_VERIFY_FAILED" in str(e) for e in chain):
        return explain_tls(service, _short(str(tls or exc)))
    root = next((e for e in reversed(chain) if isinstance(e, OSError) and e.strerror), chain[-1])
    why = root.strerror if isinstance(root, OSError) and root.strerror else _short(str(root)) or type(root).__name__
    return (f"The flightctl service at {service.server} (from {service.origin}) is unreachable ({why}); "
            f"check {API_OPTION} (host and port of the API) and that the service is running.")


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop(0)
        if item is None or item in seen:
            continue
        seen.append(item)
        todo.extend([getattr(item, "reason", None) if isinstance(getattr(item, "reason", None), BaseException)
                     else None, item.__cause__, item.__context__])
    return seen


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line[:200]
