from __future__ import annotations

import pytest
from nacl.public import PrivateKey

from dsss.clientauth import AuthRequired, RequestVerifier, parse_client_list, sign_request
from dsss.errors import AccessDenied

SERVER = PrivateKey.generate()
ALICE = PrivateKey.generate()
MALLORY = PrivateKey.generate()
URI = "/api/who-has?q=" + "ab" * 32


def verifier():
    return RequestVerifier(SERVER, frozenset({bytes(ALICE.public_key).hex()}))


def headers(key, uri=URI, now=1000.0, method="GET"):
    h = sign_request(key, SERVER.public_key, method, uri, now)
    return h["X-DSSS-Client"], h["X-DSSS-Auth"]


def test_listed_client_is_admitted():
    assert verifier().verify(*headers(ALICE), "GET", URI, 1000.0) == bytes(ALICE.public_key).hex()


def test_unlisted_but_valid_client_is_denied():
    with pytest.raises(AccessDenied) as e:
        verifier().verify(*headers(MALLORY), "GET", URI, 1000.0)
    assert not isinstance(e.value, AuthRequired)


def test_posing_as_a_listed_client_fails():
    # Mallory signs with her key but claims Alice's public key.
    _, auth = headers(MALLORY)
    with pytest.raises(AuthRequired):
        verifier().verify(bytes(ALICE.public_key).hex(), auth, "GET", URI, 1000.0)


def test_signature_is_bound_to_the_request_and_time():
    v = verifier()
    client, auth = headers(ALICE)
    with pytest.raises(AuthRequired):
        v.verify(client, auth, "GET", URI + "x", 1000.0)
    with pytest.raises(AuthRequired):
        v.verify(client, auth, "POST", URI, 1000.0)
    with pytest.raises(AuthRequired):
        v.verify(client, auth, "GET", URI, 1000.0 + 500)


def test_replay_is_refused():
    v = verifier()
    client, auth = headers(ALICE)
    v.verify(client, auth, "GET", URI, 1000.0)
    with pytest.raises(AuthRequired):
        v.verify(client, auth, "GET", URI, 1001.0)


@pytest.mark.parametrize("client,auth", [(None, None), ("x", "y"), ("ab" * 32, "1.2.3"), ("ab" * 32, None)])
def test_missing_or_malformed_headers(client, auth):
    with pytest.raises(AuthRequired):
        verifier().verify(client, auth, "GET", URI, 1000.0)


def test_client_list_parsing():
    k = bytes(ALICE.public_key).hex()
    assert parse_client_list(f"# clients\n{k}  # alice\n\n") == frozenset({k})
    with pytest.raises(ValueError):
        parse_client_list("not-a-key\n")
