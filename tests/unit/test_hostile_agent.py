"""Hostile agent configs and certificates: every input is accepted correctly or is one AgentConfigError.

Property-based (hypothesis) over arbitrary YAML shapes, wrong types, huge and deeply nested
documents, bad base64, mutated DER inside PEM, random cert/key pairs and random validity dates.
Where the right verdict can be computed independently (certs dir with chosen keys and dates) the
test checks the verdict itself, not only that nothing crashed. PKI material is real (cryptography).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import event, example, given
from hypothesis import strategies as st

from pytest_flightctl_device.devices.agent import (
    CA_PATH,
    CERT_PATH,
    CONFIG_PATH,
    KEY_PATH,
    AgentConfig,
    load_agent_config,
)
from pytest_flightctl_device.errors import AgentConfigError, DeviceError
from tests.support.hostile import BOUNDED, clear_error, jail

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
SERVER = "https://api.example.test:7443"
PEM = serialization.Encoding.PEM
CA_CN = "hostile CA"

# json-like values of every YAML type the loader can produce, nested a little
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**60)
           | st.floats() | st.text(max_size=40) | st.binary(max_size=40)
           | st.dates() | st.just("https://x") | st.just(""))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@functools.cache
def keys() -> tuple[Any, ...]:
    """A small pool of real private keys of every kind the agent may be given."""
    return (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()),
            ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate(),
            rsa.generate_private_key(65537, 2048))


def key_pem(key: Any) -> bytes:
    data: bytes = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return data


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def cert(subject: str, public_key: Any, signer: Any, start: dt.datetime, end: dt.datetime,
         *, ca: bool) -> bytes:
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    built = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(CA_CN))
             .public_key(public_key).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .sign(signer, algorithm))
    return built.public_bytes(PEM)


@functools.cache
def good_pki() -> tuple[bytes, bytes, bytes]:
    """(ca, cert, key) PEMs valid at NOW."""
    ca_key, leaf_key = keys()[0], keys()[1]
    ca = cert(CA_CN, ca_key.public_key(), ca_key, NOW - dt.timedelta(days=10), NOW + dt.timedelta(days=3650),
              ca=True)
    leaf = cert("client-enrollment", leaf_key.public_key(), ca_key, NOW - dt.timedelta(days=1),
                NOW + dt.timedelta(days=30), ca=False)
    return ca, leaf, key_pem(leaf_key)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def good_doc() -> dict[str, Any]:
    ca, leaf, key = good_pki()
    return {"enrollment-service": {
        "authentication": {"client-certificate-data": b64(leaf), "client-key-data": b64(key)},
        "service": {"certificate-authority-data": b64(ca), "server": SERVER},
        "enrollment-ui-endpoint": "https://ui.example.test",
    }}


def secrets_of(*key_pems: bytes) -> list[str]:
    found: list[str] = []
    for pem in key_pems:
        text = pem.decode("ascii", "replace")
        found += [text.strip(), b64(pem)]
        found += [line for line in text.splitlines() if len(line) >= 16 and not line.startswith("-----")]
    return found


def check_accepted(cfg: AgentConfig) -> None:
    """An accepted config is self-consistent: the key fits the cert, the cert is valid at NOW,
    the four files are there with their modes, and the rendered config.yaml says the same."""
    files = {f.path: f for f in cfg.files}
    assert sorted(files) == sorted([CONFIG_PATH, CA_PATH, CERT_PATH, KEY_PATH])
    assert files[KEY_PATH].mode == 0o600 and files[CONFIG_PATH].mode == 0o600
    leaf = x509.load_pem_x509_certificates(files[CERT_PATH].content)[0]
    key = serialization.load_pem_private_key(files[KEY_PATH].content, None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    assert leaf.not_valid_before_utc <= NOW <= leaf.not_valid_after_utc
    doc = yaml.safe_load(files[CONFIG_PATH].content)
    auth = doc["enrollment-service"]["authentication"]
    assert base64.b64decode("".join(auth["client-key-data"].split())) == files[KEY_PATH].content
    assert cfg.server.startswith("https://")
    assert doc["enrollment-service"]["service"]["server"] == cfg.server


# --- a certs dir whose verdict is known in advance -----------------------------------------------

DATES = st.datetimes(min_value=dt.datetime(1951, 1, 1), max_value=dt.datetime(9998, 12, 31),
                     timezones=st.just(dt.UTC))
NEAR = st.integers(min_value=-400, max_value=400).map(lambda days: NOW + dt.timedelta(days=days))


@BOUNDED
@given(cert_key=st.integers(0, 4), file_key=st.none() | st.integers(0, 4),
       signer=st.sampled_from(["ca", "ca", "impostor"]),
       start=NEAR | NEAR | DATES, end=NEAR | NEAR | DATES, ca_start=NEAR | NEAR | DATES,
       ca_end=NEAR | NEAR | DATES)
def test_certs_dir_verdict_matches_keys_dates_and_signer(cert_key: int, file_key: int | None, signer: str,
                                                         start: dt.datetime, end: dt.datetime,
                                                         ca_start: dt.datetime, ca_end: dt.datetime) -> None:
    file_key = cert_key if file_key is None else file_key
    start, end, ca_start, ca_end = (d.replace(microsecond=0) for d in (start, end, ca_start, ca_end))  # X.509: seconds
    start, end = sorted((start, end))  # the builder refuses an end before the start
    ca_start, ca_end = sorted((ca_start, ca_end))
    pool = keys()
    ca_key = pool[0]
    ca_pem = cert(CA_CN, ca_key.public_key(), ca_key, ca_start, ca_end, ca=True)
    sign_with = ca_key if signer == "ca" else pool[2]  # same issuer name, another key: a replaced CA
    leaf_pem = cert("client-enrollment", pool[cert_key].public_key(), sign_with, start, end, ca=False)
    given_key = key_pem(pool[file_key])
    expected = (cert_key == file_key and start <= NOW <= end and ca_start <= NOW <= ca_end
                and signer == "ca")
    with jail("certs") as root:
        certs = root / "certs"
        (certs / "ca.crt").write_bytes(ca_pem)
        (certs / "client-enrollment.crt").write_bytes(leaf_pem)
        (certs / "client-enrollment.key").write_bytes(given_key)
        try:
            cfg = load_agent_config(certs_dir=certs, server=SERVER, now=NOW)
        except DeviceError as exc:
            clear_error(exc, *secrets_of(given_key))
            assert not expected, f"rejected a valid certs dir: {exc}"
            event("rejected")
            return
        event("accepted")
        assert expected, "accepted a certs dir that should have been refused"
        check_accepted(cfg)
        assert cfg.file(KEY_PATH).content == given_key


# --- config.yaml: a valid document with hostile changes --------------------------------------------


def _paths(doc: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += _paths(value, (*prefix, key))
    return found


PATHS = _paths(good_doc())[1:]


def _der_mutation(data: st.DataObject) -> bytes:
    """One of the good PEMs (or another key's) with a few DER bytes changed, still PEM-wrapped."""
    ca, leaf, key = good_pki()
    pem = data.draw(st.sampled_from([ca, leaf, key, key_pem(keys()[3]), key_pem(keys()[4])]))
    lines = pem.decode().strip().splitlines()
    der = bytearray(base64.b64decode("".join(lines[1:-1])))
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(der) - 1))
        der[where] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(der)))
    body = base64.encodebytes(bytes(der[:cut])).decode()
    return f"{lines[0]}\n{body}{lines[-1]}\n".encode()


