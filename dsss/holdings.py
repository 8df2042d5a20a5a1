# -*- test-case-name: tests.unit.test_holdings -*-
"""Digests of a set of part IDs by prefix, to find where two views of it differ (DIGEST).

An agent and the server compare these instead of sending every part ID (docs/protocol.md, "The
digest exchange").

Each part ID has a *path*: the 32 lowercase hex digits of BLAKE2b-128 of its ASCII text. A
*prefix* is the first few hex digits of a path; the parts under a prefix split into 16 children
by the next digit. The digest of a prefix is, for each child, the number of parts under it and
the XOR of their paths (so it is order-free, and adding or removing one part updates it in
constant time). Two sets have equal digests under a prefix only if, child by child, they have as
many parts with the same XOR: a difference is missed only by accident (odds about 2^-128 each).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable, Iterator

PATH_DIGITS = 32
MAX_PREFIX = 8
"""The longest prefix a DIGEST or RESEND may name."""

Digest = tuple[tuple[int, int], ...]
"""16 (count, XOR of paths as an int) pairs, one per child digit 0-f."""


def path_of(part: str) -> str:
    return hashlib.blake2b(part.encode("ascii"), digest_size=16).hexdigest()


def digest(paths: Iterable[str], prefix: str) -> Digest:
    """The digest under `prefix` of the parts with these paths (those not under it are ignored)."""
    counts = [0] * 16
    xors = [0] * 16
    depth = len(prefix)
    for path in paths:
        if path.startswith(prefix):
            child = int(path[depth], 16)
            counts[child] += 1
            xors[child] ^= int(path, 16)
    return tuple(zip(counts, xors))


def differing(ours: Digest, theirs: Digest) -> list[str]:
    """The child digits whose count or XOR differ."""
    return [f"{i:x}" for i in range(16) if ours[i] != theirs[i]]


class Holdings:
    """A set of part IDs grouped by path, for digests under any prefix in time proportional to
    the parts under it (the agent's side; the server builds one from the stored claims). The
    digest of everything (prefix "") is kept up to date as parts come and go: O(1)."""

    def __init__(self, parts: Iterable[str] = ()) -> None:
        self._by_top: dict[str, dict[str, str]] = defaultdict(dict)  # first 2 digits -> path -> part
        self._count = [0] * 16
        self._xor = [0] * 16
        for part in parts:
            self.add(part)

    def add(self, part: str) -> None:
        self.add_path(path_of(part), part)

    def add_path(self, path: str, part: str) -> None:
        group = self._by_top[path[:2]]
        if path not in group:
            child = int(path[0], 16)
            self._count[child] += 1
            self._xor[child] ^= int(path, 16)
        group[path] = part

    def discard_path(self, path: str) -> None:
        group = self._by_top.get(path[:2])
        if group is not None and group.pop(path, None) is not None:
            child = int(path[0], 16)
            self._count[child] -= 1
            self._xor[child] ^= int(path, 16)

    def take_child(self, digit: str) -> dict[str, str]:
        """Remove and return (path -> part) every part whose path starts with `digit`."""
        taken: dict[str, str] = {}
        for second in "0123456789abcdef":
            group = self._by_top.pop(digit + second, None)
            if group:
                taken.update(group)
        child = int(digit, 16)
        self._count[child] = 0
        self._xor[child] = 0
        return taken

    def iter_under(self, prefix: str) -> Iterator[tuple[str, str]]:
        """(path, part) for the parts under `prefix`, without copying them all first."""
        for top, group in list(self._by_top.items()):
            if top.startswith(prefix) or (len(prefix) > 2 and prefix.startswith(top)):
                for path, part in list(group.items()):
                    if path.startswith(prefix):
                        yield path, part

    def under(self, prefix: str) -> dict[str, str]:
        """Path -> part for the parts under `prefix`."""
        if len(prefix) >= 2:
            group = self._by_top.get(prefix[:2], {})
            return {p: part for p, part in group.items() if p.startswith(prefix)}
        found: dict[str, str] = {}
        for top, group in self._by_top.items():
            if top.startswith(prefix):
                found.update(group)
        return found

    def digest(self, prefix: str) -> Digest:
        if prefix == "":
            return tuple(zip(self._count, self._xor))
        return digest(self.under(prefix), prefix)

    def count(self, prefix: str) -> int:
        if prefix == "":
            return sum(self._count)
        if len(prefix) == 1:
            return self._count[int(prefix, 16)]
        if len(prefix) >= 2:
            return sum(1 for p in self._by_top.get(prefix[:2], {}) if p.startswith(prefix))
        return sum(len(g) for top, g in self._by_top.items() if top.startswith(prefix))
