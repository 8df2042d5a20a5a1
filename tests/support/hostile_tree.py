"""Directory manifests written byte by byte from docs/protocol.md, not with dsss.crypto.directory:
a hostile (or merely foreign) client's directories, with whatever body a test wants sealed."""

from __future__ import annotations

import json
import os
from typing import Any

from nacl import bindings
from nacl.public import PublicKey, SealedBox

MAGIC = b"DSSSD\x01"


def seal_body(body: Any, owner: PublicKey, *, raw: bytes | None = None) -> bytes:
    """A directory blob whose JSON body is `body` (or the bytes `raw`), readable by `owner`."""
    data = raw if raw is not None else json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    key = os.urandom(32)
    sealed = SealedBox(owner).encrypt(key)
    nonce = os.urandom(24)
    return MAGIC + sealed + nonce + bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        data, MAGIC + sealed, nonce, key)


def head(entries: list[list[Any]], *, name: str = "evil", more: list[str] | None = None,
         mode: int = 0o755, mtime: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"version": 1, "type": "directory", "name": name, "mode": mode,
                            "mtime": mtime, "created": 1, "entries": entries}
    if more is not None:
        body["more"] = more
    return body


def file_entry(name: str, address: str, size: int, mode: int = 0o644, mtime: int = 0) -> list[Any]:
    return ["f", name, size, mode, mtime, address]


def dir_entry(name: str, address: str, size: int = 0, mode: int = 0o755, mtime: int = 0) -> list[Any]:
    return ["d", name, size, mode, mtime, address]
