"""agent.py: every way an agent config or certs dir can be wrong, and the files it renders when right.

Inputs are real PKI material made with `cryptography` per test; nothing is mocked.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pytest_flightctl_device.devices.agent import (
    CA_PATH,
    CERT_PATH,
    CONFIG_PATH,
    KEY_PATH,
    AgentConfig,
    load_agent_config,
    redact,
    throwaway_agent_config,
)
from pytest_flightctl_device.errors import AgentConfigError

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
SERVER = "https://api.example.test:7443"
PEM = serialization.Encoding.PEM


@dataclass
class Pki:
    """A CA, an enrollment cert it signed and the cert's key, as PEM bytes."""

    ca: bytes
    cert: bytes
    key: bytes

    def secrets(self) -> list[str]:
        text = self.key.decode()
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
        return [text.strip(), base64.b64encode(self.key).decode(), *lines]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, issuer: str, public_key: Any, signer: Any, *, start: dt.datetime,
          end: dt.datetime, ca: bool) -> x509.Certificate:
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


def make_pki(*, start: dt.datetime = NOW - dt.timedelta(days=1),
             end: dt.datetime = NOW + dt.timedelta(days=30),
             ca_start: dt.datetime | None = None, ca_end: dt.datetime | None = None,
             rsa_key: bool = False, ca_cn: str = "test CA") -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_cn, ca_cn, ca_key.public_key(), ca_key, start=ca_start or NOW - dt.timedelta(days=10),
               end=ca_end or NOW + dt.timedelta(days=3650), ca=True)
    key: Any = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    cert = _cert("client-enrollment", ca_cn, key.public_key(), ca_key, start=start, end=end, ca=False)
    key_pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Pki(ca.public_bytes(PEM), cert.public_bytes(PEM), key_pem)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def config_doc(pki: Pki, server: str = SERVER) -> dict[str, Any]:
    return {"enrollment-service": {
        "authentication": {"client-certificate-data": b64(pki.cert), "client-key-data": b64(pki.key)},
        "service": {"certificate-authority-data": b64(pki.ca), "server": server},
        "enrollment-ui-endpoint": "https://ui.example.test",
    }}


def write_config(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=1 << 20))
    return path


def write_certs(tmp_path: Path, pki: Pki) -> Path:
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "ca.crt").write_bytes(pki.ca)
    (directory / "client-enrollment.crt").write_bytes(pki.cert)
    (directory / "client-enrollment.key").write_bytes(pki.key)
    return directory


def fails(call: Callable[[], object], pki: Pki | None, *needles: str) -> str:
    """Run `call`, expect an AgentConfigError naming every needle and no key material; return it."""
    with pytest.raises(AgentConfigError) as info:
        call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert message.endswith(".") and "\n" not in message, message
    assert message.count("; ") == 1, message  # what is wrong; the fix
    if pki is not None:
        for secret in [*pki.secrets(), b64(pki.cert)[:40], b64(pki.ca)[:40]]:
            assert secret not in message
    assert "PRIVATE KEY" not in message and "LS0t" not in message
    return message


# --- happy paths ---------------------------------------------------------------------------


def test_config_yaml_is_injected_byte_for_byte_with_its_certs(tmp_path: Path) -> None:
    pki = make_pki()
    doc = config_doc(pki)
    doc["spec-fetch-interval"] = "0m10s"
    doc["status-update-interval"] = "0m10s"
    doc["system-info-custom"] = ["siteName", "emptyValue"]
    path = tmp_path / "config.yaml"
    text = "# written by hand\n" + yaml.safe_dump(doc, sort_keys=False, width=1 << 20)
    path.write_text(text)

    cfg = load_agent_config(config=path, now=NOW)

    assert [(f.path, f.mode, f.owner) for f in cfg.files] == [
        (CONFIG_PATH, 0o600, "root:root"), (CA_PATH, 0o644, "root:root"),
        (CERT_PATH, 0o644, "root:root"), (KEY_PATH, 0o600, "root:root")]
    assert cfg.file(CONFIG_PATH).content == text.encode()
    assert (cfg.file(CA_PATH).content, cfg.file(CERT_PATH).content, cfg.file(KEY_PATH).content) == (
        pki.ca, pki.cert, pki.key)
    assert cfg.server == SERVER
    assert cfg.source == f"agent config {path}"
    assert cfg.generated is False


