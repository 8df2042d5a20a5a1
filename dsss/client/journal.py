# -*- test-case-name: tests.unit.test_client_journal,tests.integration.test_interrupts -*-
"""The put journal: what an unfinished put stored, so that the same put sends only the rest.

Putting the same file again after an interruption sends only the parts not yet stored. One
journal file per source file, in `<key file>.journal/` beside the catalog (mode 0700; each
file 0600, since it holds the file's key until the put completes). Its first line is a header:

    {"v": 1, "path": "/abs/big.bin", "size": N, "mtime-ns": T, "part-size": P,
     "erasure": "2/4" | null, "file-key": "<64 hex>", "file-id": "<32 hex>"}

then one line per event, appended as it happens:

    {"sent": I, "id": "<hash of part I's ciphertext, or its share ids joined by ,>"}
    {"stored": I, "hash": "<hash or empty>", "size": C, "plain": S, "shares": ["<id>", ...]}

`sent` is written before part I leaves this machine, `stored` once every copy (or share) of it
was stored and proven. A put of the same path, size, modification time, part size and erasure
coding reuses the journal's file key and id: each part is then encrypted to the same ciphertext,
so the parts listed as stored (and still found on the network) need not be sent again. A part
whose ciphertext differs from its `sent` or `stored` line means the file changed: the journal is
dropped and the put starts over with a new key, so a key and nonce are never used for two
different plaintexts. The journal is removed once the file's manifest is stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsss.crypto.manifest import PartRef
from dsss.crypto.parts import FILE_ID_BYTES, KEY_BYTES

VERSION = 1
MAX_JOURNAL_BYTES = 64 * 1024 * 1024


def journal_dir(key_path: str | os.PathLike[str]) -> Path:
    key = Path(key_path)
    return key.with_name(key.name + ".journal")


class JournalChanged(Exception):
    """The file's content differs from what the journal recorded for a part."""


@dataclass
class PutJournal:
    """One file's journal, open for appending."""

    path: Path
    header: dict[str, Any]
    file_key: bytes
    file_id: bytes
    sent: dict[int, str] = field(default_factory=dict)
    stored: dict[int, PartRef] = field(default_factory=dict)
    resumed: bool = False  # it existed before this put
    # What this put found already stored and did not send again.
    skipped_parts: int = 0
    skipped_bytes: int = 0

    def check(self, index: int, ident: str) -> None:
        """JournalChanged if part `index` now encrypts to something other than what was sent."""
        before = self.sent.get(index)
        if before is None and index in self.stored:
            before = part_ident(self.stored[index])
        if before is not None and before != ident:
            raise JournalChanged(f"part {index} changed")

    def record_sent(self, index: int, ident: str) -> None:
        if self.sent.get(index) != ident:
            self.sent[index] = ident
            self._append({"sent": index, "id": ident})

    def record_stored(self, index: int, ref: PartRef) -> None:
        self.stored[index] = ref
        self._append({"stored": index, "hash": ref.hash, "size": ref.size, "plain": ref.plain,
                      "shares": list(ref.shares)})

    def skipped(self, plain_size: int) -> None:
        self.skipped_parts += 1
        self.skipped_bytes += plain_size

    def remove(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _append(self, doc: dict[str, Any]) -> None:
        # Flushed to the OS at once (an interrupt or a kill keeps it); not fsynced.
        with open(self.path, "ab") as f:
            f.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")


def part_ident(ref: PartRef) -> str:
    """What identifies a part's ciphertext in the journal: its hash, or its share ids."""
    return ref.hash if not ref.shares else ",".join(ref.shares)


def _header(source: Path, size: int, mtime_ns: int, part_size: int, erasure: str | None) -> dict[str, Any]:
    return {"v": VERSION, "path": str(source), "size": size, "mtime-ns": mtime_ns,
            "part-size": part_size, "erasure": erasure}


def _journal_file(directory: Path, source: Path) -> Path:
    return directory / (hashlib.sha256(os.fsencode(source)).hexdigest()[:32] + ".put")


def _parse(data: bytes, want: dict[str, Any]) -> tuple[bytes, bytes, dict[int, str], dict[int, PartRef]] | None:
    lines = data.split(b"\n")
    try:
        head = json.loads(lines[0])
        if {k: head.get(k) for k in want} != want:
            return None
        key, fid = bytes.fromhex(head["file-key"]), bytes.fromhex(head["file-id"])
        if len(key) != KEY_BYTES or len(fid) != FILE_ID_BYTES:
            return None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    sent: dict[int, str] = {}
    stored: dict[int, PartRef] = {}
    for line in lines[1:]:
        if not line:
            continue
        try:
            doc = json.loads(line)
            if "sent" in doc:
                sent[int(doc["sent"])] = str(doc["id"])
            elif "stored" in doc:
                stored[int(doc["stored"])] = PartRef(str(doc["hash"]), int(doc["size"]), int(doc["plain"]),
                                                     tuple(str(s) for s in doc["shares"]))
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a crash: what follows is not trusted
    return key, fid, sent, stored


def open_journal(
    directory: Path, source: str | os.PathLike[str], *, size: int, mtime_ns: int, part_size: int,
    erasure: str | None,
) -> PutJournal:
    """The journal of an unfinished put of this very file (same path, size, modification time,
    part size and coding), or a new one with a fresh file key and id."""
    source = Path(os.path.abspath(source))
    want = _header(source, size, mtime_ns, part_size, erasure)
    path = _journal_file(directory, source)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JOURNAL_BYTES + 1)
    except FileNotFoundError:
        data = b""
    if data and len(data) <= MAX_JOURNAL_BYTES:
        parsed = _parse(data, want)
        if parsed is not None:
            key, fid, sent, stored = parsed
            return PutJournal(path, want, key, fid, sent, stored, resumed=True)
    return new_journal(directory, source, size=size, mtime_ns=mtime_ns, part_size=part_size, erasure=erasure)


def new_journal(
    directory: Path, source: str | os.PathLike[str], *, size: int, mtime_ns: int, part_size: int,
    erasure: str | None,
) -> PutJournal:
    """A new journal (replacing any other of this file) with a fresh file key and id."""
    source = Path(os.path.abspath(source))
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = _journal_file(directory, source)
    key, fid = secrets.token_bytes(KEY_BYTES), secrets.token_bytes(FILE_ID_BYTES)
    header = {**_header(source, size, mtime_ns, part_size, erasure), "file-key": key.hex(), "file-id": fid.hex()}
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(json.dumps(header, separators=(",", ":")).encode() + b"\n")
    os.replace(tmp, path)
    return PutJournal(path, header, key, fid)
