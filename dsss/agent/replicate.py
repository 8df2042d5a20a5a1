# -*- test-case-name: tests.integration.test_repair -*-
"""Agent to agent copies, for the server's automatic re-replication.

The server picked this agent as the source of a part that lost replicas, got an introduction key
from the target agent for our public address, and sent us `REPLICATE`. We upload the part over
QUIC exactly as a client would (punch first, pin the target's key), from the same UDP socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from dsss.errors import DSSSError, IntegrityError
from dsss.quic import QuicError
from dsss.storage.blockstore import BlockStore
from dsss.wire import control as wc
from dsss.wire import transfer as wt
from dsss.wire.datagram import DPunch, encode_datagram



class ReplicatingAgent(Protocol):
    """What a copy to another agent uses of this agent (dsss.agent.service.StorageAgent)."""

    @property
    def store(self) -> BlockStore: ...
    @property
    def quic(self) -> Any: ...

    def lost(self, block: str) -> None: ...

log = Logger()

TIMEOUT = 60.0


async def replicate(agent: ReplicatingAgent, msg: wc.Replicate) -> bool:
    """Copy one part to the target; True if the target stored it."""
    try:
        data = agent.store.get(msg.block)
    except IntegrityError:
        agent.lost(msg.block)
        log.warn("not replicating {block}: our copy is corrupt", block=msg.block[:16])
        return False
    except DSSSError as e:
        log.warn("not replicating {block}: {e}", block=msg.block[:16], e=str(e))
        return False
    target = msg.address.as_tuple()
    try:
        agent.quic.send_control(encode_datagram(DPunch("agent")), target)
        conn = await agent.quic.connect(target, expected_public_key=bytes.fromhex(msg.agent_id))
        header = wt.encode_request(wt.Upload(msg.key, msg.block, len(data)))
        raw: Any = await conn.request(header + data, max_response=wt.MAX_HEADER, timeout=TIMEOUT)
        reply = wt.parse_reply(raw.partition(b"\n")[0])
    except (QuicError, DSSSError) as e:
        log.warn("replicating {block} to {target} failed: {e}", block=msg.block[:16], target=str(msg.address), e=str(e))
        return False
    if isinstance(reply, wt.Refused):
        log.warn("{target} refused the copy of {block}: {code}", target=str(msg.address), block=msg.block[:16], code=reply.code)
        return False
    log.info("replicated {block} to {target}", block=msg.block[:16], target=str(msg.address))
    return True
