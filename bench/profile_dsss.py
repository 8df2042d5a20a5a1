"""Where a DSSS put/get spends its time: py-spy on the client and on one agent.

`py-spy record --idle --format raw` samples the client (started under py-spy) and one agent
(attached by pid, stopped with SIGINT when the client exits) during a put and then a get of the
same file. py-spy lives in `bench/.tools-venv` (made on first use). The raw files are collapsed
stacks (flamegraph.pl / speedscope input) and are kept in the results directory; this module
also summarizes them:

- `busy`: the fraction of samples in which the main thread was not waiting in the reactor's
  epoll (`--idle` keeps the waiting samples, so busy / total is the CPU share of wall time;
  the reactor's idle thread-pool threads are left out);
- `categories`: busy samples by the innermost frame's library (qh3, PyNaCl, hashing,
  Twisted, HTTP, file I/O, DSSS itself, imports);
- `top_self`: the innermost functions with the most samples;
- `inclusive`: samples in which a few functions of interest are anywhere on the stack.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import BENCH_DIR, file_digest, log

TOOLS = BENCH_DIR / ".tools-venv"
PY_SPY = TOOLS / "bin" / "py-spy"
RATE = 200  # samples per second

# Innermost frames of a thread that is waiting, not working: the reactor in epoll, and the
# reactor's thread pool (name resolution) waiting for work.
IDLE_LEAVES = ("doPoll (twisted/internet/epollreactor.py", "poll (selectors.py", "select (selectors.py",
               "Condition.wait (threading.py", "wait (threading.py")

CATEGORIES = [
    # (category, substring of the innermost frame's "function (file:line)")
    ("idle (epoll wait)", "epollreactor.py"),
    # qh3's connection logic, packet crypto and recovery run in native code, which py-spy
    # (without --native) charges to the Python frame that called it.
    ("qh3 TLS handshake", "qh3/tls.py"),
    ("qh3 TLS handshake", "qh3/quic/tls_bridge.py"),
    ("qh3 QUIC (native core, called from its connection facade)", "qh3/quic/connection.py"),
    ("qh3 other", "qh3/"),
    ("PyNaCl (part AEAD, signatures)", "nacl/"),
    ("hashing (BLAKE3, hashlib)", "hashlib"),
    ("hashing (BLAKE3, hashlib)", "blake3"),
    ("hashing (BLAKE3, hashlib)", "dsss/model.py"),
    ("DSSS QUIC adapter (dsss/quic/)", "dsss/quic/"),
    ("DSSS storage / file I/O", "dsss/storage/"),
    ("DSSS storage / file I/O", "dsss/fileutil.py"),
    ("DSSS agent transfer", "dsss/agent/transfer.py"),
    ("DSSS client flows/peer", "dsss/client/"),
    ("DSSS other", "dsss/"),
    ("Twisted UDP socket I/O", "twisted/internet/udp.py"),
    ("HTTP (treq/twisted.web/klein)", "treq/"),
    ("HTTP (treq/twisted.web/klein)", "twisted/web/"),
    ("HTTP (treq/twisted.web/klein)", "klein/"),
    ("Twisted Deferreds/reactor", "twisted/internet/"),
    ("Twisted other", "twisted/"),
    ("cryptography (TLS certs)", "cryptography/"),
]

INCLUSIVE = [
    ("encrypt_part", "encrypt_part ("),
    ("decrypt_part", "decrypt_part ("),
    ("block_hash", "block_hash ("),
    ("qh3 datagrams_to_send", "datagrams_to_send (qh3"),
    ("qh3 receive_datagram", "receive_datagram (qh3"),
    ("qh3 handle_timer", "handle_timer (qh3"),
    ("QuicEndpoint._flush", "_flush (dsss/quic/endpoint.py"),
    ("UDP transport.write", "write (twisted/internet/udp.py"),
    ("UDP doRead", "doRead (twisted/internet/udp.py"),
    ("BlockStore", "(dsss/storage/blockstore.py"),
    ("discovery HTTP (treq)", "(treq/"),
    ("after a reply completes (join, hash, decrypt, write)", "on_end (dsss/quic/connection.py"),
    ("agent: background scrub (re-read, re-hash)", "Scrubber.step (dsss/agent/scrub.py"),
    ("agent: upload commit (fsync, rename)", "commit (dsss/storage/blockstore.py"),
    ("agent: upload write + hash per chunk", "BlockWriter.write (dsss/storage/blockstore.py"),
]


def ensure_py_spy() -> str | None:
    if PY_SPY.exists():
        return None
    log("installing py-spy into bench/.tools-venv (once)")
    try:
        subprocess.run(["python3", "-m", "venv", str(TOOLS)], check=True, capture_output=True, timeout=300)
        r = subprocess.run([str(TOOLS / "bin" / "pip"), "install", "-q", "py-spy"], capture_output=True,
                           text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not install py-spy: {e}"
    if r.returncode != 0 or not PY_SPY.exists():
        return f"pip install py-spy failed: {(r.stderr or r.stdout).strip()[-400:]}"
    return None


def _shorten(frame: str) -> str:
    """'func (/long/path/site-packages/pkg/mod.py:12)' -> 'func (pkg/mod.py:12)'."""
    func, _, where = frame.partition(" (")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{func} ({where}"


def summarize(raw_path: Path, top: int = 20) -> dict[str, Any]:
    stacks: list[tuple[list[str], int]] = []
    for line in raw_path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_shorten(f) for f in stack.split(";")]
        stacks.append((frames, int(count)))
    # Threads other than the main one are the reactor's pool (DNS): counted only when working.
    stacks = [(f, c) for f, c in stacks
              if not (f and f[0].startswith("Thread._bootstrap") and any(m in f[-1] for m in IDLE_LEAVES))]
    total = sum(c for _, c in stacks)
    categories: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    idle = 0
    for frames, count in stacks:
        leaf = frames[-1] if frames else "?"
        if any(leaf.startswith(m) or m in leaf for m in IDLE_LEAVES):
            idle += count
            continue
        if any("importlib" in f for f in frames):
            categories["imports / start-up"] += count  # module-level work (regexes, dataclasses) too
        else:
            for name, key in CATEGORIES:
                if key in leaf:
                    categories[name] += count
                    break
            else:
                categories["other (stdlib, C builtins)"] += count
        leaves[leaf] += count
        joined = ";".join(frames)
        for name, key in INCLUSIVE:
            if key in joined:
                inclusive[name] += count
    busy = total - idle

    def pct(n: int, of: int) -> float:
        return round(100.0 * n / of, 1) if of else 0.0

    return {
        "samples": total,
        "seconds_sampled": round(total / RATE, 2),
        "busy_pct_of_wall": pct(busy, total),
        "categories_pct_of_busy": {k: pct(v, busy) for k, v in categories.most_common()},
        "top_self_pct_of_busy": [(k, pct(v, busy)) for k, v in leaves.most_common(top)],
        "inclusive_pct_of_busy": {k: pct(v, busy) for k, v in inclusive.most_common()},
    }


def _spy(args: list[str], out: Path) -> list[str]:
    return [str(PY_SPY), "record", "--idle", "-r", str(RATE), "-f", "raw", "-o", str(out), *args]


def profile(dsss: Any, src: Path, outdir: Path) -> dict[str, Any]:
    """Profile a put then a get of `src` on a started DsssNetwork; returns the summaries."""
    reason = ensure_py_spy()
    if reason:
        return {"skipped": reason}
    outdir.mkdir(parents=True, exist_ok=True)
    agent = dsss.net.agents[0]
    result: dict[str, Any] = {"file_size": src.stat().st_size, "rate_hz": RATE, "agent": agent.name}
    address = None
    for op in ("put", "get"):
        args = ("put", str(src)) if op == "put" else ("get", address, "-o", str(outdir / "get.out"))
        client_raw, agent_raw, server_raw = (outdir / f"{op}-{w}.raw" for w in ("client", "agent", "server"))
        attach = [
            subprocess.Popen(_spy(["--pid", str(agent.pid)], agent_raw), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL),
            subprocess.Popen(_spy(["--pid", str(dsss.net.server.pid)], server_raw), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL),
        ]
        time.sleep(1.0)  # let py-spy attach before the client starts
        t0 = time.monotonic()
        r = subprocess.run(_spy(["--", *dsss.client_command(*args)], client_raw), env=dsss.env,
                           capture_output=True, text=True)
        seconds = time.monotonic() - t0
        for p in attach:
            p.send_signal(signal.SIGINT)
        for p in attach:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        # py-spy exits 0 whatever the client did, and prints its own lines on stdout: check the
        # client's work itself.
        if op == "put":
            m = re.search(r"^([0-9a-f]{64}) ", r.stdout, re.M)
            if r.returncode != 0 or m is None:
                return {"error": f"profiled put failed: {r.stdout[-800:]} {r.stderr[-800:]}"}
            address = m.group(1)
        else:
            got = outdir / "get.out"
            if r.returncode != 0 or not got.exists() or file_digest(got) != file_digest(src):
                return {"error": f"profiled get failed: {r.stdout[-800:]} {r.stderr[-800:]}"}
        result[op] = {
            "seconds_under_profiler": round(seconds, 2),
            "client": summarize(client_raw),
            "agent": summarize(agent_raw) if agent_raw.exists() else None,
            "server": summarize(server_raw) if server_raw.exists() else None,
            "raw_files": [str(p) for p in (client_raw, agent_raw, server_raw)],
        }
        log(f"profile: {op} took {seconds:.1f}s under py-spy")
    (outdir / "get.out").unlink(missing_ok=True)
    return result


def render(result: dict[str, Any]) -> str:
    if "skipped" in result or "error" in result:
        return f"profile: {result.get('skipped') or result.get('error')}"
    lines = []
    for op in ("put", "get"):
        r = result.get(op)
        if not r:
            continue
        lines.append(f"\n## profile: {op} of {result['file_size'] // (1 << 20)} MiB "
                     f"({r['seconds_under_profiler']} s under py-spy)")
        for who in ("client", "agent", "server"):
            s = r.get(who)
            if not s:
                continue
            lines.append(f"\n{who}: busy {s['busy_pct_of_wall']}% of {s['seconds_sampled']} s sampled")
            lines.append("  by innermost library (% of busy samples):")
            for k, v in list(s["categories_pct_of_busy"].items())[:12]:
                lines.append(f"    {v:5.1f}  {k}")
            lines.append("  anywhere on the stack (% of busy samples):")
            for k, v in s["inclusive_pct_of_busy"].items():
                lines.append(f"    {v:5.1f}  {k}")
            lines.append("  top innermost functions (% of busy samples):")
            for k, v in s["top_self_pct_of_busy"][:10]:
                lines.append(f"    {v:5.1f}  {k}")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p, summarize(Path(p)))
