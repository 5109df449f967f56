"""The fake's PKI: a one-day scratch CA, device names as upstream derives them, CSR checks."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.flightctl_fake.status import Reply


def device_name_for(public_key: ec.EllipticCurvePublicKey) -> str:
    """Upstream's device name: lower base32hex, no padding, of sha256(X.Bytes() || Y.Bytes())."""
    numbers = public_key.public_numbers()

    def go_bytes(value: int) -> bytes:  # Go's big.Int.Bytes(): big-endian, no leading zeros
        return value.to_bytes((value.bit_length() + 7) // 8, "big")

    digest = hashlib.sha256(go_bytes(numbers.x) + go_bytes(numbers.y)).digest()
    return base64.b32hexencode(digest).decode("ascii").rstrip("=").lower()


class ScratchCA:
    """A one-day test CA: the server certificate, the enrollment certificate, device certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flightctl-emulator-ca")])
        self.name = name
        self.cert = (self._builder(name, self.key.public_key(), days=1)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: x509.Name, public_key: Any, *, days: int) -> x509.CertificateBuilder:
        start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(start + dt.timedelta(days=days)))

    def issue(self, cn: str, public_key: Any, *, server: bool = False) -> bytes:
        builder = (self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), public_key, days=1)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            usage = ExtendedKeyUsageOID.SERVER_AUTH
        else:
            usage = ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def keypair(self, cn: str, *, server: bool = False) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        return self.issue(cn, key.public_key(), server=server), key_pem


def csr_public_key(er_name: str, csr_pem: str) -> ec.EllipticCurvePublicKey:
    """Parse the CSR like upstream's signer: well-formed, self-signed, CN equal to the ER's name."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise Reply(400, "failed to normalize CSR: not a PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise Reply(400, "CSR signature is invalid")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != er_name:
        raise Reply(400, f"CSR common name does not match enrollment request name {er_name!r}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise Reply(400, "CSR key is not an ECDSA key")
    # Stricter than upstream on purpose: a stand-in agent that derives its name wrongly fails here.
    if device_name_for(key) != er_name:
        raise Reply(400, f"enrollment request name {er_name!r} is not the fingerprint of the CSR's key")
    return key


def make_csr(cn: str | None = None) -> tuple[str, str, ec.EllipticCurvePrivateKey]:
    """(device name, CSR PEM, key) as the agent makes them; `cn` overrides the CSR's common name."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = device_name_for(key.public_key())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn or name)]))
           .sign(key, hashes.SHA256()))
    return name, csr.public_bytes(serialization.Encoding.PEM).decode("ascii"), key
