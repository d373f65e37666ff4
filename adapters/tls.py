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

__all__ = [
    "DevPKI",
    "PKIError",
    "TLSRecordCounter",
    "client_context",
    "generate_dev_pki",
    "renew_server_certificate",
    "server_context",
]


class TLSRecordCounter:
    """The key server's count of a connection's TLS records for its budget for unproductive
    input (protocol.md section 10: every record carrying fewer than ``SMALL_PIECE_SIZE``
    bytes costs a unit, also one that carries none, such as a KeyUpdate, which a TLS read
    handles without returning anything). :meth:`note` counts the records whose 5-byte
    header comes in each piece of ciphertext as it arrives (the first piece starts on a
    record boundary); :meth:`piece` is told the size of each record decrypted; :meth:`owed`
    says how many units to charge now: every record counted, less those that decrypted to
    ``small`` bytes or more, less what was charged before (a big record still to decrypt is
    paid for ahead, and given back from later charges once decrypted; ``waiting``, records
    not taken in by the TLS layer yet, are not)."""

    __slots__ = ("_head", "_skip", "big", "charged", "records", "small")

    def __init__(self, small: int) -> None:
        self.small = small
        self.records = 0
        self.big = 0
        self.charged = 0
        self._skip = 0  # bytes of the record being received still to come
        self._head = b""  # the start of a header cut between two pieces (then _skip is 0)

    def note(self, data: bytes) -> None:
        """Count the records whose header comes in ``data``, the next piece of ciphertext."""
        size = len(data)
        at = self._skip
        if self._head:
            need = 5 - len(self._head)
            head = self._head + data[:need]
            if len(head) < 5:
                self._head = head
                return
            self._head = b""
            self.records += 1
            at = need + ((head[3] << 8) | head[4])
        records = 0
        while at + 5 <= size:
            records += 1
            at += 5 + ((data[at + 3] << 8) | data[at + 4])
        self.records += records
        if at < size:
            self._head = data[at:]
            self._skip = 0
        else:
            self._skip = at - size

    @staticmethod
    def count(data: bytes) -> int:
        """The records whose header is whole in ``data`` (which starts on a record boundary)."""
        counter = TLSRecordCounter(0)
        counter.note(data)
        return counter.records

    def piece(self, size: int) -> None:
        """A record decrypted to ``size`` bytes."""
        if size >= self.small:
            self.big += 1

    def owed(self, waiting: int = 0) -> int:
        """Units to charge now (see the class docstring), counted as charged; ``waiting``:
        records counted that are not decrypted yet, charged later (:meth:`count`)."""
        owed = self.records - self.big - self.charged - waiting
        if owed <= 0:
            return 0
        self.charged += owed
        return owed


#: The development CA's lifetime; each server certificate it signs lives ``days`` (365).
CA_DAYS = 3650


class PKIError(Exception):
    """Certificates or keys that cannot be created or loaded."""


@dataclass(frozen=True, slots=True)
class DevPKI:
    """Paths of a generated development PKI."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    #: The CA's private key (0600), needed only to renew the server certificate.
    ca_key: Path


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
    """Create ``ca.pem``, ``ca.key`` (0600), ``server.pem`` and ``server.key`` (0600) in
    ``directory``: a CA valid CA_DAYS and a server certificate valid ``days``.

    Refuses to overwrite existing files. For development and tests only."""
    directory = Path(directory)
    paths = _paths(directory)
    for path in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key):
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
        .not_valid_after(now + datetime.timedelta(days=max(days, CA_DAYS)))
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
    server_key, server_cert = _server_certificate(ca_cert, ca_key, hostnames, days, now)
    directory.mkdir(parents=True, exist_ok=True)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    return paths


def renew_server_certificate(
    directory: str | os.PathLike[str], hostnames: tuple[str, ...] | None = None, days: int = 365
) -> x509.Certificate:
    """Replace ``server.pem`` and ``server.key`` in ``directory`` with a new key and a
    certificate signed by the development CA there (``ca.pem``, ``ca.key``), for
    ``hostnames`` (default: the names of the current certificate), valid ``days`` but never
    past the CA. Each file is replaced whole (a reader sees the old or the new one)."""
    directory = Path(directory)
    paths = _paths(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PKIError(
            f"{exc.filename} not found: renewal needs the development CA made by `keymgmt-server init` "
            "(ca.pem and ca.key); a deployment with its own PKI renews there"
        ) from None
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot load the development CA in {directory}: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{paths.ca_key} is not the development CA's key")
    now = datetime.datetime.now(datetime.UTC)
    if ca_cert.not_valid_after_utc <= now + datetime.timedelta(days=1):
        raise PKIError(
            f"the development CA {paths.ca_cert} expires {ca_cert.not_valid_after_utc:%Y-%m-%d}: "
            "run init in a new folder"
        )
    if hostnames is None:
        hostnames = _names_of(paths.server_cert)
    server_key, server_cert = _server_certificate(ca_cert, ca_key, hostnames, days, now)
    for path, data in (
        (paths.server_key, _pem_key(server_key)),
        (paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM)),
    ):
        fresh = path.with_name(path.name + ".new")
        fresh.unlink(missing_ok=True)
        _write_private(fresh, data)
        if path == paths.server_cert:
            fresh.chmod(0o644)
        os.replace(fresh, path)
    return server_cert


def _paths(directory: Path) -> DevPKI:
    return DevPKI(
        directory / "ca.pem", directory / "server.pem", directory / "server.key", directory / "ca.key"
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _names_of(cert_path: Path) -> tuple[str, ...]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        raise PKIError(f"cannot read the names of {cert_path} (give --hostname): {exc}") from None
    found = [*names.get_values_for_type(x509.DNSName)]
    found += [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    if not found:
        raise PKIError(f"{cert_path} names no host (give --hostname)")
    return tuple(found)


def _server_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hostnames: tuple[str, ...],
    days: int,
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    expires = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(expires)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return server_key, server_cert
