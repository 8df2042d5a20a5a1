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
