"""The agent's enrollment config and certificates: parse, validate, render the files to inject.

A device learns where to enroll only from `/etc/flightctl/config.yaml` and the enrollment
certificate; both are injected at boot (never baked into an image). Everything is checked here,
before any VM boots, so a wrong key or an expired certificate is one clear sentence instead of an
agent that silently never enrolls. No message, repr or log line carries key material.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pytest_flightctl_device.errors import AgentConfigError

CONFIG_PATH = "/etc/flightctl/config.yaml"
CERTS_DIR = "/etc/flightctl/certs"
CA_NAME = "ca.crt"
CERT_NAME = "client-enrollment.crt"
KEY_NAME = "client-enrollment.key"
CA_PATH = f"{CERTS_DIR}/{CA_NAME}"
CERT_PATH = f"{CERTS_DIR}/{CERT_NAME}"
KEY_PATH = f"{CERTS_DIR}/{KEY_NAME}"

_CERT_KEY = "enrollment-service.authentication.client-certificate-data"
_KEY_KEY = "enrollment-service.authentication.client-key-data"
_CA_KEY = "enrollment-service.service.certificate-authority-data"
_SERVER_KEY = "enrollment-service.service.server"
_MAX_BYTES = 1 << 20  # a real config.yaml or PEM is a few KiB; refuse to slurp a wrong, huge file
_MAX_CHAIN = 8
_FIX_CERT = "request a new enrollment certificate (flightctl certificate request --signer=enrollment)"
_THROWAWAY_CA_CN = "fcdev throwaway CA"


@dataclass(frozen=True)
class AgentFile:
    """One file to write in the guest; `content` is kept out of repr so tracebacks never show keys."""

    path: str
    content: bytes = field(repr=False)
    mode: int
    owner: str = "root:root"


@dataclass(frozen=True)
class AgentConfig:
    """The four files that make a device enroll, plus what the pytest header says about them."""

    files: tuple[AgentFile, ...]
    server: str
    source: str
    generated: bool

    def file(self, path: str) -> AgentFile:
        """The file injected at guest path `path` (KeyError if there is none)."""
        for item in self.files:
            if item.path == path:
                return item
        raise KeyError(path)

    def secrets(self) -> tuple[str, ...]:
        """Strings that must never reach a log or report: the key in every form it is injected in."""
        found: list[str] = []
        for item in self.files:
            if item.path in (KEY_PATH, CONFIG_PATH):
                found.append(base64.b64encode(item.content).decode("ascii"))
            if item.path == KEY_PATH:
                pem = item.content.decode("utf-8", "replace")
                found.append(pem.strip())
                found.extend(line.strip() for line in pem.splitlines()
                             if len(line.strip()) >= 16 and not line.startswith("-----"))
            if item.path == CONFIG_PATH:
                found.extend(_embedded_key_data(item.content))
        return tuple(dict.fromkeys(s for s in found if s))


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by "<redacted>" (longest first)."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, "<redacted>")
    return text


def load_agent_config(*, config: Path | None = None, certs_dir: Path | None = None,
                      server: str | None = None, now: dt.datetime | None = None) -> AgentConfig:
    """Validate a config.yaml (with embedded certs) or a certs dir plus server; render the four files.

    With `config`, `server` (when given) replaces `enrollment-service.service.server`, e.g. for a
    guest that reaches the service through a tunnel; every other key is kept as written.
    With `certs_dir`, `server` is required and is also used as `enrollment-ui-endpoint` (the agent
    only prints that URL in its banner, and the certs dir does not say where the UI lives).
    """
    moment = _utc(now)
    if config is not None and certs_dir is not None:
        raise AgentConfigError(
            f"agent config {config} and agent certs dir {certs_dir} were both given; "
            "give only one of --device-agent-config and --device-agent-certs.")
    if config is not None:
        return _from_config(Path(config), server, moment)
    if certs_dir is not None:
        return _from_certs_dir(Path(certs_dir), server, moment)
    raise AgentConfigError(
        "no agent config was given; set --device-agent-config FILE or --device-agent-certs DIR "
        "with --device-enrollment-server URL.")


def throwaway_agent_config(server: str = "https://127.0.0.1:7443", *,
                           now: dt.datetime | None = None) -> AgentConfig:
    """A one-day CA and an enrollment certificate it signed: a device that boots but enrolls nowhere."""
    moment = _utc(now)
    _check_server("throwaway agent config", "server", server)
    start, end = moment - dt.timedelta(minutes=5), moment + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _THROWAWAY_CA_CN)])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-enrollment")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return _render(ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem, server,
                   source="throwaway CA (no real enrollment server)", generated=True)


# --- sources ---------------------------------------------------------------------------------


def _from_config(path: Path, server: str | None, now: dt.datetime) -> AgentConfig:
    label = f"agent config {path}"
    raw = _read(label, path, "give a readable config.yaml with --device-agent-config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _error(label, "is not UTF-8 text", "give the config.yaml written by "
                     "`flightctl certificate request --output embedded`") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "a syntax error"
        raise _error(label, f"is not valid YAML ({problem}{where})", "fix the file") from None
    except RecursionError:  # "[[[[...": PyYAML recurses once per level
        raise _error(label, "is nested too deeply to be an agent config", "give the config.yaml "
                     "written by `flightctl certificate request --output embedded`") from None
    root = _mapping(label, doc, "the document")
    service_root = _mapping(label, root.get("enrollment-service"), "enrollment-service")
    auth = _mapping(label, service_root.get("authentication"), "enrollment-service.authentication")
    service = _mapping(label, service_root.get("service"), "enrollment-service.service")
    for data_key, file_key, mapping in (("client-certificate-data", "client-certificate", auth),
                                        ("client-key-data", "client-key", auth),
                                        ("certificate-authority-data", "certificate-authority", service)):
        if data_key not in mapping and file_key in mapping:
            raise _error(label, f"refers to a file with {file_key} instead of embedding {data_key}",
                         "write it with `flightctl certificate request --output embedded` or give "
                         "the certs with --device-agent-certs")
    cert_pem = _b64(label, _CERT_KEY, auth.get("client-certificate-data"))
    key_pem = _b64(label, _KEY_KEY, auth.get("client-key-data"))
    ca_pem = _b64(label, _CA_KEY, service.get("certificate-authority-data"))
    written = service.get("server")
    _check_server(label, _SERVER_KEY, written)
    ui = service_root.get("enrollment-ui-endpoint")
    if ui is not None and not isinstance(ui, str):
        raise _error(label, "enrollment-service.enrollment-ui-endpoint is not a string",
                     "give a URL such as https://ui.example.com")
    _check_material(label, {"ca": _CA_KEY, "cert": _CERT_KEY, "key": _KEY_KEY},
                    ca_pem, cert_pem, key_pem, now)
    content = raw
    effective = str(written)
    if server is not None and server != written:
        _check_server("--device-enrollment-server", "the value", server)
        service["server"] = server
        try:
            content = _dump(root)
        except (yaml.YAMLError, RecursionError):
            raise _error(label, "cannot be written back with the new server (a value YAML cannot "
                         "represent)", "put the server in the file instead of "
                         "--device-enrollment-server") from None
        effective = server
    return AgentConfig(files=_files(content, ca_pem, cert_pem, key_pem), server=effective,
                       source=f"agent config {path}", generated=False)


def _from_certs_dir(directory: Path, server: str | None, now: dt.datetime) -> AgentConfig:
    label = f"agent certs dir {directory}"
    if not directory.is_dir():
        raise _error(label, "is not a directory", "give a directory holding ca.crt, "
                     "client-enrollment.crt and client-enrollment.key with --device-agent-certs")
    pems: dict[str, bytes] = {}
    for name in (CA_NAME, CERT_NAME, KEY_NAME):
        path = directory / name
        if not path.exists():
            raise _error(label, f"has no {name}", "put ca.crt, client-enrollment.crt and "
                         "client-enrollment.key there (flightctl certificate request "
                         "-n client-enrollment -d DIR)")
        pems[name] = _read(label, path, f"make {name} a readable file", what=name)
    if server is None:
        raise _error(label, "was given without an enrollment server",
                     "set --device-enrollment-server https://host:port")
    _check_server("--device-enrollment-server", "the value", server)
    _check_material(label, {"ca": CA_NAME, "cert": CERT_NAME, "key": KEY_NAME},
                    pems[CA_NAME], pems[CERT_NAME], pems[KEY_NAME], now)
    return _render(pems[CA_NAME], pems[CERT_NAME], pems[KEY_NAME], server,
                   source=f"agent certs {directory} for {server}", generated=False)


# --- checks ----------------------------------------------------------------------------------


def _check_material(label: str, where: Mapping[str, str], ca_pem: bytes, cert_pem: bytes,
                    key_pem: bytes, now: dt.datetime) -> None:
    """Parse the three PEMs; the key must fit the cert, the cert be valid now and chain to the CA."""
    cas = _certs(label, where["ca"], ca_pem)
    chain = _certs(label, where["cert"], cert_pem)
    key = _key(label, where["key"], key_pem)
    leaf = chain[0]
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise _error(label, f"{where['key']} does not match {where['cert']} "
                     "(the key belongs to another certificate)", _FIX_CERT)
    _check_validity(label, where["cert"], leaf, now)
    if not any(_valid_at(ca, now) for ca in cas):
        raise _error(label, f"{where['ca']} holds no certificate valid now ({_iso(now)})",
                     "give the current CA of the enrollment service")
    _check_chain(label, where, leaf, chain[1:] + cas, now)


def _check_chain(label: str, where: Mapping[str, str], leaf: x509.Certificate,
                 pool: list[x509.Certificate], now: dt.datetime) -> None:
    """Walk up from the leaf through issuers found by name in the pool and check each signature.

    An issuer absent from the pool is accepted: flightctl may sign client certificates with a
    client-signer CA that the server's CA bundle does not carry. A same-named issuer whose key did
    not sign the certificate is a replaced CA, which the service would reject.
    """
    current = leaf
    for _ in range(_MAX_CHAIN):
        if current.issuer == current.subject:
            return
        candidates = [c for c in pool if c.subject == current.issuer and c is not current]
        if not candidates:
            return
        issuer = next((c for c in candidates if _signed_by(current, c)), None)
        if issuer is None:
            raise _error(label, f"{where['cert']} names {current.issuer.rfc4514_string()} as its issuer "
                         f"but is not signed by that certificate in {where['ca']} (the CA was replaced)",
                         f"{_FIX_CERT}, or give the CA that signed it")
        _check_validity(label, where["ca"], issuer, now)
        current = issuer


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _check_validity(label: str, where: str, cert: x509.Certificate, now: dt.datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise _error(label, f"{where} is not valid before {_iso(cert.not_valid_before_utc)} "
                     f"(now is {_iso(now)})", "check this host's clock or use a certificate valid now")
    if now > cert.not_valid_after_utc:
        raise _error(label, f"{where} expired on {_iso(cert.not_valid_after_utc)}", _FIX_CERT)


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _check_server(label: str, where: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise _error(label, f"{where} is missing or not a string",
                     "give the enrollment service as https://host:port")
    try:
        parsed = urlparse(value)
    except ValueError:
        raise _error(label, f"{where} is not a URL",
                     "give the enrollment service as https://host:port") from None
    if parsed.scheme != "https" or not parsed.hostname:
        shown = f"{parsed.scheme}://" if parsed.scheme else "not a URL"
        raise _error(label, f"{where} is {shown}, not an https:// URL (the agent only talks TLS)",
                     "give the enrollment service as https://host:port")


# --- parsing ---------------------------------------------------------------------------------


def _read(label: str, path: Path, fix: str, *, what: str | None = None) -> bytes:
    subject = f"{what} " if what else ""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _error(label, f"{subject}cannot be read ({reason})", fix) from None
    if len(data) > _MAX_BYTES:
        raise _error(label, f"{subject}is larger than {_MAX_BYTES} bytes, too big for an agent "
                     "config or certificate", "give the right file")
    return data


def _mapping(label: str, value: object, where: str) -> dict[str, Any]:
    if value is None:
        raise _error(label, f"has no {where}" if where != "the document" else "is empty",
                     "give the config.yaml written by `flightctl certificate request --output embedded`")
    if not isinstance(value, dict):
        raise _error(label, f"{where} is a {type(value).__name__}, not a mapping",
                     "give the config.yaml written by `flightctl certificate request --output embedded`")
    return value


def _b64(label: str, where: str, value: object) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise _error(label, f"{where} is missing or empty",
                     "write the config with `flightctl certificate request --output embedded`")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _error(label, f"{where} is not valid base64", "give the base64 of the PEM file "
                     "(base64 -w0 FILE)") from None


def _certs(label: str, where: str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise _error(label, f"{where} holds no PEM certificate", "give a PEM certificate "
                     "(-----BEGIN CERTIFICATE-----)")
    try:
        return list(x509.load_pem_x509_certificates(data))
    except ValueError:
        raise _error(label, f"{where} holds a malformed PEM certificate",
                     "give the certificate as issued") from None


def _key(label: str, where: str, data: bytes) -> PrivateKeyTypes:
    if b"PRIVATE KEY-----" not in data:
        raise _error(label, f"{where} holds no PEM private key",
                     "give the PEM private key issued with the certificate")
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise _error(label, f"{where} is encrypted with a passphrase (the agent cannot read it)",
                     "give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise _error(label, f"{where} holds a malformed or unsupported PEM private key",
                     "give the key as issued with the certificate") from None


def _spki(public_key: Any) -> bytes:
    data: bytes = public_key.public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return data


def _embedded_key_data(config_content: bytes) -> list[str]:
    """client-key-data as written in a config.yaml (it may differ from our own base64 in spacing)."""
    try:
        doc = yaml.safe_load(config_content)
        value = doc["enrollment-service"]["authentication"]["client-key-data"]
    except (yaml.YAMLError, KeyError, TypeError, RecursionError):
        return []
    return [value.strip(), "".join(value.split())] if isinstance(value, str) else []


# --- rendering -------------------------------------------------------------------------------


def _render(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, server: str, *, source: str,
            generated: bool) -> AgentConfig:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    doc = {"enrollment-service": {
        "authentication": {"client-certificate-data": b64(cert_pem), "client-key-data": b64(key_pem)},
        "service": {"certificate-authority-data": b64(ca_pem), "server": server},
        "enrollment-ui-endpoint": server,
    }}
    return AgentConfig(files=_files(_dump(doc), ca_pem, cert_pem, key_pem), server=server,
                       source=source, generated=generated)


def _dump(doc: Mapping[str, Any]) -> bytes:
    """Block-style YAML, 2-space indent, every scalar on one line (base64 is never folded)."""
    return yaml.safe_dump(dict(doc), sort_keys=False, default_flow_style=False,
                          width=1 << 30, allow_unicode=True).encode("utf-8")


def _files(config: bytes, ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> tuple[AgentFile, ...]:
    return (AgentFile(CONFIG_PATH, config, 0o600), AgentFile(CA_PATH, ca_pem, 0o644),
            AgentFile(CERT_PATH, cert_pem, 0o644), AgentFile(KEY_PATH, key_pem, 0o600))


def _error(label: str, what: str, fix: str) -> AgentConfigError:
    return AgentConfigError(f"{label}: {what}; {fix}.")


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=dt.UTC)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
