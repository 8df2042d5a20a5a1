# -*- test-case-name: tests.unit.test_agent_core -*-
"""The agent's long-term identity: an Ed25519 key kept in its storage directory.

The public key is the agent's id on the network. It signs registrations (so nobody can pose as a
registered agent) and is the key of the certificate the agent presents on QUIC (so clients can check
they reached the agent the server introduced).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from nacl.signing import SigningKey
from twisted.logger import Logger

from dsss.errors import LocalUsageError
from dsss.fileutil import atomic_write

log = Logger()

IDENTITY_FILE = "identity.key"
SEQ_FILE = "registration.seq"


class AgentIdentity:
    def __init__(self, signing_key: SigningKey, seq_path: Path) -> None:
        self.signing_key = signing_key
        self.seed = bytes(signing_key)
        self.agent_id = signing_key.verify_key.encode().hex()
        self._seq_path = seq_path
        self._last_seq = 0

    @classmethod
    def load_or_create(cls, storage: str | os.PathLike[str]) -> "AgentIdentity":
        root = Path(storage)
        root.mkdir(parents=True, exist_ok=True)
        path = root / IDENTITY_FILE
        if not path.exists():
            try:
                atomic_write(path, SigningKey.generate().encode().hex().encode() + b"\n", mode=0o600, exclusive=True)
            except FileExistsError:
                pass
        text = path.read_text().strip()
        try:
            seed = bytes.fromhex(text)
            if len(seed) != 32:
                raise ValueError
        except ValueError:
            raise LocalUsageError(f"{path} is not a DSSS agent identity key") from None
        return cls(SigningKey(seed), root / SEQ_FILE)

    def next_seq(self) -> int:
        """A registration sequence number larger than every one used before by this agent.

        The number is the time in microseconds, or one more than the last one used if that is
        larger (a clock that went back). The last one is kept in memory and in SEQ_FILE; if
        the file cannot be written (a full or read-only disk), registration goes on with the
        number anyway: an agent whose disk is full must stay a member that serves what it
        holds, and the clock alone keeps its numbers increasing across restarts.
        """
        try:
            on_disk = int(self._seq_path.read_text().strip() or "0")
        except (OSError, ValueError):
            on_disk = 0
        seq = max(on_disk + 1, self._last_seq + 1, time.time_ns() // 1000)
        self._last_seq = seq
        try:
            atomic_write(self._seq_path, f"{seq}\n".encode())
        except OSError as e:
            log.warn(
                "cannot record registration number {seq} in {path} ({error}); registering anyway",
                seq=seq, path=str(self._seq_path), error=e.strerror or str(e),
            )
        return seq

    def sign(self, data: bytes) -> str:
        return self.signing_key.sign(data).signature.hex()