def test_rsa_key_and_wrapped_base64_are_accepted(tmp_path: Path) -> None:
    pki = make_pki(rsa_key=True)
    doc = config_doc(pki)
    data = b64(pki.key)
    doc["enrollment-service"]["authentication"]["client-key-data"] = "\n".join(
        data[i:i + 76] for i in range(0, len(data), 76))
    cfg = load_agent_config(config=write_config(tmp_path, doc), now=NOW)
    assert cfg.file(KEY_PATH).content == pki.key
    wrapped = doc["enrollment-service"]["authentication"]["client-key-data"]
    assert wrapped in cfg.secrets() and data in cfg.secrets()


def test_server_override_replaces_only_service_server(tmp_path: Path) -> None:
    pki = make_pki()
    doc = config_doc(pki)
    doc["spec-fetch-interval"] = "0m10s"
    cfg = load_agent_config(config=write_config(tmp_path, doc), server="https://10.0.2.2:7443", now=NOW)
    rendered = yaml.safe_load(cfg.file(CONFIG_PATH).content)
    doc["enrollment-service"]["service"]["server"] = "https://10.0.2.2:7443"
    assert rendered == doc
    assert cfg.server == "https://10.0.2.2:7443"


def test_certs_dir_renders_the_minimal_config(tmp_path: Path) -> None:
    pki = make_pki()
    directory = write_certs(tmp_path, pki)
    cfg = load_agent_config(certs_dir=directory, server=SERVER, now=NOW)

    text = cfg.file(CONFIG_PATH).content.decode()
    shape = re.sub(r"(-data: )\S+", r"\1B64", text)
    assert shape == (
        "enrollment-service:\n"
        "  authentication:\n"
        "    client-certificate-data: B64\n"
        "    client-key-data: B64\n"
        "  service:\n"
        "    certificate-authority-data: B64\n"
        f"    server: {SERVER}\n"
        f"  enrollment-ui-endpoint: {SERVER}\n")
    section = yaml.safe_load(text)["enrollment-service"]
    assert base64.b64decode(section["authentication"]["client-certificate-data"]) == pki.cert
    assert base64.b64decode(section["authentication"]["client-key-data"]) == pki.key
    assert base64.b64decode(section["service"]["certificate-authority-data"]) == pki.ca
    assert [f.content for f in cfg.files[1:]] == [pki.ca, pki.cert, pki.key]
    assert (cfg.server, cfg.generated) == (SERVER, False)
    assert str(directory) in cfg.source
    # What the certs dir renders loads back through the config.yaml path unchanged.
    (tmp_path / "rendered.yaml").write_bytes(cfg.file(CONFIG_PATH).content)
    again = load_agent_config(config=tmp_path / "rendered.yaml", now=NOW)
    assert again.files == cfg.files


def test_client_cert_from_a_ca_absent_from_the_bundle_is_accepted(tmp_path: Path) -> None:
    """flightctl may sign enrollment certs with a client-signer CA that the server CA bundle lacks."""
    pki = make_pki(ca_cn="client-signer")
    other = make_pki(ca_cn="server root")
    doc = config_doc(pki)
    doc["enrollment-service"]["service"]["certificate-authority-data"] = b64(other.ca)
    cfg = load_agent_config(config=write_config(tmp_path, doc), now=NOW)
    assert cfg.file(CA_PATH).content == other.ca


# --- errors --------------------------------------------------------------------------------


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("enrollment-service:\n  authentication: [\n  client-key-data: LS0tLS1CRUdJTi\n")
    fails(lambda: load_agent_config(config=path, now=NOW), None, f"agent config {path}", "not valid YAML",
          "line ")


