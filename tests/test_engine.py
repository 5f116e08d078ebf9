"""
Engine: inline commit (a small batch written and synced on the reactor
thread at the end of its turn) on task.Clock, an in-memory journal and a
writer the test releases by hand; and the service choosing it.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest
import pytest_twisted
from conftest import ManualRunner
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from examples.bank import Bank, Deposit, bank
from txjournal import JournalFailed, JournalService, JournalWriteError
from txjournal.engine import Engine
from txjournal.journal.file import FileJournal
from txjournal.journal.memory import MemoryJournal
from txjournal.writer import WriterThread


class Harness:
    """An engine with inline commit, its clock, journal and writer."""

    def __init__(self, max_batch: int = 8) -> None:
        self.clock = Clock()
        self.journal = MemoryJournal()
        self.journal.open()
        self.runner = ManualRunner()
        self.ready = True
        self.sync_seconds = 0.0001  # how long an append takes on the fake monotonic clock
        self.now = 0.0  # the fake monotonic clock
        self.soon: list[Any] = []  # what runs at the end of this reactor turn
        self.engine: Engine[Bank] = Engine(
            bank, self.journal, Bank(), self.runner, self.clock.seconds, next_seq=1,
            call_soon=self.soon.append,
            inline_ready=lambda: self.ready,
            inline_max_batch=max_batch,
            inline_stall=0.02,
            inline_cooldown=10.0,
            monotonic=lambda: self.now,
        )
        append = self.journal.append

        def timed_append(data: bytes, first: int, last: int) -> None:
            append(data, first, last)
            self.now += self.sync_seconds

        self.journal.append = timed_append  # type: ignore[method-assign]

    def end_turn(self) -> None:
        """Run what was planned for the end of this turn (not what that plans)."""
        planned, self.soon[:] = list(self.soon), []
        for f in planned:
            f()

    def deposit(self, account: str = "a", amount: int = 1) -> Deferred[Any]:
        return self.engine.execute(Deposit(account, amount))

    def written(self) -> list[int]:
        return [seq for seq, *_ in self.journal.replay()]


def fired(d: Deferred[Any]) -> list[Any]:
    box: list[Any] = []
    d.addBoth(box.append)
    return box


def test_a_lone_command_is_committed_inline_at_the_end_of_the_turn() -> None:
    h = Harness()
    result = fired(h.deposit(amount=5))
    # Not during execute: the rest of the turn may add to the batch.
    assert h.written() == [] and result == []
    h.end_turn()
    assert h.written() == [1]
    assert result == [5]
    assert h.runner.calls == []  # the writer thread was never involved
    assert h.engine.inline_batches == 1 and h.engine.batches == 1
    assert h.engine.applied_seq == 1


def test_commands_of_one_turn_form_one_inline_batch() -> None:
    h = Harness()
    results = [fired(h.deposit(amount=i)) for i in range(1, 6)]
    h.end_turn()
    assert h.written() == [1, 2, 3, 4, 5]
    assert [r[0] for r in results] == [1, 3, 6, 10, 15]
    assert (h.engine.batches, h.engine.records, h.engine.inline_batches) == (1, 5, 1)


def test_a_batch_too_big_for_inline_goes_to_the_writer_at_once() -> None:
    h = Harness(max_batch=3)
    first = [fired(h.deposit()) for _ in range(4)]
    # The fourth made the batch too big: handed to the writer right away.
    assert len(h.runner.calls) == 1
    later = [fired(h.deposit()) for _ in range(2)]
    h.end_turn()  # the planned inline commit finds a flush in flight
    assert h.written() == [] and h.engine.inline_batches == 0
    h.runner.release()
    assert h.written() == [1, 2, 3, 4]
    assert all(r for r in first)
    # The two that waited are small enough to be committed inline.
    assert all(not r for r in later) and h.runner.calls == []
    h.end_turn()
    assert h.written() == [1, 2, 3, 4, 5, 6]
    assert all(r for r in later)
    assert h.engine.inline_batches == 1


def test_a_busy_writer_thread_means_no_inline_commit() -> None:
    h = Harness()
    h.ready = False  # say, pruning segments on the writer thread
    result = fired(h.deposit())
    h.end_turn()
    assert h.written() == [] and len(h.runner.calls) == 1
    h.runner.release()
    assert h.written() == [1] and result == [1]
    assert h.engine.inline_batches == 0


def slow_sync(h: Harness) -> None:
    """One command whose inline sync takes half a second."""
    h.sync_seconds = 0.5
    fired(h.deposit())
    h.end_turn()
    h.sync_seconds = 0.0001


def inline_after(h: Harness, seconds: float) -> bool:
    """Is a command committed inline this many seconds from now?"""
    h.now += seconds
    fired(h.deposit())
    h.end_turn()
    if h.runner.calls:
        h.runner.release_all()
        return False
    return True


def test_a_slow_inline_sync_turns_inline_commit_off_for_the_cool_down() -> None:
    h = Harness()
    slow_sync(h)
    assert h.engine.inline_batches == 1
    # Within the cool-down (10 s): to the writer thread; after it, inline again.
    assert not inline_after(h, 0.0) and not inline_after(h, 9.0) and inline_after(h, 1.0)
    # A second slow sync: twice as long a cool-down.
    slow_sync(h)
    assert not inline_after(h, 19.0) and inline_after(h, 1.0)
    assert h.engine.inline_batches == 4
    assert h.written() == list(range(1, 8))


def test_after_ten_quiet_minutes_the_cool_down_is_back_to_its_first_length() -> None:
    h = Harness()
    slow_sync(h)  # off for 10 s
    assert not inline_after(h, 9.0) and inline_after(h, 1.5)
    slow_sync(h)  # off for 20 s
    assert not inline_after(h, 19.0) and inline_after(h, 1.5)
    assert inline_after(h, 600.0)  # quiet for ten minutes: forgiven
    slow_sync(h)  # off for 10 s again, not 40
    assert inline_after(h, 10.5)


def test_the_cool_down_ignores_the_wall_clock() -> None:
    h = Harness()
    h.sync_seconds = 0.5
    fired(h.deposit())
    h.end_turn()
    h.clock.advance(3600)  # the wall clock jumps; the monotonic one did not
    fired(h.deposit())
    assert len(h.runner.calls) == 1


def test_an_inline_write_error_fail_stops_as_on_the_writer_thread() -> None:
    h = Harness()
    h.journal.fail_next = OSError(errno.EIO, "Input/output error")
    results = [fired(h.deposit()) for _ in range(2)]
    h.end_turn()
    for r in results:
        assert isinstance(r[0], Failure) and r[0].check(JournalWriteError)
    assert "Input/output error" in str(results[0][0].value)
    assert h.engine.model.accounts == {}  # nothing applied
    assert h.engine.applied_seq == 0
    refused = fired(h.deposit())
    assert refused[0].check(JournalFailed)
    h.end_turn()
    assert h.written() == []
    assert fired(h.engine.wait_idle()) == [None]


def test_a_command_issued_while_applying_waits_for_the_next_turn() -> None:
    h = Harness()
    chained: list[Deferred[Any]] = []

    def again(_: object) -> None:
        # A caller that sends its next command from the callback: it must
        # not be synced inside this one's apply (no recursion, and other
        # connections get their turn first).
        if len(chained) < 3:
            chained.append(h.deposit())
            chained[-1].addCallback(again)

    h.deposit().addCallback(again)
    h.end_turn()
    assert h.written() == [1] and len(chained) == 1
    h.end_turn()
    assert h.written() == [1, 2]
    h.end_turn()
    h.end_turn()
    assert h.written() == [1, 2, 3, 4]
    assert h.engine.inline_batches == 4


def test_wait_idle_counts_a_planned_inline_commit() -> None:
    h = Harness()
    fired(h.deposit())
    idle = fired(h.engine.wait_idle())
    assert idle == []
    h.end_turn()
    assert idle == [None]


def test_without_inline_ready_the_engine_never_commits_inline() -> None:
    clock = Clock()
    journal = MemoryJournal()
    journal.open()
    runner = ManualRunner()
    engine: Engine[Bank] = Engine(
        bank, journal, Bank(), runner, clock.seconds, next_seq=1,
        call_soon=lambda f: clock.callLater(0, f),
    )
    engine.execute(Deposit("a", 1))
    assert len(runner.calls) == 1 and clock.getDelayedCalls() == []


# -- the writer thread and the service ------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(30)
async def test_writer_thread_reports_idle_only_once_its_calls_reported_back() -> None:
    from twisted.internet import reactor

    writer = WriterThread(reactor, "test-writer")
    writer.start()
    try:
        assert writer.idle
        d = writer(lambda: 42)
        assert not writer.idle
        assert await d == 42
        assert writer.idle
        failing = writer(lambda: 1 / 0)
        assert not writer.idle
        with pytest.raises(ZeroDivisionError):
            await failing
        assert writer.idle
    finally:
        writer.stop()


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(60)
async def test_service_commits_inline_and_every_acknowledged_command_is_on_disk(
    tmp_path: Any,
) -> None:
    datadir = str(tmp_path / "data")
    service = JournalService(bank, datadir, snapshot_on_stop=False)
    service.startService()
    try:
        for i in range(20):
            assert await service.execute(Deposit("a", 1)) == i + 1
        # And some concurrent ones.
        results = await gatherResults([service.execute(Deposit(f"b{i}", 1)) for i in range(50)])
        assert results == [1] * 50
        engine = service.engine
        assert engine.inline_batches > 0
    finally:
        await service.stopService()
    journal = FileJournal(os.path.join(datadir, "journal"), readonly=True)
    journal.open()
    seqs = [r.seq for r in journal.replay()]
    journal.close()
    assert seqs == list(range(1, 71))


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(60)
async def test_service_inline_commit_can_be_turned_off(tmp_path: Any) -> None:
    service = JournalService(bank, str(tmp_path / "data"), inline_commit=False)
    service.startService()
    try:
        await service.execute(Deposit("a", 1))
        assert service.engine.inline_batches == 0 and service.engine.batches == 1
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(60)
async def test_snapshot_pruning_and_inline_commits_do_not_overlap(tmp_path: Any) -> None:
    """
    Pruning runs on the writer thread and shares the segment list with
    append: while it runs, commits must go to the writer thread (behind it).
    """
    datadir = str(tmp_path / "data")
    service = JournalService(
        bank, datadir, segment_size=4096, prune_segments=True, keep_snapshots=1,
        snapshot_fork=False,
    )
    service.startService()
    try:
        for _round in range(5):
            pending = [service.execute(Deposit("a", 1)) for _ in range(30)]
            snap = service.snapshot()
            pending += [service.execute(Deposit("a", 1)) for _ in range(30)]
            await gatherResults(pending)
            await snap
        assert service.model.accounts["a"] == 300
    finally:
        await service.stopService()
    restarted = JournalService(bank, datadir)
    restarted.startService()
    try:
        assert restarted.model.accounts["a"] == 300
    finally:
        await restarted.stopService()


def test_under_concurrent_load_small_batches_go_to_the_writer_too() -> None:
    """
    Recent batches of many commands mean many callers: the reactor keeps
    reading their commands while the writer thread syncs, even for a batch
    that happens to be small; once the load is a lone caller again, inline.
    """
    h = Harness(max_batch=8)
    for _ in range(3):
        for _ in range(20):
            fired(h.deposit())
        h.runner.release_all()
        h.end_turn()
        h.runner.release_all()
    assert h.engine.inline_batches == 0
    fired(h.deposit())
    assert len(h.runner.calls) == 1 and h.soon == []  # small, but to the writer
    h.runner.release()
    lone = 0
    while lone < 20:  # lone commands, until one is planned inline again
        fired(h.deposit())
        lone += 1
        if h.soon:
            break
        h.runner.release_all()
    assert 2 <= lone < 20 and h.runner.calls == []
    h.end_turn()
    assert h.engine.inline_batches == 1
    assert h.written() == list(range(1, 62 + lone))


@pytest_twisted.ensureDeferred
@pytest.mark.timeout(60)
async def test_no_inline_commit_while_a_snapshot_is_written(tmp_path: Any) -> None:
    """The snapshot keeps the disk busy: syncs go to the writer thread meanwhile."""
    service = JournalService(bank, str(tmp_path / "data"), snapshot_on_stop=False)
    service.startService()
    try:
        # Whatever the disk's speed, no cool-down here.
        service.engine._inline_stall = float("inf")
        await service.execute(Deposit("a", 1))
        before = service.engine.inline_batches  # the first append opened the segment
        await service.execute(Deposit("a", 1))
        inline = service.engine.inline_batches
        assert inline > before
        snap = service.snapshot()
        # The snapshot's result reaches the reactor in a later turn at the
        # earliest: these are committed while it is being written.
        during = [service.execute(Deposit("a", 1)) for _ in range(3)]
        await gatherResults(during)
        await snap
        assert service.engine.inline_batches == inline
        await service.execute(Deposit("a", 1))
        assert service.engine.inline_batches == inline + 1
    finally:
        await service.stopService()
