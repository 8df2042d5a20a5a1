# -*- test-case-name: tests.unit.test_quic -*-
"""
Self-signed X.509 certificates carrying a DSSS agent's Ed25519 identity.

QUIC needs TLS 1.3 and TLS needs a certificate.  DSSS does not use a PKI: the
certificate only carries the agent's Ed25519 public key, and the TLS
CertificateVerify message proves that the peer holds the matching private key.
Clients pin the raw public key (see L{dsss.quic.endpoint.QuicEndpoint.connect}).

The key is derived from the same 32-byte seed that PyNaCl's
C{nacl.signing.SigningKey(seed)} uses (the RFC 8032 private key), so
C{public_key_of(make_certificate(seed)[0]) == SigningKey(seed).verify_key.encode()}.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import NameOID

__all__ = ["COMMON_NAME", "make_certificate", "public_key_of"]

COMMON_NAME = "dsss-agent"
SEED_SIZE = 32
_NOT_BEFORE = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(2100, 1, 1, tzinfo=datetime.timezone.utc)
# A fixed serial keeps the certificate a pure function of the seed.
_SERIAL = 1


def make_certificate(seed: bytes) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """
    Build a self-signed certificate for the Ed25519 key derived from C{seed}.

    Ed25519 signatures are deterministic, so the same seed always yields the
    same certificate bytes.

    @param seed: 32 bytes, the PyNaCl C{SigningKey} seed.
    @return: C{(certificate, private_key)}.
    @raise ValueError: if C{seed} is not 32 bytes.
    """
    if not isinstance(seed, bytes) or len(seed) != SEED_SIZE:
        raise ValueError(f"seed must be {SEED_SIZE} bytes")
    key = Ed25519PrivateKey.from_private_bytes(seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, COMMON_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_SERIAL)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, algorithm=None)
    )
    return cert, key


def public_key_of(cert: x509.Certificate) -> bytes:
    """
    Return the raw 32-byte Ed25519 public key of C{cert}.

    @raise ValueError: if the certificate's key is not Ed25519.
    """
    public_key = cert.public_key()
    if not isinstance(public_key, Ed25519PublicKey):
        raise ValueError("certificate key is not Ed25519")
    return public_key.public_bytes(
        encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw
    )
