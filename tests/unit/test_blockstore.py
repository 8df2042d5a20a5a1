# -*- test-case-name: tests.unit.test_blockstore -*-
"""Tests for L{dsss.storage.blockstore}: the content-addressed part store on disk."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from dsss import proofs
from dsss.errors import BadRequest, IntegrityError, NotFound, RemoteProtocolError, StorageFull
from dsss.model import block_hash, share_id
from dsss.storage import blockstore as bs_module
from dsss.storage.blockstore import STORE_FORMAT, BlockStore, StoreFormatError, check_store_format

A = b"alpha part bytes"
B = b"bravo " * 100
C = b"charlie"
HA, HB, HC = block_hash(A), block_hash(B), block_hash(C)
SA, SB = share_id(A), share_id(B)  # the same bytes stored as erasure-coded shares


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory (None) under root, relative to root."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = Path(p).read_bytes()
    return out


def files_under(path: Path) -> list[Path]:
    """Files under path, but for the store's own FORMAT file and the parts' outboards."""
    return sorted(
        p for p in path.rglob("*") if p.is_file() and p != path / "FORMAT" and not p.name.endswith(".tree")
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    # Deep enough that a "../.."-style name would still land inside tmp_path if it were used.
    return tmp_path / "a" / "b" / "c" / "store"


@pytest.fixture
def store(root: Path) -> BlockStore:
    return BlockStore(root, capacity=10_000)


def assert_clean(store: BlockStore) -> None:
    """No write in progress has left anything behind."""
    assert list((store.root / "incoming").iterdir()) == []
    assert store.reserved == 0


# --- layout -----------------------------------------------------------------------------------


def test_new_store_creates_its_directories(root: Path) -> None:
    s = BlockStore(root, capacity=100)
    for name in ("blocks", "incoming", "quarantine"):
        assert (root / name).is_dir()
    assert len(s) == 0 and s.used == 0 and s.reserved == 0
    assert s.blocks() == []


def test_addresses_are_blake3_trees() -> None:
    # The address format every agent and client must agree on (docs/protocol.md gives these
    # vectors): the BLAKE3 tree of the bytes bound to their size, 32 bytes, lowercase hex.
    assert block_hash(b"") == "1a62ffe197fd187722792d73cb58abda961013bf7d633fe8167b45b4599dd1f4"
    assert block_hash(b"abc") == "b1de8eeaa8c267632c8dc1ef77a87fc1048829e5b129e9c5180875ee696ed04b"
    # Two leaves: 16384 bytes and one.
    two = bytes(range(256)) * 64 + b"x"
    assert block_hash(two) == "fd957baa58e08a6e1513e72bfb88317cfe4c947999f077a704b9fd33ea9258de"


def test_new_store_records_its_format(root: Path) -> None:
    BlockStore(root, capacity=100)
    assert (root / "FORMAT").read_text() == STORE_FORMAT + "\n"
    assert [p.name for p in root.iterdir() if p.name.startswith(".FORMAT")] == []
    check_store_format(root)
    BlockStore(root, capacity=100)  # and opens again


def old_store(root: Path) -> dict[str, bytes | None]:
    """A store as DSSS 0.1.0 left it: no FORMAT, a part named by BLAKE2b-256."""
    import hashlib

    data = b"a part from before"
    name = hashlib.blake2b(data, digest_size=32).hexdigest()
    d = root / "blocks" / name[:2] / name[2:4]
    d.mkdir(parents=True)
    (d / name).write_bytes(data)
    (root / "incoming").mkdir()
    (root / "incoming" / "half-written").write_bytes(b"x")
    return tree(root)


def test_store_from_before_blake3_refused_and_untouched(root: Path) -> None:
    before = old_store(root)
    with pytest.raises(StoreFormatError, match="BLAKE2b.*Nothing was changed"):
        BlockStore(root, capacity=10_000)
    with pytest.raises(StoreFormatError):
        check_store_format(root)
    assert tree(root) == before


@pytest.mark.parametrize("text", ["dsss-store 3 sha3\n", "", "\x00\xff garbage"])
def test_unknown_store_format_refused_and_untouched(root: Path, text: str) -> None:
    BlockStore(root, capacity=100).put(HA, A)
    (root / "FORMAT").write_text(text, encoding="utf-8", errors="surrogateescape")
    before = tree(root)
    with pytest.raises(StoreFormatError, match="unknown store format"):
        BlockStore(root, capacity=100)
    assert tree(root) == before


def test_old_directory_without_parts_becomes_a_store(root: Path) -> None:
    # An empty blocks/ (a store that never received a part) is not worth refusing.
    (root / "blocks" / "ab" / "cd").mkdir(parents=True)
    s = BlockStore(root, capacity=10_000)
    assert (root / "FORMAT").read_text() == STORE_FORMAT + "\n"
    assert s.put(HA, A) is True


def test_put_get_round_trip(store: BlockStore) -> None:
    assert store.put(HA, A) is True
    assert store.get(HA) == A
    assert store.has(HA) and HA in store
    assert store.size_of(HA) == len(A)
    assert len(store) == 1
    assert store.used == len(A)
    assert store.blocks() == [HA]
    assert_clean(store)


def test_empty_part(store: BlockStore) -> None:
    h = block_hash(b"")
    assert store.put(h, b"") is True
    assert store.get(h) == b""
    assert store.size_of(h) == 0


def test_path_fan_out(store: BlockStore, root: Path) -> None:
    store.put(HA, A)
    expected = root / "blocks" / HA[:2] / HA[2:4] / HA
    assert store.path_of(HA) == expected
    assert expected.read_bytes() == A
    assert files_under(root / "blocks") == [expected]


def test_blocks_are_sorted_and_complete(store: BlockStore) -> None:
    for data in (A, B, C):
        store.put(block_hash(data), data)
    assert store.blocks() == sorted([HA, HB, HC])
    assert store.used == len(A) + len(B) + len(C)


def test_put_existing_returns_false(store: BlockStore, root: Path) -> None:
    assert store.put(HA, A) is True
    before = tree(root)
    assert store.put(HA, A) is False
    assert store.used == len(A)
    assert len(store) == 1
    assert tree(root) == before


def test_put_existing_with_other_bytes_refused(store: BlockStore) -> None:
    store.put(HA, A)
    with pytest.raises(IntegrityError):
        store.put(HA, B)
    assert store.get(HA) == A
    assert store.used == len(A)


def test_unknown_part_not_found(store: BlockStore) -> None:
    with pytest.raises(NotFound):
        store.get(HA)
    with pytest.raises(NotFound):
        store.size_of(HA)
    assert not store.has(HA)
    assert HA not in store
    assert 42 not in store  # type: ignore[operator]


# --- bad hashes -------------------------------------------------------------------------------

BAD_IDS = [
    "",
    "z" * 64,
    HA.upper(),
    HA[:63],
    HA + "0",
    "../..",
    "../../../../etc/passwd",
    "../" * 21 + "x",
    "/" + HA[1:],
    HA[:62] + "/x",
    HA[:2] + "/" + HA[3:],
    HA[:63] + "\n",
    ".." + HA[2:],
    HA[:32] + "\x00" + HA[33:],
    "S" + HA,
    "t" + HA,
    "ss" + HA,
    "s" + HA[:63],
    "s" + HA + "0",
    "s" + HA.upper(),
    "s/" + HA[:63],
    "s../" + HA[:61],
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=repr)
def test_bad_hash_refused_before_any_path(root: Path, bad: str) -> None:
    store = BlockStore(root, capacity=10_000)
    top = root.parent.parent.parent.parent  # tmp_path
    before = tree(top)
    free = store.free
    for call in (
        lambda: store.put(bad, A),
        lambda: store.begin_write(bad, 5),
        lambda: store.get(bad),
        lambda: store.path_of(bad),
        lambda: store.quarantine(bad),
    ):
        with pytest.raises(BadRequest):
            call()
    assert not store.has(bad)
    assert tree(top) == before
    assert store.reserved == 0 and store.free == free


# --- failed writes leave nothing ------------------------------------------------------------


def test_wrong_bytes_for_hash(store: BlockStore, root: Path) -> None:
    with pytest.raises(IntegrityError):
        store.put(HA, B)
    assert not store.has(HA)
    assert store.used == 0 and len(store) == 0
    assert files_under(root) == []
    assert_clean(store)


def test_truncated_write(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HB, len(B))
    w.write(B[:100])
    with pytest.raises(IntegrityError):
        w.commit()
    assert not store.has(HB)
    assert files_under(root) == []
    assert_clean(store)
    with pytest.raises(RuntimeError):
        w.write(B[100:])


def test_commit_with_no_bytes(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HA, len(A))
    with pytest.raises(IntegrityError):
        w.commit()
    assert files_under(root) == []
    assert_clean(store)


def test_more_than_announced_in_one_write(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HA, len(A))
    with pytest.raises(RemoteProtocolError):
        w.write(A + b"!")
    assert files_under(root) == []
    assert_clean(store)
    with pytest.raises(RuntimeError):
        w.commit()


def test_more_than_announced_in_pieces(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HA, len(A))
    w.write(A[:5])
    w.write(A[5:])
    with pytest.raises(RemoteProtocolError):
        w.write(b"x")
    assert not store.has(HA)
    assert files_under(root) == []
    assert_clean(store)


def test_written_in_pieces(store: BlockStore) -> None:
    w = store.begin_write(HB, len(B))
    for i in range(0, len(B), 7):
        w.write(B[i : i + 7])
    assert w.received == len(B)
    assert w.commit() is True
    assert store.get(HB) == B
    assert_clean(store)


def test_part_not_visible_until_commit(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HA, len(A))
    w.write(A)
    assert not store.has(HA)
    assert not store.path_of(HA).exists()
    assert len(list((root / "incoming").iterdir())) == 1
    assert w.commit() is True
    assert store.has(HA)
    assert_clean(store)


def test_abort_removes_the_temporary_file(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HA, len(A))
    w.write(A[:3])
    w.abort()
    assert files_under(root) == []
    assert_clean(store)
    w.abort()  # idempotent
    assert store.reserved == 0


def test_writer_closed_after_commit(store: BlockStore) -> None:
    w = store.begin_write(HA, len(A))
    w.write(A)
    w.commit()
    with pytest.raises(RuntimeError):
        w.write(b"")
    with pytest.raises(RuntimeError):
        w.commit()
    w.abort()  # no effect after commit: the reservation is not released twice
    assert store.reserved == 0
    assert store.get(HA) == A


def test_negative_size_refused(store: BlockStore) -> None:
    with pytest.raises(RemoteProtocolError):
        store.begin_write(HA, -1)
    assert_clean(store)


def test_two_writers_of_the_same_part(store: BlockStore) -> None:
    w1 = store.begin_write(HA, len(A))
    w2 = store.begin_write(HA, len(A))
    w1.write(A)
    w2.write(A)
    assert w1.commit() is True
    assert w2.commit() is False
    assert store.used == len(A)
    assert len(store) == 1
    assert store.get(HA) == A
    assert_clean(store)


# --- capacity -------------------------------------------------------------------------------


def test_capacity_enforced(root: Path) -> None:
    s = BlockStore(root, capacity=len(A) + len(C))
    assert s.free == len(A) + len(C)
    s.put(HA, A)
    assert s.free == len(C)
    with pytest.raises(StorageFull):
        s.put(HB, B)
    assert not s.has(HB)
    assert_clean(s)
    assert s.put(HC, C) is True  # exactly the room that is left
    assert s.free == 0
    with pytest.raises(StorageFull):
        s.begin_write(block_hash(b"x"), 1)
    w = s.begin_write(block_hash(b""), 0)  # zero bytes still fit in a full store
    assert w.commit() is True
    assert s.has(block_hash(b""))


def test_reserved_bytes_count_during_a_write(root: Path) -> None:
    s = BlockStore(root, capacity=1000)
    w = s.begin_write(HB, 600)
    assert s.reserved == 600
    assert s.free == 400
    with pytest.raises(StorageFull):
        s.begin_write(HA, 401)
    w2 = s.begin_write(HA, 400)
    assert s.free == 0
    w2.abort()
    assert s.free == 400
    w.abort()
    assert s.free == 1000
    assert s.reserved == 0


def test_reservation_moves_to_used_on_commit(root: Path) -> None:
    s = BlockStore(root, capacity=1000)
    w = s.begin_write(HB, len(B))
    w.write(B)
    assert s.used == 0 and s.reserved == len(B)
    w.commit()
    assert s.used == len(B) and s.reserved == 0
    assert s.free == 1000 - len(B)


def test_reservation_released_after_failed_commit(root: Path) -> None:
    s = BlockStore(root, capacity=1000)
    w = s.begin_write(HA, len(A))
    w.write(B[: len(A)])
    with pytest.raises(IntegrityError):
        w.commit()
    assert s.free == 1000
    assert s.used == 0


def test_free_bounded_by_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = BlockStore(root, capacity=10**15)
    monkeypatch.setattr(BlockStore, "_disk_free", lambda self: bs_module.DISK_MARGIN + 50)
    assert s.free == 50
    with pytest.raises(StorageFull):
        s.put(HB, B)
    monkeypatch.setattr(BlockStore, "_disk_free", lambda self: 0)
    assert s.free == 0


def test_default_capacity_from_disk(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BlockStore, "_disk_free", lambda self: bs_module.DISK_MARGIN + 5000)
    s = BlockStore(root)
    assert s.capacity == 5000
    s.put(HA, A)
    s2 = BlockStore(root)
    assert s2.capacity == len(A) + 5000


# --- restart ----------------------------------------------------------------------------------


def test_restart_sees_stored_parts(root: Path) -> None:
    s = BlockStore(root, capacity=10_000)
    s.put(HA, A)
    s.put(HB, B)
    s2 = BlockStore(root, capacity=10_000)
    assert s2.blocks() == sorted([HA, HB])
    assert s2.used == len(A) + len(B)
    assert s2.free == 10_000 - len(A) - len(B)
    assert s2.get(HA) == A and s2.get(HB) == B
    assert s2.size_of(HB) == len(B)


def test_restart_removes_leftovers_in_incoming(root: Path) -> None:
    s = BlockStore(root, capacity=10_000)
    s.put(HA, A)
    w = s.begin_write(HB, len(B))
    w.write(B[:10])  # never committed: the process "dies" here
    (root / "incoming" / "junk").write_bytes(b"junk")
    (root / "incoming" / "somedir").mkdir()
    (root / "incoming" / "somedir" / "f").write_bytes(b"x")
    s2 = BlockStore(root, capacity=10_000)
    assert list((root / "incoming").iterdir()) == []
    assert s2.blocks() == [HA]
    assert s2.used == len(A)


def test_restart_ignores_stray_files(root: Path) -> None:
    s = BlockStore(root, capacity=10_000)
    s.put(HA, A)
    # A file with a valid hash name in the wrong fan-out directory, and junk.
    wrong = root / "blocks" / "00" / "00" / HB
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(B)
    (root / "blocks" / HA[:2] / HA[2:4] / "notes.txt").write_bytes(b"hello")
    (root / "blocks" / "README").write_bytes(b"x")
    (root / "blocks" / HA[:2] / "loose").write_bytes(b"x")
    s2 = BlockStore(root, capacity=10_000)
    assert s2.blocks() == [HA]
    assert s2.used == len(A)


# --- corruption on disk ---------------------------------------------------------------------


def test_altered_part_is_quarantined(store: BlockStore, root: Path) -> None:
    store.put(HA, A)
    store.put(HC, C)
    path = store.path_of(HA)
    altered = b"X" + A[1:]
    path.write_bytes(altered)
    with pytest.raises(IntegrityError):
        store.get(HA)
    assert not path.exists()
    q = list((root / "quarantine").iterdir())
    assert len(q) == 1
    assert q[0].name.startswith(HA + ".")
    assert q[0].read_bytes() == altered
    assert not store.has(HA)
    assert store.used == len(C)
    assert store.blocks() == [HC]
    with pytest.raises(NotFound):
        store.get(HA)
    assert store.get(HC) == C


def test_truncated_part_on_disk_is_quarantined(store: BlockStore, root: Path) -> None:
    store.put(HB, B)
    store.path_of(HB).write_bytes(B[:-1])
    with pytest.raises(IntegrityError):
        store.get(HB)
    assert not store.has(HB)
    assert store.used == 0
    assert len(list((root / "quarantine").iterdir())) == 1


def test_quarantined_part_not_seen_after_restart(store: BlockStore, root: Path) -> None:
    store.put(HA, A)
    store.path_of(HA).write_bytes(B)
    with pytest.raises(IntegrityError):
        store.get(HA)
    s2 = BlockStore(root, capacity=10_000)
    assert not s2.has(HA)
    assert s2.used == 0


def test_part_removed_behind_our_back(store: BlockStore) -> None:
    store.put(HA, A)
    store.path_of(HA).unlink()
    with pytest.raises(NotFound):
        store.get(HA)
    assert not store.has(HA)
    assert store.used == 0


def test_part_can_be_stored_again_after_quarantine(store: BlockStore) -> None:
    store.put(HA, A)
    store.path_of(HA).write_bytes(B)
    with pytest.raises(IntegrityError):
        store.get(HA)
    assert store.put(HA, A) is True
    assert store.get(HA) == A
    assert store.used == len(A)


def test_verify_all(store: BlockStore, root: Path) -> None:
    for data in (A, B, C):
        store.put(block_hash(data), data)
    assert store.verify_all() == []
    store.path_of(HB).write_bytes(b"rot" + B[3:])
    store.path_of(HC).unlink()
    assert store.verify_all() == [HB]
    assert store.blocks() == [HA]
    assert store.used == len(A)
    assert len(list((root / "quarantine").iterdir())) == 1
    assert store.verify_all() == []


# --- disk full --------------------------------------------------------------------------------


class _FailingFile:
    """Wraps a real file; write (or fsync through fileno) fails with the given errno."""

    def __init__(self, f: Any, err: int) -> None:
        self._f = f
        self._err = err

    def write(self, data: bytes) -> int:
        raise OSError(self._err, os.strerror(self._err))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_during_write(store: BlockStore, root: Path, err: int) -> None:
    w = store.begin_write(HB, len(B))
    w._f = _FailingFile(w._f, err)  # type: ignore[assignment]
    with pytest.raises(StorageFull):
        w.write(B)
    assert not store.has(HB)
    assert files_under(root) == []
    assert_clean(store)


def test_disk_full_during_put(store: BlockStore, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def failing_open(*args: Any, **kw: Any) -> Any:
        return _FailingFile(real_open(*args, **kw), errno.ENOSPC)

    monkeypatch.setattr(bs_module, "open", failing_open, raising=False)
    with pytest.raises(StorageFull):
        store.put(HB, B)
    assert not store.has(HB)
    assert store.used == 0
    assert files_under(root) == []
    assert_clean(store)


def test_other_os_error_during_write_propagates(store: BlockStore, root: Path) -> None:
    w = store.begin_write(HB, len(B))
    w._f = _FailingFile(w._f, errno.EIO)  # type: ignore[assignment]
    with pytest.raises(OSError) as e:
        w.write(B)
    assert e.value.errno == errno.EIO
    assert not isinstance(e.value, StorageFull)
    assert files_under(root) == []
    assert_clean(store)


class _FullAtFlush:
    """Wraps a real file; buffered writes succeed, flushing them fails with ENOSPC."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def test_disk_full_when_buffered_bytes_are_flushed(store: BlockStore, root: Path) -> None:
    """Writes are buffered: a full disk may show only at commit, and still leaves nothing."""
    store.put(HA, A)
    w = store.begin_write(HB, len(B))
    w._f = _FullAtFlush(w._f)  # type: ignore[assignment]
    w.write(B)
    with pytest.raises(StorageFull):
        w.commit()
    assert not store.has(HB)
    assert files_under(root) == [store.path_of(HA)]
    assert store.used == len(A)
    assert_clean(store)


