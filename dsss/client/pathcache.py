# -*- test-case-name: tests.unit.test_peer_paths -*-
"""What the client remembers between calls about the paths to agents (the relay-only ones).

The public IP addresses behind which agents could only be reached through the server's relay
(a symmetric NAT), as seen from the client's own public address. The next call, from the same public address, asks for the
relay at once for agents there instead of spending a direct attempt (3 s) first.

`<key file>.paths`, mode 0600, one JSON object:

    {"version": 1, "relay-only": {"<client public IP>": {"<agent public IP>": <expiry, Unix time>}}}

Entries expire after RELAY_MEMORY seconds (an agent's NAT may change; an expired address gets
its direct attempt again). A damaged or unreadable file is ignored; a failed write is a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from dsss.fileutil import atomic_write

log = Logger()

RELAY_MEMORY = 3600.0
"""Seconds an address that needed the relay is remembered."""
MAX_ENTRIES = 512
"""Most (client address, agent address) pairs kept; the soonest to expire go first."""


def paths_file(key_path: str | os.PathLike[str]) -> Path:
    key = Path(key_path)
    return key.with_name(key.name + ".paths")


def _read(path: Path) -> dict[str, dict[str, float]]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    table = doc.get("relay-only") if isinstance(doc, dict) and doc.get("version") == 1 else None
    if not isinstance(table, dict):
        return {}
    out: dict[str, dict[str, float]] = {}
    for mine, hosts in table.items():
        if isinstance(mine, str) and isinstance(hosts, dict):
            out[mine] = {h: float(t) for h, t in hosts.items()
                         if isinstance(h, str) and isinstance(t, (int, float)) and len(h) <= 64}
    return out


def load_relay_only(path: Path, public_ip: str, now: float) -> dict[str, float]:
    """Agent addresses (with their expiry) that needed the relay from `public_ip`, unexpired."""
    return {h: t for h, t in _read(path).get(public_ip, {}).items() if t > now}


def save_relay_only(path: Path, public_ip: str, hosts: dict[str, float], now: float) -> None:
    """Merge `hosts` (address -> expiry) into the file for `public_ip`, dropping what expired."""
    table = _read(path)
    mine = {h: t for h, t in table.get(public_ip, {}).items() if t > now}
    mine.update({h: t for h, t in hosts.items() if t > now})
    table[public_ip] = mine
    pairs = sorted(((t, ip, h) for ip, hs in table.items() for h, t in hs.items() if t > now), reverse=True)
    kept: dict[str, dict[str, float]] = {}
    for t, ip, h in pairs[:MAX_ENTRIES]:
        kept.setdefault(ip, {})[h] = t
    doc: dict[str, Any] = {"version": 1, "relay-only": kept}
    try:
        atomic_write(path, json.dumps(doc, sort_keys=True).encode("utf-8") + b"\n", mode=0o600)
    except OSError as e:
        log.warn("could not remember the relay paths in {path}: {error}", path=str(path), error=e.strerror or str(e))
