# -*- test-case-name: tests.integration.test_client -*-
"""get: fetch a file's manifest and parts, verify and decrypt them, in order. No parsing, no sockets."""

from __future__ import annotations

from typing import Any, BinaryIO, Callable

from nacl.public import PrivateKey
from twisted.internet import defer

from dsss.client import leasing
from dsss.client.batch import each_bounded, files_in_flight, keep_error
from dsss.client.fetching import fetch_block, fetch_shares
from dsss.client.session import Session
from dsss.client.storing import seal_and_code_part, seal_part
from dsss.client.streams import Progress, Sink
from dsss.crypto.manifest import Manifest, open_manifest
from dsss.crypto.parts import decrypt_part
from dsss.errors import IntegrityError, NotFound


async def fetch_manifest(session: Session, address: str, key: PrivateKey) -> tuple[Manifest, bytes]:
    try:
        blob = await fetch_block(session, address, what="file")
    except NotFound:
        raise NotFound(f"no file is stored at {address} (unknown address)") from None
    return open_manifest(blob, key)


async def get_to_stream(
    session: Session,
    address: str,
    out: Sink,
    *,
    key: PrivateKey,
    progress: Progress | None = None,
    on_manifest: Callable[[Manifest], None] | None = None,
    drain: Callable[[], defer.Deferred[None] | None] | None = None,
) -> Manifest:
    """Fetch, verify and decrypt a file into `out`, in order, with at most `parallel` parts in
    memory. `drain`, if given, is called after each write; a Deferred it returns is waited for
    before the next part is written (an HTTP response whose reader is slower than the agents)."""
    progress = progress or Progress()
    manifest, file_key = await fetch_manifest(session, address, key)
    if on_manifest is not None:
        on_manifest(manifest)
    await write_file(session, manifest, file_key, out, progress, drain)
    return manifest


async def verified_parts(
    session: Session, manifest: Manifest, file_key: bytes, partial: BinaryIO
) -> int:
    """How many of the file's first parts `partial` (a file opened for reading at its start)
    holds intact: each whole part read back is encrypted again (the same key, file id and index
    give the same ciphertext) and checked against the manifest; the count stops at the first
    that differs."""
    if manifest.inline is not None:
        return 0
    good = 0
    for index, ref in enumerate(manifest.parts):
        plaintext = partial.read(ref.plain)
        if len(plaintext) != ref.plain:
            break
        if manifest.erasure is None:
            _, h = await session.run(seal_part, file_key, manifest.file_id, index, plaintext)
            same = h == ref.hash
        else:
            _, shares = await session.run(seal_and_code_part, file_key, manifest.file_id, index,
                                          plaintext, manifest.erasure)
            same = tuple(h for h, _ in shares) == ref.shares
        if not same:
            break
        good += 1
    return good


async def write_file(
    session: Session, manifest: Manifest, file_key: bytes, out: Sink, progress: Progress,
    drain: Callable[[], defer.Deferred[None] | None] | None = None, *, start: int = 0,
) -> None:
    """Fetch, verify and decrypt the parts of an opened manifest into `out`, in order, from
    part `start` on (the parts before it are already there)."""
    if manifest.inline is not None:
        data = decrypt_part(file_key, manifest.file_id, 0, manifest.inline)
        out.write(data)
        progress.advance(len(data))
        return
    parts = manifest.parts
    results: dict[int, bytes] = {}
    # An erasure-coded part is k downloads: keep about `parallel` downloads in flight, as for
    # whole parts (a 1 GiB get at 2/4 peaked at 127 MB RSS with 2 parts in flight, 141 with 4).
    coding = manifest.erasure
    window = max(1, session.parallel if coding is None else session.parallel // coding.k)
    next_write = start
    in_flight: dict[int, defer.Deferred[None]] = {}
    errors: list[BaseException] = []

    async def fetch(index: int) -> None:
        ref = parts[index]
        if manifest.erasure is not None:
            ciphertext = await fetch_shares(session, ref, manifest.erasure, what=f"part {index}")
        else:
            ciphertext = await fetch_block(session, ref.hash)
        if len(ciphertext) != ref.size:
            raise IntegrityError(f"part {index} has the wrong size")
        results[index] = await session.run(decrypt_part, file_key, manifest.file_id, index, ciphertext)

    next_start = start
    while next_write < len(parts):
        while next_start < len(parts) and next_start < next_write + window:
            d = defer.ensureDeferred(fetch(next_start))
            d.addErrback(keep_error, errors)
            in_flight[next_start] = d
            next_start += 1
        await in_flight.pop(next_write)
        if errors:
            for d in in_flight.values():
                d.cancel()
            await defer.DeferredList(list(in_flight.values()), consumeErrors=True)
            raise errors[0]
        data = results.pop(next_write)
        out.write(data)
        progress.advance(len(data))
        next_write += 1
        waiting = drain() if drain is not None else None
        if waiting is not None:
            await waiting


async def get_files(
    session: Session,
    addresses: list[str],
    *,
    key: PrivateKey,
    open_output: Callable[[int, Manifest], Any],
    on_done: Callable[[int, Manifest | None, BaseException | None], None],
) -> None:
    """Fetch several files, up to `files_in_flight(session)` at once; a file larger than one
    part is fetched alone (its parts with the usual window). Unlike a put, one failure does not
    stop the others.

    `open_output(i, manifest)` is called once the manifest is open and returns a context
    manager giving the stream to write to (it commits the file on a clean exit, and removes it
    otherwise); `on_done(i, manifest, error)` is called once per address."""
    big = defer.DeferredLock()

    async def one(i: int) -> None:
        address = addresses[i]
        manifest: Manifest | None = None
        try:
            manifest, file_key = await fetch_manifest(session, address, key)
            # Only the manifest is known to be small before it is opened: a file of several
            # parts waits for the other large ones, so at most one streams at a time.
            heavy = len(manifest.parts) > 1
            if heavy:
                await big.acquire()
            try:
                with open_output(i, manifest) as out:
                    await write_file(session, manifest, file_key, out, Progress())
            finally:
                if heavy:
                    big.release()
        except BaseException as e:
            on_done(i, manifest, e)
        else:
            on_done(i, manifest, None)

    await each_bounded(len(addresses), one, limit=files_in_flight(session),
                        heavy=lambda i: False, stop=lambda: False)


async def file_blocks(session: Session, address: str, key: PrivateKey) -> list[str]:
    """The blocks of the file at `address`: its manifest (fetched, opened with `key`) and
    every part's block or shares."""
    manifest, _ = await fetch_manifest(session, address, key)
    return leasing.manifest_blocks(address, manifest)