def test_disk_full_at_fsync(store: BlockStore, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.put(HA, A)
    w = store.begin_write(HB, len(B))
    w.write(B)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bs_module.os, "fsync", no_space)
    with pytest.raises(StorageFull):
        w.commit()
    monkeypatch.undo()
    assert not store.has(HB)
    assert files_under(root) == [store.path_of(HA)]
    assert store.used == len(A)
    assert_clean(store)


# --- shares -----------------------------------------------------------------------------------


def test_share_round_trip_fanned_out_by_its_hash(store: BlockStore, root: Path) -> None:
    assert store.put(SA, A) is True
    expected = root / "blocks" / HA[:2] / HA[2:4] / SA
    assert store.path_of(SA) == expected and expected.read_bytes() == A
    assert store.get(SA) == A and store.size_of(SA) == len(A)
    assert store.has(SA) and not store.has(HA)
    assert store.put(SA, A) is False
    assert_clean(store)


def test_share_written_in_pieces(store: BlockStore) -> None:
    w = store.begin_write(SB, len(B))
    for i in range(0, len(B), 7):
        w.write(B[i : i + 7])
    assert w.commit() is True
    assert store.get(SB) == B
    assert_clean(store)


def test_share_and_plain_part_of_the_same_bytes_are_two_entries(store: BlockStore, root: Path) -> None:
    store.put(HA, A)
    store.put(SA, A)
    assert store.blocks() == sorted([HA, SA])
    assert store.used == 2 * len(A)
    assert files_under(root / "blocks") == sorted([root / "blocks" / HA[:2] / HA[2:4] / HA,
                                                   root / "blocks" / HA[:2] / HA[2:4] / SA])


