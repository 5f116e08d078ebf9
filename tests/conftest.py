"""
Shared fixtures. The reactor is never imported at module level here:
pytest-twisted installs it in pytest_configure.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


class ManualRunner:
    """
    Stands in for the writer thread: each call is held until the test
    releases it, so a test can see exactly which records form a batch.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((f, args, d))
        return d

    def release(self) -> None:
        """Run the oldest held call and deliver its outcome."""
        f, args, d = self.calls.pop(0)
        maybeDeferred(f, *args).chainDeferred(d)

    def release_all(self) -> None:
        while self.calls:
            self.release()


def sync_runner(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args)


@pytest.fixture
def manual_runner() -> ManualRunner:
    return ManualRunner()


# -- PostgreSQL journals and replicas (see pg_support) ---------------------------------


@pytest.fixture
def prefix() -> Iterator[str]:
    """A table prefix of its own on the test server; its tables are dropped afterwards."""
    from pg_support import drop_tables, require_pg, sql, unique_prefix

    require_pg()
    name = unique_prefix()
    yield name
    drop_tables(name)
    sql(f"DROP TABLE IF EXISTS {name}_snapshots")


@pytest_twisted.async_yield_fixture
async def cluster(prefix: str) -> AsyncIterator[Any]:
    """Writers and replicas of one journal (``pg_support.Cluster``), all stopped afterwards."""
    from pg_support import Cluster

    c = Cluster(prefix)
    yield c
    for svc in reversed(c.services):
        if svc.running:
            await svc.stopService()


# -- waiting and logs -----------------------------------------------------------------


async def until(condition: Callable[[], bool], seconds: float = 20.0, every: float = 0.01) -> None:
    """
    Wait for a condition nothing signals (a file appearing, a process gone),
    checking every ``every`` seconds on the reactor; fail after ``seconds``.
    """
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    for _ in range(max(1, int(seconds / every))):
        if condition():
            return
        await deferLater(reactor, every, lambda: None)
    if not condition():
        pytest.fail(f"condition not met within {seconds}s")


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    """Every log event emitted during the test."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def texts(events: list[dict[str, Any]]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)

