# -*- test-case-name: tests.adapters.test_agent_transfer -*-
"""UPLOAD, DOWNLOAD and AUDIT on QUIC streams, as the agent serves them.

Every stream carries one request (dsss.wire.transfer). An upload is written to the store's
incoming/ area chunk by chunk while it arrives and becomes visible only after its size and hash are
verified; a stream that is reset or a connection that is lost leaves nothing behind. An AUDIT
is answered with a storage proof (`StorageAgent.audit`): one leaf and its sibling hashes.

A chained upload is also passed on, chunk by chunk as it arrives, to the next agent of its chain
(`_Forward`), over QUIC from this agent's own socket as a client would send it. The reply waits
for both: this agent's copy stored, and the next agent's answer; it says how many agents of the
chain stored the part. A forward that fails (the next agent unreachable, refusing, or not
answering within FORWARD_TIMEOUT) only shortens that count: the uploader stores the missing
copies itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from dsss.agent.identity import AgentIdentity
from dsss.agent.introductions import IntroductionTable
from dsss.agent.reservations import SourceReservations, UploadPolicy, UploadWatch
from dsss.errors import Busy, DSSSError, IntegrityError, NotFound, RemoteProtocolError
from dsss.leases import LeaseRecord, Outcome, parse_batch
from dsss.model import PeerAddress, is_block_id
from dsss.storage.blockstore import BlockStore, BlockWriter
from dsss.wire import transfer as wt
from dsss.wire.datagram import DPunch, encode_datagram

if TYPE_CHECKING:
    from dsss.quic import QuicStream

log = Logger()


class TransferAgent(Protocol):
    """What serving transfers uses of the agent (dsss.agent.service.StorageAgent)."""

    @property
    def clock(self) -> Any: ...
    @property
    def quic(self) -> Any: ...
    @property
    def identity(self) -> AgentIdentity: ...
    @property
    def introductions(self) -> IntroductionTable: ...
    @property
    def store(self) -> BlockStore: ...

    def refused(self, err: Exception) -> None: ...
    def check_lease(self, record: LeaseRecord) -> None: ...
    def leased_upload(self, block: str, record: LeaseRecord | None) -> None: ...
    def take_leases(self, records: list[LeaseRecord | None]) -> list[Outcome]: ...
    def held(self, block: str) -> list[LeaseRecord] | None: ...
    def stored(self, block: str) -> Any: ...
    def lost(self, block: str) -> None: ...
    def audit(self, block: str, nonce: bytes) -> Any: ...


FORWARD_TIMEOUT = 45.0
"""Seconds a forward may take, from its first byte to the next agent's answer (less than the
uploader's own 60 s, so a stuck chain still answers `Stored` with what it did)."""
HAVE_WAIT = 2.0
"""Longest an upload's answer waits for the server to acknowledge the agent's HAVE."""
FORWARD_HANDSHAKE_TIMEOUT = 1.5
"""Seconds to reach the next agent: it punched towards us when it issued the key, before the
upload began, so a handshake that works takes one round trip; one that fails (agents that
cannot reach each other) costs the part this long before its copies go from the client."""


