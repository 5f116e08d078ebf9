"""
The SQL journals under a real JournalService: the example bank over SQLite
and PostgreSQL (the real server, see ``pg_support``), restarts, SQL queries
of the journaled fields, a second writer fenced off by the primary key,
damaged rows, and a PostgreSQL connection killed in the middle of a run.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_twisted
from pg_support import PG_DSN, drop_tables, require_pg, sql, unique_prefix
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.threads import deferToThread

from examples.bank import Deposit, InsufficientFunds, Transfer, Withdraw, bank
from txjournal import JournalCorrupt, JournalFailed, JournalService, JournalWriteError
from txjournal import record as rec
from txjournal.journal.memory import MemorySnapshotStore
from txjournal.journal.postgres import PostgresJournal
from txjournal.journal.sql import SequenceTaken, SQLJournal
from txjournal.journal.sqlite import SQLiteJournal

pytestmark = pytest.mark.timeout(60)


@dataclass
class SQLBackend:
    """
    One SQL journal's storage. ``make`` gives a new (unopened) journal on
    it; ``query`` runs SQL from another connection, with ``{records}``
    replaced by the records table's name.
    """

    name: str
    make: Callable[[], SQLJournal]
    query: Callable[..., list[tuple[Any, ...]]]
    records: str
    where: str


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLBackend]:
    made: list[SQLJournal] = []
    if request.param == "sqlite":
        import sqlite3

        path = str(tmp_path / "db" / "journal.sqlite")

        def make() -> SQLJournal:
            made.append(SQLiteJournal(path))
            return made[-1]

        def query(text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                return conn.execute(text.format(records="records").replace("%s", "?"), params).fetchall()
            finally:
                conn.close()

        yield SQLBackend("sqlite", make, query, "records", path)
    else:
        require_pg()
        prefix = unique_prefix()

        def make() -> SQLJournal:
            made.append(PostgresJournal(PG_DSN, table_prefix=prefix))
            return made[-1]

        def query(text: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            return sql(text.format(records=f"{prefix}_records"), params)

        yield SQLBackend("postgres", make, query, f"{prefix}_records", f"{prefix}_records")
    for journal in made:
        journal.close()
    if request.param == "postgres":
        drop_tables(prefix)


def start(journal: SQLJournal, **kw: Any) -> JournalService[Any]:
    # A fresh snapshot store each time and no snapshot on stop: every
    # restart then rebuilds the model from the SQL journal alone.
    svc = JournalService(bank, journal=journal, snapshots=MemorySnapshotStore(), snapshot_on_stop=False, **kw)
    svc.startService()
    return svc


def taking_over(journal: SQLJournal) -> SQLJournal:
    """A PostgreSQL journal that fences a live writer instead of refusing to open."""
    if isinstance(journal, PostgresJournal):
        journal.take_over = True
    return journal


def opened(journal: SQLJournal) -> SQLJournal:
    journal.open()
    return journal


def encoded(journal: SQLJournal, first: int, count: int) -> bytes:
    fields = msgpack.packb({"account": "x", "amount": 1}, use_bin_type=True)
    return b"".join(
        rec.encode_record(journal.salt, seq, seq, b"deposit", 1, fields) for seq in range(first, first + count)
    )


@pytest_twisted.ensureDeferred
async def test_bank_survives_restart(backend: SQLBackend) -> None:
    svc = start(backend.make())
    assert await svc.execute(Deposit("alice", 100)) == 100
    await svc.execute(Deposit("bob", 5))
    await svc.execute(Transfer("alice", "bob", 30))
    with pytest.raises(InsufficientFunds):
        await svc.execute(Withdraw("bob", 1000))  # refused, but part of history
    # Concurrent callers share batches; each batch is one transaction.
    await DeferredList([svc.execute(Deposit(f"c{i}", i + 1)) for i in range(50)], fireOnOneErrback=True)
    before = dict(svc.model.accounts)
    await svc.stopService()

    again = start(backend.make())
    assert again.replayed == 54
    assert again.model.accounts == before
    assert await again.execute(Deposit("alice", 1)) == 71
    await again.stopService()
    assert [r[0] for r in backend.query("SELECT seq FROM {records} ORDER BY seq")] == list(range(1, 56))


@pytest_twisted.ensureDeferred
async def test_fields_are_queryable_as_json(backend: SQLBackend) -> None:
    svc = start(backend.make())
    await svc.execute(Deposit("alice", 7))
    await svc.execute(Withdraw("alice", 2))
    await svc.execute(Deposit("carol", 3), user="teller")
    await svc.stopService()
    if backend.name == "sqlite":
        text = (
            "SELECT json_extract(fields, '$.account'), json_extract(fields, '$.amount'), user "
            "FROM {records} WHERE name = 'deposit' ORDER BY seq"
        )
    else:
        text = (
            "SELECT fields->>'account', (fields->>'amount')::int, \"user\" "
            "FROM {records} WHERE name = 'deposit' ORDER BY seq"
        )
    assert backend.query(text) == [("alice", 7, None), ("carol", 3, "teller")]
    assert backend.query("SELECT seq, kind, name, version FROM {records} ORDER BY seq") == [
        (1, rec.KIND_COMMAND, "deposit", 1),
        (2, rec.KIND_COMMAND, "withdraw", 1),
        (3, rec.KIND_COMMAND, "deposit", 1),
    ]


@pytest_twisted.ensureDeferred
async def test_second_writer_fails_and_writes_nothing(backend: SQLBackend) -> None:
    earlier = start(backend.make())
    later = start(taking_over(backend.make()))  # both replayed the same history
    # On PostgreSQL the later writer took over (and fenced the earlier one);
    # on SQLite whoever appends first wins. Either way exactly one writes.
    first, second = (later, earlier) if backend.name == "postgres" else (earlier, later)
    assert await first.execute(Deposit("alice", 1)) == 1
    with pytest.raises(JournalWriteError) as caught:
        await second.execute(Deposit("mallory", 1000))
    assert isinstance(caught.value.__cause__, SequenceTaken)
    assert second.model.accounts == {}  # never applied
    assert await first.execute(Deposit("alice", 2)) == 3
    await first.stopService()
    await second.stopService()
    names = backend.query("SELECT seq, fields FROM {records} ORDER BY seq")
    assert [seq for seq, _ in names] == [1, 2]
    assert "mallory" not in repr(names)


def test_a_refused_batch_writes_none_of_its_records(backend: SQLBackend) -> None:
    """A batch is atomic, and pruning leaves no hole a stale writer could fill."""
    a = opened(backend.make())
    list(a.replay(1))
    b = opened(taking_over(backend.make()))
    list(b.replay(1))
    if backend.name == "postgres":
        a, b = b, a  # the later one took over as the writer
    a.append(encoded(a, 1, 1), 1, 1)
    with pytest.raises(SequenceTaken):
        b.append(encoded(b, 1, 3), 1, 3)
    assert [r[0] for r in backend.query("SELECT seq FROM {records}")] == [1]

    if backend.name == "postgres":
        return  # a writer opened later would take over; see test_take_over_fences_the_old_writer
    stale = opened(backend.make())
    list(stale.replay(1))
    assert stale.next_seq == 2
    a.append(encoded(a, 2, 4), 2, 5)
    assert a.prune(4) and a.prune(100) == []  # the newest row always stays
    assert [r[0] for r in backend.query("SELECT seq FROM {records}")] == [5]
    with pytest.raises(SequenceTaken, match="ends at sequence number 5"):
        stale.append(encoded(stale, 2, 1), 2, 2)
    assert [r[0] for r in backend.query("SELECT seq FROM {records}")] == [5]
    again = opened(backend.make())
    assert [r.seq for r in again.replay(5)] == [5]
    assert again.next_seq == 6


def test_a_damaged_row_stops_replay_naming_where(backend: SQLBackend) -> None:
    journal = opened(backend.make())
    list(journal.replay(1))
    journal.append(encoded(journal, 1, 4), 1, 4)
    journal.close()
    (blob,) = backend.query("SELECT record FROM {records} WHERE seq = 3")[0]
    damaged = bytearray(bytes(blob))  # type: ignore[arg-type]
    damaged[-1] ^= 0x40
    backend.query("UPDATE {records} SET record = %s WHERE seq = 3", (bytes(damaged),))
    reader = opened(backend.make())
    replaying = reader.replay(1)
    assert next(replaying).seq == 1
    with pytest.raises(JournalCorrupt, match="checksum") as caught:
        list(replaying)
    assert caught.value.seq == 3 and backend.where in str(caught.value)
    reader.close()

    backend.query("DELETE FROM {records} WHERE seq = 3")
    with pytest.raises(JournalCorrupt, match=r"records 3\.\.3 are missing"):
        list(opened(backend.make()).replay(1))


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "private" / "journal.sqlite"
    journal = SQLiteJournal(str(path))
    journal.open()
    list(journal.replay(1))
    journal.append(encoded(journal, 1, 1), 1, 1)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    files = [p for p in path.parent.iterdir()]
    assert {p.name for p in files} >= {"journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm"}
    for p in files:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
    journal.close()


def test_postgres_location_never_shows_the_password() -> None:
    journal = PostgresJournal("postgresql://postgres:hunter2@127.0.0.1:5432/test")
    assert "hunter2" not in journal.location and "127.0.0.1" in journal.location
    assert "hunter2" not in PostgresJournal("host=db password=hunter2 user=u").location
    with pytest.raises(ValueError, match="table prefix"):
        PostgresJournal(PG_DSN, table_prefix="x; DROP TABLE y")


@pytest_twisted.ensureDeferred
async def test_postgres_connection_killed_mid_run(tmp_path: Path) -> None:
    """
    Kill the journal's server connection while 20 callers keep commands
    flowing: the pending command fails with JournalWriteError, the live
    model holds exactly the acknowledged commands, and after a restart every
    acknowledged command is there (an unacknowledged one may be too: its
    commit may have landed before the answer was lost).
    """
    require_pg()
    prefix = unique_prefix()
    journal = PostgresJournal(PG_DSN, table_prefix=prefix)
    try:
        svc = start(journal)
        pid = journal.backend_pid
        numbers = itertools.count()
        acked: set[str] = set()
        failed: set[str] = set()
        killed: list[Deferred[Any]] = []

        async def caller() -> None:
            while True:
                account = f"a{next(numbers)}"
                try:
                    await svc.execute(Deposit(account, 1))
                except JournalWriteError:
                    failed.add(account)
                    return
                acked.add(account)
                if len(acked) == 100 and not killed:
                    killed.append(deferToThread(
                        sql, "SELECT pg_terminate_backend(%s, 5000)", (pid,)
                    ))

        await DeferredList(
            [Deferred.fromCoroutine(caller()) for _ in range(20)], fireOnOneErrback=True
        )
        assert killed and (await killed[0]) == [(True,)]
        assert failed and len(acked) >= 100
        assert set(svc.model.accounts) == acked
        await svc.stopService()

        again = start(PostgresJournal(PG_DSN, table_prefix=prefix))
        recovered = set(again.model.accounts)
        assert acked <= recovered <= acked | failed
        await again.stopService()
        again_journal = again._journal
        assert again_journal is not None
        again_journal.close()
    finally:
        journal.close()
        drop_tables(prefix)



@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
@pytest_twisted.ensureDeferred
async def test_take_over_fences_the_old_writer_and_loses_no_acknowledged_command(
    backend: SQLBackend,
) -> None:
    """
    A new writer (a promoted standby) bumps the writer epoch before it
    replays; the old writer, still running with callers, fails its next
    batch before acknowledging it, and everything it did acknowledge is in
    the new writer's model.
    """
    from twisted.internet import defer

    from txjournal.journal.sql import Fenced

    old = start(backend.make())
    acked: dict[str, int] = {}  # account -> highest balance acknowledged
    refused: list[BaseException] = []
    reached: defer.Deferred[None] = defer.Deferred()

    async def caller(account: str) -> None:
        for _ in range(2000):
            try:
                acked[account] = await old.execute(Deposit(account, 1))
            except JournalWriteError as e:
                refused.append(e)
                return
            if sum(acked.values()) >= 200 and not reached.called:
                reached.callback(None)

    callers = [defer.ensureDeferred(caller(f"c{i}")) for i in range(10)]
    await reached  # under load: then a new writer takes over
    new = start(taking_over(backend.make()))
    await defer.gatherResults(callers)
    # The batch in flight fails as fenced (the epoch check, or its session
    # ended by the take-over); the rest are refused after the fail-stop.
    assert len(refused) == 10 and isinstance(refused[0].__cause__, Fenced), refused[0]
    assert all(isinstance(e, JournalFailed) for e in refused[1:] if e.__cause__ is None)
    for account, balance in acked.items():
        assert new.model.accounts[account] >= balance, account
    # Nothing beyond what was acknowledged, but for the batches fenced in flight.
    assert new.engine.last_seq == sum(new.model.accounts.values())
    assert await new.execute(Deposit("after", 1)) == 1
    await old.stopService()
    await new.stopService()