@pytest.mark.parametrize("pieces", [False, True], ids=["put", "writer"])
def test_share_refused_unless_blake3_of_its_bytes_is_its_hash(
    store: BlockStore, root: Path, pieces: bool
) -> None:
    for block, data in ((SA, B), (SA, A[:-1] + b"?"), ("s" + block_hash(b"s" + A), A)):
        with pytest.raises(IntegrityError):
            if pieces:
                w = store.begin_write(block, len(data))
                w.write(data)
                w.commit()
            else:
                store.put(block, data)
        assert not store.has(block)
    assert files_under(root / "blocks") == []
    assert_clean(store)


def test_stored_share_refuses_other_bytes(store: BlockStore) -> None:
    store.put(SA, A)
    with pytest.raises(IntegrityError):
        store.put(SA, B)
    assert store.get(SA) == A


def test_restart_lists_shares_and_plain_parts(root: Path) -> None:
    s = BlockStore(root, capacity=10_000)
    s.put(HA, A)
    s.put(SB, B)
    # A share in the fan-out of its ID's first characters ("s" and the hash) is a stray file.
    wrong = root / "blocks" / SA[:2] / SA[2:4] / SA
    wrong.parent.mkdir(parents=True)
    wrong.write_bytes(A)
    s2 = BlockStore(root, capacity=10_000)
    assert s2.blocks() == sorted([HA, SB])
    assert s2.used == len(A) + len(B)
    assert s2.get(SB) == B and s2.get(HA) == A