class _Forward:
    """Passes one chained upload on to the next agent of its chain while it arrives.

    What the next agent has not taken yet stays queued here: at most the part itself (the
    upload's size was checked). `done` fires with the receipts of the agents from the next one
    on that stored the part (none if the forward failed); it never fails.
    """

    def __init__(self, handler: "TransferHandler", upload: wt.Upload) -> None:
        self.handler = handler
        hop, rest = upload.chain[0], upload.chain[1:]
        self.hop = hop
        self.block = upload.block
        self.pending: list[bytes] | None = [
            wt.encode_request(wt.Upload(hop.key, upload.block, upload.size, True, rest, upload.lease))
        ]
        self.stream: "QuicStream | None" = None
        self.ended = False
        self.reply: list[bytes] = []
        self.done: defer.Deferred[tuple[str, ...]] = defer.Deferred()
        clock = handler.agent.clock
        self._timer = clock.callLater(FORWARD_TIMEOUT, self.fail, "timed out")
        defer.ensureDeferred(self._open()).addErrback(lambda f: self.fail(f.getErrorMessage()))

    async def _open(self) -> None:
        from dsss.quic import QuicError

        quic = self.handler.agent.quic
        target = self.hop.address.as_tuple()
        try:
            # Open our NAT towards the next agent; it punches towards us (the server asked it for
            # the introduction key the chain carries).
            quic.send_control(encode_datagram(DPunch("agent")), target)
            conn = await quic.connect(target, expected_public_key=bytes.fromhex(self.hop.agent_id),
                                      handshake_timeout=FORWARD_HANDSHAKE_TIMEOUT)
            stream = conn.open_stream()
        except (QuicError, DSSSError) as e:
            self.fail(f"cannot reach it: {e}")
            return
        if self.done.called:
            stream.reset()
            return
        self.stream = stream
        stream.on_data = self._reply_data
        stream.on_end = self._reply_end
        stream.on_error = lambda e: self.fail(f"stream failed: {e}")
        pending, self.pending = self.pending or [], None
        for chunk in pending:
            self._write(chunk)
        if self.ended:
            self._write(b"", end=True)

    def _write(self, chunk: bytes, end: bool = False) -> None:
        stream = self.stream
        if stream is None or self.done.called:
            return
        stream.write(chunk, end=end).addErrback(lambda f: None)  # on_error reports failures

    def feed(self, chunk: bytes) -> None:
        if self.done.called:
            return
        if self.pending is not None:
            self.pending.append(chunk)
        else:
            self._write(chunk)

    def end(self) -> None:
        self.ended = True
        if self.pending is None:
            self._write(b"", end=True)

    def _reply_data(self, chunk: bytes) -> None:
        self.reply.append(chunk)
        if sum(len(c) for c in self.reply) > wt.MAX_HEADER:
            self.fail("its answer is too long")

    def _reply_end(self) -> None:
        try:
            reply = wt.parse_reply(b"".join(self.reply).partition(b"\n")[0])
        except RemoteProtocolError as e:
            self.fail(f"bad answer: {e}")
            return
        if isinstance(reply, wt.Refused):
            self.fail(f"refused: {reply.code} {reply.text}")
        elif isinstance(reply, wt.Stored):
            self._finish(reply.receipts)  # the uploader checks them, every one
        else:
            self.fail("it answered without receipts")

    def _finish(self, receipts: tuple[str, ...]) -> None:
        if self.done.called:
            return
        if self._timer.active():
            self._timer.cancel()
        self.pending = None
        self.done.callback(receipts)

    def fail(self, why: str) -> None:
        if self.done.called:
            return
        log.info("forwarding {block} to {hop} failed: {why}", block=self.block[:16],
                 hop=str(self.hop.address), why=why)
        self.handler.forward_failures += 1
        if self.stream is not None:
            self.stream.reset()
        self._finish(())


