# -*- test-case-name: tests.unit.test_directory -*-
"""The directory manifest format (dsss.crypto.directory): round trips, splitting into
continuations, names checked when written and when read, hostile bodies refused."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from nacl.public import PrivateKey

from dsss.crypto import directory as d
from dsss.crypto.manifest import Manifest, open_manifest, seal_manifest
from dsss.errors import IntegrityError, RemoteProtocolError, WrongKey
from dsss.model import block_hash
from tests.support.hostile_tree import dir_entry, file_entry, head, seal_body

OWNER = PrivateKey.generate()
A = "a" * 64
B = "b" * 64

ODD_NAMES = [
    "plain.txt", "with space", "-leading-dash", "--", "ünïcödé ✓", "日本語のファイル",
    "é" * 127 + "x",  # 255 bytes of UTF-8
    "x" * 255, "tab\there", "new\nline", "quote\"and\\back", ".hidden", "...", "a" * 1,
]


def entries(names: list[str], kind: str = d.FILE) -> tuple[d.Entry, ...]:
    return tuple(d.Entry(kind, n, i, 0o644, 1_700_000_000_123_456_789 + i, block_hash(n.encode("utf-8", "surrogatepass")))
                 for i, n in enumerate(names))


def test_a_directory_round_trips_with_odd_names() -> None:
    directory = d.Directory("photos", 0o750, -5, 1795751429, entries(ODD_NAMES))
    blob, more = d.seal_directory(directory, OWNER.public_key)
    assert more == [] and blob.startswith(d.MAGIC) and d.is_directory_blob(blob)
    opened = d.open_head(blob, OWNER)
    assert opened.more == () and opened.directory == directory
    assert d.assemble(opened, []) == directory
    # Every blob is sealed afresh: the same directory twice gives two addresses.
    assert block_hash(d.seal_directory(directory, OWNER.public_key)[0]) != block_hash(blob)
    assert directory.size == sum(range(len(ODD_NAMES)))


def test_a_large_directory_is_split_into_continuations() -> None:
    names = [f"file-{i:04d}" for i in range(10)]
    directory = d.Directory("big", 0o755, 0, 1, entries(names))
    blob, more = d.seal_directory(directory, OWNER.public_key, per_blob=3)
    assert len(more) == 3
    opened = d.open_head(blob, OWNER)
    assert opened.more == tuple(block_hash(c) for c in more)
    assert [e.name for e in opened.directory.entries] == names[:3]
    chunks = [d.open_continuation(c, OWNER) for c in more]
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert d.assemble(opened, chunks) == directory
    # A continuation is not a directory of its own, nor a head a continuation.
    with pytest.raises(d.NotDirectory):
        d.open_head(more[0], OWNER)
    with pytest.raises(RemoteProtocolError):
        d.open_continuation(blob, OWNER)
    # The default split: 4096 entries per blob; 4097 make a head and one continuation.
    big = d.Directory("", 0o700, 0, 1, entries([f"n{i}" for i in range(d.ENTRIES_PER_BLOB + 1)]))
    blob, more = d.seal_directory(big, OWNER.public_key)
    assert len(more) == 1 and len(d.open_head(blob, OWNER).directory.entries) == d.ENTRIES_PER_BLOB


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "../../etc/passwd", "nul\0byte",
                                  "x" * 256, "é" * 128, "bad\udcffsurrogate"])
def test_names_that_are_not_one_path_component_are_refused_when_written(name: str) -> None:
    with pytest.raises(d.BadName):
        d.check_name(name)
    directory = d.Directory("ok", 0o755, 0, 1, entries([name]))
    with pytest.raises(d.BadName):
        d.seal_directory(directory, OWNER.public_key)


def test_duplicate_names_and_bad_fields_are_refused_when_written() -> None:
    twice = d.Directory("ok", 0o755, 0, 1, entries(["same", "same"]))
    with pytest.raises(d.BadName, match="twice"):
        d.seal_directory(twice, OWNER.public_key)
    for bad in (d.Entry("x", "n", 0, 0o644, 0, A), d.Entry("f", "n", -1, 0o644, 0, A),
                d.Entry("f", "n", 0, 0o4755, 0, A), d.Entry("f", "n", 0, 0o644, 0, "s" + A),
                d.Entry("f", "n", True, 0o644, 0, A)):
        with pytest.raises(ValueError):
            d.seal_directory(d.Directory("ok", 0o755, 0, 1, (bad,)), OWNER.public_key)


HOSTILE_BODIES: list[tuple[str, Any]] = [
    ("slash", head([file_entry("../../etc/passwd", A, 1)])),
    ("absolute", head([file_entry("/etc/passwd", A, 1)])),
    ("dotdot", head([dir_entry("..", A)])),
    ("dot", head([dir_entry(".", A)])),
    ("empty", head([file_entry("", A, 1)])),
    ("nul", head([file_entry("a\0b", A, 1)])),
    ("long", head([file_entry("x" * 256, A, 1)])),
    ("duplicate", head([file_entry("a", A, 1), dir_entry("a", B)])),
    ("kind", head([["l", "link", 0, 0o777, 0, A]])),
    ("share-address", head([file_entry("a", "s" + A, 1)])),
    ("bad-address", head([file_entry("a", "A" * 64, 1)])),
    ("mode", head([file_entry("a", A, 1, mode=0o4755)])),
    ("size", head([file_entry("a", A, -1)])),
    ("bool-size", head([["f", "a", True, 0o644, 0, A]])),
    ("short-entry", head([["f", "a", 1, 0o644, A]])),
    ("entry-object", head([{"name": "a"}])),  # type: ignore[list-item]
    ("root-name", head([], name="../up")),
    ("version", {**head([]), "version": 2}),
    ("type", {**head([]), "type": "symlink"}),
    ("more", head([], more=["nope"])),
    ("more-repeated", head([], more=[A, A])),
    ("not-object", [1, 2]),
]


@pytest.mark.parametrize("label,body", HOSTILE_BODIES, ids=[b[0] for b in HOSTILE_BODIES])
def test_hostile_directories_are_refused_when_read(label: str, body: Any) -> None:
    blob = seal_body(body, OWNER.public_key)
    with pytest.raises(RemoteProtocolError):
        d.open_head(blob, OWNER)


def test_not_json_wrong_key_and_tampering() -> None:
    with pytest.raises(RemoteProtocolError):
        d.open_head(seal_body(None, OWNER.public_key, raw=b"\xff{not json"), OWNER)
    blob = seal_body(head([file_entry("a", A, 1)]), OWNER.public_key)
    assert d.open_head(blob, OWNER).directory.entries[0].name == "a"  # the helper writes the documented format
    with pytest.raises(WrongKey):
        d.open_head(blob, PrivateKey.generate())
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(IntegrityError):
        d.open_head(tampered, OWNER)
    with pytest.raises(IntegrityError):
        d.open_head(b"DSSSM\x02" + blob[6:], OWNER)


def test_a_name_repeated_across_continuations_is_refused() -> None:
    cont = seal_body({"version": 1, "type": "continuation", "entries": [file_entry("a", B, 2)]}, OWNER.public_key)
    blob = seal_body(head([file_entry("a", A, 1)], more=[block_hash(cont)]), OWNER.public_key)
    opened = d.open_head(blob, OWNER)
    with pytest.raises(RemoteProtocolError, match="twice"):
        d.assemble(opened, [d.open_continuation(cont, OWNER)])


def test_a_file_reader_given_a_directory_says_it_is_a_directory() -> None:
    blob, _ = d.seal_directory(d.Directory("x", 0o755, 0, 1, ()), OWNER.public_key)
    with pytest.raises(d.IsDirectory, match="is a directory|holds a directory"):
        open_manifest(blob, OWNER)
    m = Manifest(name="f", size=0, part_size=1, file_id=secrets.token_bytes(16), parts=(), created=1)
    file_blob = seal_manifest(m, secrets.token_bytes(32), OWNER.public_key)
    assert not d.is_directory_blob(file_blob)
    with pytest.raises(IntegrityError):
        d.open_head(file_blob, OWNER)
