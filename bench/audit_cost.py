"""What a storage audit costs: the holder's CPU and bytes read per proof, the auditor's CPU per
check, and the price of tree addresses (dsss/proofs.py) against plain BLAKE3.

Runs in-process on a temporary BlockStore (no network): a proof is `BlockStore.read_proof` as the
agent runs it for AUDIT, a check is `proofs.verify` as the server or an owner runs it. Every
figure is the median of `--repeat` runs, CPU time of this thread (`time.thread_time`), with the
part's pages dropped from the cache before the audit measurements where the OS allows (the holder
reads from disk, as an agent audited at random would).

    .venv/bin/python bench/audit_cost.py [--sizes 64K,4M,16M] [--repeat 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import blake3  # noqa: E402

from dsss import proofs  # noqa: E402
from dsss.model import block_hash, parse_size  # noqa: E402
from dsss.storage.blockstore import BlockStore  # noqa: E402


def median_cpu(f: Callable[[], object], repeat: int) -> float:
    """Median CPU seconds of this thread for one call of f."""
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        f()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def median_wall(f: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def drop_cache(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass
    finally:
        os.close(fd)


def bytes_read(store: BlockStore, block: str, nonce: bytes) -> int:
    """Bytes the store reads (pread) to answer one challenge."""
    reads: list[int] = []
    real_pread = os.pread

    def counting(fd: int, n: int, off: int) -> bytes:
        out = real_pread(fd, n, off)
        reads.append(len(out))
        return out

    os.pread = counting  # type: ignore[assignment]
    try:
        store.read_proof(block, nonce)
    finally:
        os.pread = real_pread  # type: ignore[assignment]
    return sum(reads)


def measure(store: BlockStore, size: int, repeat: int) -> str:
    """One line of the table for a part of `size` bytes."""
    data = os.urandom(size)
    block = block_hash(data)
    store.put(block, data)
    nonces = [os.urandom(16) for _ in range(repeat)]
    it = iter(nonces * 4)

    def prove() -> tuple[int, bytes]:
        drop_cache(store.path_of(block))
        return store.read_proof(block, next(it))

    holder_cpu = median_cpu(prove, repeat)
    holder_wall = median_wall(prove, repeat)
    answers = [(n, store.read_proof(block, n)[1]) for n in nonces]
    ia = iter(answers * 2)

    def check() -> None:
        n, p = next(ia)
        proofs.verify(block, size, n, p)

    verify_cpu = median_cpu(check, repeat)
    hash_repeat = max(3, min(repeat, (256 << 20) // max(size, 1)))
    tree = median_cpu(lambda: proofs.address(data), hash_repeat)
    plain = median_cpu(lambda: blake3.blake3(data).digest(), hash_repeat)
    return (
        f"{size:>8} {proofs.leaf_count(size):>6} {len(answers[0][1]):>8} {bytes_read(store, block, nonces[0]):>8} "
        f"{holder_cpu * 1e6:>8.1f} us {holder_wall * 1e6:>8.1f} us {verify_cpu * 1e6:>7.1f} us "
        f"{size / tree / 1e9:>9.2f} {size / plain / 1e9:>11.2f} {tree / plain:>5.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64K,1M,4M,16M", help="part sizes (default: 64K,1M,4M,16M)")
    ap.add_argument("--repeat", type=int, default=200, help="runs per figure (default: 200)")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    repeat = max(3, args.repeat)

    print(f"leaf {proofs.LEAF_SIZE} bytes; medians of {repeat} runs; CPU = this thread's CPU time")
    print()
    print(f"{'part':>8} {'leaves':>6} {'proof B':>8} {'read B':>8} {'holder CPU':>11} "
          f"{'holder wall':>11} {'verify CPU':>10} {'tree GB/s':>9} {'BLAKE3 GB/s':>11} {'ratio':>5}")
    with tempfile.TemporaryDirectory(prefix="dsss-audit-bench-") as tmp:
        store = BlockStore(tmp, capacity=4 * max(sizes) + (1 << 20))
        for size in sizes:
            print(measure(store, size, repeat))
    print()
    print("proof B: bytes an answer carries (leaf + sibling hashes); read B: bytes the holder read for")
    print("it (the same: one leaf from the part, one 32-byte read per sibling from the outboard);")
    print("GB/s: one core, CPU time of hashing the whole part; ratio: tree address / plain BLAKE3.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