def test_rotten_share_is_quarantined_and_scrubbed(store: BlockStore, root: Path) -> None:
    from dsss.agent.scrub import Scrubber

    store.put(SA, A)
    store.put(SB, B)
    store.put(HC, C)
    store.path_of(SB).write_bytes(b"rot" + B[3:])
    found: list[str] = []
    scrubber = Scrubber(store, found.append)
    assert scrubber.step(len(A) + len(B) + len(C)) == len(A) + len(B) + len(C)  # one pass
    assert found == [SB] and scrubber.checked == 2 and scrubber.corrupt == 1
    assert store.blocks() == sorted([SA, HC])
    (q,) = (root / "quarantine").iterdir()
    assert q.name.startswith(SB + ".")
    store.path_of(SA).write_bytes(B)
    assert store.verify_all() == [SA]
    assert store.blocks() == [HC]


def test_part_paths_and_format(root: Path) -> None:
    """FORMAT names the tree address scheme; a plain part is at blocks/<id[:2]>/<id[2:4]>/<id>,
    its outboard beside it."""
    store = BlockStore(root, capacity=10_000)
    store.put(HA, A)
    assert (root / "FORMAT").read_text() == "dsss-store 3 blake3-tree\n" and STORE_FORMAT == "dsss-store 3 blake3-tree"
    where = root / "blocks" / HA[:2] / HA[2:4]
    assert files_under(root / "blocks") == [where / HA]
    assert sorted((root / "blocks").rglob("*.tree")) == [where / (HA + ".tree")]


