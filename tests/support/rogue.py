"""Run the real `twistd dsss-agent`, changed to misbehave as a rogue agent would. For tests only.

`python -m tests.support.rogue MODE[,MODE...] [twistd arguments...]`, started by the harness in
place of twistd (`LocalNetwork.start_agent(..., program=rogue_program(...))`). Everything not
named by a mode is the real agent, with its real store and identity. Modes:

- `ack-and-drop`: takes every upload, claims it (HAVE), signs its receipt, and keeps nothing.
- `keeps-half`: the same for every second part it receives; the others it keeps.
- `lying-free`: reports 2^61 bytes of capacity and free space.
- `false-who-has`: answers every WHO_HAS with "1".
- `false-have=FILE`: once registered, claims the parts listed in FILE (`HASH SIZE` per line),
  which it does not hold, with the sizes given there (which may be wrong).
- `wrong-sizes`: claims each part it holds with a size one byte too large.

Audits are answered by the real agent from what its store really holds.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

LIE = 2**61
MODES = ("ack-and-drop", "keeps-half", "lying-free", "false-who-has", "false-have", "wrong-sizes")


def parse(spec: str) -> dict[str, str]:
    modes = {}
    for item in spec.split(","):
        name, _, arg = item.partition("=")
        if name not in MODES:
            raise SystemExit(f"rogue: unknown mode {name!r} (modes: {', '.join(MODES)})")
        if (name == "false-have") != bool(arg):
            raise SystemExit("rogue: false-have takes =FILE, no other mode takes an argument")
        modes[name] = arg
    return modes


def install(modes: dict[str, str]) -> None:
    from dsss.agent import control, service
    from dsss.storage import blockstore
    from dsss.wire import control as wc

    if "ack-and-drop" in modes or "keeps-half" in modes:
        stored = service.StorageAgent.stored
        count = itertools.count()

        def dropping_stored(self: Any, block: str) -> Any:
            reported = stored(self, block)  # the HAVE is on its way, with the real size
            if "ack-and-drop" in modes or next(count) % 2 == 1:
                self.store.quarantine(block)  # out of the store: never served, never proven
            return reported

        service.StorageAgent.stored = dropping_stored  # type: ignore[method-assign]

    if "lying-free" in modes:
        init = service.StorageAgent.__init__
        real_free = blockstore.BlockStore.free

        def lying_free(self: Any) -> int:
            return LIE if real_free.fget(self) > 0 else 0  # type: ignore[attr-defined]

        def lying_init(self: Any, *args: Any, **kw: Any) -> None:
            init(self, *args, **kw)
            self.store.capacity = LIE

        blockstore.BlockStore.free = property(lying_free)  # type: ignore[assignment, method-assign]
        service.StorageAgent.__init__ = lying_init  # type: ignore[method-assign]

    if "false-who-has" in modes:
        handle = control.ServerConnection.handle_request

        def always_yes(self: Any, msg: Any) -> Any:
            if isinstance(msg, wc.WhoHas) and self.welcome is not None:
                return wc.Bit(True)
            return handle(self, msg)

        control.ServerConnection.handle_request = always_yes  # type: ignore[method-assign]

    if "false-have" in modes:
        with open(modes["false-have"], encoding="ascii") as f:
            claims = [(h, int(n)) for h, n in (line.split() for line in f if line.strip())]
        registered = control.ServerConnection._registered

        def claiming(self: Any, reply: Any) -> None:
            registered(self, reply)
            if self.welcome is not None:
                for group in wc.chunked([h for h, _ in claims]):
                    sizes = dict(claims)
                    self._notify(wc.Have(group, tuple(sizes[h] for h in group)))

        control.ServerConnection._registered = claiming  # type: ignore[method-assign]

    if "wrong-sizes" in modes:
        def report_have(self: Any, blocks: list[str]) -> Any:
            from twisted.internet import defer

            store = self.agent.store
            held = [b for b in blocks if store.has(b)]
            sent = [self._notify(wc.Have(group, tuple(store.size_of(b) + 1 for b in group)))
                    for group in wc.chunked(held)] if self.welcome is not None else []
            return defer.gatherResults(sent).addCallback(lambda _: None)

        control.ServerConnection.report_have = report_have  # type: ignore[method-assign]


def main() -> None:
    install(parse(sys.argv[1]))
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[2:]]
    run()


if __name__ == "__main__":
    main()
