# -*- test-case-name: tests.unit.test_proofs -*-
"""Tests for L{dsss.proofs}: tree addresses, the outboard, and storage proofs."""

from __future__ import annotations

import os
import random

import blake3
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsss import proofs
from dsss.errors import RemoteProtocolError
from dsss.proofs import HASH_SIZE, LEAF_SIZE, ProofError, TreeHasher

SETTINGS = settings(max_examples=60, deadline=None, database=None)
FEWER = settings(max_examples=12, deadline=None, database=None)
MAX_PART = 16 * 1024 * 1024


# --- an independent reference: RFC 6962's recursive definition ---------------------------------


def _ref_root(leaves: list[bytes]) -> bytes:
    if len(leaves) == 1:
        return blake3.blake3(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return blake3.blake3(b"\x01" + _ref_root(leaves[:k]) + _ref_root(leaves[k:])).digest()


def _ref_leaves(data: bytes) -> list[bytes]:
    return [data[i : i + LEAF_SIZE] for i in range(0, len(data), LEAF_SIZE)] or [b""]


def ref_address(data: bytes) -> str:
    root = _ref_root(_ref_leaves(data))
    return blake3.blake3(b"dsss-tree-v1" + len(data).to_bytes(8, "little") + root).hexdigest()


def _ref_path(leaves: list[bytes], index: int) -> list[bytes]:
    """RFC 6962's audit path for leaf `index`, bottom up."""
    if len(leaves) == 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if index < k:
        return _ref_path(leaves[:k], index) + [_ref_root(leaves[k:])]
    return _ref_path(leaves[k:], index - k) + [_ref_root(leaves[:k])]


def honest_proof(data: bytes, nonce: bytes) -> bytes:
    """A holder's answer, built the way a store builds it: leaf from the blob, siblings from the
    outboard at `sibling_nodes`."""
    size = len(data)
    index = proofs.challenge_index(size, nonce)
    start, end = proofs.leaf_range(size, index)
    outboard = TreeHasher(data).outboard()
    sibs = [outboard[p * HASH_SIZE : (p + 1) * HASH_SIZE] for p in proofs.sibling_nodes(size, index)]
    return proofs.prove(size, index, data[start:end], sibs)


# --- shape --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, leaves",
    [(0, 1), (1, 1), (LEAF_SIZE - 1, 1), (LEAF_SIZE, 1), (LEAF_SIZE + 1, 2), (3 * LEAF_SIZE, 3), (MAX_PART, 1024)],
)
def test_leaf_count(size: int, leaves: int) -> None:
    assert proofs.leaf_count(size) == leaves


def test_leaf_ranges_cover_the_blob() -> None:
    size = 5 * LEAF_SIZE + 7
    ranges = [proofs.leaf_range(size, i) for i in range(proofs.leaf_count(size))]
    assert ranges[0] == (0, LEAF_SIZE) and ranges[-1] == (5 * LEAF_SIZE, size)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ProofError):
        proofs.leaf_range(size, 6)


