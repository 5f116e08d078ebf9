"""
A dedicated thread that runs blocking calls in order and reports back to
the reactor thread.

Leaner than a one-thread :class:`~twisted.python.threadpool.ThreadPool`
(no context copying): for a single caller the thread hand-offs are most of
what a durable command costs beyond the sync itself. Calls go through a
``deque`` and the thread sleeps in a blocking ``read`` of an eventfd (a
pipe where there is none): waking a thread that way costs a fraction of
waking it through a lock, which is what ``queue.SimpleQueue`` does.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

_STOP = object()


class _Wakeup:
    """A level-triggered wake-up call between two threads: eventfd or pipe."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            fd = os.eventfd(0, os.EFD_CLOEXEC)
            self._r = self._w = fd
            self.set: Callable[[], Any] = lambda: os.eventfd_write(fd, 1)

            def wait() -> None:
                # os.eventfd_read does not retry after a signal (Python 3.11):
                # a signal delivered to this thread would end it, and with it
                # every journal write or snapshot it was to run.
                while True:
                    try:
                        os.eventfd_read(fd)
                        return
                    except InterruptedError:
                        continue

            self.wait: Callable[[], Any] = wait
        else:  # pragma: no cover - not Linux
            r, w = os.pipe()
            os.set_blocking(w, False)  # a full pipe already wakes the reader
            self._r, self._w = r, w

            def set_() -> None:
                try:
                    os.write(w, b"x")
                except BlockingIOError:
                    pass

            self.set = set_
            self.wait = lambda: os.read(r, 4096)

    def close(self) -> None:
        os.close(self._r)
        if self._w != self._r:
            os.close(self._w)


class WriterThread:
    def __init__(self, reactor: Any, name: str) -> None:
        self._reactor = reactor
        self.name = name
        self._calls: deque[Any] = deque()
        self._wakeup: _Wakeup | None = None
        self._thread: threading.Thread | None = None
        self._outstanding = 0  # calls made whose outcome has not reached the reactor

    @property
    def idle(self) -> bool:
        """
        Whether every call made has finished and reported back. Read on the
        reactor thread, which alone makes calls: while it is busy the thread
        cannot become busy, so an idle thread stays idle until the next call.
        """
        return self._outstanding == 0

    def _settled(self, result: Any) -> Any:
        self._outstanding -= 1
        return result

    def start(self) -> None:
        # Daemonic so that an application that never stops the service cannot
        # hang the interpreter's exit; the service stops it properly (and a
        # write cut short is a torn tail, which recovery handles).
        self._wakeup = _Wakeup()
        self._thread = threading.Thread(
            target=self._work, args=(self._wakeup,), name=self.name, daemon=True
        )
        self._thread.start()

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``f(*args)`` on the thread; a Deferred of its outcome."""
        d: Deferred[Any] = Deferred()
        self._outstanding += 1
        d.addBoth(self._settled)
        self._calls.append((f, args, d))
        wakeup = self._wakeup
        if wakeup is not None:  # else it runs once the thread is started
            wakeup.set()
        return d

    def _work(self, wakeup: _Wakeup) -> None:
        call = self._reactor.callFromThread
        calls = self._calls
        wait = wakeup.wait
        while True:
            # The reactor appends a call *then* wakes us, and we only wait
            # once the deque is empty: no call can be missed. A wake-up whose
            # call was already taken just turns the loop once more.
            if not calls:
                wait()
                continue
            item = calls.popleft()
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
            wakeup, self._wakeup = self._wakeup, None
            assert wakeup is not None
            self._calls.append(_STOP)
            wakeup.set()
            thread.join()
            wakeup.close()
