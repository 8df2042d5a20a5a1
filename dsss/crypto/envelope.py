"""The sealed envelope of manifests and directories: a key sealed to its owner, and the body."""

from __future__ import annotations

import os

from nacl import bindings
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from dsss.crypto.parts import KEY_BYTES, TAG_BYTES
from dsss.errors import IntegrityError, WrongKey

SEALED_KEY_BYTES = KEY_BYTES + 48
"""A 32-byte key in a libsodium sealed box (an ephemeral X25519 key and a Poly1305 tag)."""
NONCE_BYTES = 24


def seal(magic: bytes, body: bytes, key: bytes, owner: PublicKey) -> bytes:
    """`magic || sealed key || nonce || XChaCha20-Poly1305(body)`, with `magic || sealed key`
    as associated data: only `owner`'s private key opens it (docs/crypto.md)."""
    sealed = SealedBox(owner).encrypt(key)
    assert len(sealed) == SEALED_KEY_BYTES
    nonce = os.urandom(NONCE_BYTES)
    return magic + sealed + nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        body, magic + sealed, nonce, key
    )


def open_sealed(magic: bytes, blob: bytes, private_key: PrivateKey, what: str, whose: str) -> tuple[bytes, bytes]:
    """(body, key) of an envelope with this magic. IntegrityError if `blob` is not one or does
    not authenticate; WrongKey if it was sealed to another key (`whose`: "file", "directory")."""
    header = len(magic) + SEALED_KEY_BYTES + NONCE_BYTES
    if len(blob) < header + TAG_BYTES or not blob.startswith(magic):
        raise IntegrityError(f"this address does not hold a DSSS {what}")
    sealed = blob[len(magic) : len(magic) + SEALED_KEY_BYTES]
    nonce = blob[len(magic) + SEALED_KEY_BYTES : header]
    try:
        key = SealedBox(private_key).decrypt(sealed)
    except CryptoError:
        raise WrongKey(f"this {whose} was not stored for your key") from None
    try:
        body = bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(blob[header:], magic + sealed, nonce, key)
    except CryptoError:
        raise IntegrityError(f"the {what} does not authenticate") from None
    return body, key
