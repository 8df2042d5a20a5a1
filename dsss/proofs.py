# -*- test-case-name: tests.unit.test_proofs -*-
"""Addresses of stored bytes as BLAKE3 Merkle trees, and proofs that a holder has them.

Pure: no Twisted, no clock, no I/O.

A blob of `size` bytes is cut into leaves of LEAF_SIZE bytes (the last one shorter; an empty blob
has one empty leaf). Leaves and inner nodes are hashed with BLAKE3 under distinct prefixes

    leaf   = BLAKE3(0x00 || leaf bytes)
    parent = BLAKE3(0x01 || left || right)

and the tree is shaped as in RFC 6962 (Certificate Transparency): over n > 1 leaves, the left
subtree holds the largest power of two smaller than n. Built bottom up, that is the same tree as
pairing neighbours level by level and carrying an unpaired last node up unchanged, which is how
this module walks it. The address commits to the size as well as to the root:

    address = BLAKE3(b"dsss-tree-v1" || size as 8-byte little-endian || root), lowercase hex

An auditor who knows only the address sends a 16-byte nonce; the holder answers for leaf
`challenge_index(size, nonce)` with that leaf's bytes followed by the sibling hashes on its path to
the root, bottom up. `verify` recomputes the root from them and checks it, and the size, against
the address: one leaf hash and at most log2(leaves) parent hashes.

The *outboard* is every node hash of the tree, level by level from the leaves up (level 0: the
leaf hashes, ...; last: the root), 32 bytes each. A store keeps it beside the blob so that a
proof costs one leaf read plus `sibling_nodes` reads of 32 bytes, never the whole blob.
"""

from __future__ import annotations

import hmac
import re

import blake3

from dsss.errors import RemoteProtocolError

LEAF_SIZE = 16384
HASH_SIZE = 32
NONCE_SIZE = 16
MAX_BLOB = 2**62
ADDRESS_DOMAIN = b"dsss-tree-v1"
_LEAF_PREFIX = b"\x00"
_PARENT_PREFIX = b"\x01"
_HEX64 = re.compile(r"\As?([0-9a-f]{64})\Z")


class ProofError(RemoteProtocolError):
    """A proof does not show that its sender holds the bytes of the address it was asked for."""

    code = "bad-proof"


# --- the tree's shape ---------------------------------------------------------------------------


def _check_size(size: int) -> None:
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB:
        raise ProofError(f"not a blob size: {size!r}")


