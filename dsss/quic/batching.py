# -*- test-case-name: tests.unit.test_quic -*-
"""UDP datagrams in runs, both ways: generic receive offload (GRO) and segmentation offload (GSO) on Linux.

`GroPort` is a UDP port that reads with `UDP_GRO` on: a run of same-size datagrams from one
sender arrives in one `recvmsg` and goes to the protocol's `segmentsReceived(buffer, size,
address)` in one call. `SegmentedSender` sends a list of datagrams, each run of one size to one
address (the last may be shorter) in one `sendmsg` with `UDP_SEGMENT`, and falls back to one
`sendto` per datagram for good once the kernel refuses. The QUIC endpoint
(`dsss.quic.endpoint`) and the server's relay (`dsss.server.udp`) use both; without Linux or
without the options, every read is one datagram and every send one `sendto`.
"""

from __future__ import annotations

import errno
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import udp
from twisted.logger import Logger

log = Logger()

SOL_UDP = 17
UDP_SEGMENT = 103
"""Linux's UDP_SEGMENT socket option (GSO for UDP, Linux 4.18+); Python does not name it."""
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EMSGSIZE)
UDP_GRO = 104
"""Linux's UDP_GRO socket option (5.0+): the kernel may hand over several datagrams of one
flow and one size (the last may be shorter) in one read, with their size in a control
message. A sender's GSO batch crosses veths and NAT routers whole and arrives this way."""
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0

Address = tuple[str, int]


def send_run(sock: socket.socket, segments: list[bytes], addr: Any) -> None:
    """Send `segments` (all one size but the last, which may be shorter; at most
    GSO_MAX_SEGMENTS and GSO_MAX_BYTES in all) to `addr` in one `sendmsg` with UDP_SEGMENT.
    Raises what `sendmsg` raises: OSError with an errno in GSO_REFUSED if the kernel will not."""
    if len(segments) == 1:
        sock.sendto(segments[0], addr)
        return
    sock.sendmsg([b"".join(segments)], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(segments[0])))], 0, addr)


class SegmentedSender:
    """
    Sends datagrams on a socket in order, each run of datagrams of one size to
    one address (the last may be shorter; at most GSO_MAX_SEGMENTS and
    GSO_MAX_BYTES) in one `sendmsg` with UDP segmentation offload: one system
    call, and one trip through the stack and any NAT on the way, instead of one
    per datagram.  If the kernel refuses, segmentation is switched off for good
    (`enabled`) and datagrams go one by one.

    @ivar runs: runs of more than one datagram sent in one call so far.
    """

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.platform.startswith("linux") if enabled is None else enabled
        self.runs = 0

    def send(self, sock: Any, datagrams: Sequence[tuple[bytes, Address]]) -> int:
        """
        Send `datagrams` from the first.  A datagram the kernel will not send
        (unreachable network, bad address) is lost, logged at debug level, as on
        any network.

        @return: how many were handed to the kernel, or dropped as unsendable,
            before the socket buffer filled up; `len(datagrams)` if none was left.
        """
        if not self.enabled:
            return send_one_by_one(sock.sendto, datagrams)
        n = len(datagrams)
        i = 0
        while i < n:
            data, addr = datagrams[i]
            size = len(data)
            j = i + 1
            total = size
            while j < n and j - i < GSO_MAX_SEGMENTS:
                nxt, to = datagrams[j]
                if to != addr or len(nxt) > size or total + len(nxt) > GSO_MAX_BYTES:
                    break
                total += len(nxt)
                j += 1
                if len(nxt) < size:
                    break  # a shorter datagram ends the run
            try:
                send_run(sock, [d for d, _ in datagrams[i:j]], addr)
                if j - i > 1:
                    self.runs += 1
            except BlockingIOError:
                return i
            except Exception as e:
                if j - i > 1 and (not isinstance(e, OSError) or e.errno in GSO_REFUSED):
                    log.info("UDP segmentation offload refused ({e}); sending datagrams one by one", e=e)
                    self.enabled = False
                    return i + send_one_by_one(sock.sendto, datagrams[i:])
                log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
            i = j
        return n


def send_one_by_one(sendto: Callable[[bytes, Address], object], datagrams: Sequence[tuple[bytes, Address]]) -> int:
    """`SegmentedSender.send` without segmentation, through `sendto` (a socket's, or a
    transport's `write`): how many left before the socket buffer filled up."""
    for k, (data, addr) in enumerate(datagrams):
        try:
            sendto(data, addr)
        except BlockingIOError:
            return k
        except Exception as e:
            # Unreachable network, bad address...: the datagram is lost, as on any network.
            log.debug("UDP send to {addr!r} failed: {e}", addr=addr, e=e)
    return len(datagrams)


class GroPort(udp.Port):
    """
    A UDP port that reads with UDP GRO on (Linux): a run of same-size
    datagrams from one sender (a GSO batch, often 40 or more datagrams of 1452
    bytes) arrives in one C{recvmsg} and goes to the protocol's
    C{segmentsReceived} in one call, instead of one read, one Python call and
    one call into qh3 per datagram. Without GRO (the option refused) every
    read is a single datagram, as with Twisted's own port.
    """

    @staticmethod
    def usable(reactor: Any) -> bool:
        # A real reactor's UDP port (tests' in-memory reactors have their own listenUDP).
        from twisted.internet.posixbase import PosixReactorBase

        return (
            sys.platform.startswith("linux")
            and _GRO_CMSG_SPACE > 0
            and isinstance(reactor, PosixReactorBase)
        )

    def _bindSocket(self) -> None:
        super()._bindSocket()
        try:
            self.socket.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            pass  # an older kernel: plain reads

    def doRead(self) -> None:
        read = 0
        sock = self.socket
        protocol = self.protocol
        while read < self.maxThroughput:
            try:
                data, ancillary, _flags, addr = sock.recvmsg(self.maxPacketSize, _GRO_CMSG_SPACE)
            except OSError as se:
                no = se.args[0]
                if no in udp._sockErrReadIgnore or no in udp._sockErrReadRefuse:
                    return
                raise
            read += len(data)
            segment = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO and len(value) >= 4:
                    segment = struct.unpack("=i", value[:4])[0]
            if self.addressFamily == socket.AF_INET6:
                addr = addr[:2]
            try:
                if segment and len(data) > segment:
                    protocol.segmentsReceived(data, segment, addr)
                else:
                    protocol.datagramReceived(data, addr)
            except BaseException:
                log.failure("error in a UDP protocol")
