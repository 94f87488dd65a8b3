"""The registrar's key material: its own CA, the TLS server certificate it signs, and the membership signing key.

Created at first start in the state directory (private keys 0600) and reused afterwards; the server
certificate is re-issued when the names it must cover change or it nears expiry, the CA never (agents pin it).
The CA signs nothing but this registrar's server certificate, so a client that trusts only this CA (pinned by
the SHA-256 of its DER form, carried in every join token) needs no host name check to know it talks to us.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshcontract.signing import Signer
from registrar.errors import RegistrarError

log = logging.getLogger(__name__)

CA_DAYS = 3650
SERVER_DAYS = 825
RENEW_BEFORE_DAYS = 30


def ca_pin(ca_pem: bytes) -> str:
    """The pin of a CA certificate: base64url (no padding) of the SHA-256 of its DER form."""
    der = x509.load_pem_x509_certificate(ca_pem).public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class KeyFiles:
    """Where the registrar keeps its key material (all in its state directory)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.dir / "server.key"

    @property
    def signing_key(self) -> Path:
        return self.dir / "signing.key"


@dataclass(frozen=True, slots=True)
class RegistrarKeys:
    """Loaded key material: what the registrar serves TLS with and signs membership with."""

    files: KeyFiles
    ca_pem: bytes
    pin: str
    signer: Signer


def _write_secret(path: Path, data: bytes, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue_ca(mesh: str, now: datetime.datetime) -> tuple[bytes, bytes]:
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"meshvpn CA ({mesh})")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _issue_server(
    ca_pem: bytes, ca_key_pem: bytes, names: list[str], now: datetime.datetime
) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_san(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _server_ok(cert_pem: bytes, names: list[str], now: datetime.datetime) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    if cert.not_valid_after_utc - now < datetime.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return list(san) == list(_san(names))


def load_or_create(state_dir: Path, *, mesh: str, server_names: list[str], group_readable: bool = False) -> RegistrarKeys:
    """The registrar's CA, server certificate (covering `server_names`) and signing key, created as needed.

    `group_readable` makes the server key 0640 (e.g. for a Mosquitto in the registrar's group serving the same
    certificate); every other private key is 0600.
    """
    if not server_names:
        raise RegistrarError("the TLS server certificate needs at least one name")
    files = KeyFiles(Path(state_dir))
    now = datetime.datetime.now(datetime.UTC)
    try:
        files.dir.mkdir(parents=True, exist_ok=True)
        if not files.ca_cert.exists() or not files.ca_key.exists():
            ca_pem, ca_key = _issue_ca(mesh, now)
            _write_secret(files.ca_key, ca_key, mode=0o600)
            _write_secret(files.ca_cert, ca_pem, mode=0o644)
            log.info("created the mesh CA %s (pin %s)", files.ca_cert, ca_pin(ca_pem))
        ca_pem = files.ca_cert.read_bytes()
        server_mode = 0o640 if group_readable else 0o600
        if not files.server_cert.exists() or not _server_ok(files.server_cert.read_bytes(), server_names, now):
            cert, key = _issue_server(ca_pem, files.ca_key.read_bytes(), server_names, now)
            _write_secret(files.server_key, key, mode=server_mode)
            _write_secret(files.server_cert, cert, mode=0o644)
            log.info("issued the TLS server certificate for %s", ", ".join(server_names))
        elif (files.server_key.stat().st_mode & 0o777) != server_mode:
            os.chmod(files.server_key, server_mode)
        if not files.signing_key.exists():
            _write_secret(files.signing_key, Signer.generate().to_pem(), mode=0o600)
        signer = Signer.from_pem(files.signing_key.read_bytes())
    except (OSError, ValueError) as exc:
        raise RegistrarError(f"cannot prepare the registrar's keys in {files.dir}: {exc}") from exc
    return RegistrarKeys(files=files, ca_pem=ca_pem, pin=ca_pin(ca_pem), signer=signer)
