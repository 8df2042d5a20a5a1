# -*- test-case-name: tests.unit.test_crypto -*-
"""Tests for L{dsss.crypto.parts}, L{dsss.crypto.manifest} and L{dsss.crypto.keys}."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings
from nacl.public import PrivateKey, SealedBox

from dsss.crypto.keys import (
    HEADER,
    KeyFileError,
    generate_key_file,
    load_key_file,
    parse_public_key,
    public_key_hex,
)
from dsss.crypto.manifest import (
    MAGIC,
    MAX_NAME,
    NONCE_BYTES,
    SEALED_KEY_BYTES,
    Manifest,
    PartRef,
    open_manifest,
    reseal_for,
    seal_manifest,
)
from dsss.crypto.parts import CIPHER, FILE_ID_BYTES, KEY_BYTES, TAG_BYTES, decrypt_part, encrypt_part
from dsss.errors import AccessDenied, IntegrityError, LocalUsageError, RemoteProtocolError, WrongKey
from dsss.model import block_hash

SETTINGS = settings(max_examples=100, deadline=None, database=None)

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))
FID = bytes(range(100, 116))
FID2 = bytes(range(200, 216))


# --- parts ------------------------------------------------------------------------------------


def test_constants() -> None:
    assert KEY_BYTES == 32 and TAG_BYTES == 16 and FILE_ID_BYTES == 16
    assert CIPHER == "xchacha20poly1305-ietf"


@pytest.mark.parametrize("size", [0, 1, 16, 1000, 65536])
def test_part_round_trip(size: int) -> None:
    plain = os.urandom(size)
    ct = encrypt_part(KEY, FID, 3, plain)
    assert len(ct) == size + TAG_BYTES
    assert decrypt_part(KEY, FID, 3, ct) == plain
    if size >= 16:
        assert plain not in ct


def test_part_encryption_is_deterministic_per_position() -> None:
    plain = b"same bytes" * 10
    assert encrypt_part(KEY, FID, 0, plain) == encrypt_part(KEY, FID, 0, plain)
    assert encrypt_part(KEY, FID, 0, plain) != encrypt_part(KEY, FID, 1, plain)
    assert encrypt_part(KEY, FID, 0, plain) != encrypt_part(KEY, FID2, 0, plain)


def test_part_matches_the_documented_construction() -> None:
    plain = b"hello part"
    idx = (7).to_bytes(8, "big")
    expected = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plain, b"dsss-part-v1" + FID + idx, FID + idx, KEY
    )
    assert encrypt_part(KEY, FID, 7, plain) == expected


@pytest.mark.parametrize("pos", [0, 1, 50, -TAG_BYTES, -1])
def test_tampered_part_refused(pos: int) -> None:
    ct = bytearray(encrypt_part(KEY, FID, 0, b"x" * 100))
    ct[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID, 0, bytes(ct))


def test_truncated_or_extended_part_refused() -> None:
    ct = encrypt_part(KEY, FID, 0, b"x" * 100)
    for bad in (ct[:-1], ct[1:], ct + b"\x00", ct[:TAG_BYTES]):
        with pytest.raises(IntegrityError):
            decrypt_part(KEY, FID, 0, bad)


@pytest.mark.parametrize("bad", [b"", b"abc", b"\x00" * (TAG_BYTES - 1)])
def test_ciphertext_shorter_than_tag_refused(bad: bytes) -> None:
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID, 0, bad)


def test_part_moved_to_another_index_refused() -> None:
    ct = encrypt_part(KEY, FID, 4, b"part four")
    for idx in (0, 3, 5, 2**32 + 4):
        with pytest.raises(IntegrityError):
            decrypt_part(KEY, FID, idx, ct)


def test_part_from_another_file_refused() -> None:
    ct = encrypt_part(KEY, FID, 0, b"part zero")
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID2, 0, ct)


def test_part_with_wrong_key_refused() -> None:
    ct = encrypt_part(KEY, FID, 0, b"part zero")
    with pytest.raises(IntegrityError):
        decrypt_part(KEY2, FID, 0, ct)


def test_part_position_arguments_checked() -> None:
    with pytest.raises(ValueError):
        encrypt_part(KEY, FID[:15], 0, b"x")
    with pytest.raises(ValueError):
        encrypt_part(KEY, FID + b"\x00", 0, b"x")
    with pytest.raises(ValueError):
        encrypt_part(KEY, FID, -1, b"x")
    with pytest.raises(ValueError):
        decrypt_part(KEY, FID, 2**63, b"x" * 32)
    assert decrypt_part(KEY, FID, 2**63 - 1, encrypt_part(KEY, FID, 2**63 - 1, b"last")) == b"last"


@SETTINGS
@given(plain=st.binary(max_size=300), index=st.integers(0, 2**63 - 1), data=st.data())
def test_any_bit_flip_refused(plain: bytes, index: int, data: st.DataObject) -> None:
    ct = bytearray(encrypt_part(KEY, FID, index, plain))
    assert decrypt_part(KEY, FID, index, bytes(ct)) == plain
    pos = data.draw(st.integers(0, len(ct) - 1))
    bit = data.draw(st.integers(0, 7))
    ct[pos] ^= 1 << bit
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID, index, bytes(ct))


# --- manifest JSON --------------------------------------------------------------------------


def make_manifest(name: str = "report.pdf", plains: tuple[int, ...] = (100, 100, 37)) -> Manifest:
    parts = tuple(
        PartRef(block_hash(bytes([i]) * 8), p + TAG_BYTES, p) for i, p in enumerate(plains)
    )
    return Manifest(
        name=name, size=sum(plains), part_size=100, file_id=FID, parts=parts, created=1_700_000_000
    )


def body_of(m: Manifest) -> dict[str, Any]:
    return json.loads(m.to_json())


def from_body(body: Any) -> Manifest:
    return Manifest.from_json(json.dumps(body).encode("utf-8"))


def test_manifest_json_round_trip() -> None:
    m = make_manifest()
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_json(m.to_json()).to_json() == m.to_json()


def test_manifest_json_fields() -> None:
    m = make_manifest()
    body = body_of(m)
    assert body == {
        "version": 1,
        "name": "report.pdf",
        "size": 237,
        "part-size": 100,
        "cipher": CIPHER,
        "file-id": FID.hex(),
        "created": 1_700_000_000,
        "parts": [[p.hash, p.size, p.plain] for p in m.parts],
    }


def test_manifest_unicode_name_round_trips() -> None:
    m = make_manifest(name="résumé – 日本.txt")
    assert Manifest.from_json(m.to_json()).name == "résumé – 日本.txt"


def test_manifest_empty_file() -> None:
    m = make_manifest(plains=())
    assert m.size == 0
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_name_at_max_length_accepted() -> None:
    body = body_of(make_manifest())
    body["name"] = "n" * MAX_NAME
    assert from_body(body).name == "n" * MAX_NAME


def test_manifest_unknown_fields_ignored() -> None:
    body = body_of(make_manifest())
    body["future"] = {"x": 1}
    assert from_body(body) == make_manifest()


def _mutations() -> list[tuple[str, Any]]:
    """(id, function body -> body) pairs, each making the manifest invalid."""

    def setf(key: str, value: Any) -> Any:
        def f(b: dict[str, Any]) -> Any:
            b[key] = value
            return b

        return f

    def delf(key: str) -> Any:
        def f(b: dict[str, Any]) -> Any:
            del b[key]
            return b

        return f

    def part(i: int, j: int, value: Any) -> Any:
        def f(b: dict[str, Any]) -> Any:
            b["parts"][i][j] = value
            return b

        return f

    def whole_part(i: int, value: Any) -> Any:
        def f(b: dict[str, Any]) -> Any:
            b["parts"][i] = value
            return b

        return f

    h = block_hash(b"x")
    return [
        ("version-2", setf("version", 2)),
        ("version-0", setf("version", 0)),
        ("version-str", setf("version", "1")),
        ("version-null", setf("version", None)),
        ("version-missing", delf("version")),
        ("size-too-big", setf("size", 238)),
        ("size-too-small", setf("size", 236)),
        ("size-negative", setf("size", -237)),
        ("size-bool", setf("size", True)),
        ("size-float", setf("size", 237.0)),
        ("size-str", setf("size", "237")),
        ("size-null", setf("size", None)),
        ("size-missing", delf("size")),
        ("part-size-0", setf("part-size", 0)),
        ("part-size-bool", setf("part-size", True)),
        ("part-size-small", setf("part-size", 99)),
        ("created-bool", setf("created", False)),
        ("created-negative", setf("created", -1)),
        ("created-float", setf("created", 1.5)),
        ("created-missing", delf("created")),
        ("cipher-other", setf("cipher", "aes-gcm")),
        ("cipher-missing", delf("cipher")),
        ("file-id-short", setf("file-id", FID[:15].hex())),
        ("file-id-long", setf("file-id", (FID + b"\x00").hex())),
        ("file-id-not-hex", setf("file-id", "zz" * 16)),
        ("file-id-int", setf("file-id", 5)),
        ("file-id-missing", delf("file-id")),
        ("name-slash", setf("name", "a/b")),
        ("name-traversal", setf("name", "../etc/passwd")),
        ("name-root", setf("name", "/")),
        ("name-nul", setf("name", "a\x00b")),
        ("name-too-long", setf("name", "n" * (MAX_NAME + 1))),
        ("name-int", setf("name", 5)),
        ("name-null", setf("name", None)),
        ("name-missing", delf("name")),
        ("parts-dict", setf("parts", {})),
        ("parts-null", setf("parts", None)),
        ("parts-missing", delf("parts")),
        ("part-hash-upper", part(0, 0, h.upper())),
        ("part-hash-63", part(0, 0, h[:63])),
        ("part-hash-65", part(0, 0, h + "0")),
        ("part-hash-int", part(0, 0, 5)),
        ("part-hash-traversal", part(0, 0, "../" * 21 + "x")),
        ("part-size-mismatch", part(0, 1, 100 + TAG_BYTES + 1)),
        ("part-size-no-tag", part(0, 1, 100)),
        ("part-plain-over", whole_part(0, [h, 101 + TAG_BYTES, 101])),
        ("part-plain-negative", whole_part(2, [h, -37 + TAG_BYTES, -37])),
        ("part-size-bool", whole_part(0, [h, True, 100])),
        ("part-plain-bool", whole_part(2, [h, 1 + TAG_BYTES, True])),
        ("part-plain-float", whole_part(2, [h, 37.0 + TAG_BYTES, 37.0])),
        ("part-too-short", whole_part(0, [h, 116])),
        ("part-too-long", whole_part(0, [h, 116, 100, 0])),
        ("part-dict", whole_part(0, {"hash": h, "size": 116, "plain": 100})),
        ("part-str", whole_part(0, h)),
    ]


MUTATIONS = _mutations()


@pytest.mark.parametrize("mutate", [m for _, m in MUTATIONS], ids=[i for i, _ in MUTATIONS])
def test_manifest_validation(mutate: Any) -> None:
    body = mutate(body_of(make_manifest()))
    with pytest.raises(RemoteProtocolError):
        from_body(body)


@pytest.mark.parametrize(
    "data",
    [b"", b"not json", b"\xff\xfe", b"[]", b"null", b"1", b'"manifest"', b"{}", b"{" * 10],
    ids=repr,
)
def test_manifest_not_an_object(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        Manifest.from_json(data)


@pytest.mark.parametrize("version", [True, 1.0], ids=repr)
def test_manifest_version_must_be_the_integer_1(version: Any) -> None:
    body = body_of(make_manifest())
    body["version"] = version
    with pytest.raises(RemoteProtocolError):
        from_body(body)


def test_manifest_deep_nesting_refused() -> None:
    with pytest.raises(RemoteProtocolError):
        Manifest.from_json(b"[" * 100_000 + b"]" * 100_000)


def test_manifest_name_with_lone_surrogate_refused() -> None:
    data = make_manifest().to_json().replace(b'"report.pdf"', b'"a\\ud800b"')
    try:
        m = Manifest.from_json(data)
    except RemoteProtocolError:
        return
    m.to_json()


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, 16, 99, 100, 101, 116, 237, -1, 1.0, 100.0, "", "1", "a/b", FID.hex()])
    | st.text(max_size=12)
)
_JSON_VALUES = _SCALARS | st.lists(_SCALARS, max_size=4) | st.dictionaries(st.text(max_size=4), _SCALARS, max_size=3)


@st.composite
def fuzzed_bodies(draw: st.DrawFn) -> Any:
    body = body_of(make_manifest())
    for key in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=3)):
        body[key] = draw(_JSON_VALUES)
    # Also disturb single fields inside the parts list.
    for _ in range(draw(st.integers(0, 2))):
        if isinstance(body.get("parts"), list) and body["parts"]:
            i = draw(st.integers(0, len(body["parts"]) - 1))
            entry = body["parts"][i]
            if isinstance(entry, list) and entry:
                entry[draw(st.integers(0, len(entry) - 1))] = draw(_SCALARS)
    return body


@SETTINGS
@given(body=fuzzed_bodies())
def test_manifest_fuzzed_fields_parse_or_protocol_error(body: Any) -> None:
    try:
        m = from_body(body)
    except RemoteProtocolError:
        return
    assert Manifest.from_json(m.to_json()) == m
    assert sum(p.plain for p in m.parts) == m.size


@SETTINGS
@given(data=st.binary(max_size=200))
def test_manifest_random_bytes_parse_or_protocol_error(data: bytes) -> None:
    try:
        Manifest.from_json(data)
    except RemoteProtocolError:
        pass


# --- sealing --------------------------------------------------------------------------------

OWNER = PrivateKey.generate()
FRIEND = PrivateKey.generate()
STRANGER = PrivateKey.generate()
FILE_KEY = bytes(range(50, 82))


@pytest.fixture(scope="module")
def blob() -> bytes:
    return seal_manifest(make_manifest(), FILE_KEY, OWNER.public_key)


def test_seal_open_round_trip(blob: bytes) -> None:
    m, key = open_manifest(blob, OWNER)
    assert m == make_manifest()
    assert key == FILE_KEY


def test_blob_layout(blob: bytes) -> None:
    assert blob.startswith(MAGIC)
    assert len(blob) == len(MAGIC) + SEALED_KEY_BYTES + NONCE_BYTES + len(make_manifest().to_json()) + TAG_BYTES
    assert make_manifest().to_json() not in blob
    assert FILE_KEY not in blob


def test_sealing_twice_gives_different_blobs() -> None:
    a = seal_manifest(make_manifest(), FILE_KEY, OWNER.public_key)
    b = seal_manifest(make_manifest(), FILE_KEY, OWNER.public_key)
    assert a != b
    assert open_manifest(a, OWNER)[0] == open_manifest(b, OWNER)[0]


def test_open_with_another_key(blob: bytes) -> None:
    with pytest.raises(WrongKey) as e:
        open_manifest(blob, STRANGER)
    assert str(e.value) == "this file was not stored for your key"
    assert isinstance(e.value, AccessDenied)


HEADER_LEN = len(MAGIC) + SEALED_KEY_BYTES + NONCE_BYTES


@pytest.mark.parametrize(
    "pos",
    [HEADER_LEN - 1, HEADER_LEN - NONCE_BYTES, HEADER_LEN, HEADER_LEN + 10, -1, -TAG_BYTES],
    ids=["nonce-last", "nonce-first", "body-first", "body", "tag-last", "tag-first"],
)
def test_tampered_blob_refused(blob: bytes, pos: int) -> None:
    bad = bytearray(blob)
    bad[pos] ^= 0x80
    with pytest.raises(IntegrityError):
        open_manifest(bytes(bad), OWNER)


@pytest.mark.parametrize("pos", [0, len(MAGIC) - 1])
def test_bad_magic_refused(blob: bytes, pos: int) -> None:
    bad = bytearray(blob)
    bad[pos] ^= 0x01
    with pytest.raises(IntegrityError):
        open_manifest(bytes(bad), OWNER)


def test_tampered_sealed_key_refused(blob: bytes) -> None:
    for pos in (len(MAGIC), len(MAGIC) + 40, len(MAGIC) + SEALED_KEY_BYTES - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises((IntegrityError, WrongKey)):
            open_manifest(bytes(bad), OWNER)


@pytest.mark.parametrize("cut", [0, 1, len(MAGIC), HEADER_LEN, HEADER_LEN + TAG_BYTES - 1, -1])
def test_truncated_blob_refused(blob: bytes, cut: int) -> None:
    with pytest.raises(IntegrityError):
        open_manifest(blob[:cut], OWNER)


def test_extended_blob_refused(blob: bytes) -> None:
    with pytest.raises(IntegrityError):
        open_manifest(blob + b"\x00", OWNER)


def test_authentic_blob_with_invalid_manifest_refused() -> None:
    sealed = SealedBox(OWNER.public_key).encrypt(FILE_KEY)
    nonce = b"\x01" * NONCE_BYTES
    body = json.dumps({"version": 1, "name": "x/y"}).encode()
    ct = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, MAGIC + sealed, nonce, FILE_KEY)
    with pytest.raises(RemoteProtocolError):
        open_manifest(MAGIC + sealed + nonce + ct, OWNER)


@settings(max_examples=50, deadline=None, database=None)
@given(data=st.data())
def test_any_byte_change_refused(blob: bytes, data: st.DataObject) -> None:
    pos = data.draw(st.integers(0, len(blob) - 1))
    delta = data.draw(st.integers(1, 255))
    bad = bytearray(blob)
    bad[pos] ^= delta
    with pytest.raises((IntegrityError, WrongKey)):
        open_manifest(bytes(bad), OWNER)


def test_reseal_for_a_second_key(blob: bytes) -> None:
    shared = reseal_for(blob, OWNER, FRIEND.public_key)
    m, key = open_manifest(shared, FRIEND)
    assert m == make_manifest()
    assert key == FILE_KEY
    # The original still opens for its owner only.
    assert open_manifest(blob, OWNER)[0] == m
    with pytest.raises(WrongKey):
        open_manifest(blob, FRIEND)
    with pytest.raises(WrongKey):
        open_manifest(shared, OWNER)
    assert block_hash(shared) != block_hash(blob)


def test_reseal_needs_a_key_that_opens_it(blob: bytes) -> None:
    with pytest.raises(WrongKey):
        reseal_for(blob, STRANGER, FRIEND.public_key)


# --- key files ------------------------------------------------------------------------------


def test_generate_key_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    key = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key_file(path).encode() == key.encode()
    assert f"{HEADER} {bytes(key).hex()}" in path.read_text()
    # Nothing but the key is left in the directory (no temporary files).
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_generate_key_file_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        generate_key_file(tmp_path / "key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_generate_key_file_creates_private_parent(tmp_path: Path) -> None:
    path = tmp_path / "config" / "dsss" / "key"
    generate_key_file(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_key_file(path) is not None


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "key"
    first = generate_key_file(path)
    content = path.read_bytes()
    with pytest.raises(KeyFileError):
        generate_key_file(path)
    assert path.read_bytes() == content
    assert load_key_file(path).encode() == first.encode()
    assert [p.name for p in tmp_path.iterdir()] == ["key"]


def test_generate_refuses_to_overwrite_any_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"precious data\n")
    with pytest.raises(KeyFileError):
        generate_key_file(path)
    assert path.read_bytes() == b"precious data\n"


def test_generate_refuses_when_the_file_appears_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The existence check passes, then someone creates the file before the write: still refused.
    path = tmp_path / "key"
    real_exists = Path.exists

    def exists_then_create(self: Path) -> bool:
        result = real_exists(self)
        if self == path and not result:
            path.write_bytes(b"raced\n")
        return result

    monkeypatch.setattr(Path, "exists", exists_then_create)
    with pytest.raises(KeyFileError):
        generate_key_file(path)
    monkeypatch.undo()
    assert path.read_bytes() == b"raced\n"


def test_load_key_file_round_trip(tmp_path: Path) -> None:
    key = PrivateKey.generate()
    path = tmp_path / "key"
    path.write_text(f"# comment\n\n   \n{HEADER} {bytes(key).hex()}\n# trailing\n")
    assert bytes(load_key_file(path)) == bytes(key)


def test_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="no key at"):
        load_key_file(tmp_path / "nope")


GOOD_HEX = "11" * 32


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"# only a comment\n",
        b"garbage\n",
        f"{GOOD_HEX}\n".encode(),
        f"dsss-key-v2 {GOOD_HEX}\n".encode(),
        f"{HEADER} {GOOD_HEX[:-2]}\n".encode(),
        f"{HEADER} {GOOD_HEX}00\n".encode(),
        f"{HEADER} {'zz' * 32}\n".encode(),
        f"{HEADER} {GOOD_HEX} extra\n".encode(),
        f"{HEADER}\n".encode(),
        f"garbage\n{HEADER} {GOOD_HEX}\n".encode(),
        b"\xff\xfe\x00binary",
        ("# clé\n" + f"{HEADER} {GOOD_HEX}\n").encode("utf-8"),
    ],
    ids=repr,
)
def test_garbage_key_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        load_key_file(path)


def test_key_file_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        load_key_file(tmp_path)


def test_key_file_error_is_a_local_usage_error() -> None:
    assert issubclass(KeyFileError, LocalUsageError)
    assert KeyFileError.exit_code == 2


def test_public_key_hex_round_trip() -> None:
    key = PrivateKey.generate()
    text = public_key_hex(key)
    assert text == bytes(key.public_key).hex()
    assert public_key_hex(key.public_key) == text
    assert bytes(parse_public_key(text)) == bytes(key.public_key)
    assert bytes(parse_public_key(f"  {text}\n")) == bytes(key.public_key)


@pytest.mark.parametrize("text", ["", "zz" * 32, "11" * 31, "11" * 33])
def test_parse_public_key_refuses_garbage(text: str) -> None:
    with pytest.raises(LocalUsageError):
        parse_public_key(text)


# --- inline manifests (version 2): a small file inside its manifest ---------------------------


def make_inline(plain: bytes = b"small file\n", part_size: int = 1024 * 1024) -> Manifest:
    return Manifest(name="note.txt", size=len(plain), part_size=part_size, file_id=FID, parts=(),
                    created=1_700_000_000, inline=encrypt_part(KEY, FID, 0, plain))


def test_inline_manifest_fields_and_round_trip() -> None:
    m = make_inline()
    body = body_of(m)
    assert body["version"] == 2 and body["parts"] == []
    # The inline data is the file's only part, encrypted exactly as part 0 would be, in base64.
    assert base64.b64decode(body["inline"]) == encrypt_part(KEY, FID, 0, b"small file\n")
    back = Manifest.from_json(m.to_json())
    assert back == m and back.inline is not None and back.version == 2
    assert decrypt_part(KEY, FID, 0, back.inline) == b"small file\n"
    blob = seal_manifest(m, FILE_KEY, OWNER.public_key)
    opened, key = open_manifest(blob, OWNER)
    assert opened == m and key == FILE_KEY
    assert b"small file" not in blob


def test_manifests_without_inline_data_keep_version_1() -> None:
    """What the client wrote before inline manifests existed is still written and read alike."""
    assert body_of(make_manifest())["version"] == 1 and "inline" not in body_of(make_manifest())
    h = block_hash(b"p")
    old = (b'{"version":1,"name":"a.txt","size":5,"part-size":1048576,'
           b'"cipher":"xchacha20poly1305-ietf","file-id":"' + FID.hex().encode() +
           b'","created":1795751429,"parts":[["' + h.encode() + b'",21,5]]}')
    m = Manifest.from_json(old)
    assert m.inline is None and m.version == 1 and m.parts == (PartRef(h, 21, 5),)
    assert m.to_json() == old
    # An "inline" key in a version 1 body is an unknown key: ignored.
    assert Manifest.from_json(old[:-1] + b',"inline":"AAAA"}') == m


def _inline_mutations() -> list[tuple[str, Any]]:
    good = body_of(make_inline())
    h = block_hash(b"x")

    def with_(**changes: Any) -> dict[str, Any]:
        b = dict(good)
        for k, v in changes.items():
            key = k.replace("_", "-")
            if v is None:
                b.pop(key, None)
            else:
                b[key] = v
        return b

    return [
        ("missing", with_(inline=None)),
        ("not-a-string", with_(inline=5)),
        ("not-base64", with_(inline="!!!!")),
        ("base64-with-junk", with_(inline=good["inline"] + "\n")),
        ("too-long", with_(size=good["size"] - 1)),
        ("too-short", with_(size=good["size"] + 1)),
        ("also-parts", with_(parts=[[h, 27, 11]])),
        ("bigger-than-part-size", with_(**{"part_size": good["size"] - 1})),
        ("version-1-without-parts", with_(version=1)),
    ]


@pytest.mark.parametrize("body", [b for _, b in _inline_mutations()], ids=[i for i, _ in _inline_mutations()])
def test_inline_manifest_validation(body: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        from_body(body)


def test_inline_manifest_cannot_also_list_parts() -> None:
    m = make_manifest()
    bad = Manifest(name=m.name, size=m.size, part_size=m.part_size, file_id=FID, parts=m.parts,
                   created=1, inline=b"x" * 20)
    with pytest.raises(ValueError):
        bad.to_json()


def test_inline_part_bound_to_its_file_and_position() -> None:
    """The inline data is a part: moved into another file (other file id) it fails its tag."""
    m = make_inline()
    assert m.inline is not None
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID2, 0, m.inline)
    with pytest.raises(IntegrityError):
        decrypt_part(KEY, FID, 1, m.inline)


def test_inline_manifest_reseals_for_another_key_with_its_data() -> None:
    blob = seal_manifest(make_inline(), FILE_KEY, OWNER.public_key)
    shared = reseal_for(blob, OWNER, FRIEND.public_key)
    m, key = open_manifest(shared, FRIEND)
    assert m == make_inline() and key == FILE_KEY and m.inline is not None
    assert decrypt_part(KEY, FID, 0, m.inline) == b"small file\n"
    with pytest.raises(WrongKey):
        open_manifest(shared, OWNER)


def test_manifest_of_the_older_format_is_refused_clearly() -> None:
    """A manifest written by the DSSS that addressed by plain BLAKE3 (magic DSSSM\\x01), sealed
    and authentic, is refused with an error naming its format and what to do."""
    from dsss.crypto.manifest import OldManifest

    old_magic = b"DSSSM\x01"
    assert MAGIC == b"DSSSM\x02"
    sealed = SealedBox(OWNER.public_key).encrypt(FILE_KEY)
    nonce = b"\x02" * NONCE_BYTES
    ct = bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(
        make_manifest().to_json(), old_magic + sealed, nonce, FILE_KEY
    )
    with pytest.raises(OldManifest, match=r"format 1.*format 2.*store it again") as e:
        open_manifest(old_magic + sealed + nonce + ct, OWNER)
    assert e.value.code == "old-manifest" and e.value.exit_code != 0
