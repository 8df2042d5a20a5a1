"""The put journal (dsss.client.journal) on a temporary directory: reopened only for the same
file, key and id kept, records read back, a line cut short ignored, a changed part detected."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dsss.client.journal import JournalChanged, open_journal, part_ident
from dsss.crypto.manifest import PartRef

SAME = dict(size=1000, mtime_ns=123, part_size=100, erasure=None)


def test_a_journal_is_reopened_only_for_the_same_file_and_settings(tmp_path: Path) -> None:
    d = tmp_path / "k.journal"
    src = tmp_path / "f.bin"
    j = open_journal(d, src, **SAME)  # type: ignore[arg-type]
    assert not j.resumed and stat.S_IMODE(os.stat(j.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    ref = PartRef("a" * 64, 116, 100)
    coded = PartRef("", 116, 100, ("s" + "b" * 63, "s" + "c" * 63))
    j.record_sent(0, ref.hash)
    j.record_stored(0, ref)
    j.record_sent(1, part_ident(coded))
    j.record_stored(1, coded)
    j.record_sent(2, "d" * 64)
    again = open_journal(d, src, **SAME)  # type: ignore[arg-type]
    assert again.resumed and (again.file_key, again.file_id) == (j.file_key, j.file_id)
    assert again.stored == {0: ref, 1: coded} and again.sent[2] == "d" * 64
    for change in (dict(mtime_ns=124), dict(size=1001), dict(part_size=50), dict(erasure="2/4")):
        other = open_journal(d, src, **{**SAME, **change})  # type: ignore[arg-type]
        assert not other.resumed and other.file_key != j.file_key and not other.stored
        assert not open_journal(d, src, **SAME).resumed  # type: ignore[arg-type]  # replaced


def test_a_line_cut_short_ends_what_is_trusted(tmp_path: Path) -> None:
    d = tmp_path / "k.journal"
    src = tmp_path / "f.bin"
    j = open_journal(d, src, **SAME)  # type: ignore[arg-type]
    j.record_stored(0, PartRef("a" * 64, 116, 100))
    with open(j.path, "ab") as f:
        f.write(b'{"stored":1,"hash":"bb')  # a crash in the middle of a line
    again = open_journal(d, src, **SAME)  # type: ignore[arg-type]
    assert again.resumed and list(again.stored) == [0]


def test_a_part_that_encrypts_differently_means_the_file_changed(tmp_path: Path) -> None:
    j = open_journal(tmp_path / "j", tmp_path / "f", **SAME)  # type: ignore[arg-type]
    j.record_sent(3, "a" * 64)
    j.check(3, "a" * 64)
    j.check(4, "e" * 64)  # never sent: anything goes
    with pytest.raises(JournalChanged):
        j.check(3, "b" * 64)
    j.remove()
    assert not j.path.exists()