def test_largest_part_proof_fits_the_control_line() -> None:
    """A PROOF line for the largest part stays within the control channel's PROOF limit."""
    longest = max(proofs.proof_length(MAX_PART, i) for i in (0, 511, 1023))
    assert longest == LEAF_SIZE + 10 * HASH_SIZE
    b64 = 4 * -(-longest // 3)
    assert len(f"PROOF {MAX_PART} ") + b64 <= 24576


def test_challenge_index_is_the_nonce_modulo_the_leaf_count() -> None:
    nonce = (1000).to_bytes(16, "big")
    assert proofs.challenge_index(7 * LEAF_SIZE, nonce) == 1000 % 7
    assert proofs.challenge_index(0, nonce) == 0
    with pytest.raises(ProofError):
        proofs.challenge_index(10, b"short")


def test_proof_error_is_a_protocol_error() -> None:
    assert issubclass(ProofError, RemoteProtocolError)


# --- the address ---------------------------------------------------------------------------------


@SETTINGS
@given(data=st.binary(max_size=3 * LEAF_SIZE + 5))
def test_address_matches_rfc6962_reference(data: bytes) -> None:
    assert proofs.address(data) == ref_address(data)


@pytest.mark.parametrize(
    "size", [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 2 * LEAF_SIZE, 5 * LEAF_SIZE + 3, 8 * LEAF_SIZE]
)
def test_address_at_boundaries_matches_reference(size: int) -> None:
    data = os.urandom(size)
    assert proofs.address(data) == ref_address(data)


def test_address_of_empty_blob_is_pinned() -> None:
    """The empty blob's address, computed by hand from the definition."""
    leaf = blake3.blake3(b"\x00").digest()
    want = blake3.blake3(b"dsss-tree-v1" + bytes(8) + leaf).hexdigest()
    assert proofs.address(b"") == want
    assert want != blake3.blake3(b"").hexdigest()


def test_address_commits_to_the_size() -> None:
    """Two sizes never share a tree at one address, even when the leaves would coincide."""
    assert proofs.address(b"\x00" * LEAF_SIZE) != proofs.address(b"\x00" * (LEAF_SIZE - 1))


@FEWER
@given(
    data=st.binary(min_size=0, max_size=4 * LEAF_SIZE + 100),
    cuts=st.lists(st.integers(min_value=0, max_value=4 * LEAF_SIZE + 100), max_size=8),
)
def test_incremental_hashing_any_split(data: bytes, cuts: list[int]) -> None:
    points = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    h = TreeHasher()
    for a, b in zip(points, points[1:]):
        h.update(memoryview(data)[a:b])
    assert h.size == len(data)
    assert h.hexdigest() == proofs.address(data)
    assert h.outboard() == TreeHasher(data).outboard()


def test_hexdigest_does_not_end_the_hasher() -> None:
    data = os.urandom(2 * LEAF_SIZE + 9)
    h = TreeHasher()
    h.update(data[:100])
    assert h.hexdigest() == proofs.address(data[:100])
    h.update(data[100:])
    assert h.hexdigest() == proofs.address(data)


def test_update_takes_bytearray_and_multibyte_views() -> None:
    import array

    arr = array.array("I", range(5000))
    h = TreeHasher()
    h.update(memoryview(arr))
    assert h.hexdigest() == proofs.address(arr.tobytes())
    assert TreeHasher(bytearray(b"abc")).hexdigest() == proofs.address(b"abc")


@pytest.mark.parametrize("size", [0, 1, LEAF_SIZE, 3 * LEAF_SIZE + 1, 9 * LEAF_SIZE])
def test_outboard_is_every_node_and_checks_against_the_address(size: int) -> None:
    data = os.urandom(size)
    h = TreeHasher(data)
    ob = h.outboard()
    assert len(ob) == proofs.outboard_length(size)
    assert ob[-HASH_SIZE:] == _ref_root(_ref_leaves(data))
    assert proofs.check_outboard(h.hexdigest(), size, ob)
    flipped = bytearray(ob)
    flipped[0] ^= 1
    assert not proofs.check_outboard(h.hexdigest(), size, bytes(flipped))
    assert not proofs.check_outboard(h.hexdigest(), size, ob[:-1])
    assert not proofs.check_outboard(proofs.address(b"other"), size, ob)


# --- proofs: round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 7 * LEAF_SIZE + 3, 16 * LEAF_SIZE])
def test_every_leaf_round_trips(size: int) -> None:
    data = os.urandom(size)
    addr = proofs.address(data)
    leaves = _ref_leaves(data)
    for index in range(proofs.leaf_count(size)):
        nonce = index.to_bytes(16, "big")
        assert proofs.challenge_index(size, nonce) == index
        proof = honest_proof(data, nonce)
        assert len(proof) == proofs.proof_length(size, index)
        # The siblings are RFC 6962's audit path.
        start, end = proofs.leaf_range(size, index)
        assert proof[end - start :] == b"".join(_ref_path(leaves, index))
        proofs.verify(addr, size, nonce, proof)
        proofs.verify("s" + addr, size, nonce, proof)  # a share ID names the same bytes


@SETTINGS
@given(
    size=st.one_of(
        st.sampled_from([0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 2 * LEAF_SIZE, 3 * LEAF_SIZE]),
        st.integers(min_value=0, max_value=40 * LEAF_SIZE),
        st.integers(min_value=1, max_value=40).map(lambda k: k * LEAF_SIZE),
    ),
    nonce=st.binary(min_size=16, max_size=16),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_random_sizes_and_nonces_round_trip_and_tamper_fails(size: int, nonce: bytes, seed: int) -> None:
    data = random.Random(seed).randbytes(size)
    addr = proofs.address(data)
    proof = honest_proof(data, nonce)
    proofs.verify(addr, size, nonce, proof)
    # Any one flipped bit anywhere in the proof is refused.
    pos = seed % len(proof) if proof else None
    if pos is not None:
        bad = bytearray(proof)
        bad[pos] ^= 1 << (seed % 8)
        with pytest.raises(ProofError):
            proofs.verify(addr, size, nonce, bytes(bad))


@FEWER
@given(nonce=st.binary(min_size=16, max_size=16))
def test_largest_part(nonce: bytes) -> None:
    data = _BIG
    proof = honest_proof(data, nonce)
    assert len(proof) == LEAF_SIZE + 10 * HASH_SIZE
    proofs.verify(_BIG_ADDR, MAX_PART, nonce, proof)


_BIG = random.Random(17).randbytes(MAX_PART)
_BIG_ADDR = proofs.address(_BIG)


# --- proofs: refused ----------------------------------------------------------------------------

DATA = random.Random(5).randbytes(11 * LEAF_SIZE + 1234)
ADDR = proofs.address(DATA)
SIZE = len(DATA)


def _nonce_for(index: int) -> bytes:
    return index.to_bytes(16, "big")


def test_proof_for_another_leaf_is_refused() -> None:
    """A holder that keeps one leaf cannot answer a challenge for another with it."""
    proof = honest_proof(DATA, _nonce_for(3))
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(4), proof)
    # Same length (two full leaves at the same depth), still refused.
    assert proofs.proof_length(SIZE, 2) == proofs.proof_length(SIZE, 3)
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(2), proof)


