# -*- test-case-name: tests.unit.test_erasure -*-
"""Erasure coding of a part's ciphertext into k-of-n shares (zfec), and back.

A part stored with coding k/n is cut into k equal pieces (the last one padded with zero bytes)
and n - k parity pieces are computed from them; any k of the n shares give the part back. The
first k shares are the pieces themselves, so a get that fetches those needs no decoding. Each
share is stored once, on its own agent, under its share ID (`dsss.model.share_id`): a file
coded 2/4 survives the loss of any two agents, as three replicas do, and takes twice its size
on the network instead of three times.

Coding and decoding are pure functions of their inputs (zfec is deterministic), so a repair
that decodes a part from k shares and encodes it again gets back exactly the shares that were
lost, with the IDs the manifest names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import zfec

from dsss.errors import DSSSError

MAX_SHARES = 16
"""Most shares a part may be coded into (zfec allows 256; each share costs a placement, an
introduction and an agent)."""

_CODING_RE = re.compile(r"\A([0-9]{1,2})\s*(?:/|-of-|of)\s*([0-9]{1,2})\Z")  # ASCII digits only


class CodingError(DSSSError):
    code = "bad-coding"
    exit_code = 2


@dataclass(frozen=True)
class Coding:
    """k of n: a part becomes n shares, any k of which give it back."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not (isinstance(self.k, int) and isinstance(self.n, int)):
            raise CodingError("erasure coding needs whole numbers K/N")
        if not 2 <= self.k < self.n <= MAX_SHARES:
            raise CodingError(
                f"erasure coding K/N needs 2 <= K < N <= {MAX_SHARES} (got {self.k}/{self.n}); "
                "for whole copies use replicas"
            )

    @classmethod
    def parse(cls, text: str) -> "Coding":
        """`2/4`, `2-of-4` or `2of4`."""
        m = _CODING_RE.match(text.strip())
        if not m:
            raise CodingError(f"erasure coding must look like K/N, say 2/4 (got {text!r})")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def tolerates(self) -> int:
        """How many of a part's shares (agents) may be lost."""
        return self.n - self.k

    def __str__(self) -> str:
        return f"{self.k}/{self.n}"


def share_size(size: int, k: int) -> int:
    """The length of each share of `size` bytes coded with k pieces (at least 1)."""
    return max(1, -(-size // k))


def encode(data: bytes, coding: Coding) -> list[bytes]:
    """The n shares of `data`: the k pieces, then the n - k parity pieces."""
    k, n = coding.k, coding.n
    size = share_size(len(data), k)
    view = memoryview(data)
    pieces: list[bytes | memoryview] = [view[i * size : (i + 1) * size] for i in range(k)]
    for i, piece in enumerate(pieces):
        if len(piece) < size:  # the tail: padded with zero bytes (zfec needs equal pieces)
            pieces[i] = bytes(piece) + bytes(size - len(piece))
    parity = zfec.Encoder(k, n).encode(pieces, list(range(k, n)))
    return [bytes(p) for p in pieces] + list(parity)


def decode(shares: Mapping[int, bytes], coding: Coding, size: int) -> bytes:
    """`size` bytes back from any k of their shares (share number -> bytes). ValueError if
    there are fewer than k, or a share has a bad number or length."""
    k, n = coding.k, coding.n
    length = share_size(size, k)
    if any(not 0 <= i < n for i in shares):
        raise ValueError(f"share numbers must be 0 to {n - 1}")
    if len(shares) < k:
        raise ValueError(f"need {k} shares to decode, have {len(shares)}")
    if any(len(s) != length for s in shares.values()):
        raise ValueError(f"every share of a {size}-byte part is {length} bytes")
    if all(i in shares for i in range(k)):
        pieces = [shares[i] for i in range(k)]
    else:
        numbers = sorted(shares)[:k]
        pieces = zfec.Decoder(k, n).decode([shares[i] for i in numbers], numbers)
    data = b"".join(pieces)
    return data if len(data) == size else data[:size]
