# -*- test-case-name: tests.unit.test_catalog_backup -*-
"""The catalog's directory entries and its backup format (dsss.client.catalog): what a backup
holds, what restore adds, and what it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsss.client import catalog

A, B, C = "a" * 64, "b" * 64, "c" * 64


def entry(address: str, name: str = "f", **kw: object) -> catalog.Entry:
    return catalog.Entry(address=address, name=name, size=1, parts=0, created=5, **kw)  # type: ignore[arg-type]


def test_a_directory_entry_is_marked_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "key.catalog"
    catalog.append(path, entry(A, "photos", directory=True))
    catalog.append(path, entry(B))
    raw = path.read_bytes().splitlines()
    assert b'"type":"directory"' in raw[0] and b"type" not in raw[1]  # a file's line is as before
    got, skipped = catalog.read(path)
    assert skipped == 0 and [e.directory for e in got] == [True, False]
    # An unknown type is a bad line, skipped like any other.
    path.write_bytes(raw[0].replace(b'"directory"', b'"socket"') + b"\n")
    assert catalog.read(path) == ([], 1)


def test_a_backup_round_trips_and_restore_adds_only_what_is_missing(tmp_path: Path) -> None:
    entries = [entry(A, "one"), entry(B, "two", directory=True), entry(A, "one renamed")]
    data = catalog.backup_bytes(catalog.latest(entries), 1795751429)
    assert data.startswith(b'{"dsss-catalog-backup":1,"created":1795751429,"entries":2}\n')
    wanted = catalog.parse_backup(data)
    assert [(e.address, e.name, e.directory) for e in wanted] == [(A, "one renamed", False), (B, "two", True)]

    path = tmp_path / "key.catalog"
    catalog.append(path, entry(B, "kept as it is"))
    new = catalog.missing(catalog.read(path)[0], wanted)
    assert [e.address for e in new] == [A]
    catalog.append_many(path, new)
    assert [(e.address, e.name) for e in catalog.latest(catalog.read(path)[0])] == [
        (B, "kept as it is"), (A, "one renamed")]
    # Restoring again adds nothing.
    assert catalog.missing(catalog.read(path)[0], wanted) == []


@pytest.mark.parametrize("data", [
    b"", b"hello\n", b'{"dsss-catalog-backup":2,"entries":0}\n',
    b'{"dsss-catalog-backup":1,"created":1,"entries":2}\n' + entry(A).to_line(),  # cut short
    b'{"dsss-catalog-backup":1,"created":1,"entries":1}\n{"address":"nope"}\n',
])
def test_what_is_not_a_whole_backup_is_refused(data: bytes) -> None:
    with pytest.raises(catalog.NotABackup):
        catalog.parse_backup(data)
