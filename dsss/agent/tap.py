# -*- test-case-name: tests.adapters.test_taps -*-
"""`twistd dsss-agent --storage DIR`: options and makeService (a thin shim)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.python import usage

from dsss.agent.reservations import UploadPolicy
from dsss.agent.service import AgentConfig, make_agent_service
from dsss.endpoints import parse_hostport
from dsss.errors import BadRequest
from dsss.leases import parse_duration
from dsss.logging import LOG_FORMAT_OPTION, apply_log_format
from dsss.model import is_decimal, parse_size
from dsss.storage.blockstore import StoreFormatError, check_store_format
from dsss.wire.transfer import MAX_PART


class Options(usage.Options):
    synopsis = "--storage DIR [options]"
    longdesc = "Run a DSSS storage agent that keeps encrypted parts in DIR."
    optParameters = [
        ["storage", None, None, "Directory where parts are stored (required)."],
        ["server", None, "127.0.0.1:8471", "The discovery server's control HOST:PORT."],
        ["udp", None, "0.0.0.0:0", "Local UDP HOST:PORT for punching and transfers."],
        ["control-source", None, None,
         "Local IP address the control connection to the server leaves from (default: the system's choice)."],
        ["capacity", None, None, "Most bytes to store, e.g. 10G (default: free space of DIR)."],
        ["datagram-size", None, "1452", "Largest QUIC datagram to send (1200-65000; more than 1452 only on loopback)."],
        ["scrub-rate", None, "8M", "Bytes per second re-read to detect bit rot (0 to disable; 1/8 of it during transfers)."],
        ["metrics", None, None, "Endpoint for Prometheus /metrics, e.g. tcp:9100:interface=127.0.0.1."],
        ["upload-min-rate", None, "32K",
         "Bytes per second an upload must keep up (over 10 s, after 10 s of grace), or it is dropped."],
        ["reserve-per-source", None, "256M", "Bytes that uploads from one IP address may hold reserved at once."],
        ["gc-rate", None, "10", "Parts without a live lease collected per second at most (0: never collect)."],
        ["gc-grace", None, "5m", "Time after a part's last lease change before it may be collected."],
        ["lease-skew", None, "1h", "Clock-skew bound: a lease is kept this long past its expiry."],
        ["initial-hold", None, "1h", "How long a part uploaded without a lease is kept."],
        LOG_FORMAT_OPTION,
    ]

    def postOptions(self) -> None:
        apply_log_format(self)
        if not self["storage"]:
            raise usage.UsageError("--storage DIR is required")
        if self["metrics"]:
            from dsss.server.tap import _check_endpoint

            _check_endpoint(self["metrics"], "--metrics")
        storage = os.path.abspath(self["storage"])
        if os.path.exists(storage) and not os.path.isdir(storage):
            raise usage.UsageError(f"--storage: {storage} is not a directory")
        try:
            os.makedirs(storage, exist_ok=True)
        except OSError as e:
            raise usage.UsageError(f"--storage: cannot create {storage}: {e}") from None
        if not os.access(storage, os.W_OK):
            raise usage.UsageError(f"--storage: {storage} is not writable")
        try:
            check_store_format(storage)
        except StoreFormatError as e:
            raise usage.UsageError(f"--storage: {e}") from None
        try:
            server_host, server_port = parse_hostport(self["server"], "--server")
            udp_host, udp_port = parse_hostport(self["udp"], "--udp")
            capacity = parse_size(self["capacity"]) if self["capacity"] else None
        except BadRequest as e:
            raise usage.UsageError(str(e)) from None
        if server_port == 0:
            raise usage.UsageError("--server needs a port")
        source = self["control-source"]
        if source is not None:
            try:
                source_ip = ipaddress.ip_address(source)
            except ValueError:
                raise usage.UsageError(f"--control-source must be an IP address, got {source[:80]!r}") from None
            if source_ip.version != ipaddress.ip_address(server_host).version:
                raise usage.UsageError("--control-source and --server must be of one IP version")
        try:
            scrub_rate = parse_size(self["scrub-rate"])
        except BadRequest as e:
            raise usage.UsageError(f"--scrub-rate: {e}") from None
        sizes = {}
        for name in ("upload-min-rate", "reserve-per-source"):
            try:
                sizes[name] = parse_size(self[name])
            except BadRequest as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        min_rate, per_source = sizes["upload-min-rate"], sizes["reserve-per-source"]
        if min_rate < 1:
            raise usage.UsageError("--upload-min-rate must be at least 1 (byte per second)")
        if per_source < MAX_PART:
            raise usage.UsageError(f"--reserve-per-source must be at least {MAX_PART} (one part of the largest size)")
        gc = {}
        try:
            rate = float(self["gc-rate"])
        except ValueError:
            raise usage.UsageError(f"--gc-rate: not a number: {self['gc-rate'][:40]!r}") from None
        if not 0 <= rate <= 100000:
            raise usage.UsageError("--gc-rate must be from 0 to 100000 (parts per second)")
        for name in ("gc-grace", "lease-skew", "initial-hold"):
            try:
                gc[name] = float(parse_duration(self[name]))
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        dsize = self["datagram-size"]
        if not is_decimal(str(dsize)) or not 1200 <= int(dsize) <= 65000:
            raise usage.UsageError("--datagram-size must be an integer from 1200 to 65000")
        self.config = AgentConfig(
            storage=storage,
            server_host=server_host,
            server_port=server_port,
            udp_host=udp_host,
            udp_port=udp_port,
            control_source=source,
            capacity=capacity,
            max_datagram_size=int(dsize),
            scrub_rate=scrub_rate,
            metrics=self["metrics"],
            upload_policy=UploadPolicy(min_rate=float(min_rate), per_source=per_source),
            gc_rate=rate,
            gc_grace=gc["gc-grace"],
            lease_skew=gc["lease-skew"],
            initial_hold=gc["initial-hold"],
        )


def makeService(options: Options) -> Any:
    from twisted.internet import reactor

    return make_agent_service(reactor, options.config)
