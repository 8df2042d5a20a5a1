# -*- test-case-name: tests.unit.test_tree,tests.integration.test_directories -*-
"""Directory trees on the network: the put -r and get -r flows. No parsing, no output.

`put -r` walks a tree, stores every file, then the directory manifests bottom-up; `get -r`
fetches the directories, checks every name and path, then the files. The commands in
dsss/client/commands/tree.py print.

Storing: the walk (`scan_tree`) never follows a symbolic link below the directory given; links,
FIFOs, sockets and devices are not stored and are listed as skipped. A name that cannot be
stored (not valid UTF-8) stops the put before anything is stored. Files are stored with the
flows of `put` (several small ones at once, a file of several parts alone), each read through a
descriptor opened without following links; every directory's manifest is stored once all its
entries are, so the root's address exists only when the whole tree is stored.

Restoring: every directory of the tree is fetched and checked first (each name one path
component, names distinct, no directory twice, depth bounded), then the paths are checked
against what is on disk (nothing is written if a file exists and `force` is not given, or if a
directory of the tree is a file or a link on disk), then the files are fetched into temporary
files beside their final names and linked into place (replaced with `force`), and the times of
the tree's directories (and the modes of those it made) are set last, deepest first.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from nacl.public import PrivateKey, PublicKey
from twisted.internet import defer
from twisted.python.failure import Failure

from dsss.client.batch import files_in_flight
from dsss.client.fetching import fetch_block
from dsss.client.getflow import get_files
from dsss.client.putflow import DEFAULT_PART_SIZE, part_count, put_stream
from dsss.client.session import Session
from dsss.client.storing import store_block
from dsss.client.getflow import fetch_manifest
from dsss.client.leasing import manifest_blocks
from dsss.client.putflow import lease_stored
from dsss.crypto import directory as dirfmt
from dsss.crypto.directory import BadName, Directory, Entry, NotDirectory, check_name
from dsss.crypto.manifest import MAGIC as FILE_MAGIC
from dsss.crypto.manifest import Manifest, clean_name, safe_name
from dsss.errors import DSSSError, IntegrityError, NotFound, RemoteProtocolError
from dsss.model import block_hash

MAX_DEPTH = 256
"""Most levels of directories below the root, on put and on get."""


class UnstorableTree(DSSSError):
    """A local tree that cannot be stored as it is (a name that is not UTF-8, too deep, unreadable)."""

    exit_code = 2
    code = "bad-tree"


class PathExists(DSSSError):
    """`get -r` would replace existing files (and was not told to), or a path is in the way."""

    exit_code = 1
    code = "exists"


# --- the local walk ------------------------------------------------------------------------------


@dataclass
class LocalFile:
    path: Path
    name: str
    size: int  # as seen by the walk; the entry records what was read


@dataclass
class LocalDir:
    path: Path
    name: str
    mode: int
    mtime: int
    depth: int
    files: list[LocalFile] = field(default_factory=list)
    dirs: list["LocalDir"] = field(default_factory=list)


@dataclass(frozen=True)
class Skipped:
    path: Path
    why: str  # "symbolic link", "FIFO", "socket", "device"


def printable(text: object) -> str:
    """A name or path as printed on a terminal: control and formatting characters escaped
    (`\\n`, `\\x1b`, `\\u202e`), everything else as it is."""
    return "".join(c if safe_name(c) else c.encode("unicode_escape").decode("ascii") for c in str(text))


def _kind_of(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _name_of(parent: Path, name: str) -> str:
    try:
        return check_name(name)
    except BadName:
        shown = os.fsencode(name).decode("utf-8", "backslashreplace")
        raise UnstorableTree(
            f"{printable(parent / shown)}: this name cannot be stored (names are stored as UTF-8, at most "
            f"255 bytes); rename it. Nothing was stored"
        ) from None


def scan_tree(root: str | os.PathLike[str]) -> tuple[LocalDir, list[Skipped]]:
    """Walk `root` (followed if it is itself a link to a directory; nothing below it is) and
    return its tree, entries in the order of their names' UTF-8 bytes, and what is not stored."""
    root = Path(root)
    st = os.stat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise UnstorableTree(f"{printable(root)}: not a directory")
    name = Path(os.path.abspath(root)).name
    try:
        check_name(name)
    except BadName:
        name = ""
    top = LocalDir(root, name, stat.S_IMODE(st.st_mode) & dirfmt.MAX_MODE, st.st_mtime_ns, 0)
    skipped: list[Skipped] = []
    todo = [top]
    while todo:
        here = todo.pop()
        if here.depth >= MAX_DEPTH:
            raise UnstorableTree(f"{printable(here.path)}: more than {MAX_DEPTH} levels of directories; nothing was stored")
        try:
            with os.scandir(here.path) as it:
                found = sorted(it, key=lambda e: os.fsencode(e.name))
        except OSError as e:
            raise UnstorableTree(f"cannot read the directory {printable(here.path)}: {e.strerror or e}; "
                                 f"nothing was stored") from None
        for item in found:
            name = _name_of(here.path, item.name)
            path = here.path / item.name
            st = item.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                if not os.access(path, os.R_OK):
                    raise UnstorableTree(f"cannot read {printable(path)}: permission denied; nothing was stored")
                here.files.append(LocalFile(path, name, st.st_size))
            elif stat.S_ISDIR(st.st_mode):
                sub = LocalDir(path, name, stat.S_IMODE(st.st_mode) & dirfmt.MAX_MODE, st.st_mtime_ns,
                               here.depth + 1)
                here.dirs.append(sub)
                todo.append(sub)
            else:
                skipped.append(Skipped(path, _kind_of(st.st_mode)))
    return top, skipped


