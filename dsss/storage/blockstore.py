# -*- test-case-name: tests.unit.test_blockstore -*-
"""A content-addressed block store on the local file system.

Layout under the storage directory:

    FORMAT                    the store's format and address hash: "dsss-store 2 blake3"
    blocks/ab/cd/abcd...      one file per part, named by BLAKE3 of its bytes (lowercase hex)
    blocks/ab/cd/sabcd...     one file per share, named by its share ID ("s" and BLAKE3 of its
                              bytes), fanned out by the hash like a part
    incoming/                 parts being written; never visible as blocks
    quarantine/               parts whose bytes no longer match their hash (bit rot), moved aside

A write goes to incoming/, is hashed as it arrives, is checked for size and hash, fsynced and only
then renamed into blocks/ (and the directory fsynced), so a part is either wholly there or absent.
A hash that is not a part ID (64 lowercase hex characters, or a share ID: "s" and 64) is refused
before any path is built. A share is checked against BLAKE3 of its bytes (the ID's hash part)
exactly as a part is. A plain ID's path is the one it had before share IDs existed, so FORMAT
did not change with them.

A store made before FORMAT existed (DSSS 0.1.0) names its parts by BLAKE2b-256; the parts of such
a store cannot be checked against BLAKE3 addresses, so it is refused as it is (StoreFormatError)
rather than scrubbed into quarantine.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from twisted.logger import Logger

from dsss.errors import DSSSError, IntegrityError, NotFound, RemoteProtocolError, StorageFull
from dsss.model import block_hasher, check_block_id, content_hash, is_block_id, matches

log = Logger()

# Room always kept free on the disk beyond what we account for (metadata, directories).
DISK_MARGIN = 1024 * 1024


STORE_FORMAT = "dsss-store 2 blake3"
"""The first line of FORMAT in a store this version reads and writes."""


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
        if first != STORE_FORMAT:
            raise StoreFormatError(
                f"{root}: unknown store format {first[:80]!r} in FORMAT (this version reads {STORE_FORMAT!r})"
            )
        return
    blocks = root / "blocks"
    if blocks.is_dir() and any(_block_files(blocks)):
        raise StoreFormatError(
            f"{root}: this store was made by DSSS 0.1.0, whose parts are named by BLAKE2b-256; this "
            f"version names parts by BLAKE3 and cannot check them. Nothing was changed: run this "
            f"agent with a new --storage directory"
        )


def _block_files(blocks: Path) -> Iterator[Path]:
    for first in blocks.iterdir():
        if first.is_dir():
            for second in first.iterdir():
                if second.is_dir():
                    yield from second.iterdir()


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

    def _scan(self) -> Iterator[tuple[str, int]]:
        for first in self._blocks.iterdir():
            if not first.is_dir():
                continue
            for second in first.iterdir():
                if not second.is_dir():
                    continue
                for f in second.iterdir():
                    name = f.name
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
        path = self.path_of(block)
        dest = self._quarantine / f"{block}.{secrets.token_hex(4)}"
        try:
            os.replace(path, dest)
            log.warn("part {block} failed its hash check and was quarantined", block=block)
        except FileNotFoundError:
            pass
        self._forget(block)

    def _forget(self, block: str) -> None:
        size = self._sizes.pop(block, None)
        if size is not None:
            self.used -= size

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
    """One part being written: bytes go to a temporary file under incoming/ while being hashed."""

    def __init__(self, store: BlockStore, block: str, size: int) -> None:
        self._store = store
        self.block = block
        self._expected = content_hash(block)  # BLAKE3 of the bytes, for a part or a share ID
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
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, final)
            _fsync_dir(final.parent)
        except OSError as e:
            self._tmp.unlink(missing_ok=True)
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
