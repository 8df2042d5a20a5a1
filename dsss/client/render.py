# -*- test-case-name: tests.unit.test_client_catalog_config -*-
"""How the CLI shows things: sizes, dates, tables, JSON documents, progress bars.

Nothing here talks to the network. Progress bars are drawn only when stderr is a terminal; on a
pipe the CLI stays silent on stderr unless something fails.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from typing import IO, Any, Callable, Sequence

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(n: int) -> str:
    """`0 B`, `999 B`, `1.5 KiB`, `12.0 MiB`, `3.2 GiB` (binary units, one decimal)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def local_date(ts: int) -> str:
    """A Unix time as local `YYYY-MM-DD HH:MM`."""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def utc_iso(ts: int) -> str:
    """A Unix time as ISO 8601 UTC, e.g. `2025-05-01T12:03:09Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; the last column is not padded.

    `right` lists the columns aligned to the right (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *rows]:
        cells = []
        for i, cell in enumerate(row):
            if i == len(row) - 1:
                cells.append(cell)
            elif i in right:
                cells.append(cell.rjust(widths[i]))
            else:
                cells.append(cell.ljust(widths[i]))
        lines.append("  ".join(cells).rstrip())
    return lines


def dump_json(doc: Any, out: IO[str] | None = None) -> None:
    """One JSON document on one line (ASCII only, so any locale can print it)."""
    out = out or sys.stdout
    out.write(json.dumps(doc, ensure_ascii=True, separators=(", ", ": ")) + "\n")
    out.flush()


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _bar(total: int, desc: str, *, position: int = 0, leave: bool = True) -> Any:
    from tqdm import tqdm

    # A terminal that reports no size (0x0, as some ptys do) still gets a bar: tqdm would
    # otherwise hide it for lack of rows.
    size = shutil.get_terminal_size((100, 24))
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                file=sys.stderr, leave=leave, ncols=min(size.columns or 100, 120),
                nrows=size.lines or 24, mininterval=0.2, position=position)


def count_bar(total: int, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A bar counting things (files) on a terminal: (advance, close); no-ops elsewhere."""
    if not stderr_is_terminal():
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    size = shutil.get_terminal_size((100, 24))
    bar = tqdm(total=total, unit="file", desc=desc, file=sys.stderr,
               ncols=min(size.columns or 100, 120), nrows=size.lines or 24, mininterval=0.2)

    def advance(n: int) -> None:
        bar.update(n)

    return advance, bar.close


def byte_bar(total: int, desc: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A single byte-count bar on a terminal: (advance, close); no-ops elsewhere."""
    if not stderr_is_terminal():
        return (lambda n: None), (lambda: None)
    bar = _bar(total, desc)
    return bar.update, bar.close


class PutDisplay:
    """Progress of a `put` of one or more files: an overall bar (several files only) and one bar
    per file, then a summary line. Draws nothing unless `enabled` (stderr is a terminal)."""

    def __init__(self, sizes: Sequence[int], *, enabled: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.count = len(sizes)
        self.total = sum(sizes)
        self.clock = clock
        self.started = clock()
        self.done_files = 0
        self.done_bytes = 0
        self._overall: Any = None
        self._file: Any = None
        if enabled and self.count > 1:
            self._overall = _bar(self.total, f"{self.count} files", position=0)

    def start_file(self, name: str, size: int, *, own_bar: bool = True) -> Callable[[int], None]:
        """Begin a file; returns the `advance(nbytes)` callback for its parts.

        Files stored several at a time (`own_bar=False`, small ones) only advance the overall
        bar, which names the last one started; a file stored alone also gets a bar of its own."""
        if not self.enabled:
            return lambda n: None
        multi = self._overall is not None
        if multi and not own_bar:
            self._overall.set_postfix_str(name, refresh=True)
            return self._overall.update
        self._file = _bar(size, name, position=1 if multi else 0, leave=not multi)
        bars = [b for b in (self._file, self._overall) if b is not None]

        def advance(n: int) -> None:
            for b in bars:
                b.update(n)

        return advance

    def end_file(self, size: int, *, own_bar: bool = True) -> None:
        self.done_files += 1
        self.done_bytes += size
        if own_bar and self._file is not None:
            self._file.close()
            self._file = None

    def write_line(self, line: str) -> None:
        """A line on stdout that does not break the bars."""
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(line, flush=True)

    def summary(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-6)
        mib = self.done_bytes / (1024 * 1024)
        files = "file" if self.done_files == 1 else "files"
        return f"stored {self.done_files} {files}, {mib:.1f} MiB in {elapsed:.1f} s ({mib / elapsed:.1f} MiB/s)"

    def close(self, *, success: bool) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._overall is not None:
            self._overall.close()
            self._overall = None
        if self.enabled and success:
            print(self.summary(), file=sys.stderr, flush=True)
