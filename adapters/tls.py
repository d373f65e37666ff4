"""TLS 1.3 for every client-server connection (NET-1), and a development PKI.

``server_context`` and ``client_context`` refuse anything below TLS 1.3; the
client verifies the server certificate against a configured CA and checks the
host name (on by default, as the ssl module does). ``generate_dev_pki`` makes a
throwaway CA and a server certificate with ``cryptography`` so that everything
works offline; production deployments bring their own PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .files import ensure_private_file

__all__ = ["DevPKI", "PKIError", "client_context", "generate_dev_pki", "server_context"]


class PKIError(Exception):
    """Certificates or keys that cannot be created or loaded."""


@dataclass(frozen=True, slots=True)
class DevPKI:
    """Paths of a generated development PKI."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server-side context that speaks TLS 1.3 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise PKIError(f"cannot load the server certificate {cert} / key {key}: {exc}") from None
    return context


def client_context(cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client-side context: TLS 1.3 only, certificate and host name verified.

    ``cafile`` names the CA bundle that signs the key server's certificate; None
    uses the system's trust store."""
    try:
        context = ssl.create_default_context(cafile=None if cafile is None else os.fspath(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise PKIError(f"cannot load the CA bundle {cafile}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    return context


def _write_private(path: Path, data: bytes) -> None:
    ensure_private_file(path, PKIError)
    path.write_bytes(data)


def generate_dev_pki(
    directory: str | os.PathLike[str],
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    days: int = 365,
) -> DevPKI:
    """Create ``ca.pem``, ``server.pem`` and ``server.key`` (0600) in ``directory``.

    Refuses to overwrite existing files. For development and tests only."""
    directory = Path(directory)
    paths = DevPKI(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    for path in (paths.ca_cert, paths.server_cert, paths.server_key):
        if path.exists():
            raise PKIError(f"{path} already exists; refusing to overwrite it")
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "keymgmt development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        paths.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return paths
