# -*- test-case-name: tests.integration.test_repair -*-
"""Agent to agent copies, for the server's automatic re-replication.

The server picked this agent as the source of a part that lost replicas, got an introduction key
from the target agent for our public address, and sent us `REPLICATE`. We upload the part over
QUIC exactly as a client would (punch first, pin the target's key), from the same UDP socket.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

from dsss.agent.leasestore import LeaseStore
from dsss.errors import DSSSError, IntegrityError, RemoteProtocolError
from dsss.leases import MAX_BATCH, Outcome, encode_batch
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
    @property
    def leases(self) -> LeaseStore: ...

    def lease_now(self) -> float: ...

    def lost(self, block: str) -> None: ...

log = Logger()

TIMEOUT = 60.0


async def replicate(agent: ReplicatingAgent, msg: wc.Replicate) -> bool:
    """Copy one part to the target; True if the target stored it. A part no lease keeps any
    more (it is about to be collected) is not copied."""
    if agent.leases.table.collectable_at(msg.block) <= agent.lease_now():
        log.info("not replicating {block}: no live lease keeps it", block=msg.block[:16])
        return False
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
    await _carry_leases(agent, conn, msg)
    return True


async def _carry_leases(agent: ReplicatingAgent, conn: Any, msg: wc.Replicate) -> None:
    """Give the new holder the owners' live leases on the part (it verifies each signature):
    the copy lives as long as the original."""
    records = agent.leases.table.live_records(msg.block, agent.lease_now())
    for start in range(0, len(records), MAX_BATCH):
        batch = records[start : start + MAX_BATCH]
        try:
            raw: Any = await conn.request(
                [wt.encode_request(wt.Lease(len(batch))), encode_batch(batch)],
                max_response=wt.MAX_LEASE_REPLY, timeout=TIMEOUT)
            line, _, body = raw.partition(b"\n")
            reply = wt.parse_reply(line)
            if not isinstance(reply, wt.LeasesReply) or reply.count != len(batch):
                raise RemoteProtocolError("no lease outcomes")
            taken = sum(1 for o in body.decode("ascii").splitlines() if Outcome.parse(o).status == "ok")
        except (QuicError, DSSSError, UnicodeDecodeError) as e:
            log.warn("passing the leases of {block} to {target} failed: {e}", block=msg.block[:16],
                     target=str(msg.address), e=str(e))
            return
        log.info("passed {n} of {m} leases of {block} to {target}", n=taken, m=len(batch),
                 block=msg.block[:16], target=str(msg.address))
