# -*- test-case-name: tests.unit.test_directory -*-
"""The directory manifest: a directory's entries, encrypted and stored like a file's manifest.

Each entry has a name, size, mode, modification time and address (a file's or a
sub-directory's).

Stored form ("blob"), laid out as a file's manifest but with its own magic:

    magic      6 bytes   b"DSSSD\\x01"
    sealed key 80 bytes  a fresh 32-byte key in a SealedBox to the owner's Curve25519 public key
    nonce      24 bytes  random
    body       rest      XChaCha20-Poly1305(JSON body, ad = magic || sealed key)

A directory's address is its head blob's address (`dsss.model.block_hash`). A directory of more
than ENTRIES_PER_BLOB entries is split: the head blob carries the first entries and lists, in
order, the addresses of *continuation* blobs (same layout, `"type":"continuation"`) that carry
the rest. Each entry names a file (the address of its file manifest) or a sub-directory (the
address of its head blob): one address restores a whole tree.

Every name is one path component, checked when a directory is encoded and again when one is
decoded (`check_name`): not empty, not `.` or `..`, no `/`, no NUL, valid Unicode, at most 255
bytes of UTF-8; the names of one directory are distinct. A directory read from the network
therefore cannot name a path outside the directory it is restored into. The JSON body is
described exactly in docs/protocol.md.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from nacl.public import PrivateKey, PublicKey

from dsss.crypto import envelope
from dsss.crypto.parts import KEY_BYTES
from dsss.errors import DSSSError, RemoteProtocolError
from dsss.model import block_hash, is_block_id, is_share_id

MAGIC = b"DSSSD\x01"
HEADER_BYTES = len(MAGIC) + envelope.SEALED_KEY_BYTES + envelope.NONCE_BYTES
VERSION = 1
TYPE_DIRECTORY = "directory"
TYPE_CONTINUATION = "continuation"
FILE = "f"
DIR = "d"
MAX_NAME_BYTES = 255
ENTRIES_PER_BLOB = 4096
"""Most entries in one blob (head or continuation). A worst-case entry (a 255-byte name of
characters JSON escapes as \\u00XX) is about 1.6 KB of JSON, so a blob stays under 7 MB, well
within one stored block (16 MiB)."""
MAX_MORE = 255
"""Most continuation blobs of one directory: at most 256 × 4096 = 1 048 576 entries."""
MAX_MODE = 0o777
MAX_MTIME = 2**63 - 1
MAX_SIZE = 2**63 - 1


class BadName(DSSSError):
    """A name that cannot be one entry of a directory (not a single path component)."""

    http_status = 400
    exit_code = 2
    code = "bad-name"


class IsDirectory(DSSSError):
    """An address that holds a directory, given to a command that takes a file."""

    http_status = 400
    exit_code = 2
    code = "is-a-directory"


class NotDirectory(DSSSError):
    """An address that holds a file (or part of a directory), given where a directory is wanted."""

    http_status = 400
    exit_code = 2
    code = "not-a-directory"


def check_name(name: Any) -> str:
    """Return `name` if it is one path component that any directory may hold; else BadName."""
    if not isinstance(name, str):
        raise BadName("a name is a string")
    if name in ("", ".", ".."):
        raise BadName(f"{name!r} cannot be a name in a directory")
    if "/" in name or "\0" in name:
        raise BadName(f"{name!r}: a name is one path component (no '/', no NUL)")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadName(f"{name!r} is not valid Unicode (names are stored as UTF-8)") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise BadName(f"{name[:40]!r}...: longer than {MAX_NAME_BYTES} bytes of UTF-8")
    return name


def is_directory_blob(blob: bytes) -> bool:
    """Whether a stored blob is a directory manifest (head or continuation), by its magic."""
    return blob.startswith(MAGIC)


def _is_int(x: Any, low: int, high: int) -> bool:
    return type(x) is int and low <= x <= high


@dataclass(frozen=True)
class Entry:
    """One name in a directory: a file (`kind` FILE, `address` its file manifest's) or a
    sub-directory (`kind` DIR, `address` its head blob's; `size` the bytes of the files
    beneath it, for listings). `mode` is the permission bits (0 to 0o777); `mtime` the
    modification time in nanoseconds since the epoch."""

    kind: str
    name: str
    size: int
    mode: int
    mtime: int
    address: str

    def check(self) -> "Entry":
        """Return self if every field is valid; else BadName (the name) or ValueError."""
        check_name(self.name)
        if self.kind not in (FILE, DIR):
            raise ValueError(f"entry kind is {FILE!r} or {DIR!r}")
        if not _is_int(self.size, 0, MAX_SIZE):
            raise ValueError("entry size is a non-negative integer")
        if not _is_int(self.mode, 0, MAX_MODE):
            raise ValueError("entry mode is an integer from 0 to 0o777")
        if not _is_int(self.mtime, -MAX_MTIME, MAX_MTIME):
            raise ValueError("entry mtime is an integer (nanoseconds)")
        if not (is_block_id(self.address) and not is_share_id(self.address)):
            raise ValueError("entry address is 64 lowercase hex characters")
        return self

    def to_list(self) -> list[Any]:
        return [self.kind, self.name, self.size, self.mode, self.mtime, self.address]

    @classmethod
    def from_list(cls, raw: Any) -> "Entry":
        if not isinstance(raw, list) or len(raw) != 6:
            raise ValueError("an entry is a list of 6 values")
        return cls(*raw).check()


@dataclass(frozen=True)
class Directory:
    """A whole directory: its own name (informational; "" for a root that had none), mode and
    mtime, when it was stored (Unix seconds), and its entries in order, names distinct."""

    name: str
    mode: int
    mtime: int
    created: int
    entries: tuple[Entry, ...]

    def check(self) -> "Directory":
        if self.name != "":
            check_name(self.name)
        if not (_is_int(self.mode, 0, MAX_MODE) and _is_int(self.mtime, -MAX_MTIME, MAX_MTIME)
                and _is_int(self.created, 0, MAX_SIZE)):
            raise ValueError("directory mode, mtime or created is out of range")
        seen: set[str] = set()
        for e in self.entries:
            e.check()
            if e.name in seen:
                raise BadName(f"{e.name!r} appears twice in one directory")
            seen.add(e.name)
        return self

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


@dataclass(frozen=True)
class Head:
    """An opened head blob: the directory with its first entries, and the addresses of the
    continuation blobs holding the rest, in order."""

    directory: Directory
    more: tuple[str, ...]


def _body_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _seal(body: bytes, owner: PublicKey) -> bytes:
    return envelope.seal(MAGIC, body, os.urandom(KEY_BYTES), owner)


def seal_directory(
    directory: Directory, owner: PublicKey, *, per_blob: int = ENTRIES_PER_BLOB
) -> tuple[bytes, list[bytes]]:
    """The directory's head blob and its continuation blobs (store those first: the head names
    them by address). Raises BadName or ValueError for a directory that may not be stored."""
    directory.check()
    if not 1 <= per_blob <= ENTRIES_PER_BLOB:
        raise ValueError(f"per_blob is 1 to {ENTRIES_PER_BLOB}")
    entries = [e.to_list() for e in directory.entries]
    chunks = [entries[i : i + per_blob] for i in range(0, len(entries), per_blob)] or [[]]
    if len(chunks) - 1 > MAX_MORE:
        raise DSSSError(
            f"a directory holds at most {(MAX_MORE + 1) * ENTRIES_PER_BLOB} entries; "
            f"{directory.name or 'this one'} has {len(entries)}"
        )
    continuations = [
        _seal(_body_json({"version": VERSION, "type": TYPE_CONTINUATION, "entries": chunk}), owner)
        for chunk in chunks[1:]
    ]
    head: dict[str, Any] = {
        "version": VERSION,
        "type": TYPE_DIRECTORY,
        "name": directory.name,
        "mode": directory.mode,
        "mtime": directory.mtime,
        "created": directory.created,
        "entries": chunks[0],
    }
    if continuations:
        head["more"] = [block_hash(c) for c in continuations]
    return _seal(_body_json(head), owner), continuations


def _open(blob: bytes, private_key: PrivateKey) -> dict[str, Any]:
    """The JSON body of a directory blob, as a dict; WrongKey, IntegrityError or
    RemoteProtocolError if it cannot be read."""
    body, _ = envelope.open_sealed(MAGIC, blob, private_key, "directory", "directory")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RemoteProtocolError("directory is not JSON (or nested too deeply)") from None
    if not isinstance(doc, dict):
        raise RemoteProtocolError("directory is not a JSON object")
    if doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise RemoteProtocolError(f"unsupported directory version {doc.get('version')!r}")
    return doc


def _entries(raw: Any) -> tuple[Entry, ...]:
    if not isinstance(raw, list) or len(raw) > ENTRIES_PER_BLOB:
        raise RemoteProtocolError(f"directory entries is not a list of at most {ENTRIES_PER_BLOB}")
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(Entry.from_list(item))
        except BadName as e:
            raise RemoteProtocolError(f"directory entry {i} has a bad name: {e}") from None
        except (TypeError, ValueError) as e:
            raise RemoteProtocolError(f"directory entry {i} is malformed: {e}") from None
    return tuple(out)


def open_head(blob: bytes, private_key: PrivateKey) -> Head:
    """Open a directory's head blob. NotDirectory for a continuation blob; RemoteProtocolError
    for a body that breaks the format (a bad or repeated name among them)."""
    doc = _open(blob, private_key)
    if doc.get("type") == TYPE_CONTINUATION:
        raise NotDirectory("this address holds the continuation of a large directory, not a "
                           "directory: give the directory's own address")
    if doc.get("type") != TYPE_DIRECTORY:
        raise RemoteProtocolError(f"unknown directory blob type {doc.get('type')!r}")
    entries = _entries(doc.get("entries"))
    more = doc.get("more", [])
    if not (
        isinstance(more, list) and len(more) <= MAX_MORE
        and all(isinstance(a, str) and is_block_id(a) and not is_share_id(a) for a in more)
        and len(set(more)) == len(more)
    ):
        raise RemoteProtocolError(f"directory 'more' is not a list of at most {MAX_MORE} distinct addresses")
    try:
        own: list[Any] = [doc.get(k) for k in ("name", "mode", "mtime", "created")]  # checked below
        directory = Directory(own[0], own[1], own[2], own[3], entries).check()
    except BadName as e:
        raise RemoteProtocolError(f"directory has a bad name: {e}") from None
    except (TypeError, ValueError) as e:
        raise RemoteProtocolError(f"directory is malformed: {e}") from None
    return Head(directory, tuple(more))


def open_continuation(blob: bytes, private_key: PrivateKey) -> tuple[Entry, ...]:
    """The entries of a continuation blob."""
    doc = _open(blob, private_key)
    if doc.get("type") != TYPE_CONTINUATION:
        raise RemoteProtocolError("a directory's continuation is not a continuation blob")
    return _entries(doc.get("entries"))


def assemble(head: Head, continuations: list[tuple[Entry, ...]]) -> Directory:
    """The whole directory from its head and its continuations' entries (in the head's order);
    RemoteProtocolError if a name appears twice across them."""
    if len(continuations) != len(head.more):
        raise ValueError("one list of entries per continuation")
    d = head.directory
    entries = d.entries + tuple(e for chunk in continuations for e in chunk)
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise RemoteProtocolError(f"directory has a bad name: {e.name!r} appears twice")
        seen.add(e.name)
    return Directory(d.name, d.mode, d.mtime, d.created, entries)