class _StreamRequest:
    def __init__(self, handler: "TransferHandler", stream: "QuicStream") -> None:
        self.handler = handler
        self.agent = handler.agent
        self.stream = stream
        self.header = wt.HeaderSplitter()
        self.writer: BlockWriter | None = None
        self.download: wt.Download | None = None
        self.audit: wt.Audit | None = None
        self.forward: _Forward | None = None
        self.upload: wt.Upload | None = None
        self.lease: wt.Lease | wt.Held | None = None
        self.lease_body: list[bytes] = []
        self.lease_bytes = 0
        self.discard = False  # the body is not needed (the part is stored here already)
        # While the body arrives: its progress against the upload policy, and the space it
        # holds reserved against its source.
        self.watch: UploadWatch | None = None
        self.reserved_by: str | None = None
        self.finished = False
        handler.touch()
        stream.on_data = self.data
        stream.on_end = self.end
        stream.on_error = self.error

    def client(self) -> PeerAddress:
        host, port = self.stream.connection.peer[:2]
        return PeerAddress(host, port)

    def reply(self, reply: wt.TransferReply, body: bytes = b"") -> Any:
        """Send the reply and end the stream; returns a Deferred that fires once the reply is
        mostly on its way (the stream's queue is under its high-water mark)."""
        if self.finished:
            return None
        self.finished = True
        d = self.stream.write(wt.encode_reply(reply) + body, end=True)
        d.addErrback(lambda f: log.debug("reply not delivered: {f}", f=f.value))
        return d

    def refuse(self, err: DSSSError) -> None:
        self.abort()
        if not self.finished:
            self.handler.refused += 1
            log.info("refused a transfer from {client}: {err}", client=str(self.client()), err=str(err))
            self.reply(wt.Refused(err.code, str(err)))
            self.stream.stop_reading()
            self.agent.refused(err)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
        self.release()
        if self.forward is not None:
            self.forward.fail("the upload was aborted")
            self.forward = None

    def data(self, chunk: bytes) -> None:
        if self.finished or self.discard:
            return
        try:
            if not self.header.done:
                split = self.header.feed(chunk)
                if split is None:
                    return
                line, chunk = split
                self.start(wt.parse_request(line))
                if self.discard:
                    return
            if self.writer is not None:
                if chunk:
                    self.writer.write(chunk)
                    if self.forward is not None:
                        self.forward.feed(chunk)
            elif self.lease is not None:
                self.lease_bytes += len(chunk)
                limit = wt.MAX_LEASE_BODY if isinstance(self.lease, wt.Lease) else wt.MAX_HELD_BODY
                if self.lease_bytes > limit:
                    raise RemoteProtocolError(f"a LEASE or HELD body is at most {limit} bytes")
                self.lease_body.append(chunk)
            elif chunk:
                raise RemoteProtocolError("DOWNLOAD and AUDIT take no body")
        except DSSSError as e:
            self.refuse(e)

    def start(self, req: wt.TransferRequest) -> None:
        now = self.agent.clock.seconds()
        if isinstance(req, (wt.Lease, wt.Held)):
            self.lease = req
            return
        if isinstance(req, wt.Upload):
            self.agent.introductions.use(
                req.key, client=self.client(), block=req.block, now=now, upload_size=req.size
            )
            if req.lease is not None:
                self.agent.check_lease(req.lease)  # a forged or overlong lease: nothing stored
            self.upload = req
            if self.agent.store.has(req.block):
                self.agent.leased_upload(req.block, req.lease)
                # Already stored: the bytes are not needed, the answer is the same (a chain
                # is served from the stored copy).
                self.stream.stop_reading()
                self.discard = True
                if req.chain:
                    self._forward_stored(req)
                elif req.chained:
                    self._stored_down_the_chain(())
                else:
                    self.reply(wt.Done())
                return
            source = self.client().host
            if not self.handler.reservations.admit(source, req.size):
                raise Busy(
                    f"uploads from {source} already hold "
                    f"{self.handler.reservations.held(source)} bytes reserved here; try again"
                )
            self.reserved_by = source
            try:
                self.writer = self.agent.store.begin_write(req.block, req.size)
            except BaseException:
                self.release()
                raise
            self.watch = UploadWatch(self.handler.policy, req.size, now)
            self.handler.receiving.add(self)
            if req.chain:
                self.forward = _Forward(self.handler, req)
                self.handler.forwards += 1
        elif isinstance(req, wt.Audit):
            self.agent.introductions.use(req.key, client=self.client(), block=req.block, now=now)
            self.audit = req
        else:
            self.agent.introductions.use(req.key, client=self.client(), block=req.block, now=now)
            self.download = req

    def end(self) -> None:
        if self.finished:
            return
        self.handler.touch()
        try:
            if not self.header.done:
                raise RemoteProtocolError("stream ended before a complete header")
            if self.writer is not None:
                writer, self.writer = self.writer, None
                forward, self.forward = self.forward, None
                writer_chained = self.upload is not None and self.upload.chained
                if forward is not None:
                    forward.end()  # the next agent verifies and stores while we do
                self.release()
                try:
                    writer.commit()
                except DSSSError:
                    if forward is not None:
                        forward.fail("the upload did not verify here")
                    raise
                self.handler.uploads += 1
                self.agent.leased_upload(writer.block, self.upload.lease if self.upload else None)
                indexed = self._indexed(writer.block)
                if forward is not None:
                    waits: list[defer.Deferred[Any]] = [forward.done, indexed]
                    both = defer.gatherResults(waits)
                    both.addCallback(lambda results: self._stored_down_the_chain(results[0]))
                elif writer_chained:
                    indexed.addCallback(lambda _: self._stored_down_the_chain(()))
                else:
                    indexed.addCallback(lambda _: self.reply(wt.Done()))
            elif isinstance(self.lease, wt.Held):
                self.list_held(self.lease)
            elif self.lease is not None:
                self.take_leases(self.lease)
            elif self.download is not None:
                self.serve(self.download.block)
            elif self.audit is not None:
                self.prove(self.audit)
        except DSSSError as e:
            self.refuse(e)

    def take_leases(self, req: wt.Lease) -> None:
        records = parse_batch(b"".join(self.lease_body), req.count)
        outcomes = self.agent.take_leases(records)
        self.handler.lease_requests += 1
        body = "".join(o.encode() + "\n" for o in outcomes).encode("ascii")
        self.reply(wt.LeasesReply(len(outcomes)), body)

    def list_held(self, req: wt.Held) -> None:
        lines = b"".join(self.lease_body).split(b"\n")
        if lines[-1] != b"" or len(lines) - 1 != req.count:
            raise RemoteProtocolError(f"a HELD body holds exactly {req.count} LF-terminated lines")
        out = []
        for raw in lines[:-1]:
            block = raw.decode("ascii", "replace")
            records = self.agent.held(block) if is_block_id(block) else None
            if records is None:
                out.append("not-found")
                continue
            latest = sorted(records, key=lambda r: -r.expiry)[: wt.MAX_HELD_LISTED]
            out.append(" ".join(["ok", *(f"{r.owner}:{r.expiry}" for r in latest)]))
        self.reply(wt.HeldReply(req.count), "".join(x + "\n" for x in out).encode("ascii"))

    def prove(self, req: wt.Audit) -> None:
        self.handler.audits += 1

        def proven(result: tuple[int, bytes]) -> None:
            size, proof = result
            self.reply(wt.ProofReply(size, len(proof)), proof)

        def failed(f: Any) -> None:
            if f.check(DSSSError):
                self.refuse(f.value)
            else:
                log.failure("answering an audit failed", f)
                self.refuse(DSSSError("internal error"))

        self.agent.audit(req.block, req.nonce).addCallbacks(proven, failed)

    def serve(self, block: str) -> None:
        handler = self.handler
        size = self.agent.store.size_of(block) if self.agent.store.has(block) else 0
        if handler.serving + size > handler.max_serving:
            # Replies are queued whole; clients that do not read them must not pile up memory.
            raise Busy("too many downloads in progress; try again")
        try:
            data = self.agent.store.get(block)
        except IntegrityError as e:
            self.agent.lost(block)
            raise e
        except NotFound:
            raise NotFound("this agent does not store that part") from None
        self.handler.downloads += 1
        handler.serving += len(data)
        d = self.reply(wt.Done(len(data)), data)

        def sent(result: object) -> object:
            handler.serving -= len(data)
            return result

        if d is not None:
            d.addBoth(sent)
        else:
            handler.serving -= len(data)

    def _indexed(self, block: str) -> defer.Deferred[None]:
        """Report the new part to the server; fires once the server has it indexed, so that
        whoever stored it finds it with who-has as soon as the upload is answered (at most
        HAVE_WAIT seconds: a slow or absent server does not hold uploads up)."""
        d: defer.Deferred[None] = defer.Deferred()

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not d.called:
                d.callback(None)

        timer = self.agent.clock.callLater(HAVE_WAIT, done, None)

        reported = self.agent.stored(block)
        if reported is None:
            done(None)
        else:
            reported.addBoth(done)
        return d

    def _forward_stored(self, req: wt.Upload) -> None:
        """The part is stored here already: pass the stored copy down the chain."""
        try:
            data = self.agent.store.get(req.block)
        except DSSSError:
            self._stored_down_the_chain(())  # unreadable here: the uploader fills the rest
            return
        forward = _Forward(self.handler, req)
        self.handler.forwards += 1
        forward.feed(data)
        forward.end()
        forward.done.addCallback(self._stored_down_the_chain)

    def _stored_down_the_chain(self, receipts: tuple[str, ...]) -> None:
        """Answer a chained upload: our own receipt, then those of the agents after us."""
        assert self.upload is not None
        own = self.agent.identity.sign(wt.receipt_message(self.upload.block, self.upload.key))
        self.reply(wt.Stored((own, *receipts)))

    def release(self) -> None:
        """The body is complete or abandoned: free the source's reservation and stop watching."""
        self.handler.receiving.discard(self)
        self.watch = None
        if self.reserved_by is not None and self.upload is not None:
            self.handler.reservations.release(self.reserved_by, self.upload.size)
            self.reserved_by = None

    def expire(self, now: float) -> bool:
        """Drop the upload if it fell behind the policy; True if it was dropped."""
        if self.watch is None or self.writer is None:
            return False
        why = self.watch.check(self.writer.received, now)
        if why is None:
            return False
        self.refuse(UploadTimeout(f"upload dropped: {why}"))
        return True

    def error(self, err: Any) -> None:
        self.abort()
        self.finished = True


