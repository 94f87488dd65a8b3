"""The agent's CA pin (nodeagent.enrollment.pin_of, standard library only) is the registrar's (registrar.pki.ca_pin,
cryptography) for every certificate, and anything that is not a PEM certificate is a ValueError."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from nodeagent.enrollment import pin_of
from registrar.pki import ca_pin


def certificate(key, name: str) -> str:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()],
    ids=["p256", "ed25519"],
)
@pytest.mark.parametrize("wrap", [lambda pem: pem, lambda pem: "\n" + pem + "\n\n"], ids=["as-is", "whitespace"])
def test_pin_is_the_registrars(key, wrap):
    pem = certificate(key, "meshvpn test CA")
    assert pin_of(wrap(pem)) == ca_pin(pem.encode())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIB\u00e9\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n",
    ],
    ids=["empty", "text", "short-der", "no-base64", "non-ascii", "no-footer"],
)
def test_not_a_certificate(text):
    with pytest.raises(ValueError):
        pin_of(text)
