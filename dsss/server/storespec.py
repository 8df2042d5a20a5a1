"""Which store a `--store` value names: `memory`, `sqlite:PATH` or `postgresql://...`."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from dsss.server.sqlstore import SQLStore
from dsss.server.store import MemoryStore, Store

_PG_URL = re.compile(r"\Apostgres(ql)?://")


def open_store(spec: str, reactor: Any = None) -> Store:
    """The store a `--store` value names: `memory`, `sqlite:PATH` or `postgresql://...`."""
    if spec == "memory":
        return MemoryStore()
    if spec.startswith("sqlite:") and len(spec) > len("sqlite:"):
        return SQLStore(spec, reactor)
    if _PG_URL.match(spec) and urlsplit(spec).hostname is not None or spec.startswith("postgresql:///"):
        return SQLStore(spec, reactor)
    raise ValueError(f"--store must be memory, sqlite:PATH or postgresql://USER@HOST:PORT/DB, not {spec!r}")