class UploadTimeout(DSSSError):
    """An upload fell behind the minimum rate or its deadline; its space was freed."""

    code = "timeout"


class TransferHandler:
    # Bytes of download replies queued at once, over all streams.
    MAX_SERVING = 256 * 1024 * 1024

    def __init__(self, agent: TransferAgent, policy: UploadPolicy | None = None) -> None:
        self.agent = agent
        self.serving = 0
        self.max_serving = self.MAX_SERVING
        self.uploads = 0
        self.downloads = 0
        self.refused = 0
        self.forwards = 0  # chained uploads passed on to the next agent
        self.forward_failures = 0
        self.policy = policy if policy is not None else UploadPolicy()
        self.reservations = SourceReservations(self.policy.per_source)
        self.receiving: set[_StreamRequest] = set()  # uploads whose body is arriving
        self.expired = 0  # uploads dropped for falling behind the policy
        self._next_expiry = float("-inf")
        self.audits = 0  # AUDIT streams answered (with a proof or a refusal)
        self.lease_requests = 0  # LEASE streams answered
        # When a transfer last started or ended (the background scrub slows down after it).
        self.last_active = float("-inf")

    def expire(self, now: float) -> None:
        """Drop the uploads that fell behind (checked at most once a second)."""
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        for req in list(self.receiving):
            if req.expire(now):
                self.expired += 1

    def touch(self) -> None:
        self.last_active = self.agent.clock.seconds()

    def on_stream(self, stream: "QuicStream") -> None:
        _StreamRequest(self, stream)
