# -*- test-case-name: tests.unit.test_crypto -*-
"""Encrypting one part of a file: XChaCha20-Poly1305 (IETF) through PyNaCl's bindings.

Each file has a fresh random 32-byte key and a random 16-byte file id. Part i is sealed with
nonce = file_id || i (8 bytes, big-endian) and associated data = b"dsss-part-v1" || file_id || i,
so a part cannot be moved to another position or another file without failing its tag. The nonce
is never reused because the key is never reused. A part's address is the BLAKE3 hash (32 bytes)
of its ciphertext (dsss.model.block_hash).
"""

from __future__ import annotations

from nacl import bindings
from nacl.exceptions import CryptoError

from dsss.errors import IntegrityError

KEY_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_KEYBYTES
TAG_BYTES = bindings.crypto_aead_xchacha20poly1305_ietf_ABYTES
FILE_ID_BYTES = 16
CIPHER = "xchacha20poly1305-ietf"
_AD_PREFIX = b"dsss-part-v1"


def _nonce_and_ad(file_id: bytes, index: int) -> tuple[bytes, bytes]:
    if len(file_id) != FILE_ID_BYTES:
        raise ValueError("file id must be 16 bytes")
    if not 0 <= index < 2**63:
        raise ValueError("part index out of range")
    idx = index.to_bytes(8, "big")
    return file_id + idx, _AD_PREFIX + file_id + idx


def encrypt_part(key: bytes, file_id: bytes, index: int, plaintext: bytes) -> bytes:
    nonce, ad = _nonce_and_ad(file_id, index)
    return bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key)


def decrypt_part(key: bytes, file_id: bytes, index: int, ciphertext: bytes) -> bytes:
    nonce, ad = _nonce_and_ad(file_id, index)
    if len(ciphertext) < TAG_BYTES:
        raise IntegrityError(f"part {index} is shorter than its authentication tag")
    try:
        return bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key)
    except CryptoError:
        raise IntegrityError(f"part {index} does not authenticate") from None
