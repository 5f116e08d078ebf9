"""
The outcome of a synchronous start-up, for callers that ask before or after.

``MultiService`` ignores Deferreds from ``startService``, so services that
replay synchronously there (the journal service, a replica) expose
``when_ready()`` instead; this is its one implementation.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure


class Readiness:
    def __init__(self) -> None:
        self.started = False
        self.failure: Failure | None = None
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        """Fire once start-up has finished; errback if it failed."""
        if self.started:
            return succeed(None)
        if self.failure is not None:
            return fail(self.failure)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def succeeded(self) -> None:
        self.failure = None
        self.started = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def failed(self, failure: Failure) -> None:
        self.failure = failure
        self.started = False
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(failure)
