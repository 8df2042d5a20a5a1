"""Run the real `twistd dsss-agent` with its lease clock moved forward by the test. For tests only.

`python -m tests.support.clocked_agent OFFSET_FILE [twistd arguments...]`: the agent judges leases
(and collects) by its clock plus the seconds written in OFFSET_FILE (read at every use; 0 when
missing), so a test can move an agent days ahead in a moment. Every other clock of the agent
(timers, introductions, the control connection) is the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path


def install(offset_file: Path) -> None:
    from dsss.agent import service

    real = service.StorageAgent.lease_now

    def lease_now(self: service.StorageAgent) -> float:
        try:
            offset = float(offset_file.read_text() or 0)
        except (FileNotFoundError, ValueError):
            offset = 0.0
        return real(self) + offset

    service.StorageAgent.lease_now = lease_now  # type: ignore[method-assign]


def main() -> None:
    install(Path(sys.argv[1]))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