def _hostile_value(data: st.DataObject) -> Any:
    kind = data.draw(st.sampled_from(["value", "text", "b64-random", "b64-der", "b64-other", "bad-b64",
                                      "huge"]))
    if kind == "value":
        return data.draw(VALUES)
    if kind == "text":
        return data.draw(st.text(max_size=200))
    if kind == "b64-random":
        return b64(data.draw(st.binary(max_size=300)))
    if kind == "b64-der":
        return b64(_der_mutation(data))
    if kind == "b64-other":
        ca, leaf, key = good_pki()
        return b64(data.draw(st.sampled_from([ca, leaf, key, key_pem(keys()[2]), ca + leaf, key + leaf])))
    if kind == "bad-b64":
        good = b64(good_pki()[2])
        where = data.draw(st.integers(0, len(good)))
        return good[:where] + data.draw(st.sampled_from(["!", "=", "é", "\x00", "====", " \n"])) + good[where:]
    return "A" * data.draw(st.sampled_from([1 << 16, (1 << 20) - 100, 1 << 20]))


@BOUNDED
@given(data=st.data())
def test_config_yaml_with_hostile_values(data: st.DataObject) -> None:
    doc = good_doc()
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(PATHS))
        parent: Any = doc
        for part in where[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if data.draw(st.booleans()):
            parent.pop(where[-1], None)
        else:
            parent[where[-1]] = _hostile_value(data)
    server = data.draw(st.none() | st.just(SERVER) | st.just("https://127.0.0.1:1") | st.text(max_size=30))
    with jail("in") as root:
        path = root / "in" / "config.yaml"
        path.write_text(yaml.safe_dump(doc, width=1 << 30))
        try:
            cfg = load_agent_config(config=path, server=server, now=NOW)
        except DeviceError as exc:
            clear_error(exc, *secrets_of(good_pki()[2], key_pem(keys()[2]), key_pem(keys()[3]),
                                         key_pem(keys()[4])))
            assert isinstance(exc, AgentConfigError)
            event("rejected")
            return
        event("accepted")
        check_accepted(cfg)


# --- config.yaml: raw bytes, arbitrary YAML shapes, huge and deep documents -------------------------

# below PyYAML's recursion limit (parsed, then refused by shape); deeper ones are explicit examples,
# since each costs PyYAML most of a second before its RecursionError
DEEP = st.integers(min_value=10, max_value=300).map(lambda n: "[" * n + "]" * n)
NESTED_MAPS = st.integers(min_value=10, max_value=300).map(
    lambda n: "".join(" " * i + f"k{i}:\n" for i in range(n)) + " " * n + "v\n")


@BOUNDED
@given(content=st.binary(max_size=2000)
       | st.text(max_size=2000).map(str.encode)
       | VALUES.map(lambda v: yaml.safe_dump(v).encode())
       | DEEP.map(str.encode) | NESTED_MAPS.map(str.encode))
@example(content=b"enrollment-service: &a [*a, *a]\n")
@example(content=b"\xef\xbb\xbfenrollment-service: {}\n")
@example(content=b"a: &a [" + b"*a," * 10000 + b"]\n" + b"b: &b [" + b"*a," * 10000 + b"]\n")
@example(content=b"enrollment-service: !!python/object/apply:os.system [true]\n")
@example(content=b"x" * ((1 << 20) + 1))
@example(content=b"[" * ((1 << 20) - 1))
@example(content=b"enrollment-service:\n" + b"".join(b" " * i + b"- a:\n" for i in range(1, 1200)))
def test_config_yaml_of_arbitrary_bytes_is_refused(content: bytes) -> None:
    with jail("in") as root:
        path = root / "in" / "config.yaml"
        path.write_bytes(content)
        with pytest.raises(DeviceError) as info:
            load_agent_config(config=path, now=NOW)
        clear_error(info.value)
        assert isinstance(info.value, AgentConfigError)


# --- certs dir: garbage and mutated PEM files -----------------------------------------------------


@BOUNDED
@given(data=st.data(), which=st.sampled_from(["ca.crt", "client-enrollment.crt", "client-enrollment.key"]),
       how=st.sampled_from(["der", "bytes", "empty", "dir", "symlink-out", "two-pems"]))
def test_certs_dir_with_garbage_files(data: st.DataObject, which: str, how: str) -> None:
    ca, leaf, key = good_pki()
    with jail("certs", "elsewhere") as root:
        certs = root / "certs"
        for file_name, content in (("ca.crt", ca), ("client-enrollment.crt", leaf),
                                   ("client-enrollment.key", key)):
            (certs / file_name).write_bytes(content)
        target = certs / which
        target.unlink()
        if how == "der":
            target.write_bytes(_der_mutation(data))
        elif how == "bytes":
            target.write_bytes(data.draw(st.binary(max_size=3000)))
        elif how == "empty":
            target.write_bytes(b"")
        elif how == "dir":
            target.mkdir()
        elif how == "symlink-out":
            outside = root / "elsewhere" / "outside.pem"
            outside.write_bytes(data.draw(st.sampled_from([ca, leaf, key, b"junk"])))
            target.symlink_to(outside)
        else:
            target.write_bytes(data.draw(st.sampled_from([ca + leaf, leaf + ca, key + key, key + leaf])))
        try:
            cfg = load_agent_config(certs_dir=certs, server=SERVER, now=NOW)
        except DeviceError as exc:
            clear_error(exc, *secrets_of(key))
            assert isinstance(exc, AgentConfigError)
            event("rejected")
            return
        event("accepted")
        check_accepted(cfg)
