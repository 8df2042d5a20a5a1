# -*- test-case-name: tests.unit.test_client_flows -*-
"""Running many files' flows in one session: a bounded number at once, the large ones one by one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from dsss.client.session import Session


def keep_error(failure: Failure, errors: list[BaseException]) -> None:
    if failure.value is not None:
        errors.append(failure.value)


def files_in_flight(session: Session) -> int:
    """How many files `put_files` and `get_files` keep in flight at once."""
    return max(4, 2 * session.parallel)


async def each_bounded(
    count: int,
    start: Callable[[int], Any],
    *,
    limit: int,
    heavy: Callable[[int], bool],
    stop: Callable[[], bool],
) -> None:
    """Run `start(i)` (a coroutine function) for i in order, at most `limit` at a time, and only
    one at a time of those that `heavy(i)` says are large (they use the whole `parallel` window
    of parts each, so memory stays that of one large file plus a few small ones). No new one is
    started once `stop()` says so; those already running finish."""
    slots = defer.DeferredSemaphore(max(1, limit))
    big = defer.DeferredLock()
    running: list[defer.Deferred[None]] = []

    async def run(i: int, is_heavy: bool) -> None:
        try:
            await start(i)
        finally:
            slots.release()
            if is_heavy:
                big.release()

    for i in range(count):
        if stop():
            break
        is_heavy = heavy(i)
        if is_heavy:
            await big.acquire()
        await slots.acquire()
        if stop():
            slots.release()
            if is_heavy:
                big.release()
            break
        running.append(defer.ensureDeferred(run(i, is_heavy)))
    results = await defer.DeferredList(running, consumeErrors=True)
    for ok, value in results:
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()
