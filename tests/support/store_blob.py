"""`python -m tests.support.store_blob SERVER_URL KEY_FILE BLOB_FILE...`: store each blob file
as it is on the network (3 copies, or the server's count), printing each address: how a test
puts a directory manifest it built by hand (tests/support/hostile_tree.py) where `get -r` will
find it. A test helper, not an option of the real client."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from dsss.client.session import SessionOptions, open_session
from dsss.client.storing import store_block
from dsss.crypto.keys import load_key_file
from dsss.model import block_hash


def main(reactor: Any, server: str, key_file: str, *blobs: str) -> defer.Deferred[None]:
    async def go() -> None:
        key = load_key_file(Path(key_file))
        session = await open_session(reactor, SessionOptions(server=server, parallel=4), key)
        try:
            for name in blobs:
                data = Path(name).read_bytes()
                address = block_hash(data)
                await store_block(session, address, data)
                print(address, flush=True)
        finally:
            await session.peers.close()

    return defer.ensureDeferred(go())


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