def leaf_count(size: int) -> int:
    """Leaves of a blob of `size` bytes: ceil(size / LEAF_SIZE), and one for an empty blob."""
    _check_size(size)
    return max(1, -(-size // LEAF_SIZE))


def level_counts(size: int) -> list[int]:
    """Nodes on each level of the tree, from the leaves (level 0) up to the root (1 node)."""
    counts = [leaf_count(size)]
    while counts[-1] > 1:
        counts.append((counts[-1] + 1) // 2)
    return counts


def leaf_range(size: int, index: int) -> tuple[int, int]:
    """The bytes [start, end) of leaf `index` in a blob of `size` bytes."""
    if not isinstance(index, int) or not 0 <= index < leaf_count(size):
        raise ProofError(f"leaf {index!r} out of range for a blob of {size} bytes")
    start = index * LEAF_SIZE
    return start, min(size, start + LEAF_SIZE)


def challenge_index(size: int, nonce: bytes) -> int:
    """The leaf a challenge with `nonce` (NONCE_SIZE bytes) asks for in a blob of `size` bytes."""
    if not isinstance(nonce, (bytes, bytearray)) or len(nonce) != NONCE_SIZE:
        raise ProofError(f"a nonce is {NONCE_SIZE} bytes")
    return int.from_bytes(nonce, "big") % leaf_count(size)


def _path(counts: list[int], index: int) -> list[tuple[int, int, bool]]:
    """(level, sibling's index on that level, whether the sibling is on the left) for every level
    whose node on `index`'s path has a sibling, bottom up."""
    steps = []
    j = index
    for level, count in enumerate(counts[:-1]):
        sib = j ^ 1
        if sib < count:
            steps.append((level, sib, sib < j))
        j >>= 1
    return steps


def depth(size: int, index: int) -> int:
    """Sibling hashes in a proof for leaf `index`: the leaf's depth in the tree."""
    leaf_range(size, index)
    return len(_path(level_counts(size), index))


def proof_length(size: int, index: int) -> int:
    """The exact length of a proof for leaf `index` of a blob of `size` bytes."""
    start, end = leaf_range(size, index)
    return (end - start) + HASH_SIZE * depth(size, index)


def outboard_length(size: int) -> int:
    """Bytes of the outboard of a blob of `size` bytes (every node hash of its tree)."""
    return HASH_SIZE * sum(level_counts(size))


def sibling_nodes(size: int, index: int) -> list[int]:
    """Positions in the outboard (in hashes, not bytes) of the siblings a proof for leaf `index`
    carries, bottom up: what a holder reads to answer a challenge."""
    leaf_range(size, index)
    counts = level_counts(size)
    offsets = [0]
    for c in counts[:-1]:
        offsets.append(offsets[-1] + c)
    return [offsets[level] + sib for level, sib, _ in _path(counts, index)]


# --- hashing -----------------------------------------------------------------------------------


def _leaf_hash(leaf: bytes | bytearray | memoryview) -> bytes:
    # One call over the prefixed leaf (a 16 KiB copy) is far faster than feeding the prefix and
    # the leaf to one hasher in two calls: BLAKE3 then hashes the leaf's chunks in parallel.
    return blake3.blake3(_LEAF_PREFIX + leaf).digest()


def _parent_hash(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(_PARENT_PREFIX + left + right).digest()


def _address_of_root(size: int, root: bytes) -> str:
    return blake3.blake3(ADDRESS_DOMAIN + size.to_bytes(8, "little") + root).hexdigest()


def _levels(leaves: list[bytes]) -> list[list[bytes]]:
    levels = [leaves]
    while len(levels[-1]) > 1:
        below = levels[-1]
        up = [_parent_hash(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            up.append(below[-1])
        levels.append(up)
    return levels


class TreeHasher:
    """The address of bytes given in pieces (`update`), and the outboard a store keeps.

    Whole leaves are hashed from slices of the caller's buffer (memoryviews); pieces smaller than
    a leaf are gathered in a LEAF_SIZE buffer first.
    """

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self.size = 0
        self._leaves: list[bytes] = []
        self._buf = bytearray(LEAF_SIZE)
        self._fill = 0
        self._levels: list[list[bytes]] | None = None
        if data:
            self.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if isinstance(data, memoryview) and (data.ndim != 1 or data.itemsize != 1):
            data = data.cast("B")
        n = len(data)
        if not n:
            return
        self._levels = None
        self.size += n
        fill = self._fill
        if fill + n < LEAF_SIZE:  # the common case for small pieces: gather them
            self._buf[fill : fill + n] = data
            self._fill = fill + n
            return
        mv = data if isinstance(data, memoryview) else memoryview(data)
        pos = 0
        leaves = self._leaves
        if fill:
            pos = LEAF_SIZE - fill
            self._buf[fill:] = mv[:pos]
            leaves.append(_leaf_hash(self._buf))
            self._fill = 0
        while n - pos >= LEAF_SIZE:
            leaves.append(_leaf_hash(mv[pos : pos + LEAF_SIZE]))
            pos += LEAF_SIZE
        if pos < n:
            self._buf[: n - pos] = mv[pos:]
            self._fill = n - pos

    def _tree(self) -> list[list[bytes]]:
        if self._levels is None:
            leaves = list(self._leaves)
            if self._fill or not leaves:
                leaves.append(_leaf_hash(memoryview(self._buf)[: self._fill]))
            self._levels = _levels(leaves)
        return self._levels

    def root(self) -> bytes:
        return self._tree()[-1][0]

    def hexdigest(self) -> str:
        """The address of the bytes given so far (the hasher can go on taking more)."""
        return _address_of_root(self.size, self.root())

    def outboard(self) -> bytes:
        """Every node hash of the tree, level by level from the leaves up (see the module)."""
        return b"".join(h for level in self._tree() for h in level)


def address(data: bytes | memoryview) -> str:
    """The address of `data`: its size and tree root under BLAKE3 (see the module), hex."""
    return TreeHasher(data).hexdigest()


def check_outboard(addr: str, size: int, outboard: bytes) -> bool:
    """Whether `outboard` is the consistent outboard of a blob of `size` bytes at `addr`: its
    length, every parent from its children, and the root against the address."""
    if len(outboard) != outboard_length(size):
        return False
    counts = level_counts(size)
    hashes = [outboard[i : i + HASH_SIZE] for i in range(0, len(outboard), HASH_SIZE)]
    at = 0
    levels = []
    for c in counts:
        levels.append(hashes[at : at + c])
        at += c
    if _levels(levels[0]) != levels:
        return False
    return _address_of_root(size, levels[-1][0]) == _hex(addr)


# --- proofs ------------------------------------------------------------------------------------


def prove(size: int, index: int, leaf: bytes, siblings: list[bytes]) -> bytes:
    """The proof for leaf `index` of a blob of `size` bytes: the leaf, then its siblings (bottom
    up, as `sibling_nodes` lists them). Raises ProofError if their lengths are not the tree's."""
    start, end = leaf_range(size, index)
    if len(leaf) != end - start:
        raise ProofError(f"leaf {index} of a {size}-byte blob is {end - start} bytes, not {len(leaf)}")
    if len(siblings) != depth(size, index) or any(len(s) != HASH_SIZE for s in siblings):
        raise ProofError(f"leaf {index} of a {size}-byte blob has {depth(size, index)} siblings")
    return bytes(leaf) + b"".join(siblings)


def _hex(addr: str) -> str:
    m = _HEX64.match(addr) if isinstance(addr, str) else None
    if m is None:
        raise ProofError(f"not an address: {str(addr)[:80]!r}")
    return m.group(1)


def verify(address: str, size: int, nonce: bytes, proof: bytes) -> None:
    """Check a proof that its sender holds the `size` bytes at `address` (64 hex digits, or a
    share ID: its hash part), answering the challenge `nonce`. Returns None; raises ProofError
    saying why not."""
    want = _hex(address)
    _check_size(size)
    index = challenge_index(size, nonce)
    start, end = leaf_range(size, index)
    counts = level_counts(size)
    path = _path(counts, index)
    expect = (end - start) + HASH_SIZE * len(path)
    if not isinstance(proof, (bytes, bytearray, memoryview)) or len(proof) != expect:
        raise ProofError(
            f"a proof for leaf {index} of a {size}-byte blob is {expect} bytes, not "
            f"{len(proof) if isinstance(proof, (bytes, bytearray, memoryview)) else '?'}"
        )
    mv = memoryview(proof)
    node = _leaf_hash(mv[: end - start])
    at = end - start
    for _level, _sib, left in path:
        sib = bytes(mv[at : at + HASH_SIZE])
        at += HASH_SIZE
        node = _parent_hash(sib, node) if left else _parent_hash(node, sib)
    if not hmac.compare_digest(_address_of_root(size, node), want):
        raise ProofError(f"the proof for leaf {index} does not lead to the address (or the size {size} is wrong)")