# --- the page cache -----------------------------------------------------------------------------


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache (mincore(2) on a mapping, which reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            vec = ctypes.create_string_buffer(pages)
            assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
            return sum(b & 1 for b in vec.raw)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)


@pytest.fixture
def drops_cache(tmp_path: Path) -> None:
    """Skip where this filesystem keeps a file's pages after POSIX_FADV_DONTNEED (tmpfs), or
    where mincore or posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise") or os.uname().sysname != "Linux":
        pytest.skip("needs Linux posix_fadvise and mincore")
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(1 << 20))
    with open(probe, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if _resident_pages(probe) > 16:
        pytest.skip("this filesystem keeps pages after POSIX_FADV_DONTNEED (tmpfs?)")
    probe.unlink()


def test_stored_parts_leave_the_page_cache(root: Path, drops_cache: None) -> None:
    """An agent keeps other people's parts: once a part is on disk its pages are let go, so a
    busy agent does not fill its host's memory with them. A read for a download keeps its pages;
    the scrub's read (every part in turn) does not."""
    store = BlockStore(root, capacity=100 << 20)
    data = os.urandom(4 << 20)
    block = block_hash(data)
    assert store.put(block, data)
    path = store.path_of(block)
    assert _resident_pages(path) <= 16  # of 1024
    assert store.get(block) == data
    assert _resident_pages(path) >= 1000
    assert store.get(block, keep_cached=False) == data
    assert _resident_pages(path) <= 16