def _about(path: Path, error: DSSSError) -> DSSSError:
    """`error` with the path it concerns in front, and the same exit code."""
    named = DSSSError(f"{printable(path)}: {error}")
    named.exit_code, named.code, named.http_status = error.exit_code, error.code, error.http_status
    return named


def _walk(top: LocalDir) -> list[LocalDir]:
    """Every directory of the tree, parents before their children."""
    out = [top]
    i = 0
    while i < len(out):
        out.extend(out[i].dirs)
        i += 1
    return out


# --- put -r --------------------------------------------------------------------------------------


@dataclass
class PutTreeResult:
    address: str
    files: int
    directories: int
    bytes: int
    blobs: list[str]  # every directory blob stored (heads and continuations)


async def _bounded(items: list[Any], run: Callable[[Any], Any], *, limit: int,
                   heavy: Callable[[Any], bool] = lambda _: False, stop_on_error: bool = True) -> None:
    """`await run(item)` for every item, at most `limit` at once and one `heavy` item at a
    time; after a failure (with stop_on_error) none is started, those running finish, and the
    first failure is raised."""
    slots = defer.DeferredSemaphore(max(1, limit))
    big = defer.DeferredLock()
    failed: list[Failure] = []
    running: list[defer.Deferred[None]] = []

    async def one(item: Any, is_heavy: bool) -> None:
        try:
            await run(item)
        except BaseException:
            failed.append(Failure())
        finally:
            slots.release()
            if is_heavy:
                big.release()

    for item in items:
        if failed and stop_on_error:
            break
        is_heavy = heavy(item)
        if is_heavy:
            await big.acquire()
        await slots.acquire()
        running.append(defer.ensureDeferred(one(item, is_heavy)))
    await defer.DeferredList(running)
    if failed:
        failed[0].raiseException()


