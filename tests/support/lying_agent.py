"""Run the real `twistd dsss-agent` reporting a lie about its free space. For tests only.

`python tests/support/lying_agent.py FREE [twistd arguments...]`: the agent's store claims
FREE bytes free (and the agent is given `--capacity` FREE by the test), so every REGISTER and
SPACE it sends says FREE, whatever the disk holds. Everything else is the real agent: it stores
what it accepts, in its real store. (An agent that actually has no room refuses uploads with
`ERROR full`: the disk, not the lie, decides what fits.)
"""

from __future__ import annotations

import sys


def main() -> None:
    free = int(sys.argv[1])
    from dsss.storage import blockstore

    real_free = blockstore.BlockStore.free

    def lying_free(self: blockstore.BlockStore) -> int:
        # What the agent reports (REGISTER, SPACE) and what it believes it can take; writing
        # past the real disk still fails in the store as it would for any agent.
        return free if real_free.fget(self) > 0 else 0  # type: ignore[attr-defined]

    blockstore.BlockStore.free = property(lying_free)  # type: ignore[assignment, method-assign]
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
