"""
The certificate behind STARTTLS.

A configured certificate is used as is.  Without one, a self-signed
certificate is made once at start-up (upstream made one per connection,
which costs a key generation per STARTTLS); it gives encryption against
passive listeners, which is what opportunistic STARTTLS between MTAs is for.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport

from maillaser.message import TLSInfo


def tls_context(
    cert_path: str | None, key_path: str | None, hostname: str
) -> ssl.CertificateOptions:
    if cert_path is not None and key_path is not None:
        cert_pem, key_pem = Path(cert_path).read_bytes(), Path(key_path).read_bytes()
    else:
        cert_pem, key_pem = self_signed(hostname)
    return context_from_pem(cert_pem, key_pem)


class UnusableCertificate(ValueError):
    """A configured certificate or key cannot serve STARTTLS."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(setting, reason)
        self.setting = setting
        """Which one: C{"tls-cert"} or C{"tls-key"}."""
        self.reason = reason


def load_pem_pair(
    cert_pem: bytes, key_pem: bytes
) -> tuple[list[x509.Certificate], PrivateKeyTypes]:
    """
    The certificate chain and its key, checked to belong together, so that
    a wrong file stops start-up rather than every STARTTLS handshake.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise UnusableCertificate("tls-cert", "holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UnusableCertificate(
            "tls-key", "holds no unencrypted PEM private key"
        ) from None
    if _public(key.public_key()) != _public(chain[0].public_key()):
        raise UnusableCertificate(
            "tls-key", "does not belong to the first certificate in --tls-cert"
        )
    return chain, key


def _public(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
    )


def context_from_pem(cert_pem: bytes, key_pem: bytes) -> ssl.CertificateOptions:
    """
    The first certificate in C{cert_pem} is ours; any others are its chain.

    Handing pyOpenSSL C{cryptography} objects (not its deprecated X509/PKey
    wrappers) keeps start-up free of deprecation warnings.
    """
    chain, key = load_pem_pair(cert_pem, key_pem)
    return ssl.CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=chain[0],  # type: ignore[arg-type]
        extraCertChain=chain[1:],  # type: ignore[arg-type]
    )


def self_signed(
    hostname: str, now: datetime.datetime | None = None
) -> tuple[bytes, bytes]:
    """A P-256 key and a one-year certificate naming C{hostname} and localhost."""
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(_names(hostname)), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _names(hostname: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(hostname)))
    except ValueError:
        if hostname != "localhost":
            names.append(x509.DNSName(hostname))
    return names


def session_tls(session: object) -> TLSInfo | None:
    """
    The TLS an SMTP session runs under, or C{None} in cleartext: read from
    the OpenSSL connection that L{ISSLTransport.getHandle} gives once TLS
    has started (by STARTTLS or on an implicit-TLS endpoint).  A client
    reaches RCPT only after the handshake, so both names are known then;
    a handle that is not an OpenSSL connection counts as unknown.
    """
    transport = getattr(session, "transport", None)
    if not ISSLTransport.providedBy(transport):
        return None
    handle = getattr(transport, "getHandle", lambda: None)()  # ISystemHandle
    version = getattr(handle, "get_protocol_version_name", None)
    cipher = getattr(handle, "get_cipher_name", None)
    if version is None or cipher is None:
        return TLSInfo(version="unknown", cipher="unknown")
    return TLSInfo(version=str(version()), cipher=str(cipher() or "unknown"))