@pytest.mark.parametrize(("text", "needle"), [
    ("", "is empty"),
    ("- a\n- b\n", "the document is a list, not a mapping"),
    ("other: 1\n", "has no enrollment-service"),
    ("enrollment-service: 3\n", "enrollment-service is a int, not a mapping"),
    ("enrollment-service:\n  service: {}\n", "has no enrollment-service.authentication"),
])
def test_wrong_shape(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    fails(lambda: load_agent_config(config=path, now=NOW), None, f"agent config {path}", needle)


@pytest.mark.parametrize(("section", "key"), [
    ("authentication", "client-certificate-data"),
    ("authentication", "client-key-data"),
    ("service", "certificate-authority-data"),
])
def test_missing_and_bad_data_keys(tmp_path: Path, section: str, key: str) -> None:
    pki = make_pki()
    keypath = f"enrollment-service.{section}.{key}"
    doc = config_doc(pki)
    del doc["enrollment-service"][section][key]
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki, str(path), keypath, "missing or empty")

    doc["enrollment-service"][section][key] = "not base64 at all!"
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki, str(path), keypath, "not valid base64")

    doc["enrollment-service"][section][key] = b64(b"hello, not a PEM")
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki, str(path), keypath, "holds no PEM")


def test_key_data_holding_a_certificate_is_not_a_key(tmp_path: Path) -> None:
    pki = make_pki()
    doc = config_doc(pki)
    doc["enrollment-service"]["authentication"]["client-key-data"] = b64(pki.cert)
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki,
          "enrollment-service.authentication.client-key-data holds no PEM private key")


def test_malformed_pem_certificate(tmp_path: Path) -> None:
    pki = make_pki()
    doc = config_doc(pki)
    broken = b"-----BEGIN CERTIFICATE-----\nTUlJQm9n\n-----END CERTIFICATE-----\n"
    doc["enrollment-service"]["service"]["certificate-authority-data"] = b64(broken)
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki,
          "enrollment-service.service.certificate-authority-data holds a malformed PEM certificate")


def test_encrypted_key(tmp_path: Path) -> None:
    pki = make_pki()
    key = serialization.load_pem_private_key(pki.key, None)
    encrypted = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.BestAvailableEncryption(b"secret-pass"))
    doc = config_doc(pki)
    doc["enrollment-service"]["authentication"]["client-key-data"] = b64(encrypted)
    path = write_config(tmp_path, doc)
    message = fails(lambda: load_agent_config(config=path, now=NOW), pki, "is encrypted", "unencrypted")
    assert "secret-pass" not in message


def test_key_of_another_certificate(tmp_path: Path) -> None:
    pki, other = make_pki(), make_pki()
    doc = config_doc(pki)
    doc["enrollment-service"]["authentication"]["client-key-data"] = b64(other.key)
    path = write_config(tmp_path, doc)
    message = fails(lambda: load_agent_config(config=path, now=NOW), other,
                    f"agent config {path}: enrollment-service.authentication.client-key-data does not match "
                    "enrollment-service.authentication.client-certificate-data "
                    "(the key belongs to another certificate); request a new enrollment certificate")
    for secret in pki.secrets():
        assert secret not in message


def test_expired_and_not_yet_valid(tmp_path: Path) -> None:
    expired = make_pki(start=NOW - dt.timedelta(days=30), end=NOW - dt.timedelta(days=1))
    path = write_config(tmp_path, config_doc(expired))
    fails(lambda: load_agent_config(config=path, now=NOW), expired,
          "client-certificate-data expired on 2025-05-31", "request a new enrollment certificate")

    future = make_pki(start=NOW + dt.timedelta(hours=2), end=NOW + dt.timedelta(days=30))
    path = write_config(tmp_path, config_doc(future))
    fails(lambda: load_agent_config(config=path, now=NOW), future,
          "client-certificate-data is not valid before 2025-06-01 14:00:00 UTC", "clock")
    # The same certificate is fine once its time has come.
    assert load_agent_config(config=path, now=NOW + dt.timedelta(hours=3)).generated is False


def test_expired_ca(tmp_path: Path) -> None:
    pki = make_pki(ca_end=NOW - dt.timedelta(hours=1))
    path = write_config(tmp_path, config_doc(pki))
    fails(lambda: load_agent_config(config=path, now=NOW), pki,
          "certificate-authority-data holds no certificate valid now")


