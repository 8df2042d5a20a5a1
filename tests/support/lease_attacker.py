"""Send lease records an attacker would to one agent, and print each outcome. For tests only.

`python -m tests.support.lease_attacker SERVER_URL KEY_FILE AGENT BLOCK MODE [RECORD]`, where
AGENT is the agent's HOST:PORT as the server knows it, and MODE is one of:

- `own-release`: a release of BLOCK signed by KEY_FILE's own lease key (an owner it is not).
- `forged-release=OWNER`: a release of BLOCK in the name of OWNER (a lease public key), signed
  with KEY_FILE's lease key: a forgery.
- `replay`: RECORD (a record in its one-token form, e.g. read from an agent's leases.sqlite)
  sent as it is.

Prints one JSON object: {"outcomes": ["ok 0", ...]} (the agent's outcome lines), or
{"error": ...} if the agent could not be reached or refused the message.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, task


async def attack(reactor: Any, argv: list[str]) -> dict[str, Any]:
    from dsss.client.discovery import DiscoveryClient
    from dsss.client.peer import PeerNetwork
    from dsss.crypto.keys import load_key_file
    from dsss.errors import DSSSError
    from dsss.leases import LeaseRecord, lease_signing_key, signed_message
    from dsss.model import PeerAddress

    url, key_file, agent, block, mode = argv[:5]
    key = load_key_file(key_file)
    lease_key = lease_signing_key(key)
    own = bytes(lease_key.verify_key).hex()
    serial = 2**62  # higher than any real one: only the signature can stop it
    if mode == "own-release":
        sig = lease_key.sign(signed_message(own, block, 0, serial)).signature.hex()
        record = LeaseRecord(own, block, 0, serial, sig)
    elif mode.startswith("forged-release="):
        victim = mode.split("=", 1)[1]
        sig = lease_key.sign(signed_message(victim, block, 0, serial)).signature.hex()
        record = LeaseRecord(victim, block, 0, serial, sig)
    elif mode == "replay":
        record = LeaseRecord.parse(argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    discovery = DiscoveryClient(url, reactor=reactor, key=key)
    info = await discovery.info()
    peers = PeerNetwork(reactor, ("127.0.0.1", info.udp_port), bind_host="127.0.0.1",
                        max_datagram_size=65000)
    try:
        me = await peers.start()
        intro = await discovery.introduce_me(PeerAddress.parse(agent), block, 0, me)
        outcomes = await peers.lease(intro, [record])
        return {"outcomes": [o.encode() for o in outcomes]}
    except DSSSError as e:
        return {"error": str(e)}
    finally:
        await peers.close()


def main() -> None:
    argv = sys.argv[1:]

    async def run(reactor: Any) -> None:
        print(json.dumps(await attack(reactor, argv)), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))


if __name__ == "__main__":
    main()
