# -*- test-case-name: tests.unit.test_wire_control -*-
"""Tests for L{dsss.wire.control}: the server<->agent control line grammar."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsss.errors import BadRequest, RemoteProtocolError
from dsss.model import PeerAddress
from dsss.wire import control as wc
from dsss.wire.control import (
    MAX_HASHES_PER_LINE,
    MAX_LINE,
    MAX_PROOF_LINE,
    MAX_SIZE,
    REPLY_WORDS,
    Audit,
    Bit,
    Error,
    Gone,
    Have,
    Hi,
    IntroductionRequest,
    IntroKey,
    Local,
    Ok,
    Ping,
    Pong,
    Proof,
    Register,
    Space,
    Welcome,
    WhoHas,
    chunked,
    encode,
    is_reply,
    parse_line,
)

H1 = "0123456789abcdef" * 4
H2 = "f" * 64
H3 = "a" * 64
AGENT = "ab" * 32
SIG = "cd" * 64
KEY32 = "0123456789abcdef" * 2
TOKEN = "fe" * 16

FUZZ = settings(max_examples=200, deadline=None, database=None)
SETTINGS = settings(max_examples=100, deadline=None, database=None)
FEWER = settings(max_examples=50, deadline=None, database=None)


# --- valid messages: exact wire form, parse, encode ------------------------------------------

EXAMPLES = [
    (b"Hi " + KEY32.encode(), Hi(KEY32)),
    (
        f"REGISTER {AGENT} 7 1000 600 0.1.0 {SIG}".encode(),
        Register(AGENT, 7, 1000, 600, "0.1.0", SIG),
    ),
    (f"HAVE {H1}".encode(), Have((H1,))),
    (f"HAVE {H1} {H2} {H3}".encode(), Have((H1, H2, H3))),
    (f"GONE {H2}".encode(), Gone((H2,))),
    (f"GONE {H2} {H1}".encode(), Gone((H2, H1))),
    (b"SPACE 1000 250", Space(1000, 250)),
    (f"WHO_HAS {H1}".encode(), WhoHas(H1)),
    (b"LOCAL 10.4.0.2:40000", Local(PeerAddress("10.4.0.2", 40000))),
    (b"LOCAL [fd00::7]:8472", Local(PeerAddress("fd00::7", 8472))),
    (
        f"INTRODUCTION_REQUEST 198.51.100.7:40000 1234 {H1}".encode(),
        IntroductionRequest(PeerAddress("198.51.100.7", 40000), 1234, H1),
    ),
    (
        f"INTRODUCTION_REQUEST [2001:db8::1]:443 0 {H2}".encode(),
        IntroductionRequest(PeerAddress("2001:db8::1", 443), 0, H2),
    ),
    (
        f"INTRODUCTION_REQUEST 198.51.100.7:40000 1234 {H1} 10.1.0.3:5000".encode(),
        IntroductionRequest(PeerAddress("198.51.100.7", 40000), 1234, H1, PeerAddress("10.1.0.3", 5000)),
    ),
    (b"PING", Ping()),
    (f"WELCOME {TOKEN} 15000 4001".encode(), Welcome(TOKEN, 15.0, 4001)),
    (b"1", Bit(True)),
    (b"0", Bit(False)),
    (KEY32.encode(), IntroKey(KEY32)),
    (b"PONG", Pong()),
    (b"OK", Ok()),
    (b"ERROR not-found no part here", Error("not-found", "no part here")),
    (b"ERROR full", Error("full", "")),
    (f"AUDIT {H1} {KEY32}".encode(), Audit(H1, bytes.fromhex(KEY32))),
    (f"AUDIT s{H2} {TOKEN}".encode(), Audit("s" + H2, bytes.fromhex(TOKEN))),
    (b"PROOF 3 YWJj", Proof(3, b"abc")),
    (b"PROOF 17 AAEC", Proof(17, b"\x00\x01\x02")),
    (b"PROOF 0", Proof(0, b"")),
    (b"DIGEST - " + b" ".join([b"0:" + b"0" * 32] * 15 + [b"12:" + b"f" * 32]),
     wc.Digest("", ((0, 0),) * 15 + ((12, 2**128 - 1),))),
    (b"DIGEST 0a7 " + b" ".join([b"3:" + b"0" * 31 + b"1"] * 16), wc.Digest("0a7", ((3, 1),) * 16)),
    (b"DIFF", wc.Diff(())),
    (b"DIFF 0 7- f", wc.Diff(("0", "7-", "f"))),
    (b"RESEND -", wc.Resend("")),
    (b"RESEND 3f", wc.Resend("3f")),
    (b"SYNCED", wc.Synced()),
]


@pytest.mark.parametrize("line,msg", EXAMPLES, ids=[type(m).__name__ for _, m in EXAMPLES])
def test_parse_known_line(line: bytes, msg: wc.Message) -> None:
    assert parse_line(line) == msg


@pytest.mark.parametrize("line,msg", EXAMPLES, ids=[type(m).__name__ for _, m in EXAMPLES])
def test_encode_known_message(line: bytes, msg: wc.Message) -> None:
    assert encode(msg) == line


@pytest.mark.parametrize("line,msg", EXAMPLES, ids=[type(m).__name__ for _, m in EXAMPLES])
def test_cr_before_lf_tolerated(line: bytes, msg: wc.Message) -> None:
    assert parse_line(line + b"\r") == msg


def test_only_one_cr_is_stripped() -> None:
    with pytest.raises(RemoteProtocolError):
        parse_line(b"PING\r\r")


def test_every_message_type_has_an_example() -> None:
    types = {type(m) for _, m in EXAMPLES}
    assert types == set(wc.REPLY_TYPES) | {
        Hi, Register, Have, Gone, Space, Local, WhoHas, IntroductionRequest, Ping, Audit,
        wc.Digest, wc.Resend, wc.Synced,
    }


@pytest.mark.parametrize("line", [
    b"DIGEST - " + b" ".join([b"0:" + b"0" * 32] * 15),  # 15 entries
    b"DIGEST 123456789 " + b" ".join([b"0:" + b"0" * 32] * 16),  # prefix too long
    b"DIGEST A " + b" ".join([b"0:" + b"0" * 32] * 16),  # upper case
    b"DIGEST - " + b" ".join([b"01:" + b"0" * 32] * 16),  # leading zero
    b"DIGEST - " + b" ".join([b"1:" + b"0" * 31] * 16),  # short XOR
    b"DIFF 1 1",  # a digit twice
    b"DIFF 1 1-",
    b"DIFF 10",
    b"DIFF g",
    b"RESEND",
    b"RESEND x",
    b"SYNCED now",
])
def test_digest_messages_reject_malformed(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_line(line)


def test_welcome_heartbeat_is_milliseconds() -> None:
    msg = parse_line(f"WELCOME {TOKEN} 250 9".encode())
    assert msg == Welcome(TOKEN, 0.25, 9)
    assert encode(Welcome(TOKEN, 0.25, 9)) == f"WELCOME {TOKEN} 250 9".encode()


def test_welcome_heartbeat_bounds() -> None:
    assert parse_line(f"WELCOME {TOKEN} 10 1".encode()) == Welcome(TOKEN, 0.01, 1)
    assert parse_line(f"WELCOME {TOKEN} 3600000 65535".encode()) == Welcome(TOKEN, 3600.0, 65535)


def test_values_kept_exactly_as_sent() -> None:
    # The registration signature covers the numbers, so the parser must not alter them, even
    # when free exceeds capacity (consumers clamp).
    assert parse_line(b"SPACE 10 20") == Space(10, 20)
    line = f"REGISTER {AGENT} 1 10 99 v1 {SIG}".encode()
    reg = parse_line(line)
    assert isinstance(reg, Register)
    assert (reg.capacity, reg.free) == (10, 99)
    assert encode(reg) == line
    assert reg.signed_bytes(KEY32) == f"dsss-register-v1 {KEY32} {AGENT} 1 10 99 v1".encode()


def test_numbers_at_their_limits() -> None:
    assert parse_line(f"SPACE {MAX_SIZE} {MAX_SIZE}".encode()) == Space(MAX_SIZE, MAX_SIZE)
    assert parse_line(b"SPACE 0 0") == Space(0, 0)
    reg = parse_line(f"REGISTER {AGENT} 0 0 0 v {SIG}".encode())
    assert isinstance(reg, Register) and reg.seq == 0


def test_have_takes_up_to_the_maximum() -> None:
    hashes = [f"{i:064x}" for i in range(MAX_HASHES_PER_LINE)]
    line = ("HAVE " + " ".join(hashes)).encode()
    assert parse_line(line) == Have(tuple(hashes))
    assert parse_line(line.replace(b"HAVE", b"GONE", 1)) == Gone(tuple(hashes))


def test_line_of_exactly_max_line_accepted() -> None:
    prefix = b"ERROR x "
    line = prefix + b"a" * (MAX_LINE - len(prefix))
    assert len(line) == MAX_LINE
    msg = parse_line(line)
    assert msg == Error("x", "a" * (MAX_LINE - len(prefix)))


def test_line_of_max_line_plus_tolerated_cr_accepted() -> None:
    prefix = b"ERROR x "
    line = prefix + b"a" * (MAX_LINE - len(prefix))
    assert parse_line(line + b"\r") == Error("x", "a" * (MAX_LINE - len(prefix)))


def test_ipv6_address_round_trips_with_brackets() -> None:
    msg = IntroductionRequest(PeerAddress("::1", 80), 5, H1)
    line = encode(msg)
    assert line == f"INTRODUCTION_REQUEST [::1]:80 5 {H1}".encode()
    assert parse_line(line) == msg


# --- malformed lines -------------------------------------------------------------------------

H63 = H1[:63]
H65 = H1 + "0"
HUP = H1.upper()

MALFORMED = [
    # empty and framing
    b"",
    b"\r",
    b" ",
    # unknown verbs, case
    b"FOO",
    b"ping",
    b"Ping",
    b"HI " + KEY32.encode(),
    b"hi " + KEY32.encode(),
    b"ok",
    b"Ok",
    b"who_has " + H1.encode(),
    b"2",
    b"-1",
    KEY32.upper().encode(),
    KEY32[:31].encode(),
    (KEY32 + "0").encode(),
    # wrong arity
    b"PING x",
    b"PONG x",
    b"OK x",
    b"0 x",
    b"1 1",
    (KEY32 + " x").encode(),
    b"WHO_HAS",
    f"WHO_HAS {H1} {H2}".encode(),
    b"Hi",
    f"Hi {KEY32} {KEY32}".encode(),
    b"SPACE 1",
    b"SPACE 1 2 3",
    f"REGISTER {AGENT} 1 10 5 v1".encode(),
    f"REGISTER {AGENT} 1 10 5 v1 {SIG} x".encode(),
    f"WELCOME {TOKEN} 100".encode(),
    f"WELCOME {TOKEN} 100 1 2".encode(),
    "INTRODUCTION_REQUEST 1.2.3.4:5 6".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 6 {H1} x".encode(),
    b"ERROR",
    # non-ASCII
    b"PING\xff",
    "WHO_HAS é".encode("utf-8"),
    b"ERROR x caf\xc3\xa9",
    b"\x80",
    # control characters
    b"PI\x00NG",
    b"PING\x7f",
    b"ERROR x a\x01b",
    b"ERROR x a\tb",
    b"ERROR x a\x1bb",
    b"PI\rNG",
    b"ERROR x a\rb",
    b"PING\n",
    b"ERROR x a\nb",
    # spacing
    b" PING",
    b"PING ",
    b"ERROR x ",
    f"WHO_HAS  {H1}".encode(),
    f"WHO_HAS {H1} ".encode(),
    f"HAVE {H1}  {H2}".encode(),
    b"SPACE 1  2",
    b"PING\x0b",
    b"\x0cPING",
    # bad hashes
    f"WHO_HAS {H63}".encode(),
    f"WHO_HAS {H65}".encode(),
    f"WHO_HAS {HUP}".encode(),
    f"WHO_HAS {'g' * 64}".encode(),
    b"WHO_HAS ../..",
    f"WHO_HAS ../../{H1[:58]}".encode(),
    f"HAVE {H63}".encode(),
    f"HAVE {H1} {H65}".encode(),
    f"HAVE {H1} {HUP}".encode(),
    f"GONE {H1} ../..".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 6 {H63}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 6 {HUP}".encode(),
    # HAVE/GONE counts
    b"HAVE",
    b"GONE",
    ("HAVE " + " ".join([H1] * (MAX_HASHES_PER_LINE + 1))).encode(),
    ("GONE " + " ".join([H2] * (MAX_HASHES_PER_LINE + 1))).encode(),
    # numbers
    b"SPACE +1 2",
    b"SPACE 1 +2",
    b"SPACE -1 2",
    b"SPACE 1 -2",
    b"SPACE 1.5 2",
    b"SPACE 1e3 2",
    b"SPACE 0x10 2",
    b"SPACE 1_000 2",
    b"SPACE x 2",
    b"SPACE 99999999999999999999 1",
    f"SPACE {MAX_SIZE + 1} 1".encode(),
    f"SPACE 1 {MAX_SIZE + 1}".encode(),
    b"SPACE 9223372036854775807 1",
    b"SPACE 18446744073709551616 1",
    f"REGISTER {AGENT} -1 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT} +1 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT} {MAX_SIZE + 1} 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT} 1 -10 5 v1 {SIG}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 -6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 +6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:5 {'9' * 20} {H1}".encode(),
    f"WELCOME {TOKEN} 9 1".encode(),
    f"WELCOME {TOKEN} 3600001 1".encode(),
    f"WELCOME {TOKEN} 100 0".encode(),
    f"WELCOME {TOKEN} 100 65536".encode(),
    f"WELCOME {TOKEN} -100 1".encode(),
    f"WELCOME {TOKEN} 1.5 1".encode(),
    # REGISTER fields
    f"REGISTER {AGENT[:63]} 1 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT}0 1 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT.upper()} 1 10 5 v1 {SIG}".encode(),
    f"REGISTER {AGENT} 1 10 5 v1 {SIG[:127]}".encode(),
    f"REGISTER {AGENT} 1 10 5 v1 {SIG}0".encode(),
    f"REGISTER {AGENT} 1 10 5 v1 {SIG.upper()}".encode(),
    f"REGISTER {AGENT} 1 10 5 v/1 {SIG}".encode(),
    f"REGISTER {AGENT} 1 10 5 {'v' * 33} {SIG}".encode(),
    # Hi / WELCOME tokens
    f"Hi {KEY32[:31]}".encode(),
    f"Hi {KEY32.upper()}".encode(),
    f"Hi {KEY32}0".encode(),
    f"WELCOME {TOKEN.upper()} 100 1".encode(),
    f"WELCOME {TOKEN[:31]} 100 1".encode(),
    # ERROR codes
    b"ERROR Bad text",
    b"ERROR 1x text",
    b"ERROR -x text",
    b"ERROR x_y text",
    ("ERROR " + "x" * 33 + " text").encode(),
    # addresses in INTRODUCTION_REQUEST
    f"INTRODUCTION_REQUEST 1.2.3.4 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4: 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:0 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:65536 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:123456 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:-1 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:+80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 256.1.1.1:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 01.2.3.4:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST host.example:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST localhost:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST ::1:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST [::1] 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST [zz::1]:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST [fe80::1%eth0]:80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST :80 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST - 6 {H1}".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:80 6 {H1} 10.1.0.3".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:80 6 {H1} 0.0.0.0:80".encode(),
    f"INTRODUCTION_REQUEST 1.2.3.4:80 6 {H1} 10.1.0.3:80 10.1.0.4:80".encode(),
    # LOCAL: one address a neighbour can send to
    b"LOCAL",
    b"LOCAL 10.4.0.2",
    b"LOCAL 10.4.0.2:0",
    b"LOCAL 10.4.0.2:1 10.4.0.3:1",
    b"LOCAL host.lan:8472",
    b"LOCAL 0.0.0.0:8472",
    b"LOCAL [::]:8472",
    b"LOCAL 224.0.0.1:8472",
    b"LOCAL [ff02::1]:8472",
    b"LOCAL 255.255.255.255:8472",
    b"LOCAL [fe80::1]:8472",
    # AUDIT and PROOF
    b"AUDIT",
    f"AUDIT {H1}".encode(),
    f"AUDIT {H1} {KEY32} x".encode(),
    f"AUDIT {H1[:-1]} {KEY32}".encode(),
    f"AUDIT {H1} {KEY32[:-1]}".encode(),
    f"AUDIT {H1} {KEY32.upper()}".encode(),
    f"AUDIT {H1} {KEY32}00".encode(),
    b"PROOF",
    b"PROOF x YWJj",
    b"PROOF -1 YWJj",
    b"PROOF 3 YWJj YWJj",
    b"PROOF 3 YWJ",  # bad padding
    b"PROOF 3 YWJj=",
    b"PROOF 3 YW*j",
    b"PROOF 3 YW-j",  # urlsafe alphabet
    b"PROOF 3 YWJ=",  # non-canonical trailing bits
    b"PROOF 3 YR==",
    b"PROOF 3 =",
    b"PROOF 3 ",
    # oversize
    b"ERROR x " + b"a" * MAX_LINE,
    b"P" * (MAX_LINE + 1),
    ("HAVE " + " ".join([H1] * 80)).encode(),
]


@pytest.mark.parametrize("line", MALFORMED, ids=[repr(x[:50]) for x in MALFORMED])
def test_malformed_line_refused(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_line(line)


def test_oversize_refused_before_anything_else() -> None:
    # An otherwise valid ERROR line one byte over the limit is refused for its length.
    prefix = b"ERROR x "
    line = prefix + b"a" * (MAX_LINE + 1 - len(prefix))
    with pytest.raises(RemoteProtocolError, match="longer"):
        parse_line(line)


def test_proof_line_may_be_longer_than_other_lines() -> None:
    """A PROOF reply carries a whole leaf: up to MAX_PROOF_LINE bytes; nothing else may pass
    MAX_LINE, whatever its first word."""
    size_word = b"PROOF 16777216 "
    b64_len = (MAX_PROOF_LINE - len(size_word)) // 4 * 4
    raw = bytes(range(256)) * (b64_len // 4 * 3 // 256 + 1)
    raw = raw[: b64_len // 4 * 3]
    line = size_word + base64.b64encode(raw)
    assert MAX_LINE < len(line) <= MAX_PROOF_LINE
    assert parse_line(line) == Proof(16777216, raw)
    assert encode(Proof(16777216, raw)) == line
    with pytest.raises(wc.LineTooLong):
        parse_line(line + b"A" * (MAX_PROOF_LINE - len(line) + 4))
    for other in (b"PROOFX ", b"ERROR x ", b"PROO "):
        with pytest.raises(wc.LineTooLong):
            parse_line(other + b"a" * (MAX_LINE + 1 - len(other)))


def test_line_too_long_says_so() -> None:
    with pytest.raises(wc.LineTooLong) as e:
        parse_line(b"P" * (MAX_LINE + 1))
    assert e.value.code == "too-long"


def test_largest_proof_fits_a_proof_line() -> None:
    from dsss import proofs
    from dsss.wire.transfer import MAX_PART

    longest = proofs.proof_length(MAX_PART, 0)
    line = encode(Proof(MAX_PART, b"\xff" * longest))
    assert len(line) <= MAX_PROOF_LINE


def test_audit_nonce_must_be_16_bytes() -> None:
    with pytest.raises(ValueError):
        encode(Audit(H1, b"\x00" * 15))


def test_proof_and_audit_are_reply_and_request() -> None:
    assert is_reply(Proof(1, b"x")) and not is_reply(Audit(H1, bytes(16)))
    assert wc.looks_like_reply(b"PROOF garbage") and not wc.looks_like_reply(f"AUDIT {H1}".encode())


@FEWER
@given(size=st.integers(min_value=0, max_value=MAX_SIZE), proof=st.binary(min_size=1, max_size=2000))
def test_proof_round_trips(size: int, proof: bytes) -> None:
    assert parse_line(encode(Proof(size, proof))) == Proof(size, proof)


@FEWER
@given(nonce=st.binary(min_size=16, max_size=16), share=st.booleans())
def test_audit_round_trips(nonce: bytes, share: bool) -> None:
    block = ("s" if share else "") + H3
    assert parse_line(encode(Audit(block, nonce))) == Audit(block, nonce)


def test_unknown_verb_message_is_bounded() -> None:
    with pytest.raises(RemoteProtocolError) as e:
        parse_line(b"X" * 1000)
    assert len(str(e.value)) < 120


# --- is_reply ---------------------------------------------------------------------------------

REPLIES = [Welcome(TOKEN, 1.0, 1), Bit(True), Bit(False), IntroKey(KEY32), Pong(), Ok(), Error("x", "y")]
REQUESTS = [
    Hi(KEY32),
    Register(AGENT, 1, 2, 1, "v", SIG),
    Have((H1,)),
    Gone((H1,)),
    Space(1, 1),
    WhoHas(H1),
    IntroductionRequest(PeerAddress("1.2.3.4", 5), 6, H1),
    Ping(),
]


@pytest.mark.parametrize("msg", REPLIES, ids=repr)
def test_is_reply_true_for_replies(msg: wc.Message) -> None:
    assert is_reply(msg)
    # The first word on the wire tells a reply apart, as the protocol requires.
    first = encode(msg).split(b" ")[0].decode()
    assert first in REPLY_WORDS or (len(first) == 32 and first == first.lower())


@pytest.mark.parametrize("msg", REQUESTS, ids=repr)
def test_is_reply_false_for_requests(msg: wc.Message) -> None:
    assert not is_reply(msg)
    first = encode(msg).split(b" ")[0].decode()
    assert first not in REPLY_WORDS
    assert len(first) != 32


def test_parsed_reply_words_are_replies() -> None:
    for word in REPLY_WORDS:
        line = {
            "WELCOME": f"WELCOME {TOKEN} 100 1",
            "ERROR": "ERROR x y",
            "PROOF": "PROOF 3 YWJj",
        }.get(word, word)
        assert is_reply(parse_line(line.encode())), word
    assert is_reply(parse_line(KEY32.encode()))


@pytest.mark.parametrize(
    "line",
    [b"0", b"1", b"OK", b"PONG", b"ERROR", b"ERROR x y", b"ERROR Bad!", b"WELCOME", b"WELCOME junk",
     b"OK extra", b"0 1", KEY32.encode(), (KEY32 + " junk").encode(), b"OK\r", b"PONG\r"],
    ids=repr,
)
def test_looks_like_reply(line: bytes) -> None:
    assert wc.looks_like_reply(line)


@pytest.mark.parametrize(
    "line",
    [b"", b"PING", b"Hi " + KEY32.encode(), b"HAVE", b"WHO_HAS x", b"REGISTER", b"OKAY", b"ok",
     b"2", b"01", KEY32.upper().encode(), KEY32[:31].encode(), (KEY32 + "0").encode(), b"\xff OK",
     b" OK", b"\rOK"],
    ids=repr,
)
def test_does_not_look_like_reply(line: bytes) -> None:
    assert not wc.looks_like_reply(line)


@SETTINGS
@given(data=st.binary(max_size=100))
def test_looks_like_reply_agrees_with_the_parser(data: bytes) -> None:
    guess = wc.looks_like_reply(data)
    assert isinstance(guess, bool)
    try:
        msg = parse_line(data)
    except RemoteProtocolError:
        return
    assert guess == is_reply(msg)


# --- encode details ---------------------------------------------------------------------------


def test_encode_error_cleans_unprintable_text() -> None:
    line = encode(Error("integrity", "bad\nline\x00é\x7fend\r\n"))
    assert b"\n" not in line and b"\r" not in line
    msg = parse_line(line)
    assert isinstance(msg, Error) and msg.code == "integrity"
    assert all(32 <= ord(c) < 127 for c in msg.text)
    assert msg.text.startswith("bad") and "line" in msg.text and msg.text.endswith("end")


def test_encode_error_truncates_to_max_line() -> None:
    line = encode(Error("x", "y" * (2 * MAX_LINE)))
    assert len(line) == MAX_LINE
    assert parse_line(line) == Error("x", "y" * (MAX_LINE - len("ERROR x ")))


def test_encode_error_with_empty_text_parses() -> None:
    line = encode(Error("full", ""))
    assert line == b"ERROR full"
    assert parse_line(line) == Error("full", "")


def test_encode_error_with_spaces_in_text_parses() -> None:
    for text in ("unexpected  reply", " leading space", "tab\tand  more"):
        msg = parse_line(encode(Error("protocol", text)))
        assert isinstance(msg, Error) and msg.code == "protocol"


def test_encode_error_with_a_bad_code_still_parses() -> None:
    for code in ("Bad", "", "1x", "x" * 33, "a b"):
        msg = parse_line(encode(Error(code, "text")))
        assert isinstance(msg, Error)
        assert msg.code == "error"


@FEWER
@given(code=st.text(max_size=40), text=st.text(max_size=200))
def test_any_error_encodes_to_a_parseable_line(code: str, text: str) -> None:
    line = encode(Error(code, text))
    assert len(line) <= MAX_LINE
    msg = parse_line(line)
    assert isinstance(msg, Error)
    if wc._ERROR_CODE.match(code):
        assert msg.code == code
    # Printable words survive in order.
    kept = "".join(c if 32 < ord(c) < 127 else " " for c in text).split()
    assert msg.text.split() == kept


def test_encode_have_refuses_a_bad_hash() -> None:
    with pytest.raises(BadRequest):
        encode(Have((H1, "../..")))
    with pytest.raises(BadRequest):
        encode(Gone((HUP,)))


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode("PING")  # type: ignore[arg-type]


# --- chunked ----------------------------------------------------------------------------------


def test_chunked_empty() -> None:
    assert chunked([]) == []


def test_chunked_splits_into_line_sized_groups() -> None:
    hashes = [f"{i:064x}" for i in range(2 * MAX_HASHES_PER_LINE + 5)]
    groups = chunked(hashes)
    assert [len(g) for g in groups] == [MAX_HASHES_PER_LINE, MAX_HASHES_PER_LINE, 5]
    assert [h for g in groups for h in g] == hashes
    for g in groups:
        line = encode(Have(g))
        assert len(line) <= MAX_LINE
        assert parse_line(line) == Have(g)


def test_chunked_exact_multiple() -> None:
    hashes = [f"{i:064x}" for i in range(MAX_HASHES_PER_LINE)]
    assert chunked(hashes) == [tuple(hashes)]


@FEWER
@given(items=st.lists(st.integers()), n=st.integers(min_value=1, max_value=60))
def test_chunked_property(items: list[int], n: int) -> None:
    groups = chunked(items, n)  # type: ignore[arg-type]
    assert all(isinstance(g, tuple) for g in groups)
    assert [x for g in groups for x in g] == items
    assert all(1 <= len(g) <= n for g in groups)
    assert all(len(g) == n for g in groups[:-1])


# --- hypothesis -------------------------------------------------------------------------------

# Hex from random bytes: as thorough as st.text over the hex alphabet, and much cheaper.
hex32 = st.binary(min_size=16, max_size=16).map(bytes.hex)
hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
hex128 = st.binary(min_size=64, max_size=64).map(bytes.hex)
sizes = st.integers(min_value=0, max_value=MAX_SIZE)
_VERSION_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.+_-"
versions = st.text(_VERSION_CHARS, min_size=1, max_size=32)
codes = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", max_size=31),
)
words = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20)
error_texts = st.lists(words, max_size=8).map(" ".join)
ports = st.integers(min_value=1, max_value=65535)
addresses = st.builds(
    lambda ip, port: PeerAddress(str(ip), port), st.ip_addresses(), ports
)
hash_tuples = st.lists(hex64, min_size=1, max_size=MAX_HASHES_PER_LINE).map(tuple)


registers = st.builds(Register, hex64, sizes, sizes, sizes, versions, hex128)
spaces = st.builds(Space, sizes, sizes)


messages = st.one_of(
    st.builds(Hi, hex32),
    registers,
    st.builds(Have, hash_tuples),
    st.builds(Gone, hash_tuples),
    spaces,
    st.builds(WhoHas, hex64),
    st.builds(IntroductionRequest, addresses, sizes, hex64),
    st.just(Ping()),
    st.builds(
        Welcome, hex32, st.integers(min_value=10, max_value=3_600_000).map(lambda ms: ms / 1000), ports
    ),
    st.builds(Bit, st.booleans()),
    st.builds(IntroKey, hex32),
    st.just(Pong()),
    st.just(Ok()),
    st.builds(Error, codes, error_texts),
)


@FUZZ
@given(msg=messages)
def test_round_trip_generated(msg: wc.Message) -> None:
    line = encode(msg)
    assert len(line) <= MAX_LINE
    assert b"\n" not in line and b"\r" not in line
    parsed = parse_line(line)
    assert parsed == msg
    assert encode(parsed) == line
    assert is_reply(parsed) == isinstance(msg, wc.REPLY_TYPES)
    assert wc.looks_like_reply(line) == is_reply(msg)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_parse_or_protocol_error(data: bytes) -> None:
    try:
        msg = parse_line(data)
    except RemoteProtocolError:
        return
    # Whatever parses re-encodes to a line that parses to the same message.
    assert parse_line(encode(msg)) == msg


vocab = st.sampled_from(
    [
        "Hi", "REGISTER", "HAVE", "GONE", "SPACE", "WHO_HAS", "INTRODUCTION_REQUEST", "PING",
        "WELCOME", "0", "1", "OK", "PONG", "ERROR", "", "x", "-1", "+1", "007", "10", "65536",
        "1.2.3.4:5", "[::1]:80", "1.2.3.4:0", H1, H63, HUP, KEY32, AGENT, SIG, "v1", "\r", "\t", "é",
        "18446744073709551616",
    ]
)


@SETTINGS
@given(parts=st.lists(vocab, min_size=1, max_size=9))
def test_grammar_shaped_garbage_parse_or_protocol_error(parts: list[str]) -> None:
    line = " ".join(parts).encode("utf-8")
    try:
        msg = parse_line(line)
    except RemoteProtocolError:
        return
    assert parse_line(encode(msg)) == msg


@SETTINGS
@given(msg=messages, data=st.data())
def test_mutated_valid_line_parse_or_protocol_error(msg: wc.Message, data: st.DataObject) -> None:
    line = bytearray(encode(msg))
    i = data.draw(st.integers(min_value=0, max_value=len(line)))
    op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
    b = data.draw(st.integers(min_value=0, max_value=255))
    if op == "insert":
        line[i:i] = bytes([b])
    elif i < len(line):
        if op == "delete":
            del line[i]
        else:
            line[i] = b
    try:
        parsed = parse_line(bytes(line))
    except RemoteProtocolError:
        return
    assert parse_line(encode(parsed)) == parsed


def test_collected_round_trips_and_is_checked() -> None:
    msg = wc.parse_line(b"COLLECTED 2500 8048")
    assert msg == wc.Collected(2500, 8048)
    assert wc.encode(msg) == b"COLLECTED 2500 8048"
    for bad in (b"COLLECTED 1", b"COLLECTED 1 2 3", b"COLLECTED -1 2", b"COLLECTED x 2"):
        with pytest.raises(RemoteProtocolError):
            wc.parse_line(bad)