async def put_tree(
    session: Session,
    top: LocalDir,
    *,
    owner: PublicKey,
    part_size: int = DEFAULT_PART_SIZE,
    on_file: Callable[[LocalFile, int], None] = lambda f, size: None,
    per_blob: int = dirfmt.ENTRIES_PER_BLOB,
    now: Callable[[], float] = time.time,
) -> PutTreeResult:
    """Store every file of the tree, then every directory's manifest, children first; returns
    the root's address. `on_file(file, size)` is called as each file is stored."""
    dirs = _walk(top)
    entries: dict[int, list[Entry]] = {id(d): [] for d in dirs}
    work = [(d, f) for d in dirs for f in d.files]
    total = 0

    async def put_one(item: tuple[LocalDir, LocalFile]) -> None:
        nonlocal total
        here, f = item
        try:
            fd = os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DSSSError(f"cannot read {printable(f.path)}: {e.strerror or e}") from None
        with os.fdopen(fd, "rb") as stream:
            st = os.fstat(stream.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise DSSSError(f"{printable(f.path)} is no longer a regular file")
            try:
                address = await put_stream(session, stream, name=clean_name(f.name), size=st.st_size,
                                           owner=owner, part_size=part_size)
            except DSSSError as e:
                raise _about(f.path, e) from None
        entries[id(here)].append(Entry(dirfmt.FILE, f.name, st.st_size, stat.S_IMODE(st.st_mode) & dirfmt.MAX_MODE,
                                       st.st_mtime_ns, address))
        total += st.st_size
        on_file(f, st.st_size)

    await _bounded(work, put_one, limit=files_in_flight(session),
                   heavy=lambda item: part_count(item[1].size, part_size) > 1)

    # The directories, deepest first: a directory's manifest names its sub-directories' addresses.
    blobs: list[str] = []
    address_of: dict[int, str] = {}
    size_of: dict[int, int] = {}
    created = int(now())
    for depth in sorted({d.depth for d in dirs}, reverse=True):
        level = [d for d in dirs if d.depth == depth]

        async def put_dir(d: LocalDir) -> None:
            subs = [Entry(dirfmt.DIR, s.name, size_of[id(s)], s.mode, s.mtime, address_of[id(s)]) for s in d.dirs]
            mine = sorted(entries[id(d)] + subs, key=lambda e: e.name.encode("utf-8"))
            directory = Directory(d.name, d.mode, d.mtime, created, tuple(mine))
            head, more = await session.run(lambda: dirfmt.seal_directory(directory, owner, per_blob=per_blob))
            for blob in more + [head]:  # the continuations first: the head names them
                address = block_hash(blob)
                await store_block(session, address, blob)
                blobs.append(address)
            address_of[id(d)] = block_hash(head)
            size_of[id(d)] = directory.size

        await _bounded(level, put_dir, limit=files_in_flight(session))
    # Every directory blob is kept for the session's `keep`, as each file was once its manifest
    # was stored (until then they carry only their uploads' initial lease).
    await lease_stored(session, blobs)
    return PutTreeResult(address_of[id(top)], len(work), len(dirs), total, blobs)


# --- reading directories -------------------------------------------------------------------------


async def fetch_directory(session: Session, address: str, key: PrivateKey) -> Directory:
    """The directory at `address`, its continuations fetched and checked; NotDirectory if the
    address holds a file."""
    return (await _fetch_directory(session, address, key))[0]


async def _fetch_directory(session: Session, address: str, key: PrivateKey) -> tuple[Directory, tuple[str, ...]]:
    """The directory at `address` and the addresses of its continuation blobs."""
    try:
        blob = await fetch_block(session, address, what="directory")
    except NotFound:
        raise NotFound(f"nothing is stored at {address} (unknown address)") from None
    if blob.startswith(FILE_MAGIC):
        raise NotDirectory(f"{address} is a file, not a directory (use get without -r)")
    head = dirfmt.open_head(blob, key)
    chunks: list[tuple[Entry, ...]] = [()] * len(head.more)

    async def one(i: int) -> None:
        try:
            data = await fetch_block(session, head.more[i], what="directory continuation")
        except NotFound:
            raise NotFound(f"no agent has continuation {i + 1} of directory {address}") from None
        chunks[i] = dirfmt.open_continuation(data, key)

    await _bounded(list(range(len(head.more))), one, limit=files_in_flight(session))
    return dirfmt.assemble(head, chunks), head.more


async def fetch_entry(session: Session, address: str, key: PrivateKey) -> Directory | Manifest:
    """What an address holds: a directory, or a file's manifest."""
    from dsss.crypto.manifest import open_manifest

    try:
        blob = await fetch_block(session, address, what="file")
    except NotFound:
        raise NotFound(f"nothing is stored at {address} (unknown address)") from None
    if dirfmt.is_directory_blob(blob):
        return await fetch_directory(session, address, key)
    return open_manifest(blob, key)[0]


@dataclass
class RemoteTree:
    """A tree fetched from the network: every directory with its path below the root (a tuple of
    checked names; the root's is ()), parents before children."""

    address: str
    dirs: list[tuple[tuple[str, ...], str, Directory]]  # (path, address, directory)
    continuations: list[str] = field(default_factory=list)  # of every directory, in no order

    def blobs(self) -> list[str]:
        """Every directory blob of the tree (heads and continuations), root first: with the
        files' addresses, what keeps the tree (for leases, rm, check)."""
        return [a for _p, a, _d in self.dirs] + self.continuations

    @property
    def root(self) -> Directory:
        return self.dirs[0][2]

    def files(self) -> list[tuple[tuple[str, ...], Entry]]:
        return [(path + (e.name,), e) for path, _a, d in self.dirs for e in d.entries if e.kind == dirfmt.FILE]

    @property
    def size(self) -> int:
        return sum(e.size for _p, e in self.files())


async def fetch_tree(session: Session, address: str, key: PrivateKey) -> RemoteTree:
    """Every directory below `address`, level by level. RemoteProtocolError if a directory
    appears twice in the tree (a well-formed tree never does: each blob is sealed afresh) or
    the tree is deeper than MAX_DEPTH."""
    root, more = await _fetch_directory(session, address, key)
    continuations = list(more)
    out: list[tuple[tuple[str, ...], str, Directory]] = [((), address, root)]
    seen = {address}
    level: list[tuple[tuple[str, ...], Directory]] = [((), root)]
    while level:
        wanted: list[tuple[tuple[str, ...], str]] = []
        for path, d in level:
            for e in d.entries:
                if e.kind != dirfmt.DIR:
                    continue
                if e.address in seen:
                    raise RemoteProtocolError(f"the tree names directory {e.address} twice")
                seen.add(e.address)
                if len(path) + 1 > MAX_DEPTH:
                    raise RemoteProtocolError(f"the tree is deeper than {MAX_DEPTH} levels")
                wanted.append((path + (e.name,), e.address))
        got: dict[str, Directory] = {}

        async def one(item: tuple[tuple[str, ...], str], got: dict[str, Directory] = got) -> None:
            got[item[1]], more = await _fetch_directory(session, item[1], key)
            continuations.extend(more)

        await _bounded(wanted, one, limit=files_in_flight(session))
        level = [(path, got[a]) for path, a in wanted]
        out.extend((path, a, got[a]) for path, a in wanted)
    return RemoteTree(address, out, continuations)


@dataclass
class Kept:
    """What keeps a file or a tree on the network (for rm and renew): its blocks, and what to
    call it. For a tree, `files` holds each file's blocks (manifest first) and `dirs` every
    directory blob; files whose manifest no agent has any more are listed in `missing`."""

    name: str
    size: int
    parts: int  # a file's parts; a tree's files
    directory: bool
    files: list[list[str]]
    dirs: list[str] = field(default_factory=list)
    missing: list[tuple[str, ...]] = field(default_factory=list)

    def blocks(self) -> list[str]:
        return [b for f in self.files for b in f] + self.dirs


async def kept_blocks(session: Session, address: str, key: PrivateKey) -> Kept:
    """The blocks that keep what is at `address`: a file's manifest and parts, or a tree's
    directory blobs (heads and continuations) and every file's manifest and parts."""
    found = await fetch_entry(session, address, key)
    if isinstance(found, Manifest):
        return Kept(found.name, found.size, len(found.parts), False, [manifest_blocks(address, found)])
    remote = await fetch_tree(session, address, key)
    files = remote.files()
    kept = Kept(remote.root.name, remote.size, len(files), True, [], remote.blobs())
    blocks: list[list[str] | None] = [None] * len(files)

    async def one(i: int) -> None:
        path, entry = files[i]
        try:
            manifest, _ = await fetch_manifest(session, entry.address, key)
        except NotFound:
            kept.missing.append(path)
            return
        blocks[i] = manifest_blocks(entry.address, manifest)

    await _bounded(list(range(len(files))), one, limit=files_in_flight(session))
    kept.files = [b for b in blocks if b is not None]
    return kept


# --- get -r --------------------------------------------------------------------------------------


@dataclass
class GetTreeResult:
    files: int = 0
    directories: int = 0
    bytes: int = 0
    replaced: int = 0
    failures: list[tuple[Path, BaseException]] = field(default_factory=list)


def _on_disk(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def plan_restore(tree: RemoteTree, target: Path, *, force: bool) -> tuple[list[Path], int]:
    """Check every path of the tree against the disk, before anything is written: the directories
    to make (parents first), and how many existing files will be replaced (only with `force`).
    PathExists if a directory of the tree is something else on disk, a file of the tree is a
    directory on disk, or (without `force`) a file of the tree exists."""
    st = _on_disk(target)
    if st is not None and not os.path.isdir(target):
        raise PathExists(f"{printable(target)} exists and is not a directory; nothing was written")
    to_make: list[Path] = [] if st is not None else [target]
    for path, _a, _d in tree.dirs[1:]:
        where = target.joinpath(*path)
        st = _on_disk(where)
        if st is None:
            to_make.append(where)
        elif not stat.S_ISDIR(st.st_mode):
            what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise PathExists(f"{printable(where)} is {what} on disk, and a directory in the tree; nothing was written")
    existing = []
    for path, _e in tree.files():
        where = target.joinpath(*path)
        st = _on_disk(where)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            raise PathExists(f"{printable(where)} is a directory on disk, and a file in the tree; nothing was written")
        existing.append(where)
    if existing and not force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise PathExists(f"{printable(existing[0])}{more} exist(s) already; nothing was written "
                         f"(--force replaces existing files)")
    return to_make, len(existing)


async def get_tree(
    session: Session,
    tree: RemoteTree,
    target: Path,
    *,
    key: PrivateKey,
    force: bool = False,
    on_file: Callable[[Path, BaseException | None], None] = lambda p, e: None,
) -> GetTreeResult:
    """Restore `tree` into the directory `target` (made if missing). Raises PathExists before
    writing anything (see plan_restore); a file that fails leaves nothing and is listed in the
    result's failures, the others are restored."""
    to_make, replaced = plan_restore(tree, target, force=force)
    for where in to_make:
        os.mkdir(where, 0o700)
    result = GetTreeResult(directories=len(tree.dirs), replaced=replaced)
    files = tree.files()
    addresses = [e.address for _p, e in files]

    @contextmanager
    def open_output(i: int, manifest: Manifest) -> Iterator[Any]:
        path, entry = files[i]
        if manifest.size != entry.size:
            raise IntegrityError(f"the directory says {entry.size} bytes, the file's manifest {manifest.size}")
        parent = target.joinpath(*path[:-1])
        final = parent / path[-1]
        tmp = parent / f".dsss-{secrets.token_hex(8)}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fchmod(out.fileno(), entry.mode)
                os.utime(out.fileno(), ns=(entry.mtime, entry.mtime))
                os.fsync(out.fileno())
            if force:
                os.replace(tmp, final)
            else:
                try:
                    os.link(tmp, final)  # never replaces: fails if the name appeared meanwhile
                except FileExistsError:
                    raise PathExists(f"{printable(final)} appeared while it was being fetched; kept as it is") from None
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def done(i: int, manifest: Manifest | None, error: BaseException | None) -> None:
        where = target.joinpath(*files[i][0])
        if error is None:
            result.files += 1
            result.bytes += files[i][1].size
        else:
            result.failures.append((where, error))
        on_file(where, error)

    await get_files(session, addresses, key=key, open_output=open_output, on_done=done)
    # Times of the tree's directories, and modes of those made, deepest first: writing into a
    # directory changes its time, and a read-only mode would have stopped the writes. A
    # directory that existed keeps its mode; the target itself, if it existed, is left as it is.
    made = set(to_make)
    for path, _a, d in reversed(tree.dirs):
        where = target.joinpath(*path)
        if where in made:
            os.chmod(where, d.mode)
        if where in made or path:
            os.utime(where, ns=(d.mtime, d.mtime), follow_symlinks=False)
    return result
