from __future__ import annotations

from dsss.agent.scrub import Scrubber
from dsss.model import block_hash
from dsss.storage.blockstore import BlockStore


def test_scrub_finds_rot_within_its_budget(tmp_path):
    store = BlockStore(tmp_path, capacity=10**6)
    blocks = []
    for i in range(10):
        data = bytes([i]) * 1000
        store.put(block_hash(data), data)
        blocks.append(block_hash(data))
    rotten = blocks[3]
    path = store.path_of(rotten)
    path.write_bytes(b"\xff" + path.read_bytes()[1:])
    found = []
    s = Scrubber(store, found.append)
    assert s.step(2500) == 3000  # whole parts only, at least the budget
    assert s.checked + s.corrupt == 3
    total = 3000
    while s.checked + s.corrupt < 10:
        total += s.step(1000)
    assert total == 10_000  # one pass reads every part once
    assert found == [rotten] and s.corrupt == 1 and s.checked == 9
    assert not store.has(rotten)
    assert len(list((tmp_path / "quarantine").iterdir())) == 1
    # The next pass starts again and finds nothing new.
    assert s.step(9000) == 9000
    assert found == [rotten] and s.passes == 2


def test_scrub_of_an_empty_store(tmp_path):
    s = Scrubber(BlockStore(tmp_path, capacity=10), lambda b: None)
    assert s.step(100) == 0


def test_scrub_pacer_reads_at_its_rate_and_yields_to_transfers() -> None:
    from dsss.agent.scrub import BUSY_SHARE, ScrubPacer

    def bytes_read(pacer: ScrubPacer, seconds: float, busy: bool, part: int) -> int:
        total = 0
        for _ in range(int(seconds * 10)):
            if pacer.may_read(0.1, busy):
                pacer.spent(part)
                total += part
        return total

    rate = 8 * 1024 * 1024
    idle = bytes_read(ScrubPacer(rate), 60, False, 1024 * 1024)
    busy = bytes_read(ScrubPacer(rate), 60, True, 1024 * 1024)
    # Over a minute, within one part of the rate (a part is read whole, then paid back).
    assert abs(idle - 60 * rate) <= 2 * 1024 * 1024
    assert abs(busy - 60 * rate / BUSY_SHARE) <= 2 * 1024 * 1024
    # A part larger than a second's credit is still read, and then paid back.
    big = bytes_read(ScrubPacer(1024 * 1024), 60, False, 4 * 1024 * 1024)
    assert 56 * 1024 * 1024 <= big <= 64 * 1024 * 1024
    assert bytes_read(ScrubPacer(0), 10, False, 1) == 0
