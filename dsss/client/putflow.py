# -*- test-case-name: tests.integration.test_client -*-
"""put: encrypt a file, store its parts and then its manifest, and lease them. No parsing, no sockets.

A file's parts are stored a bounded window at a time (`put_window`); a small file travels inside
its manifest. The manifest is stored last, so no half file is ever reachable. With a journal
(dsss.client.journal) an unfinished put of the same file is continued.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import BinaryIO, Callable

from nacl.public import PublicKey
from twisted.internet import defer
from twisted.logger import Logger

from dsss.client import leasing
from dsss.client.batch import each_bounded, files_in_flight
from dsss.client.journal import JournalChanged, PutJournal, new_journal, open_journal, part_ident
from dsss.client.session import Session
from dsss.client.storing import seal_and_code_part, seal_part, store_block, store_shares
from dsss.client.streams import Progress, read_some
from dsss.crypto.manifest import Manifest, PartRef, clean_name, seal_manifest
from dsss.crypto.parts import FILE_ID_BYTES, KEY_BYTES, TAG_BYTES, encrypt_part
from dsss.erasure import Coding
from dsss.errors import DSSSError
from dsss.model import block_hash
from dsss.wire.transfer import MAX_PART

log = Logger()

DEFAULT_PART_SIZE = 4 * 1024 * 1024
MAX_PART_SIZE = MAX_PART - TAG_BYTES
PUT_WINDOW_BYTES = 12 * 1024 * 1024
"""Most plaintext bytes of one file's parts being stored at once: each part in flight costs
its ciphertext plus QUIC's buffers towards every replica, and the client's memory must not
grow with the part size (3 parts of the default 4 MiB; `--parallel` parts when they are
small)."""


PUT_WINDOW_SHARE_BYTES = 16 * 1024 * 1024
"""With erasure coding, most bytes of shares of one file's parts being stored at once: a part in
flight holds n/k times its size in shares, and more uploads' QUIC buffers (2 parts of 4 MiB at
2/4; a 1 GiB put peaked at 127 MB RSS with 2 such parts in flight, 153 MB with 3)."""


def put_window(parallel: int, part_size: int, coding: Coding | None = None) -> int:
    """How many parts of one file a put stores at once."""
    if coding is None:
        return max(1, min(parallel, PUT_WINDOW_BYTES // max(1, part_size)))
    held = -(-part_size * coding.n // coding.k)
    return max(1, min(parallel, PUT_WINDOW_SHARE_BYTES // max(1, held)))


# A file of at most this many bytes (and at most one part) travels inside its manifest: one
# block on the network instead of two. 16 KiB of plaintext is a manifest blob of about 22 KiB
# (base64), which costs the same round trips as a 4 KiB one, while `info`, `check` and `share`
# (which read the manifest) stay cheap. See bench/history/performance-log.md.
INLINE_MAX = 16 * 1024


def _count_parts(size: int, part_size: int) -> int:
    return (size + part_size - 1) // part_size


async def put_stream(
    session: Session,
    stream: BinaryIO,
    *,
    name: str,
    size: int,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress: Progress | None = None,
    journal: PutJournal | None = None,
) -> str:
    """Encrypt and store a file read from `stream` (`size` bytes); returns its address.

    With a `journal` (dsss.client.journal), the file's key and id are the journal's, every part
    is recorded as it is sent and stored, and a part the journal lists as stored that the
    network still holds is not sent again (JournalChanged if a part differs from what the
    journal recorded: the file changed)."""
    if not 1 <= part_size <= MAX_PART_SIZE:
        raise DSSSError(f"part size must be between 1 and {MAX_PART_SIZE} bytes")
    progress = progress or Progress()
    if journal is not None:
        file_key, file_id = journal.file_key, journal.file_id
    else:
        file_key = secrets.token_bytes(KEY_BYTES)
        file_id = secrets.token_bytes(FILE_ID_BYTES)
    if is_inline(size, part_size):
        return await _put_inline(session, stream, name=name, size=size, owner=owner,
                                 part_size=part_size, file_key=file_key, file_id=file_id,
                                 progress=progress)
    count = _count_parts(size, part_size)
    coding = session.erasure if count else None
    refs: list[PartRef | None] = [None] * count
    slots = defer.DeferredSemaphore(put_window(session.parallel, part_size, coding))
    running: list[defer.Deferred[None]] = []
    failure: list[BaseException] = []

    async def send(index: int, plaintext: bytes) -> None:
        try:
            plain_size = len(plaintext)
            if coding is None:
                ciphertext, h = await session.run(seal_part, file_key, file_id, index, plaintext)
                del plaintext  # only the ciphertext stays in memory while it is stored
                ref = PartRef(h, len(ciphertext), plain_size)
                if not await _already_stored(session, journal, index, ref):
                    await store_block(session, h, ciphertext)
            else:
                size, shares = await session.run(seal_and_code_part, file_key, file_id, index, plaintext, coding)
                del plaintext  # only the shares stay in memory while they are stored
                ref = PartRef("", size, plain_size, tuple(h for h, _ in shares))
                if not await _already_stored(session, journal, index, ref):
                    await store_shares(session, shares)
            if journal is not None and journal.stored.get(index) != ref:
                journal.record_stored(index, ref)
            refs[index] = ref
            progress.advance(plain_size)
        except BaseException as e:
            failure.append(e)
        finally:
            slots.release()

    for index in range(count):
        await slots.acquire()
        if failure:
            slots.release()
            break
        plaintext = await read_some(stream, part_size)
        expected = min(part_size, size - index * part_size)
        if len(plaintext) != expected:
            slots.release()
            failure.append(DSSSError(f"{name} changed while it was being read"))
            break
        running.append(defer.ensureDeferred(send(index, plaintext)))
        del plaintext
    if running:
        await defer.DeferredList(running)
    if failure:
        await _release_unfinished(session, [b for r in refs if r is not None for b in r.blocks])
        raise failure[0]
    if await read_some(stream, 1):
        raise DSSSError(f"{name} grew while it was being read")
    manifest = Manifest(
        name=name,
        size=size,
        part_size=part_size,
        file_id=file_id,
        parts=tuple(r for r in refs if r is not None),
        created=int(time.time()),
        erasure=coding,
    )
    # Stored last: until this succeeds no address exists, so no half file is ever reachable.
    return await _store_manifest(session, manifest, file_key, owner)


async def _already_stored(session: Session, journal: PutJournal | None, index: int, ref: PartRef) -> bool:
    """With a journal: whether part `index` (encrypted to `ref`) was stored by an earlier,
    unfinished put of this file and the network still holds it (every replica proven, or for
    an erasure-coded part every share held), so that it need not be sent again. Records the
    part as sent otherwise, before it is. JournalChanged if the part differs from the record."""
    if journal is None:
        return False
    journal.check(index, part_ident(ref))
    if journal.stored.get(index) == ref:
        if ref.shares:
            found = await defer.gatherResults(
                [defer.ensureDeferred(session.discovery.who_has(h)) for h in ref.shares])
            present = all(found)
        else:
            claimed, proven = await session.discovery.locate(ref.hash)
            present = len(proven if proven is not None else claimed) >= session.replicas
        if present:
            journal.skipped(ref.plain)
            return True
    journal.record_sent(index, part_ident(ref))
    return False


async def _store_manifest(
    session: Session, manifest: Manifest, file_key: bytes, owner: PublicKey
) -> str:
    """Seal `manifest` to `owner`, store it, and return its address (the file's)."""
    blob = seal_manifest(manifest, file_key, owner)
    if len(blob) > MAX_PART:
        raise DSSSError("file has too many parts for one manifest; use a larger --part-size")
    address = block_hash(blob)
    await store_block(session, address, blob)
    await lease_stored(session, leasing.manifest_blocks(address, manifest))
    return address


async def lease_stored(session: Session, blocks: list[str]) -> None:
    """Take the session's `keep` leases on blocks it just stored, on every holder; raises
    LeaseIncomplete (naming them) if some block could not be leased anywhere."""
    if session.leases is None or session.keep is None:
        return
    try:
        report = await leasing.take_leases(session, blocks, session.keep)
    finally:
        for b in blocks:
            session.holders.pop(b, None)
    leasing.check_report(report, "lease")


async def _release_unfinished(session: Session, blocks: list[str]) -> None:
    """A put failed: release the leases its uploads carried on the blocks it stored, so that
    they stop counting (quotas) and go at once rather than after the initial lease. Best effort:
    what is not released goes when its initial lease ends."""
    try:
        if session.leases is not None and blocks:
            await leasing.release_leases(session, blocks)
    except DSSSError as e:
        log.info("could not release the leases of an unfinished put: {e}", e=str(e))
    finally:
        for b in blocks:
            session.holders.pop(b, None)


async def _put_inline(
    session: Session,
    stream: BinaryIO,
    *,
    name: str,
    size: int,
    owner: PublicKey,
    part_size: int,
    file_key: bytes,
    file_id: bytes,
    progress: Progress,
) -> str:
    """A small file: its one part, encrypted as part 0, goes inside the manifest."""
    plaintext = await read_some(stream, size)
    if len(plaintext) != size:
        raise DSSSError(f"{name} changed while it was being read")
    if await read_some(stream, 1):
        raise DSSSError(f"{name} grew while it was being read")
    manifest = Manifest(
        name=name,
        size=size,
        part_size=part_size,
        file_id=file_id,
        parts=(),
        created=int(time.time()),
        inline=encrypt_part(file_key, file_id, 0, plaintext),
    )
    address = await _store_manifest(session, manifest, file_key, owner)
    progress.advance(size)
    return address


def is_inline(size: int, part_size: int) -> bool:
    """Whether `put_stream` carries a file of `size` bytes inside its manifest."""
    return 0 < size <= min(INLINE_MAX, part_size)


def part_count(size: int, part_size: int) -> int:
    """The number of blocks a file of `size` bytes is stored as, besides its manifest."""
    return 0 if is_inline(size, part_size) else _count_parts(size, part_size)


async def put_file(
    session: Session,
    path: str | os.PathLike[str],
    *,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress: Progress | None = None,
    journals: Path | None = None,
    on_journal: Callable[[PutJournal], None] | None = None,
) -> str:
    """Store the file at `path`. With `journals` (a directory), a file of several parts is
    journaled there (dsss.client.journal): an unfinished put of the same file is continued."""
    path = Path(path)
    # The manifest keeps the name for `get` to show; control characters are not kept.
    name = clean_name(path.name)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size
        if journals is None or is_inline(size, part_size):
            return await put_stream(
                session, f, name=name, size=size, owner=owner, part_size=part_size, progress=progress
            )
        erasure = str(session.erasure) if session.erasure is not None else None
        journal = open_journal(journals, path, size=size, mtime_ns=st.st_mtime_ns,
                               part_size=part_size, erasure=erasure)
        if on_journal is not None:
            on_journal(journal)
        try:
            address = await put_stream(session, f, name=name, size=size, owner=owner,
                                       part_size=part_size, progress=progress, journal=journal)
        except JournalChanged:
            # Changed since the unfinished put: start over with a new key (never the old key
            # and nonces for different bytes).
            log.info("{path} changed since its unfinished put; storing it anew", path=str(path))
            journal = new_journal(journals, path, size=size, mtime_ns=st.st_mtime_ns,
                                  part_size=part_size, erasure=erasure)
            if on_journal is not None:
                on_journal(journal)
            f.seek(0)
            address = await put_stream(session, f, name=name, size=size, owner=owner,
                                       part_size=part_size, progress=progress, journal=journal)
        journal.remove()
        return address


async def put_files(
    session: Session,
    paths: list[str],
    sizes: list[int],
    *,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    progress_for: Callable[[int], Progress] | None = None,
    on_done: Callable[[int, str | None, BaseException | None], None],
    journals: Path | None = None,
    on_journal: Callable[[int, PutJournal], None] | None = None,
) -> None:
    """Store several files, up to `files_in_flight(session)` at once (a file of several parts
    is stored alone, with the usual window of parts). `on_done(i, address, error)` is called
    once for every file started, as it ends. After a failure no new file is started: the files
    in flight finish, the rest are not stored (and not reported)."""
    failed: list[BaseException] = []

    async def one(i: int) -> None:
        progress = progress_for(i) if progress_for is not None else None
        try:
            address = await put_file(
                session, paths[i], owner=owner, part_size=part_size, progress=progress, journals=journals,
                on_journal=(lambda j: on_journal(i, j)) if on_journal is not None else None)
        except BaseException as e:  # reported to the caller, which decides what is a bug
            failed.append(e)
            on_done(i, None, e)
            return
        try:
            on_done(i, address, None)
        except BaseException as e:  # say, stdout is gone: start nothing more
            failed.append(e)
            raise

    await each_bounded(
        len(paths), one, limit=files_in_flight(session),
        heavy=lambda i: part_count(sizes[i], part_size) > 1, stop=lambda: bool(failed),
    )
