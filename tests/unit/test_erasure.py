"""Erasure coding of parts (dsss.erasure) and the erasure-coded manifest (version 3)."""

from __future__ import annotations

import itertools
import json
import os
import secrets

import pytest
from nacl.public import PrivateKey

from dsss.crypto.manifest import Manifest, PartRef, open_manifest, seal_manifest
from dsss.crypto.parts import TAG_BYTES
from dsss.erasure import MAX_SHARES, Coding, CodingError, decode, encode, share_size
from dsss.errors import RemoteProtocolError
from dsss.model import share_id


@pytest.mark.parametrize("text, k, n", [("2/4", 2, 4), ("2-of-4", 2, 4), ("3of10", 3, 10), (" 4/6 ", 4, 6)])
def test_coding_parses(text: str, k: int, n: int) -> None:
    c = Coding.parse(text)
    assert (c.k, c.n, c.tolerates, str(c)) == (k, n, n - k, f"{k}/{n}")


@pytest.mark.parametrize("text", ["", "2", "4/2", "2/2", "1/3", "0/4", "2/17", "a/b", "2/4/6", "-2/4",
                                  "\u0662/4", "2/\u00b2"])
def test_bad_codings_are_refused_with_a_clear_error(text: str) -> None:
    with pytest.raises(CodingError, match="K/N|erasure"):
        Coding.parse(text)


def test_share_size_rounds_up() -> None:
    assert share_size(10, 2) == 5 and share_size(11, 2) == 6 and share_size(0, 3) == 1


@pytest.mark.parametrize("size", [1, 2, 3, 1000, 4096 + TAG_BYTES, 65537])
@pytest.mark.parametrize("k, n", [(2, 4), (3, 5), (4, 6)])
def test_any_k_shares_give_the_data_back(size: int, k: int, n: int) -> None:
    data = os.urandom(size)
    coding = Coding(k, n)
    shares = encode(data, coding)
    assert len(shares) == n and {len(s) for s in shares} == {share_size(size, k)}
    # The first k shares are the data itself (padded): a get of those needs no decoding.
    assert b"".join(shares[:k])[:size] == data
    for numbers in itertools.combinations(range(n), k):
        assert decode({i: shares[i] for i in numbers}, coding, size) == data


def test_coding_is_deterministic_so_a_rebuilt_share_has_its_old_id() -> None:
    data = os.urandom(5000)
    coding = Coding(2, 4)
    first = encode(data, coding)
    rebuilt = encode(decode({1: first[1], 3: first[3]}, coding, len(data)), coding)
    assert [share_id(s) for s in rebuilt] == [share_id(s) for s in first]


def test_decode_refuses_too_few_or_bad_shares() -> None:
    coding = Coding(2, 4)
    shares = encode(b"x" * 100, coding)
    with pytest.raises(ValueError, match="need 2"):
        decode({0: shares[0]}, coding, 100)
    with pytest.raises(ValueError, match="50 bytes"):
        decode({0: shares[0], 1: shares[1][:-1]}, coding, 100)
    with pytest.raises(ValueError, match="0 to 3"):
        decode({0: shares[0], 4: shares[1]}, coding, 100)


def test_decoded_data_depends_on_every_share_used() -> None:
    """A changed share changes what comes out (share IDs catch it before decoding)."""
    coding = Coding(2, 4)
    data = os.urandom(1000)
    shares = encode(data, coding)
    bad = bytearray(shares[2])
    bad[0] ^= 1
    assert decode({2: bytes(bad), 3: shares[3]}, coding, 1000) != data


# --- the manifest --------------------------------------------------------------------------------


OWNER = PrivateKey.generate()


def coded_manifest(nparts: int = 2, coding: Coding | None = None) -> Manifest:
    coding = coding or Coding(2, 4)
    parts = tuple(
        PartRef("", 100 + TAG_BYTES, 100, tuple(share_id(os.urandom(8)) for _ in range(coding.n)))
        for _ in range(nparts)
    )
    return Manifest(name="f.bin", size=100 * nparts, part_size=100, file_id=secrets.token_bytes(16),
                    parts=parts, created=1, erasure=coding)


def test_an_erasure_coded_manifest_round_trips_as_version_3() -> None:
    m = coded_manifest()
    body = json.loads(m.to_json())
    assert body["version"] == 3 and body["erasure"] == [2, 4]
    assert body["parts"][0][:2] == [100 + TAG_BYTES, 100] and len(body["parts"][0][2]) == 4
    key = secrets.token_bytes(32)
    back, _ = open_manifest(seal_manifest(m, key, OWNER.public_key), OWNER)
    assert back == m and back.erasure == Coding(2, 4)
    assert back.parts[0].blocks == m.parts[0].shares


def test_whole_parts_keep_writing_version_1() -> None:
    ref = PartRef("ab" * 32, 100 + TAG_BYTES, 100)
    m = Manifest(name="f", size=100, part_size=100, file_id=b"\0" * 16, parts=(ref,), created=1)
    assert json.loads(m.to_json())["version"] == 1 and ref.blocks == ("ab" * 32,)


def _mutated(change: object) -> bytes:
    body = json.loads(coded_manifest().to_json())
    change(body)  # type: ignore[operator]
    return json.dumps(body).encode()


@pytest.mark.parametrize("change", [
    lambda b: b.pop("erasure"),
    lambda b: b.update(erasure=[4, 2]),
    lambda b: b.update(erasure=[2, MAX_SHARES + 1]),
    lambda b: b.update(erasure=[2, "4"]),
    lambda b: b.update(erasure=[2, True]),
    lambda b: b["parts"][0][2].pop(),  # 3 shares for 2/4
    lambda b: b["parts"][0][2].__setitem__(1, b["parts"][0][2][0]),  # the same share twice
    lambda b: b["parts"][0][2].__setitem__(0, b["parts"][0][2][0][1:]),  # a plain ID, not a share
    lambda b: b["parts"][0].__setitem__(0, 99),  # ciphertext size does not match
    lambda b: b["parts"][0].__setitem__(2, "s" + "0" * 64),
    lambda b: b["parts"].__setitem__(0, ["s" + "0" * 64, 116, 100]),  # a version 1 part
])
def test_malformed_erasure_coded_manifests_are_refused(change: object) -> None:
    with pytest.raises(RemoteProtocolError):
        Manifest.from_json(_mutated(change))


def test_a_version_1_manifest_may_not_name_shares() -> None:
    body = {"version": 1, "name": "f", "size": 100, "part-size": 100, "cipher": "xchacha20poly1305",
            "file-id": "00" * 16, "created": 1, "parts": [["s" + "0" * 64, 116, 100]]}
    cipher = json.loads(coded_manifest().to_json())["cipher"]
    body["cipher"] = cipher
    with pytest.raises(RemoteProtocolError, match="part 0"):
        Manifest.from_json(json.dumps(body).encode())


def test_a_manifest_mixing_whole_parts_and_shares_cannot_be_written() -> None:
    m = coded_manifest()
    mixed = Manifest(name="f", size=200, part_size=100, file_id=m.file_id,
                     parts=(m.parts[0], PartRef("ab" * 32, 116, 100)), created=1, erasure=Coding(2, 4))
    with pytest.raises(ValueError):
        mixed.to_json()
