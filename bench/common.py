"""Helpers shared by the benchmark scripts: statistics, timed child processes, tables, files."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*words: object) -> None:
    print(time.strftime("%H:%M:%S"), *words, file=sys.stderr, flush=True)


def compile_bytecode() -> None:
    """Write DSSS's bytecode (.pyc files), as a pip install does. DSSS is installed editable here,
    so with PYTHONDONTWRITEBYTECODE set (as on this machine) every CLI call would compile its 25
    modules again (about 0.1 s of each call), a cost Tahoe's pip-installed CLI never pays."""
    import compileall

    for d in ("dsss", "twisted/plugins"):
        compileall.compile_dir(str(REPO_ROOT / d), quiet=1)


def start_gateway(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """Run `dsss gateway` (`cmd`, with `--listen` on port 0), its log appended to `log_path`;
    once it listens, (the process, its URL, its token)."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log_file)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode(errors="replace")
    if "listening on " not in line:
        stop_process(proc)
        raise RuntimeError(f"the gateway did not start: {line!r}; see {log_path}")
    url = line.split("listening on ", 1)[1].split()[0].rstrip("/")
    token = Path(line.split("(token in ", 1)[1].split(")")[0]).read_text().strip()
    return proc, url, token


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; waits for it."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- statistics ---------------------------------------------------------------------------------


def summary(values: Iterable[float]) -> dict[str, Any]:
    """median, min, max and the values themselves (empty input: Nones)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": [round(v, 6) for v in vals],
    }


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), nearest-rank on the sorted values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, int(round(p / 100.0 * len(ordered) + 0.5)))
    return ordered[min(rank, len(ordered)) - 1]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b in (None, 0):
        return None
    return a / b  # type: ignore[operator]


# --- processes ----------------------------------------------------------------------------------


def run_timed(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 7200,
              stdin_data: bytes | None = None, rss_every: float | None = None) -> dict[str, Any]:
    """Run `cmd` to completion: wall seconds, exit code, stdout/stderr, and the child's own peak
    RSS and CPU time (reaped with wait4, so the figures are this child's alone). With
    `rss_every`, also `rss_timeline`: [seconds since start, VmRSS kB] sampled that often."""
    timeline: list[tuple[float, int]] = []
    next_sample = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        p = subprocess.Popen(list(cmd), env=env, stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
                             stdout=out, stderr=err)
        if stdin_data:
            assert p.stdin is not None
            p.stdin.write(stdin_data)
            p.stdin.close()
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            now = time.monotonic()
            if rss_every is not None and now - start >= next_sample:
                rss = proc_status_kb(p.pid, "VmRSS")
                if rss is not None:
                    timeline.append((round(now - start, 2), rss))
                next_sample += rss_every
            if now > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.005)
        seconds = time.monotonic() - start
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {
            "seconds": seconds,
            "rc": p.returncode,
            "stdout": out.read().decode(errors="replace"),
            "stderr": err.read().decode(errors="replace")[-4000:],
            "maxrss_kb": usage.ru_maxrss,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            **({"rss_timeline": timeline} if rss_every is not None else {}),
        }


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds a running process has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def proc_status_kb(pid: int, key: str) -> int | None:
    """A field of /proc/PID/status in kB (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --- files --------------------------------------------------------------------------------------


def make_random_file(path: Path, size: int, *, fresh: bool = False) -> Path:
    """A file of `size` random bytes (kept if it already has that size, unless `fresh`: then new
    bytes every time, as every put to Tahoe needs, which would not send again what it holds)."""
    if not fresh and path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n
        if size >= MiB:
            f.flush()
            os.fsync(f.fileno())  # not written back while a put reads it
    tmp.rename(path)
    return path


def file_digest(path: Path | str) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(4 * MiB)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def size_label(n: int) -> str:
    for unit, scale in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


# --- tables -------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    numeric = [[isinstance(c, (int, float)) or c is None for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n## {title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r, num in zip(cells, numeric):
        lines.append("| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(r, widths, num)) + " |")
    return "\n".join(lines)


def stat_cells(s: dict[str, Any] | None) -> list[Any]:
    if not s:
        return [None, None, None]
    return [s.get("median"), s.get("min"), s.get("max")]
