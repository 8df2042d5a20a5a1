"""QUIC handshake time with an agent's endpoint on loopback: an aioquic client (its default TLS
settings) and a DSSS client, each connecting afresh N times.

    .venv/bin/python bench/quic_handshake.py [--count 20]

The agent side is a DSSS `QuicEndpoint` with an Ed25519 identity, in this process on the same
reactor (so a handshake's time includes both sides' CPU). Each handshake uses a new client socket
and ends with a close; one handshake per client first warms up and is not counted. Prints the
median and the slowest handshake in milliseconds, and the probe timeouts (retransmitted flights)
counted on the client side, which should be 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from twisted.internet import defer, reactor

from common import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT))

from dsss.crypto.certs import make_certificate, public_key_of  # noqa: E402
from dsss.quic import QuicEndpoint  # noqa: E402
from tests.aioquic_peer import AioquicPeer  # noqa: E402

SEED = b"h" * 32


async def aioquic_once(server: tuple[str, int]) -> tuple[float, int]:
    client = AioquicPeer(reactor)
    port = reactor.listenUDP(0, client, interface="127.0.0.1")
    try:
        t0 = time.perf_counter()
        await client.connect(server)
        elapsed = time.perf_counter() - t0
        client.close()
        return elapsed, client.probe_timeouts
    finally:
        await port.stopListening()


async def dsss_once(server: tuple[str, int], key: bytes) -> tuple[float, int]:
    client = QuicEndpoint(reactor, on_control=lambda d, a: None)
    client.listen(reactor, "127.0.0.1", 0)
    try:
        t0 = time.perf_counter()
        handle = await client.connect(server, expected_public_key=key)
        elapsed = time.perf_counter() - t0
        return elapsed, handle._quic.probe_timeouts()
    finally:
        await client.close(grace=0)


async def main(args: argparse.Namespace) -> None:
    identity = make_certificate(SEED)
    server = QuicEndpoint(reactor, on_control=lambda d, a: None, server_identity=identity)
    server.listen(reactor, "127.0.0.1", 0)
    key = public_key_of(identity[0])
    try:
        for name, once in (("aioquic client", lambda: aioquic_once(server.address)),
                           ("DSSS client", lambda: dsss_once(server.address, key))):
            await once()  # a first handshake pays for imports and caches: not counted
            times, probes = [], 0
            for _ in range(args.count):
                seconds, pto = await once()
                times.append(seconds * 1e3)
                probes += pto
            print(f"{name:15}: median {statistics.median(times):6.1f} ms, slowest {max(times):6.1f} ms "
                  f"over {args.count} handshakes, {probes} probe timeouts", flush=True)
    finally:
        await server.close(grace=0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20, help="handshakes per client")
    args = ap.parse_args()
    failed = []

    def run() -> None:
        d = defer.ensureDeferred(main(args))
        d.addErrback(lambda f: (failed.append(f), f.printTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(1 if failed else 0)
