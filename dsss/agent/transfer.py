# -*- test-case-name: tests.adapters.test_agent_transfer -*-
"""UPLOAD and DOWNLOAD on QUIC streams, as the agent serves them.

Every stream carries one request (dsss.wire.transfer). An upload is written to the store's
incoming/ area chunk by chunk while it arrives and becomes visible only after its size and hash are
verified; a stream that is reset or a connection that is lost leaves nothing behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from dsss.errors import DSSSError, IntegrityError, NotFound, RemoteProtocolError
from dsss.model import PeerAddress
from dsss.storage.blockstore import BlockWriter
from dsss.wire import transfer as wt

if TYPE_CHECKING:
    from dsss.agent.service import StorageAgent
    from dsss.quic import QuicStream

log = Logger()


class _StreamRequest:
    def __init__(self, handler: "TransferHandler", stream: "QuicStream") -> None:
        self.handler = handler
        self.agent = handler.agent
        self.stream = stream
        self.header = wt.HeaderSplitter()
        self.writer: BlockWriter | None = None
        self.download: wt.Download | None = None
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

    def data(self, chunk: bytes) -> None:
        if self.finished:
            return
        try:
            if not self.header.done:
                split = self.header.feed(chunk)
                if split is None:
                    return
                line, chunk = split
                self.start(wt.parse_request(line))
            if self.writer is not None:
                if chunk:
                    self.writer.write(chunk)
            elif chunk:
                raise RemoteProtocolError("DOWNLOAD takes no body")
        except DSSSError as e:
            self.refuse(e)

    def start(self, req: wt.TransferRequest) -> None:
        now = self.agent.clock.seconds()
        if isinstance(req, wt.Upload):
            self.agent.introductions.use(
                req.key, client=self.client(), block=req.block, now=now, upload_size=req.size
            )
            if self.agent.store.has(req.block):
                # Already stored: the bytes are not needed, the answer is the same.
                self.reply(wt.Done())
                self.stream.stop_reading()
                return
            self.writer = self.agent.store.begin_write(req.block, req.size)
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
                writer.commit()
                self.handler.uploads += 1
                self.reply(wt.Done())
                self.agent.stored(writer.block)
            elif self.download is not None:
                self.serve(self.download.block)
        except DSSSError as e:
            self.refuse(e)

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

    def error(self, err: Any) -> None:
        self.abort()
        self.finished = True


class Busy(DSSSError):
    code = "busy"


class TransferHandler:
    # Bytes of download replies queued at once, over all streams.
    MAX_SERVING = 256 * 1024 * 1024

    def __init__(self, agent: "StorageAgent") -> None:
        self.agent = agent
        self.serving = 0
        self.max_serving = self.MAX_SERVING
        self.uploads = 0
        self.downloads = 0
        self.refused = 0
        # When a transfer last started or ended (the background scrub slows down after it).
        self.last_active = float("-inf")

    def touch(self) -> None:
        self.last_active = self.agent.clock.seconds()

    def on_stream(self, stream: "QuicStream") -> None:
        _StreamRequest(self, stream)