def test_replaced_ca_with_the_same_name(tmp_path: Path) -> None:
    pki, regenerated = make_pki(ca_cn="flightctl-ca"), make_pki(ca_cn="flightctl-ca")
    doc = config_doc(pki)
    doc["enrollment-service"]["service"]["certificate-authority-data"] = b64(regenerated.ca)
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki,
          "names CN=flightctl-ca as its issuer but is not signed by that certificate", "CA was replaced")


@pytest.mark.parametrize(("server", "needle"), [
    ("http://api.example.test:7080", "enrollment-service.service.server is http://, not an https:// URL"),
    ("api.example.test:7443", "not an https:// URL"),
    (None, "enrollment-service.service.server is missing or not a string"),
    ("https://", "is https://, not an https:// URL"),
    ("https://[::1", "enrollment-service.service.server is not a URL"),
])
def test_server_must_be_https(tmp_path: Path, server: str | None, needle: str) -> None:
    pki = make_pki()
    doc = config_doc(pki)
    if server is None:
        del doc["enrollment-service"]["service"]["server"]
    else:
        doc["enrollment-service"]["service"]["server"] = server
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), pki, str(path), needle)


def test_override_server_must_be_https(tmp_path: Path) -> None:
    pki = make_pki()
    path = write_config(tmp_path, config_doc(pki))
    fails(lambda: load_agent_config(config=path, server="http://x:1", now=NOW), pki,
          "--device-enrollment-server", "not an https:// URL")


def test_unreadable_missing_and_oversized_config(tmp_path: Path) -> None:
    directory = tmp_path / "config.yaml"
    directory.mkdir()
    fails(lambda: load_agent_config(config=directory, now=NOW), None, f"agent config {directory}",
          "cannot be read (Is a directory)")
    missing = tmp_path / "nope.yaml"
    fails(lambda: load_agent_config(config=missing, now=NOW), None, str(missing),
          "cannot be read (No such file or directory)")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * ((1 << 20) + 1))
    fails(lambda: load_agent_config(config=big, now=NOW), None, str(big), "larger than")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    fails(lambda: load_agent_config(config=binary, now=NOW), None, str(binary), "is not UTF-8 text")


def test_config_referring_to_cert_files(tmp_path: Path) -> None:
    doc = {"enrollment-service": {
        "authentication": {"client-certificate": "certs/client-enrollment.crt",
                           "client-key": "certs/client-enrollment.key"},
        "service": {"certificate-authority": "certs/ca.crt", "server": SERVER}}}
    path = write_config(tmp_path, doc)
    fails(lambda: load_agent_config(config=path, now=NOW), None,
          "refers to a file with client-certificate instead of embedding client-certificate-data",
          "--device-agent-certs")


@pytest.mark.parametrize("name", ["ca.crt", "client-enrollment.crt", "client-enrollment.key"])
def test_certs_dir_missing_or_unreadable_file(tmp_path: Path, name: str) -> None:
    pki = make_pki()
    directory = write_certs(tmp_path, pki)
    (directory / name).unlink()
    fails(lambda: load_agent_config(certs_dir=directory, server=SERVER, now=NOW), pki,
          f"agent certs dir {directory}: has no {name}")
    (directory / name).mkdir()
    fails(lambda: load_agent_config(certs_dir=directory, server=SERVER, now=NOW), pki,
          f"agent certs dir {directory}: {name} cannot be read (Is a directory)")


def test_certs_dir_errors(tmp_path: Path) -> None:
    pki, other = make_pki(), make_pki()
    directory = write_certs(tmp_path, pki)
    fails(lambda: load_agent_config(certs_dir=directory, now=NOW), pki,
          "was given without an enrollment server", "--device-enrollment-server")
    fails(lambda: load_agent_config(certs_dir=directory, server="http://h:1", now=NOW), pki,
          "not an https:// URL")
    fails(lambda: load_agent_config(certs_dir=tmp_path / "none", server=SERVER, now=NOW), None,
          "is not a directory")
    (directory / "client-enrollment.key").write_bytes(other.key)
    fails(lambda: load_agent_config(certs_dir=directory, server=SERVER, now=NOW), other,
          f"agent certs dir {directory}: client-enrollment.key does not match client-enrollment.crt")
    (directory / "client-enrollment.key").write_bytes(pki.key)
    (directory / "ca.crt").write_bytes(b"not a cert")
    fails(lambda: load_agent_config(certs_dir=directory, server=SERVER, now=NOW), pki,
          "ca.crt holds no PEM certificate")