def test_the_scrub_leaves_the_page_cache_as_it_was(root: Path, drops_cache: None) -> None:
    from dsss.agent.scrub import Scrubber

    store = BlockStore(root, capacity=100 << 20)
    parts = [os.urandom(1 << 20) for _ in range(3)]
    for data in parts:
        store.put(block_hash(data), data)
    found: list[str] = []
    assert Scrubber(store, found.append).step(3 << 20) == 3 << 20  # each part read once
    assert found == []
    assert all(_resident_pages(store.path_of(block_hash(d))) <= 4 for d in parts)


# --- older formats --------------------------------------------------------------------------------


def format2_store(root: Path, *, with_part: bool = True) -> dict[str, bytes | None]:
    """A store as the previous version left it: FORMAT 2, parts named by plain BLAKE3."""
    import blake3

    root.mkdir(parents=True)
    (root / "FORMAT").write_text("dsss-store 2 blake3\n")
    for name in ("blocks", "incoming", "quarantine"):
        (root / name).mkdir()
    if with_part:
        name = blake3.blake3(A).hexdigest()
        d = root / "blocks" / name[:2] / name[2:4]
        d.mkdir(parents=True)
        (d / name).write_bytes(A)
    return tree(root)


@pytest.mark.parametrize("with_part", [True, False])
def test_format_2_store_refused_and_untouched(root: Path, with_part: bool) -> None:
    before = format2_store(root, with_part=with_part)
    with pytest.raises(StoreFormatError, match=r"older DSSS.*plain BLAKE3.*Nothing was changed.*--storage"):
        BlockStore(root, capacity=10_000)
    with pytest.raises(StoreFormatError, match="dsss-store 2 blake3"):
        check_store_format(root)
    assert tree(root) == before


