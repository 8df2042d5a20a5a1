"""A throw-away agent identity that floods the server with claims (HAVE) of parts it does not
hold. For tests only: it speaks the control channel directly, as an attacker would.
"""

from __future__ import annotations

import os
import socket

from nacl.signing import SigningKey

from dsss.wire import control as wc


class ClaimsFlooder:
    """Registers a fresh identity from `source` and sends claims of random parts."""

    def __init__(self, control_port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", control_port), timeout=30, source_address=(source, 0))
        self._lines = self.sock.makefile("rb")
        session = self._lines.readline().split()[1].decode()
        key = SigningKey.generate()
        msg = wc.Register(key.verify_key.encode().hex(), 1, 1 << 40, 1 << 40, "0.0.0", "")
        signature = key.sign(msg.signed_bytes(session)).signature.hex()
        self.sock.sendall(wc.encode(wc.Register(**{**msg.__dict__, "signature": signature})) + b"\n")
        welcome = self._lines.readline()
        if not welcome.startswith(b"WELCOME"):
            raise ConnectionError(f"not registered: {welcome!r}")

    def claim(self, count: int, size: int = 1000) -> list[bytes]:
        """Claim `count` random parts, 48 to a line (sent in batches to stay within the server's
        line-rate burst); returns the server's reply to each line (OK, or an ERROR line)."""
        lines = []
        for start in range(0, count, wc.MAX_HASHES_PER_LINE):
            n = min(wc.MAX_HASHES_PER_LINE, count - start)
            words = " ".join(f"{os.urandom(32).hex()}:{size}" for _ in range(n))
            lines.append(f"HAVE {words}\n".encode())
        replies = []
        for start in range(0, len(lines), 500):
            batch = lines[start : start + 500]
            self.sock.sendall(b"".join(batch))
            for _ in batch:
                replies.append(self._reply())
        return replies

    def _reply(self) -> bytes:
        """The next reply to one of our lines. The server's own requests in between: its
        keep-alive is answered, its audits are not (the parts are not here)."""
        while True:
            line = self._lines.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            if line.startswith((b"OK", b"ERROR")):
                return line.strip()
            if line.startswith(b"PING"):
                self.sock.sendall(b"PONG\n")

    def close(self) -> None:
        self._lines.close()
        self.sock.close()
