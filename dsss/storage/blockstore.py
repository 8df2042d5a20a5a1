# -*- test-case-name: tests.unit.test_blockstore -*-
"""A content-addressed block store on the local file system.

Layout under the storage directory:

    FORMAT                    the store's format and address scheme: "dsss-store 3 blake3-tree"
    blocks/ab/cd/abcd...      one file per part, named by its address (dsss/proofs.py: the BLAKE3
                              tree of its bytes, lowercase hex)
    blocks/ab/cd/abcd....tree its outboard: every node hash of that tree (proofs.outboard_length)
    blocks/ab/cd/sabcd...     one file per share, named by its share ID ("s" and the address of
                              the share's bytes), fanned out by the address like a part, with its
                              outboard beside it likewise
    incoming/                 parts being written; never visible as blocks
    quarantine/               parts whose bytes no longer match their address (bit rot), moved aside
                              (their outboards are deleted: they are derived from the parts)

A write goes to incoming/, is hashed as it arrives (the tree, whose hashes become the outboard),
is checked for size and address, fsynced and only then renamed into blocks/ (the outboard first,
then the part, and the directory fsynced), so a part is either wholly there or absent. A hash that
is not a part ID (64 lowercase hex characters, or a share ID: "s" and 64) is refused before any
path is built.

The outboard lets the store answer a storage challenge (`proof`) by reading one leaf of the part
and a logarithmic number of hashes, never the whole part. A part whose outboard is missing has it
rebuilt from the part (checked against its address) the first time it is needed.

A store of an older format is refused as it is (StoreFormatError), nothing in it changed: one
made before FORMAT existed (DSSS 0.1.0) names its parts by BLAKE2b-256, and one of format
"dsss-store 2 blake3" by plain BLAKE3 of their bytes; neither can be checked against, or proven
for, tree addresses.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from twisted.logger import Logger

from dsss import proofs
from dsss.errors import DSSSError, IntegrityError, NotFound, RemoteProtocolError, StorageFull
from dsss.model import block_hasher, check_block_id, content_hash, is_block_id, matches

log = Logger()

# Room always kept free on the disk beyond what we account for (metadata, directories).
DISK_MARGIN = 1024 * 1024


STORE_FORMAT = "dsss-store 3 blake3-tree"
"""The first line of FORMAT in a store this version reads and writes."""

OLD_FORMATS = {"dsss-store 2 blake3": "plain BLAKE3 of their bytes"}
"""Formats of older DSSS versions, and how they name parts."""

OUTBOARD_SUFFIX = ".tree"
"""What a part's outboard file adds to the part's file name."""


class StoreFormatError(DSSSError):
    """The storage directory holds a store this version cannot use; nothing in it was changed."""

    exit_code = 2
    code = "store-format"


def check_store_format(root: str | os.PathLike[str]) -> None:
    """Raise StoreFormatError unless `root` is a store of STORE_FORMAT, or holds no parts yet.

    Reads only: an empty or new directory passes (BlockStore writes FORMAT into it).
    """
    root = Path(root)
    fmt = root / "FORMAT"
    try:
        text = fmt.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        text = None
    except OSError as e:
        raise StoreFormatError(f"{fmt}: cannot read the store's format: {e}") from None
    if text is not None:
        first = text.splitlines()[0].strip() if text.strip() else ""
        if first in OLD_FORMATS:
            raise StoreFormatError(
                f"{root}: this store ({first!r}) was made by an older DSSS, which names parts by "
                f"{OLD_FORMATS[first]}; this version names them by BLAKE3 trees ({STORE_FORMAT!r}) "
                f"and cannot check or prove them. Nothing was changed: run this agent with a new, "
                f"empty --storage directory (its files' owners store them again with this version)"
            )
        if first != STORE_FORMAT:
            raise StoreFormatError(
                f"{root}: unknown store format {first[:80]!r} in FORMAT (this version reads {STORE_FORMAT!r})"
            )
        return
    blocks = root / "blocks"
    if blocks.is_dir() and any(_block_files(blocks)):
        raise StoreFormatError(
            f"{root}: this store was made by DSSS 0.1.0, whose parts are named by BLAKE2b-256; this "
            f"version names parts by BLAKE3 trees and cannot check them. Nothing was changed: run "
            f"this agent with a new --storage directory"
        )


def _block_files(blocks: Path) -> Iterator[Path]:
    for first in blocks.iterdir():
        if first.is_dir():
            for second in first.iterdir():
                if second.is_dir():
                    yield from second.iterdir()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_format(root: Path) -> None:
    tmp = root / f".FORMAT.{secrets.token_hex(4)}"
    with open(tmp, "x", encoding="utf-8") as f:
        f.write(STORE_FORMAT + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "FORMAT")
    _fsync_dir(root)


def _drop_cached(fd: int) -> None:
    """Let the kernel drop a file's pages from the page cache (they are on disk): an agent keeps
    other people's parts, which it seldom reads again soon, and should not fill its host's cache
    with them (HDFS's drop-behind). A no-op where posix_fadvise is missing."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlockStore:
    """Parts on disk, addressed by the hash of their bytes, with a capacity limit."""

    def __init__(self, root: str | os.PathLike[str], capacity: int | None = None) -> None:
        self.root = Path(root)
        self._blocks = self.root / "blocks"
        self._incoming = self.root / "incoming"
        self._quarantine = self.root / "quarantine"
        self.root.mkdir(parents=True, exist_ok=True)
        check_store_format(self.root)
        if not (self.root / "FORMAT").exists():
            _write_format(self.root)
        for d in (self._blocks, self._incoming, self._quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._clean_incoming()
        self._sizes: dict[str, int] = {}
        for block, size in self._scan():
            self._sizes[block] = size
        self.used = sum(self._sizes.values())
        self.reserved = 0
        if capacity is None:
            capacity = self.used + max(0, self._disk_free() - DISK_MARGIN)
        self.capacity = capacity

    # --- inspection ----------------------------------------------------------------------------

    def _disk_free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @property
    def free(self) -> int:
        """Bytes that can still be accepted: capacity left, bounded by the disk's real free space."""
        by_capacity = self.capacity - self.used - self.reserved
        by_disk = self._disk_free() - DISK_MARGIN - self.reserved
        return max(0, min(by_capacity, by_disk))

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, block: object) -> bool:
        return isinstance(block, str) and block in self._sizes

    def has(self, block: str) -> bool:
        return block in self._sizes

    def size_of(self, block: str) -> int:
        try:
            return self._sizes[block]
        except KeyError:
            raise NotFound(f"no part {block}") from None

    def blocks(self) -> list[str]:
        return sorted(self._sizes)

    def path_of(self, block: str) -> Path:
        h = content_hash(block)  # BadRequest unless a part ID: no path is built from anything else
        return self._blocks / h[:2] / h[2:4] / block

    def outboard_path_of(self, block: str) -> Path:
        """Where the part's outboard (its tree's node hashes) is kept, beside the part."""
        path = self.path_of(block)
        return path.with_name(path.name + OUTBOARD_SUFFIX)

    def _scan(self) -> Iterator[tuple[str, int]]:
        for first in self._blocks.iterdir():
            if not first.is_dir():
                continue
            for second in first.iterdir():
                if not second.is_dir():
                    continue
                for f in second.iterdir():
                    name = f.name
                    if name.endswith(OUTBOARD_SUFFIX):
                        part = name[: -len(OUTBOARD_SUFFIX)]
                        if is_block_id(part) and not (second / part).exists():
                            # Left by a write that stopped between its two renames.
                            log.info("removing the outboard of a part not stored: {name}", name=name)
                            f.unlink(missing_ok=True)
                        continue
                    if (
                        is_block_id(name)
                        and (h := content_hash(name))[:2] == first.name
                        and h[2:4] == second.name
                    ):
                        yield name, f.stat().st_size
                    else:
                        log.warn("ignoring stray file {path} in the store", path=str(f))

    def _clean_incoming(self) -> None:
        for f in self._incoming.iterdir():
            log.info("removing unfinished upload {name}", name=f.name)
            try:
                f.unlink()
            except IsADirectoryError:
                shutil.rmtree(f, ignore_errors=True)

    # --- reading -------------------------------------------------------------------------------

    def get(self, block: str, *, keep_cached: bool = True) -> bytes:
        """The part's bytes, verified against its hash.

        A part whose bytes no longer match is moved to quarantine/, forgotten, and IntegrityError
        is raised: corrupt bytes are never returned. With C{keep_cached=False} (the scrub, which
        reads every part in turn) its pages are dropped from the page cache after the read.
        """
        path = self.path_of(block)
        if block not in self._sizes:
            raise NotFound(f"no part {block}")
        try:
            with open(path, "rb") as f:
                data = f.read()
                if not keep_cached:
                    _drop_cached(f.fileno())
        except FileNotFoundError:
            self._forget(block)
            raise NotFound(f"no part {block}") from None
        if not matches(block, data):
            self.quarantine(block)
            raise IntegrityError(f"part {block} is corrupt on disk; moved to quarantine")
        return data

    def quarantine(self, block: str) -> None:
        """Move the part aside (its outboard, derived from it, is deleted) and forget it."""
        path = self.path_of(block)
        dest = self._quarantine / f"{block}.{secrets.token_hex(4)}"
        try:
            os.replace(path, dest)
            log.warn("part {block} failed its hash check and was quarantined", block=block)
        except FileNotFoundError:
            pass
        self.outboard_path_of(block).unlink(missing_ok=True)
        self._forget(block)

    def remove(self, block: str) -> int:
        """Delete a stored part and its outboard (garbage collection); returns the bytes freed
        (0 if it was not stored). The part goes first, then its outboard, then the directory
        is fsynced: a crash leaves either the part whole or nothing but an outboard that the
        next start removes."""
        size = self._sizes.get(block)
        if size is None:
            return 0
        path = self.path_of(block)
        path.unlink(missing_ok=True)
        self.outboard_path_of(block).unlink(missing_ok=True)
        _fsync_dir(path.parent)
        self._forget(block)
        return size

    def _forget(self, block: str) -> None:
        size = self._sizes.pop(block, None)
        if size is not None:
            self.used -= size

    # --- proving -------------------------------------------------------------------------------

    def read_proof(self, block: str, nonce: bytes) -> tuple[int, bytes]:
        """The part's size and a proof that the store holds it, for the challenge `nonce`
        (dsss/proofs.py), read from one leaf of the part and its sibling hashes in the outboard
        and checked before it is returned.

        Reads only and changes nothing, so it may run on another thread than the one that
        writes. NotFound if the part is not stored; ProofError if the part or its outboard is
        damaged or missing (`proof` then sorts out which, and repairs or quarantines).
        """
        size = self.size_of(block)
        index = proofs.challenge_index(size, nonce)
        start, end = proofs.leaf_range(size, index)
        try:
            fd = os.open(self.path_of(block), os.O_RDONLY)
        except FileNotFoundError:
            raise proofs.ProofError(f"part {block} is missing on disk") from None
        try:
            leaf = os.pread(fd, end - start, start)
            _drop_cached(fd)
        finally:
            os.close(fd)
        try:
            fd = os.open(self.outboard_path_of(block), os.O_RDONLY)
        except FileNotFoundError:
            raise proofs.ProofError(f"part {block} has no outboard") from None
        try:
            if os.fstat(fd).st_size != proofs.outboard_length(size):
                raise proofs.ProofError(f"part {block} has a damaged outboard")
            siblings = [
                os.pread(fd, proofs.HASH_SIZE, p * proofs.HASH_SIZE) for p in proofs.sibling_nodes(size, index)
            ]
        finally:
            os.close(fd)
        proof = proofs.prove(size, index, leaf, siblings)
        proofs.verify(content_hash(block), size, nonce, proof)
        return size, proof

    def proof(self, block: str, nonce: bytes) -> tuple[int, bytes]:
        """`read_proof`, and if the part or its outboard turns out damaged: a part missing on
        disk is forgotten (NotFound); a corrupt part is moved to quarantine, forgotten, and
        IntegrityError raised (the caller reports it gone); a sound part whose outboard is
        damaged gets it rebuilt and is proven from it. Blocking file I/O (the whole part, in
        the rare repair): call it where that is acceptable.
        """
        try:
            return self.read_proof(block, nonce)
        except proofs.ProofError:
            pass
        if not self.path_of(block).exists():
            self._forget(block)
            raise NotFound(f"no part {block}")
        self._rebuild_outboard(block)  # checks the part whole: IntegrityError if it is corrupt
        try:
            return self.read_proof(block, nonce)
        except proofs.ProofError:
            self.quarantine(block)
            raise IntegrityError(f"part {block} is corrupt on disk; moved to quarantine") from None

    def _rebuild_outboard(self, block: str) -> None:
        """Write the outboard of a stored part that has none, from its (checked) bytes."""
        data = self.get(block, keep_cached=False)  # IntegrityError (quarantined) if corrupt
        tree = proofs.TreeHasher(data)
        tmp = self._incoming / f"{block}{OUTBOARD_SUFFIX}.{secrets.token_hex(8)}"
        _write_synced(tmp, tree.outboard())
        os.replace(tmp, self.outboard_path_of(block))
        log.info("rebuilt the outboard of part {block}", block=block)

    def verify_all(self) -> list[str]:
        """Check every part's hash; quarantine and return the corrupt ones."""
        bad = []
        for block in self.blocks():
            try:
                self.get(block, keep_cached=False)
            except IntegrityError:
                bad.append(block)
            except NotFound:
                pass
        return bad

    # --- writing -------------------------------------------------------------------------------

    def begin_write(self, block: str, size: int) -> "BlockWriter":
        """Reserve room for a part and open a writer for it; StorageFull if there is none."""
        check_block_id(block)
        if size < 0:
            raise RemoteProtocolError("negative size")
        if size > self.free:
            raise StorageFull(f"no room for {size} bytes (free: {self.free})")
        return BlockWriter(self, block, size)

    def put(self, block: str, data: bytes) -> bool:
        """Store bytes in one call; returns False if the part was already stored."""
        if self.has(block):
            if block_hash_matches(data, block):
                return False
            raise IntegrityError("bytes do not match their hash")
        w = self.begin_write(block, len(data))
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        return w.commit()


def block_hash_matches(data: bytes, block: str) -> bool:
    return matches(block, data)


WRITE_BUFFER = 1024 * 1024
"""Bytes buffered by a part being written before they go to the file."""

class BlockWriter:
    """One part being written: bytes go to a temporary file under incoming/ while being hashed
    into the tree whose address names the part and whose hashes become its outboard."""

    def __init__(self, store: BlockStore, block: str, size: int) -> None:
        self._store = store
        self.block = block
        self._expected = content_hash(block)  # the address of the bytes, for a part or a share ID
        self.size = size
        self.received = 0
        self._hash = block_hasher()
        self._tmp = store._incoming / f"{block}.{secrets.token_hex(8)}"
        # A large buffer: QUIC hands over ~16 KB chunks, one write(2) per MiB is enough.
        self._f = open(self._tmp, "xb", buffering=WRITE_BUFFER)
        self._open = True
        store.reserved += size

    def write(self, data: bytes) -> None:
        if not self._open:
            raise RuntimeError("writer is closed")
        if self.received + len(data) > self.size:
            self.abort()
            raise RemoteProtocolError(f"more bytes than the announced {self.size}")
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("disk full") from None
            raise
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> bool:
        """Verify size and hash, then make the part visible atomically.

        Returns True if the part was stored, False if it was already there. Raises
        IntegrityError (truncated or wrong bytes) or StorageFull; in every failure nothing is
        left behind and nothing stored before is touched.
        """
        if not self._open:
            raise RuntimeError("writer is closed")
        if self.received != self.size:
            self.abort()
            raise IntegrityError(f"truncated: got {self.received} of {self.size} bytes")
        if self._hash.hexdigest() != self._expected:
            self.abort()
            raise IntegrityError("bytes do not match their hash")
        store = self._store
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            _drop_cached(self._f.fileno())  # written through: its pages need not stay in memory
            self._f.close()
        except OSError as e:
            self.abort()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("disk full") from None
            raise
        self._open = False
        store.reserved -= self.size
        if store.has(self.block):
            self._tmp.unlink(missing_ok=True)
            return False
        final = store.path_of(self.block)
        tree_tmp = self._tmp.with_name(self._tmp.name + OUTBOARD_SUFFIX)
        try:
            _write_synced(tree_tmp, self._hash.outboard())
            final.parent.mkdir(parents=True, exist_ok=True)
            # The outboard first: a part is never visible without it.
            os.replace(tree_tmp, store.outboard_path_of(self.block))
            os.replace(self._tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
            tree_tmp.unlink(missing_ok=True)
            if not final.exists():
                store.outboard_path_of(self.block).unlink(missing_ok=True)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull("disk full") from None
            raise
        store._sizes[self.block] = self.size
        store.used += self.size
        return True

    def abort(self) -> None:
        if not self._open:
            return
        self._open = False
        self._store.reserved -= self.size
        try:
            self._f.close()
        except OSError:
            pass
        self._tmp.unlink(missing_ok=True)