def test_config_and_certs_dir_exclusive(tmp_path: Path) -> None:
    fails(lambda: load_agent_config(config=tmp_path / "c", certs_dir=tmp_path, now=NOW), None,
          "give only one of --device-agent-config and --device-agent-certs")
    fails(lambda: load_agent_config(now=NOW), None, "no agent config was given", "--device-agent-config")


# --- throwaway, secrets, redact ------------------------------------------------------------


def test_throwaway_is_a_valid_one_day_pki(tmp_path: Path) -> None:
    cfg = throwaway_agent_config(now=NOW)
    assert cfg.generated is True
    assert cfg.server == "https://127.0.0.1:7443"
    assert cfg.source == "throwaway CA (no real enrollment server)"
    assert [f.path for f in cfg.files] == [CONFIG_PATH, CA_PATH, CERT_PATH, KEY_PATH]
    ca = x509.load_pem_x509_certificate(cfg.file(CA_PATH).content)
    cert = x509.load_pem_x509_certificate(cfg.file(CERT_PATH).content)
    key = serialization.load_pem_private_key(cfg.file(KEY_PATH).content, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    assert ca.subject.rfc4514_string() == "CN=fcdev throwaway CA"
    assert ca.not_valid_after_utc - NOW == dt.timedelta(days=1)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key.public_key()
    # It passes its own validation as a config.yaml, at `now` and not two days later.
    path = tmp_path / "config.yaml"
    path.write_bytes(cfg.file(CONFIG_PATH).content)
    assert load_agent_config(config=path, now=NOW).files == cfg.files
    fails(lambda: load_agent_config(config=path, now=NOW + dt.timedelta(days=2)), None, "expired")


def test_throwaway_twice_gives_different_keys_and_checks_server() -> None:
    a, b = throwaway_agent_config("https://127.0.0.1:9443"), throwaway_agent_config()
    assert a.file(KEY_PATH).content != b.file(KEY_PATH).content
    assert yaml.safe_load(a.file(CONFIG_PATH).content)["enrollment-service"]["service"]["server"] == (
        "https://127.0.0.1:9443")
    fails(lambda: throwaway_agent_config("http://127.0.0.1:1"), None, "not an https:// URL")


def test_secrets_cover_every_injected_form_of_the_key(tmp_path: Path) -> None:
    pki = make_pki()
    cfg = load_agent_config(config=write_config(tmp_path, config_doc(pki)), now=NOW)
    secrets = cfg.secrets()
    for secret in pki.secrets():
        assert secret in secrets
    assert b64(cfg.file(CONFIG_PATH).content) in secrets
    assert b64(pki.cert) not in secrets  # certificates are public
    shown = repr(cfg)
    assert not any(s in shown for s in secrets) and "PRIVATE" not in shown
    log = f"wrote {b64(cfg.file(CONFIG_PATH).content)} and\n{pki.key.decode()} key={b64(pki.key)}"
    cleaned = redact(log, secrets)
    assert not any(s in cleaned for s in secrets)
    assert cleaned.startswith("wrote <redacted> and\n") and cleaned.endswith("key=<redacted>")


def test_redact() -> None:
    assert redact("a SECRET and SECRETLONGER", ["SECRET", "SECRETLONGER", ""]) == (
        "a <redacted> and <redacted>")
    assert redact("nothing here", []) == "nothing here"


def test_agent_config_type_is_frozen() -> None:
    cfg = throwaway_agent_config()
    with pytest.raises(AttributeError):
        cfg.server = "x"  # type: ignore[misc]
    assert isinstance(cfg, AgentConfig)
