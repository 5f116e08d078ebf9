"""
ReplicaService against the real PostgreSQL server (see ``pg_support``): a
writer JournalService appends bank commands, a replica started later
catches up, follows, refuses commands, reports lag, and stops at a gap.
No sleeps: tests wait on ``when_applied``, which the replica fires after
each applied batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import until
from pg_support import PG_DSN, Cluster, sql

from examples.bank import Deposit, InsufficientFunds, Transfer, Withdraw, bank
from txjournal import JournalService
from txjournal.errors import JournalCorrupt, RecoveryError
from txjournal.journal.postgres import PostgresJournal
from txjournal.replica import ReadOnlyReplica, ReplicaService

pytestmark = pytest.mark.timeout(60)

async def history(writer: JournalService[Any]) -> None:
    await writer.execute(Deposit("alice", 100))
    await writer.execute(Deposit("bob", 5))
    await writer.execute(Transfer("alice", "bob", 30))
    with pytest.raises(InsufficientFunds):
        await writer.execute(Withdraw("bob", 1000))  # part of history
    await writer.query_as("auditor", "total", {})


def last_seq(writer: JournalService[Any]) -> int:
    return writer.engine.applied_seq


@pytest_twisted.ensureDeferred
async def test_replica_catches_up_and_follows(cluster: Cluster) -> None:
    writer = cluster.writer()
    writer.audit_queries = True  # an audit record in the journal: skipped by the replica
    await history(writer)
    writer.audit_queries = False
    replica = cluster.replica()
    assert replica.applied_seq == last_seq(writer) == 5
    assert replica.model.accounts == writer.model.accounts
    assert replica.lag() == {
        "seq_behind": 0, "seconds_behind": 0.0, "last_applied_seq": 5, "writer_last_seq": 5,
    }

    for i in range(20):
        await writer.execute(Deposit(f"c{i}", i + 1))
    await replica.when_applied(last_seq(writer))
    assert replica.model.accounts == writer.model.accounts
    assert replica.query("balance", account="bob") == 35
    assert await replica.query_as("reader", "total", {}) == writer.query("total")
    assert replica.lag()["seq_behind"] == 0


@pytest_twisted.ensureDeferred
async def test_replica_starts_from_a_snapshot(cluster: Cluster) -> None:
    writer = cluster.writer()
    await history(writer)
    assert await writer.snapshot() == 4
    await writer.execute(Deposit("carol", 9))
    replica = cluster.replica(snapshots=cluster.snapshots)
    assert replica.loaded_snapshot_seq == 4
    assert replica.replayed == 1
    assert replica.model.accounts == writer.model.accounts


@pytest_twisted.ensureDeferred
async def test_a_second_start_is_refused_and_the_replica_keeps_following(cluster: Cluster) -> None:
    writer = cluster.writer()
    await history(writer)
    replica = cluster.replica()
    with pytest.raises(RuntimeError, match="already running"):
        replica.startService()
    assert replica.following
    await writer.execute(Deposit("carol", 9))
    await replica.when_applied(last_seq(writer))
    assert replica.model.accounts == writer.model.accounts


@pytest_twisted.ensureDeferred
async def test_a_start_while_the_replica_is_stopping_is_refused(cluster: Cluster) -> None:
    writer = cluster.writer()
    await history(writer)
    replica = cluster.replica()
    polling = replica._poll()  # a fetch in a thread: the stop waits for it
    stopped: list[Any] = []
    replica.stopService().addBoth(stopped.append)
    assert stopped == []
    with pytest.raises(RuntimeError, match="still stopping"):
        replica.startService()
    await polling
    await until(lambda: stopped == [None])
    replica.startService()  # now it may
    await writer.execute(Deposit("carol", 9))
    await replica.when_applied(last_seq(writer))
    assert replica.model.accounts == writer.model.accounts


@pytest_twisted.ensureDeferred
async def test_replica_refuses_commands_naming_the_writer(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    for attempt in (
        replica.execute_named("deposit", {"account": "x", "amount": 1}, user="u"),
        replica.execute(Deposit("x", 1)),
    ):
        with pytest.raises(ReadOnlyReplica) as caught:
            await attempt
        text = str(caught.value)
        assert f"{cluster.prefix}_records" in text and "127.0.0.1" in text
        assert "s3cret" not in text
        assert "read-only replica" in text
    assert "x" not in writer.model.accounts
    assert sql(f"SELECT count(*) FROM {cluster.prefix}_records") == [(1,)]


@pytest_twisted.ensureDeferred
async def test_lag_when_paused(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await replica.when_applied(1)
    await replica.pause_following()
    for _ in range(3):
        await writer.execute(Deposit("alice", 1))
    lag = await replica.check_lag()
    assert lag["seq_behind"] == 3
    assert lag["last_applied_seq"] == 1 and lag["writer_last_seq"] == 4
    assert lag["seconds_behind"] is not None and lag["seconds_behind"] > 0
    assert replica.model.accounts == {"alice": 1}  # nothing applied while paused

    replica.resume_following()
    await replica.when_applied(4)
    assert replica.model.accounts == {"alice": 4}
    assert replica.lag()["seq_behind"] == 0
    assert replica.lag()["seconds_behind"] == 0.0


@pytest_twisted.ensureDeferred
async def test_a_gap_stops_following(cluster: Cluster) -> None:
    writer = cluster.writer()
    await writer.execute(Deposit("alice", 1))
    replica = cluster.replica()
    await replica.pause_following()
    for _ in range(3):
        await writer.execute(Deposit("alice", 1))
    sql(f"DELETE FROM {cluster.prefix}_records WHERE seq = 2")  # as pruning would
    waiting = replica.when_applied(4)
    replica.resume_following()
    with pytest.raises(JournalCorrupt, match="missing"):
        await waiting
    assert replica.halted is not None
    assert not replica.following
    assert replica.applied_seq == 1 and replica.model.accounts == {"alice": 1}
    with pytest.raises(JournalCorrupt):
        await replica.when_applied(4)


@pytest_twisted.ensureDeferred
async def test_replica_catches_up_over_several_polls(cluster: Cluster) -> None:
    writer = cluster.writer()
    for i in range(25):
        await writer.execute(Deposit("alice", i + 1))
    replica = cluster.replica(max_batch=4)
    assert replica.applied_seq == 25  # start-up replays everything
    await replica.pause_following()
    for _ in range(10):
        await writer.execute(Deposit("bob", 1))
    replica.resume_following()
    assert await replica.when_applied(35) == 35
    assert replica.model.accounts == writer.model.accounts


def test_no_tables_fails_clearly_and_creates_none(prefix: str) -> None:
    replica: ReplicaService[Any] = ReplicaService(bank, PG_DSN, table_prefix=prefix)
    with pytest.raises(RecoveryError, match="do not exist"):
        replica.startService()
    assert not replica.running
    assert sql("SELECT to_regclass(%s)", (f"{prefix}_records",)) == [(None,)]


def test_replica_session_is_read_only(prefix: str) -> None:
    writer = PostgresJournal(PG_DSN, table_prefix=prefix)
    writer.open()
    writer.close()
    replica: ReplicaService[Any] = ReplicaService(bank, PG_DSN, table_prefix=prefix)
    replica.journal.open()
    try:
        with pytest.raises(Exception, match="read-only transaction"):
            replica.journal._execute(f"DELETE FROM {prefix}_records")
        with pytest.raises(ReadOnlyReplica):
            replica.journal.prune(10)
    finally:
        replica.journal.close()


@pytest_twisted.ensureDeferred
async def test_pb_clients_query_a_replica_and_are_refused_commands(cluster: Cluster) -> None:
    from test_pb import Harness, remote_failure

    from txjournal.pb import (
        PermissionDenied,
        RemoteJournalError,
        ServiceUnavailable,
        remote_error_name,
    )

    writer = cluster.writer()
    await writer.execute(Deposit("alice", 10))
    replica = cluster.replica()
    harness = Harness(replica)  # type: ignore[arg-type]  # duck-typed read API
    await harness.start()
    try:
        avatar = await harness.login("alice", "alice-pw")
        assert await avatar.callRemote("query", "balance", {"account": "alice"}) == 10
        e = await remote_failure(avatar.callRemote("execute", "deposit", {"account": "alice", "amount": 1}))
        # Today pb._translate maps any other TxJournalError to RemoteJournalError;
        # with the suggested one-line change it becomes PermissionDenied or ServiceUnavailable.
        assert e.remoteType in {
            remote_error_name(c) for c in (RemoteJournalError, PermissionDenied, ServiceUnavailable)
        }
        assert "read-only replica" in str(e) and f"{cluster.prefix}_records" in str(e)
        assert "s3cret" not in str(e)
    finally:
        await harness.close()
    assert writer.model.accounts == {"alice": 10}


def test_twistd_options_build_a_replica(tmp_path: Any) -> None:
    from twisted.python import usage

    from txjournal.tap import Options, makeService

    def parse(*argv: str) -> Options:
        options = Options()
        options.parseOptions(["--app", "examples.bank:bank", "--no-pb", *argv])
        return options

    options = parse("--replica-of", "postgresql://u:pw@127.0.0.1/test", "--poll-interval", "0.25")
    top = makeService(options)
    service = top.getServiceNamed("journal")
    assert isinstance(service, ReplicaService)
    assert service.poll_interval == 0.25 and service.snapshots is None
    assert "pw" not in service.writer
    with pytest.raises(usage.UsageError, match="PostgreSQL journal"):
        parse("--replica-of", "sqlite:///x.db")
    with pytest.raises(usage.UsageError, match="exclude each other"):
        parse("--replica-of", "postgresql://127.0.0.1/test", "--journal", "postgresql://127.0.0.1/test")
    with pytest.raises(usage.UsageError, match="needs --replica-of"):
        parse("--auto-promote")
    with pytest.raises(usage.UsageError, match="only means something with --auto-promote"):
        parse("--replica-of", "postgresql://127.0.0.1/test", "--promote-grace", "2")
    with pytest.raises(usage.UsageError, match="needs a PostgreSQL --journal"):
        parse("--take-over")
    with pytest.raises(usage.UsageError, match="for a writer"):
        parse("--replica-of", "postgresql://127.0.0.1/test", "--take-over")

    options = parse(
        "--replica-of", "postgresql://127.0.0.1/test", "--auto-promote", "--promote-grace", "3",
        "--snapshot-interval", "60", "--keep-snapshots", "5",
    )
    service = makeService(options).getServiceNamed("journal")
    assert isinstance(service, ReplicaService)
    assert service.auto_promote and service.promote_grace == 3.0
    assert service.writer_options == {
        "sync": True, "snapshot_interval": 60.0, "snapshot_on_stop": True, "keep_snapshots": 5,
    }

    options = parse("--journal", "postgresql://127.0.0.1/test", "--take-over", "--datadir", str(tmp_path))
    writer = makeService(options).getServiceNamed("journal")
    assert writer._journal_given.take_over is True


def test_a_promoted_replica_leaves_the_garbage_collector_alone() -> None:
    """No full collection on the reactor thread in the middle of a failover."""
    from examples.bank import Bank, bank
    from txjournal.journal.memory import MemoryJournal, MemorySnapshotStore
    from txjournal.replica import _PromotedService

    promoted = _PromotedService(
        bank, Bank(), 0, journal=MemoryJournal(), snapshots=MemorySnapshotStore()
    )
    assert promoted.tune_gc is False
    chosen = _PromotedService(
        bank, Bank(), 0, journal=MemoryJournal(), snapshots=MemorySnapshotStore(), tune_gc=True
    )
    assert chosen.tune_gc is True