# --- the outboard and proofs ----------------------------------------------------------------------

LEAF = proofs.LEAF_SIZE
BIG = bytes(range(256)) * (5 * LEAF // 256) + b"tail bytes"  # five full leaves and a short one
HBIG = block_hash(BIG)


@pytest.fixture
def big_store(root: Path) -> BlockStore:
    s = BlockStore(root, capacity=10 * len(BIG))
    s.put(HBIG, BIG)
    return s


def _nonce(index: int) -> bytes:
    return index.to_bytes(16, "big")


def test_outboard_is_written_beside_every_part(big_store: BlockStore) -> None:
    ob = big_store.outboard_path_of(HBIG)
    assert ob.read_bytes() == proofs.TreeHasher(BIG).outboard()
    assert proofs.check_outboard(HBIG, len(BIG), ob.read_bytes())
    big_store.put(SA, A)
    assert big_store.outboard_path_of(SA).read_bytes() == proofs.TreeHasher(A).outboard()
    assert_clean(big_store)


@pytest.mark.parametrize("data", [b"", b"x", A, B, BIG, BIG[: 2 * LEAF], BIG[: LEAF + 1]])
def test_proof_of_every_leaf_verifies(root: Path, data: bytes) -> None:
    store = BlockStore(root, capacity=10 * len(BIG))
    for block in (block_hash(data), share_id(data)):
        store.put(block, data)
        for index in range(proofs.leaf_count(len(data))):
            size, proof = store.proof(block, _nonce(index))
            assert size == len(data)
            proofs.verify(block, size, _nonce(index), proof)


def test_proof_reads_one_leaf_and_the_siblings(big_store: BlockStore, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        reads.append(len(data))
        return data

    monkeypatch.setattr(bs_module.os, "pread", counting_pread)
    size, proof = big_store.proof(HBIG, _nonce(2))
    assert sum(reads) == len(proof) == LEAF + 32 * proofs.depth(size, 2)
    assert len(reads) == 1 + proofs.depth(size, 2)


def test_proof_of_a_part_not_stored(big_store: BlockStore) -> None:
    with pytest.raises(NotFound):
        big_store.proof(HA, _nonce(0))


def test_rot_elsewhere_in_the_part_does_not_fail_a_proof_of_a_sound_leaf(big_store: BlockStore) -> None:
    """The holder reads only the challenged leaf; the scrub, not the audit, finds other rot."""
    path = big_store.path_of(HBIG)
    raw = bytearray(path.read_bytes())
    raw[4 * LEAF] ^= 1
    path.write_bytes(bytes(raw))
    size, proof = big_store.proof(HBIG, _nonce(1))
    proofs.verify(HBIG, size, _nonce(1), proof)


def test_proof_of_a_rotten_leaf_quarantines_the_part(big_store: BlockStore, root: Path) -> None:
    path = big_store.path_of(HBIG)
    raw = bytearray(path.read_bytes())
    raw[3 * LEAF + 5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="quarantine"):
        big_store.proof(HBIG, _nonce(3))
    assert not big_store.has(HBIG) and big_store.used == 0
    assert not path.exists() and not big_store.outboard_path_of(HBIG).exists()
    (q,) = (root / "quarantine").iterdir()
    assert q.read_bytes() == bytes(raw)


def test_truncated_part_fails_its_proof(big_store: BlockStore) -> None:
    path = big_store.path_of(HBIG)
    path.write_bytes(BIG[:-3])
    with pytest.raises(IntegrityError):
        big_store.proof(HBIG, _nonce(5))
    assert not big_store.has(HBIG)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "empty"])
