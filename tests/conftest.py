from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from dsss.harness import LocalNetwork


@pytest.fixture
def make_network(tmp_path: Path) -> Iterator:
    """Factory for LocalNetworks of real twistd processes on 127.0.0.1, stopped after the test."""
    networks: list[LocalNetwork] = []

    def make(name: str = "net", **kw: object) -> LocalNetwork:
        net = LocalNetwork(tmp_path / name, **kw)  # type: ignore[arg-type]
        networks.append(net)
        return net

    yield make
    for net in networks:
        net.stop()


def start_network(net: LocalNetwork, agents: int = 3) -> LocalNetwork:
    net.start_server()
    for _ in range(agents):
        net.start_agent()
    net.wait_live(agents)
    return net


@pytest.fixture(scope="module")
def shared_network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNetwork]:
    """One server and four agents for a whole test module; tests must not break it."""
    net = LocalNetwork(tmp_path_factory.mktemp("shared"), heartbeat=0.5)
    try:
        start_network(net, agents=4)
        net.client("keygen")
        yield net
    finally:
        net.stop()
