"""One QUIC stream between two processes on loopback, through DSSS's own adapter (dsss.quic).

    .venv/bin/python bench/quic_pipe.py --size 128 --datagram 1452 16000 65000 [--down] [--json PATH]

The parent is the QUIC client; a child process is the server (it holds an Ed25519 identity as an
agent does). Upload: the client writes SIZE MB on one stream, the server counts it and answers.
Download (`--down`): the client asks, the server writes SIZE MB. Prints MB/s of the transfer,
the client's CPU per MB and the server's (its CPU includes its ~0.5 s of start-up), for each
datagram size, so the transport's cost can be told apart from the rest of a put or get.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from twisted.internet import defer, reactor

from common import proc_cpu
from dsss.crypto.certs import make_certificate, public_key_of
from dsss.quic import QuicEndpoint

SEED = b"b" * 32
BLOB = 256 * 1024


async def _send(stream, total: int) -> None:
    blob = os.urandom(BLOB)
    sent = 0
    while sent < total:
        await stream.write(blob)
        sent += len(blob)
    await stream.write(b"", end=True)


def serve(datagram: int, total: int) -> None:
    def on_stream(stream) -> None:
        got = [0]

        def data(chunk: bytes) -> None:
            got[0] += len(chunk)

        def end() -> None:
            if got[0] < 16:  # a download request
                defer.ensureDeferred(_send(stream, total)).addErrback(lambda f: None)
            else:
                stream.write(str(got[0]).encode(), end=True)

        stream.on_data, stream.on_end, stream.on_error = data, end, lambda e: None

    endpoint = QuicEndpoint(reactor, on_control=lambda d, a: None, server_identity=make_certificate(SEED),
                            on_stream=on_stream, max_datagram_size=datagram)
    port = endpoint.listen(reactor, "127.0.0.1", 0)
    print(port.getHost().port, flush=True)
    reactor.run()



async def measure(datagram: int, total: int, down: bool) -> dict[str, float]:
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(datagram), str(total)],
                             stdout=subprocess.PIPE)
    try:
        port = int(child.stdout.readline())
        endpoint = QuicEndpoint(reactor, on_control=lambda d, a: None, max_datagram_size=datagram)
        endpoint.listen(reactor, "127.0.0.1", 0)
        handle = await endpoint.connect(("127.0.0.1", port),
                                        expected_public_key=public_key_of(make_certificate(SEED)[0]))
        stream = handle.open_stream()
        received = [0]
        done: defer.Deferred[None] = defer.Deferred()
        stream.on_data = lambda chunk: received.__setitem__(0, received[0] + len(chunk))
        stream.on_end = lambda: done.callback(None)
        stream.on_error = done.errback
        t0, c0 = time.monotonic(), time.process_time()
        if down:
            await stream.write(b"go", end=True)
        else:
            await _send(stream, total)
        await done
        seconds, cpu = time.monotonic() - t0, time.process_time() - c0
        moved = received[0] if down else total
        mb = moved / 1e6
        result = {"datagram": datagram, "direction": "down" if down else "up", "mb": round(mb, 1),
                  "mbps": round(mb / seconds, 1), "client_cpu_ms_per_mb": round(cpu * 1e3 / mb, 2),
                  "server_cpu_ms_per_mb": round(proc_cpu(child.pid) * 1e3 / mb, 2)}
        await endpoint.close()
        return result
    finally:
        child.kill()
        child.wait()


async def main(args: argparse.Namespace) -> None:
    results = []
    for datagram in args.datagram:
        r = await measure(datagram, args.size * 1_000_000, args.down)
        results.append(r)
        print(f"{r['direction']:4} datagram {datagram:5}: {r['mbps']:6.1f} MB/s, client {r['client_cpu_ms_per_mb']:5.1f} "
              f"ms/MB, server {r['server_cpu_ms_per_mb']:5.1f} ms/MB (with start-up)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="MB to move (10^6 bytes)")
    ap.add_argument("--datagram", type=int, nargs="+", default=[1452, 16000, 65000])
    ap.add_argument("--down", action="store_true", help="server to client instead of client to server")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    failed = []

    def run() -> None:
        d = defer.ensureDeferred(main(args))
        d.addErrback(lambda f: (failed.append(f), f.printTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    sys.exit(1 if failed else 0)
