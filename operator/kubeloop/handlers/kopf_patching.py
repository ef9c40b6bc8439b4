"""kopf's own writes — the status patch after a handler (our status and ``status.kopf``), and
finalizers — retried when the API server answers ``409 Conflict``, and bounded in number.

kopf 1.45 retries a request that fails with a 5xx, a 429, a 403 or a broken connection, but not
a 409: the error escapes the handling cycle, kopf throttles the object and then waits for its
next watch event — which never comes, because the write that would have caused it was the one
refused. The object sits unreconciled until the watch is re-listed (minutes), and a deleted
object keeps its finalizer until then. Found by the chaos suite (``tests/integration/
test_chaos.py``), which injects 409s on writes.

Retrying is safe for every patch kopf sends: a merge patch carries no precondition (the API
server itself retries one internally when it meets a conflict, and answers 409 only after
several), and a JSON patch carries kopf's ``test`` of the resourceVersion, so a retry succeeds
only against the version kopf computed it from — a changed object fails it with 422, which
kopf handles. kopf sends these patches through one function, ``kopf._cogs.clients.api.patch``,
looked up on its module at each call; it is wrapped once at start (``install``). kopf is pinned
in ``pyproject.toml``, and ``tests/unit/test_kopf_patching.py`` fails if the hook moves.

Bounded: kopf's HTTP session has no connection limit, and a burst of objects (a thousand
versions registered at once) runs a worker per object, each patching at the same moment — a
thousand TLS connections opened to the API server at once, whose handshakes took the two cores
until connections timed out (the reconcile bench fell from ~80 to 8 objects/s, the operator to
500 MB). At most ``IN_FLIGHT`` of kopf's patches are sent at a time; the rest wait their turn on
the connections already open (our own client is limited the same way, ``backends/kube.py``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from kopf._cogs.clients import api as kopf_api
from kopf._cogs.clients import errors as kopf_errors

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.1, 0.3, 1.0, 2.0, 4.0)  # ~7 s in all, then kopf's own handling
IN_FLIGHT = 32  # kopf's patches sent at once (the API server serves them on two cores)
_MARK = "_kubeloop_retries_conflicts"

Patch = Callable[..., Coroutine[Any, Any, Any]]


def retrying(
    patch: Patch, delays: tuple[float, ...] = RETRY_DELAYS_S, *, in_flight: int = IN_FLIGHT
) -> Patch:
    """``patch`` sent again after each 409, ``delays`` apart (the last 409 is raised), with
    at most ``in_flight`` calls under way at once."""
    # One semaphore per event loop: tests run several operators in one process, each in its
    # own loop, and a semaphore belongs to the loop that first waited on it.
    turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]
    turns = weakref.WeakKeyDictionary()

    @functools.wraps(patch)
    async def send(*args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        turn = turns.get(loop) or turns.setdefault(loop, asyncio.Semaphore(in_flight))
        for delay in (*delays, None):
            try:
                async with turn:
                    return await patch(*args, **kwargs)
            except kopf_errors.APIConflictError:
                if delay is None:
                    raise
                log.info(
                    "kopf's patch of %s answered 409; again in %.1fs", kwargs.get("url"), delay
                )
                await asyncio.sleep(delay)  # not holding a turn
        raise AssertionError("unreachable")

    setattr(send, _MARK, True)
    return send


def install() -> None:
    """Wrap kopf's patch function (once per process, from the operator's startup)."""
    if not getattr(kopf_api.patch, _MARK, False):
        kopf_api.patch = retrying(kopf_api.patch)