def test_proof_for_another_part_is_refused() -> None:
    other = bytearray(DATA)
    other[-1] ^= 1
    proof = honest_proof(bytes(other), _nonce_for(3))
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(3), proof)


@pytest.mark.parametrize("cut", [1, HASH_SIZE, 100])
def test_truncated_or_extended_proof_is_refused(cut: int) -> None:
    proof = honest_proof(DATA, _nonce_for(5))
    with pytest.raises(ProofError, match="bytes"):
        proofs.verify(ADDR, SIZE, _nonce_for(5), proof[:-cut])
    with pytest.raises(ProofError, match="bytes"):
        proofs.verify(ADDR, SIZE, _nonce_for(5), proof + b"\x00" * cut)


def test_proof_from_the_other_end_of_the_tree_is_refused() -> None:
    """The last leaf's proof (short leaf, shallow path) offered for the first leaf, and the first
    leaf's for the last: refused, whatever their lengths."""
    last = proofs.leaf_count(SIZE) - 1
    first_proof = honest_proof(DATA, _nonce_for(0))
    last_proof = honest_proof(DATA, _nonce_for(last))
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(0), last_proof)
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(last), first_proof)
    # Padded or cut to the length the challenge expects: still refused.
    want = proofs.proof_length(SIZE, 0)
    forged = (last_proof + bytes(want))[:want]
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(0), forged)


def test_swapped_sibling_order_is_refused() -> None:
    proof = honest_proof(DATA, _nonce_for(5))
    leaf_len = LEAF_SIZE
    sibs = [proof[leaf_len + i : leaf_len + i + HASH_SIZE] for i in range(0, len(proof) - leaf_len, HASH_SIZE)]
    assert len(sibs) >= 2
    swapped = proof[:leaf_len] + b"".join([sibs[1], sibs[0], *sibs[2:]])
    with pytest.raises(ProofError):
        proofs.verify(ADDR, SIZE, _nonce_for(5), swapped)


@pytest.mark.parametrize("claimed", [SIZE - 1, SIZE + 1, SIZE - LEAF_SIZE, SIZE + LEAF_SIZE, 0])
def test_wrong_size_is_refused(claimed: int) -> None:
    """The address commits to the size: a holder cannot claim another size, even with a proof
    built for it from the true leaves."""
    nonce = _nonce_for(0)
    with pytest.raises(ProofError):
        proofs.verify(ADDR, claimed, nonce, honest_proof(DATA, nonce))
    # A proof made honestly for a blob of the claimed size (the prefix) fails against ADDR.
    prefix = DATA[:claimed]
    with pytest.raises(ProofError):
        proofs.verify(ADDR, claimed, nonce, honest_proof(prefix, nonce))


@pytest.mark.parametrize("size", [-1, 2**62 + 1, True, "5"])
def test_bad_size_or_address_is_refused(size: object) -> None:
    with pytest.raises(ProofError):
        proofs.verify(ADDR, size, _nonce_for(0), b"")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["", "A" * 64, "g" * 64, "x" + "a" * 64, "a" * 63, None])
def test_bad_address_is_refused(bad: object) -> None:
    with pytest.raises(ProofError):
        proofs.verify(bad, SIZE, _nonce_for(0), honest_proof(DATA, _nonce_for(0)))  # type: ignore[arg-type]


def test_prove_refuses_wrong_lengths() -> None:
    with pytest.raises(ProofError):
        proofs.prove(SIZE, 0, DATA[: LEAF_SIZE - 1], [b"\x00" * 32] * proofs.depth(SIZE, 0))
    with pytest.raises(ProofError):
        proofs.prove(SIZE, 0, DATA[:LEAF_SIZE], [b"\x00" * 32] * (proofs.depth(SIZE, 0) - 1))
    with pytest.raises(ProofError):
        proofs.prove(SIZE, 0, DATA[:LEAF_SIZE], [b"\x00" * 31] * proofs.depth(SIZE, 0))


def test_verify_is_cheap() -> None:
    """Checking a proof of the largest part costs one leaf and ten parent hashes: far less than
    hashing the part."""
    import time

    nonce = _nonce_for(700)
    proof = honest_proof(_BIG, nonce)
    best_verify = min(_timed(lambda: proofs.verify(_BIG_ADDR, MAX_PART, nonce, proof), time) for _ in range(20))
    best_hash = min(_timed(lambda: blake3.blake3(_BIG).digest(), time) for _ in range(3))
    assert best_verify * 50 < best_hash


def _timed(f: object, time: object) -> float:
    t0 = time.perf_counter()  # type: ignore[attr-defined]
    f()  # type: ignore[operator]
    return time.perf_counter() - t0  # type: ignore[attr-defined, no-any-return]
