# -*- test-case-name: tests.unit.test_crypto -*-
"""The manifest: what a file is made of, encrypted, and stored on the network like a part.

Stored form ("blob"), all lengths fixed:

    magic      6 bytes   b"DSSSM\\x02" (the blob format; see OLD_MAGICS)
    sealed key 80 bytes  the 32-byte file key in a SealedBox to the owner's Curve25519 public key
    nonce      24 bytes  random
    body       rest      XChaCha20-Poly1305(JSON manifest, ad = magic || sealed key)

The file's address is the blob's address like any stored block's (`dsss.model.block_hash`, a
BLAKE3 tree). The JSON body is described in docs/protocol.md.

A blob of format 1 (magic b"DSSSM\\x01") was written by a DSSS whose addresses were plain BLAKE3
of the bytes: the parts it names cannot be checked or proven against tree addresses, so it is
refused with a clear error (OldManifest) rather than read.

A small file is carried inside its manifest ("inline", body version 2): its single part is
encrypted exactly as part 0 would be (same key, nonce and associated data, see parts.py) and that
ciphertext is the body's `inline` value (base64), so the whole file is one blob on the network.
Files stored with parts keep writing version 1, which readers of version 1 only still read.

A file stored with erasure coding (body version 3) says so with `erasure: [k, n]`, and each of
its parts lists the share IDs of its n shares instead of one block hash (see dsss/erasure.py);
any k of them give the part's ciphertext back.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable

from nacl.public import PrivateKey, PublicKey

from dsss.crypto import envelope
from dsss.crypto.directory import MAGIC as DIRECTORY_MAGIC
from dsss.crypto.directory import IsDirectory
from dsss.crypto.parts import CIPHER, FILE_ID_BYTES, TAG_BYTES
from dsss.errors import DSSSError, RemoteProtocolError
from dsss.erasure import Coding, CodingError
from dsss.model import is_block_id, is_share_id

MAGIC = b"DSSSM\x02"
OLD_MAGICS = {b"DSSSM\x01": 1}
"""Magics of older manifest formats, and their format numbers."""
SEALED_KEY_BYTES = envelope.SEALED_KEY_BYTES
NONCE_BYTES = envelope.NONCE_BYTES
VERSION = 1
VERSION_INLINE = 2  # the body carries the file's only part itself (`inline`)
VERSION_ERASURE = 3  # parts erasure-coded into shares (`erasure`, each part's share IDs)
VERSIONS = (VERSION, VERSION_INLINE, VERSION_ERASURE)
MAX_NAME = 1024
_FILE_ID_RE = re.compile(r"\A[0-9a-f]{32}\Z")


class OldManifest(DSSSError):
    """A manifest of an older format, naming its parts by addresses this version does not use."""

    http_status = 422
    exit_code = 5
    code = "old-manifest"


def refuse_old(blob: bytes) -> None:
    """Raise OldManifest if `blob` is a manifest of an older format."""
    for magic, number in OLD_MAGICS.items():
        if blob.startswith(magic):
            raise OldManifest(
                f"this is a manifest of format {number}, written by an older DSSS whose addresses "
                f"were plain BLAKE3 hashes; this version reads format {MAGIC[-1]} (BLAKE3 tree "
                f"addresses) and cannot check the parts it names. Nothing was changed: get the file "
                f"with the DSSS that stored it, and store it again with this version"
            )


@dataclass(frozen=True)
class PartRef:
    hash: str  # the block holding the ciphertext; "" for an erasure-coded part
    size: int  # ciphertext bytes
    plain: int  # plaintext bytes
    shares: tuple[str, ...] = ()  # an erasure-coded part's share IDs, share 0 first

    @property
    def blocks(self) -> tuple[str, ...]:
        """The stored blocks this part is made of: its one block, or its shares."""
        return self.shares if self.shares else (self.hash,)


@dataclass(frozen=True)
class Manifest:
    name: str
    size: int
    part_size: int
    file_id: bytes
    parts: tuple[PartRef, ...]
    created: int
    cipher: str = CIPHER
    # The ciphertext of the file's only part (encrypted as part 0), when it is carried in the
    # manifest instead of being stored as a block of its own; then `parts` is empty.
    inline: bytes | None = None
    # How the parts are erasure-coded (each part's `shares`), or None: whole parts, replicated.
    erasure: Coding | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def version(self) -> int:
        if self.erasure is not None:
            return VERSION_ERASURE
        return VERSION if self.inline is None else VERSION_INLINE

    def to_json(self) -> bytes:
        if self.inline is not None and self.parts:
            raise ValueError("an inline manifest has no stored parts")
        if self.inline is not None and self.erasure is not None:
            raise ValueError("an inline manifest has no shares")
        if any(bool(p.shares) != (self.erasure is not None) for p in self.parts):
            raise ValueError("the parts of an erasure-coded manifest have shares, and only they")
        body: dict[str, Any] = {
            "version": self.version,
            "name": self.name,
            "size": self.size,
            "part-size": self.part_size,
            "cipher": self.cipher,
            "file-id": self.file_id.hex(),
            "created": self.created,
            "parts": [[p.hash, p.size, p.plain] for p in self.parts],
        }
        if self.erasure is not None:
            body["erasure"] = [self.erasure.k, self.erasure.n]
            body["parts"] = [[p.size, p.plain, list(p.shares)] for p in self.parts]
        if self.inline is not None:
            body["inline"] = base64.b64encode(self.inline).decode("ascii")
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RemoteProtocolError("manifest is not JSON (or nested too deeply)") from None
        if not isinstance(body, dict):
            raise RemoteProtocolError("manifest is not a JSON object")
        version = body.get("version")
        if type(version) is not int or version not in VERSIONS:
            raise RemoteProtocolError(f"unsupported manifest version {body.get('version')!r}")
        try:
            name = body["name"]
            size = body["size"]
            part_size = body["part-size"]
            cipher = body["cipher"]
            raw_id = body["file-id"]
            if not isinstance(raw_id, str) or not _FILE_ID_RE.match(raw_id):
                raise ValueError("file-id")
            file_id = bytes.fromhex(raw_id)
            created = body["created"]
            raw_parts = body["parts"]
        except (KeyError, TypeError, ValueError):
            raise RemoteProtocolError("manifest lacks a field or has a bad one") from None
        ints = (size, part_size, created)
        if not isinstance(name, str) or len(name) > MAX_NAME or "/" in name:
            raise RemoteProtocolError("manifest has a bad name")
        if not safe_name(name):
            raise RemoteProtocolError("manifest name has control or formatting characters")
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise RemoteProtocolError("manifest name is not valid Unicode") from None
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints):
            raise RemoteProtocolError("manifest has a bad number")
        if cipher != CIPHER or len(file_id) != FILE_ID_BYTES or part_size < 1:
            raise RemoteProtocolError("manifest has a bad cipher, file id or part size")
        if not isinstance(raw_parts, list):
            raise RemoteProtocolError("manifest parts is not a list")
        erasure = None
        if version == VERSION_ERASURE:
            raw_coding = body.get("erasure")
            try:
                if (
                    not isinstance(raw_coding, list)
                    or len(raw_coding) != 2
                    or not all(type(x) is int for x in raw_coding)
                ):
                    raise CodingError("erasure")
                erasure = Coding(raw_coding[0], raw_coding[1])
            except CodingError:
                raise RemoteProtocolError("manifest has a bad erasure coding") from None
            parts, total = _parts(raw_parts, lambda p: _coded_part(p, erasure, part_size))
        else:
            parts, total = _parts(raw_parts, lambda p: _whole_part(p, part_size))
        inline = None
        if version == VERSION_INLINE:
            raw_inline = body.get("inline")
            if not isinstance(raw_inline, str) or parts:
                raise RemoteProtocolError("inline manifest lacks its data, or also lists parts")
            try:
                inline = base64.b64decode(raw_inline.encode("ascii"), validate=True)
            except (UnicodeEncodeError, binascii.Error, ValueError):
                raise RemoteProtocolError("inline manifest data is not base64") from None
            if len(inline) != size + TAG_BYTES or size > part_size:
                raise RemoteProtocolError("inline manifest data does not match the file size")
        elif total != size:
            raise RemoteProtocolError("manifest part sizes do not add up to the file size")
        return cls(name, size, part_size, file_id, tuple(parts), created, cipher, inline, erasure)


def _parts(raw_parts: list[Any], parse: Callable[[list[Any]], PartRef | None]) -> tuple[list[PartRef], int]:
    """Every entry of `parts` parsed by `parse` (None: malformed), and their plaintext total."""
    parts = []
    for i, p in enumerate(raw_parts):
        ref = parse(p) if isinstance(p, list) and len(p) == 3 else None
        if ref is None:
            raise RemoteProtocolError(f"manifest part {i} is malformed")
        parts.append(ref)
    return parts, sum(ref.plain for ref in parts)


def _sizes_ok(size: Any, plain: Any, part_size: int) -> bool:
    """Ciphertext and plaintext sizes of a part: integers, plain within the part size, and the
    ciphertext larger by the AEAD tag."""
    return (
        all(isinstance(x, int) and not isinstance(x, bool) for x in (size, plain))
        and 0 <= plain <= part_size
        and size == plain + TAG_BYTES
    )


def _whole_part(p: list[Any], part_size: int) -> PartRef | None:
    """A version 1 part: [hash, ciphertext size, plaintext size]."""
    if not (isinstance(p[0], str) and is_block_id(p[0]) and not is_share_id(p[0])):
        return None
    return PartRef(p[0], p[1], p[2]) if _sizes_ok(p[1], p[2], part_size) else None


def _coded_part(p: list[Any], erasure: Coding, part_size: int) -> PartRef | None:
    """A version 3 part: [ciphertext size, plaintext size, [n distinct share IDs]]."""
    shares = p[2]
    if not (
        isinstance(shares, list)
        and len(shares) == erasure.n
        and all(isinstance(h, str) and is_share_id(h) for h in shares)
        and len(set(shares)) == erasure.n
    ):
        return None
    return PartRef("", p[0], p[1], tuple(shares)) if _sizes_ok(p[0], p[1], part_size) else None


def safe_name(name: str) -> bool:
    """No control characters (C0, C1), no format characters (bidi overrides, zero-width...),
    no surrogates: a name is printed on terminals and must not be able to spoof them."""
    return not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)


def clean_name(name: str) -> str:
    """A file name made safe for a manifest: unsafe characters become '?'."""
    cleaned = "".join("?" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c for c in name)
    return cleaned[:MAX_NAME]


def seal_manifest(manifest: Manifest, file_key: bytes, owner: PublicKey) -> bytes:
    return envelope.seal(MAGIC, manifest.to_json(), file_key, owner)


def reseal_for(blob: bytes, private_key: PrivateKey, recipient: PublicKey) -> bytes:
    """A new manifest blob readable by `recipient`, for the same parts (sharing)."""
    manifest, key = open_manifest(blob, private_key)
    return seal_manifest(manifest, key, recipient)


def open_manifest(blob: bytes, private_key: PrivateKey) -> tuple[Manifest, bytes]:
    """Return the manifest and the file key; WrongKey if this key cannot open it."""
    refuse_old(blob)
    if blob.startswith(DIRECTORY_MAGIC):
        raise IsDirectory("this address is a directory (use -r: `get -r ADDRESS -o DIR`; "
                          "`ls ADDRESS` lists it)")
    body, file_key = envelope.open_sealed(MAGIC, blob, private_key, "manifest", "file")
    return Manifest.from_json(body), file_key
