"""
A dedicated thread that runs blocking calls in order and reports back to
the reactor thread.

Leaner than a one-thread :class:`~twisted.python.threadpool.ThreadPool`
(no context copying, a C ``SimpleQueue``): for a single caller the thread
hand-offs are most of what a durable command costs beyond the sync itself.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_STOP = object()


class WriterThread:
    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Daemonic so that an application that never stops the service cannot
        # hang the interpreter's exit; the service stops it properly (and a
        # write cut short is a torn tail, which recovery handles).
        self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
        self._thread.start()

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``f(*args)`` on the thread; a Deferred of its outcome."""
        d: Deferred[Any] = Deferred()
        self._queue.put((f, args, d))
        return d

    def _work(self) -> None:
        call = self._reactor.callFromThread
        get = self._queue.get
        while True:
            item = get()
            if item is _STOP:
                return
            f, args, d = item
            try:
                result = f(*args)
            except BaseException:
                call(d.errback, Failure())
            else:
                call(d.callback, result)

    def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()
