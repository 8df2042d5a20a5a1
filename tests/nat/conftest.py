"""Fixtures for the NAT tests: a lab of network namespaces (root only) and DSSS networks in it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tools.netns import NatLab, NatNetwork, unavailable_reason


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "nat: needs root; builds network namespaces with NAT routers")


@pytest.fixture(scope="module")
def nat_lab() -> Iterator[NatLab]:
    """One lab for the module (built in about a second, deleted after, even on failure):

    - r1, r2: cone NATs (port-preserving MASQUERADE) whose UDP mappings expire after 5 s idle;
      r1 has agents' hosts h1_1, h1_2 and r2 has h2_1.
    - r3: cone NAT, default timeouts; h3_1 is the client's host.
    - r4: symmetric NAT (MASQUERADE --random-fully), 5 s UDP timeout, with h4_1..h4_3 (agents).
    - r5: symmetric NAT with h5_1 (a client).
    - p1..p3: public hosts on the wan, no NAT.
    """
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lab = NatLab()
    try:
        lab.add_router("cone", hosts=2, udp_timeout=5)
        lab.add_router("cone", hosts=1, udp_timeout=5)
        lab.add_router("cone", hosts=1)
        lab.add_router("symmetric", hosts=3, udp_timeout=5)
        lab.add_router("symmetric", hosts=1)
        for _ in range(3):
            lab.add_public_host()
        yield lab
    finally:
        lab.close()


@pytest.fixture
def nat_net(nat_lab: NatLab, tmp_path: Path) -> Iterator[Callable[..., NatNetwork]]:
    """Factory: `nat_net(heartbeat=..., replicas=...)` -> NatNetwork; its processes are stopped
    after the test (and their last log lines shown if the test failed)."""
    networks: list[NatNetwork] = []

    def make(name: str = "net", **kw: Any) -> NatNetwork:
        net = NatNetwork(nat_lab, tmp_path / name, **kw)
        networks.append(net)
        return net

    yield make
    for net in networks:
        net.stop()


@pytest.fixture
def random_file(tmp_path: Path) -> Callable[[int], Path]:
    def make(size: int, name: str = "data.bin") -> Path:
        path = tmp_path / name
        with open(path, "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 1 << 20))
                f.write(chunk)
                left -= len(chunk)
        return path

    return make


def lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}