def test_damaged_outboard_is_rebuilt_and_the_part_kept(big_store: BlockStore, damage: str) -> None:
    ob = big_store.outboard_path_of(HBIG)
    good = ob.read_bytes()
    if damage == "flip":  # a hash the proof of leaf 0 reads
        at = proofs.sibling_nodes(len(BIG), 0)[-1] * 32
        ob.write_bytes(good[:at] + bytes([good[at] ^ 1]) + good[at + 1 :])
    elif damage == "truncate":
        ob.write_bytes(good[:-32])
    elif damage == "delete":
        ob.unlink()
    else:
        ob.write_bytes(b"")
    size, proof = big_store.proof(HBIG, _nonce(0))
    proofs.verify(HBIG, size, _nonce(0), proof)
    assert big_store.has(HBIG) and ob.read_bytes() == good
    assert_clean(big_store)


def test_stray_outboard_is_removed_and_outboards_are_not_parts(big_store: BlockStore, root: Path) -> None:
    stray = big_store.outboard_path_of(HA)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"left by a write that stopped")
    s2 = BlockStore(root, capacity=10 * len(BIG))
    assert s2.blocks() == [HBIG] and s2.used == len(BIG)
    assert not stray.exists() and s2.outboard_path_of(HBIG).exists()


def test_scrub_still_checks_whole_parts(big_store: BlockStore) -> None:
    path = big_store.path_of(HBIG)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    assert big_store.verify_all() == [HBIG]
    assert not big_store.outboard_path_of(HBIG).exists()
