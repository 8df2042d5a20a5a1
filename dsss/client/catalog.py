# -*- test-case-name: tests.unit.test_client_catalog_config -*-
"""The local catalog: what this key has stored (or shared), kept beside the key file.

`<key file>.catalog` (e.g. `~/.config/dsss/key.catalog`) holds one JSON object per line:

    {"address": "<64 hex>", "name": "photo.jpg", "size": 2500000, "parts": 3,
     "created": 1795751429, "kind": "put"}
    {"address": "<64 hex>", "name": "photo.jpg", "size": 2500000, "parts": 3,
     "created": 1795751500, "kind": "shared-to 1a2b3c4d5e6f7081", "source": "<64 hex>"}
    {"address": "<64 hex>", "name": "photos", "size": 73400320, "parts": 0,
     "created": 1795751600, "kind": "put", "type": "directory"}

`"type": "directory"` marks the address of a directory stored with `put -r` (its `size` is the
bytes of the files beneath it); a line without `type` is a file.

The catalog can be kept on the network too (`catalog backup`): `backup_bytes` turns entries
into a file that is stored like any other (sealed to the user's key only), and
`parse_backup` reads one back for `catalog restore`, which adds the entries missing here.

Each entry is appended with one `write` on a descriptor opened with O_APPEND, so concurrent
clients do not interleave lines. A line that does not parse (a write cut short by a crash) is
skipped when reading, and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from dsss.model import is_block_id

KIND_PUT = "put"
TYPE_FILE = "file"
TYPE_DIRECTORY = "directory"
KIND_LEASED = "leased"  # a file another key shared with this one, leased by this key (`renew`)
KIND_REMOVED = "removed"  # `rm` released this key's leases on it
SHARED_PREFIX = "shared-to "
PUBKEY_PREFIX_HEX = 16
MAX_LINE = 64 * 1024


def catalog_path(key_path: str | os.PathLike[str]) -> Path:
    """The catalog that belongs to a key file: the same path with `.catalog` added."""
    key = Path(key_path)
    return key.with_name(key.name + ".catalog")


def shared_kind(recipient_hex: str) -> str:
    return SHARED_PREFIX + recipient_hex[:PUBKEY_PREFIX_HEX]


def _entry_type(value: Any) -> bool:
    """A line's `type`: True for a directory, False for a file; ValueError for anything else."""
    if value not in (TYPE_FILE, TYPE_DIRECTORY):
        raise ValueError(f"unknown type {value!r}")
    return bool(value == TYPE_DIRECTORY)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class Entry:
    address: str
    name: str
    size: int
    parts: int
    created: int
    kind: str = KIND_PUT
    source: str | None = None  # for a share: the address it was shared from
    directory: bool = False  # the address of a directory (`put -r`), not of a file
    # When this key's leases on the file end (unix time), as `put` or `renew` last took them.
    expires: int | None = None

    def __post_init__(self) -> None:
        if not is_block_id(self.address):
            raise ValueError("address is not 64 lowercase hex characters")
        if not isinstance(self.name, str) or any(ord(ch) < 32 or ord(ch) == 127 for ch in self.name):
            raise ValueError("bad name")
        if not (_is_count(self.size) and _is_count(self.parts) and _is_count(self.created)):
            raise ValueError("size, parts and created are non-negative integers")
        if not isinstance(self.kind, str) or not (
            self.kind in (KIND_PUT, KIND_LEASED, KIND_REMOVED) or self.kind.startswith(SHARED_PREFIX)
        ):
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.source is not None and not is_block_id(self.source):
            raise ValueError("source is not an address")
        if not isinstance(self.directory, bool):
            raise ValueError("directory is true or false")
        if self.expires is not None and not _is_count(self.expires):
            raise ValueError("expires is a non-negative integer")

    @property
    def shared(self) -> bool:
        return self.kind.startswith(SHARED_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "address": self.address,
            "name": self.name,
            "size": self.size,
            "parts": self.parts,
            "created": self.created,
            "kind": self.kind,
        }
        if self.source is not None:
            doc["source"] = self.source
        if self.directory:
            doc["type"] = TYPE_DIRECTORY
        if self.expires is not None:
            doc["expires"] = self.expires
        return doc

    def to_line(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"

    @classmethod
    def from_dict(cls, doc: Any) -> "Entry":
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        try:
            return cls(
                address=doc["address"],
                name=doc["name"],
                size=doc["size"],
                parts=doc["parts"],
                created=doc["created"],
                kind=doc.get("kind", KIND_PUT),
                source=doc.get("source"),
                directory=_entry_type(doc.get("type", TYPE_FILE)),
                expires=doc.get("expires"),
            )
        except KeyError as e:
            raise ValueError(f"missing {e.args[0]}") from None


def parse_lines(data: bytes) -> tuple[list[Entry], int]:
    """The entries in a catalog's bytes, in order, and how many lines were skipped as bad."""
    entries: list[Entry] = []
    skipped = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            if len(raw) > MAX_LINE:
                raise ValueError("line too long")
            entries.append(Entry.from_dict(json.loads(raw.decode("utf-8"))))
        except (ValueError, UnicodeDecodeError, RecursionError):
            skipped += 1
    return entries, skipped


def read(path: str | os.PathLike[str]) -> tuple[list[Entry], int]:
    """Every entry of a catalog file (none if it does not exist) and the count of bad lines."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    return parse_lines(data)


def latest(entries: Iterable[Entry]) -> list[Entry]:
    """One entry per address (the last one written), in the order addresses first appeared."""
    by_address: dict[str, Entry] = {}
    for e in entries:
        by_address[e.address] = e
    return list(by_address.values())


def append(path: str | os.PathLike[str], entry: Entry) -> None:
    """Add one entry with a single O_APPEND write; the file is created with mode 0600."""
    append_many(path, [entry])


def append_many(path: str | os.PathLike[str], entries: list[Entry]) -> None:
    """Add entries with one O_APPEND write (the file is created with mode 0600), fsynced; a
    previous write cut short (a partial last line) is left behind on a line of its own."""
    if not entries:
        return
    data = b"".join(e.to_line() for e in entries)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        end = os.fstat(fd).st_size
        if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover (regular files write everything)
            raise OSError(f"short write to {path}")
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the catalog kept on the network -------------------------------------------------------------

BACKUP_HEADER = "dsss-catalog-backup"
BACKUP_VERSION = 1
BACKUP_NAME = "dsss-catalog"
"""The name a catalog backup is stored under (what `get` of its address writes)."""


class NotABackup(ValueError):
    """Bytes that are not a catalog backup."""


def backup_bytes(entries: Iterable[Entry], created: int) -> bytes:
    """A catalog backup: a header line, then one entry per line (the catalog's own format).

        {"dsss-catalog-backup": 1, "created": 1795751429, "entries": 2}
        {"address": ..., "name": ..., ...}
        {"address": ..., "name": ..., ...}
    """
    lines = [e.to_line() for e in entries]
    header = json.dumps({BACKUP_HEADER: BACKUP_VERSION, "created": created, "entries": len(lines)},
                        separators=(",", ":")).encode("ascii") + b"\n"
    return header + b"".join(lines)


def parse_backup(data: bytes) -> list[Entry]:
    """The entries of a catalog backup; NotABackup if `data` is not one, or is cut short or
    damaged (a backup is written whole, so a bad line means it is not the backup stored)."""
    first, _, rest = data.partition(b"\n")
    try:
        header = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        header = None
    if not isinstance(header, dict) or header.get(BACKUP_HEADER) != BACKUP_VERSION:
        raise NotABackup("not a DSSS catalog backup")
    count = header.get("entries")
    entries, skipped = parse_lines(rest)
    if skipped or type(count) is not int or count != len(entries):
        raise NotABackup(f"a damaged catalog backup ({len(entries)} entries read, {skipped} bad lines, "
                         f"{count!r} announced)")
    return entries


def missing(have: Iterable[Entry], wanted: Iterable[Entry]) -> list[Entry]:
    """The latest entry of `wanted` for each address that `have` has no entry for, in order:
    what this catalog records is kept as it is."""
    present = {e.address for e in have}
    return [e for e in latest(wanted) if e.address not in present]
